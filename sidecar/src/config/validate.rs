//! From the file as written to a validated [`Config`]: every check, each error naming the key
//! and the line.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use fnmesh_discovery::Tls;
use toml::Spanned;

use super::{
    ctx::Ctx,
    raw::{parse_duration, RawDiscovery, RawFile, RawFunction, RawPolicy, RawService, RawSidecar},
    CircuitBreaker, Config, ConfigError, ConnectionLimits, DiscoveryBackend, DiscoveryConfig,
    FunctionConfig, PolicyConfig, Protocol, RateLimit, Retry, ScaleConfig, SidecarConfig,
    TelemetryConfig, Transport,
};

/// `[discovery]`, checked: a known backend with an `http://` address, keys only for it.
/// `max_connections`, `header_timeout` and `idle_timeout`.
fn connection_limits(cx: &Ctx<'_>, s: &RawSidecar) -> Result<ConnectionLimits, ConfigError> {
    let max = match &s.max_connections {
        Some(m) if *m.get_ref() == 0 => {
            return cx.invalid(
                m.span().start,
                "sidecar.max_connections",
                "must be at least 1",
            )
        }
        Some(m) => *m.get_ref(),
        None => default_max_connections(),
    };
    if s.header_timeout.is_zero() {
        return cx.invalid(
            s.listen.span().start,
            "sidecar.header_timeout",
            "must be greater than zero",
        );
    }
    if s.connection_buffer < 64 << 10 {
        return cx.invalid(
            s.listen.span().start,
            "sidecar.connection_buffer",
            "must be at least 64KiB",
        );
    }
    Ok(ConnectionLimits {
        max,
        header_timeout: s.header_timeout,
        idle_timeout: s.idle_timeout,
        buffer: s.connection_buffer,
    })
}

/// Half of what the process may open beyond a reserve for instances, registries and the admin
/// API: a caller connection can take a second descriptor, its connection to an instance.
fn default_max_connections() -> usize {
    let files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let files = usize::try_from(files).unwrap_or(usize::MAX);
    (files.saturating_sub(256) / 2).clamp(64, 1 << 20)
}

/// Consul's ACL token: `token`, else `CONSUL_HTTP_TOKEN` (as Consul's own tools read it).
fn consul_token(cx: &Ctx<'_>, raw: &RawDiscovery) -> Result<Option<String>, ConfigError> {
    Ok(match &raw.token {
        Some(t) if t.get_ref().is_empty() => {
            return cx.invalid(t.span().start, "discovery.token", "is empty")
        }
        Some(t) if http::HeaderValue::from_str(t.get_ref()).is_err() => {
            return cx.invalid(
                t.span().start,
                "discovery.token",
                "has characters a token cannot have",
            )
        }
        Some(t) => Some(t.get_ref().clone()),
        None => std::env::var("CONSUL_HTTP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    })
}

/// etcd's user: `username` and `password` (both or neither), else `ETCDCTL_USER` as
/// `name:password` (as etcdctl reads it).
fn etcd_user(cx: &Ctx<'_>, raw: &RawDiscovery) -> Result<Option<(String, String)>, ConfigError> {
    Ok(match (&raw.username, &raw.password) {
        (Some(u), Some(p)) => Some((u.get_ref().clone(), p.get_ref().clone())),
        (Some(u), None) => {
            return cx.invalid(
                u.span().start,
                "discovery.password",
                "is needed with username",
            )
        }
        (None, Some(p)) => {
            return cx.invalid(
                p.span().start,
                "discovery.username",
                "is needed with password",
            )
        }
        (None, None) => std::env::var("ETCDCTL_USER").ok().and_then(|v| {
            let (u, p) = v.split_once(':')?;
            Some((u.to_owned(), p.to_owned()))
        }),
    })
}

/// A registry address: `http://host:port` or `https://host:port`.
fn registry_address(cx: &Ctx<'_>, v: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
    let s = v.get_ref();
    match s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
    {
        Some(rest)
            if !rest.trim_end_matches('/').is_empty()
                && !rest.trim_end_matches('/').contains('/') =>
        {
            Ok(s.clone())
        }
        _ => cx.invalid(
            v.span().start,
            key,
            format!("{s:?} is not http://host:port or https://host:port"),
        ),
    }
}

/// TLS to the registry: `ca_file`, `cert_file` and `key_file` (relative to the file's folder),
/// else the environment variables the registry's own tools read (`env`: CA, cert, key), these
/// only when an address is `https://`. Files given for `http://` addresses are an error.
fn registry_tls(
    cx: &Ctx<'_>,
    raw: &RawDiscovery,
    base: &Path,
    https: bool,
    env: [&str; 3],
) -> Result<Tls, ConfigError> {
    let keys = [
        ("ca_file", &raw.ca_file),
        ("cert_file", &raw.cert_file),
        ("key_file", &raw.key_file),
    ];
    let mut files: [Option<PathBuf>; 3] = Default::default();
    for (i, (key, value)) in keys.into_iter().enumerate() {
        let key = format!("discovery.{key}");
        files[i] = match value {
            Some(v) if !https => {
                return cx.invalid(v.span().start, key, "needs an https:// address")
            }
            Some(v) => {
                let path = base.join(v.get_ref());
                if !path.is_file() {
                    return cx.invalid(
                        v.span().start,
                        key,
                        format!("{}: no such file", path.display()),
                    );
                }
                Some(path)
            }
            None if https => std::env::var_os(env[i])
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            None => None,
        };
    }
    let [ca_file, cert_file, key_file] = files;
    if cert_file.is_some() != key_file.is_some() {
        let at = raw
            .cert_file
            .as_ref()
            .or(raw.key_file.as_ref())
            .map_or(0, |v| v.span().start);
        return cx.invalid(at, "discovery.cert_file", "and key_file go together");
    }
    Ok(Tls {
        ca_file,
        cert_file,
        key_file,
    })
}

/// etcd's `endpoints`, each checked.
fn etcd_endpoints(cx: &Ctx<'_>, raw: &RawDiscovery) -> Result<Vec<String>, ConfigError> {
    match &raw.endpoints {
        Some(list) if list.get_ref().is_empty() => {
            cx.invalid(list.span().start, "discovery.endpoints", "is empty")
        }
        Some(list) => list
            .get_ref()
            .iter()
            .map(|e| {
                let spanned = Spanned::new(list.span(), e.clone());
                registry_address(cx, &spanned, "discovery.endpoints")
            })
            .collect(),
        None => Ok(vec!["http://127.0.0.1:2379".to_owned()]),
    }
}

fn discovery(
    cx: &Ctx<'_>,
    d: &Spanned<RawDiscovery>,
    base: &Path,
) -> Result<DiscoveryConfig, ConfigError> {
    let raw = d.get_ref();
    let backend = &raw.backend;
    let ttl = raw.ttl.unwrap_or(Duration::from_secs(10));
    if ttl < Duration::from_secs(2) {
        return cx.invalid(
            d.span().start,
            "discovery.ttl",
            "must be at least 2s (etcd grants no shorter lease)",
        );
    }
    // Which keys each backend takes: any other one set is an error.
    let name = backend.get_ref().as_str();
    let tls_keys = ["ca_file", "cert_file", "key_file"];
    let takes: Vec<&str> = match name {
        "consul" => ["address", "token"].into_iter().chain(tls_keys).collect(),
        "etcd" => ["endpoints", "prefix", "username", "password"]
            .into_iter()
            .chain(tls_keys)
            .collect(),
        _ => Vec::new(),
    };
    let at = |v: &Option<Spanned<String>>| v.as_ref().map(|v| v.span().start);
    let set = [
        ("address", at(&raw.address)),
        ("token", at(&raw.token)),
        ("endpoints", raw.endpoints.as_ref().map(|e| e.span().start)),
        ("prefix", at(&raw.prefix)),
        ("username", at(&raw.username)),
        ("password", at(&raw.password)),
        ("ca_file", at(&raw.ca_file)),
        ("cert_file", at(&raw.cert_file)),
        ("key_file", at(&raw.key_file)),
    ];
    if ["none", "consul", "etcd"].contains(&name) {
        for (key, at) in set {
            if let Some(at) = at.filter(|_| !takes.contains(&key)) {
                return cx.invalid(
                    at,
                    format!("discovery.{key}"),
                    format!("does not apply to backend \"{name}\""),
                );
            }
        }
    }
    let https = |a: &str| a.starts_with("https://");
    let backend = match name {
        "none" => DiscoveryBackend::None,
        "consul" => {
            let address = match &raw.address {
                Some(a) => registry_address(cx, a, "discovery.address")?,
                None => "http://127.0.0.1:8500".to_owned(),
            };
            let env = ["CONSUL_CACERT", "CONSUL_CLIENT_CERT", "CONSUL_CLIENT_KEY"];
            let tls = registry_tls(cx, raw, base, https(&address), env)?;
            let token = consul_token(cx, raw)?;
            DiscoveryBackend::Consul {
                address,
                token,
                tls,
            }
        }
        "etcd" => {
            let endpoints = etcd_endpoints(cx, raw)?;
            let prefix = raw
                .prefix
                .as_ref()
                .map_or("kitex/registry-etcd".to_owned(), |p| p.get_ref().clone());
            let env = ["ETCDCTL_CACERT", "ETCDCTL_CERT", "ETCDCTL_KEY"];
            let any_https = endpoints.iter().any(|e| https(e));
            if any_https && !endpoints.iter().all(|e| https(e)) {
                let at = raw.endpoints.as_ref().map_or(0, |e| e.span().start);
                return cx.invalid(at, "discovery.endpoints", "mixes http:// and https://");
            }
            let tls = registry_tls(cx, raw, base, any_https, env)?;
            let user = etcd_user(cx, raw)?;
            DiscoveryBackend::Etcd {
                endpoints,
                prefix,
                user,
                tls,
            }
        }
        other => {
            return cx.invalid(
                backend.span().start,
                "discovery.backend",
                format!("{other:?} is not one of none, consul, etcd"),
            )
        }
    };
    Ok(DiscoveryConfig { backend, ttl })
}

impl Config {
    /// Reads and validates `path`. Relative `idl` paths and commands are taken from the file's
    /// directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse(&text, &shown, &base)
    }

    pub fn parse(text: &str, path: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let cx = Ctx::new(path, text);
        let s = raw.sidecar.get_ref();
        let listen = cx.addr(&s.listen, "sidecar.listen")?;
        let admin = s
            .admin
            .as_ref()
            .map(|a| cx.addr(a, "sidecar.admin"))
            .transpose()?;
        let advertise = match &s.advertise {
            Some(a) => cx.addr(a, "sidecar.advertise")?,
            None => listen,
        };
        if let Some(engine) = &s.grpc_engine {
            return cx.invalid(
                engine.span().start,
                "sidecar.grpc_engine",
                "was removed: gRPC is always served by fnmesh's own HTTP/2 relay; delete the key",
            );
        }
        if s.max_frame_size < 64 {
            return cx.invalid(
                raw.sidecar.span().start,
                "sidecar.max_frame_size",
                "must be at least 64 bytes",
            );
        }
        let discovery = match &raw.discovery {
            Some(d) => discovery(&cx, d, base)?,
            None => DiscoveryConfig::default(),
        };
        // A registry must be given an address callers can reach.
        if discovery.backend != DiscoveryBackend::None && advertise.ip().is_unspecified() {
            let at = s
                .advertise
                .as_ref()
                .map_or(s.listen.span().start, |a| a.span().start);
            return cx.invalid(
                at,
                "sidecar.advertise",
                format!("{advertise} cannot be registered: set an address callers can reach"),
            );
        }
        let egress = egress(&cx, s, listen, admin)?;
        let (mut functions, services) = functions_and_services(&cx, &raw, base, egress)?;
        let queue = super::queue::apply(&cx, &raw, &mut functions)?;
        let workers = match &s.workers {
            Some(w) if !(1..=256).contains(w.get_ref()) => {
                return cx.invalid(
                    w.span().start,
                    "sidecar.workers",
                    format!("{} is not between 1 and 256", w.get_ref()),
                )
            }
            Some(w) => *w.get_ref(),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let telemetry = telemetry(&cx, &raw)?;
        Ok(Config {
            discovery,
            telemetry,
            sidecar: SidecarConfig {
                listen,
                admin,
                advertise,
                egress,
                drain_timeout: s.drain_timeout,
                max_frame_size: s.max_frame_size,
                workers,
                busy_poll: s.busy_poll,
                connections: connection_limits(&cx, s)?,
            },
            functions,
            services,
            queue,
        })
    }
}

/// `[sidecar] egress`: an address that is neither `listen` nor `admin`.
fn egress(
    cx: &Ctx<'_>,
    s: &RawSidecar,
    listen: SocketAddr,
    admin: Option<SocketAddr>,
) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(at) = &s.egress else {
        return Ok(None);
    };
    let e = cx.addr(at, "sidecar.egress")?;
    if e == listen || Some(e) == admin {
        return cx.invalid(
            at.span().start,
            "sidecar.egress",
            format!("{e} is already the listen or admin address"),
        );
    }
    Ok(Some(e))
}

/// The `[[function]]`s (each told where the egress is, when there is one) and the
/// `[[service]]`s, each name once.
fn functions_and_services(
    cx: &Ctx<'_>,
    raw: &RawFile,
    base: &Path,
    egress: Option<SocketAddr>,
) -> Result<(Vec<FunctionConfig>, Vec<FunctionConfig>), ConfigError> {
    let mut functions: Vec<FunctionConfig> = Vec::new();
    for f in &raw.function {
        let fc = function(cx, f, base)?;
        if functions.iter().any(|o| o.name == fc.name) {
            return cx.invalid(
                f.get_ref().name.span().start,
                "function.name",
                format!("{:?} is configured twice", fc.name),
            );
        }
        functions.push(fc);
    }
    let mut services: Vec<FunctionConfig> = Vec::new();
    for raw in &raw.service {
        let sc = service(cx, raw, base)?;
        if services.iter().any(|o| o.name == sc.name) {
            return cx.invalid(
                raw.get_ref().name.span().start,
                "service.name",
                format!("{:?} is configured twice", sc.name),
            );
        }
        services.push(sc);
    }
    // Every instance learns where its egress is (docs/design.md: FNMESH_EGRESS).
    if let Some(e) = egress {
        for f in &mut functions {
            f.env
                .entry("FNMESH_EGRESS".to_owned())
                .or_insert_with(|| e.to_string());
        }
    }
    Ok((functions, services))
}

/// `[telemetry]`: the access log and its ratio, in (0, 1].
fn telemetry(cx: &Ctx<'_>, raw: &RawFile) -> Result<TelemetryConfig, ConfigError> {
    let Some(t) = &raw.telemetry else {
        return Ok(TelemetryConfig::default());
    };
    let ratio = t.get_ref().access_log_ratio.as_ref();
    if let Some(r) = ratio.filter(|r| !(*r.get_ref() > 0.0 && *r.get_ref() <= 1.0)) {
        return cx.invalid(
            r.span().start,
            "telemetry.access_log_ratio",
            format!("{} is not in (0, 1]", r.get_ref()),
        );
    }
    let t = t.get_ref();
    let sample = t.sample_ratio.as_ref();
    if let Some(r) = sample.filter(|r| !(0.0..=1.0).contains(r.get_ref())) {
        return cx.invalid(
            r.span().start,
            "telemetry.sample_ratio",
            format!("{} is not in [0, 1]", r.get_ref()),
        );
    }
    let otlp_endpoint = match &t.otlp_endpoint {
        Some(e) => Some(registry_address(cx, e, "telemetry.otlp_endpoint")?),
        None => None,
    };
    let otlp_protocol = match t.otlp_protocol.as_ref().map(|p| (p.get_ref().as_str(), p)) {
        None | Some(("grpc", _)) => super::OtlpProtocol::Grpc,
        Some(("http/protobuf", _)) => super::OtlpProtocol::HttpProtobuf,
        Some((other, p)) => {
            return cx.invalid(
                p.span().start,
                "telemetry.otlp_protocol",
                format!("{other:?} is not one of grpc, http/protobuf"),
            )
        }
    };
    Ok(TelemetryConfig {
        access_log: t.access_log,
        access_log_ratio: ratio.map_or(1.0, |r| *r.get_ref()),
        otlp_endpoint,
        otlp_protocol,
        sample_ratio: sample.map_or(1.0, |r| *r.get_ref()),
        service_name: t
            .service_name
            .as_ref()
            .map_or("fnmesh".into(), |s| s.get_ref().clone()),
    })
}

fn policy(cx: &Ctx<'_>, p: &Spanned<RawPolicy>, key: &str) -> Result<PolicyConfig, ConfigError> {
    let r = p.get_ref();
    if r.timeout == Some(Duration::ZERO) {
        return cx.invalid(
            p.span().start,
            format!("{key}.timeout"),
            "must be greater than zero",
        );
    }
    let rate_limit = match &r.rate_limit {
        Some(v) => Some(rate_limit(cx, v, &format!("{key}.rate_limit"))?),
        None => None,
    };
    let circuit_breaker = match &r.circuit_breaker {
        Some(v) => Some(circuit_breaker(cx, v, &format!("{key}.circuit_breaker"))?),
        None => None,
    };
    let retry = match &r.retry {
        Some(v) => Some(retry(cx, v, &format!("{key}.retry"))?),
        None => None,
    };
    Ok(PolicyConfig {
        timeout: r.timeout,
        rate_limit,
        circuit_breaker,
        retry,
        idempotent: r.idempotent.as_ref().map(|b| *b.get_ref()),
    })
}

/// A policy key's inline table (`{ ... }`, shaped like `example`) holding only `keys`, and where
/// it starts (for the line in errors).
fn policy_table<'v>(
    cx: &Ctx<'_>,
    v: &'v Spanned<toml::Value>,
    key: &str,
    keys: &[&str],
    example: &str,
) -> Result<(&'v toml::Table, usize), ConfigError> {
    let at = v.span().start;
    let Some(t) = v.get_ref().as_table() else {
        return cx.invalid(at, key, format!("must be a table: {example}"));
    };
    if let Some(other) = t.keys().find(|k| !keys.contains(&k.as_str())) {
        return cx.invalid(
            at,
            key,
            format!("unknown key {other:?} ({})", keys.join(", ")),
        );
    }
    Ok((t, at))
}

/// `{ attempts = 2, backoff = "10ms", on = ["connect"] }`; attempts 1-10, each key optional.
fn retry(cx: &Ctx<'_>, v: &Spanned<toml::Value>, key: &str) -> Result<Retry, ConfigError> {
    let (t, at) = policy_table(
        cx,
        v,
        key,
        &["attempts", "backoff", "on"],
        "{ attempts = 2, backoff = \"10ms\", on = [\"connect\"] }",
    )?;
    let mut r = Retry {
        attempts: 2,
        backoff: Duration::from_millis(10),
        on_connect: true,
        on_unavailable: false,
        on_timeout: false,
    };
    for (k, value) in t {
        let sub = format!("{key}.{k}");
        match k.as_str() {
            "attempts" => match value.as_integer() {
                Some(n) if (1..=10).contains(&n) => r.attempts = n as u32,
                _ => {
                    return cx.invalid(
                        at,
                        &sub,
                        "must be a whole number from 1 to 10 (tries in all)",
                    )
                }
            },
            "backoff" => match value.as_str().map(parse_duration) {
                Some(Ok(d)) if d <= Duration::from_secs(10) => r.backoff = d,
                Some(Ok(_)) => return cx.invalid(at, &sub, "must be at most 10s"),
                Some(Err(e)) => return cx.invalid(at, &sub, e),
                None => return cx.invalid(at, &sub, "must be a duration such as \"10ms\""),
            },
            "on" => {
                let Some(list) = value.as_array() else {
                    return cx.invalid(
                        at,
                        &sub,
                        "must be a list of \"connect\", \"unavailable\", \"timeout\"",
                    );
                };
                (r.on_connect, r.on_unavailable, r.on_timeout) = (false, false, false);
                for item in list {
                    match item.as_str() {
                        Some("connect") => r.on_connect = true,
                        Some("unavailable") => r.on_unavailable = true,
                        Some("timeout") => r.on_timeout = true,
                        _ => {
                            return cx.invalid(
                                at,
                                &sub,
                                format!(
                                "{item} is not one of \"connect\", \"unavailable\", \"timeout\""
                            ),
                            )
                        }
                    }
                }
            }
            // `policy_table` let no other key through.
            _ => {}
        }
    }
    Ok(r)
}

/// `{ window = "10s", min_requests = 20, failure_ratio = 0.5, open = "5s" }`, each optional.
fn circuit_breaker(
    cx: &Ctx<'_>,
    v: &Spanned<toml::Value>,
    key: &str,
) -> Result<CircuitBreaker, ConfigError> {
    let (t, at) = policy_table(
        cx,
        v,
        key,
        &["window", "min_requests", "failure_ratio", "open"],
        "{ window = \"10s\", min_requests = 20, failure_ratio = 0.5, open = \"5s\" }",
    )?;
    let mut b = CircuitBreaker::default();
    for (k, value) in t {
        let sub = format!("{key}.{k}");
        let duration = || match value.as_str().map(parse_duration) {
            Some(Ok(d)) if !d.is_zero() => Ok(d),
            Some(Ok(_)) => cx.invalid(at, &sub, "must be greater than zero"),
            Some(Err(e)) => cx.invalid(at, &sub, e),
            None => cx.invalid(at, &sub, "must be a duration such as \"10s\""),
        };
        match k.as_str() {
            "window" => b.window = duration()?,
            "open" => b.open = duration()?,
            "min_requests" => match value.as_integer() {
                Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => b.min_requests = n as u32,
                _ => return cx.invalid(at, &sub, "must be a whole number, at least 1"),
            },
            "failure_ratio" => match value.as_float().or(value.as_integer().map(|n| n as f64)) {
                Some(r) if r > 0.0 && r <= 1.0 => b.failure_ratio = r,
                _ => return cx.invalid(at, &sub, "must be a number in (0, 1]"),
            },
            // `policy_table` let no other key through.
            _ => {}
        }
    }
    Ok(b)
}

/// `{ rps = N, burst = M }`: rps a positive number, burst a positive integer.
fn rate_limit(cx: &Ctx<'_>, v: &Spanned<toml::Value>, key: &str) -> Result<RateLimit, ConfigError> {
    let (t, at) = policy_table(cx, v, key, &["rps", "burst"], "{ rps = 100, burst = 10 }")?;
    let rps = match t.get("rps") {
        Some(toml::Value::Integer(n)) => *n as f64,
        Some(toml::Value::Float(x)) => *x,
        Some(_) => return cx.invalid(at, format!("{key}.rps"), "must be a number"),
        None => return cx.invalid(at, format!("{key}.rps"), "is required"),
    };
    if !(rps.is_finite() && rps > 0.0 && rps <= 1e9) {
        return cx.invalid(
            at,
            format!("{key}.rps"),
            format!("{rps} is not between 0 (excluded) and 1e9"),
        );
    }
    let burst = match t.get("burst") {
        Some(toml::Value::Integer(n)) if (1..=i64::from(u32::MAX)).contains(n) => *n as u32,
        Some(_) => {
            return cx.invalid(
                at,
                format!("{key}.burst"),
                "must be a whole number of calls, at least 1",
            )
        }
        None => rps.ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
    };
    Ok(RateLimit { rps, burst })
}

/// What a function and a `[[service]]` both declare: name, protocol, IDL and policy.
struct Interface<'r> {
    name: &'r Spanned<String>,
    protocol: &'r Spanned<String>,
    idl: Option<&'r Spanned<String>>,
    service: Option<&'r Spanned<String>>,
    policy: Option<&'r Spanned<RawPolicy>>,
    method: &'r BTreeMap<String, Spanned<RawPolicy>>,
}

/// The types of `r`'s IDL, for JSON calls: a `.thrift` file's schema or a `.proto` file's
/// descriptors.
#[allow(clippy::type_complexity)]
fn typed_idl(
    cx: &Ctx<'_>,
    r: &Interface<'_>,
    base: &Path,
    key: &dyn Fn(&str) -> String,
) -> Result<
    (
        Option<std::sync::Arc<fnmesh_idl::schema::Schema>>,
        Option<std::sync::Arc<fnmesh_idl::proto_json::ProtoSchema>>,
    ),
    ConfigError,
> {
    let schema = match r.idl {
        Some(idl) if idl.get_ref().ends_with(".thrift") => {
            let path = base.join(idl.get_ref());
            let schema = fnmesh_idl::Catalog::thrift_schema(&path, &[])
                .or_else(|e| cx.invalid(idl.span().start, key("idl"), e.to_string()))?;
            Some(std::sync::Arc::new(schema))
        }
        _ => None,
    };
    let proto = match r.idl {
        Some(idl) if idl.get_ref().ends_with(".proto") => {
            let path = base.join(idl.get_ref());
            let proto = fnmesh_idl::proto_json::ProtoSchema::load(&path, &[])
                .or_else(|e| cx.invalid(idl.span().start, key("idl"), e.to_string()))?;
            Some(std::sync::Arc::new(proto))
        }
        _ => None,
    };
    Ok((schema, proto))
}

/// An [`Interface`] checked, as a configuration with no command, scale or environment yet.
fn interface(
    cx: &Ctx<'_>,
    table: &str,
    r: &Interface<'_>,
    base: &Path,
) -> Result<FunctionConfig, ConfigError> {
    let name = r.name.get_ref().clone();
    let key = |k: &str| format!("{table}[{name}].{k}");
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid_name {
        return cx.invalid(
            r.name.span().start,
            format!("{table}.name"),
            format!("{name:?}: use letters, digits, '-', '_' or '.'"),
        );
    }
    let protocol = match r.protocol.get_ref().as_str() {
        "thrift" => Protocol::Thrift,
        "grpc" => Protocol::Grpc,
        other => {
            return cx.invalid(
                r.protocol.span().start,
                key("protocol"),
                format!("{other:?} is not one of thrift, grpc"),
            )
        }
    };
    let (service, methods) = match r.idl {
        Some(idl) => {
            let path = base.join(idl.get_ref());
            let catalog = fnmesh_idl::Catalog::load(&path, &[])
                .or_else(|e| cx.invalid(idl.span().start, key("idl"), e.to_string()))?;
            let wanted = r.service.map(|s| s.get_ref().as_str());
            let svc = catalog.select(wanted).or_else(|e| {
                cx.invalid(
                    r.service.unwrap_or(idl).span().start,
                    key("service"),
                    e.to_string(),
                )
            })?;
            (Some(svc.name.clone()), Some(svc.methods.clone()))
        }
        None => (r.service.map(|s| s.get_ref().clone()), None),
    };
    let (schema, proto) = typed_idl(cx, r, base, &key)?;
    let policy_cfg = match r.policy {
        Some(p) => policy(cx, p, &key("policy"))?,
        None => PolicyConfig::default(),
    };
    let mut methods_policy = BTreeMap::new();
    for (m, p) in r.method {
        if let Some(ms) = &methods {
            if ms.iter().all(|x| &x.name != m) {
                return cx.invalid(
                    p.span().start,
                    key(&format!("method.{m}")),
                    "the IDL declares no such method",
                );
            }
        }
        methods_policy.insert(m.clone(), policy(cx, p, &key(&format!("method.{m}")))?);
    }
    Ok(FunctionConfig {
        name,
        protocol,
        transport: Transport::Tcp,
        service,
        methods,
        schema,
        proto,
        thrift_protocol: Default::default(),
        async_policy: Default::default(),
        triggers: Vec::new(),
        command: Vec::new(),
        env: BTreeMap::new(),
        scale: ScaleConfig::default(),
        policy: policy_cfg,
        methods_policy,
        remote: false,
    })
}

fn function(
    cx: &Ctx<'_>,
    f: &Spanned<RawFunction>,
    base: &Path,
) -> Result<FunctionConfig, ConfigError> {
    let r = f.get_ref();
    let i = Interface {
        name: &r.name,
        protocol: &r.protocol,
        idl: r.idl.as_ref(),
        service: r.service.as_ref(),
        policy: r.policy.as_ref(),
        method: &r.method,
    };
    let mut config = interface(cx, "function", &i, base)?;
    let name = config.name.clone();
    let key = |k: &str| format!("function[{name}].{k}");
    config.transport = transport(cx, r, &key)?;
    config.thrift_protocol = thrift_protocol(cx, r, config.protocol, &key)?;
    config.command = command(cx, f, base, &key)?;
    config.scale = scale(cx, f, &key)?;
    config.env = r.env.clone();
    Ok(config)
}

/// A `[[service]]`: what egress calls to it follow. Nothing is started for it: each endpoint
/// the registry lists takes up to `REMOTE_IN_FLIGHT` calls, and as many more may wait.
fn service(
    cx: &Ctx<'_>,
    s: &Spanned<RawService>,
    base: &Path,
) -> Result<FunctionConfig, ConfigError> {
    let r = s.get_ref();
    let i = Interface {
        name: &r.name,
        protocol: &r.protocol,
        idl: r.idl.as_ref(),
        service: r.service.as_ref(),
        policy: r.policy.as_ref(),
        method: &r.method,
    };
    let mut config = interface(cx, "service", &i, base)?;
    config.remote = true;
    config.scale = super::remote_scale();
    let defaults = super::remote_policy();
    let p = &mut config.policy;
    p.timeout = p.timeout.or(defaults.timeout);
    p.retry = p.retry.or(defaults.retry);
    Ok(config)
}

/// `transport`: `tcp` (the default) or `unix`.
fn transport(
    cx: &Ctx<'_>,
    r: &RawFunction,
    key: &dyn Fn(&str) -> String,
) -> Result<Transport, ConfigError> {
    match r
        .transport
        .as_ref()
        .map(|t| (t.get_ref().as_str(), t.span().start))
    {
        None | Some(("tcp", _)) => Ok(Transport::Tcp),
        Some(("unix", _)) => Ok(Transport::Unix),
        Some((other, at)) => cx.invalid(
            at,
            key("transport"),
            format!("{other:?} is not one of tcp, unix"),
        ),
    }
}

/// `thrift_protocol`: `binary` (the default) or `compact`, for a Thrift function only.
fn thrift_protocol(
    cx: &Ctx<'_>,
    r: &RawFunction,
    protocol: Protocol,
    key: &dyn Fn(&str) -> String,
) -> Result<fnmesh_idl::thrift_json::Protocol, ConfigError> {
    use fnmesh_idl::thrift_json::Protocol as Thrift;
    let Some(p) = &r.thrift_protocol else {
        return Ok(Thrift::Binary);
    };
    let at = p.span().start;
    match (protocol, p.get_ref().as_str()) {
        (Protocol::Grpc, _) => cx.invalid(at, key("thrift_protocol"), "a gRPC function has none"),
        (_, "binary") => Ok(Thrift::Binary),
        (_, "compact") => Ok(Thrift::Compact),
        (_, other) => cx.invalid(
            at,
            key("thrift_protocol"),
            format!("{other:?} is not one of binary, compact"),
        ),
    }
}

/// `command`: argv, never a shell. A relative program with a '/' is taken from the config
/// file's directory; a bare name is looked up in PATH.
fn command(
    cx: &Ctx<'_>,
    f: &Spanned<RawFunction>,
    base: &Path,
    key: &dyn Fn(&str) -> String,
) -> Result<Vec<String>, ConfigError> {
    let r = f.get_ref();
    let Some(program) = r.command.get_ref().first() else {
        return cx.invalid(
            r.command.span().start,
            key("command"),
            "must name a program",
        );
    };
    let resolved = resolve_program(program, base).ok_or(()).or_else(|_| {
        cx.invalid(
            r.command.span().start,
            key("command"),
            format!("program {program:?} not found or not executable"),
        )
    })?;
    let mut command = r.command.get_ref().clone();
    command[0] = resolved.display().to_string();

    Ok(command)
}

/// `[function.scale]`, checked: at least one instance and one call each, min <= max.
fn scale(
    cx: &Ctx<'_>,
    f: &Spanned<RawFunction>,
    key: &dyn Fn(&str) -> String,
) -> Result<ScaleConfig, ConfigError> {
    let r = f.get_ref();
    let scale = r.scale.as_ref().map(|s| *s.get_ref()).unwrap_or_default();
    let scale_at = r.scale.as_ref().map_or(f.span().start, |s| s.span().start);
    if scale.max == 0 {
        return cx.invalid(scale_at, key("scale.max"), "must be at least 1");
    }
    if scale.min > scale.max {
        return cx.invalid(
            scale_at,
            key("scale.min"),
            format!("min ({}) is greater than max ({})", scale.min, scale.max),
        );
    }
    if scale.concurrency == 0 {
        return cx.invalid(scale_at, key("scale.concurrency"), "must be at least 1");
    }
    if scale.startup_timeout.is_zero() {
        return cx.invalid(
            scale_at,
            key("scale.startup_timeout"),
            "must be greater than zero",
        );
    }
    Ok(scale)
}

fn resolve_program(program: &str, base: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    let p = Path::new(program);
    if p.is_absolute() {
        return executable(p).then(|| p.to_path_buf());
    }
    if program.contains('/') {
        let joined = base.join(p);
        return executable(&joined).then_some(joined);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|c| executable(c))
}
