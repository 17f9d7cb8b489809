//! The `none` backend: registrations kept in the process itself, nothing external needed. A
//! sidecar with it registers nowhere callers outside can see; resolving through the same value
//! (in-process callers, tests) sees what was registered.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::Stream;
use tokio::sync::watch;

use crate::{Endpoint, Error, Registration, Registry, Resolver, Service};

type Table = BTreeMap<String, BTreeMap<String, Endpoint>>;

/// An in-process registry; clones share it.
#[derive(Clone)]
pub struct Embedded {
    table: Arc<Mutex<Table>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for Embedded {
    fn default() -> Self {
        Embedded {
            table: Arc::default(),
            changed: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl Embedded {
    fn edit(&self, f: impl FnOnce(&mut Table)) {
        f(&mut self.table.lock().unwrap_or_else(|p| p.into_inner()));
        self.changed.send_modify(|n| *n += 1);
    }

    fn endpoints(&self, name: &str) -> Vec<Endpoint> {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table
            .get(name)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

impl Registry for Embedded {
    async fn register(&self, r: &Registration, _ttl: Duration) -> Result<(), Error> {
        let endpoint = Endpoint {
            address: r.address,
            weight: r.weight,
            tags: r.tags(),
        };
        self.edit(|t| {
            t.entry(r.name.clone())
                .or_default()
                .insert(r.id(), endpoint);
        });
        Ok(())
    }

    async fn renew(&self, r: &Registration) -> Result<(), Error> {
        let held = self
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&r.name)
            .is_some_and(|m| m.contains_key(&r.id()));
        match held {
            true => Ok(()),
            false => Err(Error::Lost {
                registry: "embedded",
                detail: r.id(),
            }),
        }
    }

    async fn deregister(&self, r: &Registration) -> Result<(), Error> {
        self.edit(|t| {
            if let Some(m) = t.get_mut(&r.name) {
                m.remove(&r.id());
            }
        });
        Ok(())
    }
}

impl Embedded {
    /// `read` of the table now, then again each time what it reads changes.
    fn follow<T: PartialEq + Clone + Send + 'static>(
        &self,
        read: impl Fn(&Embedded) -> T + Send + Sync + 'static,
    ) -> impl Stream<Item = Result<T, Error>> + Send + 'static {
        let this = self.clone();
        let read = Arc::new(read);
        let rx = self.changed.subscribe();
        futures_util::stream::unfold((rx, None), move |(mut rx, last)| {
            let (this, read) = (this.clone(), read.clone());
            async move {
                loop {
                    let now = read(&this);
                    if last.as_ref() != Some(&now) {
                        return Some((Ok(now.clone()), (rx, Some(now))));
                    }
                    rx.changed().await.ok()?;
                }
            }
        })
    }
}

impl Resolver for Embedded {
    fn resolve(
        &self,
        name: &str,
    ) -> impl Stream<Item = Result<Vec<Endpoint>, Error>> + Send + 'static {
        let name = name.to_owned();
        self.follow(move |e| e.endpoints(&name))
    }

    fn services(&self) -> impl Stream<Item = Result<Vec<Service>, Error>> + Send + 'static {
        self.follow(|e| {
            let table = e.table.lock().unwrap_or_else(|p| p.into_inner());
            crate::services(
                table
                    .iter()
                    .filter(|(_, m)| !m.is_empty())
                    .map(|(name, m)| {
                        let idl = m.values().find_map(|e| e.tags.get("idl_service").cloned());
                        (name.clone(), idl)
                    }),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn registrations_resolve_and_follow_changes() {
        let e = Embedded::default();
        let r = |port: u16| Registration::local("echo", port);
        let mut s = Box::pin(e.resolve("echo"));
        assert_eq!(s.next().await.unwrap().unwrap(), vec![]);
        e.register(&r(1), Duration::from_secs(1)).await.unwrap();
        e.register(&r(2), Duration::from_secs(1)).await.unwrap();
        let got = s.next().await.unwrap().unwrap();
        assert!(!got.is_empty());
        e.renew(&r(1)).await.unwrap();
        e.deregister(&r(1)).await.unwrap();
        assert!(matches!(e.renew(&r(1)).await, Err(Error::Lost { .. })));
        let mut last = got;
        while last.len() != 1 {
            last = s.next().await.unwrap().unwrap();
        }
        assert_eq!(last[0].address.port(), 2);
        assert_eq!(
            last[0].tags.get("protocol").map(String::as_str),
            Some("thrift")
        );
    }
}
