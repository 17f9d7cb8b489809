//! Thrift connections: frames are decoded (headers only), routed to a function, forwarded to an
//! instance as received, and the instance's reply is returned byte for byte. Many calls may be in
//! flight on one connection; replies go back in request order, except those of TTHeader calls
//! whose caller allows out-of-order replies (it matches them by seqid): each of those goes back
//! as soon as it is ready.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::Poll,
    time::Duration,
};

use bytes::{buf::Chain, Buf, Bytes, BytesMut};
use fnmesh_codec::{
    encode_exception, Detected, Frame, FrameDecoder, Limits, MessageType, ReplyTarget,
};
use futures_util::{
    future::{AbortHandle, Abortable, Either, FutureExt},
    stream::{FuturesUnordered, StreamExt},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use crate::{
    breaker::{self, Breaker},
    config::{FunctionConfig, Retry},
    error::{CallError, Kind},
    pool::Lease,
    pool::{Instance, Pool, Route},
};

type Reply = Chain<Bytes, Bytes>;

/// What every Thrift connection shares.
pub struct Shared {
    /// The Thrift functions; a reload swaps the table.
    pub functions: arc_swap::ArcSwap<Vec<Route>>,
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

/// Most calls (and replies not yet written) one connection may have at once: past this, the
/// connection is not read until some complete, so a caller that stops reading its replies slows
/// itself down instead of growing the sidecar's memory.
const MAX_PENDING: usize = 4096;

fn empty() -> Reply {
    Bytes::new().chain(Bytes::new())
}

/// TTHeader flag: the caller matches replies to calls by seqid, so replies may come back in any
/// order (Kitex's `HeaderFlagSupportOutOfOrder`).
const TT_OUT_OF_ORDER: u16 = 0x01;

/// Whether `frame`'s reply may overtake the replies of earlier calls.
fn out_of_order(frame: &Frame) -> bool {
    frame
        .ttheader()
        .is_some_and(|h| h.flags & TT_OUT_OF_ORDER != 0)
}

/// What an error reply needs of a request that went upstream: its reply target, whose name is
/// read from the request's head (shared with the forwarded bytes, so nothing is copied).
struct Answer {
    target: ReplyTarget<'static>,
    head: Bytes,
    name: std::ops::Range<usize>,
}

impl Answer {
    fn of(frame: &Frame) -> Answer {
        let m = frame.message();
        let tt = frame.ttheader();
        Answer {
            target: ReplyTarget {
                transport: frame.transport(),
                protocol: m.protocol,
                strict: m.strict,
                name: "".into(),
                seqid: m.seqid,
                tt_flags: tt.map_or(0, |h| h.flags),
                tt_seqid: tt.map_or(0, |h| h.seqid),
                inner_framed: tt.is_some_and(|h| h.inner_framed),
            },
            head: Bytes::new(),
            name: m.name_start..m.name_end,
        }
    }

    fn reply(&self, e: &CallError) -> Reply {
        let name = self.head.get(self.name.clone()).unwrap_or_default();
        let target = ReplyTarget {
            name: std::str::from_utf8(name).unwrap_or_default().into(),
            ..self.target.clone()
        };
        rescue(&target, e)
    }
}

/// A two-way call of a connection, from decode until its reply is written.
struct Pending {
    reply: Option<Reply>,
    /// While the call runs: when it times out, its budget and function (for the message), what
    /// its error reply needs, and how to stop it.
    deadline: Option<(Instant, Duration, Arc<Pool>)>,
    answer: Option<Answer>,
    abort: Option<AbortHandle>,
    /// The caller allows this call's reply out of order: once known, it goes to the
    /// connection's `loose` replies and this entry keeps an empty one, only to hold its place.
    unordered: bool,
}

impl Pending {
    fn answered(reply: Reply) -> Pending {
        Pending {
            reply: Some(reply),
            deadline: None,
            answer: None,
            abort: None,
            unordered: false,
        }
    }

    /// Sets the call's reply: in its place, or (out of order) to go out next.
    fn set_reply(&mut self, reply: Reply, loose: &mut VecDeque<Reply>) {
        if self.unordered {
            loose.push_back(reply);
            self.reply = Some(empty());
        } else {
            self.reply = Some(reply);
        }
    }
}

/// Serves one Thrift connection whose first bytes (`buf`) were detected as `detected`.
///
/// The connection's task drives its calls itself (no task per call): it reads and decodes
/// frames, routes them, polls the calls in flight, and writes each reply as soon as every earlier
/// one has gone out, so replies keep request order. A caller that allows out-of-order replies
/// gets each as soon as it is ready, between whole replies; such a call still holds its place
/// (an empty reply) until the calls before it are done, and places count towards
/// [`MAX_PENDING`]. A call alone in flight (the usual case: a Volo or Kitex client sends one call
/// per connection at a time) runs in a slot the connection reuses from call to call; calls
/// beyond it are allocated one by one. One timer per connection, armed at the earliest deadline
/// of its calls, answers `timeout` and stops a call whose deadline passes; a reply that cannot be
/// written yet (slow reader) blocks neither the calls nor the reads, up to [`MAX_PENDING`].
pub async fn serve(
    mut sock: TcpStream,
    detected: Detected,
    mut buf: BytesMut,
    shared: Arc<Shared>,
) {
    let _ = sock.set_nodelay(true);
    let (mut rd, mut wr) = sock.split();
    let shared = &*shared;
    let mut decoder = FrameDecoder::for_transport(detected, shared.limits);
    // The routing table as of the last call: checked against the current one with a pointer
    // comparison instead of a full load per call.
    let mut table = arc_swap::Cache::new(&shared.functions);
    let mut calls = FuturesUnordered::new();
    let mut lane = Box::pin(None);
    // The ticket of the two-way call in `lane`.
    let mut lane_ticket = None;
    // Two-way calls by ticket; the front one's reply goes out next, after `loose` ones.
    let mut pending: VecDeque<Pending> = VecDeque::new();
    // Replies that may go out of order, ready.
    let mut loose: VecDeque<Reply> = VecDeque::new();
    let mut next = 0u64;
    let mut out: Reply = empty();
    let mut reading = true;
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        while reading {
            let mut frame = match decoder.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(err) => {
                    let kind = if err.is_too_large() {
                        Kind::TooLarge
                    } else {
                        Kind::BadRequest
                    };
                    tracing::debug!(error = %err, "refusing a malformed frame; closing the connection");
                    let e = CallError::new(kind, err.to_string());
                    let target = ReplyTarget::for_detected(detected);
                    // Answered after every earlier call; nothing more is read.
                    pending.push_back(Pending::answered(rescue(&target, &e)));
                    reading = false;
                    break;
                }
            };
            let oneway = frame.kind() == MessageType::Oneway;
            if frame.kind() != MessageType::Call && !oneway {
                let e = CallError::new(
                    Kind::BadRequest,
                    format!("expected a call, got a {:?} message", frame.kind()),
                );
                pending.push_back(Pending::answered(rescue(&ReplyTarget::of(&frame), &e)));
                reading = false;
                break;
            }
            let unordered = out_of_order(&frame);
            let (routed, budget) = match route(table.load(), &mut frame) {
                Ok(routed) => routed,
                Err(e) => {
                    if oneway {
                        tracing::debug!(error = %e, "oneway call not routed");
                    } else {
                        let reply = rescue(&ReplyTarget::of(&frame), &e);
                        if unordered {
                            loose.push_back(reply);
                        } else {
                            pending.push_back(Pending::answered(reply));
                        }
                    }
                    continue;
                }
            };
            let deadline = routed.deadline;
            let timed = deadline.map(|_| routed.pool.clone());
            let mut answer = (!oneway).then(|| Answer::of(&frame));
            // A TTHeader call with a deadline is kept as a frame until it is forwarded, when its
            // RPCTimeout (key 12) is set to what is left of the budget.
            let request = match deadline {
                Some(_) if frame.ttheader().is_some() => {
                    if let Some(a) = answer.as_mut() {
                        a.head = Bytes::copy_from_slice(&frame.head()[..a.name.end]);
                    }
                    Outgoing::Timed(Box::new(frame))
                }
                _ => {
                    let request = frame.into_buf();
                    if let Some(a) = answer.as_mut() {
                        a.head = request.first_ref().clone();
                    }
                    Outgoing::Ready(request)
                }
            };
            let ticket = answer.as_ref().map(|_| next + pending.len() as u64);
            let call = call(shared, ticket, routed, request, oneway);
            let abort = if lane.is_none() {
                // Stopped by dropping it.
                lane.set(Some(call));
                lane_ticket = ticket;
                None
            } else {
                // Only a call with a deadline can be stopped (which costs an allocation).
                let (call, abort) = match (ticket, deadline) {
                    (Some(_), Some(_)) => {
                        let (abort, registration) = AbortHandle::new_pair();
                        (
                            Either::Right(Abortable::new(call, registration)),
                            Some(abort),
                        )
                    }
                    _ => (Either::Left(call.map(Ok)), None),
                };
                calls.push(Box::pin(call));
                abort
            };
            let Some(answer) = answer else { continue };
            if let (Some(at), Some(b), Some(pool)) = (deadline, budget, timed) {
                if armed.is_none_or(|a| at < a) {
                    timer.as_mut().reset(at);
                    armed = Some(at);
                }
                pending.push_back(Pending {
                    reply: None,
                    deadline: Some((at, b, pool)),
                    answer: Some(answer),
                    abort,
                    unordered,
                });
            } else {
                pending.push_back(Pending {
                    reply: None,
                    deadline: None,
                    answer: Some(answer),
                    abort: None,
                    unordered,
                });
            }
        }
        while !out.has_remaining() {
            if let Some(reply) = loose.pop_front() {
                out = reply;
            } else if pending.front().is_some_and(|p| p.reply.is_some()) {
                let Some(reply) = pending.pop_front().and_then(|p| p.reply) else {
                    break;
                };
                out = reply;
                next += 1;
            } else {
                break;
            }
            // Written at once when the socket takes it (the usual case), without waiting for a
            // turn of the loop below; what it does not take is written there.
            if out.has_remaining() && write_now(&wr, &mut out).is_err() {
                // The caller is gone: its calls in flight are dropped (cancelled) with it.
                return;
            }
        }
        let busy = lane.is_some();
        let idle = calls.is_empty() && pending.is_empty() && loose.is_empty();
        if !reading && !busy && idle && !out.has_remaining() {
            break;
        }
        let room = calls.len() + pending.len() + loose.len() + usize::from(busy) < MAX_PENDING;
        tokio::select! {
            biased;
            (ticket, result) = std::future::poll_fn(|cx| {
                lane.as_mut().as_pin_mut().map_or(Poll::Pending, |call| call.poll(cx))
            }), if busy => {
                crate::workers::busy();
                lane.set(None);
                lane_ticket = None;
                settle(&mut pending, &mut loose, next, ticket, result);
            }
            Some(done) = calls.next(), if !calls.is_empty() => {
                crate::workers::busy();
                // A stopped call was answered `timeout` already.
                if let Ok((ticket, result)) = done {
                    settle(&mut pending, &mut loose, next, ticket, result);
                }
            }
            written = wr.write_buf(&mut out), if out.has_remaining() => {
                if !matches!(written, Ok(n) if n > 0) {
                    // The caller is gone: its calls in flight are dropped (cancelled) with it.
                    return;
                }
            }
            () = &mut timer, if armed.is_some() => {
                armed = expire(&mut pending, &mut loose);
                // The lane's call, if its deadline passed, was answered: it is stopped.
                let answered = lane_ticket
                    .and_then(|t: u64| t.checked_sub(next))
                    .and_then(|i| pending.get(i as usize))
                    .is_some_and(|p| p.reply.is_some());
                if answered {
                    lane.set(None);
                    lane_ticket = None;
                }
                if let Some(at) = armed {
                    timer.as_mut().reset(at);
                }
            }
            read = rd.read_buf(&mut buf), if reading && room => match read {
                Ok(0) | Err(_) if buf.is_empty() => reading = false,
                Ok(0) | Err(_) => {
                    let e = CallError::new(
                        Kind::BadRequest,
                        format!(
                            "connection closed inside a frame ({} bytes of it received)",
                            buf.len()
                        ),
                    );
                    let target = ReplyTarget::for_detected(detected);
                    pending.push_back(Pending::answered(rescue(&target, &e)));
                    reading = false;
                }
                Ok(_) => crate::workers::busy(),
            },
        }
    }
    let _ = wr.shutdown().await;
}

/// The (at most two) pieces of `out`, for one vectored write; the count of those in use.
fn pieces(out: &Reply) -> ([std::io::IoSlice<'_>; 2], usize) {
    let mut slices = [std::io::IoSlice::new(&[]); 2];
    let n = out.chunks_vectored(&mut slices);
    (slices, n)
}

/// Writes all of `out` (as `write_all_buf`, without setting up room for 64 pieces per poll).
async fn write_all(stream: &mut TcpStream, out: &mut Reply) -> std::io::Result<()> {
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

/// Writes what the socket takes of `out` now, without waiting; an error means the caller is gone.
fn write_now(wr: &tokio::net::tcp::WriteHalf<'_>, out: &mut Reply) -> std::io::Result<()> {
    let (slices, n) = pieces(out);
    match wr.try_write_vectored(&slices[..n]) {
        Ok(written) => {
            out.advance(written);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

/// Gives a finished call's result to its ticket, unless that was answered already (`timeout`).
fn settle(
    pending: &mut VecDeque<Pending>,
    loose: &mut VecDeque<Reply>,
    next: u64,
    ticket: Option<u64>,
    result: Result<Option<Reply>, CallError>,
) {
    let Some(p) = ticket
        .and_then(|t| t.checked_sub(next))
        .and_then(|i| pending.get_mut(i as usize))
        .filter(|p| p.reply.is_none())
    else {
        return;
    };
    let reply = match result {
        Ok(Some(reply)) => reply,
        // Every ticket must be answered, or the replies behind it would wait forever.
        Ok(None) => p.answer.as_ref().map_or_else(empty, |a| {
            a.reply(&CallError::new(
                Kind::Unavailable,
                "the instance sent no reply to a two-way call",
            ))
        }),
        Err(e) => p.answer.as_ref().map_or_else(empty, |a| a.reply(&e)),
    };
    p.set_reply(reply, loose);
    p.answer = None;
    p.abort = None;
    p.deadline = None;
}

/// Answers `timeout` to every call whose deadline has passed and stops it (a call waiting in a
/// queue is never forwarded; an instance's late reply is dropped). Returns the earliest deadline
/// still ahead.
fn expire(pending: &mut VecDeque<Pending>, loose: &mut VecDeque<Reply>) -> Option<Instant> {
    let now = Instant::now();
    let mut earliest: Option<Instant> = None;
    for p in pending.iter_mut() {
        let Some((at, budget, pool)) = &p.deadline else {
            continue;
        };
        let (at, budget) = (*at, *budget);
        if at > now {
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
            continue;
        }
        if let Some(abort) = p.abort.take() {
            abort.abort();
        }
        let e = CallError::new(
            Kind::Timeout,
            format!(
                "function {}: deadline of {budget:?} passed (queueing included)",
                pool.name
            ),
        );
        let reply = p.answer.take().map_or_else(empty, |a| a.reply(&e));
        p.set_reply(reply, loose);
        p.deadline = None;
    }
    earliest
}

/// One routed call: wait for a slot (starting an instance if none is ready), forward.
/// A request on its way to an instance.
enum Outgoing {
    /// The bytes as received.
    Ready(Reply),
    /// A TTHeader frame whose RPCTimeout is set to the call's remaining budget at forwarding.
    Timed(Box<Frame>),
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

/// TTHeader int key RPCTimeout.
const RPC_TIMEOUT: u16 = 12;

/// A call's future is written into its connection's slot (or allocated) once per call, so its
/// size counts: what the levels below need is passed by reference where it can be.
async fn call(
    shared: &Shared,
    ticket: Option<u64>,
    mut routed: Routed,
    request: Outgoing,
    oneway: bool,
) -> (Option<u64>, Result<Option<Reply>, CallError>) {
    let _active = Active::new(&shared.active);
    let _in_flight = crate::workers::InFlight::enter();
    let mut outcome = Outcome {
        breaker: routed.breaker.take(),
        deadline: routed.deadline,
        recorded: false,
    };
    let result = exchange(shared, &routed, request, oneway).await;
    outcome.record(match &result {
        Ok(Some((_, failed))) => *failed,
        Ok(None) => false,
        Err(e) => breaker::is_failure(e.kind),
    });
    (ticket, result.map(|r| r.map(|(reply, _)| reply)))
}

/// Counts a call's outcome in its method's breaker; a call stopped at its deadline (dropped
/// unfinished after it) counts as a failure, one whose caller went away does not.
struct Outcome {
    breaker: Option<Arc<Breaker>>,
    deadline: Option<Instant>,
    recorded: bool,
}

impl Outcome {
    fn record(&mut self, failed: bool) {
        if let Some(b) = &self.breaker {
            b.record(failed);
        }
        self.recorded = true;
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.recorded && self.deadline.is_some_and(|d| Instant::now() >= d) {
            self.record(true);
        }
    }
}

/// Waits for a slot (starting an instance if none is ready) and forwards; with `classify`, the
/// reply is read far enough to tell whether it is a failure (for the breaker). Under a `retry`
/// policy a failed attempt is tried again, on another instance when there is one, after a
/// jittered backoff, within the deadline and the function's retry budget: when the call never
/// reached an instance, and (idempotent methods only) when the instance failed or the attempt
/// ran out of its share of the budget.
async fn exchange(
    shared: &Shared,
    routed: &Routed,
    request: Outgoing,
    oneway: bool,
) -> Result<Option<(Reply, bool)>, CallError> {
    let (pool, deadline) = (&routed.pool, routed.deadline);
    let name = &pool.name;
    let lease = match pool.try_acquire()? {
        Some(lease) => lease,
        None => {
            // Boxed: the queueing path's state does not weigh on every call's future.
            let lease = Box::pin(pool.acquire()).await?;
            // The connection's timer stops a two-way call that waits too long; a oneway call
            // checks here, and is never forwarded late.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(CallError::new(
                    Kind::Timeout,
                    format!("function {name}: deadline passed while queued"),
                ));
            }
            lease
        }
    };
    let request = match (request, deadline) {
        (Outgoing::Timed(frame), Some(d)) => with_remaining_budget(*frame, d)?,
        (Outgoing::Timed(frame), None) => frame.into_buf(),
        (Outgoing::Ready(bytes), _) => bytes,
    };
    let attempts = Attempts {
        shared,
        routed,
        oneway,
    };
    let Some((policy, idempotent)) = routed.retry.filter(|(r, _)| r.attempts > 1) else {
        return attempts.one(lease, request, None).await.map_err(|(e, _)| e);
    };
    // Boxed: the retrying path's state does not weigh on every call's future.
    Box::pin(attempts.retrying(lease, request, policy, idempotent)).await
}

/// What every attempt of one call shares.
struct Attempts<'a> {
    shared: &'a Shared,
    routed: &'a Routed,
    oneway: bool,
}

impl Attempts<'_> {
    async fn retrying(
        &self,
        mut lease: Lease,
        request: Reply,
        policy: Retry,
        idempotent: bool,
    ) -> Result<Option<(Reply, bool)>, CallError> {
        let pool = &self.routed.pool;
        pool.retry_budget.deposit();
        let mut tries = 1;
        loop {
            let left = policy.attempts - tries + 1;
            // With `timeout` retries, each attempt gets an even share of what is left.
            let share = match (self.routed.deadline, policy.on_timeout && idempotent) {
                (Some(d), true) => Some(d.saturating_duration_since(Instant::now()) / left),
                _ => None,
            };
            let bytes = request
                .first_ref()
                .clone()
                .chain(request.last_ref().clone());
            let instance = lease.instance.id;
            let (e, class) = match self.one(lease, bytes, share).await {
                Err(failed) => failed,
                Ok(reply) => return Ok(reply),
            };
            let retryable = match class {
                Class::Connect => policy.on_connect,
                Class::Instance => policy.on_unavailable && idempotent,
                Class::Timeout => policy.on_timeout && idempotent,
                Class::Final => false,
            };
            let wait = retryable
                .then(|| {
                    crate::retry::next_wait(
                        &policy,
                        tries,
                        instance,
                        self.routed.deadline,
                        &pool.retry_budget,
                    )
                })
                .flatten();
            let Some(wait) = wait else {
                return Err(e);
            };
            tracing::debug!(function = %pool.name, instance, error = %e, "retrying");
            tokio::time::sleep(wait).await;
            tries += 1;
            lease = match pool.try_acquire_other(instance)? {
                Some(lease) => lease,
                None => Box::pin(pool.acquire()).await?,
            };
        }
    }

    /// One attempt on the leased instance; `share` bounds it when set (a `timeout` retry
    /// policy).
    async fn one(
        &self,
        mut lease: Lease,
        request: Reply,
        share: Option<Duration>,
    ) -> Result<Option<(Reply, bool)>, (CallError, Class)> {
        let Routed {
            pool,
            deadline,
            classify,
            ..
        } = self.routed;
        let name = &pool.name;
        lease.set_deadline(*deadline);
        let exchange = forward(
            &lease.instance,
            name,
            request,
            self.oneway,
            &self.shared.limits,
            *classify,
        );
        let result = match share {
            None => exchange.await,
            // Boxed: the rare path's state does not weigh on every call's future.
            Some(share) => match Box::pin(tokio::time::timeout(share, exchange)).await {
                Ok(result) => result,
                Err(_) => {
                    lease.outcome(true);
                    return Err((
                        CallError::new(
                            Kind::Timeout,
                            format!(
                                "function {name} instance {}: no reply within {share:?} (this attempt's share of the deadline)",
                                lease.instance.id
                            ),
                        ),
                        Class::Timeout,
                    ));
                }
            },
        };
        match result {
            Err(Failure::Connect(e)) => {
                lease.evict();
                Err((e, Class::Connect))
            }
            Err(Failure::Instance(e)) => {
                lease.evict();
                Err((e, Class::Instance))
            }
            Err(Failure::Call(e)) => {
                lease.outcome(breaker::is_failure(e.kind));
                Err((e, Class::Final))
            }
            Ok(Some((reply, failed))) => {
                lease.outcome(*classify && failed);
                Ok(Some((reply, failed)))
            }
            Ok(None) => {
                lease.outcome(false);
                Ok(None)
            }
        }
    }
}

/// How an attempt failed, for the retry decision.
enum Class {
    Connect,
    Instance,
    Timeout,
    Final,
}

/// The call's time budget: the policy's timeout, or the caller's RPCTimeout when shorter.
fn budget(f: &FunctionConfig, method: &str, frame: &Frame) -> Option<Duration> {
    let policy = f.policy_for(method).timeout;
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

/// A routed call: its function, deadline, breaker, whether replies are read for failures, and
/// retry policy (with whether the method is idempotent), as the function's policy was when the
/// call arrived.
struct Routed {
    pool: Arc<Pool>,
    deadline: Option<Instant>,
    breaker: Option<Arc<Breaker>>,
    /// Replies are read for failures when the function has breakers (also for instance
    /// ejection).
    classify: bool,
    retry: Option<(Retry, bool)>,
}

/// DESIGN.md "Thrift routing": ToService, then `isn`, then a `Service:` name prefix (stripped),
/// then the only Thrift function. A method the IDL lacks is refused without starting anything.
/// Gives the routed call and its time budget.
fn route(table: &[Route], frame: &mut Frame) -> Result<(Routed, Option<Duration>), CallError> {
    let by_name = |n: &[u8]| table.iter().position(|r| r.pool.name.as_bytes() == n);
    let by_service = |s: &[u8]| {
        table
            .iter()
            .position(|r| r.service.as_deref().map(str::as_bytes) == Some(s))
    };
    let mut found = None;
    if let Some(h) = frame.ttheader() {
        found = h.to_service(frame.head()).and_then(by_name);
        if found.is_none() {
            found = h.idl_service(frame.head()).and_then(by_service);
        }
    }
    if found.is_none() {
        if let Some((service, _)) = frame.name().split_once(':') {
            let hit = by_service(service.as_bytes()).or_else(|| by_name(service.as_bytes()));
            if hit.is_some() {
                frame
                    .strip_service_prefix()
                    .map_err(|e| CallError::new(Kind::BadRequest, e.to_string()))?;
                found = hit;
            }
        }
    }
    if found.is_none() && table.len() == 1 {
        found = Some(0);
    }
    let Some(index) = found else {
        let asked = asked_service(frame);
        return Err(CallError::new(
            Kind::NoRoute,
            format!("no function for service {asked}"),
        ));
    };
    let pool = &table[index].pool;
    let current = pool.policy();
    let f = &current.function;
    let method = frame.name();
    if !f.has_method(method) {
        return Err(CallError::new(
            Kind::NoRoute,
            format!("function {} has no method {method}", pool.name),
        ));
    }
    current.limits.admit(&pool.name, method)?;
    let breaker = current.breakers.admit(&pool.name, method)?;
    let policy = f.policy_for(method);
    let retry = policy
        .retry
        .map(|r| (r, policy.idempotent.unwrap_or(false)));
    let budget = budget(f, method, frame);
    let routed = Routed {
        pool: pool.clone(),
        deadline: budget.map(|b| Instant::now() + b),
        breaker,
        classify: !current.breakers.is_empty(),
        retry,
    };
    Ok((routed, budget))
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
/// Whether an instance's reply counts as a failure (`breaker.rs`): an EXCEPTION message whose
/// TApplicationException is UNKNOWN or INTERNAL_ERROR, or that cannot be read. Only calls whose
/// method has a breaker pay for reading the reply's headers.
fn reply_failed(reply: Bytes, limits: Limits) -> bool {
    let mut buf = BytesMut::from(reply);
    match FrameDecoder::new(limits).decode(&mut buf) {
        Ok(Some(f)) if f.kind() == MessageType::Exception => breaker::thrift_exception_is_failure(
            fnmesh_codec::exception_type(f.payload(), f.protocol(), &limits),
        ),
        Ok(Some(_)) => false,
        _ => true,
    }
}

enum Failure {
    /// The call never reached the instance (which is refusing connections): safe to retry.
    Connect(CallError),
    /// The instance broke after it got the call (closed, reset): it may have run it.
    Instance(CallError),
    /// The exchange itself went wrong (a malformed reply).
    Call(CallError),
}

/// Whether an idle pooled connection was closed by the instance: its reactor reported it
/// readable while no call was on it. Costs no system call unless it was (`try_read` does not
/// read while its reactor has not seen the socket readable).
fn is_stale(stream: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    !matches!(stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Writes the request to an instance connection as received and reads one reply frame, which
/// is returned as it came (its headers are not even parsed).
async fn forward(
    instance: &Instance,
    function: &str,
    mut out: Reply,
    oneway: bool,
    limits: &Limits,
    classify: bool,
) -> Result<Option<(Reply, bool)>, Failure> {
    let unavailable = |what: String| {
        CallError::new(
            Kind::Unavailable,
            format!("function {function} instance {}: {what}", instance.id),
        )
    };
    let mut conn = loop {
        match instance.pooled() {
            // A pooled connection the instance has closed (its reactor saw it readable while
            // idle) is dropped before anything is written to it.
            Some(conn) if is_stale(&conn.stream) => continue,
            Some(conn) => break conn,
            // Boxed: the rare path's state does not weigh on every call's future.
            None => {
                break Box::pin(instance.connect())
                    .await
                    .map_err(|e| Failure::Connect(unavailable(format!("connect refused: {e}"))))?
            }
        }
    };
    // A failed write means the instance cannot have the whole frame: it never ran the call.
    write_all(&mut conn.stream, &mut out)
        .await
        .map_err(|e| Failure::Connect(unavailable(format!("write failed: {e}"))))?;
    if oneway {
        instance.recycle(conn);
        return Ok(None);
    }
    let mut decoder = FrameDecoder::new(*limits);
    loop {
        match decoder.split(&mut conn.buf) {
            Ok(Some(reply)) => {
                instance.recycle(conn);
                let failed = classify && reply_failed(reply.clone().freeze(), *limits);
                return Ok(Some((reply.freeze().chain(Bytes::new()), failed)));
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
