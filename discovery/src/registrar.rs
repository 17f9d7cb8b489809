//! Keeps a sidecar's registrations in a registry: registers what is wanted, renews it every
//! third of the TTL, registers again what the registry lost (it restarted, a lease ran out),
//! removes what is no longer wanted, and deregisters everything when the sidecar leaves. A
//! registry that cannot be reached is retried every second and never stops anything else.

use std::time::Duration;

use tokio::{
    sync::{oneshot, watch},
    time::sleep,
};

use crate::{Error, Registration, Registry};

/// How the registrations stand, for the log and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Not tried yet.
    Starting,
    /// Everything wanted is registered.
    Registered,
    /// The last attempt failed (the registry is unreachable or refused): retrying.
    Failing(String),
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Starting => write!(f, "registering"),
            Health::Registered => write!(f, "registered"),
            Health::Failing(e) => write!(f, "failing, retrying: {e}"),
        }
    }
}

/// The task keeping registrations, and how to steer it.
pub struct Registrar {
    wanted: watch::Sender<Vec<Registration>>,
    health: watch::Receiver<Health>,
    leave: Option<oneshot::Sender<(Duration, oneshot::Sender<()>)>>,
}

/// How soon a failed attempt is tried again.
const RETRY: Duration = Duration::from_secs(1);

impl Registrar {
    /// Starts keeping `wanted` registered in `registry` with time-to-live `ttl`, on the current
    /// runtime.
    pub fn start<R: Registry>(registry: R, ttl: Duration, wanted: Vec<Registration>) -> Registrar {
        let (wanted_tx, wanted_rx) = watch::channel(wanted);
        let (health_tx, health_rx) = watch::channel(Health::Starting);
        let (leave_tx, leave_rx) = oneshot::channel();
        tokio::spawn(keep(registry, ttl, wanted_rx, health_tx, leave_rx));
        Registrar {
            wanted: wanted_tx,
            health: health_rx,
            leave: Some(leave_tx),
        }
    }

    /// What should be registered from now on (a policy reload).
    pub fn set(&self, wanted: Vec<Registration>) {
        self.wanted.send_if_modified(|w| {
            let changed = *w != wanted;
            *w = wanted;
            changed
        });
    }

    pub fn health(&self) -> Health {
        self.health.borrow().clone()
    }

    /// Waits until the registrations stand as `f` wants (tests, start-up logs).
    pub async fn wait_for(&self, f: impl Fn(&Health) -> bool) {
        let mut rx = self.health.clone();
        let _ = rx.wait_for(|h| f(h)).await;
    }

    /// Deregisters everything, waiting at most `within`, and stops keeping registrations.
    pub async fn leave(&mut self, within: Duration) {
        let Some(leave) = self.leave.take() else {
            return;
        };
        let (done_tx, done_rx) = oneshot::channel();
        if leave.send((within, done_tx)).is_ok() {
            let _ = tokio::time::timeout(within + Duration::from_millis(100), done_rx).await;
        }
    }
}

async fn keep<R: Registry>(
    registry: R,
    ttl: Duration,
    mut wanted: watch::Receiver<Vec<Registration>>,
    health: watch::Sender<Health>,
    mut leave: oneshot::Receiver<(Duration, oneshot::Sender<()>)>,
) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let mut held: Vec<Registration> = Vec::new();
    let mut renew_due = false;
    loop {
        let mut failure: Option<Error> = None;
        if renew_due {
            // All at once, each within a third of the TTL: one slow answer (or many functions
            // on a slow agent) cannot outlast the TTL of the others.
            let renewals = held.drain(..).map(|r| async {
                let renewed = match tokio::time::timeout(period, registry.renew(&r)).await {
                    Ok(renewed) => renewed,
                    Err(_) => Err(Error::Unreachable {
                        registry: "registry",
                        detail: format!(
                            "no answer to a renewal within {period:?} (a third of the TTL)"
                        ),
                    }),
                };
                (r, renewed)
            });
            let mut kept = Vec::new();
            for (r, renewed) in futures_util::future::join_all(renewals).await {
                match renewed {
                    Ok(()) => kept.push(r),
                    Err(e @ Error::Lost { .. }) => {
                        tracing::warn!(service = %r.name, id = %r.id(), error = %e, "registration lost; registering again");
                    }
                    Err(e) => {
                        kept.push(r);
                        failure = Some(e);
                    }
                }
            }
            held = kept;
        }
        let want = wanted.borrow_and_update().clone();
        for r in held.iter().filter(|r| !want.contains(r)) {
            match registry.deregister(r).await {
                Ok(()) => tracing::info!(service = %r.name, id = %r.id(), "deregistered"),
                Err(e) => {
                    tracing::warn!(service = %r.name, id = %r.id(), error = %e, "deregistering failed")
                }
            }
        }
        held.retain(|r| want.contains(r));
        for r in &want {
            if held.contains(r) {
                continue;
            }
            match registry.register(r, ttl).await {
                Ok(()) => {
                    tracing::info!(service = %r.name, id = %r.id(), address = %r.address, "registered");
                    held.push(r.clone());
                }
                Err(e) => failure = Some(e),
            }
        }
        let now = match &failure {
            Some(e) => Health::Failing(e.to_string()),
            None => Health::Registered,
        };
        // Logged once when an outage starts and once when it ends, however its text varies.
        health.send_if_modified(|h| {
            if *h == now {
                return false;
            }
            let was_failing = matches!(h, Health::Failing(_));
            match &now {
                Health::Failing(e) if !was_failing => {
                    tracing::warn!("service registry: {e}; the sidecar keeps serving, retrying every {RETRY:?}")
                }
                Health::Registered if was_failing => {
                    tracing::info!("service registry reachable again: every function is registered")
                }
                _ => {}
            }
            *h = now.clone();
            true
        });
        let pause = if failure.is_some() {
            RETRY.min(period)
        } else {
            period
        };
        tokio::select! {
            () = sleep(pause) => renew_due = true,
            changed = wanted.changed() => {
                renew_due = false;
                if changed.is_err() {
                    return;
                }
            }
            leaving = &mut leave => {
                let Ok((within, done)) = leaving else { return };
                let all = async {
                    for r in &held {
                        match registry.deregister(r).await {
                            Ok(()) => tracing::info!(service = %r.name, id = %r.id(), "deregistered"),
                            Err(e) => tracing::warn!(service = %r.name, id = %r.id(), error = %e, "deregistering failed"),
                        }
                    }
                };
                let _ = tokio::time::timeout(within, all).await;
                let _ = done.send(());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    };

    use super::*;
    use crate::{embedded::Embedded, Resolver};
    use futures_util::StreamExt;

    fn registration(name: &str) -> Registration {
        Registration::local(name, 8888)
    }

    /// An embedded registry that can be made unreachable, or forget everything.
    #[derive(Clone, Default)]
    struct Flaky {
        inner: Embedded,
        down: Arc<AtomicBool>,
        registered: Arc<AtomicUsize>,
    }

    impl Flaky {
        fn check(&self) -> Result<(), Error> {
            match self.down.load(Ordering::SeqCst) {
                true => Err(Error::Unreachable {
                    registry: "flaky",
                    detail: "down".into(),
                }),
                false => Ok(()),
            }
        }
    }

    impl Registry for Flaky {
        async fn register(&self, r: &Registration, ttl: Duration) -> Result<(), Error> {
            self.check()?;
            self.registered.fetch_add(1, Ordering::SeqCst);
            self.inner.register(r, ttl).await
        }
        async fn renew(&self, r: &Registration) -> Result<(), Error> {
            self.check()?;
            self.inner.renew(r).await
        }
        async fn deregister(&self, r: &Registration) -> Result<(), Error> {
            self.check()?;
            self.inner.deregister(r).await
        }
    }

    /// An embedded registry whose renewals of `slow` never answer.
    #[derive(Clone, Default)]
    struct Stuck {
        inner: Embedded,
        slow: &'static str,
        renewed: Arc<AtomicUsize>,
    }

    impl Registry for Stuck {
        async fn register(&self, r: &Registration, ttl: Duration) -> Result<(), Error> {
            self.inner.register(r, ttl).await
        }
        async fn renew(&self, r: &Registration) -> Result<(), Error> {
            if r.name == self.slow {
                std::future::pending::<()>().await;
            }
            self.renewed.fetch_add(1, Ordering::SeqCst);
            self.inner.renew(r).await
        }
        async fn deregister(&self, r: &Registration) -> Result<(), Error> {
            self.inner.deregister(r).await
        }
    }

    /// Renewals run at once and each is bounded by a third of the TTL: a renewal that never
    /// answers holds none of the others back, and is reported.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_never_answers_holds_no_other_back() {
        let registry = Stuck {
            slow: "b",
            ..Stuck::default()
        };
        let wanted = vec![registration("a"), registration("b"), registration("c")];
        let keeper = Registrar::start(registry.clone(), Duration::from_secs(3), wanted);
        keeper.wait_for(|h| *h == Health::Registered).await;
        // Three renewal rounds (every second): a and c are renewed in each.
        sleep(Duration::from_millis(3500)).await;
        assert!(
            registry.renewed.load(Ordering::SeqCst) >= 4,
            "{:?}",
            registry.renewed
        );
        keeper
            .wait_for(|h| matches!(h, Health::Failing(e) if e.contains("renewal")))
            .await;
        assert_eq!(names(&registry.inner, "a").await, 1);
        assert_eq!(names(&registry.inner, "c").await, 1);
    }

    async fn names(e: &Embedded, name: &str) -> usize {
        Box::pin(e.resolve(name))
            .next()
            .await
            .unwrap()
            .unwrap()
            .len()
    }

    #[tokio::test(start_paused = true)]
    async fn registrations_follow_what_is_wanted_survive_outages_and_leave() {
        let registry = Flaky::default();
        registry.down.store(true, Ordering::SeqCst);
        let mut keeper = Registrar::start(
            registry.clone(),
            Duration::from_secs(3),
            vec![registration("a")],
        );
        // Unreachable at start: failing, retried each second.
        keeper.wait_for(|h| matches!(h, Health::Failing(_))).await;
        assert_eq!(names(&registry.inner, "a").await, 0);
        registry.down.store(false, Ordering::SeqCst);
        keeper.wait_for(|h| *h == Health::Registered).await;
        assert_eq!(names(&registry.inner, "a").await, 1);

        // The registry forgets (a restart): renewal finds it lost and registers again.
        registry.inner.deregister(&registration("a")).await.unwrap();
        let before = registry.registered.load(Ordering::SeqCst);
        sleep(Duration::from_millis(1100)).await;
        assert_eq!(registry.registered.load(Ordering::SeqCst), before + 1);
        assert_eq!(names(&registry.inner, "a").await, 1);

        // A reload: b wanted instead of a.
        keeper.set(vec![registration("b")]);
        sleep(Duration::from_millis(10)).await;
        assert_eq!(names(&registry.inner, "a").await, 0);
        assert_eq!(names(&registry.inner, "b").await, 1);

        // Leaving deregisters.
        keeper.leave(Duration::from_secs(1)).await;
        assert_eq!(names(&registry.inner, "b").await, 0);
    }
}
