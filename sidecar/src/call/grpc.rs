//! `fnmesh call` for a gRPC function: the request built from the `.proto` (proto3 JSON), one
//! unary call over HTTP/2 (hyper's client), the response printed as JSON.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use bytes::{Buf, Bytes};
use fnmesh_idl::proto_json::{decode_response, encode_request, ProtoSchema};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::fail;

/// gRPC status codes by the fnmesh error kind they stand for (docs/design.md's table), for the
/// exit status; other statuses are the function's own.
fn kind_of(status: u32, fnmesh_error: Option<&str>) -> &str {
    match fnmesh_error {
        Some(kind) => kind,
        None if status == 4 => "timeout",
        None if status == 12 => "no-route",
        None if status == 14 => "unavailable",
        None => "application-exception",
    }
}

pub(super) fn call(
    addr: SocketAddr,
    proto: &ProtoSchema,
    service: &str,
    method: &str,
    timeout: Duration,
    args: &Value,
) -> ExitCode {
    let Some(m) = proto.method(service, method) else {
        return fail("no-route", format!("{service} has no method {method}"));
    };
    if m.is_client_streaming() || m.is_server_streaming() {
        return fail(
            "bad-request",
            format!("{service}/{method} streams: only unary calls"),
        );
    }
    let message = match encode_request(&m, args) {
        Ok(m) => m,
        Err(e) => return fail("bad-request", e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail("unavailable", e),
    };
    let path = format!("/{service}/{method}");
    let sent = runtime.block_on(async {
        let within = timeout + Duration::from_secs(1);
        tokio::time::timeout(within, unary(addr, &path, message, timeout)).await
    });
    let (status, text, body, error) = match sent {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return fail("unavailable", format!("{addr}: {e}")),
        Err(_) => return fail("timeout", format!("{addr}: no answer within {timeout:?}")),
    };
    if status != 0 {
        let kind = kind_of(status, error.as_deref());
        return fail(kind, format!("grpc-status {status}: {text}"));
    }
    match decode_response(&m, &body) {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => fail("unavailable", e),
    }
}

type Answer = (u32, String, Bytes, Option<String>);

/// One unary gRPC call: the `grpc-status`, `grpc-message`, the response message and
/// `fnmesh-error` (when fnmesh answered).
async fn unary(
    addr: SocketAddr,
    path: &str,
    message: Vec<u8>,
    timeout: Duration,
) -> Result<Answer, String> {
    let sock = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let io = hyper_util::rt::TokioIo::new(sock);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(
            "grpc-timeout",
            format!("{}m", timeout.as_millis().clamp(1, 99_999_999)),
        )
        .body(Full::new(Bytes::from(framed)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
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
    let error = get("fnmesh-error");
    let mut data = collected.to_bytes();
    let message = match data.len() >= 5 {
        true => {
            data.advance(1);
            let len = data.get_u32() as usize;
            data.slice(..len.min(data.len()))
        }
        false => Bytes::new(),
    };
    Ok((status, text, message, error))
}
