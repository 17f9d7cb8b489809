//! Rate limits: a token bucket per function, and per method where a method sets its own, kept
//! as one atomic "theoretical arrival time" (GCRA, the token bucket's exact equivalent): the
//! request path admits or refuses with one compare-and-swap, no lock, no timer. Written here
//! rather than with a rate-limiting crate: one atomic per bucket is all it takes, and the
//! buckets live in the policy a reload swaps.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
};

use tokio::time::Instant;

use crate::{
    config::{FunctionConfig, RateLimit},
    error::{CallError, Kind},
};

/// One bucket: `burst` calls at once, refilled at `rps` per second.
#[derive(Debug)]
pub struct Bucket {
    limit: RateLimit,
    start: Instant,
    /// Nanoseconds per call at the limit's rate.
    interval: u64,
    /// How far the next admission may be ahead of now: `burst - 1` intervals.
    tolerance: u64,
    /// When the next call is due at the limit's rate, in nanoseconds since `start`.
    due: AtomicU64,
}

impl Bucket {
    pub fn new(limit: RateLimit) -> Bucket {
        let interval = ((1e9 / limit.rps).round() as u64).max(1);
        Bucket {
            limit,
            start: Instant::now(),
            interval,
            tolerance: interval.saturating_mul(u64::from(limit.burst.max(1) - 1)),
            due: AtomicU64::new(0),
        }
    }

    /// Takes a token if there is one.
    #[inline]
    pub fn try_take(&self) -> bool {
        let now = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut due = self.due.load(Ordering::Relaxed);
        loop {
            let next = due.max(now);
            if next - now > self.tolerance {
                return false;
            }
            match self.due.compare_exchange_weak(
                due,
                next.saturating_add(self.interval),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => due = seen,
            }
        }
    }
}

/// A function's buckets: its own, and those of methods that set their own limit (which then
/// replaces the function's for that method, as every per-method key does).
#[derive(Debug, Default)]
pub struct RateLimits {
    function: Option<Bucket>,
    methods: HashMap<String, Bucket>,
}

impl RateLimits {
    pub fn new(f: &FunctionConfig) -> RateLimits {
        RateLimits {
            function: f.policy.rate_limit.map(Bucket::new),
            methods: f
                .methods_policy
                .iter()
                .filter_map(|(m, p)| Some((m.clone(), Bucket::new(p.rate_limit?))))
                .collect(),
        }
    }

    /// Admits a call of `method` of `function`, or answers `overloaded`.
    #[inline]
    pub fn admit(&self, function: &str, method: &str) -> Result<(), CallError> {
        let bucket = match self.methods.is_empty() {
            true => self.function.as_ref(),
            false => self.methods.get(method).or(self.function.as_ref()),
        };
        match bucket {
            Some(b) if !b.try_take() => Err(CallError::new(
                Kind::Overloaded,
                format!(
                    "function {function} method {method}: rate limit of {} calls/s (burst {}) reached",
                    b.limit.rps, b.limit.burst
                ),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn bucket(rps: f64, burst: u32) -> Bucket {
        Bucket::new(RateLimit { rps, burst })
    }

    /// Calls admitted when one is attempted every `every` for `for_`.
    async fn admitted(b: &Bucket, every: Duration, for_: Duration) -> usize {
        let until = Instant::now() + for_;
        let mut n = 0;
        while Instant::now() < until {
            n += usize::from(b.try_take());
            tokio::time::advance(every).await;
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let b = bucket(100.0, 10);
        let at_once = (0..50).filter(|_| b.try_take()).count();
        assert_eq!(at_once, 10, "the burst");
        // Then 100/s, within 10%, however fast callers try.
        let n = admitted(&b, Duration::from_micros(100), Duration::from_secs(10)).await;
        assert!((900..=1100).contains(&n), "{n} in 10 s at 100/s");
    }

    #[tokio::test(start_paused = true)]
    async fn rates_hold_from_slow_to_fast() {
        for rps in [0.5, 3.0, 50.0, 1000.0, 20_000.0] {
            let b = bucket(rps, 1);
            // About 1,000 admissions, attempted ten times as often as the rate allows.
            let secs = 1000.0 / rps;
            let every = Duration::from_secs_f64(0.1 / rps);
            let n = admitted(&b, every, Duration::from_secs_f64(secs)).await;
            let want = rps * secs;
            assert!(
                (n as f64 - want).abs() <= want * 0.1 + 1.0,
                "{rps}/s: {n} admitted in {secs} s"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_refills_only_up_to_its_burst() {
        let b = bucket(10.0, 5);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!((0..100).filter(|_| b.try_take()).count(), 5);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!((0..100).filter(|_| b.try_take()).count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_under_the_rate_are_never_refused() {
        let b = bucket(100.0, 1);
        let n = admitted(&b, Duration::from_millis(11), Duration::from_secs(5)).await;
        assert_eq!(
            n, 455,
            "every call of one per 11 ms (5 s / 11 ms, rounded up)"
        );
    }
}
