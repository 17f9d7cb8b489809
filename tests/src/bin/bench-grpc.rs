//! fnmesh's gRPC proxy benchmark, measured in one run with a real volo-grpc client and the
//! example gRPC function: unary calls direct to the function, through fnmesh (to the instance on
//! TCP, and on a Unix socket with `transport = "unix"`), through haproxy in HTTP mode with h2 on both sides, the
//! reference L7 gRPC proxy, and through `copy-proxy`, which copies bytes without reading them
//! (the floor: what carrying the connection costs, with no HTTP/2 work at all).
//!
//! Last, `h2load` (an independent HTTP/2 load generator, Debian's `nghttp2-client`) drives the
//! same paths.
//!
//! Run: `cargo run --release -p fnmesh-tests --bin bench-grpc` (haproxy and h2load from Debian's
//! packages when installed). It prints figures; it asserts nothing.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use fnmesh_tests::{
    bench::{
        h2load, print_machine, proxy_paths, sequential, start_copy_proxy, start_function,
        start_haproxy, throughput, Caller, HaproxyMode, Path,
    },
    proto::proto_gen::echo::{EchoClient, EchoClientBuilder, EchoRequest},
    sidecar::{grpc_echo_fn, grpc_echo_function, over_unix, Sidecar},
};

struct Grpc(EchoClient);

impl Caller for Grpc {
    fn connect(addr: SocketAddr) -> Self {
        Grpc(EchoClientBuilder::new("echo").address(addr).build())
    }
    async fn call(&self) {
        let r = self
            .0
            .unary_echo(EchoRequest {
                message: "benchmark".into(),
                sleep_ms: 0,
            })
            .await
            .expect("call");
        assert_eq!(r.get_ref().message.as_str(), "benchmark");
    }
}

#[tokio::main]
async fn main() {
    print_machine();
    let (_direct, direct) = start_function(&grpc_echo_fn());
    let warm = grpc_echo_function(
        "echo",
        "min = 1\nmax = 1\nconcurrency = 1024\nidle = \"10m\"",
        "",
    );
    let sc = Sidecar::start(&warm);
    let unix = Sidecar::start(&over_unix(&warm));
    // FNMESH_COMPARE_BIN: another build of fnmesh measured in the same run (the cost of a change).
    let compare = std::env::var("FNMESH_COMPARE_BIN")
        .ok()
        .map(|bin| Sidecar::start_program(&bin, "", &warm, None));
    let haproxy = start_haproxy(direct, HaproxyMode::H2);
    let mut others = vec![(&unix, "fnmesh, transport = unix")];
    if let Some(c) = &compare {
        others.push((c, "fnmesh, FNMESH_COMPARE_BIN"));
    }
    let mut paths = proxy_paths(direct, &sc, &others, haproxy.as_ref(), "haproxy (http, h2)");
    let copy = start_copy_proxy(direct);
    paths.push(Path::new(
        "tokio copy proxy (L4 floor)",
        copy.1,
        Some(copy.0 .0.id()),
    ));
    sequential::<Grpc>(&mut paths, "unary calls, one client").await;
    throughput::<Grpc>(&mut paths, "concurrent unary streams on one client", true).await;
    // A gRPC frame of EchoRequest { message: "benchmark" }.
    let mut body = vec![0, 0, 0, 0, 11, 0x0a, 9];
    body.extend_from_slice(b"benchmark");
    h2load(
        &mut paths,
        "/echo.Echo/UnaryEcho",
        &["content-type: application/grpc", "te: trailers"],
        &body,
        100_000,
    );
}
