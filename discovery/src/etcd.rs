//! etcd (v3 API through `etcd-client`), in the layout of Kitex's registry-etcd: key
//! `{prefix}/{name}/{host}:{port}`, value `{"network","address","weight","tags"}`, attached to a
//! lease that renewals keep alive. A lease that ran out, or a key that vanished, is reported
//! lost, so the registrar puts it again.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions, WatchStream};
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use crate::{Endpoint, Error, Registration, Registry, Resolver};

const NAME: &str = "etcd";

/// An etcd cluster.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
    /// Each registration's lease, by key.
    leases: Arc<Mutex<HashMap<String, i64>>>,
}

/// The value stored for one endpoint.
#[derive(Serialize, Deserialize)]
struct Value {
    network: String,
    address: String,
    weight: u32,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

fn unreachable(e: etcd_client::Error) -> Error {
    Error::Unreachable {
        registry: NAME,
        detail: e.to_string(),
    }
}

impl Etcd {
    /// A client of the cluster at `endpoints` (`http://host:port`); nothing is sent yet.
    pub async fn new(endpoints: &[String], prefix: &str) -> Result<Etcd, String> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| format!("etcd at {endpoints:?}: {e}"))?;
        Ok(Etcd {
            client,
            prefix: prefix.trim_end_matches('/').to_owned(),
            leases: Arc::default(),
        })
    }

    /// `{prefix}/{name}/{host}:{port}`.
    pub fn key(&self, r: &Registration) -> String {
        format!("{}/{}/{}", self.prefix, r.name, r.address)
    }

    /// The stored value for `r`.
    pub fn value(r: &Registration) -> String {
        serde_json::json!({
            "network": "tcp",
            "address": r.address.to_string(),
            "weight": r.weight,
            "tags": r.tags(),
        })
        .to_string()
    }

    fn lease(&self, key: &str) -> Option<i64> {
        self.leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }
}

impl Registry for Etcd {
    async fn register(&self, r: &Registration, ttl: Duration) -> Result<(), Error> {
        let mut c = self.client.clone();
        let key = self.key(r);
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = c.lease_grant(ttl, None).await.map_err(unreachable)?.id();
        c.put(
            key.as_str(),
            Self::value(r),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(unreachable)?;
        let old = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, lease);
        if let Some(old) = old.filter(|o| *o != lease) {
            let _ = c.lease_revoke(old).await;
        }
        Ok(())
    }

    async fn renew(&self, r: &Registration) -> Result<(), Error> {
        let key = self.key(r);
        let lost = |detail: &str| Error::Lost {
            registry: NAME,
            detail: format!("{key}: {detail}"),
        };
        let Some(lease) = self.lease(&key) else {
            return Err(lost("never registered"));
        };
        let mut c = self.client.clone();
        let (mut keeper, mut answers) = c.lease_keep_alive(lease).await.map_err(unreachable)?;
        keeper.keep_alive().await.map_err(unreachable)?;
        match answers.message().await.map_err(unreachable)? {
            Some(a) if a.ttl() > 0 => {}
            _ => return Err(lost("the lease ran out")),
        }
        let got = c.get(key.as_str(), None).await.map_err(unreachable)?;
        if got.kvs().is_empty() {
            return Err(lost("the key was removed"));
        }
        Ok(())
    }

    async fn deregister(&self, r: &Registration) -> Result<(), Error> {
        let key = self.key(r);
        let mut c = self.client.clone();
        c.delete(key.as_str(), None).await.map_err(unreachable)?;
        let lease = self
            .leases
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        if let Some(lease) = lease {
            let _ = c.lease_revoke(lease).await;
        }
        Ok(())
    }
}

/// Endpoints from the values under a name's prefix (values that do not parse are skipped).
fn endpoints<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = values
        .filter_map(|v| {
            let v: Value = serde_json::from_slice(v).ok()?;
            Some(Endpoint {
                address: v.address.parse::<SocketAddr>().ok()?,
                weight: v.weight,
                tags: v.tags,
            })
        })
        .collect();
    out.sort_by_key(|e| e.address);
    out
}

/// Where a resolution stands: watching from a revision, or to (re)start.
enum Follow {
    Start { after_error: bool },
    Watching(Box<WatchStream>),
}

impl Resolver for Etcd {
    /// The name's keys read in full, then again after each change the prefix watch reports.
    fn resolve(
        &self,
        name: &str,
    ) -> impl Stream<Item = Result<Vec<Endpoint>, Error>> + Send + 'static {
        let client = self.client.clone();
        let prefix = format!("{}/{}/", self.prefix, name);
        let start = Follow::Start { after_error: false };
        futures_util::stream::unfold(start, move |state| {
            let (mut c, prefix) = (client.clone(), prefix.clone());
            async move {
                let mut state = state;
                loop {
                    state = match state {
                        Follow::Start { after_error } => {
                            if after_error {
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                            let got = match c
                                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                                .await
                            {
                                Ok(got) => got,
                                Err(e) => {
                                    let next = Follow::Start { after_error: true };
                                    return Some((Err(unreachable(e)), next));
                                }
                            };
                            let list = endpoints(got.kvs().iter().map(|kv| kv.value()));
                            let revision = got.header().map_or(0, |h| h.revision());
                            let options = WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(revision + 1);
                            let next = match c.watch(prefix.as_str(), Some(options)).await {
                                Ok(stream) => Follow::Watching(Box::new(stream)),
                                Err(_) => Follow::Start { after_error: true },
                            };
                            return Some((Ok(list), next));
                        }
                        Follow::Watching(mut stream) => match stream.message().await {
                            Ok(Some(answer)) if !answer.canceled() => {
                                if answer.events().is_empty() {
                                    Follow::Watching(stream)
                                } else {
                                    // Read the whole list again: simpler than applying events,
                                    // and as fresh.
                                    Follow::Start { after_error: false }
                                }
                            }
                            _ => Follow::Start { after_error: true },
                        },
                    };
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_kitex_registry_etcd_instances() {
        let r = Registration {
            name: "echo".into(),
            address: "127.0.0.1:8888".parse().unwrap(),
            protocol: "grpc".into(),
            idl_service: Some("echo.Echo".into()),
            methods: vec!["UnaryEcho".into()],
            weight: 10,
        };
        let v: serde_json::Value = serde_json::from_str(&Etcd::value(&r)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "network": "tcp",
                "address": "127.0.0.1:8888",
                "weight": 10,
                "tags": {"protocol": "grpc", "idl_service": "echo.Echo", "methods": "UnaryEcho"},
            })
        );
        let back = endpoints([Etcd::value(&r).as_bytes(), b"junk".as_slice()].into_iter());
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].address, r.address);
        assert_eq!(
            back[0].tags.get("protocol").map(String::as_str),
            Some("grpc")
        );
    }
}
