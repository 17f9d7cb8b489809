//! Thread per core. Each worker thread runs its own single-threaded runtime and serves the
//! connections handed to it from start to end, so a call's read, upstream exchange and reply all
//! happen on one thread and no call wakes another one. (With tokio's multi-threaded runtime every
//! call cost two futex calls and a wake-up of the other core on the benchmark machine: about
//! 20 us of CPU per call.) Upstream connections are pooled per worker, since each is registered
//! with its worker's reactor; the control runtime (accept, admin, instance processes) stays apart.

use std::{
    cell::Cell,
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use tokio::{net::TcpStream, sync::mpsc};

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker running on this thread, if any.
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

struct Worker {
    tx: mpsc::UnboundedSender<std::net::TcpStream>,
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

impl Workers {
    /// Starts `n` worker threads; each serves a connection it is given with `serve`.
    pub fn start<F, Fut>(n: usize, serve: F) -> std::io::Result<Workers>
    where
        F: Fn(TcpStream) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, mut rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
            let conns = Arc::new(AtomicUsize::new(0));
            let serve = serve.clone();
            let counted = conns.clone();
            std::thread::Builder::new()
                .name(format!("fnmesh-worker-{i}"))
                .spawn(move || {
                    INDEX.with(|x| x.set(Some(i)));
                    rt.block_on(async move {
                        while let Some(sock) = rx.recv().await {
                            let guard = Counted(counted.clone());
                            let Ok(sock) = TcpStream::from_std(sock) else {
                                continue;
                            };
                            let serve = serve.clone();
                            tokio::spawn(async move {
                                let _guard = guard;
                                serve(sock).await;
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

    /// Hands an accepted connection to the worker serving the fewest.
    pub fn dispatch(&self, sock: TcpStream) {
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
                if w.tx.send(sock).is_err() {
                    w.conns.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand a connection to a worker"),
        }
    }
}
