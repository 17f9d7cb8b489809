//! The HTTP/JSON gateway against the binary path, in one run: the example function called with
//! a 1 KB message directly by a Volo client, through fnmesh by the same Volo client (TTHeader),
//! and through fnmesh's gateway by an HTTP/1.1 keep-alive client posting JSON. Issue 21's target:
//! the gateway adds at most 10 us at p50 over the binary path.
//!
//! Run: `cargo run --release -p fnmesh-tests --bin bench-gateway`. It prints figures; it asserts
//! nothing.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, sync::OnceLock};

use fnmesh_tests::{
    bench::{print_machine, sequential, start_function, throughput, Caller, Path},
    gen::volo_gen::echo::{EchoRequest, EchoServiceClient, EchoServiceClientBuilder},
    sidecar::{echo_fn, echo_function, Sidecar},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Mutex,
};

/// The addresses called over HTTP (the others with Volo).
static HTTP: OnceLock<Vec<SocketAddr>> = OnceLock::new();

fn message() -> String {
    "x".repeat(1000)
}

enum Client {
    Volo(EchoServiceClient),
    Http(Mutex<(tokio::net::TcpStream, Vec<u8>)>, Vec<u8>),
}

impl Caller for Client {
    fn connect(addr: SocketAddr) -> Self {
        if HTTP.get().is_some_and(|h| h.contains(&addr)) {
            let sock = std::net::TcpStream::connect(addr).unwrap();
            sock.set_nodelay(true).unwrap();
            sock.set_nonblocking(true).unwrap();
            let body = format!(r#"{{"message": "{}"}}"#, message());
            let request = format!(
                "POST /echo/Echo HTTP/1.1\r\nhost: fnmesh\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let sock = tokio::net::TcpStream::from_std(sock).unwrap();
            return Client::Http(Mutex::new((sock, Vec::new())), request.into_bytes());
        }
        Client::Volo(EchoServiceClientBuilder::new("echo").address(addr).build())
    }

    async fn call(&self) {
        match self {
            Client::Volo(c) => {
                let req = EchoRequest {
                    message: message().into(),
                    sleep_ms: None,
                    meta: None,
                };
                c.echo(req).await.expect("call");
            }
            Client::Http(conn, request) => {
                let mut guard = conn.lock().await;
                let (sock, buf) = &mut *guard;
                sock.write_all(request).await.unwrap();
                read_response(sock, buf).await;
            }
        }
    }
}

/// Reads one response (headers, then content-length bytes of body); panics unless 200.
async fn read_response(sock: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).unwrap();
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let len = fnmesh_tests::registries::content_length(head);
            let total = end + 4 + len;
            while buf.len() < total {
                read_more(sock, buf).await;
            }
            buf.drain(..total);
            return;
        }
        read_more(sock, buf).await;
    }
}

async fn read_more(sock: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    let n = sock.read(&mut chunk).await.unwrap();
    assert!(n > 0, "the gateway closed the connection");
    buf.extend_from_slice(&chunk[..n]);
}

#[tokio::main]
async fn main() {
    print_machine();
    let (_direct, direct) = start_function(&echo_fn());
    let warm = echo_function(
        "echo",
        "min = 1\nmax = 1\nconcurrency = 1024\nidle = \"10m\"",
        "",
    );
    let sc = Sidecar::start(&warm);
    let gateway = Sidecar::start(&warm);
    HTTP.set(vec![gateway.addr]).unwrap();
    let mut paths = vec![
        Path::new("direct (Volo, 1 KB)", direct, None),
        Path::new(
            "fnmesh, binary (Volo, TTHeader)",
            sc.addr,
            Some(sc.child.id()),
        ),
        Path::new(
            "fnmesh, gateway (HTTP/1.1 + JSON)",
            gateway.addr,
            Some(gateway.child.id()),
        ),
    ];
    sequential::<Client>(&mut paths, "calls on one connection").await;
    throughput::<Client>(&mut paths, "concurrent callers", false).await;
}
