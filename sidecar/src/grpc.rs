//! gRPC connections: HTTP/2 without TLS (h2c), served with the h2 crate on the same listener as
//! Thrift. Each stream is routed by its `:path` (`/package.Service/Method`) to the gRPC function
//! whose service it names and forwarded to an instance over an HTTP/2 connection that many
//! streams share. Request and response bodies stream through as they are read
//! (HTTP/2 flow control holds back a fast writer instead of buffering); messages, metadata and
//! trailers are not touched. Only `grpc-timeout` is rewritten: to the call's remaining budget.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use h2::{client::SendRequest, server::SendResponse, RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
    time::{Instant, Sleep},
};

use crate::{
    config::FunctionConfig,
    error::{CallError, Kind},
    lock,
    pool::{Instance, Lease, Policy, Pool, Route},
};

/// What every gRPC connection shares.
pub struct Shared {
    /// The gRPC functions; a reload swaps the table (and bumps `reloads`).
    pub functions: Arc<arc_swap::ArcSwap<Vec<Route>>>,
    /// Counts reloads, for health `Watch` streams.
    pub reloads: watch::Sender<u64>,
    /// Streams between routing and the end of their response, for draining.
    pub active: Arc<AtomicUsize>,
    /// Set when the sidecar drains: connections get GOAWAY, health turns NOT_SERVING.
    pub draining: watch::Sender<bool>,
    /// Open HTTP/2 connections: after GOAWAY each closes once its streams are done, so draining
    /// waits for this to reach zero (streams fnmesh answers itself, such as health `Watch`,
    /// are flushed too).
    pub connections: Arc<AtomicUsize>,
    /// Connections are served by fnmesh's own relay (`relay.rs`) instead of the h2 crate.
    pub relay: bool,
}

impl Shared {
    pub fn new(functions: Vec<Route>) -> Shared {
        Shared {
            relay: false,
            functions: Arc::new(arc_swap::ArcSwap::from_pointee(functions)),
            reloads: watch::Sender::new(0),
            active: Arc::new(AtomicUsize::new(0)),
            draining: watch::Sender::new(false),
            connections: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The function serving `service` (its IDL service, or its name without an IDL).
    pub(crate) fn function(&self, service: &str) -> Option<Arc<Pool>> {
        self.functions
            .load()
            .iter()
            .find(|r| r.service.as_deref().unwrap_or(&r.pool.name) == service)
            .map(|r| r.pool.clone())
    }
}

/// An HTTP/2 connection to an instance, shared by many streams; one per instance and worker.
/// It is driven with the h2 crate directly: hyper's client added a channel to its connection
/// task and a task per request body, and wrote a unary request's headers and message apart.
#[derive(Clone, Debug)]
pub struct Upstream {
    send: SendRequest<Bytes>,
    /// Set when the connection's task has ended.
    closed: Arc<AtomicBool>,
}

impl Upstream {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Errors of the bodies fnmesh sends back.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body fnmesh holds in full: its data, then its trailers.
#[derive(Clone, Default)]
pub struct Held {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Held {
    fn next(&mut self) -> Option<Frame<Bytes>> {
        self.data
            .take()
            .map(Frame::data)
            .or_else(|| self.trailers.take().map(Frame::trailers))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// A request body on its way to an instance: the caller's, streamed through; or, for a call that
/// may be sent again (an idempotent method with a retry policy), its bytes read in full, or as
/// much as was read before it proved too large to keep, then the rest.
pub enum RequestBody {
    Caller(Caller),
    Replay(Held),
    Partial { data: Option<Bytes>, rest: Caller },
}

/// The most of a request kept for sending it again; a larger one is retried only when it never
/// reached an instance.
const REPLAY_LIMIT: usize = 1 << 20;

impl RequestBody {
    /// Reads the caller's request for sending it again: in full when it ends within
    /// [`REPLAY_LIMIT`].
    async fn read(mut body: Caller) -> Result<RequestBody, CallError> {
        let mut data = BytesMut::new();
        let mut trailers = None;
        loop {
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            let frame = match frame {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    return Err(CallError::new(
                        Kind::BadRequest,
                        format!("reading the request: {e}"),
                    ))
                }
            };
            match frame.into_data() {
                Ok(d) => {
                    data.extend_from_slice(&d);
                    if data.len() > REPLAY_LIMIT {
                        return Ok(RequestBody::Partial {
                            data: Some(data.freeze()),
                            rest: body,
                        });
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Ok(RequestBody::Replay(Held {
            data: (!data.is_empty()).then(|| data.freeze()),
            trailers,
        }))
    }

    /// The same request again, when it was read in full.
    fn again(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Replay(held) => Some(RequestBody::Replay(held.clone())),
            _ => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match self.get_mut() {
            RequestBody::Caller(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Replay(held) => Poll::Ready(held.next().map(Ok)),
            RequestBody::Partial { data, rest } => match data.take() {
                Some(d) => Poll::Ready(Some(Ok(Frame::data(d)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Caller(body) => body.is_end_stream(),
            RequestBody::Replay(held) => held.is_end_stream(),
            RequestBody::Partial { data, rest } => data.is_none() && rest.is_end_stream(),
        }
    }
}

/// Opens a stream on `upstream` (ready for one) and sends the request's body. A body fnmesh
/// holds, or a caller's that has already ended (a unary request, as a rule), goes with the
/// headers: h2 writes them together. A caller's still streaming is piped by a task of its own
/// that waits for the instance's flow-control window; the returned guard stops that task when
/// the call ends.
async fn open(
    mut upstream: SendRequest<Bytes>,
    req: Request<RequestBody>,
) -> Result<(h2::client::ResponseFuture, Option<Piping>), h2::Error> {
    let (parts, mut body) = req.into_parts();
    let head = Request::from_parts(parts, ());
    if let RequestBody::Replay(held) = &mut body {
        let (response, mut tx) = upstream.send_request(head, held.is_end_stream())?;
        if let Some(data) = held.data.take() {
            tx.send_data(data, held.trailers.is_none())?;
        }
        if let Some(trailers) = held.trailers.take() {
            tx.send_trailers(trailers)?;
        }
        return Ok((response, None));
    }
    // What the caller has sent so far, without waiting for more: often the whole of a unary
    // request (its message; maybe an empty frame that ends the stream).
    let mut early = Vec::new();
    let mut size = 0;
    let ended = loop {
        match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(None) => break true,
            Poll::Ready(Some(Ok(frame))) => {
                size += frame.data_ref().map_or(0, Bytes::len);
                early.push(Ok(frame));
                if body.is_end_stream() {
                    break true;
                }
                if size > EARLY_LIMIT {
                    break false;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                early.push(Err(e));
                break false;
            }
            Poll::Pending => break false,
        }
    };
    if !ended {
        let (response, tx) = upstream.send_request(head, false)?;
        let task = tokio::spawn(relay(body, early, EARLY_LIMIT, tx, h2::Reason::CANCEL));
        return Ok((response, Some(Piping(task.abort_handle()))));
    }
    let (response, mut tx) = upstream.send_request(head, early.is_empty())?;
    let n = early.len();
    for (i, frame) in early.into_iter().enumerate() {
        let last = i + 1 == n;
        let Ok(frame) = frame else { continue };
        match frame.into_data() {
            Ok(data) if data.is_empty() && !last => {}
            Ok(data) => tx.send_data(data, last)?,
            Err(frame) => match frame.into_trailers() {
                Ok(trailers) => tx.send_trailers(trailers)?,
                Err(_) if last => tx.send_data(Bytes::new(), true)?,
                Err(_) => {}
            },
        }
    }
    Ok((response, None))
}

/// The most of a body sent without waiting for the other side's flow-control window: the window
/// HTTP/2 gives every stream at first.
const EARLY_LIMIT: usize = 65_535;

/// Stops a request body's pipe when the call it belongs to ends (its response is done or
/// dropped): the instance's stream is reset then, if it is still open.
pub struct Piping(tokio::task::AbortHandle);

impl Drop for Piping {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The caller's connection, with the bytes read while detecting the protocol put back in front.
struct Prefixed {
    head: BytesMut,
    sock: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.head.has_remaining() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.advance(n);
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
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_shutdown(cx)
    }
}

/// Serves one HTTP/2 connection whose first bytes (`head`, the preface) were already read, with
/// the h2 crate: a task per stream. When the sidecar drains, the connection gets GOAWAY: streams
/// already open may finish (within `drain_timeout`), new ones go elsewhere.
pub async fn serve(sock: TcpStream, head: BytesMut, shared: Arc<Shared>) {
    let _ = sock.set_nodelay(true);
    let _open = Active::new(&shared.connections);
    let mut draining = shared.draining.subscribe();
    // A connection opened while the sidecar already drains gets its GOAWAY at once.
    draining.mark_changed();
    // hyper's server settings: 1 MiB windows, 16 KiB frames and header lists.
    let handshake = h2::server::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 20)
        .max_frame_size(16 << 10)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(400 << 10)
        .max_local_error_reset_streams(Some(1024))
        .max_concurrent_streams(4096)
        .handshake::<_, Bytes>(Prefixed { head, sock });
    let mut conn = match handshake.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(error = %e, "HTTP/2 handshake failed");
            return;
        }
    };
    let mut goaway = false;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    let shared = shared.clone();
                    // Boxed: moving a small box into the task costs less than moving the whole
                    // future.
                    tokio::spawn(Box::pin(async move {
                        let response = handle(&shared, req.map(Caller)).await;
                        answer(respond, response).await;
                    }));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                    return;
                }
                None => return,
            },
            changed = draining.changed(), if !goaway => {
                if changed.is_err() || *draining.borrow_and_update() {
                    conn.graceful_shutdown();
                    goaway = true;
                }
            }
        }
    }
}

/// Sends a stream's response to the caller: its headers, then its body within the caller's
/// flow-control window. The first message goes with the headers (a unary response, with its
/// trailers, is one write). A caller that resets the stream ends it here, and the instance's
/// stream with it (dropping the body resets it).
async fn answer(mut respond: SendResponse<Bytes>, response: Response<ProxyBody>) {
    let (parts, body) = response.into_parts();
    let head = Response::from_parts(parts, ());
    if body.is_end_stream() {
        let _ = respond.send_response(head, true);
        return;
    }
    if let Ok(tx) = respond.send_response(head, false) {
        relay(
            body,
            Vec::new(),
            EARLY_LIMIT,
            tx,
            h2::Reason::INTERNAL_ERROR,
        )
        .await;
    }
}

/// Sends `body` on `tx` as it comes: `early` (frames already read from it) first, then the rest,
/// within the stream's flow-control window, so that a slow reader holds back the writer. Up to
/// `free` bytes of messages go without waiting for the window: HTTP/2 gives every stream 64 KiB
/// to start with, and a unary message goes out with its headers that way. A body that fails
/// resets the stream with `failed`; a reset from the other side ends the relay.
async fn relay<B>(
    mut body: B,
    early: Vec<Result<Frame<Bytes>, B::Error>>,
    mut free: usize,
    mut tx: SendStream<Bytes>,
    failed: h2::Reason,
) where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut early = early.into_iter();
    loop {
        let frame = match early.next() {
            Some(frame) => Some(frame),
            None => {
                let next = std::future::poll_fn(|cx| {
                    if tx.poll_reset(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    Pin::new(&mut body).poll_frame(cx).map(Some)
                })
                .await;
                match next {
                    // The other side reset the stream (it has answered, or gave up).
                    None => return,
                    Some(frame) => frame,
                }
            }
        };
        let frame = match frame {
            None => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "a body failed; its stream is reset");
                tx.send_reset(failed);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = tx.send_trailers(trailers);
                }
                return;
            }
        };
        let last = body.is_end_stream();
        if data.is_empty() && !last {
            continue;
        }
        let sent = if data.len() <= free {
            free -= data.len();
            tx.send_data(data, last).is_ok()
        } else {
            free = 0;
            send_within_window(&mut tx, data, last).await
        };
        if !sent || last {
            return;
        }
    }
}

/// Sends `data` as the stream's flow-control window allows; false once the stream is closed.
async fn send_within_window(tx: &mut SendStream<Bytes>, mut data: Bytes, last: bool) -> bool {
    if data.is_empty() {
        return tx.send_data(data, last).is_ok();
    }
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let room = match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            // The stream is closed or reset.
            _ => return false,
        };
        let chunk = data.split_to(room.min(data.len()));
        if tx.send_data(chunk, last && data.is_empty()).is_err() {
            return false;
        }
    }
    true
}

/// A caller's request body: its messages (their flow-control window released once handed on,
/// so a slow instance holds back the caller), then its trailers.
pub struct Caller(RecvStream);

impl Body for Caller {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        poll_recv(&mut self.0, cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

/// A response body: the instance's, streamed through while the stream holds its instance slot
/// and counts as active; one that fnmesh makes (a message and/or trailers); or a stream of
/// frames fnmesh makes (health `Watch`).
pub enum ProxyBody {
    Upstream {
        body: RecvStream,
        /// The call's deadline: past it the stream ends with DEADLINE_EXCEEDED trailers.
        deadline: Option<Pin<Box<Sleep>>>,
        budget: Duration,
        function: Arc<str>,
        verdict: Option<Verdict>,
        lease: Lease,
        /// The request body's pipe, when it streams: it ends with the response.
        _piping: Option<Piping>,
        _active: Active,
    },
    Local(Held),
    Frames(Pin<Box<dyn futures_util::Stream<Item = Frame<Bytes>> + Send>>),
}

impl ProxyBody {
    /// Nothing: the status went out in the headers (trailers-only).
    fn empty() -> ProxyBody {
        ProxyBody::Local(Held::default())
    }
}

/// A body received over HTTP/2, frame by frame: its messages (their flow-control window released
/// once handed on, so a slow reader holds back the sender), then its trailers.
fn poll_recv(
    body: &mut RecvStream,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
    match body.poll_data(cx) {
        Poll::Ready(Some(Ok(data))) => {
            let _ = body.flow_control().release_capacity(data.len());
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
        Poll::Ready(None) => {}
        Poll::Pending => return Poll::Pending,
    }
    match body.poll_trailers(cx) {
        Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
        Poll::Ready(Ok(None)) => Poll::Ready(None),
        Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        Poll::Pending => Poll::Pending,
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match this {
            ProxyBody::Upstream {
                body,
                deadline,
                budget,
                function,
                verdict,
                lease,
                ..
            } => {
                if let Some(sleep) = deadline {
                    if sleep.as_mut().poll(cx).is_ready() {
                        if let Some(v) = verdict.as_mut() {
                            v.record(true);
                            lease.outcome(true);
                        }
                        let e = CallError::new(
                            Kind::Timeout,
                            format!("function {function}: deadline of {budget:?} passed"),
                        );
                        // Dropping the instance's body resets its stream: it stops too.
                        *this = ProxyBody::empty();
                        return Poll::Ready(Some(Ok(Frame::trailers(status_headers(&e)))));
                    }
                }
                let frame = poll_recv(body, cx);
                if let Some(v) = verdict.as_mut() {
                    let failed = match &frame {
                        Poll::Ready(Some(Ok(f))) => f.trailers_ref().map(|t| {
                            crate::breaker::grpc_status_is_failure(
                                t.get("grpc-status").map(HeaderValue::as_bytes),
                            )
                        }),
                        // An error, or an end without a status.
                        Poll::Ready(_) => Some(true),
                        Poll::Pending => None,
                    };
                    if let Some(failed) = failed {
                        v.record(failed);
                        lease.outcome(failed);
                    }
                }
                frame.map(|f| f.map(|f| f.map_err(BoxError::from)))
            }
            ProxyBody::Local(held) => Poll::Ready(held.next().map(Ok)),
            ProxyBody::Frames(frames) => frames.as_mut().poll_next(cx).map(|f| f.map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
            ProxyBody::Local(held) => held.is_end_stream(),
            ProxyBody::Frames(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { .. } => SizeHint::default(),
            ProxyBody::Local(held) => held.size_hint(),
            ProxyBody::Frames(_) => SizeHint::default(),
        }
    }
}

/// Counts a stream (or connection) as active for as long as it lives.
pub struct Active(Arc<AtomicUsize>);

impl Active {
    pub(crate) fn new(n: &Arc<AtomicUsize>) -> Active {
        n.fetch_add(1, Ordering::SeqCst);
        Active(n.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The gRPC status of each kind of error fnmesh makes (DESIGN.md's table).
pub(crate) fn grpc_status(kind: Kind) -> u16 {
    match kind {
        Kind::NoRoute => 12,                         // UNIMPLEMENTED
        Kind::BadRequest => 13,                      // INTERNAL
        Kind::TooLarge | Kind::Overloaded => 8,      // RESOURCE_EXHAUSTED
        Kind::Unavailable | Kind::CircuitOpen => 14, // UNAVAILABLE
        Kind::Timeout => 4,                          // DEADLINE_EXCEEDED
    }
}

/// `grpc-status`, `grpc-message` (percent-encoded as gRPC asks) and `fnmesh-error` for `e`.
fn status_headers(e: &CallError) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(grpc_status(e.kind)));
    let text = e.to_string();
    let mut message = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            message.push(b as char);
        } else {
            message.push_str(&format!("%{b:02X}"));
        }
    }
    if let Ok(v) = HeaderValue::from_str(&message) {
        h.insert("grpc-message", v);
    }
    h.insert("fnmesh-error", HeaderValue::from_static(e.kind.as_str()));
    h
}

/// The one place errors become gRPC replies: a trailers-only response (HTTP 200, the status in
/// the headers, no body).
fn rescue(e: &CallError) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::empty());
    let h = r.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.extend(status_headers(e));
    r
}

/// gRPC streams do not start the worker's busy polling (`workers.rs`): measured with
/// `bench-grpc`, the spinning took CPU from the HTTP/2 peers and added latency (README).
async fn handle(shared: &Shared, req: Request<Caller>) -> Response<ProxyBody> {
    match proxy(shared, req).await {
        Ok(r) => r,
        Err(e) => rescue(&e),
    }
}

/// `/package.Service/Method` split in two.
pub(crate) fn service_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// gRPC's `grpc-timeout`: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-timeout` for a remaining budget: microseconds while they fit in 8 digits, then
/// milliseconds, then seconds.
pub fn format_grpc_timeout(d: Duration) -> String {
    let us = d.as_micros().max(1);
    if us < 100_000_000 {
        format!("{us}u")
    } else if d.as_millis() < 100_000_000 {
        format!("{}m", d.as_millis())
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    }
}

/// Where a stream goes: a function, or the health service the sidecar answers itself.
pub(crate) enum Target<'a> {
    Function(Arc<Pool>, &'a str),
    Health { watch: bool },
}

/// Routes a stream by its `:path` (both engines).
pub(crate) fn target<'a>(shared: &Shared, path: &'a str) -> Result<Target<'a>, CallError> {
    let Some((service, method)) = service_method(path) else {
        return Err(CallError::new(
            Kind::NoRoute,
            format!("{path:?} is not a gRPC path (/package.Service/Method)"),
        ));
    };
    if let Some(pool) = shared.function(service) {
        return Ok(Target::Function(pool, method));
    }
    if service != health::SERVICE {
        return Err(CallError::new(
            Kind::NoRoute,
            format!("no function for service {service}"),
        ));
    }
    match method {
        "Check" => Ok(Target::Health { watch: false }),
        "Watch" => Ok(Target::Health { watch: true }),
        other => Err(CallError::new(
            Kind::NoRoute,
            format!("{} has no method {other}", health::SERVICE),
        )),
    }
}

/// A stream its function admitted: the policy as it found it (a reload applies to later
/// streams), its budget (`policy.timeout` capped by the caller's `grpc-timeout`) and deadline,
/// and its breaker verdict (when the function has breakers; outcomes also feed ejection).
pub(crate) struct Admitted {
    pub policy: Arc<Policy>,
    pub budget: Option<Duration>,
    pub deadline: Option<Instant>,
    pub verdict: Option<Verdict>,
}

/// The method check, rate limits and breaker a stream passes before it may queue (both engines).
pub(crate) fn admit(
    pool: &Pool,
    method: &str,
    caller_timeout: Option<Duration>,
) -> Result<Admitted, CallError> {
    let policy: Arc<Policy> = Arc::clone(&pool.policy());
    let f = &policy.function;
    if !f.has_method(method) {
        return Err(CallError::new(
            Kind::NoRoute,
            format!("function {} has no method {method}", f.name),
        ));
    }
    policy.limits.admit(&f.name, method)?;
    let budget = match (f.policy_for(method).timeout, caller_timeout) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    };
    let deadline = budget.map(|b| Instant::now() + b);
    let breaker = policy.breakers.admit(&f.name, method)?;
    let verdict = (!policy.breakers.is_empty()).then(|| Verdict::new(breaker, deadline));
    Ok(Admitted {
        policy,
        budget,
        deadline,
        verdict,
    })
}

async fn proxy(shared: &Shared, req: Request<Caller>) -> Result<Response<ProxyBody>, CallError> {
    let path = req.uri().path().to_owned();
    let (pool, method) = match target(shared, &path)? {
        Target::Function(pool, method) => (pool, method),
        Target::Health { watch } => {
            return Box::pin(health::answer(shared, watch, req.into_body())).await;
        }
    };
    let caller = req
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let Admitted {
        policy,
        budget,
        deadline,
        mut verdict,
    } = admit(&pool, method, caller)?;
    let f = &policy.function;
    let result = forward(
        shared,
        &pool,
        f,
        method,
        req,
        budget,
        deadline,
        &mut verdict,
    )
    .await;
    if let (Err(e), Some(v)) = (&result, verdict.as_mut()) {
        v.record(crate::breaker::is_failure(e.kind));
    }
    result
}

/// An admitted stream on its way to an instance: a slot (queueing for a cold start), this
/// worker's connection to the instance, the request with the remaining budget, the response.
/// The breaker's `verdict` goes with the response body when there is one.
///
/// Under a retry policy, a stream that never reached an instance is tried again on another
/// (`on = ["connect"]`). For an idempotent method whose request was read in full (not client
/// streaming, at most [`REPLAY_LIMIT`]), so is one whose instance failed before its response
/// headers (`unavailable`: the connection was lost, or the instance answered a trailers-only
/// UNAVAILABLE) or that ran past its even share of the deadline (`timeout`). Once response
/// headers that start a stream have arrived, the call is never sent again.
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Shared,
    pool: &Arc<Pool>,
    f: &FunctionConfig,
    method: &str,
    req: Request<Caller>,
    budget: Option<Duration>,
    deadline: Option<Instant>,
    verdict: &mut Option<Verdict>,
) -> Result<Response<ProxyBody>, CallError> {
    let timed_out = |what: &str| {
        CallError::new(
            Kind::Timeout,
            format!(
                "function {}: deadline of {:?} passed {what}",
                f.name,
                budget.unwrap_or_default()
            ),
        )
    };
    let active = Active::new(&shared.active);
    let policy = f.policy_for(method);
    let retry = policy.retry.filter(|r| r.attempts > 1);
    if retry.is_some() {
        pool.retry_budget.deposit();
    }
    let replay = retry.filter(|r| {
        policy.idempotent.unwrap_or(false)
            && (r.on_unavailable || r.on_timeout)
            && f.is_client_streaming(method) != Some(true)
    });
    let (parts, body) = req.into_parts();
    let mut body = match (replay, deadline) {
        (None, _) => RequestBody::Caller(body),
        (Some(_), Some(d)) => tokio::time::timeout_at(d, Box::pin(RequestBody::read(body)))
            .await
            .map_err(|_| timed_out("while the request was read"))??,
        (Some(_), None) => Box::pin(RequestBody::read(body)).await?,
    };
    let mut parts = Some(parts);
    let mut tries = 1;
    let mut avoid = None;
    loop {
        let (lease, sender) =
            reach(pool, f, retry, &mut tries, avoid, deadline, &timed_out).await?;
        let left = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(timed_out("before the call was forwarded"));
                }
                Some(left)
            }
            None => None,
        };
        // A copy for the next attempt, when there can be one.
        let again = replay
            .filter(|r| tries < r.attempts)
            .and_then(|_| body.again());
        let share = match (left, replay, &again) {
            (Some(left), Some(r), Some(_)) if r.on_timeout => Some(left / (r.attempts - tries + 1)),
            _ => None,
        };
        let retrying = again.is_some();
        let this = std::mem::replace(
            &mut body,
            again.unwrap_or(RequestBody::Replay(Held::default())),
        );
        let mut req = match parts.take() {
            Some(p) if retrying => {
                let r = rebuild(&p, this);
                parts = Some(p);
                r
            }
            Some(p) => Request::from_parts(p, this),
            None => {
                return Err(CallError::new(
                    Kind::Unavailable,
                    format!("function {}: no attempt left", f.name),
                ))
            }
        };
        if let Some(left) = left {
            if let Ok(v) = HeaderValue::from_str(&format_grpc_timeout(left)) {
                req.headers_mut().insert("grpc-timeout", v);
            }
        }
        // Opening the stream is part of the attempt: a timeout drops its request pipe too.
        let send = async move {
            let (response, piping) = open(sender, req).await?;
            Ok::<_, h2::Error>((response.await?, piping))
        };
        let until = match (deadline, share) {
            (Some(d), Some(s)) => Some((Instant::now() + s).min(d)),
            (d, _) => d,
        };
        let response = match until {
            Some(u) => tokio::time::timeout_at(u, send).await.ok(),
            None => Some(send.await),
        };
        let instance = lease.instance.id;
        let (e, retryable) = match response {
            None if deadline.is_some_and(|d| Instant::now() >= d) => {
                return Err(timed_out("waiting for the instance's response"));
            }
            None => {
                lease.outcome(true);
                let e = CallError::new(
                    Kind::Timeout,
                    format!(
                        "function {} instance {instance}: no response within {:?} (this attempt's share of the deadline)",
                        f.name,
                        share.unwrap_or_default()
                    ),
                );
                (e, replay.is_some_and(|r| r.on_timeout))
            }
            Some(Err(e)) => {
                lease.outcome(true);
                let e = CallError::new(
                    Kind::Unavailable,
                    format!("function {} instance {instance}: {e}", f.name),
                );
                (e, replay.is_some_and(|r| r.on_unavailable))
            }
            Some(Ok((response, piping))) => {
                let unavailable = retrying
                    && replay.is_some_and(|r| r.on_unavailable)
                    && response.body().is_end_stream()
                    && response
                        .headers()
                        .get("grpc-status")
                        .map(HeaderValue::as_bytes)
                        == Some(b"14");
                let wait = unavailable
                    .then(|| next_retry(replay, tries, instance, deadline, pool))
                    .flatten();
                let Some(wait) = wait else {
                    return Ok(respond(
                        response, piping, lease, verdict, deadline, budget, f, active,
                    ));
                };
                lease.outcome(true);
                drop(lease);
                tracing::debug!(function = %f.name, instance, "instance answered UNAVAILABLE; retrying on another instance");
                tokio::time::sleep(wait).await;
                tries += 1;
                avoid = Some(instance);
                continue;
            }
        };
        let wait = (retrying && retryable)
            .then(|| next_retry(replay, tries, instance, deadline, pool))
            .flatten();
        let Some(wait) = wait else {
            return Err(e);
        };
        drop(lease);
        tracing::debug!(function = %f.name, instance, error = %e, "retrying on another instance");
        tokio::time::sleep(wait).await;
        tries += 1;
        avoid = Some(instance);
    }
}

/// The wait before the next attempt under `retry` (`retry.rs`), if it may be made.
fn next_retry(
    retry: Option<crate::config::Retry>,
    tries: u32,
    instance: u64,
    deadline: Option<Instant>,
    pool: &Pool,
) -> Option<Duration> {
    retry.and_then(|r| crate::retry::next_wait(&r, tries, instance, deadline, &pool.retry_budget))
}

/// The request again, with a copy of its body, for another attempt.
fn rebuild(parts: &http::request::Parts, body: RequestBody) -> Request<RequestBody> {
    let mut r = Request::new(body);
    *r.method_mut() = parts.method.clone();
    *r.uri_mut() = parts.uri.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    r
}

/// A slot on an instance (not `avoid` when another has room) and this worker's connection to
/// it. A connection refused or lost before the stream opened evicts the instance and, under
/// `retry` with `on = ["connect"]`, is tried again on another; `tries` counts the attempts.
async fn reach(
    pool: &Arc<Pool>,
    f: &FunctionConfig,
    retry: Option<crate::config::Retry>,
    tries: &mut u32,
    avoid: Option<u64>,
    deadline: Option<Instant>,
    timed_out: &impl Fn(&str) -> CallError,
) -> Result<(Lease, SendRequest<Bytes>), CallError> {
    let acquire = || async {
        match deadline {
            // Boxed, like the other slow paths: what they hold does not weigh on every stream's
            // future (it is moved into a task per stream).
            Some(d) => tokio::time::timeout_at(d, Box::pin(pool.acquire()))
                .await
                .map_err(|_| timed_out("while queued (the call was never forwarded)"))?,
            None => Box::pin(pool.acquire()).await,
        }
    };
    let on_connect = retry.filter(|r| r.on_connect);
    let free = match avoid {
        Some(a) => pool.try_acquire_other(a)?,
        None => pool.try_acquire()?,
    };
    let mut lease = match free {
        Some(lease) => lease,
        None => acquire().await?,
    };
    loop {
        lease.set_deadline(deadline);
        let e = match connect(&lease.instance).await {
            Ok(sender) => return Ok((lease, sender)),
            Err(e) => e,
        };
        lease.evict();
        let instance = lease.instance.id;
        let e = CallError::new(
            Kind::Unavailable,
            format!("function {} instance {instance}: {e}", f.name),
        );
        let Some(wait) = next_retry(on_connect, *tries, instance, deadline, pool) else {
            return Err(e);
        };
        tracing::debug!(function = %f.name, instance, error = %e, "retrying on another instance");
        tokio::time::sleep(wait).await;
        *tries += 1;
        lease = match pool.try_acquire_other(instance)? {
            Some(lease) => lease,
            None => acquire().await?,
        };
    }
}

/// The instance's response, streamed back: its outcome is read for the breaker when it is
/// already known (a trailers-only status), else from the body's trailers.
#[allow(clippy::too_many_arguments)]
fn respond(
    response: Response<RecvStream>,
    piping: Option<Piping>,
    lease: Lease,
    verdict: &mut Option<Verdict>,
    deadline: Option<Instant>,
    budget: Option<Duration>,
    f: &FunctionConfig,
    active: Active,
) -> Response<ProxyBody> {
    let (parts, body) = response.into_parts();
    let mut verdict = verdict.take();
    if let Some(v) = verdict.as_mut() {
        let failed = if parts.status != http::StatusCode::OK {
            Some(true)
        } else if body.is_end_stream() {
            // Trailers-only: the status is in the headers.
            Some(crate::breaker::grpc_status_is_failure(
                parts.headers.get("grpc-status").map(HeaderValue::as_bytes),
            ))
        } else {
            None
        };
        if let Some(failed) = failed {
            v.record(failed);
            lease.outcome(failed);
        }
    }
    Response::from_parts(
        parts,
        ProxyBody::Upstream {
            body,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            budget: budget.unwrap_or_default(),
            function: f.name.as_str().into(),
            verdict,
            lease,
            _piping: piping,
            _active: active,
        },
    )
}

/// A stream's outcome for its method's breaker, recorded once: from the instance's
/// `grpc-status` (`breaker.rs` says which count as failures), or from fnmesh's own error; a
/// stream dropped unfinished after its deadline counts as a failure, one whose caller went away
/// before it does not.
pub struct Verdict {
    breaker: Option<Arc<crate::breaker::Breaker>>,
    deadline: Option<Instant>,
    recorded: bool,
}

impl Verdict {
    pub(crate) fn new(
        breaker: Option<Arc<crate::breaker::Breaker>>,
        deadline: Option<Instant>,
    ) -> Verdict {
        Verdict {
            breaker,
            deadline,
            recorded: false,
        }
    }

    pub(crate) fn record(&mut self, failed: bool) {
        if !self.recorded {
            if let Some(b) = &self.breaker {
                b.record(failed);
            }
            self.recorded = true;
        }
    }
}

impl Drop for Verdict {
    fn drop(&mut self) {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.record(true);
        }
    }
}

/// This worker's HTTP/2 connection to `instance`, ready for a stream: the shared one, or a new
/// one when there is none or it has closed.
async fn connect(instance: &Instance) -> Result<SendRequest<Bytes>, String> {
    let cached = lock(instance.h2())
        .as_ref()
        .filter(|s| !s.is_closed())
        .cloned();
    let upstream = match cached {
        Some(s) => s,
        None => Box::pin(upstream(instance)).await?,
    };
    match upstream.send.ready().await {
        Ok(send) => Ok(send),
        Err(e) => {
            lock(instance.h2()).take();
            Err(format!("connection lost: {e}"))
        }
    }
}

/// A new HTTP/2 connection to `instance` for this worker (on the readiness probe's connection
/// when it is still unused), kept for the worker's next streams.
async fn upstream(instance: &Instance) -> Result<Upstream, String> {
    let stream = match instance.pooled() {
        Some(conn) => conn.stream,
        None => {
            instance
                .connect()
                .await
                .map_err(|e| format!("connect refused: {e}"))?
                .stream
        }
    };
    // The settings hyper's client would use: large windows (the spec's 64 KiB holds back a
    // loopback), no server push.
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(1 << 20)
        .max_local_error_reset_streams(Some(1024))
        .enable_push(false)
        .handshake::<_, Bytes>(stream)
        .await
        .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    let closed = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let closed = closed.clone();
        async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
            closed.store(true, Ordering::Release);
        }
    });
    let upstream = Upstream { send, closed };
    let mut slot = lock(instance.h2());
    // Another stream may have connected meanwhile: keep the first, use ours for this stream.
    if slot.as_ref().is_none_or(|s| s.is_closed()) {
        *slot = Some(upstream.clone());
    }
    Ok(upstream)
}

/// `grpc.health.v1.Health`, answered by the sidecar for its gRPC functions' services (and `""`,
/// the sidecar itself): SERVING while the function can be routed to, at zero instances too
/// (nothing is started), NOT_SERVING once the sidecar drains; an unknown service is NOT_FOUND
/// (`Watch`: SERVICE_UNKNOWN), as the health protocol asks. `Watch` sends the status, then
/// NOT_SERVING when draining starts, and ends.
pub(crate) mod health {
    use super::*;

    pub const SERVICE: &str = "grpc.health.v1.Health";
    const SERVING: u8 = 1;
    const NOT_SERVING: u8 = 2;
    const SERVICE_UNKNOWN: u8 = 3;
    /// A HealthCheckRequest is a service name; anything larger is refused.
    const MAX_REQUEST: usize = 64 * 1024;

    pub async fn answer(
        shared: &Shared,
        watch: bool,
        body: Caller,
    ) -> Result<Response<ProxyBody>, CallError> {
        let service = requested_service(body).await?;
        let known = service.is_empty() || shared.function(&service).is_some();
        if !watch && !known {
            let mut r = rescue(&CallError::new(Kind::NoRoute, ""));
            let h = r.headers_mut();
            h.insert("grpc-status", HeaderValue::from(5u16)); // NOT_FOUND
            h.insert(
                "grpc-message",
                HeaderValue::from_str(&format!("unknown service {service}"))
                    .unwrap_or(HeaderValue::from_static("unknown service")),
            );
            h.remove("fnmesh-error");
            return Ok(r);
        }
        let status = move |known: bool, draining: bool| match (known, draining) {
            (false, _) => SERVICE_UNKNOWN,
            (true, false) => SERVING,
            (true, true) => NOT_SERVING,
        };
        let mut ok = HeaderMap::new();
        ok.insert("grpc-status", HeaderValue::from(0u16));
        let body = if watch {
            // The status now, then again whenever draining starts or a reload adds or removes
            // the service.
            let routes = shared.functions.clone();
            let serves = move || {
                service.is_empty()
                    || routes
                        .load()
                        .iter()
                        .any(|r| r.service.as_deref().unwrap_or(&r.pool.name) == service)
            };
            let state = Watching {
                draining: shared.draining.subscribe(),
                reloads: shared.reloads.subscribe(),
                sent: None,
                trailers: Some(ok),
            };
            let frames = futures_util::stream::unfold(state, move |mut w| {
                let serves = serves.clone();
                async move {
                    loop {
                        let draining = *w.draining.borrow_and_update();
                        w.reloads.borrow_and_update();
                        let now = status(serves(), draining);
                        if w.sent != Some(now) {
                            w.sent = Some(now);
                            return Some((Frame::data(message(now)), w));
                        }
                        if draining {
                            // The sidecar is going away: the stream ends.
                            let trailers = w.trailers.take()?;
                            return Some((Frame::trailers(trailers), w));
                        }
                        tokio::select! {
                            changed = w.draining.changed() => if changed.is_err() { return None },
                            changed = w.reloads.changed() => if changed.is_err() { return None },
                        }
                    }
                }
            });
            ProxyBody::Frames(Box::pin(frames))
        } else {
            ProxyBody::Local(Held {
                data: Some(message(status(known, *shared.draining.borrow()))),
                trailers: Some(ok),
            })
        };
        let mut r = Response::new(body);
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        Ok(r)
    }

    /// Where a health `Watch` stands.
    struct Watching {
        draining: watch::Receiver<bool>,
        reloads: watch::Receiver<u64>,
        sent: Option<u8>,
        trailers: Option<HeaderMap>,
    }

    /// A HealthCheckResponse `{ status = 1 }` in a gRPC message frame.
    fn message(status: u8) -> Bytes {
        Bytes::copy_from_slice(&[0, 0, 0, 0, 2, 0x08, status])
    }

    /// Reads the request's one message and its field 1 (`service`).
    async fn requested_service(mut body: Caller) -> Result<String, CallError> {
        let mut buf = BytesMut::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.map_err(|e| CallError::new(Kind::BadRequest, e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
                if buf.len() > MAX_REQUEST {
                    return Err(CallError::new(
                        Kind::TooLarge,
                        format!("health check request over {MAX_REQUEST} bytes"),
                    ));
                }
            }
        }
        parse_request(&buf).ok_or_else(|| {
            CallError::new(Kind::BadRequest, "malformed HealthCheckRequest".to_owned())
        })
    }

    /// The `service` of a HealthCheckRequest in a gRPC message frame (uncompressed); `None`
    /// when the bytes are not one.
    pub fn parse_request(buf: &[u8]) -> Option<String> {
        if buf.is_empty() {
            return Some(String::new());
        }
        let (&compressed, rest) = buf.split_first()?;
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let mut msg = rest.get(4..)?;
        if compressed != 0 || msg.len() != len {
            return None;
        }
        let mut service = String::new();
        while !msg.is_empty() {
            let tag = varint(&mut msg)?;
            match (tag >> 3, tag & 7) {
                (1, 2) => {
                    let n = usize::try_from(varint(&mut msg)?).ok()?;
                    let bytes = msg.get(..n)?;
                    service = String::from_utf8(bytes.to_vec()).ok()?;
                    msg = &msg[n..];
                }
                (_, 0) => {
                    varint(&mut msg)?;
                }
                (_, 1) => msg = msg.get(8..)?,
                (_, 5) => msg = msg.get(4..)?,
                (_, 2) => {
                    let n = usize::try_from(varint(&mut msg)?).ok()?;
                    msg = msg.get(n..)?;
                }
                _ => return None,
            }
        }
        Some(service)
    }

    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = buf.split_first()?;
            *buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_format() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        for d in [
            Duration::from_micros(1),
            Duration::from_millis(250),
            Duration::from_secs(3 * 3600),
            Duration::from_secs(500_000),
        ] {
            let back = parse_grpc_timeout(&format_grpc_timeout(d)).unwrap();
            assert!(
                back <= d && d - back < Duration::from_secs(1),
                "{d:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn health_check_requests_parse_and_never_panic() {
        let frame = |msg: &[u8]| {
            let mut f = vec![0];
            f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            f.extend_from_slice(msg);
            f
        };
        let mut m = vec![0x0a, 9];
        m.extend_from_slice(b"echo.Echo");
        assert_eq!(
            health::parse_request(&frame(&m)).as_deref(),
            Some("echo.Echo")
        );
        assert_eq!(health::parse_request(&frame(&[])).as_deref(), Some(""));
        assert_eq!(health::parse_request(&[]).as_deref(), Some(""));
        // Unknown fields of every wire type are skipped.
        let mut m2 = vec![
            0x10, 0x96, 0x01, 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x25, 1, 2, 3, 4,
        ];
        m2.extend_from_slice(&m);
        assert_eq!(
            health::parse_request(&frame(&m2)).as_deref(),
            Some("echo.Echo")
        );
        for bad in [
            vec![1, 0, 0, 0, 0],
            vec![0, 0, 0, 0, 5, 0x0a],
            frame(&[0x0a, 200]),
            frame(&[0x0b]),
            frame(&[0x0a, 2, 0xff, 0xfe]),
            frame(&[
                0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
            ]),
            vec![0, 0, 0],
        ] {
            assert_eq!(health::parse_request(&bad), None, "{bad:?}");
        }
        // Every prefix and every single-byte change of a valid request: an answer, no panic.
        let good = frame(&m2);
        for n in 0..good.len() {
            let _ = health::parse_request(&good[..n]);
            for b in [0u8, 0x7f, 0x80, 0xff] {
                let mut x = good.clone();
                x[n] = b;
                let _ = health::parse_request(&x);
            }
        }
    }

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            service_method("/echo.Echo/UnaryEcho"),
            Some(("echo.Echo", "UnaryEcho"))
        );
        for bad in [
            "",
            "/",
            "/echo.Echo",
            "/echo.Echo/",
            "//M",
            "/a/b/c",
            "echo.Echo/M",
        ] {
            assert_eq!(service_method(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn error_statuses_follow_the_design_table() {
        let e = CallError::new(Kind::Unavailable, "function echo: 100% broken\n");
        let h = status_headers(&e);
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["fnmesh-error"], "unavailable");
        assert_eq!(
            h["grpc-message"],
            "fnmesh unavailable: function echo: 100%25 broken%0A"
        );
        assert_eq!(grpc_status(Kind::NoRoute), 12);
        assert_eq!(grpc_status(Kind::Timeout), 4);
        assert_eq!(grpc_status(Kind::TooLarge), 8);
        assert_eq!(grpc_status(Kind::BadRequest), 13);
    }
}
