//! Real etcd and Consul servers for the discovery tests: started on free loopback ports (etcd
//! from Debian's `etcd-server`, Consul 1.8.7 unpacked by `tests/run.sh` under
//! `target/tools/consul`), stopped and restarted by the test, killed when dropped; and the
//! certificates of a test CA for their TLS (made with the `openssl` command).

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::sidecar::free_port;

/// A throw-away CA and what it signed: a server certificate for 127.0.0.1 and localhost, and a
/// client certificate; PEM files in a scratch directory, removed when dropped.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir =
            std::env::temp_dir().join(format!("fnmesh-pki-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl runs (tests/run.sh installs it)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
                &["-subj", "/CN=fnmesh test CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        );
        std::fs::write(
            dir.join("leaf.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        for who in ["server", "client"] {
            let (key, csr, pem) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.pem"),
            );
            let subject = format!("/CN={who}");
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &["-keyout", &key, "-out", &csr, "-subj", &subject],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                "leaf.cnf",
            ]);
        }
        Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            dir,
        }
    }

    /// The `[discovery]` keys that trust this CA and present the client certificate.
    pub fn client_keys(&self) -> String {
        format!(
            "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            self.ca.display(),
            self.client_cert.display(),
            self.client_key.display()
        )
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills (SIGKILL) and reaps a server process, if it runs.
pub(crate) fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits until `addr` accepts connections.
pub(crate) fn wait_listening(addr: &str, what: &str, child: &mut Child) {
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
    /// With TLS: the port of its `https` client URL (clients must present a certificate of the
    /// CA), besides the plain one the test reads through.
    https: Option<u16>,
    /// Another address its clients may reach it on (a test network's host side).
    also: Option<std::net::IpAddr>,
}

impl Etcd {
    /// A server reachable on `ip` too (as `http://IP:PORT`, [`Etcd::url_on`]).
    pub fn start_reachable_on(ip: std::net::IpAddr) -> Etcd {
        Etcd::start_full(free_port(), Vec::new(), None, Some(ip))
    }

    /// `http://IP:PORT` for another address it serves on.
    pub fn url_on(&self, ip: std::net::IpAddr) -> String {
        format!("http://{ip}:{}", self.client)
    }

    pub fn start() -> Etcd {
        Etcd::start_on(free_port())
    }

    /// A server whose clients connect to port `client`.
    pub fn start_on(client: u16) -> Etcd {
        Etcd::start_with(client, Vec::new())
    }

    fn start_with(client: u16, extra: Vec<String>) -> Etcd {
        Etcd::start_full(client, extra, None, None)
    }

    /// A server on `client` (and on `https` over TLS, and on `also`'s address), with `extra`
    /// flags.
    fn start_full(
        client: u16,
        extra: Vec<String>,
        https: Option<u16>,
        also: Option<std::net::IpAddr>,
    ) -> Etcd {
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
            https,
            also,
        };
        e.run();
        e
    }

    /// A server that also serves clients over TLS with client certificates of `pki`'s CA
    /// (`--client-cert-auth`) at [`Etcd::https_url`].
    pub fn start_with_tls(pki: &Pki) -> Etcd {
        let https = free_port();
        let flags = [
            ("--cert-file", &pki.server_cert),
            ("--key-file", &pki.server_key),
            ("--trusted-ca-file", &pki.ca),
        ];
        let mut extra: Vec<String> = flags
            .iter()
            .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
            .collect();
        extra.push("--client-cert-auth".into());
        Etcd::start_full(free_port(), extra, Some(https), None)
    }

    /// `https://127.0.0.1:PORT`, with TLS.
    pub fn https_url(&self) -> String {
        format!(
            "https://127.0.0.1:{}",
            self.https.expect("an etcd with TLS")
        )
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
        let json = "content-type: application/json\r\n";
        http_request(self.client, "POST", &format!("/v3/{call}"), json, body)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    fn run(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let mut clients = match self.https {
            Some(_) => format!("{},{}", self.url(), self.https_url()),
            None => self.url(),
        };
        if let Some(ip) = self.also {
            clients = format!("{clients},{}", self.url_on(ip));
        }
        let mut child = Command::new("etcd")
            .args(["--name", "fnmesh-test", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen-client-urls", &clients])
            .args(["--advertise-client-urls", &clients])
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
    /// With HTTPS: its port and the agent's TLS settings (HCL); clients must present a
    /// certificate of the CA.
    https: Option<(u16, String)>,
    /// Another address its HTTP API listens on (a test network's host side).
    also: Option<std::net::IpAddr>,
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
            https: None,
            also: None,
        };
        c.run();
        c
    }

    /// An agent whose HTTP API listens on `ip` too ([`Consul::url_on`]).
    pub fn start_reachable_on(ip: std::net::IpAddr) -> Consul {
        let mut c = Consul {
            child: None,
            http: free_port(),
            ports: [free_port(), free_port(), free_port()],
            acl: None,
            https: None,
            also: Some(ip),
        };
        c.run();
        c
    }

    /// `http://IP:PORT` for another address its API listens on.
    pub fn url_on(&self, ip: std::net::IpAddr) -> String {
        format!("http://{ip}:{}", self.http)
    }

    /// An agent whose API is served over HTTPS too ([`Consul::https_url`]), with `pki`'s server
    /// certificate, to clients with a certificate of its CA (`verify_incoming_https`).
    pub fn start_with_tls(pki: &Pki) -> Consul {
        let port = free_port();
        let hcl = format!(
            "ports {{ https = {port} }} ca_file = \"{}\" cert_file = \"{}\" key_file = \"{}\" verify_incoming_https = true",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        );
        let mut c = Consul {
            child: None,
            http: free_port(),
            ports: [free_port(), free_port(), free_port()],
            acl: None,
            https: Some((port, hcl)),
            also: None,
        };
        c.run();
        c
    }

    /// `https://127.0.0.1:PORT`.
    pub fn https_url(&self) -> String {
        format!(
            "https://127.0.0.1:{}",
            self.https.as_ref().expect("an agent with HTTPS").0
        )
    }

    /// An agent that enforces ACLs (`acl.default_policy = "deny"`), with `token` as its
    /// management token.
    pub fn start_with_acl(token: &str) -> Consul {
        let mut c = Consul {
            child: None,
            http: free_port(),
            ports: [free_port(), free_port(), free_port()],
            acl: Some(token.to_owned()),
            https: None,
            also: None,
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
        let clients = match self.also {
            Some(ip) => format!("127.0.0.1 {ip}"),
            None => "127.0.0.1".to_owned(),
        };
        let mut child = Command::new(consul_bin())
            .args(["agent", "-dev", "-bind", "127.0.0.1", "-client", &clients])
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
            .args(
                self.https
                    .iter()
                    .flat_map(|(_, hcl)| ["-hcl".to_owned(), hcl.clone()]),
            )
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
        let token = self
            .acl
            .as_ref()
            .map(|t| format!("x-consul-token: {t}\r\n"))
            .unwrap_or_default();
        http_get(self.http, path, &token)
    }

    /// Registers `name` at 127.0.0.1:`port` as a plain service would (an ID, a name, an
    /// address, no tags and no check): it is passing for as long as it stays registered.
    pub fn register_plain(&self, name: &str, port: u16) {
        self.register_plain_at(name, ([127, 0, 0, 1], port).into());
    }

    /// As [`Consul::register_plain`], at `addr`.
    pub fn register_plain_at(&self, name: &str, addr: std::net::SocketAddr) {
        let (ip, port) = (addr.ip(), addr.port());
        let body = format!(
            r#"{{"ID": "{name}-{port}", "Name": "{name}", "Address": "{ip}", "Port": {port}}}"#
        );
        let (status, text) =
            http_request(self.http, "PUT", "/v1/agent/service/register", "", &body);
        assert!(status.contains(" 200"), "{status}: {text}");
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

/// One HTTP/1.1 GET to 127.0.0.1:`port` (`headers`: more header lines, each ending in CRLF):
/// the status line and the body (put together when chunked); empty when nothing answers.
pub fn http_get(port: u16, path: &str, headers: &str) -> (String, String) {
    http_request(port, "GET", path, headers, "")
}

/// The `content-length` of an HTTP/1.1 head (0 when absent).
pub fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

/// As [`http_get`], with any method and a body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (String, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (String::new(), String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = match chunked {
        true => dechunk(body),
        false => body.to_owned(),
    };
    (head.lines().next().unwrap_or("").to_owned(), body)
}

/// A chunked HTTP/1.1 body, put together.
pub(crate) fn dechunk(body: &str) -> String {
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
