//! The mesh paths' benchmark, in one run with a real Volo client, a real Consul agent and the
//! example function: a call through a sidecar's egress to an endpoint the registry lists,
//! against haproxy (TCP mode) and the copy-proxy floor in front of the same endpoint; and a
//! call that one node forwards to a peer node with a warm instance, against the same call
//! served by that node alone (one hop). All on one host, over loopback.
//!
//! Run: `cargo run --release -p fnmesh-tests --bin bench-mesh` (Consul as tests/run.sh fetches
//! it; haproxy from Debian's package when installed). It prints figures; it asserts nothing.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use fnmesh_tests::{
    bench::{
        print_machine, sequential, start_copy_proxy, start_function, start_haproxy, throughput,
        Caller, HaproxyMode, Path,
    },
    gen::volo_gen::echo::{EchoRequest, EchoServiceClient, EchoServiceClientBuilder},
    registries::Consul,
    sidecar::{echo_fn, echo_function, free_port, Sidecar},
};

/// A Volo client naming `plain-echo` (ToService): the egress finds it in the registry; a node
/// serving `echo` takes it by its IDL service (`isn`); a plain server or proxy ignores it.
struct Thrift(EchoServiceClient);

impl Caller for Thrift {
    fn connect(addr: SocketAddr) -> Self {
        Thrift(
            EchoServiceClientBuilder::new("plain-echo")
                .address(addr)
                .build(),
        )
    }
    async fn call(&self) {
        let req = EchoRequest {
            message: "benchmark".into(),
            sleep_ms: None,
            meta: None,
        };
        self.0.echo(req).await.expect("call");
    }
}

#[tokio::main]
async fn main() {
    print_machine();
    let consul = Consul::start();
    let discovery = format!(
        "[discovery]\nbackend = \"consul\"\naddress = \"{}\"\nttl = \"10s\"\n\n",
        consul.url()
    );
    // The endpoint: a plain Volo server, registered as any service would be.
    let (_plain, plain) = start_function(&echo_fn());
    consul.register_plain("plain-echo", plain.port());
    let egress = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let e = Sidecar::start_with(&format!("egress = \"{egress}\""), &discovery);
    // Node B keeps a warm instance; node A has none and forwards to B (B always has room).
    let warm = "min = 1\nmax = 1\nconcurrency = 1024\nidle = \"10m\"";
    let b = Sidecar::start(&format!("{discovery}{}", echo_function("echo", warm, "")));
    let cold = "min = 0\nmax = 1\nconcurrency = 1024";
    let a = Sidecar::start(&format!("{discovery}{}", echo_function("echo", cold, "")));
    while consul.passing("echo").len() < 2
        || consul.passing("plain-echo").is_empty()
        || b.stat("echo", "ready") == 0
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Thrift::connect(a.addr).call().await;
    assert_eq!(
        a.stat("echo", "processes"),
        0,
        "node A forwards, starts nothing"
    );
    let haproxy = start_haproxy(plain, HaproxyMode::Tcp);
    let copy = start_copy_proxy(plain);
    let mut paths = vec![
        Path::new("direct (the registered endpoint)", plain, None),
        Path::new(
            "fnmesh egress -> registry endpoint",
            egress,
            Some(e.child.id()),
        ),
    ];
    match &haproxy {
        Some((h, addr)) => paths.push(Path::new(
            "haproxy (tcp) -> endpoint",
            *addr,
            Some(h.0.id()),
        )),
        None => println!("haproxy not installed (apt-get install haproxy): its row is skipped"),
    }
    paths.push(Path::new(
        "tokio copy proxy (floor) -> endpoint",
        copy.1,
        Some(copy.0 .0.id()),
    ));
    paths.push(Path::new(
        "fnmesh node B (one hop)",
        b.addr,
        Some(b.child.id()),
    ));
    paths.push(Path::new(
        "fnmesh node A forwarding to node B (two hops; CPU: A's)",
        a.addr,
        Some(a.child.id()),
    ));
    sequential::<Thrift>(&mut paths, "calls on one connection").await;
    throughput::<Thrift>(&mut paths, "concurrent callers", false).await;
    assert_eq!(a.stat("echo", "processes"), 0, "node A never started one");
}
