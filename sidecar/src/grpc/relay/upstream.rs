//! The instances' side of a relay: connections to instances (opened, reused between caller
//! connections, parked when the caller leaves), their streams, and what comes back on them.

use super::*;

/// A connection to an instance.
pub(super) struct Up {
    pub(super) link: Link,
    pub(super) instance: Arc<Instance>,
    pub(super) next_stream: u32,
    /// Its streams: instance stream -> caller stream.
    pub(super) streams: ById<u32, u32>,
    /// The instance has sent a frame: before that, a request on the connection cannot have
    /// been processed (a server's first frame is its SETTINGS).
    pub(super) heard: bool,
    /// The instance's SETTINGS have come: until then its SETTINGS_MAX_CONCURRENT_STREAMS is not
    /// known, and streams wait in `pending` instead of being opened past it.
    pub(super) settled: bool,
    pub(super) pending: Vec<u32>,
    /// Counts the connection as open to its instance (`None` once let go of for a stop).
    open: Option<Open>,
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.close(&self.link.sock);
        }
    }
}

impl Up {
    fn new(link: Link, instance: Arc<Instance>) -> Up {
        Up {
            link,
            next_stream: 1,
            streams: ById::default(),
            heard: false,
            settled: false,
            pending: Vec::new(),
            open: Some(instance.open()),
            instance,
        }
    }

    /// Whether a new stream to `instance` may go on this connection: open, and within the
    /// instance's SETTINGS_MAX_CONCURRENT_STREAMS (once known). Instances are told apart by
    /// identity: ids are only unique within one pool (two functions, or a function and its
    /// peers, both have an instance 1).
    fn takes(&self, instance: &Arc<Instance>) -> bool {
        Arc::ptr_eq(&self.instance, instance)
            && !self.link.closed
            && !self.link.going_away
            && (!self.settled || self.streams.len() < self.link.peer_max_streams)
    }
}

/// The most connections one caller connection opens to one instance (more only when the
/// instance's SETTINGS_MAX_CONCURRENT_STREAMS is reached on each).
const MAX_UPS_PER_INSTANCE: usize = 32;

/// Instance connections kept idle per instance and worker.
pub(super) const MAX_IDLE: usize = 4;
/// Past this stream number a connection takes no new streams (HTTP/2 allows up to 2^31-1).
pub(super) const MAX_STREAM_ID: u32 = 1 << 30;

/// Leaves an instance connection whose caller connection ended: one in good order waits (at
/// most [`MAX_IDLE`] per instance and worker) for the worker's next caller connection; any
/// other is closed.
pub(super) fn park(mut up: Up) {
    up.link.flush();
    let reusable = !up.link.closed
        && !up.link.going_away
        && up.streams.is_empty()
        && up.pending.is_empty()
        && up.link.wbuf.is_empty()
        && up.link.block.is_none()
        && up.next_stream < MAX_STREAM_ID;
    if reusable {
        let instance = up.instance.clone();
        let mut idle = lock(instance.idle::<Up>());
        // Under the list's lock: a stop clears the lists after it marks the instance.
        if idle.len() < MAX_IDLE && !instance.is_stopping() {
            idle.push(up);
            return;
        }
    }
    up.link.goaway(0, reason::NO_ERROR, "");
    up.link.flush();
}

impl Relay<'_> {
    /// Lets go of connections to stopping instances: each closes once it carries no stream
    /// (GOAWAY, then its end, which the instance's stop watches for the instance's answer).
    pub(super) fn leave_stopping(&mut self) {
        self.stopping_ups = false;
        for up in self.ups.iter_mut() {
            if up.open.is_none() || !up.instance.is_stopping() {
                continue;
            }
            if !up.streams.is_empty() || !up.pending.is_empty() {
                self.stopping_ups = true;
                continue;
            }
            up.link.goaway(0, reason::NO_ERROR, "instance stopping");
            up.link.flush();
            if let Some(open) = up.open.take() {
                open.close(&up.link.sock);
            }
            up.link.closed = true;
        }
    }
}

/// An idle connection to `instance` that is still open: what it received while idle (a PING, a
/// GOAWAY) stays buffered and is handled once it is in use again.
pub(super) fn take_idle(instance: &Instance) -> Option<Up> {
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

impl Relay<'_> {
    /// A stream got its slot (or failed to): it goes to a connection to that instance.
    pub(super) fn leased(&mut self, id: u32, result: Result<Lease, CallError>) {
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
        if let Some(v) = &s.verdict {
            v.leased(&lease.instance);
        }
        let instance = lease.instance.clone();
        s.lease = Some(lease);
        self.place(id, instance);
    }

    /// Puts a stream that has its slot on a connection to its instance: one open with room
    /// under the instance's stream limit, an idle one, or a new one.
    fn place(&mut self, id: u32, instance: Arc<Instance>) {
        if let Some(i) = self.ups.iter().position(|u| u.takes(&instance)) {
            self.start_on(id, i);
            return;
        }
        let open = self
            .ups
            .iter()
            .filter(|u| Arc::ptr_eq(&u.instance, &instance) && !u.link.closed)
            .count();
        if open >= MAX_UPS_PER_INSTANCE {
            // An instance that takes (almost) no streams is not given connections without end.
            let e = CallError::new(
                Kind::Unavailable,
                format!(
                    "function instance {}: its SETTINGS_MAX_CONCURRENT_STREAMS is reached on {open} connections",
                    instance.id
                ),
            );
            self.retry_or_fail(id, &e, Failure::Connect);
            return;
        }
        if let Some(up) = take_idle(&instance) {
            let i = self.add_up(up);
            self.start_on(id, i);
            return;
        }
        let waiting = self.waiting.entry(instance.id).or_default();
        waiting.push(id);
        if waiting.len() == 1 {
            self.connecting.push(Box::pin(async move {
                let stream = match instance.take_probe() {
                    Some(probe) => Ok(probe),
                    None => match instance.connect().await {
                        Ok(stream) => Ok(stream),
                        Err(e) if is_local(&e) => Err((format!("connect failed: {e}"), true)),
                        Err(e) => {
                            // A crash takes the instance out before a retry could pick it.
                            instance.exits_within(EXIT_GRACE).await;
                            Err((format!("connect failed: {e}"), false))
                        }
                    },
                };
                (instance, stream)
            }));
        }
    }

    /// Opens the stream on connection `i`, or has it wait there for the instance's SETTINGS.
    fn start_on(&mut self, id: u32, i: usize) {
        if self.ups[i].settled {
            self.open_up(id, i);
        } else {
            self.ups[i].pending.push(id);
        }
    }

    /// Whether stream `id` is still waiting to be sent to an instance (a connection's pending
    /// list may still name a stream that ended or went elsewhere).
    fn unsent(&self, id: u32) -> bool {
        self.streams
            .get(&id)
            .is_some_and(|s| s.request.is_some() && s.up.is_none())
    }

    /// The instance's first SETTINGS on connection `i`: its waiting streams open, as many as
    /// its stream limit takes; the rest go to other connections.
    fn settled(&mut self, i: usize) {
        let up = &mut self.ups[i];
        up.settled = true;
        let instance = up.instance.clone();
        for id in std::mem::take(&mut up.pending) {
            if !self.unsent(id) {
                continue; // ended (or moved on) meanwhile
            }
            if self.ups[i].takes(&instance) {
                self.open_up(id, i);
            } else {
                self.place(id, instance.clone());
            }
        }
    }

    /// A connection to an instance is open (or could not be): its waiting streams go on it.
    pub(super) fn connected(
        &mut self,
        instance: Arc<Instance>,
        result: Result<Socket, (String, bool)>,
    ) {
        let waiting = self.waiting.remove(&instance.id).unwrap_or_default();
        let sock = match result {
            Ok(sock) => sock,
            Err((e, local)) => {
                for id in waiting {
                    let Some(s) = self.streams.get(&id) else {
                        continue;
                    };
                    if let Some(l) = &s.lease {
                        l.broken(local);
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
        let mut link = Link::new(sock, BytesMut::with_capacity(16 << 10));
        link.wbuf.put_slice(HTTP2_PREFACE);
        link.greet(true);
        let i = self.add_up(Up::new(link, instance));
        self.ups[i].pending = waiting;
    }

    /// Adds an instance connection, in a closed one's slot when there is one.
    pub(super) fn add_up(&mut self, up: Up) -> usize {
        match self
            .ups
            .iter()
            .position(|u| u.link.closed && u.streams.is_empty() && u.pending.is_empty())
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
    pub(super) fn open_up(&mut self, id: u32, i: usize) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let up = &mut self.ups[i];
        if s.list_size > up.link.peer_max_list {
            let e = CallError::new(
                Kind::TooLarge,
                format!(
                    "function {}: request headers of {} bytes are over the instance's SETTINGS_MAX_HEADER_LIST_SIZE of {}",
                    s.function(),
                    s.list_size,
                    up.link.peer_max_list
                ),
            );
            self.fail(id, &e);
            return;
        }
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
        if let Some(span) = s.verdict.as_ref().and_then(|v| v.span()) {
            encode_field(
                &mut block,
                b"traceparent",
                span.traceparent().as_bytes(),
                false,
            );
            if let Some(state) = span.tracestate() {
                encode_field(&mut block, b"tracestate", state.as_bytes(), false);
            }
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
        s.windows.send_up = i64::from(up.link.peer_window);
        let end = s.caller_done && s.to_up.is_empty();
        s.up_done = end;
        up.link.send_headers(up_id, &block, end);
        self.pump_up(id);
    }

    /// Sends what the instance's windows allow of a stream's request data.
    pub(super) fn pump_up(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let Some((i, up_id)) = s.up else {
            return;
        };
        let up = &mut self.ups[i];
        let (sent, ended) = send_within(
            &mut s.to_up,
            &mut s.windows.send_up,
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
            s.windows.unacked_caller += sent as u32;
            if !s.caller_done && s.windows.unacked_caller >= STREAM_WINDOW / 4 {
                frame::write_window_update(&mut self.caller.wbuf, id, s.windows.unacked_caller);
                s.windows.recv_caller += i64::from(s.windows.unacked_caller);
                s.windows.unacked_caller = 0;
            }
        }
    }

    /// Handles every whole frame instance connection `i` sent; a connection that fails fails
    /// its streams.
    pub(super) fn up_frames(&mut self, i: usize) {
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

    /// One frame from instance connection `i`.
    pub(super) fn up_frame(
        &mut self,
        i: usize,
        head: FrameHead,
        payload: Bytes,
    ) -> Result<(), FrameError> {
        let up = &mut self.ups[i];
        up.heard = true;
        match head.kind {
            kind::HEADERS | kind::CONTINUATION => {
                if let Some((up_id, end, block)) = up.link.header_fragment(&head, &payload)? {
                    self.response_headers(i, up_id, end, &block)?;
                }
            }
            kind::DATA => self.up_data(i, &head, payload)?,
            kind::WINDOW_UPDATE => self.up_window_update(i, &head, &payload)?,
            kind::SETTINGS => {
                let delta = up.link.settings(&head, &payload)?;
                if delta != 0 {
                    for id in up.streams.values() {
                        if let Some(s) = self.streams.get_mut(id) {
                            s.windows.send_up += delta;
                        }
                    }
                }
                if !up.settled && !head.is(flag::ACK) {
                    self.settled(i);
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
            kind::GOAWAY => self.up_goaway(i, &head, &payload)?,
            _ => {}
        }
        Ok(())
    }

    /// Response data from an instance, on its way to the caller within the stream's window.
    fn up_data(&mut self, i: usize, head: &FrameHead, payload: Bytes) -> Result<(), FrameError> {
        let up = &mut self.ups[i];
        up.link.received(head.len)?;
        let data = frame::unpad(head, &payload)?;
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
        s.windows.recv_up -= head.len as i64;
        s.windows.unacked_up += (head.len - data.len()) as u32;
        if s.windows.recv_up < 0 {
            // The instance broke the stream's window: the stream fails.
            up.link.credit(data.len());
            if let Some((_, up_id)) = s.up.take() {
                up.streams.remove(&up_id);
                frame::write_rst_stream(&mut up.link.wbuf, up_id, reason::FLOW_CONTROL_ERROR);
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
            s.instance_done();
        }
        self.pump_caller(id);
        Ok(())
    }

    /// More room to send to an instance, on its connection or one stream.
    fn up_window_update(
        &mut self,
        i: usize,
        head: &FrameHead,
        payload: &[u8],
    ) -> Result<(), FrameError> {
        let up = &mut self.ups[i];
        let caller_stream = up.streams.get(&head.stream).copied();
        let grown = frame::window_update(head, payload).and_then(|n| match caller_stream {
            _ if head.stream == 0 => grow_window(&mut up.link.send_window, n, false),
            Some(id) => match self.streams.get_mut(&id) {
                Some(s) => grow_window(&mut s.windows.send_up, n, true),
                None => Ok(()),
            },
            None => Ok(()),
        });
        match grown {
            Ok(()) if head.stream == 0 => {
                let ids: Vec<u32> = up.streams.values().copied().collect();
                for id in ids {
                    self.pump_up(id);
                }
            }
            Ok(()) => {
                if let Some(id) = caller_stream {
                    self.pump_up(id);
                }
            }
            Err(e) if e.stream => {
                frame::write_rst_stream(&mut up.link.wbuf, head.stream, e.reason);
                if let Some(id) = caller_stream {
                    up.streams.remove(&head.stream);
                    if let Some(s) = self.streams.get_mut(&id) {
                        s.up = None;
                    }
                    self.up_reset(id, reason::INTERNAL_ERROR);
                }
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// An instance going away: streams past its last processed one were never seen and may go
    /// elsewhere.
    fn up_goaway(&mut self, i: usize, head: &FrameHead, payload: &[u8]) -> Result<(), FrameError> {
        let up = &mut self.ups[i];
        let (last, _, _) = frame::goaway(head, payload)?;
        up.link.going_away = true;
        // Streams never sent on it go elsewhere.
        let instance = up.instance.clone();
        for id in std::mem::take(&mut up.pending) {
            if self.unsent(id) {
                self.place(id, instance.clone());
            }
        }
        let up = &mut self.ups[i];
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
        Ok(())
    }

    /// Response headers (or trailers) from an instance, passed to the caller.
    pub(super) fn response_headers(
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
            s.peer = None;
            if let Some(r) = s.retry.as_mut() {
                r.copy = None;
            }
            if end {
                s.outcome(match status {
                    Some(200) => outcome::grpc_status(grpc_status.as_deref()),
                    _ => Outcome::Failed,
                });
                self.caller.send_headers(id, &out, true);
                self.finish(id);
                return Ok(());
            }
            if status != Some(200) {
                s.outcome(Outcome::Failed);
            }
            self.caller.send_headers(id, &out, false);
            return Ok(());
        }
        // Trailers.
        s.outcome(outcome::grpc_status(grpc_status.as_deref()));
        s.trailers = Some(out);
        s.instance_done();
        self.pump_caller(id);
        Ok(())
    }

    /// The instance reset a stream, or will never process it (REFUSED_STREAM).
    pub(super) fn up_reset(&mut self, id: u32, code: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.answered {
            s.outcome(Outcome::Failed);
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
    pub(super) fn up_failed(&mut self, i: usize, why: &str, code: u32) {
        let up = &mut self.ups[i];
        if !up.link.closed {
            up.link.goaway(0, code, why);
            up.link.flush();
            up.link.closed = true;
        }
        let instance = up.instance.id;
        let heard = up.heard;
        let mut ids: Vec<u32> = up.streams.drain().map(|(_, id)| id).collect();
        // Streams still waiting for its SETTINGS were never sent: as lost before the instance
        // said anything.
        let pending = std::mem::take(&mut up.pending);
        let sent = ids.len();
        ids.extend(pending.into_iter().filter(|&id| self.unsent(id)));
        for (n, id) in ids.into_iter().enumerate() {
            let heard = heard && n < sent;
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.up = None;
            if s.answered {
                s.outcome(Outcome::Failed);
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
                    l.broken(false);
                }
                Failure::Connect
            };
            self.retry_or_fail(id, &e, failure);
        }
    }

    /// Resets the instance's side of a stream (if it has one and it is still open).
    pub(super) fn cancel_up(&mut self, id: u32, code: u32) {
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
}
