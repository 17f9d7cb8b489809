//! A real Prometheus server (Debian's `prometheus`, installed by `tests/run.sh`) for the metrics
//! tests: it scrapes one target every 500 ms and answers PromQL over its HTTP API; its data lives
//! in a scratch directory, removed (and the server killed) when dropped.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::sidecar::free_port;

pub struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts a server scraping `target`'s `/metrics`, and waits until it answers queries.
    pub fn scraping(target: SocketAddr) -> Prometheus {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("fnmesh-prom-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\nscrape_configs:\n  - job_name: fnmesh\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus runs (Debian's prometheus; tests/run.sh installs it)");
        let p = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !p.get("/-/ready").0.contains(" 200 ") {
            assert!(Instant::now() < deadline, "prometheus did not get ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    /// GET `path`: (status line, body).
    pub fn get(&self, path: &str) -> (String, String) {
        crate::registries::http_get(self.port, path, "")
    }

    /// The scalar value of the instant PromQL `query` (an expression with one result), if it has
    /// one yet.
    pub fn query(&self, query: &str) -> Option<f64> {
        let v = self.answer(query)?;
        let value = v["data"]["result"].get(0)?["value"]
            .get(1)?
            .as_str()?
            .parse()
            .ok();
        value
    }

    /// The API's whole answer to the instant PromQL `query` (`status`, `data` or `error`).
    pub fn answer(&self, query: &str) -> Option<serde_json::Value> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (_, body) = self.get(&format!("/api/v1/query?query={encoded}"));
        serde_json::from_str(&body).ok()
    }

    /// The server's log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
