//! The admin API on `sidecar.admin`, served with hyper's HTTP/1 server: `GET /healthz`,
//! `GET /readyz`, `GET /metrics` (Prometheus), `GET /admin/functions` and `GET /admin/config`
//! (JSON) and `POST /admin/reload` (what `fnmesh reload` sends). One request per connection; nothing here is on the RPC path.

use std::{
    collections::VecDeque,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;

use crate::{governance::breaker, mesh::Mesh, metrics::Totals};

/// How long one admin connection may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Each function's call totals, sampled every second for the last minute: the windows
/// `/admin/functions` reports (and `fnmesh status` shows).
type Samples = std::collections::HashMap<String, VecDeque<(Instant, Totals)>>;
static RECENT: Mutex<Option<Samples>> = Mutex::new(None);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(60);

/// Samples every function's totals each second, off the request path, for as long as the
/// admin API serves.
async fn sample(mesh: Arc<Mesh>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let functions = mesh.functions();
        let mut recent = crate::lock(&RECENT);
        let samples = recent.get_or_insert_with(Default::default);
        samples.retain(|name, _| functions.iter().any(|f| &f.name == name));
        for f in &functions {
            let ring = samples.entry(f.name.clone()).or_default();
            ring.push_back((now, f.policy().metrics.totals()));
            while ring.front().is_some_and(|(at, _)| now - *at > WINDOW) {
                ring.pop_front();
            }
        }
    }
}

/// `function`'s calls over the last minute (or since the sidecar started, if sooner), up to
/// now.
fn last_minute(function: &crate::governance::Function) -> Option<crate::metrics::Window> {
    let now = function.policy().metrics.totals();
    let recent = crate::lock(&RECENT);
    let (at, then) = recent.as_ref()?.get(&function.name)?.front()?;
    Some(now.since(then, at.elapsed().as_secs_f64()))
}

/// Serves the admin API on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    mesh: Arc<Mesh>,
    queue: Option<Arc<crate::queue::Queue>>,
) {
    tokio::spawn(sample(mesh.clone()));
    let failed = crate::Throttled::default();
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                if let Some(failed) = failed.due() {
                    tracing::warn!(error = %e, failed, "admin accept failed");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (mesh, queue) = (mesh.clone(), queue.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = answer(&mesh, queue.as_deref(), &req);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

/// Header in which `fnmesh reload -c FILE` names FILE (absolute, percent-encoded): a sidecar
/// reloads only the file it serves.
pub const RELOAD_FILE_HEADER: &str = "fnmesh-file";

/// Whether a reload request names this sidecar's file, or none (a plain `POST`, as curl sends).
fn serves(mesh: &Mesh, req: &Request<Incoming>) -> bool {
    let Some(named) = req.headers().get(RELOAD_FILE_HEADER) else {
        return true;
    };
    let named = std::path::PathBuf::from(percent_decode(named.as_bytes()));
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.into());
    canonical(&named) == canonical(mesh.path())
}

/// `%XX` escapes decoded (a path's bytes that a header cannot carry as they are).
fn percent_decode(bytes: &[u8]) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// The bytes of `path` a header value carries as they are, and `%XX` for the others.
pub fn percent_encode(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The answer to one admin request.
fn answer(
    mesh: &Mesh,
    queue: Option<&crate::queue::Queue>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::POST, "/admin/reload") if !serves(mesh, req) => text(
            StatusCode::CONFLICT,
            format!(
                "reload refused: this sidecar serves {}, not the file named; edit that file and reload, or restart with -c FILE\n",
                mesh.path().display()
            ),
        ),
        (&Method::POST, "/admin/reload") => match mesh.reload_and_log("POST /admin/reload") {
            Ok(changes) => text(StatusCode::OK, format!("reloaded: {changes}\n")),
            Err(e) => text(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("reload refused, the old policy stays: {e}\n"),
            ),
        },
        (_, "/admin/reload") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST to reload the policy file\n".into(),
        ),
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n".into()),
        (&Method::GET | &Method::HEAD, "/readyz") => ready(mesh, queue),
        (&Method::GET | &Method::HEAD, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics(mesh).into_bytes(),
        ),
        (&Method::GET | &Method::HEAD, "/admin/config") => {
            let body = serde_json::to_vec_pretty(&config(mesh)).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }
        (&Method::GET | &Method::HEAD, "/admin/idl") => {
            let body = serde_json::to_vec_pretty(&idl(mesh)).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }
        (&Method::GET | &Method::HEAD, "/admin/openapi.json") => {
            let body = serde_json::to_vec_pretty(&openapi(mesh)).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }
        (&Method::GET | &Method::HEAD, "/admin/functions") => {
            let body = serde_json::to_vec(&functions(mesh)).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Ready unless draining. A registry outage is reported, but the sidecar serves: still ready.
/// Ready unless draining; the registry's and the async queue's states are shown, but neither
/// makes the sidecar unready (it serves calls without them).
fn ready(mesh: &Mesh, queue: Option<&crate::queue::Queue>) -> Response<Full<Bytes>> {
    if mesh.drain.is_draining() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    let mut body = match mesh.registry_health() {
        Some((name, health)) => format!("ready\nregistry {name}: {health}\n"),
        None => "ready\n".to_owned(),
    };
    if let Some(q) = queue {
        match q.problem() {
            None => body.push_str("async: connected\n"),
            Some(p) => body.push_str(&format!("async: not ready: {p}\n")),
        }
    }
    text(StatusCode::OK, body)
}

/// `/metrics`: the counted metrics, and the gauges read now from the sidecar's state.
fn metrics(mesh: &Mesh) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let scraped = crate::metrics::Scraped::new();
    for f in mesh.functions() {
        let s = f.pool.snapshot();
        scraped.function(&f.name, s.ready, s.starting, s.in_flight, s.queued);
        for (method, state) in f.policy().breakers.states() {
            let state = match state {
                breaker::State::Closed => 0,
                breaker::State::Open => 1,
                breaker::State::HalfOpen => 2,
            };
            scraped.breaker(&f.name, method, state);
        }
    }
    let m = crate::metrics::global();
    scraped.connections("thrift", crate::metrics::THRIFT_CONNECTIONS.load(Relaxed));
    scraped.connections("grpc", crate::metrics::GRPC_CONNECTIONS.load(Relaxed));
    if let Some((name, health)) = mesh.registry_health() {
        let up = matches!(health, fnmesh_discovery::Health::Registered);
        scraped.registry(name, up);
    }
    m.encode(&scraped)
}

/// `/admin/config`: the policy in force for every function and method, after defaults and
/// per-method overrides, as calls arriving now get it (like Envoy's `/config_dump`).
/// Environment values are left out (they may be secrets); their names are shown.
fn config(mesh: &Mesh) -> serde_json::Value {
    let functions: Vec<serde_json::Value> = mesh
        .functions()
        .iter()
        .map(|f| {
            let c = f.config();
            let methods: serde_json::Map<String, serde_json::Value> = c
                .methods
                .iter()
                .flatten()
                .map(|m| {
                    (
                        m.name.clone(),
                        policy_json(&c.policy_for(&m.name), m.oneway),
                    )
                })
                .collect();
            let s = &c.scale;
            json!({
                "name": c.name,
                "protocol": format!("{:?}", c.protocol).to_lowercase(),
                "transport": format!("{:?}", c.transport).to_lowercase(),
                "service": c.service,
                "command": c.command,
                "env": c.env.keys().collect::<Vec<_>>(),
                "scale": {
                    "min": s.min, "max": s.max, "concurrency": s.concurrency,
                    "idle": duration(s.idle), "startup_timeout": duration(s.startup_timeout),
                    "queue": s.queue,
                },
                "policy": policy_json(&c.policy, false),
                "methods": methods,
            })
        })
        .collect();
    json!({ "file": mesh.path().display().to_string(), "functions": functions })
}

/// One policy as JSON: every key, `null` where it is not set.
fn policy_json(p: &crate::config::PolicyConfig, oneway: bool) -> serde_json::Value {
    let retry = p.retry.map(|r| {
        let on: Vec<&str> = [
            (r.on_connect, "connect"),
            (r.on_unavailable, "unavailable"),
            (r.on_timeout, "timeout"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        json!({ "attempts": r.attempts, "backoff": duration(r.backoff), "on": on })
    });
    let breaker = p.circuit_breaker.map(|b| {
        json!({
            "window": duration(b.window), "min_requests": b.min_requests,
            "failure_ratio": b.failure_ratio, "open": duration(b.open),
        })
    });
    let mut v = json!({
        "timeout": p.timeout.map(duration),
        "rate_limit": p.rate_limit.map(|r| json!({ "rps": r.rps, "burst": r.burst })),
        "circuit_breaker": breaker,
        "retry": retry,
        "idempotent": p.idempotent.unwrap_or(false),
    });
    if oneway {
        v["oneway"] = true.into();
    }
    v
}

/// A duration as the policy file writes one: `1.5s`, `250ms`, `40us`.
fn duration(d: Duration) -> String {
    let us = d.as_micros();
    match us {
        _ if us % 1_000_000 == 0 => format!("{}s", us / 1_000_000),
        _ if us >= 1_000_000 => format!("{}s", d.as_secs_f64()),
        _ if us % 1_000 == 0 => format!("{}ms", us / 1_000),
        _ => format!("{us}us"),
    }
}

/// `/admin/idl`: each function's IDL service and methods.
fn idl(mesh: &Mesh) -> serde_json::Value {
    let functions: Vec<serde_json::Value> = mesh
        .functions()
        .iter()
        .map(|f| {
            let c = f.config();
            let methods: Vec<serde_json::Value> = c
                .methods
                .iter()
                .flatten()
                .map(|m| {
                    json!({
                        "name": m.name,
                        "oneway": m.oneway,
                        "client_streaming": m.client_streaming,
                        "server_streaming": m.server_streaming,
                    })
                })
                .collect();
            let protocol = match c.protocol {
                crate::config::Protocol::Thrift => "thrift",
                crate::config::Protocol::Grpc => "grpc",
            };
            json!({ "name": f.name, "protocol": protocol, "service": c.service, "methods": methods })
        })
        .collect();
    json!({ "functions": functions })
}

/// `/admin/openapi.json`: the gateway's routes, with schemas from the IDLs.
fn openapi(mesh: &Mesh) -> serde_json::Value {
    use fnmesh_idl::openapi::{Idl, Served};
    let configs: Vec<_> = mesh.functions().iter().map(|f| f.config()).collect();
    let served: Vec<Served<'_>> = configs
        .iter()
        .filter_map(|c| {
            let idl = match (c.schema.as_deref(), c.proto.as_deref()) {
                (Some(schema), _) => Idl::Thrift(schema),
                (None, Some(proto)) => Idl::Proto(proto),
                (None, None) => return None,
            };
            Some(Served {
                function: &c.name,
                service: c.service.as_deref()?,
                idl,
            })
        })
        .collect();
    fnmesh_idl::openapi::document(&served)
}

/// `/admin/functions`: each function's instances, queue and breakers.
fn functions(mesh: &Mesh) -> serde_json::Value {
    let functions: Vec<serde_json::Value> = mesh
        .functions()
        .iter()
        .map(|f| {
            let s = f.pool.snapshot();
            let policy = f.policy();
            let breakers: serde_json::Map<String, serde_json::Value> = policy
                .breakers
                .states()
                .into_iter()
                .map(|(method, state)| {
                    let state = match state {
                        breaker::State::Closed => "closed",
                        breaker::State::Open => "open",
                        breaker::State::HalfOpen => "half-open",
                    };
                    (method.to_owned(), state.into())
                })
                .collect();
            let cold = crate::metrics::global()
                .last_cold_start(&f.name)
                .map(|(at, took)| {
                    let ago = at.elapsed().unwrap_or_default();
                    json!({ "seconds_ago": ago.as_secs_f64(), "ms": took.as_secs_f64() * 1e3 })
                });
            let peers = f.peers.get().map(|p| {
                let p = p.snapshot();
                json!({ "nodes": p.ready, "in_flight": p.in_flight })
            });
            json!({
                "name": f.name,
                "ready": s.ready,
                "starting": s.starting,
                "peers": peers,
                "max": policy.function.scale.max,
                "queued": s.queued,
                "in_flight": s.in_flight,
                "processes": f.pool.live_processes(),
                "failures_in_a_row": s.failures,
                "restart_backoff_ms": s.backoff.as_millis() as u64,
                "breakers": breakers,
                "last_minute": last_minute(f),
                "last_cold_start": cold,
            })
        })
        .collect();
    let registry = mesh
        .registry_health()
        .map(|(name, health)| json!({ "backend": name, "state": health.to_string() }));
    let services: Vec<serde_json::Value> = mesh
        .egress
        .iter()
        .flat_map(|e| e.services.reached())
        .map(|f| {
            let s = f.pool.snapshot();
            json!({
                "name": f.name,
                "endpoints": s.ready,
                "in_flight": s.in_flight,
                "queued": s.queued,
            })
        })
        .collect();
    json!({ "functions": functions, "services": services, "registry": registry })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.into_bytes())
}

/// A response that closes the connection after it (one request per connection, as simple
/// clients that read to the end expect).
fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    r
}
