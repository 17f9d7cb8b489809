#!/usr/bin/env bash
# Instructions the sidecar executes per proxied call, counted by callgrind: the sidecar runs
# under valgrind with one worker, busy polling off and one warm instance, serves N and then 2N
# sequential calls in two runs, and the difference of the two totals divided by N leaves out
# start-up and shutdown. A benchmark, not a test: it prints figures and asserts nothing.
#
# usage: tests/callgrind.sh [FNMESH_BINARY (default target/release/fnmesh)] [N (default 2000)]
# FNMESH_CALLGRIND_TOML: more of the policy file, appended as it is (a `[telemetry]` table, to
# count what traces or the access log cost).
# Needs: valgrind, release builds of fnmesh-tests' bins (echo-fn, grpc-echo-fn, echo-call), and
# Python grpcio (tests/run.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
fnmesh=$(realpath "${1:-target/release/fnmesh}")
n=${2:-2000}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# The sidecar's total instructions for `calls` calls of `protocol`.
instructions() {
    local protocol=$1 calls=$2 port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    local fn=echo-fn idl=idl/thrift/echo.thrift
    if [ "$protocol" = grpc ]; then fn=grpc-echo-fn idl=idl/proto/echo.proto; fi
    cat > "$scratch/fnmesh.toml" <<TOML
[sidecar]
listen = "127.0.0.1:$port"
workers = 1
busy_poll = "0s"
drain_timeout = "2s"

[[function]]
name = "echo"
protocol = "$protocol"
idl = "$PWD/$idl"
command = ["$PWD/target/release/$fn"]

[function.scale]
min = 1
max = 1

${FNMESH_CALLGRIND_TOML:-}
TOML
    valgrind --tool=callgrind --callgrind-out-file="$scratch/out.%p" "$fnmesh" run -c "$scratch/fnmesh.toml" \
        >/dev/null 2>"$scratch/log" &
    local pid=$!
    for _ in $(seq 100); do
        (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.2
    done
    if [ "$protocol" = grpc ]; then
        python3 tests/python/grpc_echo_client.py "$port" repeat "$calls" >/dev/null
    else
        target/release/echo-call "127.0.0.1:$port" "$calls" >/dev/null
    fi
    if ! kill -TERM "$pid" 2>/dev/null; then
        echo "callgrind.sh: the sidecar exited early:" >&2
        cat "$scratch/log" >&2
        exit 1
    fi
    wait "$pid" || true
    # The sidecar's own process (not the watchdog it starts).
    grep -h '^summary:' "$scratch/out.$pid" | awk '{print $2}'
    rm -f "$scratch"/out.*
}

for protocol in thrift grpc; do
    a=$(instructions "$protocol" "$n")
    b=$(instructions "$protocol" $((2 * n)))
    echo "$protocol: $(( (b - a) / n )) instructions per call (sidecar only; $n and $((2 * n)) calls: $a, $b)"
done
