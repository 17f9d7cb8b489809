//! The HTTP/JSON gateway on the main listener (docs/gateway.md): `POST /{function}/{method}`
//! with a JSON body becomes a TTHeader call built from the function's IDL, which takes exactly
//! the path a binary call takes (routing, admission, scale from zero, deadlines, retries,
//! breakers, rate limits); its reply comes back as JSON. hyper serves HTTP/1.1 (keep-alive and
//! pipelining included).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use fnmesh_codec::{FrameDecoder, MessageType};
use fnmesh_idl::thrift_json::{self, Reply as JsonReply};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    forward::{call, Outgoing},
    route::route,
    ThriftFront,
};
use crate::error::{CallError, Kind};

/// The request header that sets a call's deadline (`500ms`, `2s`: the policy file's durations).
pub const TIMEOUT_HEADER: &str = "fnmesh-timeout";

/// A gRPC function the gateway can call: its descriptors and IDL service.
pub struct GrpcTarget {
    pub proto: Arc<fnmesh_idl::proto_json::ProtoSchema>,
    pub service: String,
}

/// Finds a gRPC function by name.
pub type GrpcLookup = Arc<dyn Fn(&str) -> Option<GrpcTarget> + Send + Sync>;

/// How the gateway reaches gRPC functions: it finds them by name, and calls them through the
/// sidecar's own listener (`own`), so that they take exactly the path gRPC callers take.
#[derive(Clone)]
pub struct GrpcGateway {
    pub lookup: GrpcLookup,
    pub own: std::net::SocketAddr,
}

/// Serves HTTP/1.1 requests on a connection whose first bytes (`read`) were already taken.
pub async fn serve(
    sock: TcpStream,
    read: BytesMut,
    front: Arc<ThriftFront>,
    grpc: Option<GrpcGateway>,
) {
    let _ = sock.set_nodelay(true);
    let io = hyper_util::rt::TokioIo::new(Prefixed {
        prefix: read.freeze(),
        sock,
    });
    let limits = front.connections;
    let drain = front.drain.clone();
    let service = hyper::service::service_fn(move |req| {
        let (front, grpc) = (front.clone(), grpc.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(&front, grpc.as_ref(), req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(io, service);
    tokio::pin!(conn);
    // The sidecar's drain: requests in flight are answered, then the connection closes.
    let served = tokio::select! {
        served = conn.as_mut() => served,
        _ = drain.started() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "gateway connection ended");
    }
}

/// One request: its JSON reply, or fnmesh's error as `{"error": KIND, "message": ...}`.
async fn handle(
    front: &ThriftFront,
    grpc: Option<&GrpcGateway>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    // Events for the worker's busy poller, as a binary connection's are: it keeps polling
    // for the instance's reply and the next request instead of sleeping between them.
    crate::workers::busy();
    let answered = answer(front, grpc, req).await;
    crate::workers::busy();
    match answered {
        Ok((status, body)) => respond(status, &body),
        Err(e) => {
            let status = StatusCode::from_u16(e.kind.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            respond(
                status,
                &json!({ "error": e.kind.as_str(), "message": e.to_string() }),
            )
        }
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn bad(message: impl Into<String>) -> CallError {
    CallError::new(Kind::BadRequest, message)
}

/// The call a request asks for, made: the status and JSON body of its reply.
async fn answer(
    front: &ThriftFront,
    grpc: Option<&GrpcGateway>,
    req: Request<hyper::body::Incoming>,
) -> Result<(StatusCode, Value), CallError> {
    let path = req.uri().path().to_owned();
    let (name, method) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(f, m)| !f.is_empty() && !m.is_empty() && !m.contains('/'))
        .ok_or_else(|| {
            CallError::new(
                Kind::NoRoute,
                format!("{path}: the gateway takes POST /FUNCTION/METHOD"),
            )
        })?;
    if req.method() != Method::POST {
        return Err(bad(format!("{} {path}: use POST", req.method())));
    }
    let table = front.functions.load();
    let found = table.iter().find(|r| r.function.name == name);
    let Some(function) = found.map(|r| r.function.clone()) else {
        return match grpc.and_then(|g| Some(((g.lookup)(name)?, g.own))) {
            Some((target, own)) => grpc_call(front, req, name, method, target, own).await,
            None => Err(CallError::new(Kind::NoRoute, format!("no function {name}"))),
        };
    };
    let config = function.config();
    let (Some(schema), Some(service)) = (config.schema.clone(), config.service.clone()) else {
        return Err(CallError::new(
            Kind::NoRoute,
            format!("function {name} has no Thrift IDL: JSON calls need one"),
        ));
    };
    let m = schema
        .service(&service)
        .and_then(|s| s.method(method))
        .ok_or_else(|| {
            CallError::new(
                Kind::NoRoute,
                format!("function {name} has no method {method}"),
            )
        })?;
    let (timeout, args) = deadline_and_body(front, req).await?;
    let message = thrift_json::encode_call(&schema, m, &args, 1, config.thrift_protocol)
        .map_err(|e| bad(format!("function {name} method {method}: {e}")))?;
    let frame = ttheader_call(name, &service, timeout, &message, front.limits)?;
    let reply = exchange(front, frame, m.oneway).await?;
    let Some(reply) = reply else {
        return Ok((StatusCode::ACCEPTED, json!({})));
    };
    Ok(
        match thrift_json::decode_reply(&schema, m, &reply)
            .map_err(|e| CallError::new(Kind::Unavailable, format!("function {name}: {e}")))?
        {
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

/// The request's `fnmesh-timeout`, and its body as JSON (within `max_frame_size`).
async fn deadline_and_body(
    front: &ThriftFront,
    req: Request<hyper::body::Incoming>,
) -> Result<(Option<std::time::Duration>, Value), CallError> {
    let timeout = match req.headers().get(TIMEOUT_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|t| crate::config::parse_duration(t).ok())
                .ok_or_else(|| bad(format!("{TIMEOUT_HEADER}: want a duration such as 500ms")))?,
        ),
    };
    let limit = front.limits.max_frame_size;
    let body = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(
            |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                Some(_) => {
                    CallError::new(Kind::TooLarge, format!("request body over {limit} bytes"))
                }
                None => bad(format!("cannot read the request body: {e}")),
            },
        )?
        .to_bytes();
    let args = match body.is_empty() {
        true => Value::Null,
        false => serde_json::from_slice(&body).map_err(|e| bad(format!("malformed JSON: {e}")))?,
    };
    Ok((timeout, args))
}

/// A gRPC function's unary `method`, called through the sidecar's own listener: 200 with the
/// response, fnmesh's errors by their kind, the function's own gRPC status as 502
/// `{"error": "grpc-status", "code", "message"}`.
async fn grpc_call(
    front: &ThriftFront,
    req: Request<hyper::body::Incoming>,
    name: &str,
    method: &str,
    target: GrpcTarget,
    own: std::net::SocketAddr,
) -> Result<(StatusCode, Value), CallError> {
    let m = target
        .proto
        .method(&target.service, method)
        .filter(|m| !m.is_client_streaming() && !m.is_server_streaming())
        .ok_or_else(|| {
            CallError::new(
                Kind::NoRoute,
                format!("function {name} has no unary method {method}"),
            )
        })?;
    let (timeout, args) = deadline_and_body(front, req).await?;
    let message = fnmesh_idl::proto_json::encode_request(&m, &args)
        .map_err(|e| bad(format!("function {name} method {method}: {e}")))?;
    let path = format!("/{}/{method}", target.service);
    let answer = crate::unary::unary(own, &path, message, timeout)
        .await
        .map_err(|e| CallError::new(Kind::Unavailable, format!("function {name}: {e}")))?;
    if let Some(kind) = answer.fnmesh_error.as_deref().and_then(kind_named) {
        return Err(CallError::new(kind, answer.message));
    }
    if answer.status != 0 {
        let body =
            json!({ "error": "grpc-status", "code": answer.status, "message": answer.message });
        return Ok((StatusCode::BAD_GATEWAY, body));
    }
    let v = fnmesh_idl::proto_json::decode_response(&m, &answer.body)
        .map_err(|e| CallError::new(Kind::Unavailable, format!("function {name}: {e}")))?;
    Ok((StatusCode::OK, v))
}

/// The error kind an `fnmesh-error` names.
fn kind_named(name: &str) -> Option<Kind> {
    [
        Kind::NoRoute,
        Kind::BadRequest,
        Kind::TooLarge,
        Kind::Overloaded,
        Kind::CircuitOpen,
        Kind::Unavailable,
        Kind::Timeout,
        Kind::NotWarm,
    ]
    .into_iter()
    .find(|k| k.as_str() == name)
}

/// `message` in a TTHeader naming the function (ToService) and its IDL service, with the
/// deadline as RPCTimeout: a frame as a Volo client sends it.
fn ttheader_call(
    name: &str,
    service: &str,
    timeout: Option<std::time::Duration>,
    message: &[u8],
    limits: fnmesh_codec::Limits,
) -> Result<fnmesh_codec::Frame, CallError> {
    let ms = timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    let mut buf =
        fnmesh_codec::wrap_call(1, name, service, ms, message).map_err(|e| bad(e.to_string()))?;
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

/// A connection whose first bytes were read while its protocol was detected: they are read
/// again first.
struct Prefixed {
    prefix: Bytes,
    sock: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.sock).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.sock).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.sock).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.sock.is_write_vectored()
    }
}
