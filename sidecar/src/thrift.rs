//! Thrift connections: frames are decoded (headers only), routed to a function, forwarded to an
//! instance as received, and the instance's reply is returned byte for byte. Many calls may be in
//! flight on one connection; replies go back in request order.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{buf::Chain, Buf, Bytes, BytesMut};
use fnmesh_codec::{
    encode_exception, Detected, Frame, FrameDecoder, Limits, MessageType, ReplyTarget,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{tcp::OwnedWriteHalf, TcpStream},
    time::Instant,
};

use crate::{
    error::{CallError, Kind},
    pool::{Instance, Pool},
};

type Reply = Chain<Bytes, Bytes>;

/// What every Thrift connection shares.
pub struct Shared {
    pub functions: Vec<Arc<Pool>>,
    pub limits: Limits,
    /// Calls between decode and reply, for draining.
    pub active: AtomicUsize,
}

/// Counts a call as active for as long as it lives.
struct Active<'a>(&'a AtomicUsize);

impl<'a> Active<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Active(n)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The one place errors become Thrift replies (DESIGN.md's table): an EXCEPTION message in the
/// request's transport, TTHeader key `fnmesh-error` = the kind.
fn rescue(target: &ReplyTarget<'_>, e: &CallError) -> Reply {
    let text = e.to_string();
    let bytes = encode_exception(
        target,
        e.kind.thrift_exception(),
        &text,
        Some(e.kind.as_str()),
    )
    .unwrap_or_default();
    bytes.chain(Bytes::new())
}

/// Replies of one connection, written in request order by whichever call completes the next one
/// in line: with a single call in flight, its own task writes the reply (no writer task to wake).
struct Replies {
    state: std::sync::Mutex<Order>,
    wr: tokio::sync::Mutex<OwnedWriteHalf>,
    written: tokio::sync::Notify,
}

#[derive(Default)]
struct Order {
    /// The ticket whose reply goes out next.
    next: u64,
    /// Replies ready but not yet in line.
    ready: std::collections::BTreeMap<u64, Reply>,
    /// A task is writing: it will also write whatever becomes next while it does.
    writing: bool,
    broken: bool,
}

impl Replies {
    fn order(&self) -> std::sync::MutexGuard<'_, Order> {
        crate::lock(&self.state)
    }

    /// Queues the reply for `ticket` and writes every reply that is now in line, unless another
    /// task is already doing so (it will pick this one up).
    async fn deliver(&self, ticket: u64, reply: Reply) {
        {
            let mut o = self.order();
            if o.broken {
                return;
            }
            o.ready.insert(ticket, reply);
            if o.writing {
                return;
            }
            o.writing = true;
        }
        loop {
            let next = {
                let mut o = self.order();
                let n = o.next;
                match o.ready.remove(&n) {
                    Some(r) => {
                        o.next += 1;
                        r
                    }
                    None => {
                        o.writing = false;
                        return;
                    }
                }
            };
            let mut reply = next;
            let ok = self.wr.lock().await.write_all_buf(&mut reply).await.is_ok();
            if !ok {
                let mut o = self.order();
                o.broken = true;
                o.writing = false;
                o.ready.clear();
                drop(o);
                self.written.notify_waiters();
                return;
            }
            self.written.notify_waiters();
        }
    }

    /// Waits until the replies to tickets below `issued` are written (or the peer is gone), then
    /// closes the write side.
    async fn finish(&self, issued: u64) {
        loop {
            let written = self.written.notified();
            {
                let o = self.order();
                if o.broken || o.next >= issued {
                    break;
                }
            }
            written.await;
        }
        let _ = self.wr.lock().await.shutdown().await;
    }
}

/// Serves one Thrift connection whose first bytes (`buf`) were detected as `detected`.
pub async fn serve(sock: TcpStream, detected: Detected, mut buf: BytesMut, shared: Arc<Shared>) {
    let _ = sock.set_nodelay(true);
    let (mut rd, wr) = sock.into_split();
    let replies = Arc::new(Replies {
        state: Default::default(),
        wr: tokio::sync::Mutex::new(wr),
        written: tokio::sync::Notify::new(),
    });
    let mut tickets = 0u64;
    let mut decoder = FrameDecoder::for_transport(detected, shared.limits);
    let refusal = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(frame)) => {
                let oneway = frame.kind() == MessageType::Oneway;
                if frame.kind() != MessageType::Call && !oneway {
                    let e = CallError::new(
                        Kind::BadRequest,
                        format!("expected a call, got a {:?} message", frame.kind()),
                    );
                    break Some(rescue(&ReplyTarget::of(&frame), &e));
                }
                let ticket = (!oneway).then(|| {
                    tickets += 1;
                    (replies.clone(), tickets - 1)
                });
                tokio::spawn(call(shared.clone(), frame, ticket));
            }
            Ok(None) => match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) if buf.is_empty() => break None,
                Ok(0) | Err(_) => {
                    let e = CallError::new(
                        Kind::BadRequest,
                        format!(
                            "connection closed inside a frame ({} bytes of it received)",
                            buf.len()
                        ),
                    );
                    break Some(rescue(&ReplyTarget::for_detected(detected), &e));
                }
                Ok(_) => {}
            },
            Err(err) => {
                let kind = if err.is_too_large() {
                    Kind::TooLarge
                } else {
                    Kind::BadRequest
                };
                tracing::debug!(error = %err, "refusing a malformed frame; closing the connection");
                let e = CallError::new(kind, err.to_string());
                break Some(rescue(&ReplyTarget::for_detected(detected), &e));
            }
        }
    };
    if let Some(reply) = refusal {
        tickets += 1;
        replies.deliver(tickets - 1, reply).await;
    }
    replies.finish(tickets).await;
}

/// One call: route, wait for a slot (starting an instance if none is ready), forward, reply.
async fn call(shared: Arc<Shared>, mut frame: Frame, reply: Option<(Arc<Replies>, u64)>) {
    let _active = Active::new(&shared.active);
    let routed = route(&shared, &mut frame);
    // What an error reply needs of the request, kept after the frame itself went upstream.
    let answer = ReplyTarget::of(&frame).into_owned();
    let result = match routed {
        Ok((pool, method)) => {
            let deadline = deadline(&pool, &method, &frame);
            let forwarded = async {
                let lease = pool.acquire().await?;
                let result = forward(
                    &lease.instance,
                    &pool.function.name,
                    frame,
                    reply.is_none(),
                    shared.limits,
                )
                .await;
                if let Err(Failure::Instance(_)) = &result {
                    lease.evict();
                }
                result.map_err(Failure::into_error)
            };
            match deadline {
                Some(d) => match tokio::time::timeout_at(Instant::now() + d, forwarded).await {
                    Ok(r) => r,
                    Err(_) => Err(CallError::new(
                        Kind::Timeout,
                        format!(
                            "function {}: deadline of {d:?} passed (queueing included)",
                            pool.function.name
                        ),
                    )),
                },
                None => forwarded.await,
            }
        }
        Err(e) => Err(e),
    };
    let Some(reply) = reply else {
        if let Err(e) = result {
            tracing::debug!(error = %e, "oneway call failed");
        }
        return;
    };
    let bytes = match result {
        Ok(Some(f)) => f.into_buf(),
        // Every ticket must be answered, or the replies queued behind it would wait forever.
        Ok(None) => rescue(
            &answer,
            &CallError::new(
                Kind::Unavailable,
                "the instance sent no reply to a two-way call",
            ),
        ),
        Err(e) => rescue(&answer, &e),
    };
    let (replies, ticket) = reply;
    replies.deliver(ticket, bytes).await;
}

/// The call's deadline: the policy's timeout, or the caller's RPCTimeout when shorter.
fn deadline(pool: &Pool, method: &str, frame: &Frame) -> Option<Duration> {
    let policy = pool.function.policy_for(method).timeout;
    let caller = frame
        .ttheader()
        .and_then(|h| h.rpc_timeout_ms(frame.head()))
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    match (policy, caller) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

/// DESIGN.md "Thrift routing": ToService, then `isn`, then a `Service:` name prefix (stripped),
/// then the only Thrift function. A method the IDL lacks is refused without starting anything.
fn route(shared: &Shared, frame: &mut Frame) -> Result<(Arc<Pool>, String), CallError> {
    let by_name = |n: &[u8]| {
        shared
            .functions
            .iter()
            .find(|p| p.function.name.as_bytes() == n)
    };
    let by_service = |s: &[u8]| {
        shared
            .functions
            .iter()
            .find(|p| p.function.service.as_deref().map(str::as_bytes) == Some(s))
    };
    let mut found = None;
    if let Some(h) = frame.ttheader() {
        found = h.to_service(frame.head()).and_then(by_name).cloned();
        if found.is_none() {
            found = h.idl_service(frame.head()).and_then(by_service).cloned();
        }
    }
    if found.is_none() {
        if let Some((service, _)) = frame.name().split_once(':') {
            let hit = by_service(service.as_bytes())
                .or_else(|| by_name(service.as_bytes()))
                .cloned();
            if hit.is_some() {
                frame
                    .strip_service_prefix()
                    .map_err(|e| CallError::new(Kind::BadRequest, e.to_string()))?;
                found = hit;
            }
        }
    }
    if found.is_none() && shared.functions.len() == 1 {
        found = shared.functions.first().cloned();
    }
    let Some(pool) = found else {
        let asked = asked_service(frame);
        return Err(CallError::new(
            Kind::NoRoute,
            format!("no function for service {asked}"),
        ));
    };
    let method = frame.name().to_owned();
    if !pool.function.has_method(&method) {
        return Err(CallError::new(
            Kind::NoRoute,
            format!("function {} has no method {method}", pool.function.name),
        ));
    }
    Ok((pool, method))
}

/// The service an unroutable call asked for, for its error: the last routing rule that named one
/// (a `Service:` prefix, else `isn`, else ToService). Only the failure path pays for the text.
fn asked_service(frame: &Frame) -> String {
    if let Some((service, _)) = frame.name().split_once(':') {
        return service.to_owned();
    }
    let head = frame.head();
    frame
        .ttheader()
        .and_then(|h| h.idl_service(head).or_else(|| h.to_service(head)))
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_else(|| "(none named)".into())
}

/// How a forward failed: the instance is broken (refused, closed without replying), or only this
/// exchange went wrong.
enum Failure {
    Instance(CallError),
    Call(CallError),
}

impl Failure {
    fn into_error(self) -> CallError {
        match self {
            Failure::Instance(e) | Failure::Call(e) => e,
        }
    }
}

/// Writes the frame to an instance connection as received and reads one reply frame.
async fn forward(
    instance: &Instance,
    function: &str,
    frame: Frame,
    oneway: bool,
    limits: Limits,
) -> Result<Option<Frame>, Failure> {
    let unavailable = |what: String| {
        CallError::new(
            Kind::Unavailable,
            format!("function {function} instance {}: {what}", instance.id),
        )
    };
    let mut conn = instance
        .connection()
        .await
        .map_err(|e| Failure::Instance(unavailable(format!("connect refused: {e}"))))?;
    let mut out = frame.into_buf();
    conn.stream
        .write_all_buf(&mut out)
        .await
        .map_err(|e| Failure::Instance(unavailable(format!("write failed: {e}"))))?;
    if oneway {
        instance.recycle(conn);
        return Ok(None);
    }
    let mut decoder = FrameDecoder::new(limits);
    loop {
        match decoder.decode(&mut conn.buf) {
            Ok(Some(reply)) => {
                instance.recycle(conn);
                return Ok(Some(reply));
            }
            Ok(None) => {}
            Err(e) => return Err(Failure::Call(unavailable(format!("malformed reply: {e}")))),
        }
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => {
                return Err(Failure::Instance(unavailable(
                    "closed the connection before replying".into(),
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::Instance(unavailable(format!("read failed: {e}")))),
        }
    }
}
