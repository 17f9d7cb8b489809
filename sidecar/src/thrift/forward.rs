//! A routed Thrift call on its way to an instance: a slot (queueing for a cold start), an idle
//! connection of this worker to the instance, the request as received, one reply frame back,
//! and retries as the function's policy allows.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fnmesh_codec::{Frame, FrameDecoder, Limits, MessageType};
use tokio::{io::AsyncReadExt, time::Instant};

use super::{route::Routed, Reply, ThriftFront};
use crate::{
    error::{CallError, Kind},
    governance::{
        outcome::{self, Failure, Outcome},
        retry::Attempts,
    },
    instances::{instance::Open, is_local, Instance, Lease, Stream, EXIT_GRACE},
    lock,
};

/// TTHeader int key RPCTimeout.
const RPC_TIMEOUT: u16 = 12;

/// Idle connections kept per instance and worker.
const MAX_IDLE: usize = 256;

/// A request on its way to an instance.
pub(super) enum Outgoing {
    /// The bytes as received.
    Ready(Reply),
    /// A TTHeader frame whose RPCTimeout is set to the call's remaining budget at forwarding.
    Timed(Box<Frame>),
}

/// A Thrift connection to an instance and its read buffer: one call at a time, as Volo and
/// Kitex servers expect; idle ones wait in the instance's list for this worker.
struct InstanceConn {
    stream: Stream,
    buf: BytesMut,
    open: Open,
}

impl Drop for InstanceConn {
    fn drop(&mut self) {
        self.open.close(&self.stream);
    }
}

impl InstanceConn {
    fn new(stream: Stream, instance: &Instance) -> InstanceConn {
        InstanceConn {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
            open: instance.open(),
        }
    }

    /// An idle connection of this worker to `instance` that the instance has not closed (or
    /// the readiness probe's), else a new one.
    async fn to(instance: &Instance) -> std::io::Result<InstanceConn> {
        loop {
            let idle = lock(instance.idle::<InstanceConn>()).pop();
            match idle {
                // A pooled connection the instance has closed (its reactor saw it readable
                // while idle) is dropped before anything is written to it.
                Some(conn) if is_stale(&conn.stream) => continue,
                Some(conn) => return Ok(conn),
                None => break,
            }
        }
        if let Some(probe) = instance.take_probe() {
            return Ok(InstanceConn::new(probe, instance));
        }
        // Boxed: the rare path's state does not weigh on every call's future.
        let stream = Box::pin(instance.connect()).await?;
        Ok(InstanceConn::new(stream, instance))
    }

    /// Gives back a connection whose call completed cleanly (one to a stopping instance
    /// closes).
    #[inline]
    fn recycle(self, instance: &Instance) {
        let mut idle = lock(instance.idle::<InstanceConn>());
        // Under the list's lock: a stop clears the lists after it marks the instance.
        if idle.len() < MAX_IDLE && !instance.is_stopping() {
            idle.push(self);
        }
    }
}

/// Whether an idle pooled connection was closed by the instance: its reactor reported it
/// readable while no call was on it. Costs no system call unless it was (`try_read` does not
/// read while its reactor has not seen the socket readable).
fn is_stale(stream: &Stream) -> bool {
    let mut probe = [0u8; 1];
    !matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// One call from routing to its reply. A call's future is written into its connection's slot
/// (or allocated) once per call, so its size counts: what the levels below need is passed by
/// reference where it can be.
pub(super) async fn call(
    front: &ThriftFront,
    ticket: Option<u64>,
    mut routed: Routed,
    request: Outgoing,
    oneway: bool,
) -> (Option<u64>, Result<Option<Reply>, CallError>) {
    let _active = front.drain.track();
    let _in_flight = crate::workers::InFlight::enter();
    let result = exchange(front, &routed, request, oneway).await;
    routed.verdict.record(match &result {
        Ok(Some((_, outcome))) => *outcome,
        Ok(None) => Outcome::Ok,
        Err(e) => Outcome::Error(e.kind),
    });
    (ticket, result.map(|r| r.map(|(reply, _)| reply)))
}

/// A reply and its outcome (read from its headers).
type Replied = Option<(Reply, Outcome)>;

/// Waits for a slot (starting an instance if none is ready) and forwards. Under a `retry`
/// policy a failed attempt is tried again, on another instance when there is one, as
/// `governance::retry` decides.
async fn exchange(
    front: &ThriftFront,
    routed: &Routed,
    request: Outgoing,
    oneway: bool,
) -> Result<Replied, CallError> {
    let (function, deadline) = (&routed.function, routed.deadline);
    let (lease, request) = match function.pool.try_acquire()? {
        Some(lease) => (lease, request),
        None => {
            // No instance here has room: a node with peers asks one with a ready instance
            // first (boxed: the multi-node path's state does not weigh on every call).
            let request = match function.peers.get() {
                None => request,
                Some(peers) => match Box::pin(to_peer(front, routed, peers, request, oneway)).await
                {
                    Ok(done) => return done,
                    Err(request) => request,
                },
            };
            // Boxed: the queueing path's state does not weigh on every call's future.
            let lease = Box::pin(function.pool.acquire()).await?;
            // The connection's timer stops a two-way call that waits too long; a oneway call
            // checks here, and is never forwarded late.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(CallError::new(
                    Kind::Timeout,
                    format!("function {}: deadline passed while queued", function.name),
                ));
            }
            (lease, request)
        }
    };
    routed.verdict.leased(&lease.instance);
    let request = match (request, deadline) {
        (Outgoing::Timed(frame), Some(d)) => with_remaining_budget(*frame, d)?,
        (Outgoing::Timed(frame), None) => frame.into_buf(),
        (Outgoing::Ready(bytes), _) => bytes,
    };
    let attempt = Attempt {
        limits: &front.limits,
        routed,
        oneway,
    };
    let Some(retry) = routed.retry else {
        return attempt.one(lease, request, None).await.map_err(|(e, _)| e);
    };
    // Boxed: the retrying path's state does not weigh on every call's future.
    Box::pin(retrying(attempt, retry, lease, request)).await
}

/// A call that found no room here, on a node with peers (docs/multi-node.md): a call another
/// node forwarded is refused (`not-warm`, never forwarded again); any other TTHeader two-way
/// call goes, marked, to up to `PEER_TRIES` peers until one serves it. `Err` gives the
/// request back to be served here: no peer had room, none could be reached, or one failed
/// after taking it and the call may be sent again.
async fn to_peer(
    front: &ThriftFront,
    routed: &Routed,
    peers: &std::sync::Arc<crate::instances::Pool>,
    request: Outgoing,
    oneway: bool,
) -> Result<Result<Replied, CallError>, Outgoing> {
    let function = &routed.function;
    if routed.hop {
        return Ok(Err(CallError::new(
            Kind::NotWarm,
            format!(
                "function {}: no ready instance with room on this node",
                function.name
            ),
        )));
    }
    if oneway {
        return Err(request);
    }
    let marked = match &request {
        Outgoing::Timed(frame) => mark(frame, routed.deadline),
        // Without a deadline the frame went on as bytes: read again (its head only).
        Outgoing::Ready(bytes) => {
            let mut buf = BytesMut::with_capacity(bytes.remaining());
            buf.extend_from_slice(bytes.first_ref());
            buf.extend_from_slice(bytes.last_ref());
            match FrameDecoder::new(front.limits).decode(&mut buf) {
                Ok(Some(frame)) => mark(&frame, routed.deadline),
                _ => None,
            }
        }
    };
    // Framed and unframed calls carry no header for the marker: served here.
    let Some(marked) = marked else {
        return Err(request);
    };
    let replays = routed.retry.as_ref().is_some_and(|r| r.replays());
    function.peer_load_check(peers);
    use crate::governance::services::{PEER_COOL, PEER_TRIES};
    for _ in 0..PEER_TRIES {
        let Ok(Some(lease)) = peers.try_acquire() else {
            break;
        };
        let bytes = marked.first_ref().clone().chain(marked.last_ref().clone());
        let sent = forward(&lease.instance, &function.name, bytes, false, &front.limits).await;
        match sent {
            Ok(Some((reply, _))) if refused_by_peer(&reply, front.limits) => {
                peers.cool(&lease.instance, PEER_COOL);
            }
            Ok(replied) => {
                lease.outcome(false);
                return Ok(Ok(replied));
            }
            // It never reached the peer, or the peer may have run it and it may run again.
            Err(Broke(_, Failure::Connect, local)) => lease.broken(local),
            Err(Broke(_, _, local)) if replays => lease.broken(local),
            Err(Broke(e, _, local)) => {
                lease.broken(local);
                return Ok(Err(e));
            }
        }
    }
    Err(request)
}

/// A TTHeader request's bytes with the hop marker added and RPCTimeout set to what is left;
/// `None` for other transports.
#[cold]
fn mark(frame: &Frame, deadline: Option<Instant>) -> Option<Reply> {
    frame.ttheader()?;
    let mut marked = frame.clone();
    marked
        .add_str_key(crate::governance::services::HOP.as_bytes(), b"1")
        .ok()?;
    match deadline {
        Some(d) => with_remaining_budget(marked, d).ok(),
        None => Some(marked.into_buf()),
    }
}

/// Whether a peer's reply is its `not-warm` refusal (TTHeader `fnmesh-error`).
fn refused_by_peer(reply: &Reply, limits: Limits) -> bool {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(reply.first_ref());
    buf.extend_from_slice(reply.last_ref());
    if !fnmesh_codec::is_exception(&buf) {
        return false;
    }
    let Ok(Some(frame)) = FrameDecoder::new(limits).decode(&mut buf) else {
        return false;
    };
    let Some(h) = frame.ttheader() else {
        return false;
    };
    let not_warm = crate::error::Kind::NotWarm.as_str().as_bytes();
    let refused = h
        .str_kvs(frame.head())
        .any(|(k, v)| k == b"fnmesh-error" && v == not_warm);
    refused
}

/// Attempts until one succeeds or the retry state machine says no more.
async fn retrying(
    attempt: Attempt<'_>,
    mut retry: Attempts,
    mut lease: Lease,
    request: Reply,
) -> Result<Replied, CallError> {
    let function = &attempt.routed.function;
    let deadline = attempt.routed.deadline;
    loop {
        let bytes = request
            .first_ref()
            .clone()
            .chain(request.last_ref().clone());
        let instance = lease.instance.id;
        let share = retry.share(deadline);
        let (e, failure) = match attempt.one(lease, bytes, share).await {
            Err(failed) => failed,
            Ok(reply) => return Ok(reply),
        };
        let Some(wait) = retry.next(failure, instance, deadline, &function.retry_budget) else {
            return Err(e);
        };
        let method = attempt.routed.verdict.method();
        crate::metrics::global().retry(&function.name, method, outcome::retry_reason(failure));
        attempt.routed.verdict.retried();
        tracing::debug!(function = %function.name, instance, error = %e, "retrying");
        tokio::time::sleep(wait).await;
        lease = match function.pool.try_acquire_other(instance)? {
            Some(lease) => lease,
            None => Box::pin(function.pool.acquire()).await?,
        };
        attempt.routed.verdict.leased(&lease.instance);
    }
}

/// What every attempt of one call shares.
struct Attempt<'a> {
    limits: &'a Limits,
    routed: &'a Routed,
    oneway: bool,
}

impl Attempt<'_> {
    /// One attempt on the leased instance; `share` bounds it when set (a `timeout` retry
    /// policy).
    async fn one(
        &self,
        mut lease: Lease,
        request: Reply,
        share: Option<Duration>,
    ) -> Result<Replied, (CallError, Failure)> {
        let name = &self.routed.function.name;
        let classify = self.routed.classify;
        lease.set_deadline(self.routed.deadline);
        let exchange = forward(&lease.instance, name, request, self.oneway, self.limits);
        let result = match share {
            None => exchange.await,
            // Boxed: the rare path's state does not weigh on every call's future.
            Some(share) => match Box::pin(tokio::time::timeout(share, exchange)).await {
                Ok(result) => result,
                Err(_) => {
                    lease.outcome(true);
                    let e = CallError::new(
                        Kind::Timeout,
                        format!(
                            "function {name} instance {}: no reply within {share:?} (this attempt's share of the deadline)",
                            lease.instance.id
                        ),
                    );
                    return Err((e, Failure::Timeout));
                }
            },
        };
        match result {
            Err(Broke(e, Failure::Final, _)) => {
                lease.outcome(outcome::is_failure(e.kind));
                Err((e, Failure::Final))
            }
            Err(Broke(e, failure, local)) => {
                lease.broken(local);
                // A crash takes the instance out before the next call (or this call's retry)
                // could pick it; a live instance that dropped a connection stays.
                if !local {
                    lease.instance.exits_within(EXIT_GRACE).await;
                }
                Err((e, failure))
            }
            Ok(Some((reply, outcome))) => {
                lease.outcome(classify && outcome.is_failure());
                Ok(Some((reply, outcome)))
            }
            Ok(None) => {
                lease.outcome(false);
                Ok(None)
            }
        }
    }
}

/// The frame's bytes with TTHeader key 12 (RPCTimeout, decimal milliseconds) set to what is left
/// until `deadline` (at least 1 ms), so the instance can stop work its caller has given up on.
/// Rewritten in place when the number keeps its length.
fn with_remaining_budget(mut frame: Frame, deadline: Instant) -> Result<Reply, CallError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1);
    frame
        .set_int_key(RPC_TIMEOUT, ms.to_string().as_bytes())
        .map_err(|e| {
            CallError::new(Kind::BadRequest, format!("cannot set the RPC timeout: {e}"))
        })?;
    Ok(frame.into_buf())
}

/// The TApplicationException type of an EXCEPTION reply, when it can be read: its frame is
/// decoded only then.
#[cold]
fn exception_type(reply: &[u8], limits: Limits) -> Option<i32> {
    let mut buf = BytesMut::from(reply);
    match FrameDecoder::new(limits).decode(&mut buf) {
        Ok(Some(f)) if f.kind() == MessageType::Exception => {
            fnmesh_codec::exception_type(f.payload(), f.protocol(), &limits)
        }
        _ => None,
    }
}

/// An exchange that failed: the error, how (for the retry decision), and whether the cause was
/// local (fnmesh's own descriptors or memory, not the instance).
struct Broke(CallError, Failure, bool);

/// Writes the request to an instance connection as received and reads one reply frame, which
/// is returned as it came (its headers are not even parsed). A failure says whether the
/// instance got the request ([`Failure::Connect`]: it did not), broke after it
/// ([`Failure::Unavailable`]), or only this exchange went wrong ([`Failure::Final`]).
async fn forward(
    instance: &Instance,
    function: &str,
    mut out: Reply,
    oneway: bool,
    limits: &Limits,
) -> Result<Replied, Broke> {
    let unavailable = |what: String| {
        CallError::new(
            Kind::Unavailable,
            format!("function {function} instance {}: {what}", instance.id),
        )
    };
    let mut conn = InstanceConn::to(instance).await.map_err(|e| {
        let local = is_local(&e);
        Broke(
            unavailable(format!("connect failed: {e}")),
            Failure::Connect,
            local,
        )
    })?;
    // A failed write means the instance cannot have the whole frame: it never ran the call.
    write_all(&mut conn.stream, &mut out).await.map_err(|e| {
        let local = is_local(&e);
        Broke(
            unavailable(format!("write failed: {e}")),
            Failure::Connect,
            local,
        )
    })?;
    if oneway {
        conn.recycle(instance);
        return Ok(None);
    }
    let mut decoder = FrameDecoder::new(*limits);
    loop {
        match decoder.split(&mut conn.buf) {
            Ok(Some(reply)) => {
                // A server that answers EXCEPTION often closes the connection next (Volo does,
                // for a request it cannot decode): pooled, the close could meet the next call.
                let kind = fnmesh_codec::reply_kind(&reply);
                if kind != Some(fnmesh_codec::ReplyKind::Exception) {
                    conn.recycle(instance);
                }
                let outcome = outcome::thrift_reply(kind, || exception_type(&reply, *limits));
                return Ok(Some((reply.freeze().chain(Bytes::new()), outcome)));
            }
            Ok(None) => {}
            Err(e) => {
                let e = unavailable(format!("malformed reply: {e}"));
                return Err(Broke(e, Failure::Final, false));
            }
        }
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) => {
                let e = unavailable("closed the connection before replying".into());
                return Err(Broke(e, Failure::Unavailable, false));
            }
            Ok(_) => {}
            Err(e) => {
                let local = is_local(&e);
                let e = unavailable(format!("read failed: {e}"));
                return Err(Broke(e, Failure::Unavailable, local));
            }
        }
    }
}

/// The (at most two) pieces of `out`, for one vectored write; the count of those in use.
#[inline]
pub(super) fn pieces(out: &Reply) -> ([std::io::IoSlice<'_>; 2], usize) {
    let mut slices = [std::io::IoSlice::new(&[]); 2];
    let n = out.chunks_vectored(&mut slices);
    (slices, n)
}

/// Writes all of `out` (as `write_all_buf`, without setting up room for 64 pieces per poll).
async fn write_all(stream: &mut Stream, out: &mut Reply) -> std::io::Result<()> {
    while out.has_remaining() {
        let written = std::future::poll_fn(|cx| {
            let (slices, n) = pieces(out);
            tokio::io::AsyncWrite::poll_write_vectored(
                std::pin::Pin::new(&mut *stream),
                cx,
                &slices[..n],
            )
        })
        .await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        out.advance(written);
    }
    Ok(())
}
