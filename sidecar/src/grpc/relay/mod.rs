//! fnmesh's gRPC relay, written here rather than on the h2 crate: h2's frame bookkeeping and
//! HPACK re-encoding cost about ten times the instructions of a whole Thrift call (docs/benchmarks.md).
//! One task per caller connection drives the caller's socket and the connections to the
//! instances its streams go to, the way the Thrift path drives its calls: frames are read,
//! header blocks are decoded once and written again with a table-free encoder
//! (`fnmesh_codec::hpack`), DATA payloads are forwarded as they are, and flow control is kept on
//! both sides (a slow reader holds back the writer, and nothing is buffered beyond the windows
//! fnmesh grants). There are no tasks per stream and no locks.
//!
//! An instance connection belongs to the caller connection that opened it; when that one ends,
//! it waits (at most [`MAX_IDLE`] per instance and worker) for the worker's next caller
//! connection. Two caller connections never share one at the same time: that would take
//! coordination between their tasks, which is what this design leaves out.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fnmesh_codec::{
    hpack::{encode_field, Decoder},
    http2::{
        self as frame, flag, kind, reason, setting, FrameError, FrameHead, DEFAULT_MAX_FRAME,
        DEFAULT_WINDOW, FRAME_HEAD_LEN, MAX_WINDOW,
    },
    HTTP2_PREFACE,
};
use futures_util::{stream::FuturesUnordered, StreamExt};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::task::task_tracker::TaskTrackerToken;

mod caller;
mod deadlines;
mod health_check;
mod link;
mod stream;
mod upstream;

use deadlines::Deadlines;
use link::*;
use stream::*;
use upstream::*;

use crate::{
    error::{CallError, Kind},
    governance::{
        outcome::{self, Failure, Outcome, Verdict},
        retry::Attempts,
        services::HOP,
        Function,
    },
    grpc::{self, GrpcFront},
    instances::{
        instance::{self, Open},
        is_local, Instance, Lease, Stream as Socket, EXIT_GRACE,
    },
    lock,
    workers::{Stalled, Stalls},
};

/// The window fnmesh grants each stream, on both sides: what it may hold of one stream.
const STREAM_WINDOW: u32 = 1 << 20;
/// The window fnmesh grants each connection: what it may hold of all of one connection's streams.
const CONN_WINDOW: u32 = 4 << 20;
/// The largest frame and header list fnmesh accepts.
const MAX_FRAME: usize = 16 << 10;
const MAX_LIST: usize = 16 << 10;
/// Streams a caller may have open on one connection.
const MAX_STREAMS: u32 = 4096;
/// Bytes read from one socket before the others get a turn.
const READ_CHUNK: usize = 64 << 10;
/// Unwritten bytes past which a peer is not read from until it reads (its windows bound the
/// DATA; this bounds the rest).
const WRITE_LIMIT: usize = 2 * CONN_WINDOW as usize;
/// Streams a caller may reset before their response beyond those answered, before its
/// connection is closed (HTTP/2 "rapid reset": each such stream costs an instance a request).
const MAX_EARLY_RESETS: u64 = 1000;
/// The largest health check request read (a HealthCheckRequest is a service name).
const MAX_HEALTH_REQUEST: usize = 64 << 10;

/// Maps keyed by stream (or instance) number: a multiplication instead of SipHash, which cost
/// more than a tenth of the relay's own work per call. The keys come from the peers, but a map
/// per connection is bounded by its stream limit, so a peer choosing colliding keys only slows
/// its own connection.
type ById<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A health `Watch` stream: the service it watches and the status it was last sent.
struct Watching {
    service: String,
    sent: u8,
}

/// A stream's way to an instance that is not there yet.
type Queued = Pin<Box<dyn Future<Output = (u32, Result<Lease, CallError>)> + Send>>;
/// A connection being opened to an instance; a failure says why and whether the cause was local
/// (fnmesh's own descriptors or memory).
type Connecting = Pin<Box<dyn Future<Output = Connected> + Send>>;
type Connected = (Arc<Instance>, Result<Socket, (String, bool)>);

/// One caller connection and the instance connections its streams use.
struct Relay<'a> {
    front: &'a GrpcFront,
    caller: Link,
    streams: ById<u32, Stream>,
    /// The highest stream the caller opened.
    last_stream: u32,
    ups: Vec<Up>,
    /// Streams waiting for a slot on an instance (cold start, or every instance busy).
    queued: FuturesUnordered<Queued>,
    /// Instance connections being opened, and the streams waiting for each.
    connecting: FuturesUnordered<Connecting>,
    waiting: ById<u64, Vec<u32>>,
    /// GOAWAY went to the caller (the sidecar drains).
    draining: bool,
    /// Health `Watch` streams, by stream.
    watches: ById<u32, Watching>,
    /// The last request's `:path`.
    path: String,
    /// Streams the caller reset before their response, and streams an instance answered.
    early_resets: u64,
    answered: u64,
    /// Deadlines and attempt deadlines, earliest first. An entry whose stream has ended or moved
    /// on is dropped when it comes up (or when stale entries outnumber the streams).
    timers: Deadlines,
    /// The streams the caller closed last (its RST_STREAM, or its END_STREAM and fnmesh's).
    caller_closed: Recent,
    /// The streams fnmesh reset last while the caller could still send on them: what the
    /// caller sends on them is ignored, as RFC 9113 5.1 asks.
    reset_here: Recent,
    /// Instance stops seen ([`instance::STOPS`]), and whether a connection to a stopping
    /// instance still carries streams (it closes once they are done).
    seen_stops: u64,
    stopping_ups: bool,
}

/// The last few stream ids closed one way or another (see [`Relay::caller_closed`] and
/// [`Relay::reset_here`]).
#[derive(Default)]
struct Recent {
    ids: [u32; 16],
    next: usize,
}

impl Recent {
    fn push(&mut self, id: u32) {
        self.ids[self.next % self.ids.len()] = id;
        self.next = self.next.wrapping_add(1);
    }

    fn contains(&self, id: u32) -> bool {
        id != 0 && self.ids.contains(&id)
    }

    /// Whether `id` is there; it is forgotten (once answered STREAM_CLOSED, the stream was reset
    /// by fnmesh, and later frames are ignored).
    fn take(&mut self, id: u32) -> bool {
        match self.ids.iter_mut().find(|x| **x == id && id != 0) {
            Some(x) => {
                *x = 0;
                true
            }
            None => false,
        }
    }
}

/// Serves one HTTP/2 connection whose preface (`head`) detection has read.
pub async fn serve(sock: TcpStream, head: BytesMut, front: Arc<GrpcFront>) {
    let _ = sock.set_nodelay(true);
    let _open = front.drain.track();
    let mut relay = Relay::new(&front, Link::new(sock.into(), head));
    // The preface is what detection saw; what follows it is frames.
    if relay.caller.rbuf.len() < HTTP2_PREFACE.len() {
        return;
    }
    relay.caller.rbuf.advance(HTTP2_PREFACE.len());
    relay.caller.greet(false);
    let waker = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
    let mut triggers = Triggers::new(&front, waker);
    while relay.turn() {
        triggers.arm(relay.next_timer(), !relay.watches.is_empty());
        let events = std::future::poll_fn(|cx| relay.poll(&mut triggers, cx)).await;
        relay.handle(events, &mut triggers);
    }
    relay.close();
}

/// What a relay's task waits on besides its sockets: the earliest deadline, the sidecar's drain,
/// and reloads (which change what health `Watch` streams report).
struct Triggers {
    timer: Pin<Box<tokio::time::Sleep>>,
    armed: Option<Instant>,
    /// Resolves once the sidecar drains (at once for a connection opened while it does).
    drained: Pin<Box<dyn Future<Output = ()> + Send>>,
    reloads: tokio::sync::watch::Receiver<u64>,
    /// Waits for the next reload while the connection has `Watch` streams.
    reloaded: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The caller's stalls: a frame not whole within `header_timeout`, no stream for
    /// `idle_timeout`.
    stalls: Stalls,
    /// Wakes the task when an instance starts stopping (see [`Relay::leave_stopping`]).
    stopping: Pin<Box<tokio::sync::futures::Notified<'static>>>,
}

impl Triggers {
    fn new(front: &GrpcFront, waker: std::task::Waker) -> Triggers {
        Triggers {
            stalls: Stalls::new(front.connections, waker),
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: None,
            drained: Box::pin(front.drain.started()),
            reloads: front.reloads.subscribe(),
            reloaded: None,
            stopping: Self::stops(),
        }
    }

    /// The next instance stop, listened for from now on.
    fn stops() -> Pin<Box<tokio::sync::futures::Notified<'static>>> {
        let mut next = Box::pin(instance::STOPPING.notified());
        next.as_mut().enable();
        next
    }

    /// Sets the timer to `next`, and listens for reloads while `watching`.
    fn arm(&mut self, next: Option<Instant>, watching: bool) {
        if !watching {
            self.reloaded = None;
        } else if self.reloaded.is_none() {
            let mut rx = self.reloads.clone();
            self.reloaded = Some(Box::pin(async move {
                let _ = rx.changed().await;
            }));
        }
        if next != self.armed {
            if let Some(at) = next {
                self.timer.as_mut().reset(at);
            }
            self.armed = next;
        }
    }
}

/// What woke a relay's task, besides its sockets (whose frames are read on the next turn).
#[derive(Default)]
struct Events {
    lease: Option<(u32, Result<Lease, CallError>)>,
    connected: Option<Connected>,
    expired: bool,
    drain: bool,
    reload: bool,
    swept: bool,
    stops: bool,
}

impl<'a> Relay<'a> {
    fn new(front: &'a GrpcFront, caller: Link) -> Relay<'a> {
        Relay {
            front,
            caller,
            streams: ById::default(),
            last_stream: 0,
            ups: Vec::new(),
            queued: FuturesUnordered::new(),
            connecting: FuturesUnordered::new(),
            waiting: ById::default(),
            draining: false,
            watches: ById::default(),
            path: String::new(),
            early_resets: 0,
            answered: 0,
            timers: Deadlines::default(),
            caller_closed: Recent::default(),
            reset_here: Recent::default(),
            seen_stops: instance::STOPS.load(std::sync::atomic::Ordering::Relaxed),
            stopping_ups: false,
        }
    }
}

impl Relay<'_> {
    /// Handles every frame read on every connection and writes what that produced; false once
    /// the caller's connection is done.
    fn turn(&mut self) -> bool {
        if let Err(e) = self.caller_frames() {
            tracing::debug!(error = %e, "caller broke HTTP/2; closing the connection");
            self.caller.goaway(self.last_stream, e.reason, e.what);
            self.caller.closed_after_flush();
            return false;
        }
        for i in 0..self.ups.len() {
            self.up_frames(i);
        }
        let stops = instance::STOPS.load(std::sync::atomic::Ordering::Relaxed);
        if stops != self.seen_stops || self.stopping_ups {
            self.seen_stops = stops;
            self.leave_stopping();
        }
        self.flush();
        if self.caller.closed {
            return false;
        }
        let ending = self.draining || self.caller.going_away;
        !(ending && self.streams.is_empty() && self.caller.wbuf.is_empty())
    }

    /// Polls every socket and signal once; ready when any made progress.
    fn poll(&mut self, triggers: &mut Triggers, cx: &mut Context<'_>) -> Poll<Events> {
        let mut events = Events::default();
        // A peer that does not read what it is sent is not read from either: its PINGs and
        // SETTINGS (each answered) cannot grow the buffer without bound.
        let mut ready = self.caller.wbuf.len() < WRITE_LIMIT && self.caller.poll_read(cx);
        ready |= self.caller.poll_write(cx);
        for up in self.ups.iter_mut() {
            ready |= up.link.wbuf.len() < WRITE_LIMIT && up.link.poll_read(cx);
            ready |= up.link.poll_write(cx);
        }
        if !self.queued.is_empty() {
            if let Poll::Ready(Some(l)) = self.queued.poll_next_unpin(cx) {
                events.lease = Some(l);
            }
        }
        if !self.connecting.is_empty() {
            if let Poll::Ready(Some(c)) = self.connecting.poll_next_unpin(cx) {
                events.connected = Some(c);
            }
        }
        events.expired = triggers.armed.is_some() && triggers.timer.as_mut().poll(cx).is_ready();
        events.drain = !self.draining && triggers.drained.as_mut().poll(cx).is_ready();
        events.reload = triggers
            .reloaded
            .as_mut()
            .is_some_and(|r| r.as_mut().poll(cx).is_ready());
        events.swept = triggers.stalls.poll_ticked().is_ready();
        // Only a relay with nothing in flight waits to hear of stops (a poll of the shared
        // notification takes its lock); a busy one looks at `instance::STOPS` every turn.
        events.stops = self.streams.is_empty()
            && !self.ups.is_empty()
            && triggers.stopping.as_mut().poll(cx).is_ready();
        ready |= events.lease.is_some() || events.connected.is_some() || events.swept;
        ready |= events.expired || events.drain || events.reload || events.stops;
        if ready {
            Poll::Ready(events)
        } else {
            Poll::Pending
        }
    }

    fn handle(&mut self, events: Events, triggers: &mut Triggers) {
        if let Some((stream, result)) = events.lease {
            self.leased(stream, result);
        }
        if let Some((instance, result)) = events.connected {
            self.connected(instance, result);
        }
        if events.expired {
            triggers.armed = None;
            self.expire();
        }
        if events.reload {
            triggers.reloaded = None;
            triggers.reloads.borrow_and_update();
            self.watch_update();
        }
        if events.swept {
            self.sweep(&mut triggers.stalls);
        }
        if events.stops {
            // The turn that follows looks at the connections; the next stop wakes the task.
            triggers.stopping = Triggers::stops();
        }
        if events.drain && !self.draining {
            self.draining = true;
            self.caller
                .goaway(self.last_stream, reason::NO_ERROR, "draining");
            self.watch_update();
        }
    }

    /// At a sweep tick: a caller stuck in a frame for `header_timeout` gets GOAWAY
    /// PROTOCOL_ERROR, one with no stream for `idle_timeout` GOAWAY NO_ERROR; either closes.
    fn sweep(&mut self, stalls: &mut Stalls) {
        let in_frame = !self.caller.rbuf.is_empty() || self.caller.block.is_some();
        let in_flight = !self.streams.is_empty();
        let (code, why) = match stalls.check(self.caller.frames, in_frame, in_flight) {
            Stalled::No => return,
            Stalled::InFrame => (
                reason::PROTOCOL_ERROR,
                "frame not whole within header_timeout",
            ),
            Stalled::Idle => (reason::NO_ERROR, "idle_timeout"),
        };
        tracing::debug!(why, "closing an HTTP/2 connection");
        self.caller.goaway(self.last_stream, code, why);
        self.caller.closed_after_flush();
    }

    /// The caller's connection has ended: streams still open end with it (the instances see
    /// them reset), and instance connections in good order wait for this worker's next caller
    /// connection.
    fn close(mut self) {
        self.caller.flush();
        let open: Vec<u32> = self.streams.keys().copied().collect();
        for id in open {
            self.cancel_up(id, reason::CANCEL);
            self.streams.remove(&id);
        }
        for up in self.ups.drain(..) {
            park(up);
        }
    }
    /// Writes what every socket takes now; data held back for a peer that was not reading goes
    /// on once it has read half of what waited.
    fn flush(&mut self) {
        self.caller.flush();
        for up in self.ups.iter_mut() {
            up.link.flush();
        }
        if self.caller.held_back && self.caller.wbuf.len() < WRITE_LIMIT / 2 {
            self.caller.held_back = false;
            let waiting = self.streams.iter().filter(|(_, s)| !s.to_caller.is_empty());
            let ids: Vec<u32> = waiting.map(|(id, _)| *id).collect();
            for id in ids {
                self.pump_caller(id);
            }
        }
        for i in 0..self.ups.len() {
            let link = &mut self.ups[i].link;
            if link.held_back && link.wbuf.len() < WRITE_LIMIT / 2 {
                link.held_back = false;
                let ids: Vec<u32> = self.ups[i].streams.values().copied().collect();
                for id in ids {
                    self.pump_up(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header block larger than the peer's frames goes as HEADERS and CONTINUATIONs: only the
    /// last has END_HEADERS, only the first END_STREAM, and together they hold the block.
    #[test]
    fn large_header_blocks_are_split_into_continuations() {
        let block: Vec<u8> = (0..25u8).collect();
        let mut out = BytesMut::new();
        write_headers(&mut out, 3, &block, true, 10);
        let mut frames = Vec::new();
        while let Some(head) = FrameHead::parse(&out) {
            out.advance(FRAME_HEAD_LEN);
            frames.push((head, out.split_to(head.len)));
        }
        let kinds: Vec<(u8, u8, usize)> = frames
            .iter()
            .map(|(h, _)| (h.kind, h.flags, h.len))
            .collect();
        assert_eq!(
            kinds,
            [
                (kind::HEADERS, flag::END_STREAM, 10),
                (kind::CONTINUATION, 0, 10),
                (kind::CONTINUATION, flag::END_HEADERS, 5),
            ]
        );
        assert!(frames.iter().all(|(h, _)| h.stream == 3));
        let joined: Vec<u8> = frames.iter().flat_map(|(_, p)| p.to_vec()).collect();
        assert_eq!(joined, block);
        // One that fits is one frame.
        let mut out = BytesMut::new();
        write_headers(&mut out, 5, &block, false, 16_384);
        let head = FrameHead::parse(&out).unwrap();
        assert_eq!(
            (head.kind, head.flags, head.len),
            (kind::HEADERS, flag::END_HEADERS, 25)
        );
    }

    /// Deadlines come out earliest first; entries of streams that ended are dropped as they
    /// come up, and a heap of mostly such entries is rebuilt from the live streams.
    #[test]
    fn deadlines_skip_ended_streams_and_compact() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut d = Deadlines::default();
        for id in 0..1000u32 {
            d.push(ms(u64::from(1000 - id)), id);
        }
        // Only streams 10 and 500 are live: 500's deadline (500 ms) is the earlier.
        let live =
            |at: Instant, id: u32| (id == 10 && at == ms(990)) || (id == 500 && at == ms(500));
        assert_eq!(d.next(live), Some(ms(500)));
        assert!(
            d.len() > 2 * 2 + 64,
            "entries past the live one stay until compacted"
        );
        d.compact(2, || [(ms(990), 10u32), (ms(500), 500)].into_iter());
        assert_eq!(d.len(), 2);
        // Due entries come out in order; none before its time.
        assert_eq!(d.pop_due(ms(499)), None);
        assert_eq!(d.pop_due(ms(995)), Some((ms(500), 500)));
        assert_eq!(d.pop_due(ms(995)), Some((ms(990), 10)));
        assert_eq!(d.pop_due(ms(2000)), None);
        // A small heap is left as it is.
        d.push(ms(1), 1);
        d.compact(0, std::iter::empty);
        assert_eq!(d.len(), 1);
    }

    /// fnmesh's trailers-only answer: status 200, gRPC content type, the status of docs/design.md's
    /// table and a percent-encoded message.
    #[test]
    fn errors_are_trailers_only_responses() {
        let e = CallError::new(Kind::Timeout, "function f: deadline passed, 100%");
        let block = error_block(&e);
        let mut d = Decoder::new(4096, 1 << 16);
        let mut fields = Vec::new();
        d.decode(&block, |f| {
            fields.push((
                String::from_utf8(f.name.to_vec()).unwrap(),
                String::from_utf8(f.value.to_vec()).unwrap(),
            ))
        })
        .unwrap();
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get(":status"), Some("200"));
        assert_eq!(get("content-type"), Some("application/grpc"));
        assert_eq!(get("grpc-status"), Some("4"));
        assert_eq!(get("fnmesh-error"), Some("timeout"));
        let message = get("grpc-message").unwrap();
        assert!(message.ends_with("deadline passed, 100%25"), "{message}");
    }
}
