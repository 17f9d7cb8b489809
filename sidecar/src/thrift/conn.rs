//! One Thrift connection. Its task drives its calls itself (no task per call): it reads and
//! decodes frames, routes them, polls the calls in flight, and writes each reply as soon as every
//! earlier one has gone out, so replies keep request order. A TTHeader caller that allows
//! out-of-order replies (it matches them by seqid) gets each as soon as it is ready, between
//! whole replies; such a call still holds its place (an empty reply) until the calls before it
//! are done, and places count towards [`MAX_PENDING`].

use std::{collections::VecDeque, future::Future, sync::Arc, task::Poll, time::Duration};

use bytes::{Buf, Bytes, BytesMut};
use fnmesh_codec::{Detected, Frame, FrameDecoder, MessageType, ReplyTarget};
use futures_util::{
    future::{AbortHandle, Abortable, Either, FutureExt},
    stream::{FuturesUnordered, StreamExt},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{tcp::WriteHalf, TcpStream},
    time::Instant,
};

use super::{
    empty,
    forward::{call, pieces, Outgoing},
    rescue,
    route::{route, Routed},
    Reply, ThriftFront,
};
use crate::{
    config::ConnectionLimits,
    error::{CallError, Kind},
    governance::{Function, Route, Services},
    workers::{Stalled, Stalls},
};

/// Most calls (and replies not yet written) one connection may have at once: past this, the
/// connection is not read until some complete, so a caller that stops reading its replies slows
/// itself down instead of growing the sidecar's memory.
const MAX_PENDING: usize = 4096;

/// TTHeader flag: the caller matches replies to calls by seqid, so replies may come back in any
/// order (Kitex's `HeaderFlagSupportOutOfOrder`).
const TT_OUT_OF_ORDER: u16 = 0x01;

/// Serves one Thrift connection whose first bytes (`buf`) were detected as `detected`.
///
/// A call alone in flight (the usual case: a Volo or Kitex client sends one call per connection
/// at a time) runs in a slot the connection reuses from call to call (the `lane`); calls beyond
/// it are allocated one by one. One timer per connection, armed at the earliest deadline of its
/// calls, answers `timeout` and stops a call whose deadline passes; a reply that cannot be
/// written yet (slow reader) blocks neither the calls nor the reads, up to [`MAX_PENDING`].
pub async fn serve(
    mut sock: TcpStream,
    detected: Detected,
    mut buf: BytesMut,
    front: Arc<ThriftFront>,
) {
    let _ = sock.set_nodelay(true);
    let (mut rd, mut wr) = sock.split();
    let front = &*front;
    let mut reader = Reader::new(front, detected);
    let (mut replies, mut calls) = (Replies::default(), FuturesUnordered::new());
    let mut lane = Box::pin(None);
    // The ticket of the two-way call in `lane`.
    let mut lane_ticket = None;
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    let mut sweep = Sweep::new(front.connections, waker);
    loop {
        while let Some(read) = reader.next_call(&mut buf, &mut replies) {
            if let Some(at) = read.rearm {
                timer.as_mut().reset(at);
            }
            let (ticket, timed) = (read.ticket, read.routed.deadline.is_some());
            let call = call(front, ticket, read.routed, read.request, read.oneway);
            if lane.is_none() {
                // Stopped by dropping it.
                lane.set(Some(call));
                lane_ticket = ticket;
                continue;
            }
            // Only a call with a deadline can be stopped (which costs an allocation).
            match ticket.filter(|_| timed) {
                Some(ticket) => {
                    let (abort, registration) = AbortHandle::new_pair();
                    calls.push(Box::pin(Either::Right(Abortable::new(call, registration))));
                    replies.set_abort(ticket, abort);
                }
                None => calls.push(Box::pin(Either::Left(call.map(Ok)))),
            }
        }
        reader.drain_if(front.drain.is_draining(), &buf);
        if replies.write_ready(&wr).is_err() {
            // The caller is gone: its calls in flight are dropped (cancelled) with it.
            return;
        }
        let busy = lane.is_some();
        if !reader.reading && !busy && calls.is_empty() && replies.is_done() {
            break;
        }
        let room = calls.len() + replies.len() + usize::from(busy) < MAX_PENDING
            && replies.held() < front.connections.buffer;
        tokio::select! {
            biased;
            (ticket, result) = std::future::poll_fn(|cx| {
                lane.as_mut().as_pin_mut().map_or(Poll::Pending, |call| call.poll(cx))
            }), if busy => {
                crate::workers::busy();
                lane.set(None);
                lane_ticket = None;
                replies.settle(ticket, result);
            }
            Some(done) = calls.next(), if !calls.is_empty() => {
                crate::workers::busy();
                // A stopped call was answered `timeout` already.
                if let Ok((ticket, result)) = done {
                    replies.settle(ticket, result);
                }
            }
            written = wr.write_buf(&mut replies.out), if replies.out.has_remaining() => {
                if !matches!(written, Ok(n) if n > 0) {
                    // The caller is gone: its calls in flight are dropped (cancelled) with it.
                    return;
                }
            }
            () = &mut timer, if replies.armed.is_some() => {
                // The lane's call, if its deadline passed, was answered: it is stopped.
                if let Some(at) = replies.expire() {
                    timer.as_mut().reset(at);
                }
                if lane_ticket.is_some_and(|t| replies.is_answered(t)) {
                    lane.set(None);
                    lane_ticket = None;
                }
            }
            read = rd.read_buf(&mut buf), if reader.reading && room => match read {
                Ok(0) | Err(_) => reader.closed(&buf, &mut replies),
                Ok(_) => crate::workers::busy(),
            },
            // The sweep wakes this task at each tick: an atomic read per poll.
            () = std::future::poll_fn(|_| sweep.poll_ticked()) => {
                let in_flight = busy || !calls.is_empty() || !replies.is_done();
                if sweep.closes(&mut reader, &buf, in_flight, &mut replies) {
                    break;
                }
            }
        }
    }
    let _ = wr.shutdown().await;
}

/// A call read and routed, ready to start: a two-way call's reply already has its place
/// (`ticket`), and `rearm` is where the connection's timer goes when its deadline is the
/// earliest.
struct NewCall {
    routed: Routed,
    request: Outgoing,
    oneway: bool,
    ticket: Option<u64>,
    rearm: Option<Instant>,
}

/// The reading side of a connection: frames decoded and routed.
struct Reader<'a> {
    detected: Detected,
    decoder: FrameDecoder,
    /// Frames decoded so far: progress, for [`Sweep`].
    frames: u64,
    /// The routing table as of the last call: checked against the current one with a pointer
    /// comparison instead of a full load per call.
    table: arc_swap::Cache<&'a arc_swap::ArcSwap<Vec<Route>>, Arc<Vec<Route>>>,
    /// On the egress listener: the services in the registry.
    services: Option<&'a Services>,
    /// Nothing more is read once the caller has closed or sent something it must not.
    reading: bool,
    /// Once the sidecar drains: the number of the last frame read.
    last_frame: Option<u64>,
}

impl<'a> Reader<'a> {
    fn new(front: &'a ThriftFront, detected: Detected) -> Reader<'a> {
        Reader {
            detected,
            decoder: FrameDecoder::for_transport(detected, front.limits),
            frames: 0,
            table: arc_swap::Cache::new(&front.functions),
            services: front.services.as_deref(),
            reading: true,
            last_frame: None,
        }
    }

    /// The next call in `buf` that can go to an instance. Calls that cannot (not routed,
    /// malformed) are answered in `replies` on the way; `None` when more bytes are needed or
    /// reading has stopped.
    #[inline]
    fn next_call(&mut self, buf: &mut BytesMut, replies: &mut Replies) -> Option<NewCall> {
        while self.reading {
            let mut frame = match self.decoder.decode(buf) {
                Ok(Some(frame)) => {
                    self.frames += 1;
                    frame
                }
                Ok(None) => return None,
                Err(err) => {
                    let kind = if err.is_too_large() {
                        Kind::TooLarge
                    } else {
                        Kind::BadRequest
                    };
                    tracing::debug!(error = %err, "refusing a malformed frame; closing the connection");
                    crate::metrics::global().unrouted("thrift", kind);
                    self.refuse(replies, CallError::new(kind, err.to_string()));
                    return None;
                }
            };
            let oneway = frame.kind() == MessageType::Oneway;
            if frame.kind() != MessageType::Call && !oneway {
                let e = CallError::new(
                    Kind::BadRequest,
                    format!("expected a call, got a {:?} message", frame.kind()),
                );
                // Answered after every earlier call; nothing more is read.
                crate::metrics::global().unrouted("thrift", e.kind);
                replies.answered(rescue(&ReplyTarget::of(&frame), &e));
                self.reading = false;
                return None;
            }
            let unordered = out_of_order(&frame);
            match route(self.table.load(), self.services, &mut frame) {
                Ok(routed) => return Some(prepare(frame, routed, oneway, unordered, replies)),
                Err(e) if e.kind == Kind::BadRequest => {
                    // The caller broke the protocol (a message type its IDL does not declare):
                    // answered after every earlier call, even a oneway one, and nothing more is
                    // read, so no later reply can be taken for this one.
                    tracing::debug!(error = %e, "refusing a call; closing the connection");
                    replies.answered(rescue(&ReplyTarget::of(&frame), &e));
                    self.reading = false;
                    return None;
                }
                Err(e) if oneway => tracing::debug!(error = %e, "oneway call not routed"),
                Err(e) => replies.refused(rescue(&ReplyTarget::of(&frame), &e), unordered),
            }
        }
        None
    }

    /// The sidecar drains: the connection takes no new call (a frame begun is read to its end),
    /// and closes once its calls are answered, so that a client reconnects elsewhere. An idle
    /// connection hears it at the next sweep tick.
    #[inline]
    fn drain_if(&mut self, draining: bool, buf: &BytesMut) {
        if draining && self.reading {
            self.drain(buf);
        }
    }

    #[cold]
    fn drain(&mut self, buf: &BytesMut) {
        let last = *self
            .last_frame
            .get_or_insert(self.frames + u64::from(!buf.is_empty()));
        if buf.is_empty() || self.frames >= last {
            self.reading = false;
        }
    }

    /// The caller closed its side (or the read failed): fine between frames, a `bad-request`
    /// inside one.
    fn closed(&mut self, buf: &BytesMut, replies: &mut Replies) {
        if buf.is_empty() {
            self.reading = false;
            return;
        }
        let e = CallError::new(
            Kind::BadRequest,
            format!(
                "connection closed inside a frame ({} bytes of it received)",
                buf.len()
            ),
        );
        self.refuse(replies, e);
    }

    /// Answers `e` after every earlier call, in the connection's transport; nothing more is read.
    fn refuse(&mut self, replies: &mut Replies, e: CallError) {
        let target = ReplyTarget::for_detected(self.detected);
        replies.answered(rescue(&target, &e));
        self.reading = false;
    }
}

/// The connection's watch on stalls (`workers::Stalls`), with what a Thrift connection does
/// about them.
struct Sweep(Stalls);

impl Sweep {
    fn new(limits: ConnectionLimits, waker: std::task::Waker) -> Sweep {
        Sweep(Stalls::new(limits, waker))
    }

    #[inline]
    fn poll_ticked(&self) -> Poll<()> {
        self.0.poll_ticked()
    }

    /// At a tick: refuses a frame stuck for longer than `header_timeout` (answered
    /// `bad-request`, nothing more read); true when the connection has been idle for longer
    /// than `idle_timeout` and closes.
    fn closes(
        &mut self,
        reader: &mut Reader<'_>,
        buf: &BytesMut,
        in_flight: bool,
        replies: &mut Replies,
    ) -> bool {
        let in_frame = reader.reading && !buf.is_empty();
        match self.0.check(reader.frames, in_frame, in_flight) {
            Stalled::No => false,
            Stalled::Idle => true,
            Stalled::InFrame => {
                let e = CallError::new(
                    Kind::BadRequest,
                    format!(
                        "frame not whole within header_timeout ({} bytes of it received)",
                        buf.len()
                    ),
                );
                reader.refuse(replies, e);
                false
            }
        }
    }
}

/// Whether `frame`'s reply may overtake the replies of earlier calls.
#[inline]
fn out_of_order(frame: &Frame) -> bool {
    frame
        .ttheader()
        .is_some_and(|h| h.flags & TT_OUT_OF_ORDER != 0)
}

/// A routed frame as the call that forwards it: a TTHeader call with a deadline is kept as a
/// frame until it is forwarded, when its RPCTimeout (key 12) is set to what is left of the
/// budget; any other goes as its bytes. A two-way call's reply gets its place in `replies`.
#[inline]
fn prepare(
    frame: Frame,
    routed: Routed,
    oneway: bool,
    unordered: bool,
    replies: &mut Replies,
) -> NewCall {
    let mut answer = (!oneway).then(|| Answer::of(&frame));
    let request = match routed.deadline {
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
    let (ticket, rearm) = match answer {
        Some(answer) => {
            let timeout = match (routed.deadline, routed.budget) {
                (Some(at), Some(budget)) => Some(Timeout {
                    at,
                    budget,
                    function: routed.function.clone(),
                }),
                _ => None,
            };
            let cost = match &request {
                Outgoing::Ready(bytes) => bytes.remaining(),
                Outgoing::Timed(frame) => frame.len(),
            };
            let (ticket, rearm) = replies.track(answer, timeout, unordered, cost);
            (Some(ticket), rearm)
        }
        None => (None, None),
    };
    NewCall {
        routed,
        request,
        oneway,
        ticket,
        rearm,
    }
}

/// What an error reply needs of a request that went upstream: its reply target, whose name is
/// read from the request's head (shared with the forwarded bytes, so nothing is copied).
struct Answer {
    target: ReplyTarget<'static>,
    head: Bytes,
    name: std::ops::Range<usize>,
}

impl Answer {
    #[inline]
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

/// When a running call times out: its deadline, its budget and its function (for the message).
struct Timeout {
    at: Instant,
    budget: Duration,
    function: Arc<Function>,
}

/// A two-way call of a connection, from decode until its reply is written.
struct Pending {
    reply: Option<Reply>,
    /// While the call runs: when it times out, its budget and function (for the message), what
    /// its error reply needs, and how to stop it.
    timeout: Option<Timeout>,
    answer: Option<Answer>,
    abort: Option<AbortHandle>,
    /// The caller allows this call's reply out of order: once known, it goes to the
    /// connection's `loose` replies and this entry keeps an empty one, only to hold its place.
    unordered: bool,
    /// The request's bytes, held while the call runs.
    cost: usize,
}

impl Pending {
    #[inline]
    fn answered(reply: Reply) -> Pending {
        Pending {
            reply: Some(reply),
            timeout: None,
            answer: None,
            abort: None,
            unordered: false,
            cost: 0,
        }
    }

    /// Sets the call's reply: in its place, or (out of order) to go out next.
    #[inline]
    fn set_reply(&mut self, reply: Reply, loose: &mut VecDeque<Reply>) {
        if self.unordered {
            loose.push_back(reply);
            self.reply = Some(empty());
        } else {
            self.reply = Some(reply);
        }
    }
}

/// The replies of a connection: two-way calls by ticket, in request order (the front one's reply
/// goes out next, after `loose` ones), replies that may go out of order, and the reply being
/// written.
struct Replies {
    pending: VecDeque<Pending>,
    loose: VecDeque<Reply>,
    /// The ticket of `pending`'s front.
    next: u64,
    out: Reply,
    /// The earliest deadline of a call still running, which the connection's timer is set to.
    armed: Option<Instant>,
    /// Bytes of the requests of calls running and of replies waiting (not `out`), against the
    /// connection's `connection_buffer`.
    held: usize,
}

impl Default for Replies {
    fn default() -> Replies {
        Replies {
            pending: VecDeque::new(),
            loose: VecDeque::new(),
            next: 0,
            out: empty(),
            armed: None,
            held: 0,
        }
    }
}

impl Replies {
    /// The ticket the next two-way call gets.
    #[inline]
    fn next_ticket(&self) -> u64 {
        self.next + self.pending.len() as u64
    }

    /// Calls and replies held.
    #[inline]
    fn len(&self) -> usize {
        self.pending.len() + self.loose.len()
    }

    /// Nothing is left to answer or write.
    #[inline]
    fn is_done(&self) -> bool {
        self.pending.is_empty() && self.loose.is_empty() && !self.out.has_remaining()
    }

    /// Bytes held: requests of calls running, replies not yet written.
    #[inline]
    fn held(&self) -> usize {
        self.held + self.out.remaining()
    }

    /// A reply known at once, in its place.
    #[inline]
    fn answered(&mut self, reply: Reply) {
        self.held += reply.remaining();
        self.pending.push_back(Pending::answered(reply));
    }

    /// A refusal: in its place, or next when the caller allows it out of order.
    fn refused(&mut self, reply: Reply, unordered: bool) {
        if unordered {
            self.held += reply.remaining();
            self.loose.push_back(reply);
        } else {
            self.answered(reply);
        }
    }

    /// Holds the place of a two-way call about to run; gives its ticket, and the instant to set
    /// the timer to when its deadline is the earliest.
    #[inline]
    fn track(
        &mut self,
        answer: Answer,
        timeout: Option<Timeout>,
        unordered: bool,
        cost: usize,
    ) -> (u64, Option<Instant>) {
        let ticket = self.next_ticket();
        let mut rearm = None;
        if let Some(Timeout { at, .. }) = timeout {
            if self.armed.is_none_or(|a| at < a) {
                self.armed = Some(at);
                rearm = Some(at);
            }
        }
        self.held += cost;
        self.pending.push_back(Pending {
            reply: None,
            timeout,
            answer: Some(answer),
            abort: None,
            unordered,
            cost,
        });
        (ticket, rearm)
    }

    /// How to stop the call with `ticket` at its deadline (a call beyond the connection's lane).
    fn set_abort(&mut self, ticket: u64, abort: AbortHandle) {
        let at = ticket.checked_sub(self.next).map(|i| i as usize);
        if let Some(p) = at.and_then(|i| self.pending.get_mut(i)) {
            p.abort = Some(abort);
        }
    }

    /// Whether the call with `ticket` has its reply.
    #[inline]
    fn is_answered(&self, ticket: u64) -> bool {
        ticket
            .checked_sub(self.next)
            .and_then(|i| self.pending.get(i as usize))
            .is_some_and(|p| p.reply.is_some())
    }

    /// Gives a finished call's result to its ticket, unless that was answered already
    /// (`timeout`).
    #[inline]
    fn settle(&mut self, ticket: Option<u64>, result: Result<Option<Reply>, CallError>) {
        let next = self.next;
        let Some(p) = ticket
            .and_then(|t| t.checked_sub(next))
            .and_then(|i| self.pending.get_mut(i as usize))
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
        self.held = self.held.saturating_sub(p.cost) + reply.remaining();
        p.cost = 0;
        p.set_reply(reply, &mut self.loose);
        p.answer = None;
        p.abort = None;
        p.timeout = None;
    }

    /// Answers `timeout` to every call whose deadline has passed and stops it (a call waiting
    /// in a queue is never forwarded; an instance's late reply is dropped). Re-arms at the
    /// earliest deadline still ahead, which it gives.
    fn expire(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let mut earliest: Option<Instant> = None;
        for p in self.pending.iter_mut() {
            let Some(Timeout {
                at,
                budget,
                function,
            }) = &p.timeout
            else {
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
                    function.name
                ),
            );
            let reply = p.answer.take().map_or_else(empty, |a| a.reply(&e));
            self.held = self.held.saturating_sub(p.cost) + reply.remaining();
            p.cost = 0;
            p.set_reply(reply, &mut self.loose);
            p.timeout = None;
        }
        self.armed = earliest;
        earliest
    }

    /// Moves the replies that may go out now into `out`, one after another, and writes each as
    /// far as the socket takes it without waiting (the usual case: all of it); what it does not
    /// take is written by the connection's loop. An error means the caller is gone.
    #[inline]
    fn write_ready(&mut self, wr: &WriteHalf<'_>) -> std::io::Result<()> {
        while !self.out.has_remaining() {
            if let Some(reply) = self.loose.pop_front() {
                self.held = self.held.saturating_sub(reply.remaining());
                self.out = reply;
            } else if self.pending.front().is_some_and(|p| p.reply.is_some()) {
                let Some(reply) = self.pending.pop_front().and_then(|p| p.reply) else {
                    break;
                };
                self.held = self.held.saturating_sub(reply.remaining());
                self.out = reply;
                self.next += 1;
            } else {
                break;
            }
            if self.out.has_remaining() {
                write_now(wr, &mut self.out)?;
            }
        }
        Ok(())
    }
}

/// Writes what the socket takes of `out` now, without waiting; an error means the caller is gone.
#[inline]
fn write_now(wr: &WriteHalf<'_>, out: &mut Reply) -> std::io::Result<()> {
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
