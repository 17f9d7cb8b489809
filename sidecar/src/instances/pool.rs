//! A function's instances and the calls waiting for them: scale from zero, scale up while every
//! instance is saturated, idle scale-down, crash replacement. All state sits behind one mutex that
//! is never held across an `.await`; a slot given to a waiting call is plain data, so a waiter that
//! gave up can hand it back without deadlock.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::oneshot,
    time::{sleep, Instant},
};

use crate::{
    config::FunctionConfig,
    error::{CallError, Kind},
    lock,
};

use super::{instance::Instance, process, watchdog::Watchdog};

struct Slot {
    instance: Arc<Instance>,
    in_flight: usize,
    /// Since when it has had no call: `None` when its last call ended after the idle reaper
    /// last looked (the reaper then starts the count), so that a call's end reads no clock.
    idle_since: Option<Instant>,
    /// Failed calls in a row (`breaker.rs` decides what failed).
    failures: u32,
    /// Times ejected since its last success, and until when it is out of balancing.
    ejections: u32,
    ejected_until: Option<Instant>,
    /// The registry's weight for a remote endpoint (1 for an instance).
    weight: u32,
    /// A remote endpoint's peak-EWMA latency (ns), for balancing: 0 until a call ended.
    ewma_ns: u64,
}

impl Slot {
    fn new(instance: Arc<Instance>) -> Slot {
        Slot {
            instance,
            in_flight: 0,
            idle_since: Some(Instant::now()),
            failures: 0,
            ejections: 0,
            ejected_until: None,
            weight: 1,
            ewma_ns: 0,
        }
    }

    /// What a call would cost on it, for power-of-two-choices: its latency times the calls it
    /// would then have, over its weight (Linkerd's and Finagle's least-loaded, weighted).
    fn cost(&self) -> u128 {
        let latency = u128::from(self.ewma_ns.max(1));
        latency * (self.in_flight as u128 + 1) * 1024 / u128::from(self.weight.max(1))
    }

    fn ejected(&self, now: Option<Instant>) -> bool {
        match (self.ejected_until, now) {
            (Some(until), Some(now)) => now < until,
            _ => false,
        }
    }
}

/// Failed calls in a row that eject an instance from balancing.
pub const EJECT_AFTER: u32 = 5;

/// How long an instance is ejected: 1 s the first time, doubling each time it is ejected again
/// without a success in between, up to 30 s.
fn ejection(times: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(times.saturating_sub(1)))
        .min(Duration::from_secs(30))
}

type Grant = Result<Arc<Instance>, CallError>;

/// The clock for ejection checks: read only while some instance is ejected.
fn ejection_clock(ready: &[Slot]) -> Option<Instant> {
    ready
        .iter()
        .any(|s| s.ejected_until.is_some())
        .then(Instant::now)
}

#[derive(Default)]
struct Scaling {
    ready: Vec<Slot>,
    starting: usize,
    waiters: VecDeque<oneshot::Sender<Grant>>,
    /// Consecutive start failures and crashes, for the restart backoff.
    failures: u32,
    draining: bool,
    /// A remote service's endpoints: balanced by power of two choices.
    p2c: bool,
    /// A remote service: whether the registry has answered once.
    resolved: bool,
}

/// What the admin API and tests read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub ready: usize,
    pub starting: usize,
    pub queued: usize,
    pub in_flight: usize,
    /// Starts that failed or instances that exited since one last stayed up for `STABLE`, and
    /// the delay the next start waits for.
    pub failures: u32,
    pub backoff: Duration,
}

pub struct Pool {
    /// The function's name: fixed for the pool's life.
    pub name: String,
    /// The function's configuration (its scale settings and command) now.
    config: arc_swap::ArcSwap<FunctionConfig>,
    grace: Duration,
    watchdog: Arc<Watchdog>,
    state: Mutex<Scaling>,
    next_id: std::sync::atomic::AtomicU64,
    /// Instance processes not yet reaped: each holds a token from its start until it is reaped,
    /// so a shutdown can wait for them all.
    processes: tokio_util::task::TaskTracker,
    /// Worker threads (each instance keeps idle connections per worker).
    workers: usize,
    /// The runtime instance processes are started and watched on, whichever worker's call
    /// asked for them.
    control: tokio::runtime::Handle,
    /// A service in the registry: its endpoints are set by [`Pool::set_endpoints`], nothing
    /// is started or stopped for idleness.
    pub remote: bool,
}

/// A slot on an instance; dropping it frees the slot (and hands it to the next waiting call).
pub struct Lease {
    pool: Arc<Pool>,
    pub instance: Arc<Instance>,
    /// The call's outcome on this instance, if known.
    outcome: std::sync::atomic::AtomicU8,
    /// The call's deadline: a lease dropped unfinished after it is a failed call (a hung
    /// instance), one dropped before it is not (the caller went away).
    deadline: Option<Instant>,
    /// When the call took the slot, on a remote endpoint (its latency feeds balancing).
    started: Option<std::time::Instant>,
}

const OUTCOME_UNKNOWN: u8 = 0;
const OUTCOME_OK: u8 = 1;
const OUTCOME_FAILED: u8 = 2;

impl Lease {
    fn new(pool: Arc<Pool>, instance: Arc<Instance>) -> Lease {
        Lease {
            started: pool.remote.then(std::time::Instant::now),
            pool,
            instance,
            outcome: std::sync::atomic::AtomicU8::new(OUTCOME_UNKNOWN),
            deadline: None,
        }
    }

    /// Sets the call's deadline (see [`Lease::outcome`]).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Records how the call went on this instance, counted when the lease is released: failed
    /// calls in a row eject the instance from balancing for a while.
    pub fn outcome(&self, failed: bool) {
        let v = if failed { OUTCOME_FAILED } else { OUTCOME_OK };
        self.outcome.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records that a connection to the instance broke: it refused a connect, closed without
    /// replying, or sent what cannot be read. The connection is never pooled again; unless the
    /// cause was local (`local`: fnmesh ran out of file descriptors or memory), the call counts
    /// as failed on the instance, toward its ejection. Only ejection, or the process exiting,
    /// takes an instance out of balancing: one broken connection never does.
    pub fn broken(&self, local: bool) {
        if !local {
            self.outcome(true);
        }
    }
}

/// How long a front end whose instance connection broke waits to see whether the instance's
/// process exited (a crash), so that the next call does not pick a dead instance.
pub const EXIT_GRACE: Duration = Duration::from_millis(50);

/// Whether a failed connect or read is fnmesh's own (out of descriptors, memory or local
/// ports), not the instance's.
pub fn is_local(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.raw_os_error().is_some_and(|code| {
        [
            Errno::EMFILE,
            Errno::ENFILE,
            Errno::ENOMEM,
            Errno::ENOBUFS,
            Errno::EADDRNOTAVAIL,
        ]
        .iter()
        .any(|errno| *errno as i32 == code)
    })
}

impl Drop for Lease {
    fn drop(&mut self) {
        let outcome = match self.outcome.load(std::sync::atomic::Ordering::Relaxed) {
            OUTCOME_OK => Some(false),
            OUTCOME_FAILED => Some(true),
            _ => self
                .deadline
                .is_some_and(|d| Instant::now() >= d)
                .then_some(true),
        };
        let took = self.started.map(|t| t.elapsed());
        self.pool.release(&self.instance, outcome, took);
    }
}

/// A call waiting in the queue. If it is dropped (deadline, caller gone) after a slot was sent to
/// it, the slot goes back.
struct Waiting {
    pool: Arc<Pool>,
    rx: oneshot::Receiver<Grant>,
    /// When the call began to wait: its wait is observed (`fnmesh_queue_wait_seconds`) however
    /// it ends.
    since: std::time::Instant,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        crate::metrics::global().queue_wait(&self.pool.name, self.since.elapsed());
        self.rx.close();
        if let Ok(Ok(instance)) = self.rx.try_recv() {
            self.pool.release(&instance, None, None);
        }
    }
}

impl Pool {
    /// A pool for `function`; call it inside the control runtime.
    pub fn new(
        function: Arc<FunctionConfig>,
        grace: Duration,
        watchdog: Arc<Watchdog>,
        workers: usize,
    ) -> Arc<Pool> {
        let remote = function.remote;
        let pool = Arc::new(Pool {
            remote,
            name: function.name.clone(),
            config: arc_swap::ArcSwap::new(function),
            grace,
            watchdog,
            state: Mutex::new(Scaling {
                p2c: remote,
                ..Scaling::default()
            }),
            next_id: std::sync::atomic::AtomicU64::new(1),
            processes: tokio_util::task::TaskTracker::new(),
            workers,
            control: tokio::runtime::Handle::current(),
        });
        if !remote {
            pool.start_to_min();
            tokio::spawn(Pool::reap_idle(Arc::downgrade(&pool)));
        }
        pool
    }

    /// Sets a remote service's endpoints (the registry's latest answer): new ones join the
    /// balancing, gone ones leave it (calls on them finish; their idle connections close).
    /// Waiting calls get the new endpoints, or `unavailable` when there is none.
    pub fn set_endpoints(&self, endpoints: &[(std::net::SocketAddr, u32)]) {
        let mut st = lock(&self.state);
        st.resolved = true;
        let mut gone = Vec::new();
        st.ready.retain(|s| {
            let keep = matches!(&s.instance.addr, super::Endpoint::Tcp(a) if endpoints.iter().any(|(e, _)| e == a));
            if !keep {
                gone.push(s.instance.clone());
            }
            keep
        });
        for (addr, weight) in endpoints {
            let known = st
                .ready
                .iter_mut()
                .find(|s| matches!(&s.instance.addr, super::Endpoint::Tcp(a) if a == addr));
            match known {
                Some(slot) => slot.weight = *weight,
                None => {
                    let id = self
                        .next_id
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let instance = Arc::new(Instance::remote(id, *addr, self.workers));
                    let mut slot = Slot::new(instance);
                    slot.weight = *weight;
                    st.ready.push(slot);
                }
            }
        }
        if st.ready.is_empty() {
            let e = CallError::new(
                Kind::Unavailable,
                format!(
                    "service {}: the registry lists no passing endpoint",
                    self.name
                ),
            );
            Self::fail_waiters(&mut st, &e);
        } else {
            self.dispatch(&mut st);
        }
        drop(st);
        for instance in gone {
            instance.stop();
            instance.exited();
        }
    }

    /// Takes a remote endpoint out of balancing for `period`, without counting a failure: a
    /// peer that said it has no ready instance is not asked again meanwhile.
    pub fn cool(&self, instance: &Arc<Instance>, period: Duration) {
        let mut st = lock(&self.state);
        if let Some(slot) = st
            .ready
            .iter_mut()
            .find(|s| Arc::ptr_eq(&s.instance, instance))
        {
            slot.ejected_until = Some(Instant::now() + period);
        }
    }

    /// Starts an instance when none is ready or starting here (within `max`): the calls this
    /// node sends to its peers fill one of its own, so the load justifies it.
    pub fn start_one(self: &Arc<Pool>) {
        let mut st = lock(&self.state);
        if st.draining || st.ready.len() + st.starting > 0 || self.scale().max == 0 {
            return;
        }
        st.starting += 1;
        let delay = backoff(st.failures);
        drop(st);
        tracing::info!(function = %self.name, "starting an instance: the calls sent to peers fill one");
        self.spawn_start(delay);
    }

    /// Whether a call would find a ready instance with room now.
    pub fn has_room(&self) -> bool {
        let st = lock(&self.state);
        let concurrency = self.scale().concurrency;
        let now = ejection_clock(&st.ready);
        st.ready
            .iter()
            .any(|s| s.in_flight < concurrency && !s.ejected(now))
    }

    /// A remote service's registry could not be read before it ever answered: the calls
    /// waiting for its endpoints get `unavailable` (later calls wait for the next try).
    pub fn unresolved(&self, why: &str) {
        let mut st = lock(&self.state);
        if !st.resolved {
            let e = CallError::new(
                Kind::Unavailable,
                format!("service {}: cannot resolve it: {why}", self.name),
            );
            Self::fail_waiters(&mut st, &e);
        }
    }

    /// The function's scaling settings now.
    fn scale(&self) -> crate::config::ScaleConfig {
        self.config.load().scale
    }

    /// Applies a reloaded configuration of this function (same command, environment and
    /// protocol): instances keep running, and a raised `min`, `max` or `concurrency` serves
    /// waiting calls at once.
    pub fn reconfigure(self: &Arc<Pool>, function: Arc<FunctionConfig>) {
        self.config.store(function);
        let mut st = lock(&self.state);
        self.dispatch(&mut st);
        drop(st);
        self.start_to_min();
    }

    /// Starts instances until `min` are ready or starting, and as many as waiting calls need.
    fn start_to_min(self: &Arc<Pool>) {
        let mut st = lock(&self.state);
        if st.draining {
            return;
        }
        let min = self.scale().min;
        let need = min
            .saturating_sub(st.ready.len() + st.starting)
            .max(self.starts_needed(&st));
        st.starting += need;
        drop(st);
        for _ in 0..need {
            self.spawn_start(Duration::ZERO);
        }
    }

    /// Instances and calls now, for the admin API and tests.
    pub fn snapshot(&self) -> Snapshot {
        let st = lock(&self.state);
        Snapshot {
            ready: st.ready.len(),
            starting: st.starting,
            queued: st.waiters.len(),
            in_flight: st.ready.iter().map(|s| s.in_flight).sum(),
            failures: st.failures,
            backoff: backoff(st.failures),
        }
    }

    /// A slot on a ready instance with room, without waiting: `None` when the call would have
    /// to queue (then [`Pool::acquire`]).
    pub fn try_acquire(self: &Arc<Pool>) -> Result<Option<Lease>, CallError> {
        let mut st = lock(&self.state);
        if st.draining {
            return Err(self.draining_error());
        }
        Ok(Self::take_slot(&mut st, self.scale().concurrency)
            .map(|instance| Lease::new(self.clone(), instance)))
    }

    /// As [`Pool::try_acquire`], preferring an instance other than `avoid` (a retry).
    pub fn try_acquire_other(self: &Arc<Pool>, avoid: u64) -> Result<Option<Lease>, CallError> {
        let mut st = lock(&self.state);
        if st.draining {
            return Err(self.draining_error());
        }
        let concurrency = self.scale().concurrency;
        Ok(Self::take_slot_avoiding(&mut st, concurrency, Some(avoid))
            .or_else(|| Self::take_slot(&mut st, concurrency))
            .map(|instance| Lease::new(self.clone(), instance)))
    }

    fn draining_error(&self) -> CallError {
        CallError::new(
            Kind::Unavailable,
            format!("function {} is draining", self.name),
        )
    }

    /// A slot on a ready instance: at once if one has room, else after waiting in the queue
    /// (starting instances as the queue needs).
    pub async fn acquire(self: &Arc<Pool>) -> Result<Lease, CallError> {
        let name = &self.name;
        let rx = {
            let mut st = lock(&self.state);
            if st.draining {
                return Err(self.draining_error());
            }
            if let Some(instance) = Self::take_slot(&mut st, self.scale().concurrency) {
                return Ok(Lease::new(self.clone(), instance));
            }
            if self.remote && st.resolved && st.ready.is_empty() {
                return Err(CallError::new(
                    Kind::Unavailable,
                    format!("service {name}: the registry lists no passing endpoint"),
                ));
            }
            if st.waiters.len() >= self.scale().queue {
                // Callers that gave up still hold places; free them first.
                st.waiters.retain(|tx| !tx.is_closed());
            }
            if st.waiters.len() >= self.scale().queue {
                return Err(CallError::new(
                    Kind::Overloaded,
                    format!(
                        "function {name}: queue full ({} calls waiting)",
                        st.waiters.len()
                    ),
                ));
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(tx);
            let starts = self.starts_needed(&st);
            st.starting += starts;
            let delay = backoff(st.failures);
            drop(st);
            for _ in 0..starts {
                self.spawn_start(delay);
            }
            rx
        };
        let mut waiting = Waiting {
            pool: self.clone(),
            rx,
            since: std::time::Instant::now(),
        };
        match (&mut waiting.rx).await {
            // Ours now: the Waiting guard, dropped after, finds nothing left to give back
            // (forgetting it would leak its hold on the pool).
            Ok(Ok(instance)) => Ok(Lease::new(self.clone(), instance)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(CallError::new(
                Kind::Unavailable,
                format!("function {name} stopped"),
            )),
        }
    }

    /// The least-loaded ready instance with room, its in-flight count raised.
    fn take_slot(st: &mut Scaling, concurrency: usize) -> Option<Arc<Instance>> {
        Self::take_slot_avoiding(st, concurrency, None)
    }

    /// As [`Pool::take_slot`], never on instance `avoid`.
    fn take_slot_avoiding(
        st: &mut Scaling,
        concurrency: usize,
        avoid: Option<u64>,
    ) -> Option<Arc<Instance>> {
        let now = ejection_clock(&st.ready);
        let usable =
            |s: &Slot| s.in_flight < concurrency && !s.ejected(now) && Some(s.instance.id) != avoid;
        let slot = match st.p2c {
            true => {
                let i = Self::two_choices(&st.ready, usable)?;
                &mut st.ready[i]
            }
            false => st
                .ready
                .iter_mut()
                .filter(|s| usable(s))
                .min_by_key(|s| s.in_flight)?,
        };
        slot.ejected_until = None;
        slot.in_flight += 1;
        Some(slot.instance.clone())
    }

    /// Power of two choices: two usable slots drawn by weight, the one a call costs less on.
    fn two_choices(ready: &[Slot], usable: impl Fn(&Slot) -> bool) -> Option<usize> {
        let total: u64 = ready
            .iter()
            .filter(|s| usable(s))
            .map(|s| u64::from(s.weight.max(1)))
            .sum();
        if total == 0 {
            return None;
        }
        let pick = || {
            let mut at = crate::access::draw() % total;
            ready.iter().position(|s| {
                if !usable(s) {
                    return false;
                }
                let w = u64::from(s.weight.max(1));
                if at < w {
                    return true;
                }
                at -= w;
                false
            })
        };
        let (a, b) = (pick()?, pick()?);
        Some(match ready[a].cost() <= ready[b].cost() {
            true => a,
            false => b,
        })
    }

    /// Instances to start so that ready + starting can serve everything in flight and queued,
    /// within `max`.
    fn starts_needed(&self, st: &Scaling) -> usize {
        let s = self.scale();
        let demand: usize = st.ready.iter().map(|x| x.in_flight).sum::<usize>() + st.waiters.len();
        let wanted = demand.div_ceil(s.concurrency).min(s.max);
        // Ejected instances take no calls, but still count against `max`.
        let now = ejection_clock(&st.ready);
        let serving = st.ready.iter().filter(|x| !x.ejected(now)).count();
        let room = s.max.saturating_sub(st.ready.len() + st.starting);
        wanted.saturating_sub(serving + st.starting).min(room)
    }

    /// Frees a slot on `instance` and counts how its call went (`None`: unknown), which may
    /// eject the instance after failures in a row; the slot goes to the next waiting call.
    /// `took`: the call's latency on a remote endpoint, folded into its peak EWMA (a slower
    /// call counts at once, faster ones pull it down a tenth at a time).
    fn release(
        self: &Arc<Pool>,
        instance: &Arc<Instance>,
        failed: Option<bool>,
        took: Option<Duration>,
    ) {
        let mut st = lock(&self.state);
        let Some(slot) = st
            .ready
            .iter_mut()
            .find(|s| Arc::ptr_eq(&s.instance, instance))
        else {
            return; // the instance has gone (crashed or stopped)
        };
        slot.in_flight -= 1;
        slot.idle_since = None;
        if let Some(took) = took {
            let ns = took.as_nanos().min(u128::from(u64::MAX)) as u64;
            slot.ewma_ns = match ns > slot.ewma_ns {
                true => ns,
                false => slot.ewma_ns - (slot.ewma_ns - ns) / 10,
            };
        }
        match failed {
            Some(false) => {
                slot.failures = 0;
                slot.ejections = 0;
            }
            Some(true) => {
                let now = Instant::now();
                slot.failures += 1;
                let due = slot.failures >= EJECT_AFTER && !slot.ejected(Some(now));
                // Never the last instance serving when no replacement can start: failing
                // calls then still beat no calls (the method's breaker is there for that).
                let others = st
                    .ready
                    .iter()
                    .filter(|x| !Arc::ptr_eq(&x.instance, instance) && !x.ejected(Some(now)))
                    .count();
                let room = self.scale().max > st.ready.len() + st.starting;
                let Some(slot) = st
                    .ready
                    .iter_mut()
                    .find(|s| Arc::ptr_eq(&s.instance, instance))
                else {
                    return;
                };
                if due && others == 0 && !room {
                    slot.failures = 0;
                } else if due {
                    slot.failures = 0;
                    slot.ejections += 1;
                    let period = ejection(slot.ejections);
                    slot.ejected_until = Some(now + period);
                    tracing::warn!(
                        function = %self.name,
                        instance = slot.instance.id,
                        ?period,
                        "instance ejected from balancing after {EJECT_AFTER} failed calls in a row"
                    );
                    // Calls queued meanwhile get it back when the period ends (or a
                    // replacement, started below when `max` allows).
                    let pool = Arc::downgrade(self);
                    self.control.spawn(async move {
                        sleep(period).await;
                        if let Some(pool) = pool.upgrade() {
                            let mut st = lock(&pool.state);
                            pool.dispatch(&mut st);
                        }
                    });
                    let starts = self.starts_needed(&st);
                    if starts > 0 {
                        st.starting += starts;
                        let delay = backoff(st.failures);
                        drop(st);
                        for _ in 0..starts {
                            self.spawn_start(delay);
                        }
                        return;
                    }
                }
            }
            None => {}
        }
        self.dispatch(&mut st);
    }

    /// Hands free slots to waiting calls, oldest first.
    fn dispatch(&self, st: &mut Scaling) {
        if st.waiters.is_empty() {
            return;
        }
        let concurrency = self.scale().concurrency;
        while !st.waiters.is_empty() {
            let Some(instance) = Self::take_slot(st, concurrency) else {
                return;
            };
            let mut given = false;
            while let Some(tx) = st.waiters.pop_front() {
                match tx.send(Ok(instance.clone())) {
                    Ok(()) => {
                        given = true;
                        break;
                    }
                    Err(_) => continue, // that caller gave up
                }
            }
            if !given {
                if let Some(slot) = st
                    .ready
                    .iter_mut()
                    .find(|s| Arc::ptr_eq(&s.instance, &instance))
                {
                    slot.in_flight -= 1;
                }
                return;
            }
        }
    }

    /// Answers every waiting call with `error`.
    fn fail_waiters(st: &mut Scaling, error: &CallError) {
        for tx in st.waiters.drain(..) {
            let _ = tx.send(Err(error.clone()));
        }
    }

    /// Starts one instance on the control runtime after `delay` (a restart backoff), and
    /// watches it until it exits or is stopped.
    fn spawn_start(self: &Arc<Pool>, delay: Duration) {
        let pool = self.clone();
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.control.spawn(async move {
            if !delay.is_zero() {
                sleep(delay).await;
            }
            // Held from the start: the first call can be served (on the thread that found the
            // instance ready) before this task runs again.
            let _running = pool.processes.token();
            let (stop_tx, stop_rx) = oneshot::channel();
            let (ready_tx, ready_rx) = oneshot::channel();
            let on_ready = {
                let pool = pool.clone();
                move |addr, probe| {
                    let instance = Arc::new(Instance::new(
                        id,
                        addr,
                        pool.workers,
                        Some(probe),
                        stop_tx,
                    ));
                    pool.instance_ready(&instance);
                    let _ = ready_tx.send(instance);
                }
            };
            let function = pool.config.load_full();
            let spawned = std::time::Instant::now();
            match process::start(&function, id, &pool.watchdog, on_ready).await {
                Ok(process) => {
                    // `on_ready` has run: the instance is in the ready set.
                    let Ok(instance) = ready_rx.await else { return };
                    crate::metrics::global().cold_start(&pool.name, spawned.elapsed());
                    tracing::info!(function = %pool.name, instance = id, addr = %process.addr, "instance started");
                    Pool::monitor(pool, instance, process, stop_rx).await;
                }
                Err(e) => pool.start_failed(id, e),
            }
        });
    }

    /// Puts a new instance in the ready set and hands it to waiting calls (on the thread that
    /// found it ready).
    fn instance_ready(&self, instance: &Arc<Instance>) {
        let mut st = lock(&self.state);
        st.starting -= 1;
        st.ready.push(Slot::new(instance.clone()));
        self.dispatch(&mut st);
        if st.draining {
            instance.stop();
        }
    }

    fn start_failed(self: &Arc<Pool>, id: u64, e: process::StartError) {
        let name = &self.name;
        crate::metrics::global().instance_exit(name, "failed_start");
        tracing::warn!(function = %name, instance = id, error = %e, "instance failed to start");
        let mut st = lock(&self.state);
        st.starting -= 1;
        st.failures = st.failures.saturating_add(1);
        if st.ready.is_empty() && st.starting == 0 {
            let error = CallError::new(
                Kind::Unavailable,
                format!("function {name}: instance failed to start: {e}"),
            );
            Self::fail_waiters(&mut st, &error);
        }
    }

    /// Waits for the instance to exit (a crash) or to be told to stop. An instance that stays up
    /// for `STABLE` ends a crash loop: the restart backoff starts over.
    async fn monitor(
        self: Arc<Pool>,
        instance: Arc<Instance>,
        process: process::Process,
        mut stop_rx: oneshot::Receiver<()>,
    ) {
        let process::Process { mut child, pid, .. } = process;
        let stable = sleep(STABLE);
        tokio::pin!(stable);
        let mut lasted = false;
        loop {
            tokio::select! {
                status = child.wait() => {
                    crate::metrics::global().instance_exit(&self.name, "crashed");
                    self.exited(&instance, pid, status);
                    break;
                }
                _ = &mut stop_rx => {
                    // Its connections close first (calls in flight finish, within `grace`): a
                    // graceful server that waits for them then exits on SIGTERM at once.
                    instance.unused(tokio::time::Instant::now() + self.grace).await;
                    let (took, killed) = process::stop(child, pid, self.grace).await;
                    crate::metrics::global().instance_exit(&self.name, "stopped");
                    instance.exited();
                    let ms = took.as_secs_f64() * 1e3;
                    tracing::info!(function = %self.name, instance = instance.id, after_sigterm_ms = ms, killed, "instance stopped");
                    break;
                }
                () = &mut stable, if !lasted => {
                    lasted = true;
                    lock(&self.state).failures = 0;
                }
            }
        }
        self.watchdog.forget(pid);
        process::clean_up(&instance.addr);
    }

    /// An instance exited on its own (a crash): it goes, and a replacement starts if the minimum
    /// or waiting calls need one, after the backoff its failures in a row call for.
    fn exited(
        self: &Arc<Pool>,
        instance: &Arc<Instance>,
        pid: u32,
        status: std::io::Result<std::process::ExitStatus>,
    ) {
        instance.exited();
        // What a wrapper left of the instance goes with it.
        process::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
        self.remove(instance);
        let mut st = lock(&self.state);
        st.failures = st.failures.saturating_add(1);
        let need = (self
            .scale()
            .min
            .saturating_sub(st.ready.len() + st.starting))
        .max(self.starts_needed(&st));
        st.starting += need;
        let (failures, delay) = (st.failures, backoff(st.failures));
        drop(st);
        tracing::warn!(function = %self.name, instance = instance.id, status = ?status, failures, restart_in = ?delay, "instance exited");
        for _ in 0..need {
            self.spawn_start(delay);
        }
    }

    /// Instance processes starting or running.
    pub fn live_processes(&self) -> usize {
        self.processes.len()
    }

    /// Resolves once every instance process has been reaped (after [`Pool::shutdown`]).
    pub async fn stopped(&self) {
        self.processes.close();
        self.processes.wait().await;
    }

    /// Takes `instance` out of the ready set.
    fn remove(&self, instance: &Arc<Instance>) {
        lock(&self.state)
            .ready
            .retain(|s| !Arc::ptr_eq(&s.instance, instance));
        instance.clear_idle();
    }

    /// Stops instances idle for `scale.idle`, down to `scale.min`.
    async fn reap_idle(pool: std::sync::Weak<Pool>) {
        loop {
            let period = match pool.upgrade() {
                Some(p) => {
                    (p.scale().idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
                }
                None => return,
            };
            sleep(period).await;
            let Some(p) = pool.upgrade() else { return };
            let idle = p.scale().idle;
            let min = p.scale().min;
            let stopping: Vec<Arc<Instance>> = {
                let mut st = lock(&p.state);
                let now = Instant::now();
                // A slot whose last call ended since the last look is idle from now: at
                // most one reaper period (a quarter of `idle`, 1 s at most) later than its
                // call's end.
                for s in st.ready.iter_mut().filter(|s| s.in_flight == 0) {
                    s.idle_since.get_or_insert(now);
                }
                let mut out = Vec::new();
                while st.ready.len() > min {
                    let Some(i) = st.ready.iter().position(|s| {
                        s.in_flight == 0
                            && s.idle_since.is_some_and(|t| now.duration_since(t) >= idle)
                    }) else {
                        break;
                    };
                    out.push(st.ready.remove(i).instance);
                }
                out
            };
            for instance in stopping {
                tracing::info!(function = %p.name, instance = instance.id, "stopping idle instance");
                instance.stop();
            }
        }
    }

    /// Whether [`Pool::shutdown`] has run.
    pub fn is_shut_down(&self) -> bool {
        lock(&self.state).draining
    }

    /// Refuses new calls and stops every instance (in-flight calls have been drained by then).
    pub fn shutdown(&self) {
        let instances: Vec<Arc<Instance>> = {
            let mut st = lock(&self.state);
            st.draining = true;
            let name = &self.name;
            Self::fail_waiters(
                &mut st,
                &CallError::new(
                    Kind::Unavailable,
                    format!("function {name} is shutting down"),
                ),
            );
            st.ready.drain(..).map(|s| s.instance).collect()
        };
        for i in instances {
            i.stop();
        }
    }
}

/// How long an instance must stay up to end a crash loop (its failures in a row start over).
const STABLE: Duration = Duration::from_secs(10);

/// Restart backoff after `failures` consecutive failures: 0, 50 ms, 100 ms, ... up to 5 s.
fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(25u64.saturating_mul(1 << failures.min(8))).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_fnmesh_s_failure_not_the_instance_s() {
        use nix::errno::Errno;
        let os = |e: Errno| std::io::Error::from_raw_os_error(e as i32);
        assert!(is_local(&os(Errno::EMFILE)));
        assert!(is_local(&os(Errno::ENFILE)));
        assert!(!is_local(&os(Errno::ECONNREFUSED)));
        assert!(!is_local(&os(Errno::ECONNRESET)));
        assert!(!is_local(&std::io::ErrorKind::UnexpectedEof.into()));
    }

    #[test]
    fn ejections_grow_from_one_second_to_thirty() {
        let got: Vec<u64> = (1..=8).map(|n| ejection(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(ejection(u32::MAX), Duration::from_secs(30));
    }

    /// Power of two choices over remote endpoints: the less loaded of two draws wins most
    /// of the time, draws follow the registry's weights, and an unusable endpoint is never
    /// chosen.
    #[test]
    fn two_choices_prefer_the_less_loaded_and_follow_weights() {
        let slot = |id: u64, weight: u32, in_flight: usize| {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1000 + id as u16));
            let mut s = Slot::new(Arc::new(Instance::remote(id, addr, 1)));
            s.weight = weight;
            s.in_flight = in_flight;
            s.ewma_ns = 1_000_000;
            s
        };
        let share = |ready: &[Slot], usable: &dyn Fn(&Slot) -> bool, want: usize| {
            let n = 4000;
            let hits = (0..n)
                .filter(|_| Pool::two_choices(ready, usable) == Some(want))
                .count();
            hits as f64 / n as f64
        };
        let any = |_: &Slot| true;
        // Equal weights, one busy: the idle one loses only when both draws are the busy one.
        let ready = [slot(1, 1, 0), slot(2, 1, 5)];
        let idle = share(&ready, &any, 0);
        assert!((0.7..0.8).contains(&idle), "idle endpoint chosen {idle}");
        // Equally loaded, weights 1 and 9: the heavy one is drawn nine times in ten and costs
        // less (load over weight), so it loses only when both draws are the light one.
        let ready = [slot(1, 1, 0), slot(2, 9, 0)];
        let heavy = share(&ready, &any, 1);
        assert!((0.97..=1.0).contains(&heavy), "weight 9 chosen {heavy}");
        // The only usable one always; none usable, none.
        let not_first = |s: &Slot| s.instance.id != 1;
        assert_eq!(share(&ready, &not_first, 1), 1.0);
        assert_eq!(Pool::two_choices(&ready, |_: &Slot| false), None);
    }

    /// A function whose instances only listen: enough for a pool to start them and hand out
    /// slots.
    fn listener(concurrency: usize) -> Arc<FunctionConfig> {
        let text = format!(
            r#"
[sidecar]
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"

[[function]]
name = "listener"
protocol = "thrift"
idl = "idl/thrift/echo.thrift"
command = ["python3", "-c", "import os, socket, time; s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen(); time.sleep(60)"]

[function.scale]
min = 0
max = 1
concurrency = {concurrency}
"#
        );
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut config = crate::config::Config::parse(&text, "fnmesh.toml", &base).unwrap();
        Arc::new(config.functions.remove(0))
    }

    /// Each call that waits in the queue holds the pool while it waits, and lets go once it
    /// has its slot: reloads drop retired pools, and a leaked hold per cold call would keep
    /// them (and their state) forever.
    #[tokio::test]
    async fn a_call_that_waited_for_its_slot_leaves_no_hold_on_the_pool() {
        let pool = Pool::new(
            listener(1),
            Duration::from_secs(1),
            Arc::new(Watchdog::disabled()),
            1,
        );
        // Waits for the cold start.
        let first = pool.acquire().await.unwrap();
        // The start's own holds settle once the probe thread has handed the instance over.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let held = Arc::strong_count(&pool);
        // Waits behind `first` (concurrency 1) and gets its slot when `first` is released.
        let second = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire().await }
        });
        while pool.snapshot().queued == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(first);
        let second = second.await.unwrap().unwrap();
        assert_eq!(
            Arc::strong_count(&pool),
            held,
            "as many holds on the pool as after the first call"
        );
        drop(second);
        pool.shutdown();
    }
}
