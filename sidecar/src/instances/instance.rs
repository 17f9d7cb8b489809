//! One running instance of a function, and the idle connections protocol front ends keep to it.
//!
//! The instances layer does not know what those connections are: each front end keeps a list of
//! its own type per worker thread (a connection belongs to the reactor of the worker that opened
//! it), and the instance only holds the lists and empties them when it stops.

use std::{
    any::Any,
    os::fd::{AsRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
};

use tokio::sync::oneshot;

use super::endpoint::{Endpoint, Stream};
use crate::lock;

/// How many protocols may keep idle connections to an instance (Thrift and gRPC use one each).
const CONN_KINDS: usize = 4;

/// Bumped whenever an instance starts stopping, and [`STOPPING`] woken: a front end holding
/// connections to instances (an HTTP/2 caller connection) then lets go of those to stopping ones.
pub static STOPS: AtomicU64 = AtomicU64::new(0);
pub static STOPPING: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// What an instance's connections share with it: how many are open, whether it is stopping,
/// and the ones closed for the stop whose end the instance has not yet answered.
#[derive(Default)]
struct Conns {
    open: AtomicUsize,
    stopping: AtomicBool,
    lingering: Mutex<Vec<OwnedFd>>,
}

/// An open connection to an instance, counted while it lives: a stop waits until none is left,
/// and until the instance has closed its side of each, before it signals the process, so that
/// a server that counts its connections at SIGTERM (Volo waits 2 s for them) exits at once.
pub struct Open(Arc<Conns>);

impl Open {
    /// The connection `sock` is closing: when the instance is stopping, it is half-closed now
    /// (the instance sees its end) and watched until the instance closes its side.
    pub fn close(&self, sock: &impl std::os::fd::AsFd) {
        if !self.0.stopping.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(fd) = sock.as_fd().try_clone_to_owned() {
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            lock(&self.0.lingering).push(fd);
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the instance has closed its side of `s`: its end came (or the connection broke).
fn answered_end(s: &OwnedFd) -> bool {
    use nix::{errno::Errno, sys::socket};
    let mut buf = [0u8; 512];
    loop {
        match socket::recv(s.as_raw_fd(), &mut buf, socket::MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return true,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return e != Errno::EAGAIN,
        }
    }
}

/// One running instance.
pub struct Instance {
    pub id: u64,
    pub addr: Endpoint,
    /// When it became ready ([`crate::metrics::now_ns`]): a call that arrived before waited
    /// for its cold start.
    pub ready_at: u64,
    /// Idle connections by protocol: each slot, once set, holds one front end's per-worker
    /// lists ([`PerWorker`]). Set slots are never replaced, so a lookup is an atomic load and a
    /// type check.
    idle: [OnceLock<Box<dyn IdleConns>>; CONN_KINDS],
    /// Worker threads, plus one list for other threads.
    workers: usize,
    /// The readiness probe's connection, not yet bound to a worker: the first call takes it.
    probe: Mutex<Option<OwnedFd>>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    /// Cancelled when its process has exited (crashed) or been stopped.
    exited: tokio_util::sync::CancellationToken,
    /// Its connections (see [`Open`]), and whether it is stopping.
    conns: Arc<Conns>,
    /// An endpoint from the registry, not a process of this sidecar: nothing exits.
    remote: bool,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A front end's idle connections of type `T` to one instance, one list per worker thread.
struct PerWorker<T>(Box<[Mutex<Vec<T>>]>);

/// What the instance needs of [`PerWorker`] lists whatever their type: to empty them.
trait IdleConns: Any + Send + Sync {
    fn clear(&self);
}

impl<T: Send + 'static> IdleConns for PerWorker<T> {
    fn clear(&self) {
        for list in self.0.iter() {
            lock(list).clear();
        }
    }
}

impl Instance {
    pub(super) fn new(
        id: u64,
        addr: Endpoint,
        workers: usize,
        probe: Option<OwnedFd>,
        stop: oneshot::Sender<()>,
    ) -> Instance {
        Instance {
            id,
            addr,
            ready_at: crate::metrics::now_ns(),
            idle: Default::default(),
            workers,
            probe: Mutex::new(probe),
            stop: Mutex::new(Some(stop)),
            exited: tokio_util::sync::CancellationToken::new(),
            conns: Arc::default(),
            remote: false,
        }
    }

    /// An endpoint the registry lists (another sidecar, a plain service): no process, no probe.
    pub(super) fn remote(id: u64, addr: std::net::SocketAddr, workers: usize) -> Instance {
        let (stop, _) = oneshot::channel();
        Instance {
            remote: true,
            ..Instance::new(id, Endpoint::Tcp(addr), workers, None, stop)
        }
    }

    /// Counts a connection to it as open until the guard drops.
    pub fn open(&self) -> Open {
        self.conns.open.fetch_add(1, Ordering::Relaxed);
        Open(self.conns.clone())
    }

    /// Told to stop: a connection to it goes back to no idle list, and closes once its calls are
    /// done.
    #[inline]
    pub fn is_stopping(&self) -> bool {
        self.conns.stopping.load(Ordering::Relaxed)
    }

    /// Resolves once no connection to it is open and it has closed its side of each one closed
    /// for the stop, or at `until`.
    pub(super) async fn unused(&self, until: tokio::time::Instant) {
        loop {
            let open = self.conns.open.load(Ordering::Relaxed);
            let lingering = {
                let mut l = lock(&self.conns.lingering);
                l.retain(|s| !answered_end(s));
                l.len()
            };
            if open + lingering == 0 || tokio::time::Instant::now() >= until {
                lock(&self.conns.lingering).clear();
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Whether its process exits within `grace`: a front end whose connection broke asks,
    /// so that a crash takes the instance out (its monitor reaps it) before the next call
    /// could pick it, while a live instance that only dropped a connection stays.
    pub async fn exits_within(&self, grace: std::time::Duration) -> bool {
        if self.remote {
            return false; // a broken connection to a remote endpoint is no exit to wait for
        }
        tokio::time::timeout(grace, self.exited.cancelled())
            .await
            .is_ok()
    }

    /// Its process has exited or been stopped.
    pub(super) fn exited(&self) {
        self.exited.cancel();
    }

    /// This worker thread's idle connections of type `T` (one type per protocol front end).
    #[inline]
    pub fn idle<T: Send + 'static>(&self) -> &Mutex<Vec<T>> {
        let last = self.workers;
        let worker = crate::workers::current().map_or(last, |i| i.min(last));
        for slot in &self.idle {
            let conns: &dyn IdleConns = &**slot.get_or_init(|| {
                Box::new(PerWorker::<T>(
                    (0..=self.workers).map(|_| Mutex::new(Vec::new())).collect(),
                ))
            });
            if let Some(PerWorker(lists)) = (conns as &dyn Any).downcast_ref::<PerWorker<T>>() {
                return &lists[worker];
            }
        }
        // Only reachable with more connection types than CONN_KINDS: a programming error that
        // every test of a front end would hit.
        unreachable!("more than {CONN_KINDS} kinds of instance connection")
    }

    /// The readiness probe's connection, once: already open, so the first call skips a connect.
    /// It joins this thread's reactor.
    pub fn take_probe(&self) -> Option<Stream> {
        let probe = lock(&self.probe).take()?;
        self.addr.adopt(probe).ok()
    }

    /// A new connection to the instance.
    pub async fn connect(&self) -> std::io::Result<Stream> {
        self.addr.connect().await
    }

    /// Closes the idle connections (calls in flight keep theirs until they finish).
    pub(super) fn clear_idle(&self) {
        for conns in self.idle.iter().filter_map(OnceLock::get) {
            conns.clear();
        }
        lock(&self.probe).take();
    }

    /// Stops it: its idle connections close now, the others once their calls are done (front
    /// ends holding some are woken), and then its process is signalled (see `Pool::monitor`).
    pub(super) fn stop(&self) {
        self.conns.stopping.store(true, Ordering::Relaxed);
        self.clear_idle();
        STOPS.fetch_add(1, Ordering::Relaxed);
        STOPPING.notify_waiters();
        if let Some(tx) = lock(&self.stop).take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_front_end_keeps_its_own_idle_connections_until_the_instance_stops() {
        let (tx, _rx) = oneshot::channel();
        let i = Instance::new(1, Endpoint::Tcp(([127, 0, 0, 1], 9).into()), 2, None, tx);
        lock(i.idle::<u32>()).push(7);
        lock(i.idle::<String>()).push("up".into());
        lock(i.idle::<u32>()).push(8);
        assert_eq!(*lock(i.idle::<u32>()), [7, 8]);
        assert_eq!(*lock(i.idle::<String>()), ["up"]);
        i.stop();
        assert!(lock(i.idle::<u32>()).is_empty());
        assert!(lock(i.idle::<String>()).is_empty());
    }
}
