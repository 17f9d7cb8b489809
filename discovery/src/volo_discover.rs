//! `volo::discovery::Discover` over any [`Resolver`]: a Volo client built with it calls a
//! function by name, and its load balancer follows the registry as sidecars come and go.

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use futures_util::StreamExt;
use tokio::sync::watch;
use volo::{
    context::Endpoint as VoloEndpoint,
    discovery::{diff_address, Change, Discover, Instance},
    loadbalance::error::LoadBalanceError,
    net::Address,
    FastStr,
};

use crate::{Endpoint, Resolver};

/// How long a first `discover` of a name waits for the registry's answer.
const FIRST_ANSWER: Duration = Duration::from_secs(5);

type Instances = Vec<Arc<Instance>>;

/// A Volo `Discover`: names are followed from their first `discover` on, one task each.
pub struct VoloDiscover<R> {
    inner: Arc<Inner<R>>,
}

impl<R> Clone for VoloDiscover<R> {
    fn clone(&self) -> Self {
        VoloDiscover {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<R> {
    resolver: R,
    /// Each followed name's latest endpoints (`None` until the registry first answers).
    names: Mutex<HashMap<FastStr, watch::Receiver<Option<Instances>>>>,
    changes: async_broadcast::Sender<Change<FastStr>>,
    /// Keeps the change channel open while no load balancer listens.
    _open: async_broadcast::InactiveReceiver<Change<FastStr>>,
}

impl<R: Resolver> VoloDiscover<R> {
    pub fn new(resolver: R) -> VoloDiscover<R> {
        let (mut changes, rx) = async_broadcast::broadcast(64);
        changes.set_overflow(true);
        VoloDiscover {
            inner: Arc::new(Inner {
                resolver,
                names: Mutex::new(HashMap::new()),
                changes,
                _open: rx.deactivate(),
            }),
        }
    }

    /// The latest endpoints of `name`, following it from now on if it was not already.
    fn follow(&self, name: &FastStr) -> watch::Receiver<Option<Instances>> {
        let mut names = self.inner.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = names.get(name) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        names.insert(name.clone(), rx.clone());
        let stream = self.inner.resolver.resolve(name);
        let inner: Weak<Inner<R>> = Arc::downgrade(&self.inner);
        let key = name.clone();
        tokio::spawn(async move {
            let mut stream = Box::pin(stream);
            let mut prev: Instances = Vec::new();
            while let Some(item) = stream.next().await {
                let Some(inner) = inner.upgrade() else { return };
                match item {
                    Ok(endpoints) => {
                        let next = instances(endpoints);
                        tx.send_replace(Some(next.clone()));
                        let (change, changed) = diff_address(key.clone(), prev, next.clone());
                        if changed {
                            let _ = inner.changes.try_broadcast(change);
                        }
                        prev = next;
                    }
                    // The last endpoints stand until the registry answers again.
                    Err(e) => tracing::warn!(service = %key, error = %e, "resolving failed"),
                }
            }
        });
        rx
    }
}

fn instances(endpoints: Vec<Endpoint>) -> Instances {
    endpoints
        .into_iter()
        .map(|e| {
            Arc::new(Instance {
                address: Address::Ip(e.address),
                weight: e.weight.max(1),
                tags: e
                    .tags
                    .into_iter()
                    .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v)))
                    .collect(),
            })
        })
        .collect()
}

impl<R: Resolver> Discover for VoloDiscover<R> {
    type Key = FastStr;
    type Error = LoadBalanceError;

    async fn discover<'s>(&'s self, endpoint: &'s VoloEndpoint) -> Result<Instances, Self::Error> {
        let name = endpoint.service_name.clone();
        let mut rx = self.follow(&name);
        let first = tokio::time::timeout(FIRST_ANSWER, rx.wait_for(Option::is_some)).await;
        match first {
            Ok(Ok(v)) => Ok(v.clone().unwrap_or_default()),
            _ => Err(LoadBalanceError::Discover(
                format!("service {name}: no answer from the registry within {FIRST_ANSWER:?}")
                    .into(),
            )),
        }
    }

    fn key(&self, endpoint: &VoloEndpoint) -> FastStr {
        endpoint.service_name.clone()
    }

    fn watch(
        &self,
        _keys: Option<&[FastStr]>,
    ) -> Option<async_broadcast::Receiver<Change<FastStr>>> {
        Some(self.inner.changes.new_receiver())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{embedded::Embedded, Registration, Registry};

    #[tokio::test]
    async fn discover_answers_and_changes_are_broadcast() {
        let registry = Embedded::default();
        let r = |port: u16| Registration::local("echo", port);
        registry
            .register(&r(1), Duration::from_secs(1))
            .await
            .unwrap();
        let d = VoloDiscover::new(registry.clone());
        let mut changes = d.watch(None).unwrap();
        let endpoint = VoloEndpoint::new("echo".into());
        let got = d.discover(&endpoint).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].address, Address::Ip("127.0.0.1:1".parse().unwrap()));
        assert_eq!(got[0].weight, 10);
        registry
            .register(&r(2), Duration::from_secs(1))
            .await
            .unwrap();
        let change = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let c = changes.recv().await.unwrap();
                if c.all.len() == 2 {
                    return c;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(change.key, "echo");
        assert_eq!(change.added.len(), 1);
        assert_eq!(d.discover(&endpoint).await.unwrap().len(), 2);
    }
}
