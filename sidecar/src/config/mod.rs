//! The mesh policy file (`fnmesh.toml`), deserialized once into typed structs (`raw`), then
//! validated (`validate`). Every error names the key and the line. This file holds what the rest
//! of the sidecar reads: the validated configuration.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::Deserialize;

mod ctx;
mod queue;
mod raw;
mod validate;

pub use raw::{parse_duration, parse_size};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub sidecar: SidecarConfig,
    pub discovery: DiscoveryConfig,
    pub functions: Vec<FunctionConfig>,
    /// `[[service]]`: services egress calls reach through the registry (`remote` set).
    pub services: Vec<FunctionConfig>,
    pub telemetry: TelemetryConfig,
    /// `[async]`: async invocations and queue triggers; none without the table.
    pub queue: Option<AsyncConfig>,
}

/// `[async]`: where NATS JetStream is, and how async calls are kept and retried
/// (docs/async.md).
#[derive(Debug, Clone, PartialEq)]
pub struct AsyncConfig {
    /// The NATS server (`nats://host:port`).
    pub nats: String,
    /// How long a call's status is kept.
    pub retention: Duration,
    /// A message not heard from for this long is delivered again.
    pub ack_wait: Duration,
}

/// How a function's async calls are consumed and retried (`[async]`, overridden by
/// `[function.async]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncPolicy {
    /// Calls in flight per node (per function; per trigger).
    pub concurrency: usize,
    /// Attempts, the first included.
    pub max_attempts: u32,
    /// Before the second attempt; doubling up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for AsyncPolicy {
    fn default() -> Self {
        AsyncPolicy {
            concurrency: 16,
            max_attempts: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl AsyncPolicy {
    /// The wait before attempt `next` (2 or more): `backoff`, doubled for each attempt after
    /// the second, at most `max_backoff`.
    pub fn delay(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(30);
        self.backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }
}

/// What a queue message holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// The call's JSON, as the gateway takes it.
    Json,
    /// The bytes of the method's only argument (`binary` / `bytes`).
    Raw,
}

/// `[[function.trigger]]`: each message on `subject` calls `method`.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerConfig {
    pub subject: String,
    pub method: String,
    pub payload: Payload,
    /// Deliveries before the message is dead-lettered; its retries wait `policy.delay`.
    pub policy: AsyncPolicy,
    /// For `Raw`: the argument (Thrift) or field (proto) the bytes go in.
    pub raw_field: Option<String>,
}

/// How spans leave the sidecar: OTLP over gRPC, or over HTTP with protobuf bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// `[telemetry]`: the access log (JSON lines on stdout) and span export over OTLP, both off by
/// default.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    pub access_log: bool,
    /// The share of calls logged, in (0, 1].
    pub access_log_ratio: f64,
    /// Where spans go (`http://host:port`); none: no spans.
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    /// The share of root spans sampled, in [0, 1]; a caller's sampled flag decides for its
    /// calls.
    pub sample_ratio: f64,
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            access_log: false,
            access_log_ratio: 1.0,
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            sample_ratio: 1.0,
            service_name: "fnmesh".into(),
        }
    }
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
    /// A Consul agent at `address` (`http://host:port` or `https://host:port`), with an ACL
    /// token (`token`, else `CONSUL_HTTP_TOKEN`) when it enforces ACLs.
    Consul {
        address: String,
        token: Option<String>,
        tls: fnmesh_discovery::Tls,
    },
    /// An etcd cluster at `endpoints`, keys under `prefix`, as user `(name, password)` when
    /// the cluster has auth on (`username` and `password`, else `ETCDCTL_USER` as
    /// `name:password`).
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        user: Option<(String, String)>,
        tls: fnmesh_discovery::Tls,
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
    /// The egress listener for the functions' own calls (`FNMESH_EGRESS`); none: no egress.
    pub egress: Option<SocketAddr>,
    pub drain_timeout: Duration,
    pub max_frame_size: usize,
    /// Threads serving connections, each with its own single-threaded runtime (default: one per
    /// CPU).
    pub workers: usize,
    /// How long a worker keeps polling for events after its last one instead of sleeping
    /// (zero: never). Waking a sleeping CPU costs tens of microseconds on a VM.
    pub busy_poll: Duration,
    /// What one caller connection may hold, and for how long.
    pub connections: ConnectionLimits,
}

/// `[sidecar]` limits on caller connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Caller connections open at once; more are closed at accept.
    pub max: usize,
    /// How long a started frame may take to arrive whole.
    pub header_timeout: Duration,
    /// How long a connection with no call in flight stays open (zero: for ever).
    pub idle_timeout: Duration,
    /// Bytes of requests in flight and replies not yet written a connection may hold before
    /// it is no longer read (until its caller reads).
    pub buffer: usize,
}

impl ConnectionLimits {
    /// How often connections check these timeouts: a quarter of the shorter, so a stall is seen
    /// within a quarter past its timeout.
    pub fn sweep_every(&self) -> Duration {
        let shortest = match self.idle_timeout.is_zero() {
            true => self.header_timeout,
            false => self.header_timeout.min(self.idle_timeout),
        };
        (shortest / 4).max(Duration::from_millis(10))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Thrift,
    Grpc,
}

/// How the sidecar reaches a function's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// TCP on 127.0.0.1:$PORT.
    #[default]
    Tcp,
    /// A Unix socket at $FNMESH_SOCKET, in a directory only the sidecar's user can write.
    Unix,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FunctionConfig {
    pub name: String,
    pub protocol: Protocol,
    pub transport: Transport,
    /// The IDL service clients name (Thrift `isn`), from `service` or the IDL's only service.
    pub service: Option<String>,
    /// Methods the IDL declares; `None` without an IDL (then every method is routed).
    pub methods: Option<Vec<fnmesh_idl::Method>>,
    /// A `.thrift` IDL's types, for JSON calls (the HTTP gateway).
    pub schema: Option<std::sync::Arc<fnmesh_idl::schema::Schema>>,
    /// A `.proto` IDL's descriptors, for JSON calls (`fnmesh call`).
    pub proto: Option<std::sync::Arc<fnmesh_idl::proto_json::ProtoSchema>>,
    /// The Thrift protocol of the calls fnmesh builds from JSON (`thrift_protocol`; binary
    /// calls are forwarded in whatever protocol their caller chose).
    pub thrift_protocol: fnmesh_idl::thrift_json::Protocol,
    /// The program and its arguments, the program resolved to a path that exists.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub scale: ScaleConfig,
    pub policy: PolicyConfig,
    /// Per-method overrides.
    pub methods_policy: BTreeMap<String, PolicyConfig>,
    /// Async calls (`[async]` and `[function.async]`).
    pub async_policy: AsyncPolicy,
    /// `[[function.trigger]]`s.
    pub triggers: Vec<TriggerConfig>,
    /// A service in the registry (`[[service]]`, or one an egress call named): its endpoints
    /// come from the registry, nothing is started (`command` is empty, `scale` bounds the
    /// calls on each endpoint and the queue).
    pub remote: bool,
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
    #[serde(default = "default_idle", deserialize_with = "raw::duration")]
    pub idle: Duration,
    #[serde(default = "default_startup", deserialize_with = "raw::duration")]
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

/// Calls in flight on one endpoint of a service in the registry before more wait (Envoy's
/// default for a cluster's requests is 1024).
pub const REMOTE_IN_FLIGHT: usize = 1024;

/// What bounds calls to a service in the registry: [`REMOTE_IN_FLIGHT`] per endpoint, a queue
/// of as many; nothing is started (`max` 0).
pub fn remote_scale() -> ScaleConfig {
    ScaleConfig {
        min: 0,
        max: 0,
        concurrency: REMOTE_IN_FLIGHT,
        queue: REMOTE_IN_FLIGHT,
        ..ScaleConfig::default()
    }
}

/// The policy of a service in the registry, for the keys its `[[service]]` leaves unset (or
/// with no entry): Envoy's default route timeout, 15 s, and one more try on another endpoint
/// when a call could not reach one (always safe: the endpoint never got it).
pub fn remote_policy() -> PolicyConfig {
    PolicyConfig {
        timeout: Some(Duration::from_secs(15)),
        retry: Some(Retry {
            attempts: 2,
            backoff: Duration::from_millis(5),
            on_connect: true,
            on_unavailable: false,
            on_timeout: false,
        }),
        ..PolicyConfig::default()
    }
}

/// A service egress calls reach through the registry, with no `[[service]]` entry.
pub fn discovered_service(name: &str, protocol: Protocol) -> FunctionConfig {
    FunctionConfig {
        name: name.to_owned(),
        protocol,
        transport: Transport::Tcp,
        service: None,
        methods: None,
        schema: None,
        proto: None,
        thrift_protocol: Default::default(),
        async_policy: AsyncPolicy::default(),
        triggers: Vec::new(),
        command: Vec::new(),
        env: BTreeMap::new(),
        scale: remote_scale(),
        policy: remote_policy(),
        methods_policy: BTreeMap::new(),
        remote: true,
    }
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

    pub fn is_oneway(&self, method: &str) -> bool {
        self.methods
            .as_ref()
            .is_some_and(|ms| ms.iter().any(|m| m.name == method && m.oneway))
    }
}

#[cfg(test)]
mod tests;
