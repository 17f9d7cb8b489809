//! One HTTP/2 connection's I/O, caller or instance alike: buffered reads and writes, SETTINGS,
//! PING, windows and header blocks split across frames; and the frames the relay writes.

use super::*;

/// One side of the relay: a socket with its buffers and HTTP/2 connection state.
pub(super) struct Link {
    pub(super) sock: Socket,
    pub(super) rbuf: BytesMut,
    pub(super) wbuf: BytesMut,
    /// Decodes the header blocks this peer sends.
    pub(super) decoder: Decoder,
    /// What we may still send on the connection (the peer's connection window).
    pub(super) send_window: i64,
    /// The peer's SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE,
    /// SETTINGS_MAX_CONCURRENT_STREAMS and SETTINGS_MAX_HEADER_LIST_SIZE (the last two
    /// unlimited until it says).
    pub(super) peer_window: u32,
    pub(super) peer_max_frame: usize,
    pub(super) peer_max_streams: usize,
    pub(super) peer_max_list: usize,
    /// Received DATA bytes passed on (or dropped) but not yet given back to the peer.
    pub(super) unacked: u32,
    /// What the peer may still send on the connection: DATA past it breaks flow control.
    pub(super) recv_window: i64,
    /// A header block being put together from HEADERS and CONTINUATION frames: its stream, its
    /// END_STREAM flag, and the fragments so far.
    pub(super) block: Option<(u32, bool, Vec<u8>)>,
    /// The peer closed, or the connection failed.
    pub(super) closed: bool,
    /// The peer sent GOAWAY: no new streams.
    pub(super) going_away: bool,
    /// DATA for this peer waits with its streams because [`WRITE_LIMIT`] was reached: it is
    /// sent on once the peer has read enough.
    pub(super) held_back: bool,
    /// Frames read from the peer so far: progress, for the stall watch.
    pub(super) frames: u64,
}

impl Link {
    /// Writes a header block on `stream`, split into frames this peer accepts.
    pub(super) fn send_headers(&mut self, stream: u32, block: &[u8], end_stream: bool) {
        write_headers(
            &mut self.wbuf,
            stream,
            block,
            end_stream,
            self.peer_max_frame,
        );
    }

    pub(super) fn new(sock: Socket, rbuf: BytesMut) -> Link {
        Link {
            sock,
            rbuf,
            wbuf: BytesMut::with_capacity(16 << 10),
            decoder: Decoder::new(fnmesh_codec::hpack::DEFAULT_TABLE_SIZE, MAX_LIST),
            send_window: i64::from(DEFAULT_WINDOW),
            peer_window: DEFAULT_WINDOW,
            peer_max_frame: DEFAULT_MAX_FRAME,
            peer_max_streams: usize::MAX,
            peer_max_list: usize::MAX,
            unacked: 0,
            recv_window: i64::from(DEFAULT_WINDOW),
            block: None,
            closed: false,
            going_away: false,
            held_back: false,
            frames: 0,
        }
    }

    /// Our SETTINGS and the connection window beyond the default.
    pub(super) fn greet(&mut self, client: bool) {
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
    pub(super) fn received(&mut self, len: usize) -> Result<(), FrameError> {
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
    pub(super) fn credit(&mut self, n: usize) {
        self.unacked += n as u32;
        if self.unacked >= CONN_WINDOW / 4 {
            frame::write_window_update(&mut self.wbuf, 0, self.unacked);
            self.recv_window += i64::from(self.unacked);
            self.unacked = 0;
        }
    }

    /// Writes what the socket takes now.
    pub(super) fn flush(&mut self) {
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
    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>) -> bool {
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
    pub(super) fn poll_write(&mut self, cx: &mut Context<'_>) -> bool {
        !self.wbuf.is_empty()
            && !self.closed
            && matches!(self.sock.poll_write_ready(cx), Poll::Ready(_))
    }

    /// The next whole frame, when there is one.
    pub(super) fn next_frame(&mut self) -> Result<Option<(FrameHead, Bytes)>, FrameError> {
        let Some(head) = FrameHead::parse(&self.rbuf) else {
            return Ok(None);
        };
        head.check(MAX_FRAME)?;
        frame::check_stream(&head)?;
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
        self.frames += 1;
        Ok(Some((head, self.rbuf.split_to(head.len).freeze())))
    }

    /// Answers a PING.
    pub(super) fn ping(&mut self, head: &FrameHead, payload: &[u8]) -> Result<(), FrameError> {
        let data = frame::ping(head, payload)?;
        if !head.is(flag::ACK) {
            frame::write_ping(&mut self.wbuf, data, true);
        }
        Ok(())
    }

    /// Applies a SETTINGS frame; gives the change of the initial window, for open streams.
    pub(super) fn settings(&mut self, head: &FrameHead, payload: &[u8]) -> Result<i64, FrameError> {
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
            setting::ENABLE_PUSH if value > 1 => bad = Some("ENABLE_PUSH other than 0 or 1"),
            setting::MAX_CONCURRENT_STREAMS => self.peer_max_streams = value as usize,
            setting::MAX_HEADER_LIST_SIZE => self.peer_max_list = value as usize,
            _ => {}
        })?;
        if let Some(what) = bad {
            // RFC 9113 6.5.2: an initial window over 2^31-1 is a FLOW_CONTROL_ERROR.
            let reason = match what {
                "initial window over 2^31-1" => reason::FLOW_CONTROL_ERROR,
                _ => reason::PROTOCOL_ERROR,
            };
            return Err(FrameError {
                kind: kind::SETTINGS,
                what,
                reason,
                stream: false,
            });
        }
        frame::write_settings(&mut self.wbuf, &[], true);
        Ok(delta)
    }

    /// Collects a header block; gives (stream, END_STREAM, block) once it is whole.
    pub(super) fn header_fragment(
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

    pub(super) fn goaway(&mut self, last: u32, code: u32, why: &str) {
        frame::write_goaway(&mut self.wbuf, last, code, why.as_bytes());
    }
}

/// A whole header block: one frame's, or joined from CONTINUATIONs.
pub(super) enum Block {
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
pub(super) fn write_headers(
    dst: &mut BytesMut,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max: usize,
) {
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
pub(super) fn send_within(
    queue: &mut VecDeque<Bytes>,
    window: &mut i64,
    link: &mut Link,
    stream: u32,
    end: bool,
) -> (usize, bool) {
    let mut sent = 0usize;
    let mut ended = false;
    while let Some(front) = queue.front_mut() {
        if link.wbuf.len() >= WRITE_LIMIT {
            // Whatever window the peer grants, no more than this waits to be written to it: the
            // rest stays with its stream, and flow control holds back the side it came from.
            link.held_back = true;
            break;
        }
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

pub(super) fn write_data(dst: &mut BytesMut, stream: u32, data: &[u8], end_stream: bool) {
    FrameHead {
        len: data.len(),
        kind: kind::DATA,
        flags: if end_stream { flag::END_STREAM } else { 0 },
        stream,
    }
    .write(dst);
    dst.put_slice(data);
}

/// A trailers-only response for `e` (docs/design.md's table), as a header block.
pub(super) fn error_block(e: &CallError) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    encode_field(&mut b, b":status", b"200", false);
    encode_field(&mut b, b"content-type", b"application/grpc", false);
    status_fields(&mut b, e.kind.grpc_status(), &e.to_string());
    encode_field(&mut b, b"fnmesh-error", e.kind.as_str().as_bytes(), false);
    b
}

/// `grpc-status` and `grpc-message` (percent-encoded as gRPC asks).
pub(super) fn status_fields(b: &mut Vec<u8>, status: u16, text: &str) {
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

impl Link {
    /// No more reads; what is buffered is still written once.
    pub(super) fn closed_after_flush(&mut self) {
        self.flush();
        self.closed = true;
    }
}

pub(super) fn ok_trailers() -> Vec<u8> {
    let mut t = Vec::new();
    encode_field(&mut t, b"grpc-status", b"0", false);
    t
}

/// A window grown by `increment` past 2^31-1 (RFC 9113 6.9.1): a FLOW_CONTROL_ERROR, of the
/// stream or (`stream` false) of the connection.
pub(super) fn grow_window(
    window: &mut i64,
    increment: u32,
    stream: bool,
) -> Result<(), FrameError> {
    let grown = *window + i64::from(increment);
    if grown > i64::from(MAX_WINDOW) {
        return Err(FrameError {
            kind: kind::WINDOW_UPDATE,
            what: "WINDOW_UPDATE past the largest window (2^31-1)",
            reason: reason::FLOW_CONTROL_ERROR,
            stream,
        });
    }
    *window = grown;
    Ok(())
}
