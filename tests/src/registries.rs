//! Real etcd and Consul servers for the discovery tests: started on free loopback ports (etcd
//! from Debian's `etcd-server`, Consul 1.8.7 unpacked by `tests/run.sh` under
//! `target/tools/consul`), stopped and restarted by the test, killed when dropped.

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::sidecar::free_port;

/// Kills (SIGKILL) and reaps a server process, if it runs.
fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits until `addr` accepts connections.
fn wait_listening(addr: &str, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A one-member etcd cluster with its data in a scratch directory (kept across restarts).
pub struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client: u16,
    peer: u16,
    /// Flags beyond the defaults (`--auth-token-ttl`).
    extra: Vec<String>,
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_on(free_port())
    }

    /// A server whose clients connect to port `client`.
    pub fn start_on(client: u16) -> Etcd {
        Etcd::start_with(client, Vec::new())
    }

    fn start_with(client: u16, extra: Vec<String>) -> Etcd {
        let dir = std::env::temp_dir().join(format!(
            "fnmesh-etcd-{}-{}",
            std::process::id(),
            free_port()
        ));
        let mut e = Etcd {
            child: None,
            dir,
            client,
            peer: free_port(),
            extra,
        };
        e.run();
        e
    }

    /// A server with auth on: user `root` (role root) with `password`, whose tokens expire
    /// after `token_ttl` seconds.
    pub fn start_with_auth(password: &str, token_ttl: u32) -> Etcd {
        let ttl = vec!["--auth-token-ttl".into(), token_ttl.to_string()];
        let e = Etcd::start_with(free_port(), ttl);
        for (call, body) in [
            ("auth/role/add", serde_json::json!({ "name": "root" })),
            (
                "auth/user/add",
                serde_json::json!({ "name": "root", "password": password }),
            ),
            (
                "auth/user/grant",
                serde_json::json!({ "user": "root", "role": "root" }),
            ),
            ("auth/enable", serde_json::json!({})),
        ] {
            // The server may listen a moment before it serves.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (status, answer) = e.post(call, &body.to_string());
                if status.contains(" 200 ") {
                    break;
                }
                assert!(Instant::now() < deadline, "{call}: {status} {answer}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        e
    }

    /// POST `/v3/{call}` of the JSON gateway: (status line, body).
    pub fn post(&self, call: &str, body: &str) -> (String, String) {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client)) else {
            return (String::new(), String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            s,
            "POST /v3/{call} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or("").to_owned(),
            body.to_owned(),
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    fn run(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let mut child = Command::new("etcd")
            .args(["--name", "fnmesh-test", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &self.url()])
            .args(["--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("fnmesh-test={peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs (Debian etcd-server; tests/run.sh installs it)");
        wait_listening(&format!("127.0.0.1:{}", self.client), "etcd", &mut child);
        self.child = Some(child);
    }

    /// Stops the server (SIGKILL): its data stays.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Consul's binary: `FNMESH_CONSUL`, else the one `tests/run.sh` unpacked, else `consul` on PATH.
pub fn consul_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FNMESH_CONSUL") {
        return p.into();
    }
    let unpacked =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/consul/usr/bin/consul");
    if unpacked.exists() {
        return unpacked;
    }
    "consul".into()
}

/// A Consul agent in dev mode (a one-node server that keeps everything in memory: a restart
/// forgets every service).
pub struct Consul {
    child: Option<Child>,
    http: u16,
    ports: [u16; 3],
    /// With ACLs enforced (default policy deny): the management token, which the test's own
    /// requests carry.
    acl: Option<String>,
}

impl Consul {
    pub fn start() -> Consul {
        Consul::start_on(free_port())
    }

    /// An agent whose HTTP API listens on `http`.
    pub fn start_on(http: u16) -> Consul {
        let mut c = Consul {
            child: None,
            http,
            ports: [free_port(), free_port(), free_port()],
            acl: None,
        };
        c.run();
        c
    }

    /// An agent that enforces ACLs (`acl.default_policy = "deny"`), with `token` as its
    /// management token.
    pub fn start_with_acl(token: &str) -> Consul {
        let mut c = Consul {
            child: None,
            http: free_port(),
            ports: [free_port(), free_port(), free_port()],
            acl: Some(token.to_owned()),
        };
        c.run();
        c
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    fn run(&mut self) {
        let [serf_lan, serf_wan, server] = self.ports;
        let mut child = Command::new(consul_bin())
            .args([
                "agent",
                "-dev",
                "-bind",
                "127.0.0.1",
                "-client",
                "127.0.0.1",
            ])
            .args(["-http-port", &self.http.to_string()])
            .args(["-dns-port", "-1", "-grpc-port", "-1"])
            .args(["-serf-lan-port", &serf_lan.to_string()])
            .args(["-serf-wan-port", &serf_wan.to_string()])
            .args(["-server-port", &server.to_string()])
            .args(["-log-level", "err"])
            .args(self.acl.iter().flat_map(|t| {
                let hcl = format!(
                    "acl {{ enabled = true default_policy = \"deny\" tokens {{ master = \"{t}\" agent = \"{t}\" }} }}"
                );
                ["-hcl".to_owned(), hcl]
            }))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("consul runs (tests/run.sh unpacks Consul 1.8.7 under target/tools)");
        wait_listening(&format!("127.0.0.1:{}", self.http), "consul", &mut child);
        self.child = Some(child);
        // The agent answers registrations once it has elected itself leader.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.get("/v1/status/leader").1.contains(':') {
            assert!(Instant::now() < deadline, "consul elected no leader");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET a path of the HTTP API: (status line, body).
    pub fn get(&self, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.http)) else {
            return (String::new(), String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let token = self
            .acl
            .as_ref()
            .map(|t| format!("x-consul-token: {t}\r\n"))
            .unwrap_or_default();
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{token}connection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        (head.lines().next().unwrap_or("").to_owned(), body)
    }

    /// The passing instances of `service`, as Consul's health endpoint lists them.
    pub fn passing(&self, service: &str) -> Vec<serde_json::Value> {
        let (_, body) = self.get(&format!("/v1/health/service/{service}?passing=true"));
        serde_json::from_str(&body).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the agent again on the same ports: it remembers nothing.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

impl Drop for Consul {
    fn drop(&mut self) {
        self.stop();
    }
}
