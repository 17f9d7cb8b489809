//! `fnmesh run`: binds the listener and the admin address, serves until SIGTERM/SIGINT, then
//! drains: stop accepting, let in-flight calls finish within `drain_timeout`, stop instances.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use bytes::BytesMut;
use fnmesh_codec::{detect, Detected, Detection, Limits};
use fnmesh_discovery::Backend;
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    signal::unix::{signal, SignalKind},
    time::{sleep, timeout, Instant},
};

use crate::{
    admin,
    config::{Config, DiscoveryBackend},
    grpc::GrpcFront,
    instances::watchdog::Watchdog,
    mesh::Mesh,
    thrift::ThriftFront,
    workers::Workers,
};

/// How long deregistering may take when the sidecar drains.
const DEREGISTER: Duration = Duration::from_secs(2);
/// How long the listener stays open after deregistering, for callers whose registry view is a
/// moment old.
const PROPAGATION: Duration = Duration::from_secs(1);

/// The registry `[discovery]` names. Nothing is sent yet: an unreachable registry is retried
/// later and never stops the sidecar from serving.
async fn registry(backend: &DiscoveryBackend) -> Result<Backend, String> {
    Ok(match backend {
        DiscoveryBackend::None => Backend::Embedded(Default::default()),
        DiscoveryBackend::Consul { address } => Backend::Consul(
            fnmesh_discovery::consul::Consul::new(address)
                .map_err(|e| format!("discovery.address: {e}"))?,
        ),
        #[cfg(feature = "etcd")]
        DiscoveryBackend::Etcd { endpoints, prefix } => Backend::Etcd(Box::new(
            fnmesh_discovery::etcd::Etcd::new(endpoints, prefix)
                .await
                .map_err(|e| format!("discovery.endpoints: {e}"))?,
        )),
        #[cfg(not(feature = "etcd"))]
        DiscoveryBackend::Etcd { .. } => {
            return Err("this fnmesh was built without etcd support".into())
        }
    })
}

/// How long a new connection may take to send enough bytes to tell its protocol.
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn main(path: PathBuf, config: Config, json_logs: bool) -> ExitCode {
    init_logs(json_logs);
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

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn serve(path: PathBuf, config: Config) -> Result<(), String> {
    let listener = TcpListener::bind(config.sidecar.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.sidecar.listen))?;
    let limits = Limits {
        max_frame_size: config.sidecar.max_frame_size,
        ..Limits::default()
    };
    let grace = config.sidecar.drain_timeout;
    let watchdog =
        Arc::new(Watchdog::start().map_err(|e| format!("cannot start the watchdog: {e}"))?);
    let sidecar = config.sidecar.clone();
    let backend = registry(&config.discovery.backend).await?;
    let mesh = Arc::new(Mesh::new(path, config, limits, watchdog));
    let admin = Arc::new(admin::Admin {
        mesh: mesh.clone(),
        draining: false.into(),
    });
    if let Some(addr) = sidecar.admin {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on admin address {addr}: {e}"))?;
        tokio::spawn(admin::serve(l, admin.clone()));
    }
    let (shared, grpc_shared) = (mesh.thrift.clone(), mesh.grpc.clone());
    let workers = {
        let (shared, grpc_shared) = (shared.clone(), grpc_shared.clone());
        Workers::start(sidecar.workers, sidecar.busy_poll, move |sock| {
            connection(sock, shared.clone(), grpc_shared.clone())
        })
        .map_err(|e| format!("cannot start the worker threads: {e}"))?
    };
    tracing::info!(
        listen = %sidecar.listen,
        functions = mesh.functions().len(),
        workers = workers.len(),
        "fnmesh serving"
    );

    // The listener is up: callers may now find the functions.
    let registry = backend.name();
    mesh.register(backend);

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => workers.dispatch(sock),
                Err(e) => { tracing::warn!(error = %e, "accept failed"); sleep(Duration::from_millis(10)).await; }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => { let _ = reload(&mesh, "SIGHUP"); }
        }
    }

    // Drain. First the sidecar says it is going: `/readyz` fails, gRPC health turns NOT_SERVING
    // and HTTP/2 connections get GOAWAY, and the functions are deregistered; it keeps accepting
    // meanwhile, and for a moment after, so that callers who resolved it just before are
    // served. Then no new connections; calls in flight get `drain_timeout` to finish.
    admin.draining.store(true, Ordering::SeqCst);
    grpc_shared.draining.send_replace(true);
    let leave = async {
        mesh.deregister(DEREGISTER.min(grace)).await;
        if registry != "none" {
            sleep(PROPAGATION.min(grace / 2)).await;
        }
    };
    tokio::pin!(leave);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => workers.dispatch(sock),
                Err(_) => sleep(Duration::from_millis(10)).await,
            },
            () = &mut leave => break,
        }
    }
    drop(listener);
    // Thrift calls in flight, gRPC streams in flight, and HTTP/2 connections still open after
    // their GOAWAY (each closes once its streams are done and flushed).
    let active = || {
        shared.active.load(Ordering::SeqCst)
            + grpc_shared.active.load(Ordering::SeqCst)
            + grpc_shared.connections.load(Ordering::SeqCst)
    };
    tracing::info!(in_flight = active(), "draining");
    let until = Instant::now() + grace;
    while active() > 0 && Instant::now() < until {
        sleep(Duration::from_millis(5)).await;
    }
    let pools = mesh.drain();
    for p in &pools {
        p.shutdown();
    }
    // Instances get SIGTERM, then SIGKILL after the grace; wait for them to be reaped.
    let reap = async {
        while pools.iter().any(|p| p.live_processes() > 0) {
            sleep(Duration::from_millis(5)).await;
        }
    };
    let _ = timeout(grace + Duration::from_secs(1), reap).await;
    tracing::info!("stopped");
    Ok(())
}

/// Reloads the policy file (SIGHUP, or `POST /admin/reload` from `fnmesh reload`), logging what
/// changed or why the file was refused.
pub fn reload(mesh: &Mesh, asked_by: &str) -> Result<String, String> {
    match mesh.reload() {
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

/// Reads until the protocol is known (one bounded, timed read phase), then hands the connection
/// and the bytes already read to the protocol's server.
async fn connection(mut sock: TcpStream, thrift: Arc<ThriftFront>, grpc: Arc<GrpcFront>) {
    let peer = sock.peer_addr().ok();
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let detected = timeout(DETECT_TIMEOUT, async {
        loop {
            match detect(&buf) {
                Detection::Found(d) => return Some(d),
                Detection::Unknown => return None,
                Detection::NeedMore(_) => match sock.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                },
            }
        }
    })
    .await;
    match detected {
        Ok(Some(Detected::Http2)) => crate::grpc::serve(sock, buf, grpc).await,
        Ok(Some(d)) => crate::thrift::serve(sock, d, buf, thrift).await,
        Ok(None) if buf.is_empty() => {}
        Ok(None) => {
            let first = &buf[..buf.len().min(8)];
            tracing::warn!(?peer, first_bytes = ?first, "not a protocol fnmesh speaks; closing the connection");
        }
        Err(_) => tracing::debug!(
            ?peer,
            "no protocol detected within 10 s; closing the connection"
        ),
    }
}
