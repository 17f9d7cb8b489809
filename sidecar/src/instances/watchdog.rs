//! Children never outlive the sidecar, even when it is killed with SIGKILL. A watchdog process
//! (this binary, verb `__watchdog`), started once, holds the read end of a pipe and the list of
//! live instance pids; when the sidecar dies the kernel closes the pipe and the watchdog kills the
//! instances. This costs nothing per instance start, unlike wrapping each command in
//! `setpriv --pdeathsig` (an extra exec: +1.6 ms per cold start here), and needs no `unsafe`
//! `pre_exec`. The directory of the instances' Unix sockets goes the same way.

use std::{
    collections::BTreeSet,
    io::{BufRead, Write},
    os::unix::{fs::DirBuilderExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::Mutex,
};

use nix::{sys::signal, unistd::Pid};

/// The sidecar's end: registers and forgets instance pids.
pub struct Watchdog {
    pipe: Mutex<Option<ChildStdin>>,
    /// The directory for instances' Unix sockets, once one is needed.
    sockets: Mutex<Option<PathBuf>>,
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
            sockets: Mutex::new(None),
        })
    }

    /// A watchdog that watches nothing (unit tests start no instances).
    #[cfg(test)]
    pub(crate) fn disabled() -> Watchdog {
        Watchdog {
            pipe: Mutex::new(None),
            sockets: Mutex::new(None),
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

    /// The directory for instances' Unix sockets: made on first use, new, mode 0700 (only the
    /// sidecar's user can create a socket there, so nobody else can take an instance's place),
    /// and removed by the watchdog once the sidecar has gone.
    pub fn socket_dir(&self) -> std::io::Result<PathBuf> {
        let mut sockets = crate::lock(&self.sockets);
        if let Some(dir) = sockets.as_ref() {
            return Ok(dir.clone());
        }
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_absolute() && d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = make_private_dir(&base)?;
        match dir.to_str() {
            Some(text) if !text.contains('\n') => self.send(&format!("d{text}\n")),
            _ => {
                tracing::warn!(dir = %dir.display(), "the socket directory will outlive the sidecar: its name is not one line of text")
            }
        }
        *sockets = Some(dir.clone());
        Ok(dir)
    }
}

/// A new directory `fnmesh-PID-N` in `base` that only this user can enter.
fn make_private_dir(base: &Path) -> std::io::Result<PathBuf> {
    let pid = std::process::id();
    let mut last = None;
    for n in 0..64 {
        let dir = base.join(format!("fnmesh-{pid}-{n}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()))
}

/// The watchdog's side: reads `+pid` / `-pid` / `dDIR` lines until EOF, then kills what is left
/// and removes the socket directory.
pub fn main() -> std::process::ExitCode {
    let mut live = BTreeSet::new();
    let mut dirs = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let (op, arg) = line.split_at(line.len().min(1));
        match (op, arg.parse::<i32>()) {
            ("+", Ok(pid)) => {
                live.insert(pid);
            }
            ("-", Ok(pid)) => {
                live.remove(&pid);
            }
            ("d", _) => dirs.push(PathBuf::from(arg)),
            _ => {}
        }
    }
    // Each instance leads its own process group: its children (a wrapper's) go too.
    for pid in live {
        let _ = signal::killpg(Pid::from_raw(pid), signal::Signal::SIGKILL);
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    std::process::ExitCode::SUCCESS
}
