//! A bare HTTP/2 gRPC caller (hyper), for what generated clients cannot send: arbitrary paths.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Sends a unary gRPC call with an empty message to `path`; gives `grpc-status` and
/// `grpc-message` from the response headers (trailers-only) or trailers.
pub async fn raw_unary(addr: SocketAddr, path: &str, within: Duration) -> (String, String) {
    let call = async {
        let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(sock))
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        let req = http::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let resp = send.send_request(req).await.expect("response");
        let get = |h: &http::HeaderMap, k: &str| {
            h.get(k).map(|v| v.to_str().unwrap_or_default().to_owned())
        };
        if let Some(status) = get(resp.headers(), "grpc-status") {
            return (
                status,
                get(resp.headers(), "grpc-message").unwrap_or_default(),
            );
        }
        let body = resp.into_body().collect().await.expect("body");
        let trailers = body.trailers().cloned().unwrap_or_default();
        (
            get(&trailers, "grpc-status").unwrap_or_default(),
            get(&trailers, "grpc-message").unwrap_or_default(),
        )
    };
    tokio::time::timeout(within, call)
        .await
        .expect("raw gRPC call in time")
}

/// One HTTP/2 connection to `addr`, for many concurrent streams.
pub async fn connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(sock))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    send
}

/// An `echo.EchoRequest { message }` in a gRPC message frame (encoded by hand).
pub fn echo_request(message: &str) -> Bytes {
    let mut msg = vec![0x0a];
    let mut n = message.len();
    while n >= 0x80 {
        msg.push((n as u8) | 0x80);
        n >>= 7;
    }
    msg.push(n as u8);
    msg.extend_from_slice(message.as_bytes());
    let mut frame = vec![0];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    frame.into()
}

/// `/echo.Echo/UnaryEcho` on an open connection; gives the reply's message bytes (after the
/// gRPC frame header) and grpc-status.
pub async fn echo_on(
    send: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    message: &str,
) -> (Bytes, String) {
    send.ready().await.expect("connection ready");
    let req = http::Request::post("http://fnmesh/echo.Echo/UnaryEcho")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(echo_request(message)))
        .unwrap();
    let resp = send.send_request(req).await.expect("response");
    let get =
        |h: &http::HeaderMap, k: &str| h.get(k).map(|v| v.to_str().unwrap_or_default().to_owned());
    if let Some(status) = get(resp.headers(), "grpc-status") {
        return (Bytes::new(), status);
    }
    let body = resp.into_body().collect().await.expect("body");
    let status = body
        .trailers()
        .and_then(|t| get(t, "grpc-status"))
        .unwrap_or_default();
    let data = body.to_bytes();
    (data.slice(5.min(data.len())..), status)
}
