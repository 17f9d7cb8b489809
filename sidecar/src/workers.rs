//! Thread per core. Each worker thread runs its own single-threaded runtime and serves the
//! connections handed to it from start to end, so a call's read, upstream exchange and reply all
//! happen on one thread and no call wakes another one. (With tokio's multi-threaded runtime
//! every call cost two futex calls and a wake-up of the other core.) Connections to instances
//! are kept per worker, since each is registered with its worker's reactor; the control runtime
//! (accept, admin, instance processes) stays apart.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Poll, Waker},
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::mpsc};

use crate::config::ConnectionLimits;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
    /// Events this worker has handled (requests read, replies come back), and the busy poller
    /// waiting for the next one.
    static EVENTS: Cell<u64> = const { Cell::new(0) };
    static POLLER: Cell<Option<Waker>> = const { Cell::new(None) };
    /// Calls in flight on this worker.
    static IN_FLIGHT: Cell<usize> = const { Cell::new(0) };
    /// The sweep of the workers this thread is one of.
    static SWEEPER: RefCell<Option<Arc<Sweeper>>> = const { RefCell::new(None) };
}

/// Coarse time for connection housekeeping (stalled frames, idle connections): the control
/// runtime ticks it and wakes every connection that asked, so a connection checks its timeouts
/// by comparing a tick count instead of arming a timer per call, and the workers keep no timer
/// (a worker with one pays for it at every park).
pub struct Sweeper {
    tick: AtomicU64,
    wakers: Mutex<Wakers>,
}

/// Connections' wakers, by slot; freed slots are reused.
#[derive(Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Sweeper {
    fn new() -> Arc<Sweeper> {
        Arc::new(Sweeper {
            tick: AtomicU64::new(0),
            wakers: Mutex::new(Wakers::default()),
        })
    }

    /// Ticks every `every` and wakes the connections, until the sidecar stops.
    async fn run(self: Arc<Sweeper>, every: Duration) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.tick.fetch_add(1, Ordering::Relaxed);
            for w in crate::lock(&self.wakers).slots.iter().flatten() {
                w.wake_by_ref();
            }
        }
    }
}

/// A connection's place in its workers' sweep: woken at every tick until dropped.
pub struct Swept {
    sweeper: Option<Arc<Sweeper>>,
    slot: usize,
}

impl Swept {
    /// Wakes `waker` (a connection's task) at every tick of this worker's sweep (never, off a
    /// worker thread).
    pub fn register(waker: Waker) -> Swept {
        let Some(sweeper) = SWEEPER.with(|s| s.borrow().clone()) else {
            return Swept {
                sweeper: None,
                slot: 0,
            };
        };
        let slot = {
            let mut w = crate::lock(&sweeper.wakers);
            match w.free.pop() {
                Some(i) => {
                    w.slots[i] = Some(waker);
                    i
                }
                None => {
                    w.slots.push(Some(waker));
                    w.slots.len() - 1
                }
            }
        };
        Swept {
            sweeper: Some(sweeper),
            slot,
        }
    }

    /// The sweep's ticks so far.
    #[inline]
    pub fn tick(&self) -> u64 {
        self.sweeper
            .as_ref()
            .map_or(0, |s| s.tick.load(Ordering::Relaxed))
    }
}

impl Drop for Swept {
    fn drop(&mut self) {
        if let Some(s) = &self.sweeper {
            let mut w = crate::lock(&s.wakers);
            w.slots[self.slot] = None;
            w.free.push(self.slot);
        }
    }
}

/// Most calls a worker may have in flight and still poll busily. Busy polling pays for a few
/// calls at a time, whose replies would otherwise each find the worker asleep. With more in
/// flight the worker's events come close together and it barely sleeps anyway, while a worker
/// that keeps polling stays runnable and takes CPU time from the functions and callers on the
/// same host: under 64 concurrent callers that cost 4-5% of throughput on the benchmark machine.
const BUSY_POLL_MAX_IN_FLIGHT: usize = 4;

/// Whether this worker polls busily now (see [`BUSY_POLL_MAX_IN_FLIGHT`]).
fn polls_busily(in_flight: usize) -> bool {
    in_flight <= BUSY_POLL_MAX_IN_FLIGHT
}

/// Counts a call as in flight on this worker for as long as it lives (it must be dropped on the
/// thread that made it, as a call's future on a worker is).
pub struct InFlight(());

impl InFlight {
    pub fn enter() -> InFlight {
        IN_FLIGHT.with(|n| n.set(n.get() + 1));
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// The index of the worker running on this thread, if any.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// Tells this worker's busy poller that an event was handled, so the worker keeps polling for
/// the next one instead of sleeping.
pub fn busy() {
    EVENTS.with(|e| e.set(e.get().wrapping_add(1)));
    if !polls_busily(IN_FLIGHT.with(Cell::get)) {
        return;
    }
    if let Some(w) = POLLER.with(Cell::take) {
        w.wake();
    }
}

/// Busy polling, like haproxy's `busy-polling` but only for `window` after the last event: a
/// worker that sleeps in `epoll_wait` between a request and its reply pays for the wake-up of a
/// halted CPU (tens of microseconds on a VM, once per direction) on every call. While in the
/// window this task yields to the runtime, which then polls the reactor without blocking, and to
/// the kernel (`sched_yield`), so threads waiting for this CPU run first. Idle for longer than
/// `window`, or with more than a few calls in flight, it waits for the next event and the worker
/// sleeps as usual.
async fn poll_busily(window: Duration) {
    loop {
        let seen = EVENTS.with(Cell::get);
        std::future::poll_fn(|cx| {
            if EVENTS.with(Cell::get) != seen {
                Poll::Ready(())
            } else {
                POLLER.with(|p| p.set(Some(cx.waker().clone())));
                Poll::Pending
            }
        })
        .await;
        let mut seen = EVENTS.with(Cell::get);
        let mut last = Instant::now();
        loop {
            std::thread::yield_now();
            tokio::task::yield_now().await;
            let now = EVENTS.with(Cell::get);
            if !polls_busily(IN_FLIGHT.with(Cell::get)) {
                break;
            }
            if now != seen {
                seen = now;
                last = Instant::now();
            } else if last.elapsed() > window {
                break;
            }
        }
    }
}

struct Worker {
    tx: mpsc::UnboundedSender<(std::net::TcpStream, Listener)>,
    /// Connections this worker is serving.
    conns: Arc<AtomicUsize>,
}

pub struct Workers {
    workers: Vec<Worker>,
}

/// Counts a connection for as long as it is served.
struct Counted(Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The listener a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `[sidecar] listen`: callers of the functions.
    Main,
    /// `[sidecar] egress`: the functions' own calls.
    Egress,
}

impl Workers {
    /// Starts `n` worker threads; each serves a connection it is given with `serve`. Their
    /// connections' sweep ticks every `sweep_every` on the calling (control) runtime.
    pub fn start<F, Fut>(
        n: usize,
        busy_poll: Duration,
        sweep_every: Duration,
        serve: F,
    ) -> std::io::Result<Workers>
    where
        F: Fn(TcpStream, Listener) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let sweeper = Sweeper::new();
        tokio::spawn(sweeper.clone().run(sweep_every));
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, mut rx) = mpsc::unbounded_channel::<(std::net::TcpStream, Listener)>();
            let conns = Arc::new(AtomicUsize::new(0));
            let serve = serve.clone();
            let counted = conns.clone();
            let sweeper = sweeper.clone();
            std::thread::Builder::new()
                .name(format!("fnmesh-worker-{i}"))
                .spawn(move || {
                    INDEX.with(|x| x.set(Some(i)));
                    if !busy_poll.is_zero() {
                        rt.spawn(poll_busily(busy_poll));
                    }
                    SWEEPER.with(|s| *s.borrow_mut() = Some(sweeper.clone()));
                    rt.block_on(async move {
                        while let Some((sock, listener)) = rx.recv().await {
                            let guard = Counted(counted.clone());
                            let Ok(sock) = TcpStream::from_std(sock) else {
                                continue;
                            };
                            let serve = serve.clone();
                            tokio::spawn(async move {
                                let _guard = guard;
                                serve(sock, listener).await;
                            });
                        }
                    });
                })?;
            workers.push(Worker { tx, conns });
        }
        Ok(Workers { workers })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Hands a connection `listener` accepted to the worker serving the fewest.
    pub fn dispatch(&self, sock: TcpStream, listener: Listener) {
        let Some(w) = self
            .workers
            .iter()
            .min_by_key(|w| w.conns.load(Ordering::Relaxed))
        else {
            return;
        };
        match sock.into_std() {
            Ok(sock) => {
                w.conns.fetch_add(1, Ordering::Relaxed);
                if w.tx.send((sock, listener)).is_err() {
                    w.conns.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand a connection to a worker"),
        }
    }
}

/// A connection's watch on what must not last: a frame begun but not whole within
/// `header_timeout`, and no call for `idle_timeout`. It looks at the sweep's ticks (a few per
/// timeout) instead of timing each frame, so calls pay nothing for it; a stall is seen between
/// its timeout and a tick after.
pub struct Stalls {
    every: Duration,
    limits: ConnectionLimits,
    /// The sweep's tick and the connection's progress (frames read) when last looked at, and
    /// how long the connection has been stuck in one frame, or idle, as of then.
    tick: u64,
    progress: u64,
    in_frame: Duration,
    idle: Duration,
    swept: Swept,
}

/// What a look at a connection found.
pub enum Stalled {
    No,
    /// In the middle of a frame for longer than `header_timeout`.
    InFrame,
    /// No call and no bytes for longer than `idle_timeout`.
    Idle,
}

impl Stalls {
    /// A watch woken by the sweep (`waker`: the connection's task).
    pub fn new(limits: ConnectionLimits, waker: Waker) -> Stalls {
        let swept = Swept::register(waker);
        Stalls {
            every: limits.sweep_every(),
            limits,
            tick: swept.tick(),
            progress: 0,
            in_frame: Duration::ZERO,
            idle: Duration::ZERO,
            swept,
        }
    }

    /// Ready once the sweep has ticked since the last look (an atomic read; the sweep itself
    /// wakes the task).
    #[inline]
    pub fn poll_ticked(&self) -> Poll<()> {
        match self.swept.tick() != self.tick {
            true => Poll::Ready(()),
            false => Poll::Pending,
        }
    }

    /// At a tick: whether the connection is stuck in a frame or idle for too long, given how
    /// many frames it has read (`progress`), whether it holds part of one, and whether it has
    /// calls in flight.
    pub fn check(&mut self, progress: u64, in_frame: bool, in_flight: bool) -> Stalled {
        let now = self.swept.tick();
        let passed = self.every * u32::try_from(now - self.tick).unwrap_or(u32::MAX);
        self.tick = now;
        let progressed = progress != self.progress;
        self.progress = progress;
        self.in_frame = match (in_frame, progressed) {
            (true, false) => self.in_frame + passed,
            _ => Duration::ZERO,
        };
        self.idle = match in_flight || in_frame || progressed {
            true => Duration::ZERO,
            false => self.idle + passed,
        };
        if self.in_frame >= self.limits.header_timeout {
            Stalled::InFrame
        } else if !self.limits.idle_timeout.is_zero() && self.idle >= self.limits.idle_timeout {
            Stalled::Idle
        } else {
            Stalled::No
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_polling_is_for_a_few_calls_in_flight() {
        assert!(polls_busily(0));
        assert!(polls_busily(1));
        assert!(polls_busily(BUSY_POLL_MAX_IN_FLIGHT));
        assert!(!polls_busily(BUSY_POLL_MAX_IN_FLIGHT + 1));
        assert!(!polls_busily(32));
    }

    #[test]
    fn calls_in_flight_are_counted_while_they_live() {
        let before = IN_FLIGHT.with(Cell::get);
        let a = InFlight::enter();
        let b = InFlight::enter();
        assert_eq!(IN_FLIGHT.with(Cell::get), before + 2);
        drop(a);
        assert_eq!(IN_FLIGHT.with(Cell::get), before + 1);
        drop(b);
        assert_eq!(IN_FLIGHT.with(Cell::get), before);
    }
}
