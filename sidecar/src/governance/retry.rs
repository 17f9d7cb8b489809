//! Retries, one state machine for every protocol: which failed attempts may be sent again, when,
//! and the budget that keeps retries from multiplying a failing function's load.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::time::Instant;

use super::{limit::Bucket, outcome::Failure};
use crate::config::{RateLimit, Retry};

/// Where a call's retries stand. The front end says how an attempt failed and whether it still
/// has the request to send again; this says whether and when the next attempt goes.
#[derive(Debug, Clone, Copy)]
pub struct Attempts {
    policy: Retry,
    /// The request may be sent again after an instance got it (an idempotent method whose
    /// request can be replayed).
    idempotent: bool,
    tries: u32,
}

impl Attempts {
    /// The retry state of a call under `policy` (none unless it allows more than one attempt);
    /// the call counts towards the function's retry `budget`.
    #[inline]
    pub fn start(policy: Option<Retry>, idempotent: bool, budget: &Budget) -> Option<Attempts> {
        let policy = policy.filter(|r| r.attempts > 1)?;
        budget.deposit();
        Some(Attempts {
            policy,
            idempotent,
            tries: 1,
        })
    }

    /// Whether the request must be kept for sending again after an instance got it.
    pub fn replays(&self) -> bool {
        self.idempotent && (self.policy.on_unavailable || self.policy.on_timeout)
    }

    /// Whether the policy retries an attempt that failed this way (the attempts, the deadline
    /// and the budget permitting).
    pub fn allows(&self, failure: Failure) -> bool {
        match failure {
            Failure::Connect => self.policy.on_connect,
            Failure::Unavailable => self.policy.on_unavailable && self.idempotent,
            Failure::Timeout => self.policy.on_timeout && self.idempotent,
            Failure::Final => false,
        }
    }

    /// Whether an attempt that failed this way may be made again: the policy retries it and
    /// attempts are left (the deadline and the budget are checked by [`Attempts::next`]).
    pub fn may_retry(&self, failure: Failure) -> bool {
        self.allows(failure) && self.tries < self.policy.attempts
    }

    /// With `timeout` retries, the attempt about to go gets an even share of what is left until
    /// `deadline`; the last attempt has the deadline itself.
    pub fn share(&self, deadline: Option<Instant>) -> Option<Duration> {
        let deadline = deadline?;
        if !self.allows(Failure::Timeout) || self.tries >= self.policy.attempts {
            return None;
        }
        let left = self.policy.attempts - self.tries + 1;
        Some(deadline.saturating_duration_since(Instant::now()) / left)
    }

    /// The wait before the next attempt after one on `instance` failed this way, or `None` when
    /// there is none: the policy does not retry it, the attempts are spent, the wait would reach
    /// the deadline, or the budget has no retry left. A `Some` counts the next attempt.
    pub fn next(
        &mut self,
        failure: Failure,
        instance: u64,
        deadline: Option<Instant>,
        budget: &Budget,
    ) -> Option<Duration> {
        if !self.allows(failure) {
            return None;
        }
        let wait = next_wait(&self.policy, self.tries, instance, deadline, budget)?;
        self.tries += 1;
        Some(wait)
    }
}

/// The wait before retrying a call whose attempt `tries` on `instance` failed, or `None` when it
/// may not be retried: the attempts are spent, the wait would reach the deadline, or the
/// function's budget has no retry left.
fn next_wait(
    policy: &Retry,
    tries: u32,
    instance: u64,
    deadline: Option<Instant>,
    budget: &Budget,
) -> Option<Duration> {
    if tries >= policy.attempts {
        return None;
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let wait = backoff(policy.backoff, tries, seed ^ instance);
    if deadline.is_some_and(|d| Instant::now() + wait >= d) || !budget.withdraw() {
        return None;
    }
    Some(wait)
}

/// The wait before attempt `attempt + 1` (the first retry follows attempt 1): `base` doubling
/// per retry, times a jitter factor in [0.5, 1.5) drawn from `seed`.
pub fn backoff(base: Duration, attempt: u32, seed: u64) -> Duration {
    let doubled = base.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
    // splitmix64: enough randomness for spreading retries, no dependency.
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let jitter = 0.5 + (z >> 11) as f64 / (1u64 << 53) as f64;
    doubled.mul_f64(jitter)
}

/// Retries may be at most 20% of a function's calls, plus a floor of 10 per second so that a
/// function with little traffic can still retry: each call deposits a fifth of a retry (up to
/// 10 saved), each retry takes one, and when none is saved the floor's own bucket may pay.
#[derive(Debug)]
pub struct Budget {
    /// Saved retries, in thousandths.
    saved: AtomicU64,
    floor: Bucket,
    /// Counts the retries it refused (`fnmesh_retry_budget_exhausted_total`).
    exhausted: prometheus_client::metrics::counter::Counter,
}

const MILLI: u64 = 1000;
const PER_CALL: u64 = MILLI / 5;
const MAX_SAVED: u64 = 10 * MILLI;

impl Default for Budget {
    fn default() -> Self {
        Budget {
            saved: AtomicU64::new(0),
            floor: Bucket::new(RateLimit {
                rps: 10.0,
                burst: 10,
            }),
            exhausted: Default::default(),
        }
    }
}

impl Budget {
    /// The budget of function `name`, its refusals counted in the metrics.
    pub fn of(name: &str) -> Budget {
        Budget {
            exhausted: crate::metrics::global().retry_budget_exhausted(name),
            ..Budget::default()
        }
    }

    /// A call was made (retries excluded).
    pub fn deposit(&self) {
        let _ = self
            .saved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                (s < MAX_SAVED).then(|| (s + PER_CALL).min(MAX_SAVED))
            });
    }

    /// Takes one retry from the budget, if it allows one.
    pub fn withdraw(&self) -> bool {
        let allowed = self
            .saved
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                s.checked_sub(MILLI)
            })
            .is_ok()
            || self.floor.try_take();
        if !allowed {
            self.exhausted.inc();
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_its_jitter_bounds() {
        let base = Duration::from_millis(10);
        for attempt in 1..=5 {
            let center = base * 2u32.pow(attempt - 1);
            let waits: Vec<Duration> = (0..1000).map(|s| backoff(base, attempt, s)).collect();
            assert!(waits
                .iter()
                .all(|w| *w >= center / 2 && *w < center * 3 / 2));
            // Spread over the range, not stuck at one value.
            let (lo, hi) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
            assert!(
                *lo < center * 6 / 10 && *hi > center * 14 / 10,
                "{lo:?}..{hi:?}"
            );
        }
        assert_eq!(backoff(Duration::ZERO, 3, 7), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_fifth_of_calls_plus_a_floor() {
        let b = Budget::default();
        // The floor: 10 at once with no calls made.
        assert_eq!((0..100).filter(|_| b.withdraw()).count(), 10);
        // Then, within the same instant, a fifth of the calls.
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!(
            (0..100).filter(|_| b.withdraw()).count(),
            10,
            "capped at 10 saved"
        );
        for _ in 0..20 {
            b.deposit();
        }
        assert_eq!((0..100).filter(|_| b.withdraw()).count(), 4);
        // The floor refills at 10 per second.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!((0..100).filter(|_| b.withdraw()).count(), 10);
    }

    fn policy(on: &[Failure]) -> Retry {
        Retry {
            attempts: 3,
            backoff: Duration::from_millis(10),
            on_connect: on.contains(&Failure::Connect),
            on_unavailable: on.contains(&Failure::Unavailable),
            on_timeout: on.contains(&Failure::Timeout),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_follow_the_policy_the_idempotency_and_the_deadline() {
        let budget = Budget::default();
        let all = [Failure::Connect, Failure::Unavailable, Failure::Timeout];
        assert!(Attempts::start(None, true, &budget).is_none());
        let one = Retry {
            attempts: 1,
            ..policy(&all)
        };
        assert!(Attempts::start(Some(one), true, &budget).is_none());
        // Not idempotent: only a call that never reached an instance goes again.
        let mut a = Attempts::start(Some(policy(&all)), false, &budget).unwrap();
        assert!(!a.replays() && a.share(Some(Instant::now())).is_none());
        assert!(a.next(Failure::Unavailable, 1, None, &budget).is_none());
        assert!(a.next(Failure::Timeout, 1, None, &budget).is_none());
        assert!(a.next(Failure::Final, 1, None, &budget).is_none());
        assert!(a.next(Failure::Connect, 1, None, &budget).is_some());
        assert!(a.next(Failure::Connect, 1, None, &budget).is_some());
        assert!(
            a.next(Failure::Connect, 1, None, &budget).is_none(),
            "three attempts in all"
        );
        // Idempotent, with timeout retries: even shares of what is left, the last one none.
        let mut a = Attempts::start(Some(policy(&all)), true, &budget).unwrap();
        assert!(a.replays());
        let deadline = Instant::now() + Duration::from_millis(900);
        assert_eq!(a.share(Some(deadline)), Some(Duration::from_millis(300)));
        assert!(a
            .next(Failure::Timeout, 1, Some(deadline), &budget)
            .is_some());
        assert_eq!(a.share(Some(deadline)), Some(Duration::from_millis(450)));
        assert!(a
            .next(Failure::Unavailable, 1, Some(deadline), &budget)
            .is_some());
        assert_eq!(
            a.share(Some(deadline)),
            None,
            "the last attempt has the deadline"
        );
        // A wait that would reach the deadline is no retry.
        let mut a = Attempts::start(Some(policy(&all)), true, &budget).unwrap();
        let soon = Instant::now() + Duration::from_millis(2);
        assert!(a.next(Failure::Connect, 1, Some(soon), &budget).is_none());
        // Only what `on` names.
        let mut a = Attempts::start(Some(policy(&[Failure::Connect])), true, &budget).unwrap();
        assert!(!a.replays());
        assert!(a.next(Failure::Unavailable, 1, None, &budget).is_none());
    }
}
