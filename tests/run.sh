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

# thriftpy2: a second, independent Thrift implementation that loads an IDL at run time; its
# Compact protocol checks fnmesh's JSON codec in Compact (Volo cannot decode Compact bools).
if ! python3 -c "import thriftpy2" >/dev/null 2>&1; then
    echo "== installing PyPI thriftpy2"
    python3 -m pip install --quiet --disable-pip-version-check thriftpy2
fi

# Python grpcio and its health stub: an independent gRPC client for the end-to-end tests; and
# grpcio-tools, which generates the stubs of the documented Python function (examples/).
if ! python3 -c "import grpc, grpc_health.v1.health_pb2, grpc_tools.protoc" >/dev/null 2>&1; then
    echo "== installing PyPI grpcio, grpcio-health-checking, grpcio-tools"
    python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-health-checking grpcio-tools
fi

# The official OTLP protobufs: the trace tests' OTLP receiver (tests/python/otlp_receiver.py).
if ! python3 -c "from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc" >/dev/null 2>&1; then
    echo "== installing PyPI opentelemetry-proto"
    python3 -m pip install --quiet --disable-pip-version-check opentelemetry-proto
fi

# openapi-spec-validator: the gateway test validates /admin/openapi.json with it.
if ! python3 -c "import openapi_spec_validator" >/dev/null 2>&1; then
    echo "== installing PyPI openapi-spec-validator"
    python3 -m pip install --quiet --disable-pip-version-check openapi-spec-validator
fi

# Python h2 (with hpack and hyperframe): the HTTP/2 conformance cases' independent client.
if ! python3 -c "import h2, hpack" >/dev/null 2>&1; then
    echo "== installing PyPI h2"
    python3 -m pip install --quiet --disable-pip-version-check h2
fi

# Debian packages: etcd (a real etcd for the discovery tests), prometheus, openssl (the registry TLS tests
# make their certificates with it), and protoc with the well-known protos (etcd-client, the
# tests' independent etcd client, generates its gRPC code at build time; fnmesh itself needs no
# protoc).
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# A real Prometheus for the metrics tests (it scrapes a sidecar and answers PromQL).
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
# `ip netns` for the multi-node tests (a namespace per node; they need root, as CI runs).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
# NATS with JetStream for the async-call and queue-trigger tests (tests start `nats-server -js`).
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing Debian ${missing[*]}"
    sudo_="" ; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Consul 1.8.7: Debian bullseye's package (bookworm has none), fetched through a scratch apt
# source list without touching the system's sources, and unpacked under target/tools.
consul_dir=target/tools/consul
if [ ! -x "$consul_dir/usr/bin/consul" ]; then
    echo "== fetching Consul 1.8.7 (Debian bullseye's consul package)"
    scratch=$(mktemp -d)
    mkdir -p "$scratch/lists/partial" "$scratch/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main" \
        > "$scratch/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$scratch/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$scratch/lists" -o "Dir::Cache=$scratch/cache" -o "Debug::NoLocking=1"
        -o "APT::Sandbox::User=root")
    apt-get "${apt_opts[@]}" update -qq
    (cd "$scratch" && apt-get "${apt_opts[@]}" download consul=1.8.7* >/dev/null)
    mkdir -p "$consul_dir"
    dpkg-deb -x "$scratch"/consul_*.deb "$consul_dir"
    rm -rf "$scratch"
fi
# sed reads all of it: `head` could close the pipe early and, under pipefail, fail the run (SIGPIPE).
"$consul_dir/usr/bin/consul" version | sed -n 1p

# A run on a fresh clone builds once: incremental state would only take disk (several GiB).
if [ "${CI:-}" = "true" ]; then
    export CARGO_INCREMENTAL=0
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
# Both builds are checked: the default one, and the one with the etcd tests' independent client.
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets --features fnmesh-tests/etcd -- -D warnings
echo "== cargo test"
cargo test --workspace --features fnmesh-tests/etcd
