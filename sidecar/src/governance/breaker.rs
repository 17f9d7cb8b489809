//! Circuit breakers, one per method of a function (outcomes are classified in `outcome.rs`).
//!
//! The request path only reads a gate (one atomic load; in half-open, one compare-and-swap for a
//! trial permit) and adds its outcome to two counters. Whether the breaker opens, half-opens or
//! closes is decided off the request path, by [`Breaker::tick`], which a task of the function runs
//! every few milliseconds of the window.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    config::{CircuitBreaker, FunctionConfig},
    error::{CallError, Kind},
    lock,
};

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Trial calls let through at once when the open period ends.
const TRIALS: u32 = 3;

/// Slices the window is counted in.
const SLICES: u32 = 20;

/// One method's breaker.
#[derive(Debug)]
pub struct Breaker {
    cfg: CircuitBreaker,
    gate: AtomicU8,
    /// Half-open trial calls still to let through.
    trials: AtomicU32,
    /// Outcomes since the last tick.
    ok: AtomicU64,
    failed: AtomicU64,
    /// The tick's own state.
    eval: Mutex<Eval>,
}

#[derive(Debug, Default)]
struct Eval {
    /// (end of slice, successes, failures), oldest first, covering the window.
    slices: VecDeque<(Instant, u64, u64)>,
    opened_at: Option<Instant>,
}

/// What the breaker's state is, for the admin API and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl Breaker {
    pub fn new(cfg: CircuitBreaker) -> Breaker {
        Breaker {
            cfg,
            gate: AtomicU8::new(CLOSED),
            trials: AtomicU32::new(0),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            eval: Mutex::new(Eval::default()),
        }
    }

    pub fn state(&self) -> State {
        match self.gate.load(Ordering::Acquire) {
            OPEN => State::Open,
            HALF_OPEN => State::HalfOpen,
            _ => State::Closed,
        }
    }

    /// Lets a call through, unless the breaker is open (or half-open with its trials taken).
    pub fn admit(&self) -> bool {
        match self.gate.load(Ordering::Acquire) {
            CLOSED => true,
            HALF_OPEN => self
                .trials
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(1))
                .is_ok(),
            _ => false,
        }
    }

    /// Counts an admitted call's outcome.
    #[inline]
    pub fn record(&self, failed: bool) {
        let counter = if failed { &self.failed } else { &self.ok };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// How often [`Breaker::tick`] should run.
    pub fn tick_every(&self) -> Duration {
        (self.cfg.window / SLICES).clamp(Duration::from_millis(5), Duration::from_millis(250))
    }

    /// Takes the outcomes counted since the last tick and moves the gate.
    pub fn tick(&self, now: Instant) {
        let ok = self.ok.swap(0, Ordering::Relaxed);
        let failed = self.failed.swap(0, Ordering::Relaxed);
        let mut e = lock(&self.eval);
        match self.gate.load(Ordering::Acquire) {
            CLOSED => {
                e.slices.push_back((now, ok, failed));
                while e
                    .slices
                    .front()
                    .is_some_and(|(at, _, _)| now.duration_since(*at) >= self.cfg.window)
                {
                    e.slices.pop_front();
                }
                let (ok, failed) = e
                    .slices
                    .iter()
                    .fold((0, 0), |(o, f), (_, so, sf)| (o + so, f + sf));
                let total = ok + failed;
                if total >= u64::from(self.cfg.min_requests)
                    && failed as f64 >= self.cfg.failure_ratio * total as f64
                {
                    e.slices.clear();
                    e.opened_at = Some(now);
                    self.gate.store(OPEN, Ordering::Release);
                }
            }
            OPEN => {
                // Outcomes of calls admitted before it opened say nothing new.
                if e.opened_at
                    .is_none_or(|at| now.duration_since(at) >= self.cfg.open)
                {
                    self.trials.store(TRIALS, Ordering::Release);
                    self.gate.store(HALF_OPEN, Ordering::Release);
                }
            }
            _ => {
                if failed > 0 {
                    self.trials.store(0, Ordering::Release);
                    e.opened_at = Some(now);
                    self.gate.store(OPEN, Ordering::Release);
                } else if ok > 0 {
                    self.trials.store(0, Ordering::Release);
                    e.slices.clear();
                    self.gate.store(CLOSED, Ordering::Release);
                }
            }
        }
    }
}

/// A function's breakers: one per method its IDL declares (with the method's own settings where
/// it sets them), or one for the whole function when it has no IDL (methods are then unknown
/// until called).
#[derive(Debug, Default)]
pub struct Breakers {
    methods: HashMap<String, Arc<Breaker>>,
    function: Option<Arc<Breaker>>,
}

impl Breakers {
    pub fn new(f: &FunctionConfig) -> Breakers {
        let mut b = Breakers::default();
        match &f.methods {
            Some(methods) => {
                for m in methods {
                    if let Some(cfg) = f.policy_for(&m.name).circuit_breaker {
                        b.methods
                            .insert(m.name.clone(), Arc::new(Breaker::new(cfg)));
                    }
                }
            }
            None => {
                b.function = f.policy.circuit_breaker.map(|c| Arc::new(Breaker::new(c)));
            }
        }
        b
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.methods.is_empty() && self.function.is_none()
    }

    /// The breaker a call of `method` goes through, if any.
    #[inline]
    pub fn get(&self, method: &str) -> Option<&Arc<Breaker>> {
        if self.methods.is_empty() {
            return self.function.as_ref();
        }
        self.methods.get(method)
    }

    /// Admits a call of `method`, or answers `circuit-open`; gives the breaker to record its
    /// outcome in.
    #[inline]
    pub fn admit(&self, function: &str, method: &str) -> Result<Option<Arc<Breaker>>, CallError> {
        let Some(b) = self.get(method) else {
            return Ok(None);
        };
        if b.admit() {
            return Ok(Some(b.clone()));
        }
        Err(CallError::new(
            Kind::CircuitOpen,
            format!(
                "function {function} method {method}: circuit breaker open (failing calls); trying again after {:?}",
                b.cfg.open
            ),
        ))
    }

    pub fn tick_every(&self) -> Option<Duration> {
        self.methods
            .values()
            .chain(&self.function)
            .map(|b| b.tick_every())
            .min()
    }

    /// Moves every breaker's gate; a change of state is counted for `function`'s metrics.
    pub fn tick(&self, now: Instant, function: &str) {
        let named = self.methods.iter().map(|(m, b)| (m.as_str(), b));
        for (method, b) in named.chain(self.function.iter().map(|b| ("*", b))) {
            let before = b.state();
            b.tick(now);
            let after = b.state();
            if after != before {
                let to = match after {
                    State::Closed => "closed",
                    State::Open => "open",
                    State::HalfOpen => "half_open",
                };
                crate::metrics::global().breaker_transition(function, method, to);
            }
        }
    }

    /// Each breaker's state, for the admin API.
    pub fn states(&self) -> Vec<(&str, State)> {
        let mut v: Vec<_> = self
            .methods
            .iter()
            .map(|(m, b)| (m.as_str(), b.state()))
            .chain(self.function.iter().map(|b| ("*", b.state())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(CircuitBreaker {
            window: Duration::from_secs(10),
            min_requests: 10,
            failure_ratio: 0.5,
            open: Duration::from_secs(5),
        })
    }

    /// Records `ok` successes and `failed` failures, then ticks.
    fn calls(b: &Breaker, ok: u32, failed: u32) {
        for _ in 0..ok {
            assert!(b.admit());
            b.record(false);
        }
        for _ in 0..failed {
            assert!(b.admit());
            b.record(true);
        }
        b.tick(Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn opens_half_opens_and_closes() {
        let b = breaker();
        calls(&b, 5, 4);
        assert_eq!(b.state(), State::Closed, "9 calls: under min_requests");
        calls(&b, 0, 1);
        assert_eq!(b.state(), State::Open, "5 of 10 failed");
        assert!(!b.admit(), "open: fail fast");
        tokio::time::advance(Duration::from_millis(4900)).await;
        b.tick(Instant::now());
        assert_eq!(b.state(), State::Open, "not yet 5 s");
        tokio::time::advance(Duration::from_millis(200)).await;
        b.tick(Instant::now());
        assert_eq!(b.state(), State::HalfOpen);
        let trials = (0..10).filter(|_| b.admit()).count();
        assert_eq!(trials, TRIALS as usize, "a few trial calls, then fail fast");
        b.record(false);
        b.tick(Instant::now());
        assert_eq!(b.state(), State::Closed, "a trial succeeded");
        assert!(b.admit());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_opens_it_again_for_the_full_period() {
        let b = breaker();
        calls(&b, 0, 10);
        tokio::time::advance(Duration::from_secs(5)).await;
        b.tick(Instant::now());
        assert!(b.admit());
        b.record(true);
        b.tick(Instant::now());
        assert_eq!(b.state(), State::Open);
        tokio::time::advance(Duration::from_millis(4900)).await;
        b.tick(Instant::now());
        assert_eq!(b.state(), State::Open);
        tokio::time::advance(Duration::from_millis(100)).await;
        b.tick(Instant::now());
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_older_than_the_window_are_forgotten() {
        let b = breaker();
        calls(&b, 0, 9);
        tokio::time::advance(Duration::from_secs(10)).await;
        calls(&b, 10, 1);
        assert_eq!(b.state(), State::Closed, "1 of 11 in the window failed");
        let b = breaker();
        calls(&b, 0, 9);
        tokio::time::advance(Duration::from_secs(9)).await;
        calls(&b, 1, 0);
        assert_eq!(b.state(), State::Open, "9 of 10 in the window failed");
    }
}
