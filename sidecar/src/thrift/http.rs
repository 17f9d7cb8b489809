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

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{
    json_call::{deadline, invoke, json_args, GrpcGateway, JsonCall},
    ThriftFront,
};
use crate::error::{CallError, Kind};

pub use super::json_call::TIMEOUT_HEADER;

/// An `/async/...` request (docs/async.md), handed to the queue: the path after `/async`, and
/// the body read within `max_frame_size`.
pub struct AsyncRequest {
    pub method: Method,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Answers `/async/...` requests (the queue, when `[async]` is configured).
pub type AsyncRoutes = Arc<
    dyn Fn(
            AsyncRequest,
        ) -> Pin<
            Box<dyn std::future::Future<Output = Result<(StatusCode, Value), CallError>> + Send>,
        > + Send
        + Sync,
>;

/// Serves HTTP/1.1 requests on a connection whose first bytes (`read`) were already taken.
pub async fn serve(
    sock: TcpStream,
    read: BytesMut,
    front: Arc<ThriftFront>,
    grpc: Option<GrpcGateway>,
    queue: Option<AsyncRoutes>,
) {
    let _ = sock.set_nodelay(true);
    let io = hyper_util::rt::TokioIo::new(Prefixed {
        prefix: read.freeze(),
        sock,
    });
    let limits = front.connections;
    let drain = front.drain.clone();
    let service = hyper::service::service_fn(move |req| {
        let (front, grpc, queue) = (front.clone(), grpc.clone(), queue.clone());
        async move {
            let answer = handle(&front, grpc.as_ref(), queue.as_ref(), req).await;
            Ok::<_, std::convert::Infallible>(answer)
        }
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
    queue: Option<&AsyncRoutes>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    // Events for the worker's busy poller, as a binary connection's are: it keeps polling
    // for the instance's reply and the next request instead of sleeping between them.
    crate::workers::busy();
    let answered = match req.uri().path().strip_prefix("/async") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => {
            let rest = rest.to_owned();
            async_request(front, queue, req, rest).await
        }
        _ => answer(front, grpc, req).await,
    };
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
    // A queued async call's id, as OpenFaaS's callers read it.
    if status == StatusCode::ACCEPTED {
        if let Some(id) = body["id"]
            .as_str()
            .and_then(|i| http::HeaderValue::from_str(i).ok())
        {
            r.headers_mut().insert("x-call-id", id);
        }
    }
    r
}

/// `/async/...`: to the queue, with the body read within `max_frame_size`.
async fn async_request(
    front: &ThriftFront,
    queue: Option<&AsyncRoutes>,
    req: Request<hyper::body::Incoming>,
    path: String,
) -> Result<(StatusCode, Value), CallError> {
    let Some(queue) = queue else {
        return Err(CallError::new(
            Kind::NoRoute,
            "async calls are off: the policy file has no [async]",
        ));
    };
    let (parts, body) = req.into_parts();
    let body = read_body(front, body).await?;
    queue(AsyncRequest {
        method: parts.method,
        path,
        headers: parts.headers,
        body,
    })
    .await
}

/// A request's body, refused past `max_frame_size`.
async fn read_body(front: &ThriftFront, body: hyper::body::Incoming) -> Result<Bytes, CallError> {
    let limit = front.limits.max_frame_size;
    Ok(Limited::new(body, limit)
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
        .to_bytes())
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
    let (timeout, args) = deadline_and_body(front, req).await?;
    let call = JsonCall {
        function: name,
        method,
        args,
        timeout,
        meta: Vec::new(),
    };
    invoke(front, grpc, call).await
}

/// The request's `fnmesh-timeout`, and its body as JSON (within `max_frame_size`).
async fn deadline_and_body(
    front: &ThriftFront,
    req: Request<hyper::body::Incoming>,
) -> Result<(Option<std::time::Duration>, Value), CallError> {
    let timeout = deadline(req.headers().get(TIMEOUT_HEADER))?;
    let body = read_body(front, req.into_body()).await?;
    Ok((timeout, json_args(&body)?))
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
