//! The sidecar's drain: the signal that starts it, and the work it waits for. Work in progress
//! (Thrift calls, gRPC streams, HTTP/2 connections) holds a tokio-util `TaskTracker` token while
//! it lasts, so the drain waits for the tracker to empty instead of polling counters.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio_util::{
    sync::CancellationToken,
    task::{task_tracker::TaskTrackerToken, TaskTracker},
};

/// Shared by everything a drain concerns; clones share the same state.
#[derive(Clone, Default)]
pub struct Drain {
    /// Cancelled once the sidecar starts draining.
    started: CancellationToken,
    /// Calls, streams and connections in progress.
    in_progress: TaskTracker,
    /// Set with `started`: read on every Thrift read, where a lock would be too dear.
    draining: Arc<AtomicBool>,
}

impl Drain {
    /// Counts one call, stream or connection as in progress for as long as the token lives.
    #[inline]
    pub fn track(&self) -> TaskTrackerToken {
        self.in_progress.token()
    }

    /// Whether the sidecar is draining (an atomic load).
    #[inline]
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts the drain: everything listening to [`Drain::started`] hears it.
    pub fn start(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.started.cancel();
    }

    /// Resolves once the drain has started.
    pub fn started(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.started.clone().cancelled_owned()
    }

    /// How much work is in progress.
    pub fn in_progress(&self) -> usize {
        self.in_progress.len()
    }

    /// Resolves once no work is in progress (work may still start meanwhile).
    pub async fn finished(&self) {
        self.in_progress.close();
        self.in_progress.wait().await;
    }
}
