//! `fnmesh call` for a gRPC function: the request built from the `.proto` (proto3 JSON), one
//! unary call over HTTP/2 (hyper's client), the response printed as JSON.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use fnmesh_idl::proto_json::{decode_response, encode_request, ProtoSchema};
use serde_json::Value;

use super::fail;
use crate::unary::{unary, Unary};

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
        tokio::time::timeout(within, unary(addr, &path, message, Some(timeout), &[])).await
    });
    let Unary {
        status,
        message: text,
        body,
        fnmesh_error: error,
    } = match sent {
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
