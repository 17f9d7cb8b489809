//! The drain after SIGTERM or SIGINT. First the sidecar says it is going: `/readyz` fails, gRPC
//! health turns NOT_SERVING, HTTP/2 connections get GOAWAY, and the functions are deregistered.
//! It keeps accepting meanwhile, and for a moment after (with a registry), so that callers who
//! resolved it just before are served. Then it stops accepting; calls in flight get
//! `drain_timeout` to finish, and the instances are stopped. Thrift connections take no new call
//! once the drain starts: each closes when its calls are answered (a client reconnects
//! elsewhere). A second SIGTERM or SIGINT ends the drain at once.

use std::time::Duration;

use tokio::time::{sleep, timeout};

use super::{accept_on, Sidecar, Signals};
use crate::workers::{Listener, Workers};

/// How long deregistering may take when the sidecar drains.
const DEREGISTER: Duration = Duration::from_secs(2);
/// How long the listener stays open after deregistering, for callers whose registry view is a
/// moment old.
const PROPAGATION: Duration = Duration::from_secs(1);

/// How long instances get after a second signal before the sidecar exits (its watchdog then
/// kills what is left).
const FORCED: Duration = Duration::from_millis(200);

impl Sidecar {
    pub(super) async fn shutdown(self, mut signals: Signals) {
        let (grace, mesh) = (self.grace, self.mesh.clone());
        mesh.drain.start();
        // Queued work stops being pulled; calls in flight end within the grace (what does not
        // is delivered again elsewhere after `ack_wait`).
        if let Some(q) = &self.queue {
            q.stop();
        }
        let workers = tokio::select! {
            workers = self.drain(grace) => Some(workers),
            () = signals.stop() => None,
        };
        // Instances get SIGTERM, then SIGKILL after the grace; wait for them to be reaped.
        let pools = mesh.close();
        for p in &pools {
            p.shutdown();
        }
        let reaped = futures_util::future::join_all(pools.iter().map(|p| p.stopped()));
        tokio::pin!(reaped);
        let forced = match workers {
            Some(_) => tokio::select! {
                _ = timeout(grace + Duration::from_secs(1), &mut reaped) => false,
                () = signals.stop() => true,
            },
            None => true,
        };
        if forced {
            tracing::warn!("a second signal: stopping at once");
            let _ = timeout(FORCED, &mut reaped).await;
        }
        drop(workers);
        tracing::info!("stopped");
    }

    /// Says the sidecar is going, stops accepting, and waits (within `grace`) for the work in
    /// progress; gives back the worker threads, which still serve the connections they have.
    async fn drain(mut self, grace: Duration) -> Workers {
        let mesh = self.mesh.clone();
        let leave = async {
            mesh.deregister(DEREGISTER.min(grace)).await;
            if self.registry != "none" {
                sleep(PROPAGATION.min(grace / 2)).await;
            }
        };
        tokio::pin!(leave);
        loop {
            tokio::select! {
                accepted = accept_on(&self.listener) => self.dispatch(accepted, Listener::Main).await,
                accepted = accept_on(&self.egress) => self.dispatch(accepted, Listener::Egress).await,
                () = &mut leave => break,
            }
        }
        // No new connections; the worker threads serve those they have until the end.
        drop(self.listener.take());
        // Thrift calls and gRPC streams in flight, and HTTP/2 connections still open after
        // their GOAWAY (each closes once its streams are done and flushed). Functions still
        // finishing calls may call out through the egress listener meanwhile.
        tracing::info!(in_flight = mesh.drain.in_progress(), "draining");
        let drained = timeout(grace, async {
            let finished = mesh.drain.finished();
            tokio::pin!(finished);
            loop {
                tokio::select! {
                    () = &mut finished => return,
                    accepted = accept_on(&self.egress) => self.dispatch(accepted, Listener::Egress).await,
                }
            }
        });
        if drained.await.is_err() {
            tracing::warn!(
                in_flight = mesh.drain.in_progress(),
                "drain_timeout passed with calls still in flight"
            );
        }
        self.workers
    }
}
