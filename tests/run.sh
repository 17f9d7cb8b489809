#!/usr/bin/env bash
# fnmesh's test command: installs what the suite needs on a fresh machine (idempotent), then runs
# the format check, clippy with warnings denied, and every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "tests/run.sh: '$1' is required but not installed (it comes with the Rust toolchain)" >&2
        exit 1
    }
}
need_cmd cargo
need_cmd rustfmt
need_cmd cargo-clippy
need_cmd python3

# Apache Thrift's Python library: an independent Thrift client for the end-to-end tests.
if ! python3 -c "import thrift" >/dev/null 2>&1; then
    echo "== installing PyPI thrift"
    python3 -m pip install --quiet --disable-pip-version-check thrift
fi

# Python grpcio and its health stub: an independent gRPC client for the end-to-end tests.
if ! python3 -c "import grpc, grpc_health.v1.health_pb2" >/dev/null 2>&1; then
    echo "== installing PyPI grpcio, grpcio-health-checking"
    python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-health-checking
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
