//! Where one caller stream stands: its two sides, windows, deadline, retry state and verdict.

use super::*;

/// Where a caller's stream stands.
pub(super) struct Stream {
    /// The instance connection and its stream, once the call has one.
    pub(super) up: Option<(usize, u32)>,
    /// The request's header block, encoded for the instance (without `grpc-timeout`), until
    /// it is sent.
    pub(super) request: Option<Vec<u8>>,
    /// Request data not yet sent to the instance, and whether the caller ended its side.
    pub(super) to_up: VecDeque<Bytes>,
    pub(super) caller_done: bool,
    /// END_STREAM went to the instance.
    pub(super) up_done: bool,
    /// Response data not yet sent to the caller (its window was full), then the trailers.
    pub(super) to_caller: VecDeque<Bytes>,
    pub(super) trailers: Option<Vec<u8>>,
    /// Response headers went to the caller.
    pub(super) answered: bool,
    pub(super) windows: Windows,
    pub(super) lease: Option<Lease>,
    pub(super) deadline: Option<Instant>,
    pub(super) budget: Duration,
    /// The function, once routed.
    pub(super) function: Option<Arc<Function>>,
    pub(super) verdict: Option<Verdict>,
    /// Whether outcomes count in the instance's ejection (the function has breakers).
    pub(super) classify: bool,
    /// A health check: the request's bytes, answered here; `watch` for `Watch`.
    pub(super) health: Option<Vec<u8>>,
    pub(super) watch: bool,
    /// Retries: the attempts, and a copy of the request while it may be sent again.
    pub(super) retry: Option<Retrying>,
    /// Another fnmesh node forwarded it (header `fnmesh-hop`): served here or refused.
    pub(super) hop: bool,
    /// On a peer node: the request as it goes to an instance here should the peer refuse it
    /// or fail before answering, and the peers tried so far.
    pub(super) peer: Option<PeerTry>,
    /// This attempt's share of the deadline, when a later attempt may follow a timeout.
    pub(super) attempt_deadline: Option<Instant>,
    /// What the caller's DATA must still add up to, when it declared a `content-length`.
    pub(super) content_left: Option<u64>,
    /// The request's header list size (SETTINGS_MAX_HEADER_LIST_SIZE's measure).
    pub(super) list_size: usize,
    pub(super) _active: Option<TaskTrackerToken>,
}

/// A stream's flow control, on both sides.
pub(super) struct Windows {
    /// What we may still send on the stream, to the caller and to the instance.
    pub(super) send_caller: i64,
    pub(super) send_up: i64,
    /// Bytes taken from each side and passed on, not yet given back to that side's stream window.
    pub(super) unacked_caller: u32,
    pub(super) unacked_up: u32,
    /// What each side may still send on the stream.
    pub(super) recv_caller: i64,
    pub(super) recv_up: i64,
}

/// A stream's retry state: the attempts (`governance::retry`), and a copy of the request
/// while it may be sent again after an instance got it; the copy is dropped once over
/// [`REPLAY_LIMIT`] or once the response starts.
pub(super) struct Retrying {
    pub(super) attempts: Attempts,
    pub(super) copy: Option<RequestCopy>,
}

/// A request as it may go again: its header block (without `grpc-timeout`), its data so far,
/// and the data's size.
pub(super) struct RequestCopy {
    pub(super) block: Vec<u8>,
    pub(super) data: Vec<Bytes>,
    pub(super) size: usize,
}

/// A stream sent to a peer node (docs/multi-node.md): the request unmarked, kept until the peer
/// answers (dropped past [`REPLAY_LIMIT`]), and how many peers were tried.
pub(super) struct PeerTry {
    pub(super) copy: Option<RequestCopy>,
    pub(super) tries: u32,
}

/// The most of a request kept for sending it again.
pub(super) const REPLAY_LIMIT: usize = 1 << 20;

impl Stream {
    /// A stream the caller opened with `request` (the header block as the instance gets it),
    /// `caller_done` when that was all it sends; the caller's window for it is `caller_window`.
    pub(super) fn new(request: Vec<u8>, caller_done: bool, caller_window: u32) -> Stream {
        Stream {
            up: None,
            request: Some(request),
            to_up: VecDeque::new(),
            caller_done,
            up_done: false,
            to_caller: VecDeque::new(),
            trailers: None,
            answered: false,
            windows: Windows {
                send_caller: i64::from(caller_window),
                send_up: 0,
                unacked_caller: 0,
                unacked_up: 0,
                recv_caller: i64::from(STREAM_WINDOW),
                recv_up: i64::from(STREAM_WINDOW),
            },
            lease: None,
            deadline: None,
            budget: Duration::ZERO,
            function: None,
            verdict: None,
            classify: false,
            health: None,
            watch: false,
            retry: None,
            hop: false,
            peer: None,
            attempt_deadline: None,
            content_left: None,
            list_size: 0,
            _active: None,
        }
    }

    /// Whether `at` is still one of the stream's deadlines (its own, or its attempt's while no
    /// response has started).
    pub(super) fn waits_for(&self, at: Instant) -> bool {
        self.deadline == Some(at) || (self.attempt_deadline == Some(at) && !self.answered)
    }

    /// The function's name, for messages.
    pub(super) fn function(&self) -> &str {
        self.function.as_ref().map_or("", |f| f.name.as_str())
    }

    /// Whether an attempt that failed this way may be made again: the policy allows it with
    /// attempts left, no response has started, and the request is still at hand (never
    /// written, or copied).
    pub(super) fn may_retry(&self, why: Failure) -> bool {
        let Some(r) = &self.retry else {
            return false;
        };
        let at_hand = match why {
            Failure::Connect => self.request.is_some() || r.copy.is_some(),
            _ => r.copy.is_some(),
        };
        !self.answered && at_hand && r.attempts.may_retry(why)
    }

    /// The instance has answered all of it: its slot is free for other calls at once, while
    /// the response waits for a caller that reads slowly (or never: a caller that does not read
    /// cannot hold a function's slots with answered calls).
    pub(super) fn instance_done(&mut self) {
        self.lease = None;
    }

    /// The call's outcome, for the breaker, the metrics and the instance's ejection count.
    pub(super) fn outcome(&mut self, outcome: Outcome) {
        if let Some(v) = self.verdict.as_mut() {
            v.record(outcome);
            if let Some(l) = self.lease.as_ref().filter(|_| self.classify) {
                l.outcome(outcome.is_failure());
            }
        }
    }
}
