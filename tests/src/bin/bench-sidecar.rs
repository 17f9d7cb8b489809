//! fnmesh's Thrift proxy benchmark, measured in one run with a real Volo client and the example
//! function: direct to the function, through fnmesh (to the instance on TCP, and on a Unix
//! socket with `transport = "unix"`), through haproxy in TCP mode, and through
//! the leanest proxy tokio allows (`copy-proxy`: bytes copied, nothing decoded). Also cold
//! start (first reply from zero instances, 20 trials, against the function's own spawn-to-accept
//! time) and the sidecar's memory with 100 functions at zero instances.
//!
//! Run: `cargo run --release -p fnmesh-tests --bin bench-sidecar` (haproxy from Debian's package
//! when installed). It prints figures; it asserts nothing.
#![forbid(unsafe_code)]

use std::{
    io::{Read, Write},
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use fnmesh_codec::{FrameDecoder, Limits};
use fnmesh_tests::{
    bench::{
        pct, print_machine, proxy_paths, rss_kb, sequential, start_copy_proxy, start_function,
        start_haproxy, throughput, us, Caller, HaproxyMode, Killed, Path,
    },
    echo::raw_ttheader_call,
    gen::volo_gen::echo::{EchoRequest, EchoServiceClient, EchoServiceClientBuilder},
    sidecar::{echo_fn, echo_function, free_port, over_unix, Sidecar},
};

fn request() -> EchoRequest {
    EchoRequest {
        message: "benchmark".into(),
        sleep_ms: None,
        meta: None,
    }
}

macro_rules! client {
    ($addr:expr) => {
        EchoServiceClientBuilder::new("echo").address($addr).build()
    };
}

struct Thrift(EchoServiceClient);

impl Caller for Thrift {
    fn connect(addr: SocketAddr) -> Self {
        Thrift(client!(addr))
    }
    async fn call(&self) {
        self.0.echo(request()).await.expect("call");
    }
}

/// Starts the function binary alone and connects to it as soon as it accepts, probing every
/// 20 us (finer than fnmesh's own probe, so this side is not flattered): the process, the
/// probe's connection, and when the spawn began.
fn spawn_and_probe() -> (Killed, std::net::TcpStream, Instant) {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let t = Instant::now();
    let process = Killed(
        Command::new(echo_fn())
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    loop {
        if let Ok(conn) = std::net::TcpStream::connect(addr) {
            return (process, conn, t);
        }
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// Spawn-to-accept time of the function binary alone: from before the spawn until a connect
/// succeeds.
fn spawn_to_accept() -> Duration {
    let (_process, _conn, t) = spawn_and_probe();
    t.elapsed()
}

/// Spawn-to-first-reply time of the function binary alone, called the way fnmesh makes a new
/// instance's first call: the same probing, then one call on the connection the probe opened
/// (raw bytes, so no client's own first-call work is counted). This includes what the function
/// still does after it starts listening and its first call, which fnmesh's first reply also
/// waits for.
fn spawn_to_first_reply(call: &[u8]) -> Duration {
    let (_process, mut conn, t) = spawn_and_probe();
    conn.set_nodelay(true).unwrap();
    conn.write_all(call).unwrap();
    let mut buf = BytesMut::new();
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).expect("the first reply");
        assert!(n > 0, "echo-fn closed the connection before replying");
        buf.extend_from_slice(&chunk[..n]);
        if decoder.decode(&mut buf).expect("a Thrift reply").is_some() {
            break;
        }
    }
    t.elapsed()
}

#[tokio::main]
async fn main() {
    let echo_fn_table = |scale: &str| echo_function("echo", scale, "");
    print_machine();

    // Steady state: a direct instance, fnmesh with a warm instance, haproxy in front of the direct one.
    let (_direct, direct) = start_function(&echo_fn());
    let warm = echo_fn_table("min = 1\nmax = 1\nconcurrency = 1024\nidle = \"10m\"");
    let sc = Sidecar::start(&warm);
    let sleepy = Sidecar::start_with("busy_poll = \"0s\"", &warm);
    let unix = Sidecar::start(&over_unix(&warm));
    // FNMESH_COMPARE_BIN: another build of fnmesh measured in the same run (the cost of a change).
    let compare = std::env::var("FNMESH_COMPARE_BIN")
        .ok()
        .map(|bin| Sidecar::start_program(&bin, "", &warm, None));
    let haproxy = start_haproxy(direct, HaproxyMode::Tcp);
    let copy = start_copy_proxy(direct);
    let mut others = vec![
        (&sleepy, "fnmesh, busy_poll = 0s"),
        (&unix, "fnmesh, transport = unix"),
    ];
    if let Some(c) = &compare {
        others.push((c, "fnmesh, FNMESH_COMPARE_BIN"));
    }
    let mut paths = proxy_paths(direct, &sc, &others, haproxy.as_ref(), "haproxy (tcp)");
    paths.push(Path::new(
        "tokio copy proxy (floor)",
        copy.1,
        Some(copy.0 .0.id()),
    ));
    sequential::<Thrift>(&mut paths, "calls on one connection").await;
    throughput::<Thrift>(&mut paths, "concurrent callers", false).await;
    drop(sc);
    drop(sleepy);
    drop(unix);
    drop(compare);
    drop(haproxy);
    drop(copy);

    // Cold start: first reply from zero instances, 20 trials, one warm client connection to
    // fnmesh; each trial is followed by one spawn-to-accept trial, so both see the same host.
    let sc = Sidecar::start(&echo_fn_table("min = 0\nmax = 1\nidle = \"20ms\""));
    let client = client!(sc.addr);
    let mut cold = Vec::new();
    let mut spawn = Vec::new();
    let mut first = Vec::new();
    let call = raw_ttheader_call("echo", "EchoService", "Echo", "benchmark");
    for _ in 0..20 {
        assert!(sc.wait_for(Duration::from_secs(5), |s| s.stat("echo", "processes") == 0));
        let t = Instant::now();
        client.echo(request()).await.expect("cold call");
        cold.push(t.elapsed());
        spawn.push(spawn_to_accept());
        first.push(spawn_to_first_reply(&call));
    }
    drop(client);
    drop(sc);
    cold.sort();
    spawn.sort();
    first.sort();
    let (c50, s50, f50) = (pct(&cold, 0.5), pct(&spawn, 0.5), pct(&first, 0.5));
    println!("\ncold start, 20 trials");
    println!("| measure | p50 | min | max |");
    println!("|---|---|---|---|");
    let ms = |d: Duration| us(d) / 1e3;
    let spread = |what: &str, sorted: &[Duration]| {
        let (p50, min, max) = (pct(sorted, 0.5), sorted[0], sorted[sorted.len() - 1]);
        println!(
            "| {what} | {:.2} ms | {:.2} ms | {:.2} ms |",
            ms(p50),
            ms(min),
            ms(max)
        );
    };
    let share = |what: &str, d: f64| println!("| {what} | {d:.2} ms | | |");
    spread("first reply through fnmesh from zero instances", &cold);
    spread("echo-fn spawn-to-accept alone", &spawn);
    share("fnmesh's share (difference of p50s)", ms(c50) - ms(s50));
    spread(
        "echo-fn spawn-to-first-reply alone, first call on the probe's connection",
        &first,
    );
    share(
        "fnmesh's share against the function's own first reply (difference of p50s)",
        ms(c50) - ms(f50),
    );

    // Memory: 100 functions configured, none started.
    let mut many = String::new();
    for i in 0..100 {
        many.push_str(&echo_function(&format!("f{i}"), "", ""));
    }
    let sc = Sidecar::start(&many);
    std::thread::sleep(Duration::from_millis(300));
    let watchdog = sc.watchdog().map_or(0, rss_kb);
    println!("\nmemory with 100 functions at zero instances: sidecar RSS {:.1} MB (+ watchdog process {:.1} MB)", rss_kb(sc.child.id()) as f64 / 1024.0, watchdog as f64 / 1024.0);
}
