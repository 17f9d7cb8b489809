//! Service discovery for fnmesh: each function registered as an ordinary RPC service in Consul or
//! etcd (formats of docs/design.md, readable by CloudWeGo's registries), kept alive while the sidecar
//! runs, and resolved back into endpoints, also as a `volo::discovery::Discover` so a Volo client
//! can call a function by name.
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, future::Future, net::SocketAddr, time::Duration};

use futures_util::{stream::BoxStream, Stream, StreamExt};

pub mod consul;
pub mod embedded;
pub mod etcd;
mod http;
mod registrar;
mod volo_discover;

pub use http::Tls;
pub use registrar::{Health, Registrar};
pub use volo_discover::VoloDiscover;

/// What one function's registration says: the service name callers resolve, the sidecar's
/// address, and what the function speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The service name (the function's `name`).
    pub name: String,
    /// Where callers reach it (the sidecar's `advertise` address).
    pub address: SocketAddr,
    /// `thrift` or `grpc`.
    pub protocol: String,
    /// The IDL service (Thrift `isn` / gRPC `package.Service`), when known.
    pub idl_service: Option<String>,
    /// The IDL's methods, when known.
    pub methods: Vec<String>,
    pub weight: u32,
}

impl Registration {
    /// A plain Thrift registration of `name` at 127.0.0.1:`port`, for tests.
    #[cfg(test)]
    pub(crate) fn local(name: &str, port: u16) -> Registration {
        Registration {
            name: name.into(),
            address: ([127, 0, 0, 1], port).into(),
            protocol: "thrift".into(),
            idl_service: None,
            methods: vec![],
            weight: DEFAULT_WEIGHT,
        }
    }
}

/// The weight a registration carries: Kitex's default.
pub const DEFAULT_WEIGHT: u32 = 10;

impl Registration {
    /// `{name}:{host}:{port}`: the Consul service ID, unique per sidecar and function.
    pub fn id(&self) -> String {
        format!(
            "{}:{}:{}",
            self.name,
            self.address.ip(),
            self.address.port()
        )
    }

    /// Tags as `k: v` pairs: `protocol`, and `idl_service` and `methods` when known.
    pub fn tags(&self) -> BTreeMap<String, String> {
        let mut tags = BTreeMap::new();
        tags.insert("protocol".to_owned(), self.protocol.clone());
        if let Some(s) = &self.idl_service {
            tags.insert("idl_service".to_owned(), s.clone());
        }
        if !self.methods.is_empty() {
            tags.insert("methods".to_owned(), self.methods.join(","));
        }
        tags
    }
}

/// One endpoint of a service, as resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry could not be reached (or did not answer in time).
    #[error("{registry} unreachable: {detail}")]
    Unreachable {
        registry: &'static str,
        detail: String,
    },
    /// The registry answered, but refused or did not understand the request.
    #[error("{registry} refused the request: {detail}")]
    Refused {
        registry: &'static str,
        detail: String,
    },
    /// The registry no longer holds the registration (it restarted, or the lease or TTL ran
    /// out): it must be registered again.
    #[error("{registry} no longer holds the registration: {detail}")]
    Lost {
        registry: &'static str,
        detail: String,
    },
}

/// Registers a sidecar's functions and keeps them registered.
pub trait Registry: Send + Sync + 'static {
    /// Registers `r` (replacing an earlier registration of the same ID), with time-to-live
    /// `ttl`: it disappears unless renewed.
    fn register(
        &self,
        r: &Registration,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), Error>> + Send;
    /// Renews `r`; [`Error::Lost`] when the registry no longer holds it.
    fn renew(&self, r: &Registration) -> impl Future<Output = Result<(), Error>> + Send;
    /// Removes `r`.
    fn deregister(&self, r: &Registration) -> impl Future<Output = Result<(), Error>> + Send;
}

/// A service the registry lists: its name, and the IDL service its registrations name (tag
/// `idl_service`, which fnmesh sets), when one does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Service {
    pub name: String,
    pub idl_service: Option<String>,
}

/// Resolves a service name into its endpoints, and follows them.
pub trait Resolver: Send + Sync + 'static {
    /// The endpoints of `name` now, then again after each change; an error while the registry
    /// cannot be reached (the stream goes on, and yields endpoints again once it can).
    fn resolve(
        &self,
        name: &str,
    ) -> impl Stream<Item = Result<Vec<Endpoint>, Error>> + Send + 'static;

    /// Every service the registry lists, sorted, now and again after each change (errors as
    /// for [`Resolver::resolve`]).
    fn services(&self) -> impl Stream<Item = Result<Vec<Service>, Error>> + Send + 'static;
}

/// Services from `(name, idl_service)` pairs, one per name (the first IDL service seen wins),
/// sorted.
pub(crate) fn services(pairs: impl Iterator<Item = (String, Option<String>)>) -> Vec<Service> {
    let mut by_name: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (name, idl) in pairs {
        let slot = by_name.entry(name).or_default();
        if slot.is_none() {
            *slot = idl;
        }
    }
    by_name
        .into_iter()
        .map(|(name, idl_service)| Service { name, idl_service })
        .collect()
}

/// A registry chosen when the sidecar starts (`[discovery] backend`).
#[derive(Clone)]
pub enum Backend {
    Embedded(embedded::Embedded),
    Consul(consul::Consul),
    Etcd(Box<etcd::Etcd>),
}

impl Backend {
    /// The backend's name, for logs and `/readyz`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Embedded(_) => "none",
            Backend::Consul(_) => "consul",
            Backend::Etcd(_) => "etcd",
        }
    }
}

impl Registry for Backend {
    async fn register(&self, r: &Registration, ttl: Duration) -> Result<(), Error> {
        match self {
            Backend::Embedded(b) => b.register(r, ttl).await,
            Backend::Consul(b) => b.register(r, ttl).await,
            Backend::Etcd(b) => b.register(r, ttl).await,
        }
    }

    async fn renew(&self, r: &Registration) -> Result<(), Error> {
        match self {
            Backend::Embedded(b) => b.renew(r).await,
            Backend::Consul(b) => b.renew(r).await,
            Backend::Etcd(b) => b.renew(r).await,
        }
    }

    async fn deregister(&self, r: &Registration) -> Result<(), Error> {
        match self {
            Backend::Embedded(b) => b.deregister(r).await,
            Backend::Consul(b) => b.deregister(r).await,
            Backend::Etcd(b) => b.deregister(r).await,
        }
    }
}

impl Resolver for Backend {
    fn resolve(
        &self,
        name: &str,
    ) -> impl Stream<Item = Result<Vec<Endpoint>, Error>> + Send + 'static {
        let s: BoxStream<'static, _> = match self {
            Backend::Embedded(b) => b.resolve(name).boxed(),
            Backend::Consul(b) => b.resolve(name).boxed(),
            Backend::Etcd(b) => b.resolve(name).boxed(),
        };
        s
    }

    fn services(&self) -> impl Stream<Item = Result<Vec<Service>, Error>> + Send + 'static {
        let s: BoxStream<'static, _> = match self {
            Backend::Embedded(b) => b.services().boxed(),
            Backend::Consul(b) => b.services().boxed(),
            Backend::Etcd(b) => b.services().boxed(),
        };
        s
    }
}
