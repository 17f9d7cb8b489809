//! Outcomes, classified once for every protocol: which errors and replies count as failures (for
//! breakers and instance ejection), how an attempt failed (for the retry decision), and the
//! verdict a call leaves in its method's breaker.

use std::sync::Arc;

use fnmesh_codec::ReplyKind;

use super::breaker::Breaker;
pub use crate::metrics::Outcome;
use crate::{error::Kind, metrics::CallMetrics, trace::CallSpan};

/// Whether an error fnmesh answered (or a transport failure it saw) counts against the function
/// ([`Kind::is_failure`]).
pub fn is_failure(kind: Kind) -> bool {
    kind.is_failure()
}

/// Thrift: a TApplicationException of type UNKNOWN (0) or INTERNAL_ERROR (6) from the instance
/// is a failure (as is one whose type cannot be read); declared IDL exceptions travel in REPLY
/// messages and, like a non-zero `biz-status`, are business outcomes.
pub fn thrift_exception_is_failure(exception_type: Option<i32>) -> bool {
    matches!(exception_type, None | Some(0) | Some(6))
}

/// gRPC: UNKNOWN (2), DEADLINE_EXCEEDED (4), INTERNAL (13) and UNAVAILABLE (14) are failures;
/// every other status is a business outcome. No status at all is a failure.
pub fn grpc_status_is_failure(status: Option<&[u8]>) -> bool {
    matches!(status, None | Some(b"2" | b"4" | b"13" | b"14"))
}

/// How an attempt on an instance failed: what decides whether sending it again is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The instance never got the request (connect refused, a failed write, a connection lost
    /// before the instance said anything, GOAWAY or REFUSED_STREAM): always safe to send again.
    Connect,
    /// The instance got it and failed (closed or reset the connection, answered UNAVAILABLE):
    /// it may have run the call.
    Unavailable,
    /// No reply within the attempt's share of the deadline.
    Timeout,
    /// The exchange itself went wrong (a malformed reply): never retried.
    Final,
}

/// A call's outcome, recorded once in its method's breaker and metrics: from the instance's
/// reply, or from fnmesh's own error. A call dropped unfinished after its deadline (stopped as
/// timed out) counts as a timeout; one whose caller went away before it is not counted.
pub struct Verdict {
    breaker: Option<Arc<Breaker>>,
    /// The method's metrics; `None` once the outcome is recorded.
    calls: Option<&'static CallMetrics>,
    /// When the call arrived ([`crate::metrics::now_ns`]).
    arrived: u64,
    /// Its deadline in the same clock, 0 for none.
    deadline: u64,
    /// The call's span, when traces are on (locked only then, and only by the call's task).
    span: Option<Box<std::sync::Mutex<CallSpan>>>,
}

impl Verdict {
    #[inline]
    pub fn new(
        breaker: Option<Arc<Breaker>>,
        calls: &'static CallMetrics,
        arrived: u64,
        budget: Option<std::time::Duration>,
        span: Option<CallSpan>,
    ) -> Verdict {
        let deadline = budget.map_or(0, |b| {
            arrived.saturating_add(u64::try_from(b.as_nanos()).unwrap_or(u64::MAX))
        });
        Verdict {
            breaker,
            calls: Some(calls),
            arrived,
            deadline,
            span: span.map(|s| Box::new(std::sync::Mutex::new(s))),
        }
    }

    /// The call's span, when traces are on (the front end passes it to the instance as its
    /// parent).
    pub fn span(&self) -> Option<std::sync::MutexGuard<'_, CallSpan>> {
        self.span.as_deref().map(crate::lock)
    }

    /// The call got a slot on `instance`: noted in its span (the instance, how long the call
    /// queued, whether it waited for the instance's cold start).
    #[inline]
    pub fn leased(&self, instance: &crate::instances::Instance) {
        if self.span.is_some() {
            self.note_lease(instance);
        }
    }

    #[cold]
    fn note_lease(&self, instance: &crate::instances::Instance) {
        if let Some(mut span) = self.span() {
            let waited = crate::metrics::now_ns().saturating_sub(self.arrived);
            let queued = (waited > 100_000).then_some(std::time::Duration::from_nanos(waited));
            let cold = instance.ready_at > self.arrived;
            span.leased(instance.id, queued, cold);
        }
    }

    /// The call is sent again: counted in its span.
    pub fn retried(&self) {
        if let Some(mut span) = self.span() {
            span.retried();
        }
    }

    /// The call's trace id, when it has a span.
    pub fn trace_id(&self) -> Option<String> {
        self.span().map(|s| s.trace_id())
    }

    /// The call's method, as its metrics name it.
    pub fn method(&self) -> &str {
        self.calls.map_or(crate::metrics::UNKNOWN, |c| c.method())
    }

    /// Records the outcome (the first call only).
    #[inline]
    pub fn record(&mut self, outcome: Outcome) {
        let Some(calls) = self.calls.take() else {
            return;
        };
        if let Some(b) = &self.breaker {
            b.record(outcome.is_failure());
        }
        let took = crate::metrics::now_ns().saturating_sub(self.arrived);
        calls.record(outcome, took);
        crate::access::log(calls, outcome, took, || self.trace_id());
        if let Some(span) = self.span.take() {
            let span = span.into_inner().unwrap_or_else(|p| p.into_inner());
            span.end(outcome);
        }
    }
}

impl Drop for Verdict {
    fn drop(&mut self) {
        if self.calls.is_some() && self.deadline != 0 && crate::metrics::now_ns() >= self.deadline {
            self.record(Outcome::Error(Kind::Timeout));
        }
    }
}

/// A Thrift reply's outcome from its headers (`kind`, as [`fnmesh_codec::reply_kind`] read it);
/// an EXCEPTION's TApplicationException type is read only when `exception_type` is asked.
#[inline]
pub fn thrift_reply(
    kind: Option<ReplyKind>,
    exception_type: impl FnOnce() -> Option<i32>,
) -> Outcome {
    match kind {
        Some(ReplyKind::Success) => Outcome::Ok,
        Some(ReplyKind::Declared) => Outcome::Exception,
        Some(ReplyKind::Exception) if !thrift_exception_is_failure(exception_type()) => {
            Outcome::Exception
        }
        _ => Outcome::Failed,
    }
}

/// The `reason` label of a retry after an attempt failed this way.
pub fn retry_reason(failure: Failure) -> &'static str {
    match failure {
        Failure::Connect => "connect",
        Failure::Unavailable => "unavailable",
        Failure::Timeout => "timeout",
        Failure::Final => "final",
    }
}

/// A gRPC call's outcome from its `grpc-status` (none at all is a failure).
#[inline]
pub fn grpc_status(status: Option<&[u8]>) -> Outcome {
    match status {
        Some(b"0") => Outcome::Ok,
        s if grpc_status_is_failure(s) => Outcome::Failed,
        _ => Outcome::Exception,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_classified_once_for_both_protocols() {
        assert!(is_failure(Kind::Unavailable) && is_failure(Kind::Timeout));
        assert!(is_failure(Kind::Overloaded));
        for k in [
            Kind::NoRoute,
            Kind::BadRequest,
            Kind::TooLarge,
            Kind::CircuitOpen,
        ] {
            assert!(!is_failure(k), "{k:?}");
        }
        assert!(thrift_exception_is_failure(Some(6)) && thrift_exception_is_failure(Some(0)));
        assert!(thrift_exception_is_failure(None));
        assert!(!thrift_exception_is_failure(Some(1)) && !thrift_exception_is_failure(Some(7)));
        for s in ["2", "4", "13", "14"] {
            assert!(grpc_status_is_failure(Some(s.as_bytes())), "{s}");
        }
        for s in ["0", "1", "3", "5", "7", "8", "9", "12", "16"] {
            assert!(!grpc_status_is_failure(Some(s.as_bytes())), "{s}");
        }
        assert!(grpc_status_is_failure(None));
    }
}
