//! The process runtime: a function instance is a child process listening on `127.0.0.1:$PORT`
//! (or, with `transport = "unix"`, on the Unix socket `$FNMESH_SOCKET`), in its own process group, registered with the [`Watchdog`](crate::instances::watchdog::Watchdog) so it
//! dies with the sidecar even when the sidecar is killed with SIGKILL. Signals go to the whole
//! group: a command that is a wrapper (a shell script running the server as its child) takes
//! its children with it.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::OwnedFd,
    process::Stdio,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use nix::{sys::signal, unistd::Pid};
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    process::{Child, Command},
    time::{sleep, timeout_at, Instant},
};

use super::endpoint::Endpoint;
use crate::{
    config::{FunctionConfig, Transport},
    instances::watchdog::Watchdog,
};

/// A started, ready instance process.
#[derive(Debug)]
pub struct Process {
    pub addr: Endpoint,
    pub pid: u32,
    pub child: Child,
}

/// Why an instance did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no free port: {0}")]
    Port(std::io::Error),
    #[error("no Unix socket: {0}")]
    Socket(String),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("exited with {0} before accepting connections")]
    Exited(std::process::ExitStatus),
    #[error("not accepting connections on {addr} after {after:?} (startup_timeout)")]
    NotReady { addr: Endpoint, after: Duration },
}

fn free_port() -> std::io::Result<u16> {
    // The kernel picks a free port; the instance binds it a moment later.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The longest path a Unix socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where instance `instance` of `f` serves: its socket in the sidecar's socket directory (a
/// file left by an earlier instance of the same number goes), or the loopback port.
fn endpoint(
    f: &FunctionConfig,
    instance: u64,
    port: u16,
    watchdog: &Watchdog,
) -> Result<Endpoint, StartError> {
    if f.transport == Transport::Tcp {
        return Ok(Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
    }
    let dir = watchdog
        .socket_dir()
        .map_err(|e| StartError::Socket(format!("cannot make the socket directory: {e}")))?;
    let path = dir.join(format!("{}.{instance}.sock", f.name));
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(StartError::Socket(format!(
            "{} is longer than a Unix socket address holds ({MAX_SOCKET_PATH} bytes)",
            path.display()
        )));
    }
    remove_socket(&path);
    Ok(Endpoint::Unix(path))
}

/// Removes an instance's socket file, if it has one.
fn remove_socket(path: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove an instance's socket");
        }
    }
}

/// What is left of an instance once its process has gone: its socket file.
pub fn clean_up(addr: &Endpoint) {
    if let Endpoint::Unix(path) = addr {
        remove_socket(path);
    }
}

/// Starts instance `instance` of `f` and waits until it accepts a connection or
/// `startup_timeout` passes. `on_ready` runs on the probing thread the moment the instance
/// accepts, with its address and the probe's connection, so waiting calls are dispatched without
/// a detour through this task; once it has run, the start counts as a success (a crash right
/// after is the monitor's to see).
pub async fn start(
    f: &FunctionConfig,
    instance: u64,
    watchdog: &Watchdog,
    on_ready: impl FnOnce(Endpoint, OwnedFd) + Send + 'static,
) -> Result<Process, StartError> {
    let port = free_port().map_err(StartError::Port)?;
    let addr = endpoint(f, instance, port, watchdog)?;
    let mut cmd = Command::new(&f.command[0]);
    cmd.args(&f.command[1..])
        .process_group(0)
        .envs(&f.env)
        .env("PORT", port.to_string())
        .env("FNMESH_FUNCTION", &f.name)
        .env("FNMESH_INSTANCE", instance.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Endpoint::Unix(path) = &addr {
        cmd.env("FNMESH_SOCKET", path);
    }
    let mut child = cmd.spawn().map_err(|source| StartError::Spawn {
        program: f.command[0].clone(),
        source,
    })?;
    let started = Instant::now();
    let pid = child.id().unwrap_or(0);
    watchdog.watch(pid);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(log_lines(out, f.name.clone(), instance, "stdout"));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(log_lines(err, f.name.clone(), instance, "stderr"));
    }
    // Readiness is probed from a blocking thread, where sleeps can be shorter than the runtime
    // timer's 1 ms tick: every 50 us for the first 20 ms (a loopback connect to a closed port
    // costs a few microseconds, and most functions listen within a few ms), every 250 us up to
    // 100 ms, then backing off to 20 ms for slow starters. The connection that succeeds is kept
    // for the instance's first call.
    let state = Arc::new(AtomicU8::new(PROBING));
    let probe = tokio::task::spawn_blocking({
        let state = state.clone();
        let addr = addr.clone();
        move || {
            let Some(stream) = probe_until_ready(&addr, pid, started, &state) else {
                return false;
            };
            let won = state
                .compare_exchange(PROBING, READY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
            if won {
                on_ready(addr, stream);
            }
            won
        }
    });
    let failure = tokio::select! {
        probe = probe => match probe {
            Ok(true) => None,
            _ => Some(None),
        },
        status = child.wait() => Some(status.ok().map(StartError::Exited)),
        () = sleep(f.scale.startup_timeout) => Some(Some(StartError::NotReady {
            addr: addr.clone(),
            after: f.scale.startup_timeout,
        })),
    };
    // A failure stands only if the probe has not found the instance ready meanwhile.
    let failure = failure.filter(|_| {
        state
            .compare_exchange(PROBING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    });
    match failure {
        None => {
            tracing::debug!(function = %f.name, instance, %addr, ms = started.elapsed().as_secs_f64() * 1e3, "instance ready");
            Ok(Process { addr, pid, child })
        }
        Some(e) => {
            let _ = child.kill().await;
            signal_group(pid, signal::Signal::SIGKILL);
            watchdog.forget(pid);
            clean_up(&addr);
            Err(e.unwrap_or(StartError::NotReady {
                addr,
                after: started.elapsed(),
            }))
        }
    }
}

/// Probe states: still probing, found ready (the probe thread won), abandoned (the start failed).
const PROBING: u8 = 0;
const READY: u8 = 1;
const ABANDONED: u8 = 2;

/// Connects to `addr` until it accepts or the start is abandoned.
fn probe_until_ready(
    addr: &Endpoint,
    pid: u32,
    started: Instant,
    state: &AtomicU8,
) -> Option<OwnedFd> {
    // The kernel may delay a sleeping thread's wake-up by its timer slack (50 us by default):
    // as long as the pause itself. This thread only probes.
    let _ = nix::sys::prctl::set_timerslack(1_000);
    let mut pause = Duration::from_micros(50);
    let mut squatted = false;
    while state.load(Ordering::Acquire) == PROBING {
        let connected = match addr {
            Endpoint::Tcp(addr) => probe_tcp(*addr, pid, &mut squatted),
            // Only the sidecar's user can create a socket in its directory: whatever listens
            // there is the instance.
            Endpoint::Unix(path) => std::os::unix::net::UnixStream::connect(path)
                .ok()
                .map(OwnedFd::from),
        };
        if connected.is_some() {
            return connected;
        }
        std::thread::sleep(pause);
        let elapsed = started.elapsed();
        pause = if elapsed < Duration::from_millis(20) {
            Duration::from_micros(50)
        } else if elapsed < Duration::from_millis(100) {
            Duration::from_micros(250)
        } else {
            (pause * 2).min(Duration::from_millis(20))
        };
    }
    None
}

/// One connect to an instance's port: the connection if it is the instance that listens there.
fn probe_tcp(addr: SocketAddr, pid: u32, squatted: &mut bool) -> Option<OwnedFd> {
    // Bounded: a full accept backlog would otherwise hold a plain connect for seconds.
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    // Ready only if the listener is the instance's: another process may have taken the port
    // after fnmesh chose it.
    let owned = match pid {
        0 => None,
        pid => super::owner::listener_is_in_group(addr.port(), pid),
    };
    if owned == Some(false) {
        if !*squatted {
            *squatted = true;
            tracing::warn!(
                port = addr.port(),
                "another process listens on the instance's port; not taking it for the instance"
            );
        }
        return None;
    }
    Some(OwnedFd::from(s))
}

/// The longest line of an instance's output logged; the rest of a longer one is dropped (and
/// counted in a marker).
const MAX_LINE: usize = 16 * 1024;

/// Logs an instance's output a line at a time. Bytes, not text: a line that is not UTF-8 is
/// logged lossily, one past `MAX_LINE` is cut, and nothing the instance writes stops the reading
/// (a closed pipe would kill the instance's next write with SIGPIPE).
async fn log_lines(
    mut stream: impl AsyncRead + Unpin,
    function: String,
    instance: u64,
    which: &'static str,
) {
    let log = |line: &[u8], dropped: usize| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = String::from_utf8_lossy(line);
        match dropped {
            0 => tracing::info!(function = %function, instance, stream = which, "{text}"),
            n => {
                tracing::info!(function = %function, instance, stream = which, "{text} [... {n} more bytes of this line dropped]")
            }
        }
    };
    let (mut line, mut dropped) = (Vec::new(), 0usize);
    let mut chunk = vec![0u8; 8 * 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut rest = &chunk[..n];
        loop {
            let end = rest.iter().position(|b| *b == b'\n');
            let piece = &rest[..end.unwrap_or(rest.len())];
            let keep = piece.len().min(MAX_LINE - line.len());
            line.extend_from_slice(&piece[..keep]);
            dropped += piece.len() - keep;
            let Some(end) = end else { break };
            log(&line, dropped);
            line.clear();
            dropped = 0;
            rest = &rest[end + 1..];
        }
    }
    if !line.is_empty() || dropped > 0 {
        log(&line, dropped);
    }
}

/// Stops an instance: SIGTERM to its process group; SIGKILL to what is left of the group after
/// `grace` (the process itself, or children of a wrapper that outlived it).
/// Gives how long the process took to exit after SIGTERM, and whether it had to be killed.
pub async fn stop(mut child: Child, pid: u32, grace: Duration) -> (Duration, bool) {
    let sent = Instant::now();
    let until = sent + grace;
    signal_group(pid, signal::Signal::SIGTERM);
    let killed = timeout_at(until, child.wait()).await.is_err();
    if killed {
        let _ = child.kill().await;
    }
    let took = sent.elapsed();
    while group_alive(pid) && Instant::now() < until {
        sleep(Duration::from_millis(10)).await;
    }
    signal_group(pid, signal::Signal::SIGKILL);
    (took, killed)
}

/// Sends `sig` to the process group `pid` leads (every instance leads its own).
pub fn signal_group(pid: u32, sig: signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = signal::killpg(Pid::from_raw(pid), sig);
    }
}

/// Whether any process of the group `pid` led is still there.
fn group_alive(pid: u32) -> bool {
    i32::try_from(pid).is_ok_and(|pid| signal::killpg(Pid::from_raw(pid), None).is_ok())
}
