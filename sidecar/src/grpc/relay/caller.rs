//! The caller's side of a relay: its frames, routing and admission of new streams, request data
//! on its way up, response data on its way back, errors, deadlines and retries.

use super::*;

impl Relay<'_> {
    /// Handles every whole frame the caller sent.
    pub(super) fn caller_frames(&mut self) -> Result<(), FrameError> {
        while let Some((head, payload)) = self.caller.next_frame()? {
            match head.kind {
                kind::HEADERS | kind::CONTINUATION => {
                    if let Some((id, end, block)) = self.caller.header_fragment(&head, &payload)? {
                        self.request_headers(id, end, &block)?;
                    }
                }
                kind::DATA => {
                    self.not_idle(&head)?;
                    self.caller.received(head.len)?;
                    let data = frame::unpad(&head, &payload)?;
                    if self.ended_by_caller(head.stream) {
                        self.caller.credit(head.len);
                        self.reset(head.stream, reason::STREAM_CLOSED);
                        continue;
                    }
                    let data = payload.slice_ref(data);
                    self.caller_data(head.stream, head.len, data, head.is(flag::END_STREAM));
                }
                kind::WINDOW_UPDATE => {
                    self.not_idle(&head)?;
                    self.caller_window_update(&head, &payload)?;
                }
                kind::SETTINGS => {
                    let delta = self.caller.settings(&head, &payload)?;
                    if delta != 0 {
                        for s in self.streams.values_mut() {
                            s.windows.send_caller += delta;
                        }
                    }
                }
                kind::PING => self.caller.ping(&head, &payload)?,
                kind::PRIORITY => match frame::priority(&head, &payload) {
                    Ok(on) if on != head.stream => {}
                    Ok(_) => self.reset(head.stream, reason::PROTOCOL_ERROR),
                    Err(e) => self.reset(head.stream, e.reason),
                },
                kind::RST_STREAM => {
                    self.not_idle(&head)?;
                    frame::rst_stream(&head, &payload)?;
                    self.caller_closed.push(head.stream);
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

    /// RFC 9113 5.1: DATA, RST_STREAM or WINDOW_UPDATE on a stream the caller has not opened
    /// (idle: above the highest it opened, or even) is a connection error PROTOCOL_ERROR.
    fn not_idle(&self, head: &FrameHead) -> Result<(), FrameError> {
        let id = head.stream;
        if id != 0 && (id > self.last_stream || id % 2 == 0) {
            return Err(FrameError {
                kind: head.kind,
                what: "a frame on an idle stream",
                reason: reason::PROTOCOL_ERROR,
                stream: false,
            });
        }
        Ok(())
    }

    /// Whether the caller has ended stream `id` (its END_STREAM, or its RST_STREAM a moment
    /// ago): DATA or HEADERS on it is then a stream error STREAM_CLOSED (RFC 9113 5.1). Frames on
    /// streams fnmesh reset, or that fnmesh answered while the caller was still sending, are
    /// ignored instead, as the RFC asks.
    fn ended_by_caller(&mut self, id: u32) -> bool {
        match self.streams.get(&id) {
            Some(s) => s.caller_done,
            None => self.caller_closed.take(id),
        }
    }

    /// Ends stream `id` with RST_STREAM `code`: the instance's side is cancelled.
    pub(super) fn reset(&mut self, id: u32, code: u32) {
        frame::write_rst_stream(&mut self.caller.wbuf, id, code);
        self.reset_here.push(id);
        self.cancel_up(id, reason::CANCEL);
        self.streams.remove(&id);
        self.watches.remove(&id);
    }

    /// A caller's request headers: routed, admitted, and sent on to an instance (or queued).
    pub(super) fn request_headers(
        &mut self,
        id: u32,
        end: bool,
        block: &[u8],
    ) -> Result<(), FrameError> {
        if self.streams.contains_key(&id) || (id <= self.last_stream && id % 2 == 1) {
            return self.later_headers(id, end, block);
        }
        if id % 2 == 0 {
            return Err(FrameError {
                kind: kind::HEADERS,
                what: "a new stream's identifier must be odd",
                reason: reason::PROTOCOL_ERROR,
                stream: false,
            });
        }
        self.last_stream = id;
        // The path goes into a buffer the connection reuses.
        let mut path = std::mem::take(&mut self.path);
        let egress = self.front.services.is_some();
        let head = match RequestHead::decode(&mut self.caller.decoder, block, &mut path, egress) {
            Ok(head) => head,
            Err(fnmesh_codec::hpack::HpackError::ListTooLarge { .. }) => {
                self.reset(id, reason::PROTOCOL_ERROR);
                self.path = path;
                return Ok(());
            }
            Err(_) => return Err(undecodable()),
        };
        // A request that ends with its headers and declares a body is malformed too.
        let empty_but_declared = end && head.content_length.is_some_and(|n| n != 0);
        if head.malformed || !head.has_path || empty_but_declared {
            self.reset(id, reason::PROTOCOL_ERROR);
        } else if self.draining || self.streams.len() >= MAX_STREAMS as usize {
            self.reset(id, reason::REFUSED_STREAM);
        } else {
            let mut stream = Stream::new(head.block, end, self.caller.peer_window);
            stream.content_left = head.content_length;
            stream.list_size = head.list_size;
            stream.hop = head.hop;
            let to = Destination {
                path: &path,
                authority: head.authority.as_deref(),
            };
            self.open_stream(id, stream, to, head.timeout, head.parent);
        }
        self.path = path;
        Ok(())
    }

    /// Trailers of a request (gRPC requests have none worth passing), or headers on a stream
    /// already answered: decoded all the same, to keep the table in step. Trailers must end the
    /// stream and hold no pseudo-header (RFC 9113 8.1); headers on a stream the caller ended
    /// are STREAM_CLOSED (5.1).
    fn later_headers(&mut self, id: u32, end: bool, block: &[u8]) -> Result<(), FrameError> {
        let mut pseudo = false;
        let decoded = self
            .caller
            .decoder
            .decode(block, |f| pseudo |= f.name.first() == Some(&b':'));
        if decoded.is_err() {
            return Err(undecodable());
        }
        let open = self.streams.contains_key(&id);
        if self.ended_by_caller(id) {
            self.reset(id, reason::STREAM_CLOSED);
        } else if !open && !self.reset_here.contains(id) {
            // RFC 9113 5.1.1: a stream below the highest opened that was never opened (or was
            // closed long ago: fnmesh keeps no record of every stream).
            return Err(FrameError {
                kind: kind::HEADERS,
                what: "HEADERS on a closed stream, or a stream identifier below the last",
                reason: reason::PROTOCOL_ERROR,
                stream: false,
            });
        } else if open && (pseudo || !end) {
            self.reset(id, reason::PROTOCOL_ERROR);
        } else if end {
            self.caller_data(id, 0, Bytes::new(), true);
        }
        Ok(())
    }

    /// A new stream goes to its function (or is answered at once).
    fn open_stream(
        &mut self,
        id: u32,
        mut stream: Stream,
        to: Destination<'_>,
        timeout: Option<Duration>,
        parent: Option<Box<crate::trace::Parent>>,
    ) {
        match self.route(to, timeout, &mut stream, parent.as_deref()) {
            Ok(None) => {
                self.streams.insert(id, stream);
            }
            Ok(Some(lease)) => {
                self.streams.insert(id, stream);
                self.leased(id, Ok(lease));
            }
            Err(e) if e.kind == Kind::NotWarm => {
                // A forwarded stream with no room here: refused as never processed, so the
                // node that sent it serves it itself.
                stream.outcome(Outcome::Error(e.kind));
                self.streams.insert(id, stream);
                self.reset(id, reason::REFUSED_STREAM);
            }
            Err(e) => {
                // Answered now; what the caller still sends on the stream is dropped. A call
                // admitted but refused a slot is counted here (`fail`).
                self.streams.insert(id, stream);
                self.fail(id, &e);
            }
        }
    }

    /// More room to send to the caller, on its connection or one stream. Past 2^31-1 the
    /// connection fails, or the stream is reset (and so is the instance's).
    fn caller_window_update(&mut self, head: &FrameHead, payload: &[u8]) -> Result<(), FrameError> {
        let grown = frame::window_update(head, payload).and_then(|n| match head.stream {
            0 => grow_window(&mut self.caller.send_window, n, false),
            id => match self.streams.get_mut(&id) {
                Some(s) => grow_window(&mut s.windows.send_caller, n, true),
                None => Ok(()),
            },
        });
        match grown {
            Ok(()) if head.stream == 0 => {
                let ids: Vec<u32> = self.streams.keys().copied().collect();
                for id in ids {
                    self.pump_caller(id);
                }
            }
            Ok(()) => self.pump_caller(head.stream),
            Err(e) if e.stream => self.reset(head.stream, e.reason),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Routes a stream; gives a slot on an instance when one is free now, else queues for one.
    pub(super) fn route(
        &mut self,
        to: Destination<'_>,
        caller_timeout: Option<Duration>,
        stream: &mut Stream,
        parent: Option<&crate::trace::Parent>,
    ) -> Result<Option<Lease>, CallError> {
        let target = grpc::target(self.front, to.path, to.authority)
            .inspect_err(|e| crate::metrics::global().unrouted("grpc", e.kind))?;
        let (function, method) = match target {
            grpc::Target::Function(function, method) => (function, method),
            grpc::Target::Health { watch } => {
                stream.health = Some(Vec::new());
                stream.watch = watch;
                return Ok(None);
            }
        };
        let admitted = function.admit(method, caller_timeout, None, parent)?;
        // Outcomes are recorded in the breaker and the metrics; in the instance's ejection
        // count when the function has breakers.
        stream.verdict = Some(admitted.verdict);
        stream.classify = admitted.classify;
        stream.deadline = admitted.deadline;
        if let Some(d) = admitted.deadline {
            self.timers.push(d, self.last_stream);
        }
        stream.budget = admitted.budget.unwrap_or_default();
        stream.function = Some(function.clone());
        stream._active = Some(self.front.drain.track());
        stream.retry = admitted.retry.map(|attempts| Retrying {
            attempts,
            copy: stream.request.clone().map(|block| RequestCopy {
                block,
                data: Vec::new(),
                size: 0,
            }),
        });
        if let Some(lease) = function.pool.try_acquire()? {
            return Ok(Some(lease));
        }
        if let Some(peers) = function.peers.get() {
            if stream.hop {
                return Err(CallError::new(
                    Kind::NotWarm,
                    format!(
                        "function {}: no ready instance with room on this node",
                        function.name
                    ),
                ));
            }
            function.peer_load_check(peers);
            if let Some(lease) = to_peer(peers, stream, 0) {
                return Ok(Some(lease));
            }
        }
        self.queue(&function, stream.deadline, stream.budget);
        Ok(None)
    }

    /// A stream on a peer that refused it (or could not be reached, or failed before answering
    /// a request that may run twice) goes to the next peer, or is served here: `true` when it
    /// was taken care of.
    fn peer_fallback(&mut self, id: u32, why: Failure) -> bool {
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        let Some(tried) = s.peer.take() else {
            return false;
        };
        let replays = s.retry.as_ref().is_some_and(|r| r.attempts.replays());
        let Some(copy) = tried.copy.filter(|_| !s.answered) else {
            return false;
        };
        if why != Failure::Connect && !(why == Failure::Unavailable && replays) {
            return false;
        }
        let Some(function) = s.function.clone() else {
            return false;
        };
        let peers = function.peers.get();
        if let (Some(lease), Some(peers)) = (s.lease.take(), peers) {
            if why == Failure::Connect {
                peers.cool(&lease.instance, crate::governance::services::PEER_COOL);
            }
        }
        s.request = Some(copy.block.clone());
        s.to_up = copy.data.iter().cloned().collect();
        s.up_done = false;
        let (deadline, budget) = (s.deadline, s.budget);
        self.cancel_up(id, reason::CANCEL);
        let Some(s) = self.streams.get_mut(&id) else {
            return true;
        };
        s.peer = Some(PeerTry {
            copy: Some(copy),
            tries: tried.tries,
        });
        let next = peers.and_then(|p| to_peer(p, s, tried.tries));
        match next {
            Some(lease) => self.leased(id, Ok(lease)),
            None => {
                s.peer = None;
                self.queue_for(id, function, deadline, budget, None);
            }
        }
        true
    }

    /// Waits for a slot for the stream routed last.
    pub(super) fn queue(
        &mut self,
        function: &Arc<Function>,
        deadline: Option<Instant>,
        budget: Duration,
    ) {
        self.queue_for(self.last_stream, function.clone(), deadline, budget, None);
    }

    /// Waits for a slot for stream `id`: after `then` (a retry's backoff), and on another
    /// instance than `then`'s when one has room.
    pub(super) fn queue_for(
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

    /// Request data from the caller.
    pub(super) fn caller_data(&mut self, id: u32, len: usize, data: Bytes, end: bool) {
        let Some(s) = self.streams.get_mut(&id) else {
            // A stream already answered or reset: its bytes are dropped, and given back.
            self.caller.credit(len);
            return;
        };
        if s.caller_done {
            self.caller.credit(len);
            return;
        }
        s.windows.recv_caller -= len as i64;
        if s.windows.recv_caller < 0 {
            // Past the stream's window: the stream ends, the bytes are given back.
            self.caller.credit(len);
            self.reset(id, reason::FLOW_CONTROL_ERROR);
            return;
        }
        if let Some(left) = s.content_left {
            // RFC 9113 8.1.1: DATA that does not add up to the declared content-length.
            match left.checked_sub(data.len() as u64) {
                Some(left) if !end || left == 0 => s.content_left = Some(left),
                _ => {
                    self.caller.credit(len);
                    self.reset(id, reason::PROTOCOL_ERROR);
                    return;
                }
            }
        }
        // Padding is given back at once; the data when it has gone on.
        self.caller.credit(len - data.len());
        s.windows.unacked_caller += (len - data.len()) as u32;
        s.caller_done = end;
        if let Some(h) = s.health.as_mut() {
            self.caller.credit(data.len());
            if h.len() + data.len() > MAX_HEALTH_REQUEST {
                // A HealthCheckRequest is a service name: nothing this large is one.
                s.health = None;
                let e = CallError::new(
                    Kind::TooLarge,
                    format!("health check request over {MAX_HEALTH_REQUEST} bytes"),
                );
                self.fail(id, &e);
                return;
            }
            h.extend_from_slice(&data);
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
            if let Some(RequestCopy {
                data: copy, size, ..
            }) = r.copy.as_mut()
            {
                *size += data.len();
                if !data.is_empty() {
                    copy.push(data.clone());
                }
                if *size > REPLAY_LIMIT {
                    r.copy = None;
                }
            }
        }
        if let Some(p) = s.peer.as_mut() {
            if let Some(copy) = p.copy.as_mut() {
                copy.size += data.len();
                if !data.is_empty() {
                    copy.data.push(data.clone());
                }
                if copy.size > REPLAY_LIMIT {
                    p.copy = None;
                }
            }
        }
        if !data.is_empty() {
            s.to_up.push_back(data);
        }
        self.pump_up(id);
    }

    /// Sends what the caller's windows allow of a stream's response data, then its trailers.
    pub(super) fn pump_caller(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        // The trailers end the stream, not the data.
        let (sent, _) = send_within(
            &mut s.to_caller,
            &mut s.windows.send_caller,
            &mut self.caller,
            id,
            false,
        );
        if sent > 0 {
            if let Some((i, up_id)) = s.up {
                let up = &mut self.ups[i];
                up.link.credit(sent);
                s.windows.unacked_up += sent as u32;
                if s.windows.unacked_up >= STREAM_WINDOW / 4 {
                    frame::write_window_update(&mut up.link.wbuf, up_id, s.windows.unacked_up);
                    s.windows.recv_up += i64::from(s.windows.unacked_up);
                    s.windows.unacked_up = 0;
                }
            }
        }
        if s.to_caller.is_empty() {
            if let Some(trailers) = s.trailers.take() {
                self.caller.send_headers(id, &trailers, true);
                self.finish(id);
            }
        }
    }

    /// Answers a stream with fnmesh's error, trailers-only (or, once response headers went out,
    /// as trailers), and ends it on the instance's side too.
    pub(super) fn fail(&mut self, id: u32, e: &CallError) {
        self.cancel_up(id, reason::CANCEL);
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if let Some(v) = s.verdict.as_mut() {
            v.record(Outcome::Error(e.kind));
        }
        if s.answered {
            let mut b = Vec::new();
            status_fields(&mut b, e.kind.grpc_status(), &e.to_string());
            s.to_caller.clear();
            self.caller.send_headers(id, &b, true);
        } else {
            s.answered = true;
            self.caller.send_headers(id, &error_block(e), true);
        }
        self.finish(id);
    }

    /// The response has ended: the stream is done. A caller still sending is told to stop.
    pub(super) fn finish(&mut self, id: u32) {
        self.watches.remove(&id);
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        if s.lease.is_some() {
            // Only what an instance served buys resets (MAX_EARLY_RESETS): streams fnmesh
            // answers itself cost a caller nothing to ask for.
            self.answered += 1;
        }
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
        if s.caller_done {
            self.caller_closed.push(id);
        } else {
            frame::write_rst_stream(&mut self.caller.wbuf, id, reason::NO_ERROR);
            self.reset_here.push(id);
        }
    }

    /// The earliest deadline of a stream still waiting for it.
    pub(super) fn next_timer(&mut self) -> Option<Instant> {
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
    pub(super) fn expire(&mut self) {
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
                // Instances are numbered from 1; a call still queued has none.
                let on = s
                    .lease
                    .as_ref()
                    .map(|l| format!(" instance {}", l.instance.id))
                    .unwrap_or_default();
                let e = CallError::new(
                    Kind::Timeout,
                    format!(
                        "function {}{on}: no response within this attempt's share of the deadline",
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

    /// Retries a failed attempt when the policy allows (on another instance, after a backoff);
    /// otherwise answers the caller with `e`. A stream a peer node had goes to the next peer
    /// or is served here first, when it can be.
    pub(super) fn retry_or_fail(&mut self, id: u32, e: &CallError, why: Failure) {
        if self.peer_fallback(id, why) {
            return;
        }
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
            let method = s
                .verdict
                .as_ref()
                .map_or(crate::metrics::UNKNOWN, |v| v.method());
            let reason = outcome::retry_reason(why);
            crate::metrics::global().retry(s.function(), method, reason);
            if let Some(v) = &s.verdict {
                v.retried();
            }
        }
        let (Some(wait), Some(r)) = (wait, s.retry.as_mut()) else {
            if why != Failure::Connect {
                s.outcome(Outcome::Error(e.kind));
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
            if let Some(RequestCopy { block, data, .. }) = &r.copy {
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

/// A slot on a peer node for `stream`, the `tried`th peer tried (up to `PEER_TRIES`): the
/// request keeps an unmarked copy and gets the hop marker.
fn to_peer(peers: &Arc<crate::instances::Pool>, stream: &mut Stream, tried: u32) -> Option<Lease> {
    if tried >= crate::governance::services::PEER_TRIES {
        return None;
    }
    let lease = peers.try_acquire().ok().flatten()?;
    let block = stream.request.as_mut()?;
    let copy = match stream.peer.take().and_then(|p| p.copy) {
        Some(copy) => copy,
        None => RequestCopy {
            block: block.clone(),
            data: Vec::new(),
            size: 0,
        },
    };
    encode_field(block, HOP.as_bytes(), b"1", false);
    stream.peer = Some(PeerTry {
        copy: Some(copy),
        tries: tried + 1,
    });
    Some(lease)
}

/// A header block that does not decode: the connection's HPACK state is lost.
fn undecodable() -> FrameError {
    FrameError {
        kind: kind::HEADERS,
        what: "header block does not decode (HPACK)",
        reason: reason::COMPRESSION_ERROR,
        stream: false,
    }
}

/// A request's header block as read: re-encoded for the instance without `grpc-timeout`, the
/// caller's timeout, whether it had a `:path` (written to the caller's buffer), and whether it
/// is malformed (a pseudo-header after a regular one, a connection-specific header).
struct RequestHead {
    block: Vec<u8>,
    timeout: Option<Duration>,
    has_path: bool,
    malformed: bool,
    /// The `content-length` the caller declared (RFC 9113 8.1.1: the DATA must add up to it).
    content_length: Option<u64>,
    /// The header list's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it.
    list_size: usize,
    /// With traces on: the caller's `traceparent` (and `tracestate`), taken out of the block
    /// (the instance gets fnmesh's span as its parent instead).
    parent: Option<Box<crate::trace::Parent>>,
    /// On the egress listener: `:authority`, which may name a registered service.
    authority: Option<Box<str>>,
    /// Another fnmesh node forwarded it (header `fnmesh-hop`, taken out of the block).
    hop: bool,
}

/// Where a new stream asks to go: its `:path`, and on the egress listener its `:authority`.
#[derive(Clone, Copy)]
pub(super) struct Destination<'a> {
    pub path: &'a str,
    pub authority: Option<&'a str>,
}

impl RequestHead {
    fn decode(
        decoder: &mut Decoder,
        block: &[u8],
        path: &mut String,
        egress: bool,
    ) -> Result<RequestHead, fnmesh_codec::hpack::HpackError> {
        path.clear();
        let mut head = RequestHead {
            block: Vec::with_capacity(block.len() + 64),
            timeout: None,
            has_path: false,
            malformed: false,
            content_length: None,
            list_size: 0,
            parent: None,
            authority: None,
            hop: false,
        };
        let tracing = crate::trace::enabled();
        let mut state = None;
        let mut pseudo_done = false;
        // Pseudo-headers seen, one bit each (:method, :scheme, :path, :authority).
        let mut seen = 0u8;
        decoder.decode(block, |f| {
            head.malformed |= !f.valid;
            head.list_size += f.name.len() + f.value.len() + fnmesh_codec::hpack::ENTRY_OVERHEAD;
            if f.name.first() == Some(&b':') {
                let bit = match f.name {
                    b":method" => 1,
                    b":scheme" => 2,
                    b":path" => 4,
                    b":authority" => 8,
                    _ => 16, // unknown in a request (":status" included)
                };
                head.malformed |= pseudo_done || seen & bit != 0 || bit == 16;
                seen |= bit;
                if bit == 8 && egress {
                    head.authority = std::str::from_utf8(f.value).ok().map(Into::into);
                }
                if bit == 4 {
                    path.push_str(&String::from_utf8_lossy(f.value));
                    head.has_path = true;
                    head.malformed |= f.value.is_empty();
                }
            } else {
                pseudo_done = true;
                if f.name == HOP.as_bytes() {
                    head.hop = true;
                    return;
                }
                if f.name == b"grpc-timeout" {
                    head.timeout = std::str::from_utf8(f.value)
                        .ok()
                        .and_then(grpc::parse_grpc_timeout);
                    return;
                }
                if tracing && f.name == b"traceparent" {
                    head.parent = crate::trace::parse_traceparent(f.value).map(Box::new);
                    return;
                }
                if tracing && f.name == b"tracestate" {
                    state = Some(String::from_utf8_lossy(f.value).into_owned());
                    return;
                }
                if f.name == b"content-length" {
                    let n = std::str::from_utf8(f.value)
                        .ok()
                        .and_then(|v| v.parse().ok());
                    head.malformed |= n.is_none() || head.content_length.is_some();
                    head.content_length = n;
                }
                head.malformed |= matches!(
                    f.name,
                    b"connection"
                        | b"keep-alive"
                        | b"proxy-connection"
                        | b"transfer-encoding"
                        | b"upgrade"
                ) || (f.name == b"te" && f.value != b"trailers");
            }
            encode_field(&mut head.block, f.name, f.value, f.sensitive);
        })?;
        // :method, :scheme and :path are required.
        head.malformed |= seen & 7 != 7;
        if let Some(p) = head.parent.as_mut() {
            p.state = state;
        }
        Ok(head)
    }
}
