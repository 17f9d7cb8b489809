//! One unary gRPC call over HTTP/2 (hyper's client), for the callers fnmesh makes itself: `fnmesh
//! call`, and the HTTP gateway calling a gRPC function through the sidecar's own listener. Each
//! worker thread keeps one connection per address and multiplexes its calls on it.

use std::{cell::RefCell, net::SocketAddr, time::Duration};

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;

thread_local! {
    /// This thread's HTTP/2 connections, by address (workers run one runtime per thread, so a
    /// connection's task and its callers stay on the thread that made it).
    static CHANNELS: RefCell<Vec<(SocketAddr, SendRequest<Full<Bytes>>)>> =
        const { RefCell::new(Vec::new()) };
}

/// A new HTTP/2 connection to `addr`, kept for the calls after this one.
async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let sock = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = sock.set_nodelay(true);
    let io = hyper_util::rt::TokioIo::new(sock);
    let (sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    CHANNELS.with(|c| {
        let mut c = c.borrow_mut();
        c.retain(|(a, s)| *a != addr && !s.is_closed());
        c.push((addr, sender.clone()));
    });
    Ok(sender)
}

/// This thread's open connection to `addr`, if it has one.
fn kept(addr: SocketAddr) -> Option<SendRequest<Full<Bytes>>> {
    CHANNELS.with(|c| {
        c.borrow()
            .iter()
            .find(|(a, s)| *a == addr && !s.is_closed())
            .map(|(_, s)| s.clone())
    })
}

/// How a unary call ended.
pub struct Unary {
    /// `grpc-status` (2, UNKNOWN, when the answer has none).
    pub status: u32,
    /// `grpc-message`.
    pub message: String,
    /// The response message (without its 5-byte gRPC prefix).
    pub body: Bytes,
    /// `fnmesh-error`, when fnmesh answered.
    pub fnmesh_error: Option<String>,
}

/// One unary call of `path` (`/package.Service/Method`) with `message` (an encoded protobuf
/// message) to `addr`, with `timeout` as its `grpc-timeout` and `meta` as metadata.
pub async fn unary(
    addr: SocketAddr,
    path: &str,
    message: Vec<u8>,
    timeout: Option<Duration>,
    meta: &[(&'static str, String)],
) -> Result<Unary, String> {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = timeout {
        let ms = t.as_millis().clamp(1, 99_999_999);
        request = request.header("grpc-timeout", format!("{ms}m"));
    }
    for (k, v) in meta {
        request = request.header(*k, v.as_str());
    }
    let request = request
        .body(Full::new(Bytes::from(framed)))
        .map_err(|e| e.to_string())?;
    // A kept connection the server has just closed (idle, or draining) hands the request back
    // unsent: it goes again on a new connection.
    let response = match kept(addr) {
        Some(mut sender) => match sender.try_send_request(request).await {
            Ok(r) => r,
            Err(mut e) => match e.take_message() {
                Some(request) => connect(addr)
                    .await?
                    .send_request(request)
                    .await
                    .map_err(|e| e.to_string())?,
                None => return Err(e.into_error().to_string()),
            },
        },
        None => connect(addr)
            .await?
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?,
    };
    let (head, body) = response.into_parts();
    let collected = body.collect().await.map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |name: &str| {
        trailers
            .get(name)
            .or_else(|| head.headers.get(name))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = get("grpc-status").and_then(|s| s.parse().ok()).unwrap_or(2);
    let text = get("grpc-message").unwrap_or_default();
    let fnmesh_error = get("fnmesh-error");
    let mut data = collected.to_bytes();
    let body = match data.len() >= 5 {
        true => {
            data.advance(1);
            let len = data.get_u32() as usize;
            data.slice(..len.min(data.len()))
        }
        false => Bytes::new(),
    };
    Ok(Unary {
        status,
        message: text,
        body,
        fnmesh_error,
    })
}
