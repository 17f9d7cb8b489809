//! A NATS server with JetStream (Debian `nats-server`, which tests/run.sh installs) on a free
//! port of 127.0.0.1, its store in a scratch directory kept across restarts.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use crate::{
    registries::{kill, wait_listening},
    sidecar::free_port,
};

pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Nats {
    pub fn start() -> Nats {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("fnmesh-nats-{}-{port}", std::process::id()));
        let mut n = Nats {
            child: None,
            port,
            dir,
        };
        n.run();
        n
    }

    fn run(&mut self) {
        let mut child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs (Debian nats-server; tests/run.sh installs it)");
        wait_listening(
            &format!("127.0.0.1:{}", self.port),
            "nats-server",
            &mut child,
        );
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `[async]` for a sidecar using this server, with `extra` keys.
    pub fn async_table(&self, extra: &str) -> String {
        format!("[async]\nnats = \"{}\"\n{extra}\n", self.url())
    }

    /// A JetStream client of this server.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.url())
            .await
            .expect("connects to nats-server");
        async_nats::jetstream::new(client)
    }

    /// Stops the server (SIGKILL); its store stays.
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
