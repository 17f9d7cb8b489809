//! Children never outlive the sidecar, even when it is killed with SIGKILL. A watchdog process
//! (this binary, verb `__watchdog`), started once, holds the read end of a pipe and the list of
//! live instance pids; when the sidecar dies the kernel closes the pipe and the watchdog kills the
//! instances. This costs nothing per instance start, unlike wrapping each command in
//! `setpriv --pdeathsig` (an extra exec: +1.6 ms per cold start here), and needs no `unsafe`
//! `pre_exec`.

use std::{
    collections::BTreeSet,
    io::{BufRead, Write},
    os::unix::process::CommandExt,
    process::{ChildStdin, Command, Stdio},
    sync::Mutex,
};

use nix::{sys::signal, unistd::Pid};

/// The sidecar's end: registers and forgets instance pids.
pub struct Watchdog {
    pipe: Mutex<Option<ChildStdin>>,
}

impl Watchdog {
    /// Starts the watchdog process.
    pub fn start() -> std::io::Result<Watchdog> {
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .arg("__watchdog")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Its own process group: a terminal's Ctrl-C reaches the sidecar, which drains, and
            // not the watchdog.
            .process_group(0)
            .spawn()?;
        Ok(Watchdog {
            pipe: Mutex::new(child.stdin),
        })
    }

    /// A watchdog that watches nothing (unit tests start no instances).
    #[cfg(test)]
    pub(crate) fn disabled() -> Watchdog {
        Watchdog {
            pipe: Mutex::new(None),
        }
    }

    fn send(&self, line: &str) {
        let mut pipe = crate::lock(&self.pipe);
        if let Some(p) = pipe.as_mut() {
            if p.write_all(line.as_bytes()).is_err() {
                tracing::warn!("the watchdog has gone: instances may outlive a killed sidecar");
                *pipe = None;
            }
        }
    }

    /// A new instance process to kill if the sidecar dies.
    pub fn watch(&self, pid: u32) {
        self.send(&format!("+{pid}\n"));
    }

    /// An instance process that has been reaped.
    pub fn forget(&self, pid: u32) {
        self.send(&format!("-{pid}\n"));
    }
}

/// The watchdog's side: reads `+pid` / `-pid` lines until EOF, then kills what is left.
pub fn main() -> std::process::ExitCode {
    let mut live = BTreeSet::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (op, pid) = line.split_at(line.len().min(1));
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        match op {
            "+" => {
                live.insert(pid);
            }
            "-" => {
                live.remove(&pid);
            }
            _ => {}
        }
    }
    // Each instance leads its own process group: its children (a wrapper's) go too.
    for pid in live {
        let _ = signal::killpg(Pid::from_raw(pid), signal::Signal::SIGKILL);
    }
    std::process::ExitCode::SUCCESS
}
