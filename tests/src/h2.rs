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
