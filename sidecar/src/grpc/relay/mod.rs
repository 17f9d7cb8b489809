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

use crate::{
    active::Active,
    error::{CallError, Kind},
    governance::{
        outcome::{self, Failure, Verdict},
        retry::Attempts,
        Function,
    },
    grpc::{self, GrpcFront},
    instances::{Instance, Lease},
    lock,
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

/// One side of the relay: a socket with its buffers and HTTP/2 connection state.
struct Link {
    sock: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Decodes the header blocks this peer sends.
    decoder: Decoder,
    /// What we may still send on the connection (the peer's connection window).
    send_window: i64,
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE and SETTINGS_MAX_FRAME_SIZE.
    peer_window: u32,
    peer_max_frame: usize,
    /// Received DATA bytes passed on (or dropped) but not yet given back to the peer.
    unacked: u32,
    /// What the peer may still send on the connection: DATA past it breaks flow control.
    recv_window: i64,
    /// A header block being put together from HEADERS and CONTINUATION frames: its stream, its
    /// END_STREAM flag, and the fragments so far.
    block: Option<(u32, bool, Vec<u8>)>,
    /// The peer closed, or the connection failed.
    closed: bool,
    /// The peer sent GOAWAY: no new streams.
    going_away: bool,
}

impl Link {
    fn new(sock: TcpStream, rbuf: BytesMut) -> Link {
        Link {
            sock,
            rbuf,
            wbuf: BytesMut::with_capacity(16 << 10),
            decoder: Decoder::new(fnmesh_codec::hpack::DEFAULT_TABLE_SIZE, MAX_LIST),
            send_window: i64::from(DEFAULT_WINDOW),
            peer_window: DEFAULT_WINDOW,
            peer_max_frame: DEFAULT_MAX_FRAME,
            unacked: 0,
            recv_window: i64::from(DEFAULT_WINDOW),
            block: None,
            closed: false,
            going_away: false,
        }
    }

    /// Our SETTINGS and the connection window beyond the default.
    fn greet(&mut self, client: bool) {
        let mut settings = vec![
            (setting::INITIAL_WINDOW_SIZE, STREAM_WINDOW),
            (setting::MAX_FRAME_SIZE, MAX_FRAME as u32),
            (setting::MAX_HEADER_LIST_SIZE, MAX_LIST as u32),
        ];
        if client {
            settings.push((setting::ENABLE_PUSH, 0));
        } else {
            settings.push((setting::MAX_CONCURRENT_STREAMS, MAX_STREAMS));
        }
        frame::write_settings(&mut self.wbuf, &settings, false);
        frame::write_window_update(&mut self.wbuf, 0, CONN_WINDOW - DEFAULT_WINDOW);
        self.recv_window = i64::from(CONN_WINDOW);
    }

    /// Counts a DATA frame against the connection's window: a peer that ignores it is cut off
    /// (without the check it could fill fnmesh's memory).
    fn received(&mut self, len: usize) -> Result<(), FrameError> {
        self.recv_window -= len as i64;
        if self.recv_window < 0 {
            return Err(FrameError {
                kind: kind::DATA,
                what: "DATA beyond the connection's flow-control window",
                reason: reason::FLOW_CONTROL_ERROR,
                stream: false,
            });
        }
        Ok(())
    }

    /// Gives `n` received bytes back to the peer's connection window, in batches.
    fn credit(&mut self, n: usize) {
        self.unacked += n as u32;
        if self.unacked >= CONN_WINDOW / 4 {
            frame::write_window_update(&mut self.wbuf, 0, self.unacked);
            self.recv_window += i64::from(self.unacked);
            self.unacked = 0;
        }
    }

    /// Writes what the socket takes now.
    fn flush(&mut self) {
        while !self.wbuf.is_empty() && !self.closed {
            match self.sock.try_write(&self.wbuf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => self.closed = true,
            }
        }
    }

    /// Reads what has arrived (up to [`READ_CHUNK`]); registers for more. True when it read or
    /// the connection ended.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closed {
            return false;
        }
        let start = self.rbuf.len();
        loop {
            match self.sock.poll_read_ready(cx) {
                Poll::Pending => return self.rbuf.len() > start,
                Poll::Ready(Err(_)) => {
                    self.closed = true;
                    return true;
                }
                Poll::Ready(Ok(())) => {}
            }
            self.rbuf.reserve(16 << 10);
            match self.sock.try_read_buf(&mut self.rbuf) {
                Ok(0) => {
                    self.closed = true;
                    return true;
                }
                Ok(_) if self.rbuf.len() - start >= READ_CHUNK => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.closed = true;
                    return true;
                }
            }
        }
    }

    /// Registers for writability while there is something left to write.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> bool {
        !self.wbuf.is_empty()
            && !self.closed
            && matches!(self.sock.poll_write_ready(cx), Poll::Ready(_))
    }

    /// The next whole frame, when there is one.
    fn next_frame(&mut self) -> Result<Option<(FrameHead, Bytes)>, FrameError> {
        let Some(head) = FrameHead::parse(&self.rbuf) else {
            return Ok(None);
        };
        head.check(MAX_FRAME)?;
        if self.rbuf.len() < FRAME_HEAD_LEN + head.len {
            return Ok(None);
        }
        if self.block.is_some() && head.kind != kind::CONTINUATION {
            return Err(FrameError {
                kind: head.kind,
                what: "a frame inside a header block",
                reason: reason::PROTOCOL_ERROR,
                stream: false,
            });
        }
        self.rbuf.advance(FRAME_HEAD_LEN);
        Ok(Some((head, self.rbuf.split_to(head.len).freeze())))
    }

    /// Answers a PING.
    fn ping(&mut self, head: &FrameHead, payload: &[u8]) -> Result<(), FrameError> {
        let data = frame::ping(head, payload)?;
        if !head.is(flag::ACK) {
            frame::write_ping(&mut self.wbuf, data, true);
        }
        Ok(())
    }

    /// Applies a SETTINGS frame; gives the change of the initial window, for open streams.
    fn settings(&mut self, head: &FrameHead, payload: &[u8]) -> Result<i64, FrameError> {
        if head.is(flag::ACK) {
            return frame::settings(head, payload, |_, _| ()).map(|()| 0);
        }
        let mut delta = 0i64;
        let mut bad = None;
        frame::settings(head, payload, |id, value| match id {
            setting::INITIAL_WINDOW_SIZE if value <= MAX_WINDOW => {
                delta += i64::from(value) - i64::from(self.peer_window);
                self.peer_window = value;
            }
            setting::INITIAL_WINDOW_SIZE => bad = Some("initial window over 2^31-1"),
            setting::MAX_FRAME_SIZE if (DEFAULT_MAX_FRAME..1 << 24).contains(&(value as usize)) => {
                self.peer_max_frame = value as usize;
            }
            setting::MAX_FRAME_SIZE => bad = Some("max frame size out of range"),
            _ => {}
        })?;
        if let Some(what) = bad {
            return Err(FrameError {
                kind: kind::SETTINGS,
                what,
                reason: reason::PROTOCOL_ERROR,
                stream: false,
            });
        }
        frame::write_settings(&mut self.wbuf, &[], true);
        Ok(delta)
    }

    /// Collects a header block; gives (stream, END_STREAM, block) once it is whole.
    fn header_fragment(
        &mut self,
        head: &FrameHead,
        payload: &Bytes,
    ) -> Result<Option<(u32, bool, Block)>, FrameError> {
        let bad = |what| FrameError {
            kind: head.kind,
            what,
            reason: reason::PROTOCOL_ERROR,
            stream: false,
        };
        match (head.kind, self.block.as_mut()) {
            (kind::HEADERS, None) => {
                let fragment = frame::header_block(head, payload)?;
                if head.stream == 0 {
                    return Err(bad("HEADERS on stream 0"));
                }
                let end = head.is(flag::END_STREAM);
                if head.is(flag::END_HEADERS) {
                    // The usual case: the block is the frame's, used where it lies.
                    let block = Block::Frame(payload.slice_ref(fragment));
                    return Ok(Some((head.stream, end, block)));
                }
                self.block = Some((head.stream, end, fragment.to_vec()));
            }
            (kind::CONTINUATION, Some((stream, _, block))) if *stream == head.stream => {
                if block.len() + payload.len() > MAX_LIST * 2 {
                    return Err(bad("header block too large"));
                }
                block.extend_from_slice(payload);
            }
            _ => {
                return Err(bad(
                    "CONTINUATION out of place, or a frame inside a header block",
                ))
            }
        }
        if head.is(flag::END_HEADERS) {
            return Ok(self
                .block
                .take()
                .map(|(id, end, b)| (id, end, Block::Joined(b))));
        }
        Ok(None)
    }

    fn goaway(&mut self, last: u32, code: u32, why: &str) {
        frame::write_goaway(&mut self.wbuf, last, code, why.as_bytes());
    }
}

/// A whole header block: one frame's, or joined from CONTINUATIONs.
enum Block {
    Frame(Bytes),
    Joined(Vec<u8>),
}

impl std::ops::Deref for Block {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Block::Frame(b) => b,
            Block::Joined(v) => v,
        }
    }
}

/// Writes a header block as HEADERS (and CONTINUATIONs when it is larger than a frame).
fn write_headers(dst: &mut BytesMut, stream: u32, block: &[u8], end_stream: bool, max: usize) {
    let mut chunks = block.chunks(max.max(1));
    let first = chunks.next().unwrap_or(&[]);
    let more = block.len() > max;
    FrameHead {
        len: first.len(),
        kind: kind::HEADERS,
        flags: if end_stream { flag::END_STREAM } else { 0 }
            | if more { 0 } else { flag::END_HEADERS },
        stream,
    }
    .write(dst);
    dst.put_slice(first);
    let mut rest = chunks.peekable();
    while let Some(chunk) = rest.next() {
        FrameHead {
            len: chunk.len(),
            kind: kind::CONTINUATION,
            flags: if rest.peek().is_none() {
                flag::END_HEADERS
            } else {
                0
            },
            stream,
        }
        .write(dst);
        dst.put_slice(chunk);
    }
}

/// Writes what the stream's and the connection's windows allow of `queue` as DATA on `stream`,
/// in frames the peer accepts; the last piece carries END_STREAM when `end` and it empties the
/// queue. Gives the bytes written and whether END_STREAM went.
fn send_within(
    queue: &mut VecDeque<Bytes>,
    window: &mut i64,
    link: &mut Link,
    stream: u32,
    end: bool,
) -> (usize, bool) {
    let mut sent = 0usize;
    let mut ended = false;
    while let Some(front) = queue.front_mut() {
        let room = (*window).min(link.send_window).max(0) as usize;
        let n = front.len().min(room).min(link.peer_max_frame);
        if n == 0 {
            break;
        }
        let chunk = front.split_to(n);
        if front.is_empty() {
            queue.pop_front();
        }
        ended = end && queue.is_empty();
        write_data(&mut link.wbuf, stream, &chunk, ended);
        *window -= n as i64;
        link.send_window -= n as i64;
        sent += n;
    }
    (sent, ended)
}

fn write_data(dst: &mut BytesMut, stream: u32, data: &[u8], end_stream: bool) {
    FrameHead {
        len: data.len(),
        kind: kind::DATA,
        flags: if end_stream { flag::END_STREAM } else { 0 },
        stream,
    }
    .write(dst);
    dst.put_slice(data);
}

/// A trailers-only response for `e` (DESIGN.md's table), as a header block.
fn error_block(e: &CallError) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    encode_field(&mut b, b":status", b"200", false);
    encode_field(&mut b, b"content-type", b"application/grpc", false);
    status_fields(&mut b, e.kind.grpc_status(), &e.to_string());
    encode_field(&mut b, b"fnmesh-error", e.kind.as_str().as_bytes(), false);
    b
}

/// `grpc-status` and `grpc-message` (percent-encoded as gRPC asks).
fn status_fields(b: &mut Vec<u8>, status: u16, text: &str) {
    encode_field(b, b"grpc-status", status.to_string().as_bytes(), false);
    let mut message = Vec::with_capacity(text.len());
    for c in text.bytes() {
        if (0x20..0x7f).contains(&c) && c != b'%' {
            message.push(c);
        } else {
            message.extend_from_slice(format!("%{c:02X}").as_bytes());
        }
    }
    encode_field(b, b"grpc-message", &message, false);
}

/// Deadlines of a connection's streams, earliest first. Entries are not removed when their
/// stream ends or moves on: [`Deadlines::next`] drops those it meets, and
/// [`Deadlines::compact`] rebuilds the heap once they outnumber the live streams.
#[derive(Default)]
struct Deadlines(std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u32)>>);

impl Deadlines {
    fn push(&mut self, at: Instant, stream: u32) {
        self.0.push(std::cmp::Reverse((at, stream)));
    }

    /// The earliest entry `live` accepts (as deadline, stream); the ones before it are dropped.
    fn next(&mut self, live: impl Fn(Instant, u32) -> bool) -> Option<Instant> {
        while let Some(&std::cmp::Reverse((at, id))) = self.0.peek() {
            if live(at, id) {
                return Some(at);
            }
            self.0.pop();
        }
        None
    }

    /// The earliest entry due by `now`, taken out.
    fn pop_due(&mut self, now: Instant) -> Option<(Instant, u32)> {
        let &std::cmp::Reverse((at, _)) = self.0.peek()?;
        (at <= now)
            .then(|| self.0.pop().map(|std::cmp::Reverse(e)| e))
            .flatten()
    }

    /// Rebuilds the heap from `live` (every deadline still waited for) when it holds more than
    /// twice the `streams` there are (plus a little).
    fn compact<I: Iterator<Item = (Instant, u32)>>(
        &mut self,
        streams: usize,
        live: impl FnOnce() -> I,
    ) {
        if self.0.len() > 2 * streams + 64 {
            self.0 = live().map(std::cmp::Reverse).collect();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Where a caller's stream stands.
struct Stream {
    /// The instance connection and its stream, once the call has one.
    up: Option<(usize, u32)>,
    /// The request's header block, encoded for the instance (without `grpc-timeout`), until
    /// it is sent.
    request: Option<Vec<u8>>,
    /// Request data not yet sent to the instance, and whether the caller ended its side.
    to_up: VecDeque<Bytes>,
    caller_done: bool,
    /// END_STREAM went to the instance.
    up_done: bool,
    /// Response data not yet sent to the caller (its window was full), then the trailers.
    to_caller: VecDeque<Bytes>,
    trailers: Option<Vec<u8>>,
    /// Response headers went to the caller.
    answered: bool,
    /// What we may still send on the stream, to the caller and to the instance.
    send_caller: i64,
    send_up: i64,
    /// Bytes taken from each side and passed on, not yet given back to that side's stream window.
    unacked_caller: u32,
    unacked_up: u32,
    /// What each side may still send on the stream.
    recv_caller: i64,
    recv_up: i64,
    lease: Option<Lease>,
    deadline: Option<Instant>,
    budget: Duration,
    /// The function, once routed.
    function: Option<Arc<Function>>,
    verdict: Option<Verdict>,
    /// A health check: the request's bytes, answered here; `watch` for `Watch`.
    health: Option<Vec<u8>>,
    watch: bool,
    /// Retries: the function's pool, the policy, attempts made, whether the method may be sent
    /// again once an instance got it, and a copy of the request while it may be.
    retry: Option<Retrying>,
    /// This attempt's share of the deadline, when a later attempt may follow a timeout.
    attempt_deadline: Option<Instant>,
    _active: Option<Active>,
}

/// A stream's retry state: the attempts (`governance::retry`), and a copy of the request's
/// header block (without `grpc-timeout`) and data so far while it may be sent again after an
/// instance got it, with its size; the copy is dropped once over [`REPLAY_LIMIT`] or once the
/// response starts.
struct Retrying {
    attempts: Attempts,
    copy: Option<(Vec<u8>, Vec<Bytes>, usize)>,
}

/// The most of a request kept for sending it again.
const REPLAY_LIMIT: usize = 1 << 20;

/// A stream's way to an instance that is not there yet.
type Pending = Pin<Box<dyn Future<Output = (u32, Result<Lease, CallError>)> + Send>>;
type Connecting = Pin<Box<dyn Future<Output = (Arc<Instance>, Result<TcpStream, String>)> + Send>>;

/// One caller connection and the instance connections its streams use.
struct Relay<'a> {
    front: &'a GrpcFront,
    caller: Link,
    streams: ById<u32, Stream>,
    /// The highest stream the caller opened.
    last_stream: u32,
    ups: Vec<Up>,
    /// Streams waiting for a slot on an instance (cold start, or every instance busy).
    queued: FuturesUnordered<Pending>,
    /// Instance connections being opened, and the streams waiting for each.
    connecting: FuturesUnordered<Connecting>,
    waiting: ById<u64, Vec<u32>>,
    /// GOAWAY went to the caller (the sidecar drains).
    draining: bool,
    /// Health `Watch` streams: the service each watches and the status it was last sent.
    watches: ById<u32, (String, u8)>,
    /// The last request's `:path`.
    path: String,
    /// Streams the caller reset before their response, and streams answered.
    early_resets: u64,
    answered: u64,
    /// Deadlines and attempt deadlines, earliest first. An entry whose stream has ended or moved
    /// on is dropped when it comes up (or when stale entries outnumber the streams).
    timers: Deadlines,
}

/// A connection to an instance.
struct Up {
    link: Link,
    instance: Arc<Instance>,
    next_stream: u32,
    /// Its streams: instance stream -> caller stream.
    streams: ById<u32, u32>,
    /// The instance has sent a frame: before that, a request on the connection cannot have
    /// been processed (a server's first frame is its SETTINGS).
    heard: bool,
}

pub async fn serve(sock: TcpStream, head: BytesMut, front: Arc<GrpcFront>) {
    let _ = sock.set_nodelay(true);
    let _open = Active::new(&front.connections);
    // Resolves once the sidecar drains (at once for a connection opened while it does).
    let mut draining = front.draining.subscribe();
    let mut drained = Box::pin(async move {
        while !*draining.borrow_and_update() {
            if draining.changed().await.is_err() {
                return;
            }
        }
    });
    let mut relay = Relay {
        front: &front,
        caller: Link::new(sock, head),
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
    };
    // Reloads change what health `Watch` streams report.
    let mut reloads = front.reloads.subscribe();
    let mut reloaded: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    // The preface is what detection saw; what follows it is frames.
    if relay.caller.rbuf.len() < HTTP2_PREFACE.len() {
        return;
    }
    relay.caller.rbuf.advance(HTTP2_PREFACE.len());
    relay.caller.greet(false);
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        if let Err(e) = relay.caller_frames() {
            tracing::debug!(error = %e, "caller broke HTTP/2; closing the connection");
            relay.caller.goaway(relay.last_stream, e.reason, e.what);
            relay.caller.closed_after_flush();
            break;
        }
        for i in 0..relay.ups.len() {
            relay.up_frames(i);
        }
        relay.flush();
        if relay.caller.closed {
            break;
        }
        if (relay.draining || relay.caller.going_away)
            && relay.streams.is_empty()
            && relay.caller.wbuf.is_empty()
        {
            break;
        }
        let next = relay.next_timer();
        if relay.watches.is_empty() {
            reloaded = None;
        } else if reloaded.is_none() {
            let mut rx = reloads.clone();
            reloaded = Some(Box::pin(async move {
                let _ = rx.changed().await;
            }));
        }
        let mut reload = false;
        if next != armed {
            if let Some(at) = next {
                timer.as_mut().reset(at);
            }
            armed = next;
        }
        let mut lease = None;
        let mut connected = None;
        let mut expired = false;
        let mut drain = false;
        std::future::poll_fn(|cx| {
            // A peer that does not read what it is sent is not read from either: its PINGs and
            // SETTINGS (each answered) cannot grow the buffer without bound.
            let mut ready = relay.caller.wbuf.len() < WRITE_LIMIT && relay.caller.poll_read(cx);
            ready |= relay.caller.poll_write(cx);
            for up in relay.ups.iter_mut() {
                ready |= up.link.wbuf.len() < WRITE_LIMIT && up.link.poll_read(cx);
                ready |= up.link.poll_write(cx);
            }
            if !relay.queued.is_empty() {
                if let Poll::Ready(Some(l)) = relay.queued.poll_next_unpin(cx) {
                    lease = Some(l);
                    ready = true;
                }
            }
            if !relay.connecting.is_empty() {
                if let Poll::Ready(Some(c)) = relay.connecting.poll_next_unpin(cx) {
                    connected = Some(c);
                    ready = true;
                }
            }
            if armed.is_some() && timer.as_mut().poll(cx).is_ready() {
                expired = true;
                ready = true;
            }
            if !relay.draining && drained.as_mut().poll(cx).is_ready() {
                drain = true;
                ready = true;
            }
            if let Some(r) = reloaded.as_mut() {
                if r.as_mut().poll(cx).is_ready() {
                    reload = true;
                    ready = true;
                }
            }
            if ready {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        if let Some((stream, result)) = lease {
            relay.leased(stream, result);
        }
        if let Some((instance, result)) = connected {
            relay.connected(instance, result);
        }
        if expired {
            armed = None;
            relay.expire();
        }
        if reload {
            reloaded = None;
            reloads.borrow_and_update();
            relay.watch_update();
        }
        if drain && !relay.draining {
            relay.draining = true;
            relay
                .caller
                .goaway(relay.last_stream, reason::NO_ERROR, "draining");
            relay.watch_update();
        }
    }
    relay.caller.flush();
    // Streams still open end with the connection: the instances see them reset.
    let open: Vec<u32> = relay.streams.keys().copied().collect();
    for id in open {
        relay.cancel_up(id, reason::CANCEL);
        relay.streams.remove(&id);
    }
    // Instance connections in good order wait for this worker's next caller connection.
    for mut up in relay.ups.drain(..) {
        up.link.flush();
        let reusable = !up.link.closed
            && !up.link.going_away
            && up.streams.is_empty()
            && up.link.wbuf.is_empty()
            && up.link.block.is_none()
            && up.next_stream < MAX_STREAM_ID;
        if reusable {
            let instance = up.instance.clone();
            let mut idle = lock(instance.idle::<Up>());
            if idle.len() < MAX_IDLE {
                idle.push(up);
                continue;
            }
        }
        up.link.goaway(0, reason::NO_ERROR, "");
        up.link.flush();
    }
}

/// Instance connections kept idle per instance and worker.
const MAX_IDLE: usize = 4;
/// Past this stream number a connection takes no new streams (HTTP/2 allows up to 2^31-1).
const MAX_STREAM_ID: u32 = 1 << 30;

/// An idle connection to `instance` that is still open: what it received while idle (a PING, a
/// GOAWAY) stays buffered and is handled once it is in use again.
fn take_idle(instance: &Instance) -> Option<Up> {
    loop {
        let mut up = lock(instance.idle::<Up>()).pop()?;
        up.link.rbuf.reserve(4096);
        match up.link.sock.try_read_buf(&mut up.link.rbuf) {
            Ok(0) => continue,
            Ok(_) => return Some(up),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(up),
            Err(_) => continue,
        }
    }
}

impl Link {
    /// No more reads; what is buffered is still written once.
    fn closed_after_flush(&mut self) {
        self.flush();
        self.closed = true;
    }
}

impl Relay<'_> {
    fn flush(&mut self) {
        self.caller.flush();
        for up in self.ups.iter_mut() {
            up.link.flush();
        }
    }

    /// Handles every whole frame the caller sent.
    fn caller_frames(&mut self) -> Result<(), FrameError> {
        while let Some((head, payload)) = self.caller.next_frame()? {
            match head.kind {
                kind::HEADERS | kind::CONTINUATION => {
                    if let Some((id, end, block)) = self.caller.header_fragment(&head, &payload)? {
                        self.request_headers(id, end, &block)?;
                    }
                }
                kind::DATA => {
                    self.caller.received(head.len)?;
                    let data = frame::unpad(&head, &payload)?;
                    let data = payload.slice_ref(data);
                    self.caller_data(head.stream, head.len, data, head.is(flag::END_STREAM));
                }
                kind::WINDOW_UPDATE => match frame::window_update(&head, &payload) {
                    Ok(n) if head.stream == 0 => {
                        self.caller.send_window += i64::from(n);
                        let ids: Vec<u32> = self.streams.keys().copied().collect();
                        for id in ids {
                            self.pump_caller(id);
                        }
                    }
                    Ok(n) => {
                        if let Some(s) = self.streams.get_mut(&head.stream) {
                            s.send_caller += i64::from(n);
                            self.pump_caller(head.stream);
                        }
                    }
                    Err(e) if e.stream => {
                        frame::write_rst_stream(&mut self.caller.wbuf, head.stream, e.reason)
                    }
                    Err(e) => return Err(e),
                },
                kind::SETTINGS => {
                    let delta = self.caller.settings(&head, &payload)?;
                    if delta != 0 {
                        for s in self.streams.values_mut() {
                            s.send_caller += delta;
                        }
                    }
                }
                kind::PING => self.caller.ping(&head, &payload)?,
                kind::RST_STREAM => {
                    frame::rst_stream(&head, &payload)?;
                    // The caller cancelled: so is the instance's stream.
                    self.cancel_up(head.stream, reason::CANCEL);
                    if let Some(s) = self.streams.remove(&head.stream) {
                        if !s.answered {
                            self.early_resets += 1;
                        }
                    }
                    self.watches.remove(&head.stream);
                    if self.early_resets > MAX_EARLY_RESETS.max(2 * self.answered) {
                        return Err(FrameError {
                            kind: head.kind,
                            what: "too many streams reset before their response",
                            reason: reason::ENHANCE_YOUR_CALM,
                            stream: false,
                        });
                    }
                }
                kind::GOAWAY => {
                    frame::goaway(&head, &payload)?;
                    self.caller.going_away = true;
                }
                kind::PUSH_PROMISE => {
                    return Err(FrameError {
                        kind: head.kind,
                        what: "PUSH_PROMISE from a client",
                        reason: reason::PROTOCOL_ERROR,
                        stream: false,
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A caller's request headers: routed, admitted, and sent on to an instance (or queued).
    fn request_headers(&mut self, id: u32, end: bool, block: &[u8]) -> Result<(), FrameError> {
        let bad = |what| FrameError {
            kind: kind::HEADERS,
            what,
            reason: reason::PROTOCOL_ERROR,
            stream: false,
        };
        if self.streams.contains_key(&id) || (id <= self.last_stream && id % 2 == 1) {
            // Trailers of a request (gRPC requests have none worth passing), or headers on a
            // stream already answered: decoded all the same, to keep the table in step.
            if self.caller.decoder.decode(block, |_| ()).is_err() {
                return Err(FrameError {
                    kind: kind::HEADERS,
                    what: "header block does not decode (HPACK)",
                    reason: reason::COMPRESSION_ERROR,
                    stream: false,
                });
            }
            if end {
                self.caller_data(id, 0, Bytes::new(), true);
            }
            return Ok(());
        }
        if id % 2 == 0 {
            return Err(bad("a new stream's identifier must be odd"));
        }
        self.last_stream = id;
        let mut out = Vec::with_capacity(block.len() + 64);
        // The path goes into a buffer the connection reuses.
        let mut path = std::mem::take(&mut self.path);
        path.clear();
        let mut has_path = false;
        let mut timeout = None;
        let mut pseudo_done = false;
        let mut malformed = false;
        let decoded = self.caller.decoder.decode(block, |f| {
            if f.name.first() == Some(&b':') {
                if pseudo_done {
                    malformed = true;
                }
                if f.name == b":path" {
                    path.push_str(&String::from_utf8_lossy(f.value));
                    has_path = true;
                }
            } else {
                pseudo_done = true;
                if f.name == b"grpc-timeout" {
                    timeout = std::str::from_utf8(f.value)
                        .ok()
                        .and_then(grpc::parse_grpc_timeout);
                    return;
                }
                if matches!(
                    f.name,
                    b"connection"
                        | b"keep-alive"
                        | b"proxy-connection"
                        | b"transfer-encoding"
                        | b"upgrade"
                ) {
                    malformed = true;
                }
            }
            encode_field(&mut out, f.name, f.value, f.sensitive);
        });
        match decoded {
            Ok(()) => {}
            Err(fnmesh_codec::hpack::HpackError::ListTooLarge { .. }) => {
                frame::write_rst_stream(&mut self.caller.wbuf, id, reason::PROTOCOL_ERROR);
                return Ok(());
            }
            Err(_) => {
                return Err(FrameError {
                    kind: kind::HEADERS,
                    what: "header block does not decode (HPACK)",
                    reason: reason::COMPRESSION_ERROR,
                    stream: false,
                })
            }
        }
        if malformed || !has_path {
            frame::write_rst_stream(&mut self.caller.wbuf, id, reason::PROTOCOL_ERROR);
            return Ok(());
        }
        if self.draining || self.streams.len() >= MAX_STREAMS as usize {
            frame::write_rst_stream(&mut self.caller.wbuf, id, reason::REFUSED_STREAM);
            return Ok(());
        }
        let mut stream = Stream {
            up: None,
            request: Some(out),
            to_up: VecDeque::new(),
            caller_done: end,
            up_done: false,
            to_caller: VecDeque::new(),
            trailers: None,
            answered: false,
            send_caller: i64::from(self.caller.peer_window),
            send_up: 0,
            unacked_caller: 0,
            unacked_up: 0,
            recv_caller: i64::from(STREAM_WINDOW),
            recv_up: i64::from(STREAM_WINDOW),
            lease: None,
            deadline: None,
            budget: Duration::ZERO,
            function: None,
            verdict: None,
            health: None,
            watch: false,
            retry: None,
            attempt_deadline: None,
            _active: None,
        };
        let routed = self.route(&path, timeout, &mut stream);
        self.path = path;
        match routed {
            Ok(None) => {
                self.streams.insert(id, stream);
            }
            Ok(Some(lease)) => {
                self.streams.insert(id, stream);
                self.leased(id, Ok(lease));
            }
            Err(e) => {
                // Answered now; what the caller still sends on the stream is dropped.
                stream.verdict = None;
                self.streams.insert(id, stream);
                self.fail(id, &e);
            }
        }
        Ok(())
    }

    /// Routes a stream; gives a slot on an instance when one is free now, else queues for one.
    fn route(
        &mut self,
        path: &str,
        caller_timeout: Option<Duration>,
        stream: &mut Stream,
    ) -> Result<Option<Lease>, CallError> {
        let (function, method) = match grpc::target(self.front, path)? {
            grpc::Target::Function(function, method) => (function, method),
            grpc::Target::Health { watch } => {
                stream.health = Some(Vec::new());
                stream.watch = watch;
                return Ok(None);
            }
        };
        let admitted = function.admit(method, caller_timeout)?;
        // Outcomes are recorded (breaker, instance ejection) when the function has breakers.
        stream.verdict = admitted.classify.then_some(admitted.verdict);
        stream.deadline = admitted.deadline;
        if let Some(d) = admitted.deadline {
            self.timers.push(d, self.last_stream);
        }
        stream.budget = admitted.budget.unwrap_or_default();
        stream.function = Some(function.clone());
        stream._active = Some(Active::new(&self.front.active));
        stream.retry = admitted.retry.map(|attempts| Retrying {
            attempts,
            copy: stream.request.clone().map(|b| (b, Vec::new(), 0)),
        });
        if let Some(lease) = function.pool.try_acquire()? {
            return Ok(Some(lease));
        }
        self.queue(&function, stream.deadline, stream.budget);
        Ok(None)
    }

    /// Waits for a slot for the stream routed last.
    fn queue(&mut self, function: &Arc<Function>, deadline: Option<Instant>, budget: Duration) {
        self.queue_for(self.last_stream, function.clone(), deadline, budget, None);
    }

    /// Waits for a slot for stream `id`: after `then` (a retry's backoff), and on another
    /// instance than `then`'s when one has room.
    fn queue_for(
        &mut self,
        id: u32,
        function: Arc<Function>,
        deadline: Option<Instant>,
        budget: Duration,
        then: Option<(Duration, u64)>,
    ) {
        self.queued.push(Box::pin(async move {
            if let Some((wait, avoid)) = then {
                tokio::time::sleep(wait).await;
                match function.pool.try_acquire_other(avoid) {
                    Ok(Some(lease)) => return (id, Ok(lease)),
                    Ok(None) => {}
                    Err(e) => return (id, Err(e)),
                }
            }
            let acquire = function.pool.acquire();
            let result = match deadline {
                Some(d) => tokio::time::timeout_at(d, acquire).await.unwrap_or_else(|_| {
                    Err(CallError::new(
                        Kind::Timeout,
                        format!(
                            "function {}: deadline of {budget:?} passed while queued (the call was never forwarded)",
                            function.name
                        ),
                    ))
                }),
                None => acquire.await,
            };
            (id, result)
        }));
    }

    /// A stream got its slot (or failed to): it goes to a connection to that instance.
    fn leased(&mut self, id: u32, result: Result<Lease, CallError>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let mut lease = match result {
            Ok(lease) => lease,
            Err(e) => {
                self.fail(id, &e);
                return;
            }
        };
        lease.set_deadline(s.deadline);
        let instance = lease.instance.clone();
        s.lease = Some(lease);
        let found = self
            .ups
            .iter()
            .position(|u| u.instance.id == instance.id && !u.link.closed && !u.link.going_away);
        if let Some(i) = found {
            self.open_up(id, i);
            return;
        }
        if let Some(up) = take_idle(&instance) {
            let i = self.add_up(up);
            self.open_up(id, i);
            return;
        }
        let waiting = self.waiting.entry(instance.id).or_default();
        waiting.push(id);
        if waiting.len() == 1 {
            self.connecting.push(Box::pin(async move {
                let stream = match instance.take_probe() {
                    Some(probe) => Ok(probe),
                    None => instance
                        .connect()
                        .await
                        .map_err(|e| format!("connect refused: {e}")),
                };
                (instance, stream)
            }));
        }
    }

    /// A connection to an instance is open (or could not be): its waiting streams go on it.
    fn connected(&mut self, instance: Arc<Instance>, result: Result<TcpStream, String>) {
        let waiting = self.waiting.remove(&instance.id).unwrap_or_default();
        let sock = match result {
            Ok(sock) => sock,
            Err(e) => {
                for id in waiting {
                    let Some(s) = self.streams.get(&id) else {
                        continue;
                    };
                    if let Some(l) = &s.lease {
                        l.evict();
                    }
                    let e = CallError::new(
                        Kind::Unavailable,
                        format!("function {} instance {}: {e}", s.function(), instance.id),
                    );
                    self.retry_or_fail(id, &e, Failure::Connect);
                }
                return;
            }
        };
        let _ = sock.set_nodelay(true);
        let mut link = Link::new(sock, BytesMut::with_capacity(16 << 10));
        link.wbuf.put_slice(HTTP2_PREFACE);
        link.greet(true);
        let up = Up {
            link,
            instance,
            next_stream: 1,
            streams: ById::default(),
            heard: false,
        };
        let i = self.add_up(up);
        for id in waiting {
            self.open_up(id, i);
        }
    }

    /// Adds an instance connection, in a closed one's slot when there is one.
    fn add_up(&mut self, up: Up) -> usize {
        match self
            .ups
            .iter()
            .position(|u| u.link.closed && u.streams.is_empty())
        {
            Some(i) => {
                self.ups[i] = up;
                i
            }
            None => {
                self.ups.push(up);
                self.ups.len() - 1
            }
        }
    }

    /// Opens the stream's request on instance connection `i`.
    fn open_up(&mut self, id: u32, i: usize) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let up = &mut self.ups[i];
        let Some(mut block) = s.request.take() else {
            return;
        };
        if let Some(d) = s.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let e = CallError::new(
                    Kind::Timeout,
                    format!(
                        "function {}: deadline of {:?} passed before the call was forwarded",
                        s.function(),
                        s.budget
                    ),
                );
                self.fail(id, &e);
                return;
            }
            encode_field(
                &mut block,
                b"grpc-timeout",
                grpc::format_grpc_timeout(left).as_bytes(),
                false,
            );
        }
        s.attempt_deadline = None;
        let share = s
            .retry
            .as_ref()
            .filter(|r| r.copy.is_some())
            .and_then(|r| r.attempts.share(s.deadline));
        if let Some(share) = share {
            let at = Instant::now() + share;
            s.attempt_deadline = Some(at);
            self.timers.push(at, id);
        }
        let up_id = up.next_stream;
        up.next_stream += 2;
        if up.next_stream >= MAX_STREAM_ID {
            // Stream numbers run out (after a billion streams): later streams get a new
            // connection, and this one closes once its streams are done.
            up.link.going_away = true;
        }
        up.streams.insert(up_id, id);
        s.up = Some((i, up_id));
        s.send_up = i64::from(up.link.peer_window);
        let end = s.caller_done && s.to_up.is_empty();
        s.up_done = end;
        write_headers(
            &mut up.link.wbuf,
            up_id,
            &block,
            end,
            up.link.peer_max_frame,
        );
        self.pump_up(id);
    }

    /// Request data from the caller.
    fn caller_data(&mut self, id: u32, len: usize, data: Bytes, end: bool) {
        let Some(s) = self.streams.get_mut(&id) else {
            // A stream already answered or reset: its bytes are dropped, and given back.
            self.caller.credit(len);
            return;
        };
        if s.caller_done {
            self.caller.credit(len);
            return;
        }
        s.recv_caller -= len as i64;
        if s.recv_caller < 0 {
            // Past the stream's window: the stream ends, the bytes are given back.
            self.caller.credit(len);
            frame::write_rst_stream(&mut self.caller.wbuf, id, reason::FLOW_CONTROL_ERROR);
            s.caller_done = true;
            self.cancel_up(id, reason::CANCEL);
            self.streams.remove(&id);
            return;
        }
        // Padding is given back at once; the data when it has gone on.
        self.caller.credit(len - data.len());
        s.unacked_caller += (len - data.len()) as u32;
        s.caller_done = end;
        if let Some(h) = s.health.as_mut() {
            h.extend_from_slice(&data);
            self.caller.credit(data.len());
            if end {
                self.health_check(id);
            }
            return;
        }
        if s.answered && s.up.is_none() {
            // Answered by fnmesh (an error): nothing goes on.
            self.caller.credit(data.len());
            return;
        }
        if let Some(r) = s.retry.as_mut() {
            if let Some((_, copy, size)) = r.copy.as_mut() {
                *size += data.len();
                if !data.is_empty() {
                    copy.push(data.clone());
                }
                if *size > REPLAY_LIMIT {
                    r.copy = None;
                }
            }
        }
        if !data.is_empty() {
            s.to_up.push_back(data);
        }
        self.pump_up(id);
    }

    /// Sends what the instance's windows allow of a stream's request data.
    fn pump_up(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Some((i, up_id)) = s.up else {
            return;
        };
        let up = &mut self.ups[i];
        let (sent, ended) = send_within(
            &mut s.to_up,
            &mut s.send_up,
            &mut up.link,
            up_id,
            s.caller_done,
        );
        s.up_done |= ended;
        if s.to_up.is_empty() && s.caller_done && !s.up_done {
            write_data(&mut up.link.wbuf, up_id, &[], true);
            s.up_done = true;
        }
        if sent > 0 {
            // What went on is given back to the caller.
            self.caller.credit(sent);
            s.unacked_caller += sent as u32;
            if !s.caller_done && s.unacked_caller >= STREAM_WINDOW / 4 {
                frame::write_window_update(&mut self.caller.wbuf, id, s.unacked_caller);
                s.recv_caller += i64::from(s.unacked_caller);
                s.unacked_caller = 0;
            }
        }
    }

    /// Sends what the caller's windows allow of a stream's response data, then its trailers.
    fn pump_caller(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        // The trailers end the stream, not the data.
        let (sent, _) = send_within(
            &mut s.to_caller,
            &mut s.send_caller,
            &mut self.caller,
            id,
            false,
        );
        if sent > 0 {
            if let Some((i, up_id)) = s.up {
                let up = &mut self.ups[i];
                up.link.credit(sent);
                s.unacked_up += sent as u32;
                if s.unacked_up >= STREAM_WINDOW / 4 {
                    frame::write_window_update(&mut up.link.wbuf, up_id, s.unacked_up);
                    s.recv_up += i64::from(s.unacked_up);
                    s.unacked_up = 0;
                }
            }
        }
        if s.to_caller.is_empty() {
            if let Some(trailers) = s.trailers.take() {
                write_headers(
                    &mut self.caller.wbuf,
                    id,
                    &trailers,
                    true,
                    self.caller.peer_max_frame,
                );
                self.finish(id);
            }
        }
    }

    /// Handles every whole frame instance connection `i` sent; a connection that fails fails
    /// its streams.
    fn up_frames(&mut self, i: usize) {
        loop {
            let next = match self.ups[i].link.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    self.up_failed(i, &e.to_string(), e.reason);
                    return;
                }
            };
            if let Err(e) = self.up_frame(i, next.0, next.1) {
                self.up_failed(i, &e.to_string(), e.reason);
                return;
            }
        }
        if self.ups[i].link.closed && !self.ups[i].streams.is_empty() {
            self.up_failed(i, "connection lost", reason::NO_ERROR);
        }
    }

    fn up_frame(&mut self, i: usize, head: FrameHead, payload: Bytes) -> Result<(), FrameError> {
        let up = &mut self.ups[i];
        up.heard = true;
        match head.kind {
            kind::HEADERS | kind::CONTINUATION => {
                if let Some((up_id, end, block)) = up.link.header_fragment(&head, &payload)? {
                    self.response_headers(i, up_id, end, &block)?;
                }
            }
            kind::DATA => {
                up.link.received(head.len)?;
                let data = frame::unpad(&head, &payload)?;
                let data = payload.slice_ref(data);
                up.link.credit(head.len - data.len());
                let Some(&id) = up.streams.get(&head.stream) else {
                    up.link.credit(data.len());
                    return Ok(());
                };
                let Some(s) = self.streams.get_mut(&id) else {
                    up.link.credit(data.len());
                    return Ok(());
                };
                s.recv_up -= head.len as i64;
                s.unacked_up += (head.len - data.len()) as u32;
                if s.recv_up < 0 {
                    // The instance broke the stream's window: the stream fails.
                    up.link.credit(data.len());
                    if let Some((_, up_id)) = s.up.take() {
                        up.streams.remove(&up_id);
                        frame::write_rst_stream(
                            &mut up.link.wbuf,
                            up_id,
                            reason::FLOW_CONTROL_ERROR,
                        );
                    }
                    self.up_reset(id, reason::FLOW_CONTROL_ERROR);
                    return Ok(());
                }
                if !data.is_empty() {
                    s.to_caller.push_back(data);
                }
                if head.is(flag::END_STREAM) && s.trailers.is_none() {
                    // Ended without trailers: the caller gets the end all the same.
                    s.trailers = Some(Vec::new());
                }
                self.pump_caller(id);
            }
            kind::WINDOW_UPDATE => match frame::window_update(&head, &payload) {
                Ok(n) if head.stream == 0 => {
                    up.link.send_window += i64::from(n);
                    let ids: Vec<u32> = up.streams.values().copied().collect();
                    for id in ids {
                        self.pump_up(id);
                    }
                }
                Ok(n) => {
                    if let Some(&id) = up.streams.get(&head.stream) {
                        if let Some(s) = self.streams.get_mut(&id) {
                            s.send_up += i64::from(n);
                        }
                        self.pump_up(id);
                    }
                }
                Err(e) if e.stream => {
                    frame::write_rst_stream(&mut up.link.wbuf, head.stream, e.reason)
                }
                Err(e) => return Err(e),
            },
            kind::SETTINGS => {
                let delta = up.link.settings(&head, &payload)?;
                if delta != 0 {
                    for id in up.streams.values() {
                        if let Some(s) = self.streams.get_mut(id) {
                            s.send_up += delta;
                        }
                    }
                }
            }
            kind::PING => up.link.ping(&head, &payload)?,
            kind::RST_STREAM => {
                let code = frame::rst_stream(&head, &payload)?;
                if let Some(id) = up.streams.remove(&head.stream) {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.up = None;
                        s.up_done = true;
                    }
                    self.up_reset(id, code);
                }
            }
            kind::GOAWAY => {
                let (last, _, _) = frame::goaway(&head, &payload)?;
                up.link.going_away = true;
                // Streams past `last` were never processed by the instance.
                let unseen: Vec<u32> = up.streams.keys().copied().filter(|&u| u > last).collect();
                let unseen: Vec<u32> = unseen
                    .into_iter()
                    .filter_map(|u| up.streams.remove(&u))
                    .collect();
                for id in unseen {
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.up = None;
                    }
                    self.up_reset(id, reason::REFUSED_STREAM);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Response headers (or trailers) from an instance, passed to the caller.
    fn response_headers(
        &mut self,
        i: usize,
        up_id: u32,
        end: bool,
        block: &[u8],
    ) -> Result<(), FrameError> {
        let up = &mut self.ups[i];
        let mut out = Vec::with_capacity(block.len() + 32);
        let mut status: Option<u16> = None;
        let mut grpc_status: Option<Vec<u8>> = None;
        up.link
            .decoder
            .decode(block, |f| {
                if f.name == b":status" {
                    status = std::str::from_utf8(f.value)
                        .ok()
                        .and_then(|v| v.parse().ok());
                } else if f.name == b"grpc-status" {
                    grpc_status = Some(f.value.to_vec());
                }
                encode_field(&mut out, f.name, f.value, f.sensitive);
            })
            .map_err(|_| FrameError {
                kind: kind::HEADERS,
                what: "header block does not decode (HPACK)",
                reason: reason::COMPRESSION_ERROR,
                stream: false,
            })?;
        let Some(&id) = up.streams.get(&up_id) else {
            return Ok(());
        };
        let Some(s) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        if !s.answered {
            if status.is_some_and(|c| (100..200).contains(&c)) {
                // Informational: not passed on.
                return Ok(());
            }
            if end && grpc_status.as_deref() == Some(b"14") && s.may_retry(Failure::Unavailable) {
                let e = CallError::new(
                    Kind::Unavailable,
                    format!(
                        "function {}: the instance answered UNAVAILABLE",
                        s.function()
                    ),
                );
                if let Some((_, up_id)) = s.up.take() {
                    self.ups[i].streams.remove(&up_id);
                }
                self.retry_or_fail(id, &e, Failure::Unavailable);
                return Ok(());
            }
            s.answered = true;
            s.attempt_deadline = None;
            if let Some(r) = s.retry.as_mut() {
                r.copy = None;
            }
            if end {
                let failed =
                    status != Some(200) || outcome::grpc_status_is_failure(grpc_status.as_deref());
                s.outcome(failed);
                write_headers(
                    &mut self.caller.wbuf,
                    id,
                    &out,
                    true,
                    self.caller.peer_max_frame,
                );
                self.finish(id);
                return Ok(());
            }
            if status != Some(200) {
                s.outcome(true);
            }
            write_headers(
                &mut self.caller.wbuf,
                id,
                &out,
                false,
                self.caller.peer_max_frame,
            );
            return Ok(());
        }
        // Trailers.
        s.outcome(outcome::grpc_status_is_failure(grpc_status.as_deref()));
        s.trailers = Some(out);
        self.pump_caller(id);
        Ok(())
    }

    /// The instance reset a stream, or will never process it (REFUSED_STREAM).
    fn up_reset(&mut self, id: u32, code: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.answered {
            s.outcome(true);
            frame::write_rst_stream(&mut self.caller.wbuf, id, code);
            self.streams.remove(&id);
            return;
        }
        let e = CallError::new(
            Kind::Unavailable,
            format!(
                "function {}: the instance reset the stream (HTTP/2 error {code:#x})",
                s.function()
            ),
        );
        let why = if code == reason::REFUSED_STREAM {
            Failure::Connect
        } else {
            Failure::Unavailable
        };
        self.retry_or_fail(id, &e, why);
    }

    /// Instance connection `i` failed: every stream on it ends.
    fn up_failed(&mut self, i: usize, why: &str, code: u32) {
        let up = &mut self.ups[i];
        if !up.link.closed {
            up.link.goaway(0, code, why);
            up.link.flush();
            up.link.closed = true;
        }
        let instance = up.instance.id;
        let heard = up.heard;
        let ids: Vec<u32> = up.streams.drain().map(|(_, id)| id).collect();
        for id in ids {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.up = None;
            if s.answered {
                s.outcome(true);
                frame::write_rst_stream(&mut self.caller.wbuf, id, reason::INTERNAL_ERROR);
                self.streams.remove(&id);
                continue;
            }
            let e = CallError::new(
                Kind::Unavailable,
                format!("function {} instance {instance}: {why}", s.function()),
            );
            let failure = if heard {
                Failure::Unavailable
            } else {
                // Lost before the instance said anything: as a refused connect.
                if let Some(l) = &s.lease {
                    l.evict();
                }
                Failure::Connect
            };
            self.retry_or_fail(id, &e, failure);
        }
    }

    /// Answers a stream with fnmesh's error, trailers-only (or, once response headers went out,
    /// as trailers), and ends it on the instance's side too.
    fn fail(&mut self, id: u32, e: &CallError) {
        self.cancel_up(id, reason::CANCEL);
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if let Some(v) = s.verdict.as_mut() {
            v.record(outcome::is_failure(e.kind));
        }
        if s.answered {
            let mut b = Vec::new();
            status_fields(&mut b, e.kind.grpc_status(), &e.to_string());
            s.to_caller.clear();
            write_headers(
                &mut self.caller.wbuf,
                id,
                &b,
                true,
                self.caller.peer_max_frame,
            );
        } else {
            s.answered = true;
            write_headers(
                &mut self.caller.wbuf,
                id,
                &error_block(e),
                true,
                self.caller.peer_max_frame,
            );
        }
        self.finish(id);
    }

    /// Resets the instance's side of a stream (if it has one and it is still open).
    fn cancel_up(&mut self, id: u32, code: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if let Some((i, up_id)) = s.up.take() {
            let up = &mut self.ups[i];
            if up.streams.remove(&up_id).is_some() {
                frame::write_rst_stream(&mut up.link.wbuf, up_id, code);
            }
        }
    }

    /// The response has ended: the stream is done. A caller still sending is told to stop.
    fn finish(&mut self, id: u32) {
        self.watches.remove(&id);
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        self.answered += 1;
        if let Some((i, up_id)) = s.up {
            let up = &mut self.ups[i];
            up.streams.remove(&up_id);
            if !s.up_done {
                frame::write_rst_stream(&mut up.link.wbuf, up_id, reason::CANCEL);
            }
            if up.link.going_away && up.streams.is_empty() && !up.link.closed {
                up.link.goaway(0, reason::NO_ERROR, "");
                up.link.closed_after_flush();
            }
        }
        if !s.caller_done {
            frame::write_rst_stream(&mut self.caller.wbuf, id, reason::NO_ERROR);
        }
    }

    /// The earliest deadline of a stream still waiting for it.
    fn next_timer(&mut self) -> Option<Instant> {
        let streams = &self.streams;
        self.timers.compact(streams.len(), || {
            streams.iter().flat_map(|(&id, s)| {
                let attempt = s.attempt_deadline.filter(|_| !s.answered);
                [s.deadline, attempt]
                    .into_iter()
                    .flatten()
                    .map(move |at| (at, id))
            })
        });
        self.timers
            .next(|at, id| streams.get(&id).is_some_and(|s| s.waits_for(at)))
    }

    /// Streams past their deadline are answered DEADLINE_EXCEEDED; an attempt past its share of
    /// the deadline is tried again.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some((at, id)) = self.timers.pop_due(now) {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            if !s.waits_for(at) {
                continue;
            }
            if s.deadline != Some(at) && s.deadline.is_none_or(|d| d > now) {
                // This attempt's share of the deadline.
                s.attempt_deadline = None;
                let instance = s.lease.as_ref().map_or(0, |l| l.instance.id);
                let e = CallError::new(
                    Kind::Timeout,
                    format!(
                        "function {} instance {instance}: no response within this attempt's share of the deadline",
                        s.function()
                    ),
                );
                self.cancel_up(id, reason::CANCEL);
                self.retry_or_fail(id, &e, Failure::Timeout);
                continue;
            }
            let what = if s.answered {
                "while the response streamed"
            } else if s.up.is_some() {
                "waiting for the instance's response"
            } else {
                "while queued (the call was never forwarded)"
            };
            let e = CallError::new(
                Kind::Timeout,
                format!(
                    "function {}: deadline of {:?} passed {what}",
                    s.function(),
                    s.budget
                ),
            );
            if let Some(l) = &s.lease {
                if s.up.is_some() {
                    l.outcome(true);
                }
            }
            self.fail(id, &e);
        }
    }

    /// `grpc.health.v1.Health` `Check` and `Watch`, answered by the sidecar: SERVING while the function can be routed to (at zero instances too),
    /// NOT_SERVING once draining; an unknown service is NOT_FOUND (`Watch`: SERVICE_UNKNOWN).
    /// A `Watch` gets the status now and again whenever a reload or draining changes it; it ends
    /// when the sidecar drains.
    fn health_check(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let request = s.health.take().unwrap_or_default();
        let Some(service) = grpc::health::parse_request(&request) else {
            let e = CallError::new(Kind::BadRequest, "not a HealthCheckRequest");
            self.fail(id, &e);
            return;
        };
        let known = service.is_empty() || self.front.function(&service).is_some();
        s.answered = true;
        let mut b = Vec::new();
        encode_field(&mut b, b":status", b"200", false);
        encode_field(&mut b, b"content-type", b"application/grpc", false);
        if !known && !s.watch {
            status_fields(&mut b, 5, &format!("unknown service {service}"));
            write_headers(
                &mut self.caller.wbuf,
                id,
                &b,
                true,
                self.caller.peer_max_frame,
            );
            self.finish(id);
            return;
        }
        write_headers(
            &mut self.caller.wbuf,
            id,
            &b,
            false,
            self.caller.peer_max_frame,
        );
        if s.watch {
            // Sent by `watch_update`, which sees a status differing from this one.
            self.watches.insert(id, (service, 0));
            self.watch_update();
            return;
        }
        let status = grpc::health::status(true, *self.front.draining.borrow());
        s.to_caller.push_back(grpc::health::message(status));
        s.trailers = Some(ok_trailers());
        self.pump_caller(id);
    }

    /// Sends each health `Watch` its status if it changed; ends them once the sidecar drains.
    fn watch_update(&mut self) {
        let draining = self.draining || *self.front.draining.borrow();
        let ids: Vec<u32> = self.watches.keys().copied().collect();
        for id in ids {
            let Some((service, sent)) = self.watches.get_mut(&id) else {
                continue;
            };
            let known = service.is_empty() || self.front.function(service).is_some();
            let now = grpc::health::status(known, draining);
            let Some(s) = self.streams.get_mut(&id) else {
                self.watches.remove(&id);
                continue;
            };
            if *sent != now {
                *sent = now;
                s.to_caller.push_back(grpc::health::message(now));
            }
            if draining {
                s.trailers = Some(ok_trailers());
                self.watches.remove(&id);
            }
            self.pump_caller(id);
        }
    }

    /// Retries a failed attempt when the policy allows (on another instance, after a backoff);
    /// otherwise answers the caller with `e`.
    fn retry_or_fail(&mut self, id: u32, e: &CallError, why: Failure) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let instance = s.lease.as_ref().map_or(0, |l| l.instance.id);
        let may_retry = s.may_retry(why);
        let wait = match (s.retry.as_mut(), &s.function) {
            (Some(r), Some(f)) if may_retry => {
                r.attempts.next(why, instance, s.deadline, &f.retry_budget)
            }
            _ => None,
        };
        if wait.is_some() {
            tracing::debug!(function = %s.function(), instance, error = %e, "retrying on another instance");
        }
        let (Some(wait), Some(r)) = (wait, s.retry.as_mut()) else {
            if why != Failure::Connect {
                s.outcome(true);
            }
            self.fail(id, e);
            return;
        };
        if let Some(lease) = s.lease.take() {
            if why != Failure::Connect {
                lease.outcome(true);
            }
        }
        if s.request.is_none() {
            // The request went out: it goes again from the copy.
            if let Some((block, data, _)) = &r.copy {
                s.request = Some(block.clone());
                s.to_up = data.iter().cloned().collect();
                s.up_done = false;
            }
        }
        let Some(function) = s.function.clone() else {
            return;
        };
        let (deadline, budget) = (s.deadline, s.budget);
        self.cancel_up(id, reason::CANCEL);
        self.queue_for(id, function, deadline, budget, Some((wait, instance)));
    }
}

fn ok_trailers() -> Vec<u8> {
    let mut t = Vec::new();
    encode_field(&mut t, b"grpc-status", b"0", false);
    t
}

impl Stream {
    /// Whether `at` is still one of the stream's deadlines (its own, or its attempt's while no
    /// response has started).
    fn waits_for(&self, at: Instant) -> bool {
        self.deadline == Some(at) || (self.attempt_deadline == Some(at) && !self.answered)
    }

    /// The function's name, for messages.
    fn function(&self) -> &str {
        self.function.as_ref().map_or("", |f| f.name.as_str())
    }

    /// Whether an attempt that failed this way may be made again: the policy allows it with
    /// attempts left, no response has started, and the request is still at hand (never
    /// written, or copied).
    fn may_retry(&self, why: Failure) -> bool {
        let Some(r) = &self.retry else {
            return false;
        };
        let at_hand = match why {
            Failure::Connect => self.request.is_some() || r.copy.is_some(),
            _ => r.copy.is_some(),
        };
        !self.answered && at_hand && r.attempts.may_retry(why)
    }

    /// The call's outcome, for the breaker and the instance's ejection count.
    fn outcome(&mut self, failed: bool) {
        if let Some(v) = self.verdict.as_mut() {
            v.record(failed);
            if let Some(l) = &self.lease {
                l.outcome(failed);
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

    /// fnmesh's trailers-only answer: status 200, gRPC content type, the status of DESIGN.md's
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
