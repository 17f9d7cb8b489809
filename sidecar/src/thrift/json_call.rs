//! A call made from JSON: the HTTP gateway's, an async call's, a queue message's. A Thrift
//! function's call is built from its IDL as a TTHeader frame and takes exactly the path a
//! binary call takes (routing, admission, scale from zero, deadlines, retries, breakers, rate
//! limits); a gRPC function's goes through the sidecar's own listener, as a gRPC caller's
//! does. The reply comes back as JSON with the HTTP status the gateway answers.

use std::{sync::Arc, time::Duration};

use bytes::{Buf, BytesMut};
use fnmesh_codec::{FrameDecoder, MessageType};
use fnmesh_idl::{
    schema::Schema,
    thrift_json::{self, Reply as JsonReply},
};
use http::StatusCode;
use serde_json::{json, Value};

use super::{
    forward::{call, Outgoing},
    route::route,
    ThriftFront,
};
use crate::error::{CallError, Kind};

/// A gRPC function the gateway can call: its descriptors and IDL service.
pub struct GrpcTarget {
    pub proto: Arc<fnmesh_idl::proto_json::ProtoSchema>,
    pub service: String,
}

/// Finds a gRPC function by name.
pub type GrpcLookup = Arc<dyn Fn(&str) -> Option<GrpcTarget> + Send + Sync>;

/// How JSON calls reach gRPC functions: they are found by name, and called through the
/// sidecar's own listener (`own`), so that they take exactly the path gRPC callers take.
#[derive(Clone)]
pub struct GrpcGateway {
    pub lookup: GrpcLookup,
    pub own: std::net::SocketAddr,
}

/// A call of `method` on `function` with `args` (JSON, as docs/json.md maps it).
pub struct JsonCall<'a> {
    pub function: &'a str,
    pub method: &'a str,
    pub args: Value,
    /// The call's deadline (its RPCTimeout / `grpc-timeout`).
    pub timeout: Option<Duration>,
    /// Values the function receives with the call: Thrift, as transient metainfo (TTHeader
    /// string keys `RPC_TRANSIT_{name}`); gRPC, as metadata.
    pub meta: Vec<(&'static str, String)>,
}

/// A call checked and encoded, ready to send: the function and method exist and the
/// arguments fit the IDL.
pub enum Prepared {
    Thrift {
        function: String,
        schema: Arc<Schema>,
        service: String,
        method: String,
        oneway: bool,
        frame: fnmesh_codec::Frame,
    },
    Grpc {
        function: String,
        method: fnmesh_idl::proto_json::MethodDescriptor,
        path: String,
        message: Vec<u8>,
        own: std::net::SocketAddr,
        timeout: Option<Duration>,
        meta: Vec<(&'static str, String)>,
    },
}

/// The request header that sets a call's deadline (`500ms`, `2s`: the policy file's durations).
pub const TIMEOUT_HEADER: &str = "fnmesh-timeout";

/// A body's JSON arguments: an empty body is none (a method without arguments, or a message
/// of defaults); anything else must be JSON.
pub fn json_args(body: &[u8]) -> Result<Value, CallError> {
    match body.is_empty() {
        true => Ok(Value::Null),
        false => serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON: {e}"))),
    }
}

/// The deadline a `fnmesh-timeout` header value sets (`500ms`, `2s`: the policy file's
/// durations).
pub fn deadline(value: Option<&http::HeaderValue>) -> Result<Option<Duration>, CallError> {
    let Some(v) = value else { return Ok(None) };
    v.to_str()
        .ok()
        .and_then(|t| crate::config::parse_duration(t).ok())
        .map(Some)
        .ok_or_else(|| bad(format!("{TIMEOUT_HEADER}: want a duration such as 500ms")))
}

fn bad(message: impl Into<String>) -> CallError {
    CallError::new(Kind::BadRequest, message)
}

fn no_route(message: impl Into<String>) -> CallError {
    CallError::new(Kind::NoRoute, message)
}

/// Checks and encodes `call`: `no-route` for an unknown function or method (or one without an
/// IDL), `bad-request` for arguments the IDL refuses. Nothing is sent.
pub fn prepare(
    front: &ThriftFront,
    grpc: Option<&GrpcGateway>,
    call: JsonCall<'_>,
) -> Result<Prepared, CallError> {
    let (name, method) = (call.function, call.method);
    let table = front.functions.load();
    let Some(function) = table.iter().find(|r| r.function.name == name) else {
        return match grpc.and_then(|g| Some(((g.lookup)(name)?, g.own))) {
            Some((target, own)) => prepare_grpc(call, target, own),
            None => Err(no_route(format!("no function {name}"))),
        };
    };
    let config = function.function.config();
    let (Some(schema), Some(service)) = (config.schema.clone(), config.service.clone()) else {
        return Err(no_route(format!(
            "function {name} has no Thrift IDL: JSON calls need one"
        )));
    };
    let m = schema
        .service(&service)
        .and_then(|s| s.method(method))
        .ok_or_else(|| no_route(format!("function {name} has no method {method}")))?;
    let message = thrift_json::encode_call(&schema, m, &call.args, 1, config.thrift_protocol)
        .map_err(|e| bad(format!("function {name} method {method}: {e}")))?;
    let frame = ttheader_call(name, &service, &call, &message, front.limits)?;
    Ok(Prepared::Thrift {
        function: name.to_owned(),
        oneway: m.oneway,
        method: method.to_owned(),
        schema,
        service,
        frame,
    })
}

fn prepare_grpc(
    call: JsonCall<'_>,
    target: GrpcTarget,
    own: std::net::SocketAddr,
) -> Result<Prepared, CallError> {
    let (name, method) = (call.function, call.method);
    let m = target
        .proto
        .method(&target.service, method)
        .filter(|m| !m.is_client_streaming() && !m.is_server_streaming())
        .ok_or_else(|| no_route(format!("function {name} has no unary method {method}")))?;
    let message = fnmesh_idl::proto_json::encode_request(&m, &call.args)
        .map_err(|e| bad(format!("function {name} method {method}: {e}")))?;
    Ok(Prepared::Grpc {
        function: name.to_owned(),
        method: m,
        path: format!("/{}/{method}", target.service),
        message,
        own,
        timeout: call.timeout,
        meta: call.meta,
    })
}

/// Sends a prepared call: the status and JSON body the gateway answers (200 with the result;
/// 202 for a oneway call; 422 `{"exception", "value"}` for a declared exception; 502 for the
/// function's TApplicationException or gRPC status); fnmesh's own errors as errors.
pub async fn send(
    front: &ThriftFront,
    prepared: Prepared,
) -> Result<(StatusCode, Value), CallError> {
    let (function, schema, service, method, oneway, frame) = match prepared {
        Prepared::Grpc {
            function,
            method,
            path,
            message,
            own,
            timeout,
            meta,
        } => return send_grpc(&function, &method, own, &path, message, timeout, &meta).await,
        Prepared::Thrift {
            function,
            schema,
            service,
            method,
            oneway,
            frame,
        } => (function, schema, service, method, oneway, frame),
    };
    let Some(reply) = exchange(front, frame, oneway).await? else {
        return Ok((StatusCode::ACCEPTED, json!({})));
    };
    let m = schema
        .service(&service)
        .and_then(|s| s.method(&method))
        .ok_or_else(|| no_route(format!("function {function} has no method {method}")))?;
    let unreadable = |e| CallError::new(Kind::Unavailable, format!("function {function}: {e}"));
    Ok(
        match thrift_json::decode_reply(&schema, m, &reply).map_err(unreadable)? {
            JsonReply::Success(v) => (StatusCode::OK, v),
            JsonReply::Declared { field, value } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({ "exception": field, "value": value }),
            ),
            JsonReply::Application { kind, message } => (
                StatusCode::BAD_GATEWAY,
                json!({ "error": "application-exception", "type": kind, "message": message }),
            ),
        },
    )
}

/// [`prepare`], then [`send`].
pub async fn invoke(
    front: &ThriftFront,
    grpc: Option<&GrpcGateway>,
    call: JsonCall<'_>,
) -> Result<(StatusCode, Value), CallError> {
    let prepared = prepare(front, grpc, call)?;
    send(front, prepared).await
}

/// A gRPC function's unary method, through the sidecar's own listener: 200 with the response,
/// fnmesh's errors by their kind, the function's own gRPC status as 502
/// `{"error": "grpc-status", "code", "message"}`.
async fn send_grpc(
    name: &str,
    m: &fnmesh_idl::proto_json::MethodDescriptor,
    own: std::net::SocketAddr,
    path: &str,
    message: Vec<u8>,
    timeout: Option<Duration>,
    meta: &[(&'static str, String)],
) -> Result<(StatusCode, Value), CallError> {
    let answer = crate::unary::unary(own, path, message, timeout, meta)
        .await
        .map_err(|e| CallError::new(Kind::Unavailable, format!("function {name}: {e}")))?;
    if let Some(kind) = answer.fnmesh_error.as_deref().and_then(Kind::named) {
        return Err(CallError::new(kind, answer.message));
    }
    if answer.status != 0 {
        let body =
            json!({ "error": "grpc-status", "code": answer.status, "message": answer.message });
        return Ok((StatusCode::BAD_GATEWAY, body));
    }
    let v = fnmesh_idl::proto_json::decode_response(m, &answer.body)
        .map_err(|e| CallError::new(Kind::Unavailable, format!("function {name}: {e}")))?;
    Ok((StatusCode::OK, v))
}

/// `message` in a TTHeader naming the function (ToService) and its IDL service, with the
/// deadline as RPCTimeout and the call's string keys: a frame as a Volo client sends it.
fn ttheader_call(
    name: &str,
    service: &str,
    call: &JsonCall<'_>,
    message: &[u8],
    limits: fnmesh_codec::Limits,
) -> Result<fnmesh_codec::Frame, CallError> {
    let ms = call
        .timeout
        .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    // As transient metainfo (Kitex's and Volo's `RPC_TRANSIT_` keys): what their handlers read.
    let keys: Vec<String> = call
        .meta
        .iter()
        .map(|(k, _)| format!("RPC_TRANSIT_{k}"))
        .collect();
    let meta: Vec<(&str, &str)> = keys
        .iter()
        .zip(&call.meta)
        .map(|(k, (_, v))| (k.as_str(), v.as_str()))
        .collect();
    let mut buf = fnmesh_codec::wrap_call(1, name, service, ms, &meta, message)
        .map_err(|e| bad(e.to_string()))?;
    match FrameDecoder::new(limits).decode(&mut buf) {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err(bad("the call is incomplete")),
        Err(e) if e.is_too_large() => Err(CallError::new(Kind::TooLarge, e.to_string())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// The call routed, admitted and forwarded as a binary call is; the reply's message (without
/// its transport), or none for a oneway call.
async fn exchange(
    front: &ThriftFront,
    mut frame: fnmesh_codec::Frame,
    oneway: bool,
) -> Result<Option<Vec<u8>>, CallError> {
    let routed = route(&front.functions.load(), None, &mut frame)?;
    debug_assert_eq!(frame.kind() == MessageType::Oneway, oneway);
    let request = match routed.deadline {
        Some(_) => Outgoing::Timed(Box::new(frame)),
        None => Outgoing::Ready(frame.into_buf()),
    };
    // As a connection's timer does for binary calls: past the deadline the call is dropped
    // (its verdict counts the timeout) and answered `timeout`.
    let (deadline, budget) = (routed.deadline, routed.budget);
    let name = routed.function.name.clone();
    let call = call(front, None, routed, request, oneway);
    let (_, result) = match deadline {
        None => call.await,
        Some(at) => tokio::time::timeout_at(at, call).await.map_err(|_| {
            CallError::new(
                Kind::Timeout,
                format!("function {name}: no reply within {budget:?}"),
            )
        })?,
    };
    let Some(reply) = result? else {
        return Ok(None);
    };
    let mut buf = BytesMut::with_capacity(reply.remaining());
    buf.extend_from_slice(reply.first_ref());
    buf.extend_from_slice(reply.last_ref());
    let reply = FrameDecoder::new(front.limits)
        .decode(&mut buf)
        .ok()
        .flatten()
        .ok_or_else(|| CallError::new(Kind::Unavailable, "the function's reply does not decode"))?;
    let mut message = reply.head()[reply.message().start..].to_vec();
    message.extend_from_slice(reply.payload());
    Ok(Some(message))
}
