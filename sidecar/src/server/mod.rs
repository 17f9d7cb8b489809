//! `fnmesh run`: binds the listener and the admin address, serves until SIGTERM or SIGINT
//! (SIGHUP reloads the policy file), then drains (`shutdown`).

mod listener;
mod shutdown;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::AtomicUsize, Arc},
    time::Duration,
};

use fnmesh_codec::Limits;
use fnmesh_discovery::Backend;
use tokio::{
    net::TcpListener,
    signal::unix::{signal, Signal, SignalKind},
};

use crate::{
    admin,
    config::{Config, DiscoveryBackend},
    instances::watchdog::Watchdog,
    mesh::Mesh,
    queue::Queue,
    workers::{Listener, Workers},
    Throttled,
};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line, for machines.
    Json,
}

/// Runs the sidecar for `config` (read from `path`, which reloads read again) until it has
/// drained.
pub fn main(path: PathBuf, config: Config, logs: LogFormat) -> ExitCode {
    init_logs(logs);
    if config.telemetry.access_log {
        crate::access::enable(config.telemetry.access_log_ratio);
    }
    // The control runtime: accept, admin, signals and instance processes. Connections are
    // served by the worker threads (`workers.rs`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fnmesh: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(serve(path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("fnmesh: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        // Colour codes only where a terminal shows them, never in a file or a pipe.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// The registry `[discovery]` names. Nothing is sent yet: an unreachable registry is retried
/// later and never stops the sidecar from serving.
async fn registry(backend: &DiscoveryBackend) -> Result<Backend, String> {
    Ok(match backend {
        DiscoveryBackend::None => Backend::Embedded(Default::default()),
        DiscoveryBackend::Consul {
            address,
            token,
            tls,
        } => {
            let consul = fnmesh_discovery::consul::Consul::new(address, tls)
                .map_err(|e| format!("discovery.address: {e}"))?;
            Backend::Consul(match token {
                Some(t) => consul
                    .with_token(t)
                    .map_err(|e| format!("discovery.token: {e}"))?,
                None => consul,
            })
        }
        DiscoveryBackend::Etcd {
            endpoints,
            prefix,
            user,
            tls,
        } => {
            let etcd = fnmesh_discovery::etcd::Etcd::new(endpoints, prefix, tls)
                .await
                .map_err(|e| format!("discovery.endpoints: {e}"))?;
            Backend::Etcd(Box::new(match user {
                Some((name, password)) => etcd.with_auth(name, password),
                None => etcd,
            }))
        }
    })
}

/// A running sidecar: its listener, worker threads and functions.
struct Sidecar {
    /// The main listener; closed when the drain starts.
    listener: Option<TcpListener>,
    /// `[sidecar] egress`'s listener, when set.
    egress: Option<TcpListener>,
    workers: Workers,
    mesh: Arc<Mesh>,
    /// The registry's name (`none` without one).
    registry: &'static str,
    grace: Duration,
    /// Caller connections open, and how many may be.
    open: Arc<AtomicUsize>,
    max_connections: usize,
    /// Connections closed at accept for the limit, and failed accepts: counted, logged at most
    /// once a second.
    refused: Throttled,
    failed: Throttled,
    /// `[async]`'s queue, when configured.
    queue: Option<Arc<Queue>>,
}

async fn serve(path: PathBuf, config: Config) -> Result<(), String> {
    let sidecar = start(path, config).await?;
    let mut signals = Signals::new().map_err(|e| format!("cannot watch signals: {e}"))?;
    loop {
        tokio::select! {
            accepted = accept_on(&sidecar.listener) => sidecar.dispatch(accepted, Listener::Main).await,
            accepted = accept_on(&sidecar.egress) => sidecar.dispatch(accepted, Listener::Egress).await,
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.hup.recv() => { let _ = sidecar.mesh.reload_and_log("SIGHUP"); }
        }
    }
    sidecar.shutdown(signals).await;
    // The last spans go out: from a blocking thread, while this runtime keeps driving the
    // exporter's connection (it lives here), and for a bounded time.
    let flushed = tokio::task::spawn_blocking(crate::trace::flush);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), flushed).await;
    Ok(())
}

/// Binds everything, starts the functions and the worker threads, and registers the functions
/// once the listener is up.
async fn start(path: PathBuf, config: Config) -> Result<Sidecar, String> {
    let listen = config.sidecar.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let limits = Limits {
        max_frame_size: config.sidecar.max_frame_size,
        ..Limits::default()
    };
    let watchdog =
        Arc::new(Watchdog::start().map_err(|e| format!("cannot start the watchdog: {e}"))?);
    let settings = config.sidecar.clone();
    let t = &config.telemetry;
    if let Some(endpoint) = &t.otlp_endpoint {
        crate::trace::init(endpoint, t.otlp_protocol, t.sample_ratio, &t.service_name)?;
    }
    let backend = registry(&config.discovery.backend).await?;
    let egress = match settings.egress {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on egress address {addr}: {e}"))?,
        ),
        None => None,
    };
    let mesh = Arc::new(Mesh::new(path, config, limits, watchdog).with_registry(&backend));
    let own = match listener.local_addr() {
        Ok(mut a) if a.ip().is_unspecified() => {
            a.set_ip([127, 0, 0, 1].into());
            a
        }
        Ok(a) => a,
        Err(_) => listen,
    };
    let queue = Queue::start(&mesh, listener::grpc_gateway(mesh.grpc.clone(), own));
    if let Some(addr) = settings.admin {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on admin address {addr}: {e}"))?;
        tokio::spawn(admin::serve(l, mesh.clone(), queue.clone()));
    }
    let open = Arc::new(AtomicUsize::new(0));
    let fronts = listener::Fronts {
        thrift: mesh.thrift.clone(),
        grpc: mesh.grpc.clone(),
        egress: mesh
            .egress
            .as_ref()
            .map(|e| (e.thrift.clone(), e.grpc.clone())),
        own,
        open: open.clone(),
        queue: queue.as_ref().map(Queue::routes),
    };
    let sweep_every = settings.connections.sweep_every();
    let workers = Workers::start(
        settings.workers,
        settings.busy_poll,
        sweep_every,
        move |sock, from| listener::connection(sock, from, fronts.clone()),
    )
    .map_err(|e| format!("cannot start the worker threads: {e}"))?;
    tracing::info!(
        listen = %listen,
        egress = ?settings.egress,
        functions = mesh.functions().len(),
        workers = workers.len(),
        "fnmesh serving"
    );
    // The listener is up: callers may now find the functions.
    let registry = backend.name();
    mesh.register(backend);
    Ok(Sidecar {
        listener: Some(listener),
        egress,
        workers,
        mesh,
        registry,
        grace: settings.drain_timeout,
        open,
        max_connections: settings.connections.max,
        refused: Throttled::default(),
        failed: Throttled::default(),
        queue,
    })
}

impl Sidecar {
    /// Hands an accepted connection to a worker thread, or closes it when `max_connections`
    /// are open (counted, and logged at most once a second).
    async fn dispatch(
        &self,
        accepted: std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>,
        from: Listener,
    ) {
        match accepted {
            Ok((sock, _)) if listener::admit(&self.open, self.max_connections) => {
                self.workers.dispatch(sock, from)
            }
            Ok((sock, peer)) => {
                drop(sock);
                if let Some(refused) = self.refused.due() {
                    tracing::warn!(
                        %peer,
                        refused,
                        max_connections = self.max_connections,
                        "connection closed at accept: max_connections are open"
                    );
                }
            }
            Err(e) => {
                // Out of file descriptors, typically: a moment for connections to close.
                if let Some(failed) = self.failed.due() {
                    tracing::warn!(error = %e, failed, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The next connection on `listener`; never, without one.
async fn accept_on(
    listener: &Option<TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// The signals `fnmesh run` answers.
pub(super) struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Resolves at the next SIGTERM or SIGINT.
    async fn stop(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }

    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}
