//! The admin listener: `/healthz`, `/readyz` and `/admin/functions` (JSON), and
//! `POST /admin/reload` (what `fnmesh reload` sends), over plain HTTP/1.1. It answers one small
//! request per connection; nothing here is on the RPC path.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::{timeout, Duration},
};

use crate::mesh::Mesh;

pub struct Admin {
    pub mesh: Arc<Mesh>,
    pub draining: AtomicBool,
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    while let Ok((sock, _)) = listener.accept().await {
        let admin = admin.clone();
        tokio::spawn(async move {
            let _ = timeout(Duration::from_secs(5), answer(sock, &admin)).await;
        });
    }
}

async fn answer(mut sock: TcpStream, admin: &Admin) -> std::io::Result<()> {
    let mut req = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 || req.len() > 8 * 1024 {
            return Ok(());
        }
        req.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&req);
    let mut words = line.split_whitespace();
    let verb = words.next().unwrap_or("GET");
    let path = words.next().unwrap_or("/");
    let draining = admin.draining.load(Ordering::SeqCst);
    let (status, body) = match (verb, path) {
        ("POST", "/admin/reload") => match crate::server::reload(&admin.mesh, "POST /admin/reload")
        {
            Ok(changes) => ("200 OK", format!("reloaded: {changes}\n")),
            Err(e) => (
                "422 Unprocessable Entity",
                format!("reload refused, the old policy stays: {e}\n"),
            ),
        },
        (_, "/admin/reload") => (
            "405 Method Not Allowed",
            "POST to reload the policy file\n".to_owned(),
        ),
        (_, path) => get(path, draining, admin),
    };
    let head =
        format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: {}\r\nconnection: close\r\n\r\n",
        body.len(),
        if body.starts_with('{') { "application/json" } else { "text/plain" }
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

fn get(path: &str, draining: bool, admin: &Admin) -> (&'static str, String) {
    match path {
        "/healthz" => ("200 OK", "ok\n".to_owned()),
        "/readyz" if draining => ("503 Service Unavailable", "draining\n".to_owned()),
        "/readyz" => (
            "200 OK",
            match admin.mesh.registry_health() {
                // A registry outage is reported, but the sidecar serves: still ready.
                Some((name, health)) => format!("ready\nregistry {name}: {health}\n"),
                None => "ready\n".to_owned(),
            },
        ),
        "/admin/functions" => ("200 OK", functions_json(admin)),
        _ => ("404 Not Found", "not found\n".to_owned()),
    }
}

fn functions_json(admin: &Admin) -> String {
    // Function names are restricted to [A-Za-z0-9._-] by the config, so they need no escaping.
    let items: Vec<String> = admin
        .mesh
        .functions()
        .iter()
        .map(|p| {
            let s = p.pool.snapshot();
            // Method names are IDL identifiers: no escaping needed either.
            let policy = p.policy();
            let breakers: Vec<String> = policy
                .breakers
                .states()
                .iter()
                .map(|(m, st)| {
                    let st = match st {
                        crate::governance::breaker::State::Closed => "closed",
                        crate::governance::breaker::State::Open => "open",
                        crate::governance::breaker::State::HalfOpen => "half-open",
                    };
                    format!("\"{m}\":\"{st}\"")
                })
                .collect();
            format!(
                "{{\"name\":\"{}\",\"ready\":{},\"starting\":{},\"queued\":{},\"in_flight\":{},\"processes\":{},\"breakers\":{{{}}}}}",
                p.name,
                s.ready,
                s.starting,
                s.queued,
                s.in_flight,
                p.pool.live_processes(),
                breakers.join(",")
            )
        })
        .collect();
    format!("{{\"functions\":[{}]}}\n", items.join(","))
}
