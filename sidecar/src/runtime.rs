//! The process runtime: a function instance is a child process listening on `127.0.0.1:$PORT`,
//! in its own process group, registered with the [`Watchdog`](crate::watchdog::Watchdog) so it
//! dies with the sidecar even when the sidecar is killed with SIGKILL.

use std::{
    net::{SocketAddr, TcpListener},
    process::Stdio,
    time::Duration,
};

use nix::{sys::signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    net::TcpStream,
    process::{Child, Command},
    time::{sleep, timeout, Instant},
};

use crate::{config::FunctionConfig, watchdog::Watchdog};

/// A started, ready instance process.
#[derive(Debug)]
pub struct Process {
    pub addr: SocketAddr,
    pub pid: u32,
    pub child: Child,
}

/// Why an instance did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no free port: {0}")]
    Port(std::io::Error),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("exited with {0} before accepting connections")]
    Exited(std::process::ExitStatus),
    #[error("not accepting connections on {addr} after {after:?} (startup_timeout)")]
    NotReady { addr: SocketAddr, after: Duration },
}

fn free_port() -> std::io::Result<u16> {
    // The kernel picks a free port; the instance binds it a moment later.
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts instance `instance` of `f` and waits until it accepts a connection or
/// `startup_timeout` passes.
pub async fn start(
    f: &FunctionConfig,
    instance: u64,
    watchdog: &Watchdog,
) -> Result<Process, StartError> {
    let port = free_port().map_err(StartError::Port)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
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
    // Probe every 1 ms for the first 100 ms (a loopback connect costs microseconds, and most
    // functions are ready within a few ms: doubling from 1 ms would notice an instance ready at
    // 3.5 ms only at 7 ms), then back off to 20 ms for slow starters.
    let ready = async {
        let mut interval = Duration::from_millis(1);
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(StartError::Exited(status));
            }
            sleep(interval).await;
            if started.elapsed() > Duration::from_millis(100) {
                interval = (interval * 2).min(Duration::from_millis(20));
            }
        }
    };
    match timeout(f.scale.startup_timeout, ready).await {
        Ok(Ok(())) => {
            tracing::debug!(function = %f.name, instance, %addr, ms = started.elapsed().as_secs_f64() * 1e3, "instance ready");
            Ok(Process { addr, pid, child })
        }
        Ok(Err(e)) => {
            watchdog.forget(pid);
            Err(e)
        }
        Err(_) => {
            let _ = child.kill().await;
            watchdog.forget(pid);
            Err(StartError::NotReady {
                addr,
                after: f.scale.startup_timeout,
            })
        }
    }
}

async fn log_lines(
    stream: impl AsyncRead + Unpin,
    function: String,
    instance: u64,
    which: &'static str,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!(function = %function, instance, stream = which, "{line}");
    }
}

/// Stops a process: SIGTERM, then SIGKILL if it has not exited after `grace`.
pub async fn stop(mut child: Child, pid: u32, grace: Duration) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGTERM);
    }
    if timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}
