//! The services egress calls reach through the registry: `[[service]]` entries and any service
//! the registry lists. Each becomes a [`Function`] whose pool holds the registry's endpoints
//! for it (followed while the sidecar runs), balanced by power of two choices, with the same
//! policy machinery as a function's calls.

use std::{collections::HashMap, sync::Arc, time::Duration};

use fnmesh_discovery::{Backend, Resolver};
use futures_util::StreamExt;

use super::Function;
use crate::{
    config::{discovered_service, FunctionConfig, Protocol},
    instances::{watchdog::Watchdog, Pool},
    lock,
};

/// The TTHeader string key (and HTTP/2 header) a call forwarded by another fnmesh node carries:
/// such a call is served here or refused (`not-warm`), never forwarded again.
pub const HOP: &str = "fnmesh-hop";

/// How many peers a call that finds no room here may try before this node serves it itself.
pub const PEER_TRIES: u32 = 3;

/// How long a peer that had no ready instance with room is not asked again.
pub const PEER_COOL: Duration = Duration::from_millis(500);

/// The most services without a `[[service]]` entry egress calls may reach; past it, a name not
/// yet reached is `no-route`.
const MAX_REACHED: usize = 4096;

/// The registry's services and the ones egress calls have reached.
pub struct Services {
    backend: Backend,
    /// Where resolutions run and remote functions' tasks live.
    control: tokio::runtime::Handle,
    watchdog: Arc<Watchdog>,
    grace: Duration,
    workers: usize,
    /// `[[service]]` entries; a reload replaces them.
    configured: arc_swap::ArcSwap<Vec<Arc<FunctionConfig>>>,
    /// The registry's services by name, with their IDL service; `None` until it first answers.
    catalog: arc_swap::ArcSwapOption<HashMap<String, Option<String>>>,
    /// Services egress calls have reached, by name: read on every call, written on the first.
    reached: arc_swap::ArcSwap<HashMap<String, Arc<Function>>>,
    /// Serializes additions to `reached`.
    adding: std::sync::Mutex<()>,
}

impl Services {
    /// Follows `backend`'s catalog; call it inside the control runtime.
    pub fn start(
        backend: Backend,
        configured: &[FunctionConfig],
        watchdog: Arc<Watchdog>,
        grace: Duration,
        workers: usize,
    ) -> Arc<Services> {
        let services = Arc::new(Services {
            backend,
            control: tokio::runtime::Handle::current(),
            watchdog,
            grace,
            workers,
            configured: arc_swap::ArcSwap::from_pointee(
                configured.iter().cloned().map(Arc::new).collect(),
            ),
            catalog: arc_swap::ArcSwapOption::empty(),
            reached: arc_swap::ArcSwap::default(),
            adding: std::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&services);
        let listed = services.backend.services();
        services.control.spawn(async move {
            let mut listed = std::pin::pin!(listed);
            while let Some(answer) = listed.next().await {
                let Some(services) = weak.upgrade() else {
                    return;
                };
                match answer {
                    Ok(list) => services.catalog.store(Some(Arc::new(
                        list.into_iter().map(|s| (s.name, s.idl_service)).collect(),
                    ))),
                    Err(e) => tracing::warn!(error = %e, "cannot read the registry's services"),
                }
            }
        });
        services
    }

    /// The service registered as `name` (a `[[service]]` entry or a name the registry lists;
    /// any name before the registry first answered), reached over `protocol`.
    pub fn by_name(&self, name: &str, protocol: Protocol) -> Option<Arc<Function>> {
        if let Some(f) = self.reached.load().get(name) {
            return Some(f.clone());
        }
        let configured = self
            .configured
            .load()
            .iter()
            .find(|c| c.name == name)
            .cloned();
        let listed = match &*self.catalog.load() {
            Some(catalog) => catalog.contains_key(name),
            None => true,
        };
        match configured {
            Some(config) => Some(self.reach(config)),
            // Bounded: names a function makes up must not grow the sidecar without end.
            None if listed && self.reached.load().len() < MAX_REACHED => {
                Some(self.reach(Arc::new(discovered_service(name, protocol))))
            }
            None => None,
        }
    }

    /// The service whose IDL service is `service`: a `[[service]]` entry's, else one the
    /// registry's registrations name (tag `idl_service`).
    pub fn by_idl_service(&self, service: &str, protocol: Protocol) -> Option<Arc<Function>> {
        let configured = self.configured.load();
        if let Some(c) = configured
            .iter()
            .find(|c| c.service.as_deref() == Some(service))
        {
            return self.by_name(&c.name, protocol);
        }
        let catalog = self.catalog.load();
        let name = catalog
            .as_ref()?
            .iter()
            .find(|(_, idl)| idl.as_deref() == Some(service))
            .map(|(name, _)| name.clone())?;
        self.by_name(&name, protocol)
    }

    /// The function for `config`'s service, made (and its endpoints followed) on first use.
    #[cold]
    fn reach(&self, config: Arc<FunctionConfig>) -> Arc<Function> {
        let _adding = lock(&self.adding);
        if let Some(f) = self.reached.load().get(&config.name) {
            return f.clone();
        }
        let _control = self.control.enter();
        let pool = Pool::new(
            config.clone(),
            self.grace,
            self.watchdog.clone(),
            self.workers,
        );
        let function = Function::new(config.clone(), pool.clone());
        self.follow(&config.name, Arc::downgrade(&pool));
        let mut next = HashMap::clone(&self.reached.load());
        next.insert(config.name.clone(), function.clone());
        self.reached.store(Arc::new(next));
        tracing::info!(service = %config.name, "egress reaches a service in the registry");
        function
    }

    /// Keeps `pool`'s endpoints as the registry lists `name`'s passing ones.
    fn follow(&self, name: &str, pool: std::sync::Weak<Pool>) {
        follow(&self.backend, &self.control, name, pool, None);
    }

    /// Applies a reload's `[[service]]` entries: services already reached take their new
    /// policy (or the defaults, when their entry went).
    pub fn reconfigure(&self, configured: &[FunctionConfig]) {
        let configured: Vec<Arc<FunctionConfig>> =
            configured.iter().cloned().map(Arc::new).collect();
        for (name, function) in self.reached.load().iter() {
            let next = match configured.iter().find(|c| &c.name == name) {
                Some(c) => c.clone(),
                None => Arc::new(discovered_service(name, function.config().protocol)),
            };
            if *next != *function.config() {
                function.reconfigure(next);
            }
        }
        self.configured.store(Arc::new(configured));
    }

    /// The services egress has reached, for the admin API.
    pub fn reached(&self) -> Vec<Arc<Function>> {
        let mut out: Vec<_> = self.reached.load().values().cloned().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// Keeps `pool`'s endpoints as the registry lists `name`'s passing ones (without `skip`: this
/// node's own address, for its peers), on `control`, while the pool lives.
pub fn follow(
    backend: &Backend,
    control: &tokio::runtime::Handle,
    name: &str,
    pool: std::sync::Weak<Pool>,
    skip: Option<std::net::SocketAddr>,
) {
    let answers = backend.resolve(name);
    let name = name.to_owned();
    control.spawn(async move {
        let mut answers = std::pin::pin!(answers);
        while let Some(answer) = answers.next().await {
            let Some(pool) = pool.upgrade() else {
                return;
            };
            match answer {
                Ok(endpoints) => {
                    let list: Vec<_> = endpoints
                        .iter()
                        .filter(|e| Some(e.address) != skip)
                        .map(|e| (e.address, e.weight))
                        .collect();
                    tracing::debug!(service = %name, endpoints = list.len(), "endpoints");
                    pool.set_endpoints(&list);
                }
                Err(e) => {
                    // The last endpoints stay in use while the registry is away.
                    tracing::warn!(service = %name, error = %e, "cannot resolve");
                    pool.unresolved(&e.to_string());
                }
            }
        }
    });
}
