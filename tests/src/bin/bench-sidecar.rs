//! fnmesh's Thrift proxy benchmark, measured in one run with a real Volo client and the example
//! function: direct to the function, through fnmesh, and through haproxy in TCP mode. Also cold
//! start (first reply from zero instances, 20 trials, against the function's own spawn-to-accept
//! time) and the sidecar's memory with 100 functions at zero instances.
//!
//! Run: `cargo run --release -p fnmesh-tests --bin bench-sidecar` (haproxy from Debian's package
//! when installed). It prints figures; it asserts nothing.
#![forbid(unsafe_code)]

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use fnmesh_tests::{
    gen::volo_gen::echo::{EchoRequest, EchoServiceClientBuilder},
    sidecar::{cpu_time, echo_fn, echo_function, free_port, Sidecar},
};

/// Sequential calls per path, measured in `ROUNDS` rounds that take turns between the paths, so
/// that the host's drift (large on this shared VM) weighs on every path alike.
const SEQUENTIAL: usize = 5_000;
const CONCURRENCY: usize = 64;
const THROUGHPUT_FOR: Duration = Duration::from_secs(5);
const ROUNDS: usize = 10;

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

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A path under test: where to call, and the proxy process whose CPU time is counted (none for
/// the direct path).
struct Path {
    name: &'static str,
    addr: SocketAddr,
    proxy: Option<u32>,
    latencies: Vec<Duration>,
    calls: u64,
    all_calls: u64,
    busy: Duration,
    cpu: Duration,
}

/// Sequential calls on one connection per path, in rounds taking turns.
async fn sequential(paths: &mut [Path]) {
    let clients: Vec<_> = paths.iter().map(|p| client!(p.addr)).collect();
    for c in &clients {
        for _ in 0..200 {
            c.echo(request()).await.expect("warm-up call");
        }
    }
    for _ in 0..ROUNDS {
        for (p, c) in paths.iter_mut().zip(&clients) {
            let cpu = p.proxy.map(cpu_time);
            for _ in 0..SEQUENTIAL / ROUNDS {
                let t = Instant::now();
                c.echo(request()).await.expect("call");
                p.latencies.push(t.elapsed());
            }
            if let (Some(pid), Some(before)) = (p.proxy, cpu) {
                p.cpu += cpu_time(pid).saturating_sub(before);
            }
        }
    }
    for p in paths {
        p.latencies.sort();
    }
}

/// `CONCURRENCY` callers per path, each with its own client, in rounds taking turns; each path
/// is measured for `THROUGHPUT_FOR` in total.
async fn throughput(paths: &mut [Path]) {
    for p in paths.iter_mut() {
        p.cpu = Duration::ZERO;
    }
    for _ in 0..ROUNDS {
        for p in paths.iter_mut() {
            let cpu = p.proxy.map(cpu_time);
            let (calls, secs, all) = throughput_round(p.addr, THROUGHPUT_FOR / ROUNDS as u32).await;
            p.calls += calls;
            p.all_calls += all;
            p.busy += secs;
            if let (Some(pid), Some(before)) = (p.proxy, cpu) {
                p.cpu += cpu_time(pid).saturating_sub(before);
            }
        }
    }
}

/// Calls completed while measured, the time measured, and every call of the round (warm-up and
/// wind-down too: the proxy's CPU is read around the whole round).
async fn throughput_round(addr: SocketAddr, measure: Duration) -> (u64, Duration, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let client = client!(addr);
            while !stop.load(Ordering::Relaxed) {
                client.echo(request()).await.expect("call");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = done.load(Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(measure).await;
    let calls = done.load(Ordering::Relaxed) - start;
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    (calls, elapsed, done.load(Ordering::Relaxed))
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(addr: SocketAddr) {
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < until, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn start_echo(port: u16) -> Killed {
    let c = Command::new(echo_fn())
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    Killed(c)
}

/// haproxy in TCP mode with two threads. (Its `busy-polling` is left out: it spins on both CPUs
/// all the time, which starves the other paths measured in the same run.)
fn start_haproxy(backend: SocketAddr) -> Option<(Killed, SocketAddr)> {
    let port = free_port();
    let cfg = std::env::temp_dir().join(format!(
        "fnmesh-bench-haproxy-{}-{port}.cfg",
        std::process::id()
    ));
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\nbackend be\n  server echo {backend}\n"
        ),
    )
    .ok()?;
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&cfg)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr);
    Some((Killed(child), addr))
}

/// Spawn-to-accept time of the function binary alone: from before the spawn until a connect
/// succeeds, probing every 20 us (finer than fnmesh's own probe, so this side is not flattered).
fn spawn_to_accept() -> Duration {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let t = Instant::now();
    let c = Command::new(echo_fn())
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    while std::net::TcpStream::connect(addr).is_err() {
        std::thread::sleep(Duration::from_micros(20));
    }
    let d = t.elapsed();
    drop(Killed(c));
    d
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let echo_fn_table = |scale: &str| echo_function("echo", scale, "");
    println!(
        "machine: {} cores; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );

    // Steady state: a direct instance, fnmesh with a warm instance, haproxy in front of the direct one.
    let direct_port = free_port();
    let _direct = start_echo(direct_port);
    let direct = SocketAddr::from(([127, 0, 0, 1], direct_port));
    let warm = echo_fn_table("min = 1\nmax = 1\nconcurrency = 1024\nidle = \"10m\"");
    let sc = Sidecar::start(&warm);
    let sleepy = Sidecar::start_with("busy_poll = \"0s\"", &warm);
    let haproxy = start_haproxy(direct);

    let path = |name, addr, proxy| Path {
        name,
        addr,
        proxy,
        latencies: Vec::new(),
        calls: 0,
        all_calls: 0,
        busy: Duration::ZERO,
        cpu: Duration::ZERO,
    };
    let mut paths = vec![
        path("direct", direct, None),
        path("fnmesh", sc.addr, Some(sc.child.id())),
        path(
            "fnmesh, busy_poll = 0s",
            sleepy.addr,
            Some(sleepy.child.id()),
        ),
    ];
    if let Some((h, a)) = &haproxy {
        paths.push(path("haproxy (tcp)", *a, Some(h.0.id())));
    } else {
        println!("haproxy not installed (apt-get install haproxy): its row is skipped");
    }
    sequential(&mut paths).await;
    let (d50, d99) = (
        pct(&paths[0].latencies, 0.5),
        pct(&paths[0].latencies, 0.99),
    );
    println!("\nsequential calls on one connection ({SEQUENTIAL} calls per path, {ROUNDS} rounds taking turns)");
    println!("| path | p50 | p99 | added p50 | added p99 | proxy CPU per call |");
    println!("|---|---|---|---|---|---|");
    for p in &paths {
        let (p50, p99) = (pct(&p.latencies, 0.5), pct(&p.latencies, 0.99));
        let cpu = match p.proxy {
            Some(_) => format!("{:.1} us", us(p.cpu) / p.latencies.len() as f64),
            None => String::new(),
        };
        println!(
            "| {} | {:.1} us | {:.1} us | {:+.1} us | {:+.1} us | {cpu} |",
            p.name,
            us(p50),
            us(p99),
            us(p50) - us(d50),
            us(p99) - us(d99)
        );
    }
    throughput(&mut paths).await;
    let rps = |p: &Path| p.calls as f64 / p.busy.as_secs_f64();
    let direct_rps = rps(&paths[0]);
    println!("\n{CONCURRENCY} concurrent callers, {THROUGHPUT_FOR:?} per path ({ROUNDS} rounds taking turns)");
    println!("| path | calls/s | vs direct | proxy CPU per call |");
    println!("|---|---|---|---|");
    for p in &paths {
        let cpu = match p.proxy {
            Some(_) => format!("{:.1} us", us(p.cpu) / p.all_calls.max(1) as f64),
            None => String::new(),
        };
        println!(
            "| {} | {:.0} | {:.2}x | {cpu} |",
            p.name,
            rps(p),
            rps(p) / direct_rps
        );
    }
    drop(sc);
    drop(sleepy);
    drop(haproxy);

    // Cold start: first reply from zero instances, 20 trials, one warm client connection to
    // fnmesh; each trial is followed by one spawn-to-accept trial, so both see the same host.
    let sc = Sidecar::start(&echo_fn_table("min = 0\nmax = 1\nidle = \"20ms\""));
    let client = client!(sc.addr);
    let mut cold = Vec::new();
    let mut spawn = Vec::new();
    for _ in 0..20 {
        assert!(sc.wait_for(Duration::from_secs(5), |s| s.stat("echo", "processes") == 0));
        let t = Instant::now();
        client.echo(request()).await.expect("cold call");
        cold.push(t.elapsed());
        spawn.push(spawn_to_accept());
    }
    drop(client);
    drop(sc);
    cold.sort();
    spawn.sort();
    let (c50, s50) = (pct(&cold, 0.5), pct(&spawn, 0.5));
    println!("\ncold start, 20 trials");
    println!("| measure | p50 | min | max |");
    println!("|---|---|---|---|");
    println!(
        "| first reply through fnmesh from zero instances | {:.2} ms | {:.2} ms | {:.2} ms |",
        us(c50) / 1e3,
        us(cold[0]) / 1e3,
        us(cold[19]) / 1e3
    );
    println!(
        "| echo-fn spawn-to-accept alone | {:.2} ms | {:.2} ms | {:.2} ms |",
        us(s50) / 1e3,
        us(spawn[0]) / 1e3,
        us(spawn[19]) / 1e3
    );
    println!(
        "| fnmesh's share (difference of p50s) | {:.2} ms | | |",
        (us(c50) - us(s50)) / 1e3
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

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default()
}
