//! What the proxy benchmarks (`bench-sidecar` for Thrift, `bench-grpc` for gRPC) share: paths
//! measured in rounds that take turns, so the host's drift (large on a shared VM) weighs on
//! every path alike; the proxies' CPU time from `/proc`; the tables; haproxy as the reference.
//! Benchmarks print figures and assert nothing.

use std::{
    future::Future,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

pub use crate::sidecar::rss_kb;
use crate::sidecar::{cpu_time, free_port};

/// Sequential calls per path, measured in `ROUNDS` rounds that take turns between the paths.
pub const SEQUENTIAL: usize = 5_000;
pub const CONCURRENCY: usize = 64;
pub const THROUGHPUT_FOR: Duration = Duration::from_secs(5);
pub const ROUNDS: usize = 10;

/// A client of the example function, for one protocol.
pub trait Caller: Send + Sync + 'static {
    fn connect(addr: SocketAddr) -> Self;
    /// One echo call; panics on an error (a benchmark of failures measures nothing).
    fn call(&self) -> impl Future<Output = ()> + Send;
}

pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A path under test: where to call, and the proxy process whose CPU time is counted (none for
/// the direct path).
pub struct Path {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub proxy: Option<u32>,
    latencies: Vec<Duration>,
    calls: u64,
    all_calls: u64,
    busy: Duration,
    cpu: Duration,
}

impl Path {
    pub fn new(name: &'static str, addr: SocketAddr, proxy: Option<u32>) -> Path {
        Path {
            name,
            addr,
            proxy,
            latencies: Vec::new(),
            calls: 0,
            all_calls: 0,
            busy: Duration::ZERO,
            cpu: Duration::ZERO,
        }
    }
}

/// The paths both proxy benchmarks measure: direct, fnmesh, other fnmesh setups to compare, and
/// haproxy (`haproxy_name`) when it is installed.
pub fn proxy_paths(
    direct: SocketAddr,
    fnmesh: &crate::sidecar::Sidecar,
    others: &[(&crate::sidecar::Sidecar, &'static str)],
    haproxy: Option<&(Killed, SocketAddr)>,
    haproxy_name: &'static str,
) -> Vec<Path> {
    let mut paths = vec![
        Path::new("direct", direct, None),
        Path::new("fnmesh", fnmesh.addr, Some(fnmesh.child.id())),
    ];
    for (other, name) in others {
        paths.push(Path::new(name, other.addr, Some(other.child.id())));
    }
    match haproxy {
        Some((h, a)) => paths.push(Path::new(haproxy_name, *a, Some(h.0.id()))),
        None => println!("haproxy not installed (apt-get install haproxy): its row is skipped"),
    }
    paths
}

/// Sequential calls on one client per path, in rounds taking turns, then the latency table
/// (the first path is the direct one the others are compared with).
pub async fn sequential<C: Caller>(paths: &mut [Path], what: &str) {
    let clients: Vec<C> = paths.iter().map(|p| C::connect(p.addr)).collect();
    for c in &clients {
        for _ in 0..200 {
            c.call().await;
        }
    }
    for _ in 0..ROUNDS {
        for (p, c) in paths.iter_mut().zip(&clients) {
            let cpu = p.proxy.map(cpu_time);
            for _ in 0..SEQUENTIAL / ROUNDS {
                let t = Instant::now();
                c.call().await;
                p.latencies.push(t.elapsed());
            }
            if let (Some(pid), Some(before)) = (p.proxy, cpu) {
                p.cpu += cpu_time(pid).saturating_sub(before);
            }
        }
    }
    for p in paths.iter_mut() {
        p.latencies.sort();
    }
    let (d50, d99) = (
        pct(&paths[0].latencies, 0.5),
        pct(&paths[0].latencies, 0.99),
    );
    println!("\nsequential {what} ({SEQUENTIAL} calls per path, {ROUNDS} rounds taking turns)");
    println!("| path | p50 | p99 | added p50 | added p99 | proxy CPU per call |");
    println!("|---|---|---|---|---|---|");
    for p in paths.iter() {
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
}

/// `CONCURRENCY` concurrent callers per path in rounds taking turns, each path measured for
/// `THROUGHPUT_FOR` in total, then the throughput table. `shared`: the callers share one client
/// (gRPC: concurrent streams on its connection) instead of one client each.
pub async fn throughput<C: Caller>(paths: &mut [Path], what: &str, shared: bool) {
    for p in paths.iter_mut() {
        p.cpu = Duration::ZERO;
    }
    for _ in 0..ROUNDS {
        for p in paths.iter_mut() {
            let cpu = p.proxy.map(cpu_time);
            let (calls, secs, all) =
                throughput_round::<C>(p.addr, THROUGHPUT_FOR / ROUNDS as u32, shared).await;
            p.calls += calls;
            p.all_calls += all;
            p.busy += secs;
            if let (Some(pid), Some(before)) = (p.proxy, cpu) {
                p.cpu += cpu_time(pid).saturating_sub(before);
            }
        }
    }
    let rps = |p: &Path| p.calls as f64 / p.busy.as_secs_f64();
    let direct_rps = rps(&paths[0]);
    let haproxy_rps = paths
        .iter()
        .find(|p| p.name.starts_with("haproxy"))
        .map(rps);
    println!("\n{CONCURRENCY} {what}, {THROUGHPUT_FOR:?} per path ({ROUNDS} rounds taking turns)");
    println!("| path | calls/s | vs direct | vs haproxy | proxy CPU per call |");
    println!("|---|---|---|---|---|");
    for p in paths.iter() {
        let cpu = match p.proxy {
            Some(_) => format!("{:.1} us", us(p.cpu) / p.all_calls.max(1) as f64),
            None => String::new(),
        };
        let vs_haproxy = haproxy_rps.map_or(String::new(), |h| format!("{:.2}x", rps(p) / h));
        println!(
            "| {} | {:.0} | {:.2}x | {vs_haproxy} | {cpu} |",
            p.name,
            rps(p),
            rps(p) / direct_rps
        );
    }
}

/// Calls completed while measured, the time measured, and every call of the round (warm-up and
/// wind-down too: the proxy's CPU is read around the whole round).
async fn throughput_round<C: Caller>(
    addr: SocketAddr,
    measure: Duration,
    shared: bool,
) -> (u64, Duration, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let one = Arc::new(C::connect(addr));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (stop, done) = (stop.clone(), done.clone());
        let client = if shared {
            one.clone()
        } else {
            Arc::new(C::connect(addr))
        };
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                client.call().await;
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

/// A process killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_listening(addr: SocketAddr) {
    let until = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < until, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `program` (an example function) on a free port, listening.
pub fn start_function(program: &str) -> (Killed, SocketAddr) {
    let port = free_port();
    let c = Command::new(program)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr);
    (Killed(c), addr)
}

/// How haproxy proxies.
#[derive(Clone, Copy)]
pub enum HaproxyMode {
    /// TCP mode: bytes relayed.
    Tcp,
    /// HTTP mode with HTTP/2 (h2c) to the caller and to the backend: the reference L7 gRPC proxy.
    H2,
}

/// haproxy with two threads in front of `backend`; `None` when it is not installed. (Its
/// `busy-polling` is left out: it spins on both CPUs all the time, which starves the other
/// paths measured in the same run.)
pub fn start_haproxy(backend: SocketAddr, mode: HaproxyMode) -> Option<(Killed, SocketAddr)> {
    let port = free_port();
    let cfg = std::env::temp_dir().join(format!(
        "fnmesh-bench-haproxy-{}-{port}.cfg",
        std::process::id()
    ));
    let (mode, bind, server) = match mode {
        HaproxyMode::Tcp => ("tcp", "", ""),
        HaproxyMode::H2 => ("http", " proto h2", " proto h2"),
    };
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\n  nbthread 2\ndefaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend fe\n  bind 127.0.0.1:{port}{bind}\n  default_backend be\nbackend be\n  server echo {backend}{server}\n"
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
    // Read at start-up: not needed once haproxy listens.
    let _ = std::fs::remove_file(&cfg);
    Some((Killed(child), addr))
}

/// `src/bin/copy-proxy.rs` in front of `backend`: the floor of what a proxy costs on tokio.
pub fn start_copy_proxy(backend: SocketAddr) -> (Killed, SocketAddr) {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Command::new(crate::sidecar::bin("copy-proxy"))
        .arg(addr.to_string())
        .arg(backend.to_string())
        .spawn()
        .unwrap();
    wait_listening(addr);
    (Killed(child), addr)
}

/// `machine: N cores; model`, the first line of every benchmark's output.
pub fn print_machine() {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    println!(
        "machine: {} cores; {model}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
}

/// `h2load` (Debian's `nghttp2-client`), an independent HTTP/2 load generator, against each
/// path: `requests` POSTs of `body` to `url_path` over 4 connections of 32 streams each, in
/// `ROUNDS` rounds taking turns. Prints requests per second against the direct path and the
/// proxy's CPU per request; skipped (with a line saying so) when h2load is not installed.
pub fn h2load(paths: &mut [Path], url_path: &str, headers: &[&str], body: &[u8], requests: u64) {
    if Command::new("h2load").arg("--version").output().is_err() {
        println!("\nh2load not installed (apt-get install nghttp2-client): its table is skipped");
        return;
    }
    let file = std::env::temp_dir().join(format!("fnmesh-h2load-{}", std::process::id()));
    std::fs::write(&file, body).expect("h2load's request body");
    let per_round = requests / ROUNDS as u64;
    let mut totals: Vec<(u64, Duration, Duration, u64)> = vec![Default::default(); paths.len()];
    for _ in 0..ROUNDS {
        for (p, total) in paths.iter().zip(totals.iter_mut()) {
            let cpu = p.proxy.map(cpu_time);
            let mut cmd = Command::new("h2load");
            cmd.args([
                "-n",
                &per_round.to_string(),
                "-c",
                "4",
                "-m",
                "32",
                "-t",
                "1",
            ])
            .arg(format!("--data={}", file.display()));
            for h in headers {
                cmd.args(["-H", h]);
            }
            let out = cmd
                .arg(format!("http://{}{url_path}", p.addr))
                .stderr(Stdio::null())
                .output()
                .expect("h2load runs");
            let text = String::from_utf8_lossy(&out.stdout);
            let (secs, ok) = h2load_figures(&text)
                .unwrap_or_else(|| panic!("h2load against {}: no figures in {text}", p.name));
            total.0 += ok;
            total.1 += secs;
            if let (Some(pid), Some(before)) = (p.proxy, cpu) {
                total.2 += cpu_time(pid).saturating_sub(before);
            }
            total.3 += per_round;
        }
    }
    let _ = std::fs::remove_file(&file);
    let rps = |t: &(u64, Duration, Duration, u64)| t.0 as f64 / t.1.as_secs_f64();
    let direct = rps(&totals[0]);
    println!("\nh2load: {requests} unary calls per path, 4 connections x 32 streams ({ROUNDS} rounds taking turns)");
    println!("| path | calls/s | vs direct | succeeded | proxy CPU per call |");
    println!("|---|---|---|---|---|");
    for (p, t) in paths.iter().zip(&totals) {
        let cpu = match p.proxy {
            Some(_) => format!("{:.1} us", us(t.2) / t.3.max(1) as f64),
            None => String::new(),
        };
        println!(
            "| {} | {:.0} | {:.2}x | {}/{} | {cpu} |",
            p.name,
            rps(t),
            rps(t) / direct,
            t.0,
            t.3
        );
    }
}

/// From h2load's report: the run's duration ("finished in 1.23s, ...") and the requests that
/// succeeded ("requests: ... N succeeded, ...").
fn h2load_figures(report: &str) -> Option<(Duration, u64)> {
    let finished = report
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))?;
    let secs = finished.split(',').next()?.trim();
    let secs = match secs.strip_suffix("ms") {
        Some(ms) => ms.parse::<f64>().ok()? / 1e3,
        None => secs.strip_suffix('s')?.parse::<f64>().ok()?,
    };
    let requests = report.lines().find_map(|l| l.strip_prefix("requests: "))?;
    let ok = requests
        .split(", ")
        .find_map(|part| part.strip_suffix(" succeeded"))?
        .parse()
        .ok()?;
    Some((Duration::from_secs_f64(secs), ok))
}
