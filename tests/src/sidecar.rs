//! Runs a real `fnmesh run` process for a test: a config written to a scratch directory, free
//! loopback ports, admin queries, and the instance processes it started (read from /proc).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A free loopback port for a server a test starts, handed out once per test process. It is
/// below the kernel's range of ephemeral ports (32768 and up on Linux): a port the kernel picked
/// could be taken by an outgoing connection of a test running alongside before the server binds
/// it (a Consul agent once failed to start that way in CI).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const BASE: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // Test binaries run one after another: each starts at its own place in the range.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id() % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (BASE + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {BASE}..{}", BASE + SPAN);
}

/// A binary of this crate, found next to the running executable (cargo puts the binaries that
/// integration tests depend on beside their `deps/` directory).
pub fn bin(name: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    // A test runs from target/<profile>/deps/, a binary of this crate from target/<profile>/.
    let dirs = [exe.parent(), exe.parent().and_then(Path::parent)];
    let path = dirs
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not built next to {}", exe.display()));
    path.display().to_string()
}

/// The example echo function (`src/bin/echo-fn.rs`).
pub fn echo_fn() -> String {
    bin("echo-fn")
}

/// `fnmesh` itself (`src/bin/fnmesh-under-test.rs`).
pub fn fnmesh_bin() -> String {
    bin("fnmesh-under-test")
}

pub fn idl(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../idl")
        .join(rel)
}

/// A running sidecar; killed (SIGKILL) if still running when dropped.
pub struct Sidecar {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    dir: PathBuf,
    /// The policy file's `[sidecar]` section.
    head: String,
}

impl Sidecar {
    /// Starts `fnmesh run` with `[sidecar]` on free ports and the given `[[function]]` tables, and
    /// waits until it accepts connections. A port found free can be taken by a concurrent test
    /// (or an instance's port) before fnmesh binds it: an exit at start is retried on new ports.
    pub fn start(functions: &str) -> Sidecar {
        Self::start_with("", functions)
    }

    /// As [`Sidecar::start`], with more `[sidecar]` keys (`sidecar`, one per line).
    pub fn start_with(sidecar: &str, functions: &str) -> Sidecar {
        Self::start_logging(sidecar, functions, None)
    }

    /// As [`Sidecar::start_with`], logging at `level` (`RUST_LOG`; else `FNMESH_TEST_LOG`, else
    /// `warn`).
    pub fn start_logging(sidecar: &str, functions: &str, level: Option<&str>) -> Sidecar {
        Self::start_program(&fnmesh_bin(), sidecar, functions, level)
    }

    /// As [`Sidecar::start_logging`], running `program` (another build of fnmesh, for a
    /// benchmark that compares two).
    pub fn start_program(
        program: &str,
        sidecar: &str,
        functions: &str,
        level: Option<&str>,
    ) -> Sidecar {
        Self::start_at(program, None, sidecar, functions, level)
    }

    /// As [`Sidecar::start_with`], in network namespace `ns` (`ip netns exec`), listening
    /// (and serving its admin API) on `ip`, the namespace's address.
    pub fn start_in(ns: &str, ip: std::net::IpAddr, sidecar: &str, functions: &str) -> Sidecar {
        Self::start_at(&fnmesh_bin(), Some((ns, ip)), sidecar, functions, None)
    }

    fn start_at(
        program: &str,
        place: Option<(&str, std::net::IpAddr)>,
        sidecar: &str,
        functions: &str,
        level: Option<&str>,
    ) -> Sidecar {
        for _ in 0..2 {
            if let Ok(s) = Self::try_start(program, place, sidecar, functions, level) {
                return s;
            }
        }
        Self::try_start(program, place, sidecar, functions, level)
            .unwrap_or_else(|status| panic!("fnmesh exited at start: {status}"))
    }

    fn try_start(
        program: &str,
        place: Option<(&str, std::net::IpAddr)>,
        sidecar: &str,
        functions: &str,
        level: Option<&str>,
    ) -> Result<Sidecar, std::process::ExitStatus> {
        let ip = place.map_or(std::net::IpAddr::from([127, 0, 0, 1]), |(_, ip)| ip);
        let addr = SocketAddr::new(ip, free_port());
        let admin = SocketAddr::new(ip, free_port());
        let dir =
            std::env::temp_dir().join(format!("fnmesh-e2e-{}-{}", std::process::id(), addr.port()));
        std::fs::create_dir_all(&dir).unwrap();
        let head = format!(
            "[sidecar]\nlisten = \"{addr}\"\nadmin = \"{admin}\"\ndrain_timeout = \"3s\"\n{sidecar}\n\n"
        );
        let path = dir.join("fnmesh.toml");
        std::fs::write(&path, format!("{head}{functions}")).unwrap();
        // The log goes to a file the test can read (`Sidecar::log`), and is printed when the
        // test fails.
        let log = std::fs::File::create(dir.join("fnmesh.log")).unwrap();
        let mut command = match place {
            // `ip netns exec` runs the program in the namespace as itself (same process).
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        let child = command
            .args(["run", "-c"])
            .arg(&path)
            .env(
                "RUST_LOG",
                level.map(str::to_owned).unwrap_or_else(|| {
                    std::env::var("FNMESH_TEST_LOG").unwrap_or_else(|_| "warn".into())
                }),
            )
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(log)
            .spawn()
            .expect("fnmesh-under-test starts");
        let mut s = Sidecar {
            child,
            addr,
            admin,
            dir,
            head,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() || TcpStream::connect(admin).is_err() {
            if let Ok(Some(status)) = s.child.try_wait() {
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "fnmesh did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(s)
    }

    /// What the sidecar has written to stdout so far (the access log).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    /// What the sidecar has logged so far (its stderr).
    pub fn log(&self) -> String {
        let bytes = std::fs::read(self.dir.join("fnmesh.log")).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// For each instance stopped so far (its log's "instance stopped" lines, which need the
    /// `info` level): milliseconds from SIGTERM to its exit, and whether it had to be killed.
    pub fn stops(&self) -> Vec<(f64, bool)> {
        let field = |line: &str, key: &str| -> Option<String> {
            let at = line.find(&format!("{key}="))? + key.len() + 1;
            Some(line[at..].split_whitespace().next()?.to_owned())
        };
        self.log()
            .lines()
            .filter(|l| l.contains("instance stopped"))
            .filter_map(|l| {
                let ms = field(l, "after_sigterm_ms")?.parse().ok()?;
                Some((ms, field(l, "killed")? == "true"))
            })
            .collect()
    }

    /// The policy file the sidecar was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("fnmesh.toml")
    }

    /// Rewrites the policy file with the same `[sidecar]` section and these `[[function]]`
    /// tables (then reload it with [`Sidecar::reload`] or SIGHUP).
    pub fn rewrite(&self, functions: &str) {
        std::fs::write(self.config_path(), format!("{}{functions}", self.head)).unwrap();
    }

    /// Runs `fnmesh reload -c FILE`: whether it succeeded, and what it printed.
    pub fn reload(&self) -> (bool, String) {
        let out = Command::new(fnmesh_bin())
            .args(["reload", "-c"])
            .arg(self.config_path())
            .output()
            .expect("fnmesh reload runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// POST to an admin path; returns whether it answered 200, and the body.
    pub fn admin_post(&self, path: &str) -> (bool, String) {
        let mut s = TcpStream::connect(self.admin).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (head.starts_with("HTTP/1.1 200"), body.to_owned())
    }

    /// GET an admin path; returns (status line, body).
    pub fn admin_get(&self, path: &str) -> (String, String) {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or("").to_owned(),
            body.to_owned(),
        )
    }

    /// The value of the sample `series` (a metric name with its labels, exactly as exposed, e.g.
    /// `fnmesh_cold_starts_total{function="echo"}`) in `/metrics`; 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// A number from `/admin/functions` for `function` (`ready`, `starting`, `processes`...).
    pub fn stat(&self, function: &str, field: &str) -> usize {
        let (_, body) = self.admin_get("/admin/functions");
        let at = body
            .find(&format!("\"name\":\"{function}\""))
            .unwrap_or_else(|| panic!("{function} not in {body}"));
        let rest = &body[at..];
        let key = format!("\"{field}\":");
        let v = &rest[rest.find(&key).unwrap() + key.len()..];
        v[..v.find(|c: char| !c.is_ascii_digit()).unwrap()]
            .parse()
            .unwrap()
    }

    /// The sidecar process's resident memory, in KiB.
    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.child.id())
    }

    /// User + system CPU time the sidecar process has used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.child.id())
    }

    /// Polls until `f` holds or `within` passes; returns whether it held.
    pub fn wait_for(&self, within: Duration, mut f: impl FnMut(&Sidecar) -> bool) -> bool {
        let until = Instant::now() + within;
        loop {
            if f(self) {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process ids of the sidecar's function instances: its children, less its watchdog.
    pub fn children(&self) -> Vec<u32> {
        self.all_children()
            .into_iter()
            .filter(|pid| !cmdline(*pid).contains("__watchdog"))
            .collect()
    }

    /// The sidecar's watchdog process, if running.
    pub fn watchdog(&self) -> Option<u32> {
        self.all_children()
            .into_iter()
            .find(|pid| cmdline(*pid).contains("__watchdog"))
    }

    fn all_children(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let tasks = format!("/proc/{}/task", self.child.id());
        for t in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
        out
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig}");
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Whether process `pid` still exists (and is not a zombie).
/// Whether `f` holds within `within` (checked every 10 ms).
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => false,
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(100).collect();
            eprintln!("--- the sidecar's log, last {} lines:", tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `[[function]]` table for the example echo function.
pub fn echo_function(name: &str, scale: &str, policy: &str) -> String {
    format!(
        "[[function]]\nname = \"{name}\"\nprotocol = \"thrift\"\nidl = \"{}\"\ncommand = [\"{}\"]\n\n[function.scale]\n{scale}\n\n[function.policy]\n{policy}\n\n",
        idl("thrift/echo.thrift").display(),
        echo_fn()
    )
}

/// `table` (one `[[function]]`) with `transport = "unix"`.
pub fn over_unix(table: &str) -> String {
    let at = table.find("command = ").expect("a function table");
    format!("{}transport = \"unix\"\n{}", &table[..at], &table[at..])
}

/// The sidecar's Unix-socket instances: each one's `FNMESH_SOCKET` and process id.
pub fn instance_sockets(sc: &Sidecar) -> Vec<(PathBuf, u32)> {
    let mut out = Vec::new();
    for pid in sc.children() {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if let Some(path) = env
            .split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(b"FNMESH_SOCKET="))
        {
            out.push((
                PathBuf::from(String::from_utf8_lossy(path).into_owned()),
                pid,
            ));
        }
    }
    out.sort();
    out
}

/// Asserts what `transport = "unix"` promises of `sockets` ([`instance_sockets`]): each is a
/// socket in a directory only the sidecar's user can enter, and the instance holds no listening
/// TCP socket (it serves on the Unix socket alone).
pub fn assert_unix_instances(sockets: &[(PathBuf, u32)]) {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let mut tcp_listeners = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && cols[3] == "0A" {
                tcp_listeners.push(format!("socket:[{}]", cols[9]));
            }
        }
    }
    for (path, pid) in sockets {
        let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(meta.file_type().is_socket(), "{}", path.display());
        let dir = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(
            dir.permissions().mode() & 0o777,
            0o700,
            "{}",
            path.display()
        );
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
        {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            let target = target.to_string_lossy();
            assert!(
                !tcp_listeners.iter().any(|l| *l == target),
                "instance {pid} listens on TCP"
            );
        }
    }
}

/// Waits (up to `within`) for the sidecar's Unix-socket directory to be gone after the sidecar
/// has (the watchdog removes it).
pub fn socket_dir_goes(dir: &Path, within: Duration) -> bool {
    wait_until(within, || !dir.exists())
}

/// The example gRPC function (`src/bin/grpc-echo-fn.rs`).
pub fn grpc_echo_fn() -> String {
    bin("grpc-echo-fn")
}

/// A `[[function]]` table for the example gRPC function (service `echo.Echo` from its proto).
pub fn grpc_echo_function(name: &str, scale: &str, policy: &str) -> String {
    format!(
        "[[function]]\nname = \"{name}\"\nprotocol = \"grpc\"\nidl = \"{}\"\ncommand = [\"{}\"]\n\n[function.scale]\n{scale}\n\n[function.policy]\n{policy}\n\n",
        idl("proto/echo.proto").display(),
        grpc_echo_fn()
    )
}

/// A process's resident memory, in KiB (0 when it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time a process has used so far (10 ms resolution).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and
    // 13th of them, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Runs `tests/python/{script}` with `args` and gives its output lines; panics with its stderr
/// when it fails. (`tests/run.sh` installs the PyPI packages the scripts import.)
pub fn python(script: &str, args: &[&str]) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn parent(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

/// The pid of the `comm` process serving instance `instance` of `sc`, started under a shell
/// (see [`under_shell`]): found by its environment and its ancestry (other tests run sidecars
/// with the same instance numbers).
pub fn instance_pid(sc: &Sidecar, comm: &str, instance: &str) -> u32 {
    let wanted = format!("FNMESH_INSTANCE={instance}");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if name.trim() == comm
            && env.split(|b| *b == 0).any(|kv| kv == wanted.as_bytes())
            && parent(parent(pid)) == sc.child.id()
        {
            return pid;
        }
    }
    panic!("no {comm} for instance {instance}");
}

/// Kills (SIGKILL) the `comm` process serving instance `instance` of `sc`, leaving its shell.
pub fn kill_instance(sc: &Sidecar, comm: &str, instance: &str) {
    let ok = Command::new("kill")
        .args(["-9", &instance_pid(sc, comm, instance).to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -9 {comm} of instance {instance}");
}

/// A sidecar with two warm instances of function `echo`, from `table(scale)` (a table built
/// with that `[function.scale]`). Each instance is `program` under a shell that outlives it, so
/// a killed `program` leaves its instance in balancing, refusing connections. `extra` is
/// appended to the file (per-method tables).
pub fn two_instances(program: &str, table: impl Fn(&str) -> String, extra: &str) -> Sidecar {
    let table = under_shell(
        program,
        &table("min = 2\nmax = 2"),
        &format!("{program}; sleep 60"),
    );
    let sc = Sidecar::start(&format!("{table}{extra}"));
    assert!(sc.wait_for(Duration::from_secs(5), |s| s.stat("echo", "ready") == 2));
    sc
}

/// A function table whose command `[program]` runs under a wrapper that, on SIGTERM, writes how
/// many TCP connections to the instance's port are established to `dir/at-term-N` (N: the
/// instance), then waits for the program to exit.
pub fn counting_connections_at_sigterm(program: &str, table: &str, dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let script = dir.join("wrap.sh");
    let at = dir.display();
    std::fs::write(
        &script,
        format!(
            "\"$@\" &\nchild=$!\ntrap 'ss -Htn state established \"( sport = :$PORT )\" | wc -l > {at}/at-term-$FNMESH_INSTANCE; wait $child; exit 0' TERM\nwait $child\n"
        ),
    )
    .unwrap();
    table.replace(
        &format!("command = [\"{program}\"]"),
        &format!(
            "command = [\"/bin/sh\", \"{}\", \"{program}\"]",
            script.display()
        ),
    )
}

/// Waits (up to `within`) for `n` instances of `sc` to stop, and asserts that each stopped
/// gracefully: no SIGKILL, an exit soon after SIGTERM, and no connection of fnmesh's open to it
/// when its SIGTERM came (as [`counting_connections_at_sigterm`] counted them in `dir`).
pub fn assert_graceful_stops(sc: &Sidecar, n: usize, within: Duration, dir: &Path) {
    assert!(
        sc.wait_for(within, |sc| sc.stops().len() == n),
        "{:?}",
        sc.stops()
    );
    // About 30 ms each on an idle machine; the bound leaves room for a loaded one (the
    // wrapper's `ss` runs first) and still tells a graceful exit from Volo's 2 s wait.
    for (ms, killed) in sc.stops() {
        assert!(!killed && ms < 500.0, "{:?}", sc.stops());
    }
    assert_eq!(connections_at_sigterm(dir), vec!["0"; n]);
}

/// What [`counting_connections_at_sigterm`] wrote: established connections at each SIGTERM.
pub fn connections_at_sigterm(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("at-term-"))
                .map(|e| {
                    std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A function table whose command `[program]` becomes `script` under /bin/sh.
pub fn under_shell(program: &str, table: &str, script: &str) -> String {
    table.replace(
        &format!("command = [\"{program}\"]"),
        &format!("command = [\"/bin/sh\", \"-c\", \"{script}\"]"),
    )
}
