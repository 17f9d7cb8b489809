//! The functions a running sidecar serves, and live reloads of its policy file (SIGHUP,
//! `POST /admin/reload`, `fnmesh reload`). A valid new file applies to calls that arrive after
//! it; connections and calls in flight are untouched. An invalid one is refused, logged, and the
//! old policy stays.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use fnmesh_discovery::{Backend, Health, Registrar, Registration};
use tokio::time::{sleep, Instant};

use crate::{
    config::{Config, FunctionConfig, Protocol, SidecarConfig},
    drain::Drain,
    governance::{Function, Route, Services},
    grpc::GrpcFront,
    instances::{watchdog::Watchdog, Pool},
    lock,
    thrift::ThriftFront,
};

/// How long a retired pool waits before it checks for calls still on it.
const RETIRE_SETTLE: Duration = Duration::from_millis(100);

pub struct Mesh {
    /// The file `fnmesh run` was started with: a reload reads it again.
    path: PathBuf,
    /// What is in force; also serializes reloads.
    state: Mutex<InForce>,
    pub thrift: Arc<ThriftFront>,
    pub grpc: Arc<GrpcFront>,
    /// The sidecar's drain: started by the server, waited on by it, heard by every front end.
    pub drain: Drain,
    watchdog: Arc<Watchdog>,
    /// Keeps the functions registered in `[discovery]`'s registry (once started), and which
    /// registry that is.
    registrar: Mutex<Option<(&'static str, Registrar)>>,
    /// The egress listener's front ends, with `[sidecar] egress`.
    pub egress: Option<Egress>,
    /// The registry other nodes are found in (not `none`): functions get their peers there.
    backend: Option<Backend>,
}

/// What the egress listener serves: this sidecar's functions, then the registry's services.
pub struct Egress {
    pub thrift: Arc<ThriftFront>,
    pub grpc: Arc<GrpcFront>,
    pub services: Arc<Services>,
}

struct InForce {
    config: Config,
    /// The functions, in the file's order.
    functions: Vec<Arc<Function>>,
    /// Pools of functions a reload removed or replaced, until their instances are gone.
    retired: Vec<Arc<Pool>>,
    draining: bool,
}

/// What a reload did, function by function.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    /// Same command, environment and protocol: the new policy and scale apply to new calls,
    /// instances keep running.
    pub updated: Vec<String>,
    /// A new command, environment or protocol: new instances serve new calls, the old ones drain.
    pub restarted: Vec<String>,
    pub removed: Vec<String>,
    /// `[sidecar]` keys that changed but only apply at the next start.
    pub need_restart: Vec<&'static str>,
}

impl std::fmt::Display for Changes {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (what, names) in [
            ("added", &self.added),
            ("updated", &self.updated),
            ("restarted", &self.restarted),
            ("removed", &self.removed),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what}: {}", names.join(", ")));
            }
        }
        if parts.is_empty() {
            parts.push("no function changed".into());
        }
        if !self.need_restart.is_empty() {
            let keys: Vec<String> = self
                .need_restart
                .iter()
                .map(|k| match *k {
                    "discovery" => "[discovery]".to_owned(),
                    k => format!("sidecar.{k}"),
                })
                .collect();
            parts.push(format!("not applied until restart: {}", keys.join(", ")));
        }
        write!(out, "{}", parts.join("; "))
    }
}

/// Whether instances started for `a` can serve `b` (otherwise new ones must be started).
fn same_instances(a: &FunctionConfig, b: &FunctionConfig) -> bool {
    a.command == b.command
        && a.env == b.env
        && a.protocol == b.protocol
        && a.transport == b.transport
}

/// The `[sidecar]` keys that differ; none of them applies to a running sidecar.
fn sidecar_changes(a: &SidecarConfig, b: &SidecarConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |changed: bool, key| {
        if changed {
            out.push(key);
        }
    };
    check(a.listen != b.listen, "listen");
    check(a.admin != b.admin, "admin");
    check(a.advertise != b.advertise, "advertise");
    check(a.egress != b.egress, "egress");
    check(a.drain_timeout != b.drain_timeout, "drain_timeout");
    check(a.max_frame_size != b.max_frame_size, "max_frame_size");
    check(a.workers != b.workers, "workers");
    check(a.busy_poll != b.busy_poll, "busy_poll");
    check(a.connections.max != b.connections.max, "max_connections");
    check(
        a.connections.header_timeout != b.connections.header_timeout,
        "header_timeout",
    );
    check(
        a.connections.idle_timeout != b.connections.idle_timeout,
        "idle_timeout",
    );
    check(
        a.connections.buffer != b.connections.buffer,
        "connection_buffer",
    );
    out
}

impl Mesh {
    /// `config`'s functions and the routing tables; call it inside the control runtime
    /// (instances are started and watched there).
    pub fn new(
        path: PathBuf,
        config: Config,
        thrift_limits: fnmesh_codec::Limits,
        watchdog: Arc<Watchdog>,
    ) -> Mesh {
        let functions: Vec<Arc<Function>> = config
            .functions
            .iter()
            .map(|f| new_function(&config, f.clone(), &watchdog))
            .collect();
        let (thrift_routes, grpc_routes) = routes(&functions);
        let drain = Drain::default();
        let thrift = Arc::new(ThriftFront {
            functions: arc_swap::ArcSwap::from_pointee(thrift_routes),
            limits: thrift_limits,
            connections: config.sidecar.connections,
            drain: drain.clone(),
            services: None,
        });
        let grpc = Arc::new(GrpcFront::new(
            grpc_routes,
            drain.clone(),
            config.sidecar.connections,
        ));
        Mesh {
            path,
            state: Mutex::new(InForce {
                config,
                functions,
                retired: Vec::new(),
                draining: false,
            }),
            thrift,
            grpc,
            drain,
            watchdog,
            registrar: Mutex::new(None),
            egress: None,
            backend: None,
        }
    }

    /// Finds every function's peers (the other nodes serving it) in `backend`, unless it is
    /// `none`, and adds the egress front ends (with `[sidecar] egress`); call it inside the
    /// control runtime.
    pub fn with_registry(mut self, backend: &Backend) -> Mesh {
        if !matches!(backend, Backend::Embedded(_)) {
            self.backend = Some(backend.clone());
            let st = lock(&self.state);
            for function in &st.functions {
                self.attach_peers(&st.config, function);
            }
        }
        self.with_egress(backend)
    }

    /// Follows the other nodes that register `function`'s name (every address but this
    /// node's `advertise`) in a pool of remote endpoints: its peers.
    fn attach_peers(&self, config: &Config, function: &Arc<Function>) {
        let Some(backend) = &self.backend else {
            return;
        };
        let f = function.config();
        let peers = Pool::new(
            Arc::new(crate::config::discovered_service(&f.name, f.protocol)),
            config.sidecar.drain_timeout,
            self.watchdog.clone(),
            config.sidecar.workers,
        );
        let own = Some(config.sidecar.advertise);
        let control = tokio::runtime::Handle::current();
        crate::governance::services::follow(
            backend,
            &control,
            &f.name,
            Arc::downgrade(&peers),
            own,
        );
        let _ = function.peers.set(peers);
    }

    /// Adds the egress front ends (with `[sidecar] egress`), resolving services in `backend`;
    /// call it inside the control runtime.
    fn with_egress(mut self, backend: &Backend) -> Mesh {
        let st = lock(&self.state);
        let config = &st.config;
        if config.sidecar.egress.is_none() {
            drop(st);
            return self;
        }
        let services = Services::start(
            backend.clone(),
            &config.services,
            self.watchdog.clone(),
            config.sidecar.drain_timeout,
            config.sidecar.workers,
        );
        let (thrift_routes, grpc_routes) = routes(&st.functions);
        let thrift = Arc::new(ThriftFront {
            functions: arc_swap::ArcSwap::from_pointee(thrift_routes),
            limits: self.thrift.limits,
            connections: config.sidecar.connections,
            drain: self.drain.clone(),
            services: Some(services.clone()),
        });
        let mut grpc = GrpcFront::new(grpc_routes, self.drain.clone(), config.sidecar.connections);
        grpc.services = Some(services.clone());
        drop(st);
        self.egress = Some(Egress {
            thrift,
            grpc: Arc::new(grpc),
            services,
        });
        self
    }

    /// What the registry should hold: every function, at the advertised address.
    fn registrations(
        functions: &[Arc<Function>],
        advertise: std::net::SocketAddr,
    ) -> Vec<Registration> {
        functions
            .iter()
            .map(|function| {
                let f = function.config();
                Registration {
                    name: f.name.clone(),
                    address: advertise,
                    protocol: match f.protocol {
                        Protocol::Thrift => "thrift",
                        Protocol::Grpc => "grpc",
                    }
                    .to_owned(),
                    idl_service: f.service.clone(),
                    methods: f.methods.iter().flatten().map(|m| m.name.clone()).collect(),
                    weight: fnmesh_discovery::DEFAULT_WEIGHT,
                }
            })
            .collect()
    }

    /// Starts keeping every function registered in `backend` (once the listener is up); a
    /// reload updates the registrations.
    pub fn register(&self, backend: Backend) {
        let st = lock(&self.state);
        let wanted = Self::registrations(&st.functions, st.config.sidecar.advertise);
        let name = backend.name();
        let registrar = Registrar::start(backend, st.config.discovery.ttl, wanted);
        *lock(&self.registrar) = Some((name, registrar));
    }

    /// The registry's name and how the registrations stand.
    pub fn registry_health(&self) -> Option<(&'static str, Health)> {
        lock(&self.registrar)
            .as_ref()
            .map(|(name, r)| (*name, r.health()))
    }

    /// Deregisters every function (waiting at most `within`): the first step of a drain.
    pub async fn deregister(&self, within: Duration) {
        let registrar = lock(&self.registrar).take();
        if let Some((_, mut registrar)) = registrar {
            registrar.leave(within).await;
        }
    }

    /// `[async]` as the sidecar started with it (it changes only with a restart).
    pub fn queue_config(&self) -> Option<crate::config::AsyncConfig> {
        lock(&self.state).config.queue.clone()
    }

    /// The functions served now.
    pub fn functions(&self) -> Vec<Arc<Function>> {
        lock(&self.state).functions.clone()
    }

    /// Reads the policy file again and applies it; on an error nothing changes.
    /// The policy file this sidecar serves (and reloads).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn reload(&self) -> Result<Changes, String> {
        let mut st = lock(&self.state);
        if st.draining {
            return Err("the sidecar is draining".into());
        }
        let config = Config::load(&self.path).map_err(|e| e.to_string())?;
        let mut need_restart = sidecar_changes(&st.config.sidecar, &config.sidecar);
        if st.config.discovery != config.discovery {
            need_restart.push("discovery");
        }
        if st.config.telemetry != config.telemetry {
            need_restart.push("telemetry");
        }
        if st.config.queue != config.queue {
            need_restart.push("async");
        }
        let mut changes = Changes {
            need_restart,
            ..Changes::default()
        };
        // Pools keep the settings they were made with for `[sidecar]` keys (grace, workers).
        let base = st.config.clone();
        let mut functions = Vec::with_capacity(config.functions.len());
        let mut old: Vec<Arc<Function>> = std::mem::take(&mut st.functions);
        for f in &config.functions {
            let existing = old
                .iter()
                .position(|p| p.name == f.name)
                .map(|i| old.remove(i));
            let function = match existing {
                Some(function) if same_instances(&function.config(), f) => {
                    if *function.config() != *f {
                        function.reconfigure(Arc::new(f.clone()));
                        changes.updated.push(f.name.clone());
                    }
                    function
                }
                Some(function) => {
                    changes.restarted.push(f.name.clone());
                    self.retire(&mut st, &function.pool, base.sidecar.drain_timeout);
                    let function = new_function(&base, f.clone(), &self.watchdog);
                    self.attach_peers(&base, &function);
                    function
                }
                None => {
                    changes.added.push(f.name.clone());
                    let function = new_function(&base, f.clone(), &self.watchdog);
                    self.attach_peers(&base, &function);
                    function
                }
            };
            functions.push(function);
        }
        for function in old {
            changes.removed.push(function.name.clone());
            self.retire(&mut st, &function.pool, base.sidecar.drain_timeout);
        }
        let (thrift_routes, grpc_routes) = routes(&functions);
        self.thrift.functions.store(Arc::new(thrift_routes));
        self.grpc.functions.store(Arc::new(grpc_routes));
        self.grpc.reloads.send_modify(|n| *n += 1);
        if let Some(egress) = &self.egress {
            let (thrift_routes, grpc_routes) = routes(&functions);
            egress.thrift.functions.store(Arc::new(thrift_routes));
            egress.grpc.functions.store(Arc::new(grpc_routes));
            egress.services.reconfigure(&config.services);
        }
        if let Some((_, registrar)) = lock(&self.registrar).as_ref() {
            registrar.set(Self::registrations(&functions, base.sidecar.advertise));
        }
        st.functions = functions;
        st.retired
            .retain(|p| p.live_processes() > 0 || !p.is_shut_down());
        st.config = Config {
            sidecar: base.sidecar,
            discovery: base.discovery,
            telemetry: base.telemetry,
            functions: config.functions,
            services: config.services,
            queue: base.queue,
        };
        Ok(changes)
    }

    /// Reloads the policy file (SIGHUP, or `POST /admin/reload` from `fnmesh reload`), logging
    /// what changed or why the file was refused.
    pub fn reload_and_log(&self, asked_by: &str) -> Result<String, String> {
        match self.reload() {
            Ok(changes) => {
                tracing::info!(%asked_by, "policy reloaded: {changes}");
                Ok(changes.to_string())
            }
            Err(e) => {
                tracing::error!(%asked_by, "policy reload refused, the old policy stays: {e}");
                Err(e)
            }
        }
    }

    /// A pool no longer routed to: calls already on it finish (and queued ones get their slot)
    /// within `grace`, then its instances stop.
    fn retire(&self, st: &mut InForce, pool: &Arc<Pool>, grace: Duration) {
        st.retired.push(pool.clone());
        let pool = pool.clone();
        tokio::spawn(async move {
            let until = Instant::now() + grace;
            // A call routed just before the tables were swapped may not have taken its slot
            // yet (it would find the pool shut): it gets a moment to.
            sleep(RETIRE_SETTLE.min(grace)).await;
            while Instant::now() < until {
                let s = pool.snapshot();
                if s.in_flight == 0 && s.queued == 0 {
                    break;
                }
                sleep(Duration::from_millis(5)).await;
            }
            tracing::info!(function = %pool.name, "stopping the instances of a function the policy no longer routes to");
            pool.shutdown();
        });
    }

    /// Every pool with instances, serving or retired, for the final drain; no reload after this.
    pub fn close(&self) -> Vec<Arc<Pool>> {
        let mut st = lock(&self.state);
        st.draining = true;
        st.functions
            .iter()
            .map(|f| &f.pool)
            .chain(&st.retired)
            .cloned()
            .collect()
    }
}

fn new_function(config: &Config, f: FunctionConfig, watchdog: &Arc<Watchdog>) -> Arc<Function> {
    let f = Arc::new(f);
    let pool = Pool::new(
        f.clone(),
        config.sidecar.drain_timeout,
        watchdog.clone(),
        config.sidecar.workers,
    );
    Function::new(f, pool)
}

/// The Thrift and the gRPC routing tables.
fn routes(functions: &[Arc<Function>]) -> (Vec<Route>, Vec<Route>) {
    let (mut thrift, mut grpc) = (Vec::new(), Vec::new());
    for function in functions {
        let f = function.config();
        let route = Route {
            function: function.clone(),
            service: f.service.clone(),
        };
        match f.protocol {
            Protocol::Thrift => thrift.push(route),
            Protocol::Grpc => grpc.push(route),
        }
    }
    (thrift, grpc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(name: &str, protocol: &str, command: &str, policy: &str) -> String {
        format!(
            "[[function]]\nname = \"{name}\"\nprotocol = \"{protocol}\"\ncommand = [\"{command}\"]\n\n[function.policy]\n{policy}\n\n"
        )
    }

    fn write(path: &std::path::Path, listen: &str, functions: &[String]) {
        let text = format!("[sidecar]\nlisten = \"{listen}\"\n\n{}", functions.concat());
        std::fs::write(path, text).unwrap();
    }

    /// A mesh serving the file at `path` (instances run nothing: no watchdog).
    fn mesh_at(path: &std::path::Path) -> Mesh {
        let config = Config::load(path).unwrap();
        let limits = fnmesh_codec::Limits::default();
        Mesh::new(path.into(), config, limits, Arc::new(Watchdog::disabled()))
    }

    fn names(routes: &[Route]) -> Vec<&str> {
        routes.iter().map(|r| r.function.name.as_str()).collect()
    }

    #[tokio::test]
    async fn a_reload_updates_restarts_adds_and_removes_and_a_bad_file_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("fnmesh-mesh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fnmesh.toml");
        let breaker = "circuit_breaker = { window = \"10s\", min_requests = 5, failure_ratio = 0.5, open = \"1s\" }";
        write(
            &path,
            "127.0.0.1:1",
            &[
                function("a", "thrift", "/bin/true", breaker),
                function("b", "grpc", "/bin/true", ""),
                function("c", "thrift", "/bin/true", ""),
            ],
        );
        let mesh = mesh_at(&path);
        let a = mesh.functions()[0].clone();
        let b = mesh.functions()[1].clone();
        let c = mesh.functions()[2].clone();
        let breakers = a.policy().breakers.clone();

        // a: scale only (its breakers and their state carry over); b: a new command; c gone;
        // d new; a [sidecar] key that needs a restart.
        let scaled = function("a", "thrift", "/bin/true", breaker).replace(
            "[function.policy]",
            "[function.scale]\nmax = 3\n\n[function.policy]",
        );
        write(
            &path,
            "127.0.0.1:2",
            &[
                scaled.clone(),
                function("b", "grpc", "/bin/false", ""),
                function("d", "thrift", "/bin/true", ""),
            ],
        );
        let changes = mesh.reload().unwrap();
        assert_eq!(
            changes,
            Changes {
                added: vec!["d".into()],
                updated: vec!["a".into()],
                restarted: vec!["b".into()],
                removed: vec!["c".into()],
                need_restart: vec!["listen", "advertise"],
            }
        );
        assert_eq!(
            changes.to_string(),
            "added: d; updated: a; restarted: b; removed: c; not applied until restart: sidecar.listen, sidecar.advertise"
        );
        assert_eq!(names(&mesh.thrift.functions.load()), ["a", "d"]);
        assert_eq!(names(&mesh.grpc.functions.load()), ["b"]);
        assert!(Arc::ptr_eq(&mesh.thrift.functions.load()[0].function, &a));
        assert!(!Arc::ptr_eq(&mesh.grpc.functions.load()[0].function, &b));
        assert_eq!(a.policy().function.scale.max, 3);
        assert!(Arc::ptr_eq(&a.policy().breakers, &breakers));
        // The replaced and the removed pools drain (nothing in flight here), then stop.
        tokio::time::sleep(RETIRE_SETTLE + Duration::from_millis(50)).await;
        assert!(b.pool.is_shut_down() && c.pool.is_shut_down());
        assert!(!a.pool.is_shut_down());

        // A policy change rebuilds the breakers; the same file again changes nothing.
        write(
            &path,
            "127.0.0.1:2",
            &[
                function("a", "thrift", "/bin/true", "timeout = \"1s\""),
                function("b", "grpc", "/bin/false", ""),
                function("d", "thrift", "/bin/true", ""),
            ],
        );
        assert_eq!(mesh.reload().unwrap().updated, ["a"]);
        assert!(!Arc::ptr_eq(&a.policy().breakers, &breakers));
        assert!(a.policy().breakers.is_empty());
        assert_eq!(
            a.policy().function.policy.timeout,
            Some(Duration::from_secs(1))
        );
        // (The running sidecar still listens where it started: that stays reported.)
        assert_eq!(
            mesh.reload().unwrap().to_string(),
            "no function changed; not applied until restart: sidecar.listen, sidecar.advertise"
        );

        // An invalid file: refused, naming the key and line; nothing changes.
        std::fs::write(&path, "[sidecar]\nlisten = \"127.0.0.1:2\"\nbogus = 1\n").unwrap();
        let e = mesh.reload().unwrap_err();
        assert!(e.contains("line 3") && e.contains("bogus"), "{e}");
        assert_eq!(names(&mesh.thrift.functions.load()), ["a", "d"]);
        assert_eq!(mesh.functions().len(), 3);

        // No reload once draining; retired pools whose instances are gone are forgotten.
        assert_eq!(mesh.close().len(), 3);
        assert!(mesh.reload().unwrap_err().contains("draining"));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Egress services take a reload's `[[service]]` policy; one whose entry went takes the
    /// defaults for services. Functions here are on the egress tables too.
    #[tokio::test]
    async fn a_reload_gives_services_egress_reached_their_new_policy() {
        let dir = std::env::temp_dir().join(format!("fnmesh-mesh-egress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fnmesh.toml");
        let file = |service: &str| {
            format!(
                "[sidecar]\nlisten = \"127.0.0.1:1\"\negress = \"127.0.0.1:2\"\n\n{}{service}",
                function("a", "thrift", "/bin/true", "")
            )
        };
        let entry = |timeout: &str| {
            format!("[[service]]\nname = \"svc\"\nprotocol = \"thrift\"\npolicy = {{ timeout = \"{timeout}\" }}\n")
        };
        std::fs::write(&path, file(&entry("1s"))).unwrap();
        let backend = Backend::Embedded(Default::default());
        let mesh = mesh_at(&path).with_registry(&backend);
        let egress = mesh.egress.as_ref().expect("egress front ends");
        assert_eq!(names(&egress.thrift.functions.load()), ["a"]);
        let svc = egress
            .services
            .by_name("svc", Protocol::Thrift)
            .expect("a configured service");
        let timeout = || svc.config().policy.timeout;
        assert_eq!(timeout(), Some(Duration::from_secs(1)));
        std::fs::write(&path, file(&entry("2s"))).unwrap();
        mesh.reload().unwrap();
        assert_eq!(timeout(), Some(Duration::from_secs(2)));
        std::fs::write(&path, file("")).unwrap();
        mesh.reload().unwrap();
        assert_eq!(timeout(), crate::config::remote_policy().timeout);
        mesh.close();
        let _ = std::fs::remove_dir_all(dir);
    }
}
