//! The mesh policy file (`fnmesh.toml`), deserialized once into typed structs, then validated.
//! Every error names the key and the line.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de, Deserialize, Deserializer};
use toml::Spanned;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub sidecar: SidecarConfig,
    pub discovery: DiscoveryConfig,
    pub functions: Vec<FunctionConfig>,
}

/// `[discovery]`: where the sidecar registers its functions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    pub backend: DiscoveryBackend,
    /// A registration's time to live: renewed every third of it (Consul TTL check, etcd lease).
    pub ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryBackend {
    /// Registered in the process only: nothing external needed.
    None,
    /// A Consul agent at `address` (`http://host:port`).
    Consul { address: String },
    /// An etcd cluster at `endpoints`, keys under `prefix`.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            backend: DiscoveryBackend::None,
            ttl: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub advertise: SocketAddr,
    pub drain_timeout: Duration,
    pub max_frame_size: usize,
    /// Threads serving connections, each with its own single-threaded runtime (default: one per
    /// CPU).
    pub workers: usize,
    /// How long a worker keeps polling for events after its last one instead of sleeping
    /// (zero: never). Waking a sleeping CPU costs tens of microseconds on a VM.
    pub busy_poll: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Thrift,
    Grpc,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FunctionConfig {
    pub name: String,
    pub protocol: Protocol,
    /// The IDL service clients name (Thrift `isn`), from `service` or the IDL's only service.
    pub service: Option<String>,
    /// Methods the IDL declares; `None` without an IDL (then every method is routed).
    pub methods: Option<Vec<fnmesh_idl::Method>>,
    /// The program and its arguments, the program resolved to a path that exists.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub scale: ScaleConfig,
    pub policy: PolicyConfig,
    /// Per-method overrides.
    pub methods_policy: BTreeMap<String, PolicyConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    #[serde(default)]
    pub min: usize,
    #[serde(default = "default_max")]
    pub max: usize,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_idle", deserialize_with = "duration")]
    pub idle: Duration,
    #[serde(default = "default_startup", deserialize_with = "duration")]
    pub startup_timeout: Duration,
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_max() -> usize {
    8
}
fn default_concurrency() -> usize {
    32
}
fn default_idle() -> Duration {
    Duration::from_secs(30)
}
fn default_startup() -> Duration {
    Duration::from_secs(10)
}
fn default_queue() -> usize {
    1024
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            min: 0,
            max: default_max(),
            concurrency: default_concurrency(),
            idle: default_idle(),
            startup_timeout: default_startup(),
            queue: default_queue(),
        }
    }
}

/// Governance for a function or one of its methods.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PolicyConfig {
    /// Bounds the whole call, queueing included; the caller's shorter deadline wins.
    pub timeout: Option<Duration>,
    /// Calls admitted per second, with bursts (token bucket); past it calls are answered
    /// `overloaded` without touching an instance.
    pub rate_limit: Option<RateLimit>,
    /// Per method: fail fast with `circuit-open` while the method keeps failing.
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Tries a call again on another instance when it failed in a way `retry.on` names.
    pub retry: Option<Retry>,
    /// The method may safely run twice: only then do `unavailable` and `timeout` retry.
    pub idempotent: Option<bool>,
}

/// `retry = { attempts = 2, backoff = "10ms", on = ["connect"] }`: `attempts` tries in all
/// (the first included), `backoff` doubling between them with jitter (0.5x to 1.5x).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retry {
    pub attempts: u32,
    pub backoff: Duration,
    /// The call never reached an instance (connect refused, write failed): always safe.
    pub on_connect: bool,
    /// The instance failed after receiving it (crashed, closed, malformed reply): idempotent only.
    pub on_unavailable: bool,
    /// An attempt ran out of its share of the budget: idempotent only.
    pub on_timeout: bool,
}

/// `circuit_breaker = { window, min_requests, failure_ratio, open }`: opens when, over the last
/// `window`, at least `min_requests` calls ended and at least `failure_ratio` of them failed;
/// stays open for `open`, then lets trial calls through and closes on their success.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CircuitBreaker {
    pub window: Duration,
    pub min_requests: u32,
    pub failure_ratio: f64,
    pub open: Duration,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            window: Duration::from_secs(10),
            min_requests: 20,
            failure_ratio: 0.5,
            open: Duration::from_secs(5),
        }
    }
}

/// `rate_limit = { rps, burst }`: `rps` calls per second on average, up to `burst` at once
/// (default: one second's worth, at least 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub rps: f64,
    pub burst: u32,
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

// ---- The file as written -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    sidecar: Spanned<RawSidecar>,
    #[serde(default)]
    discovery: Option<Spanned<RawDiscovery>>,
    #[serde(default)]
    function: Vec<Spanned<RawFunction>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSidecar {
    listen: Spanned<String>,
    admin: Option<Spanned<String>>,
    advertise: Option<Spanned<String>>,
    #[serde(default = "default_drain", deserialize_with = "duration")]
    drain_timeout: Duration,
    #[serde(default = "default_frame", deserialize_with = "size")]
    max_frame_size: usize,
    workers: Option<Spanned<usize>>,
    #[serde(default = "default_busy_poll", deserialize_with = "busy_poll")]
    busy_poll: Duration,
    /// Removed: gRPC is served by fnmesh's relay only. Kept here so that a file still setting it
    /// gets an error naming the key and its line rather than serde's "unknown field".
    grpc_engine: Option<Spanned<toml::Value>>,
}

fn default_drain() -> Duration {
    Duration::from_secs(10)
}
fn default_busy_poll() -> Duration {
    Duration::from_micros(50)
}
fn default_frame() -> usize {
    fnmesh_codec::Limits::DEFAULT_MAX_FRAME_SIZE
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    backend: Spanned<String>,
    address: Option<Spanned<String>>,
    endpoints: Option<Spanned<Vec<String>>>,
    prefix: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "opt_duration")]
    ttl: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    name: Spanned<String>,
    protocol: Spanned<String>,
    idl: Option<Spanned<String>>,
    service: Option<Spanned<String>>,
    command: Spanned<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    scale: Option<Spanned<ScaleConfig>>,
    #[serde(default)]
    policy: Option<Spanned<RawPolicy>>,
    #[serde(default)]
    method: BTreeMap<String, Spanned<RawPolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default, deserialize_with = "opt_duration")]
    timeout: Option<Duration>,
    rate_limit: Option<Spanned<toml::Value>>,
    circuit_breaker: Option<Spanned<toml::Value>>,
    retry: Option<Spanned<toml::Value>>,
    idempotent: Option<Spanned<bool>>,
}

// ---- Value parsers ---------------------------------------------------------------------------

/// `500ms`, `10s`, `1m`, `1h`, `250us`; fractions allowed (`1.5s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("bad duration {text:?}: use a number and a unit, e.g. 500ms, 10s, 1m")
    })?;
    let scale = match unit.trim() {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "bad duration {text:?}: unit must be one of us, ms, s, m, h"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("bad duration {text:?}: too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `16MiB`, `512KiB`, `1GiB`, `64KB`, `1MB`, or a plain byte count.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("bad size {text:?}: use e.g. 16MiB, 512KiB or a byte count"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "bad size {text:?}: unit must be one of B, KiB, MiB, GiB, KB, MB, GB"
            ))
        }
    };
    let bytes = value
        .checked_mul(scale)
        .filter(|b| *b <= u64::from(u32::MAX))
        .ok_or_else(|| format!("bad size {text:?}: over 4 GiB"))?;
    Ok(bytes as usize)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(de::Error::custom)
}

/// At most 1 ms: longer windows keep a CPU busy for no measurable latency gain.
fn busy_poll<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = duration(d)?;
    if v > Duration::from_millis(1) {
        return Err(de::Error::custom(format!(
            "busy_poll {v:?} is over 1ms (0s turns busy polling off)"
        )));
    }
    Ok(v)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let s = String::deserialize(d)?;
    parse_size(&s).map_err(de::Error::custom)
}

// ---- Loading and validation ------------------------------------------------------------------

/// `[discovery]`, checked: a known backend with an `http://` address, keys only for it.
fn discovery(cx: &Ctx<'_>, d: &Spanned<RawDiscovery>) -> Result<DiscoveryConfig, ConfigError> {
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
    let http = |v: &Spanned<String>, key: &str| -> Result<String, ConfigError> {
        let s = v.get_ref();
        match s.strip_prefix("http://") {
            Some(rest)
                if !rest.trim_end_matches('/').is_empty()
                    && !rest.trim_end_matches('/').contains('/') =>
            {
                Ok(s.clone())
            }
            _ => cx.invalid(
                v.span().start,
                key,
                format!("{s:?} is not http://host:port"),
            ),
        }
    };
    // Which keys each backend takes: any other one set is an error.
    let name = backend.get_ref().as_str();
    let takes: &[&str] = match name {
        "consul" => &["address"],
        "etcd" => &["endpoints", "prefix"],
        _ => &[],
    };
    let set = [
        ("address", raw.address.as_ref().map(|a| a.span().start)),
        ("endpoints", raw.endpoints.as_ref().map(|e| e.span().start)),
        ("prefix", raw.prefix.as_ref().map(|p| p.span().start)),
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
    let backend = match name {
        "none" => DiscoveryBackend::None,
        "consul" => {
            let address = match &raw.address {
                Some(a) => http(a, "discovery.address")?,
                None => "http://127.0.0.1:8500".to_owned(),
            };
            DiscoveryBackend::Consul { address }
        }
        "etcd" => {
            let endpoints = match &raw.endpoints {
                Some(list) if list.get_ref().is_empty() => {
                    return cx.invalid(list.span().start, "discovery.endpoints", "is empty")
                }
                Some(list) => {
                    let mut out = Vec::new();
                    for e in list.get_ref() {
                        let spanned = Spanned::new(list.span(), e.clone());
                        out.push(http(&spanned, "discovery.endpoints")?);
                    }
                    out
                }
                None => vec!["http://127.0.0.1:2379".to_owned()],
            };
            let prefix = raw
                .prefix
                .as_ref()
                .map_or("kitex/registry-etcd".to_owned(), |p| p.get_ref().clone());
            DiscoveryBackend::Etcd { endpoints, prefix }
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

struct Ctx<'a> {
    path: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, at: usize) -> usize {
        self.text[..at.min(self.text.len())].matches('\n').count() + 1
    }

    fn invalid<T>(
        &self,
        at: usize,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            path: self.path.to_owned(),
            line: self.line(at),
            key: key.into(),
            message: message.into(),
        })
    }

    fn addr(&self, v: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        v.get_ref().parse().or_else(|_| {
            self.invalid(
                v.span().start,
                key,
                format!("{:?} is not an ip:port address", v.get_ref()),
            )
        })
    }
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
        let cx = Ctx { path, text };
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
            Some(d) => discovery(&cx, d)?,
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
        let mut functions: Vec<FunctionConfig> = Vec::new();
        for f in &raw.function {
            let fc = function(&cx, f, base)?;
            if functions.iter().any(|o| o.name == fc.name) {
                return cx.invalid(
                    f.get_ref().name.span().start,
                    "function.name",
                    format!("{:?} is configured twice", fc.name),
                );
            }
            functions.push(fc);
        }
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
        Ok(Config {
            discovery,
            sidecar: SidecarConfig {
                listen,
                admin,
                advertise,
                drain_timeout: s.drain_timeout,
                max_frame_size: s.max_frame_size,
                workers,
                busy_poll: s.busy_poll,
            },
            functions,
        })
    }
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

fn function(
    cx: &Ctx<'_>,
    f: &Spanned<RawFunction>,
    base: &Path,
) -> Result<FunctionConfig, ConfigError> {
    let r = f.get_ref();
    let name = r.name.get_ref().clone();
    let key = |k: &str| format!("function[{name}].{k}");
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid_name {
        return cx.invalid(
            r.name.span().start,
            "function.name",
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
    let command = command(cx, f, base, &key)?;
    let scale = scale(cx, f, &key)?;

    let (service, methods) = match &r.idl {
        Some(idl) => {
            let path = base.join(idl.get_ref());
            let catalog = fnmesh_idl::Catalog::load(&path, &[])
                .or_else(|e| cx.invalid(idl.span().start, key("idl"), e.to_string()))?;
            let wanted = r.service.as_ref().map(|s| s.get_ref().as_str());
            let svc = catalog.select(wanted).or_else(|e| {
                cx.invalid(
                    r.service.as_ref().unwrap_or(idl).span().start,
                    key("service"),
                    e.to_string(),
                )
            })?;
            (Some(svc.name.clone()), Some(svc.methods.clone()))
        }
        None => (r.service.as_ref().map(|s| s.get_ref().clone()), None),
    };

    let policy_cfg = match &r.policy {
        Some(p) => policy(cx, p, &key("policy"))?,
        None => PolicyConfig::default(),
    };
    let mut methods_policy = BTreeMap::new();
    for (m, p) in &r.method {
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
        service,
        methods,
        command,
        env: r.env.clone(),
        scale,
        policy: policy_cfg,
        methods_policy,
    })
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

impl FunctionConfig {
    /// The policy for `method`: its override where one is set, else the function's.
    pub fn policy_for(&self, method: &str) -> PolicyConfig {
        let mut p = self.policy;
        if let Some(m) = self.methods_policy.get(method) {
            if m.timeout.is_some() {
                p.timeout = m.timeout;
            }
            if m.rate_limit.is_some() {
                p.rate_limit = m.rate_limit;
            }
            if m.circuit_breaker.is_some() {
                p.circuit_breaker = m.circuit_breaker;
            }
            if m.retry.is_some() {
                p.retry = m.retry;
            }
            if m.idempotent.is_some() {
                p.idempotent = m.idempotent;
            }
        }
        p
    }

    /// Whether the IDL (if any) declares `method`.
    pub fn has_method(&self, method: &str) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|ms| ms.iter().any(|m| m.name == method))
    }

    /// Whether the IDL declares `method` client streaming (unknown without an IDL).
    pub fn is_client_streaming(&self, method: &str) -> Option<bool> {
        self.methods
            .as_ref()
            .map(|ms| ms.iter().any(|m| m.name == method && m.client_streaming))
    }

    pub fn is_oneway(&self, method: &str) -> bool {
        self.methods
            .as_ref()
            .is_some_and(|ms| ms.iter().any(|m| m.name == method && m.oneway))
    }
}

#[cfg(test)]
mod tests;
