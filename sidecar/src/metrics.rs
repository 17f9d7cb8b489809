//! Prometheus metrics (`GET /metrics` on the admin listener), with the `prometheus-client` crate.
//! A call's counters and histogram are looked up once per function and method ([`CallMetrics`],
//! kept with the function's policy), so the request path only adds to atomics and one
//! histogram. What can be read when scraped instead (instances, calls in flight and queued,
//! breaker states, connections, the registry) is not counted on the request path at all: the
//! admin listener reads it then ([`Scraped`]). Request latency has its own histogram
//! ([`Latency`]): prometheus-client's takes a mutex and scans its buckets on every observation,
//! and keeps its buckets to itself, which `fnmesh status` needs for its one-minute quantiles.
//! A method's call counters ([`Calls`]) and histogram are not exposed while zero, so that many
//! idle functions do not fill every scrape.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc, Mutex, OnceLock,
};

use prometheus_client::{
    encoding::{text, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::error::Kind;

/// Now, in nanoseconds of the monotonic clock (`std::time::Instant`'s clock): a plain number,
/// so that a call's latency is a subtraction, where `Instant` normalises and checks a
/// `timespec` on every read and every difference.
#[inline]
pub fn now_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(t.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// How a call ended, as `fnmesh_requests_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The function answered with a success.
    Ok,
    /// A business outcome: a declared IDL exception, a TApplicationException other than
    /// UNKNOWN and INTERNAL_ERROR, or a gRPC status that is not a failure.
    Exception,
    /// The instance's own failure (TApplicationException UNKNOWN or INTERNAL_ERROR; gRPC
    /// UNKNOWN, DEADLINE_EXCEEDED, INTERNAL or UNAVAILABLE; a reply that cannot be read).
    Failed,
    /// fnmesh answered with this error.
    Error(Kind),
}

/// Every outcome, in the order of [`Outcome::index`].
const OUTCOMES: [Outcome; 11] = [
    Outcome::Ok,
    Outcome::Exception,
    Outcome::Failed,
    Outcome::Error(Kind::NoRoute),
    Outcome::Error(Kind::BadRequest),
    Outcome::Error(Kind::TooLarge),
    Outcome::Error(Kind::Overloaded),
    Outcome::Error(Kind::CircuitOpen),
    Outcome::Error(Kind::Unavailable),
    Outcome::Error(Kind::Timeout),
    Outcome::Error(Kind::NotWarm),
];

impl Outcome {
    fn index(self) -> usize {
        match self {
            Outcome::Ok => 0,
            Outcome::Exception => 1,
            Outcome::Failed => 2,
            Outcome::Error(Kind::NoRoute) => 3,
            Outcome::Error(Kind::BadRequest) => 4,
            Outcome::Error(Kind::TooLarge) => 5,
            Outcome::Error(Kind::Overloaded) => 6,
            Outcome::Error(Kind::CircuitOpen) => 7,
            Outcome::Error(Kind::Unavailable) => 8,
            Outcome::Error(Kind::Timeout) => 9,
            Outcome::Error(Kind::NotWarm) => 10,
        }
    }

    /// The `outcome` label: `ok`, `exception`, `failed`, or the error kind with `_` for `-`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Exception => "exception",
            Outcome::Failed => "failed",
            Outcome::Error(Kind::NoRoute) => "no_route",
            Outcome::Error(Kind::BadRequest) => "bad_request",
            Outcome::Error(Kind::TooLarge) => "too_large",
            Outcome::Error(Kind::Overloaded) => "overloaded",
            Outcome::Error(Kind::CircuitOpen) => "circuit_open",
            Outcome::Error(Kind::Unavailable) => "unavailable",
            Outcome::Error(Kind::Timeout) => "timeout",
            Outcome::Error(Kind::NotWarm) => "not_warm",
        }
    }

    /// Whether it counts against the function (for breakers and ejection).
    pub fn is_failure(self) -> bool {
        match self {
            Outcome::Ok | Outcome::Exception => false,
            Outcome::Failed => true,
            Outcome::Error(kind) => kind.is_failure(),
        }
    }
}

/// The method label of a method the IDL does not declare (or past [`MAX_UNDECLARED`] names of a
/// function without an IDL): label values stay bounded whatever callers send.
pub const UNKNOWN: &str = "unknown";
/// How many method names of a function without an IDL get their own label.
pub const MAX_UNDECLARED: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    function: String,
    method: String,
    protocol: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    function: String,
    method: String,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    pub function: String,
}

/// A queue feed: the function, and `async` or the trigger's subject.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub function: String,
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    function: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    function: String,
    method: String,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    function: String,
    method: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitedLabels {
    function: String,
    method: String,
}

/// Latency buckets, 2^15 ns (32.8 us) doubling to 2^35 ns (34 s): fine enough to tell 50 us
/// from 500 us, and powers of two, so that an observation's bucket is a shift.
fn latency_buckets() -> impl Iterator<Item = f64> {
    (0..LATENCY_BUCKETS).map(latency_bound)
}

/// The process's metrics that are counted as things happen.
pub struct Metrics {
    registry: Registry,
    requests: Family<CallLabels, Calls>,
    duration: Family<MethodLabels, Latency>,
    queue_wait: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    /// Each function's last cold start: when, and how long it took.
    last_cold_start:
        Mutex<std::collections::HashMap<String, (std::time::SystemTime, std::time::Duration)>>,
    cold_starts: Family<FunctionLabels, Counter>,
    cold_start_duration: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    exits: Family<ExitLabels, Counter>,
    transitions: Family<TransitionLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    budget_exhausted: Family<FunctionLabels, Counter>,
    rate_limited: Family<LimitedLabels, Counter>,
    /// Queue messages acknowledged, delivered again, dead-lettered; and pending.
    queue_acked: Family<QueueLabels, Counter>,
    queue_redelivered: Family<QueueLabels, Counter>,
    queue_dead_lettered: Family<QueueLabels, Counter>,
    queue_pending: Family<QueueLabels, Gauge>,
    /// Calls refused before a function was known (`function="unknown"`): Thrift, gRPC.
    unrouted: [Option<&'static CallMetrics>; 2],
    /// Every method's handles, made once per label set and kept for the process's life (as the
    /// families keep their series): a call holds a plain reference, no reference count.
    interned:
        Mutex<std::collections::HashMap<(String, String, &'static str), &'static CallMetrics>>,
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

fn cold_start_histogram() -> Histogram {
    // 1 ms doubling to about 65 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-3, 2.0, 17,
    ))
}

/// Caller connections open now, by protocol (counted per connection, not per call).
pub static THRIFT_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);
pub static GRPC_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Counts a caller connection of one protocol while it lives.
pub struct Connection(&'static AtomicUsize);

impl Connection {
    pub fn open(count: &'static AtomicUsize) -> Connection {
        count.fetch_add(1, Ordering::Relaxed);
        Connection(count)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The queue's series (docs/async.md).
fn register_queue(m: &Metrics, registry: &mut Registry) {
    registry.register(
        "fnmesh_queue_acked",
        "Queue messages (async calls, trigger messages) acknowledged after their call",
        m.queue_acked.clone(),
    );
    registry.register(
        "fnmesh_queue_redelivered",
        "Queue messages delivered more than once (a retry, or a consumer that went away)",
        m.queue_redelivered.clone(),
    );
    registry.register(
        "fnmesh_queue_dead_lettered",
        "Queue messages moved to the dead-letter subject",
        m.queue_dead_lettered.clone(),
    );
    registry.register(
        "fnmesh_queue_pending",
        "Queue messages waiting for a function, or in flight (read every 2s)",
        m.queue_pending.clone(),
    );
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            duration: Family::default(),
            queue_wait: Family::new_with_constructor(latency_histogram),
            last_cold_start: Mutex::default(),
            cold_starts: Family::default(),
            cold_start_duration: Family::new_with_constructor(cold_start_histogram),
            exits: Family::default(),
            transitions: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            rate_limited: Family::default(),
            queue_acked: Family::default(),
            queue_redelivered: Family::default(),
            queue_dead_lettered: Family::default(),
            queue_pending: Family::default(),
            registry: Registry::default(),
            unrouted: [None, None],
            interned: Mutex::default(),
        };
        registry.register(
            "fnmesh_requests",
            "Calls by function, method, protocol and outcome",
            m.requests.clone(),
        );
        registry.register_with_unit(
            "fnmesh_request_duration",
            "From a call's arrival to its reply",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register_with_unit(
            "fnmesh_queue_wait",
            "How long calls waited for an instance slot (calls that waited)",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        registry.register(
            "fnmesh_cold_starts",
            "Instances started",
            m.cold_starts.clone(),
        );
        registry.register_with_unit(
            "fnmesh_cold_start_duration",
            "From an instance's spawn to its first accepted connection",
            Unit::Seconds,
            m.cold_start_duration.clone(),
        );
        registry.register(
            "fnmesh_instance_exits",
            "Instances gone, by reason: stopped (idle, scale-down, reload, drain), crashed (exited on its own), failed_start",
            m.exits.clone(),
        );
        registry.register(
            "fnmesh_breaker_transitions",
            "Circuit breaker state changes, by the state entered",
            m.transitions.clone(),
        );
        registry.register(
            "fnmesh_retries",
            "Attempts sent again, by what failed: connect, unavailable, timeout",
            m.retries.clone(),
        );
        registry.register(
            "fnmesh_retry_budget_exhausted",
            "Retries the function's retry budget refused",
            m.budget_exhausted.clone(),
        );
        registry.register(
            "fnmesh_rate_limited",
            "Calls refused by a rate limit",
            m.rate_limited.clone(),
        );
        register_queue(&m, &mut registry);
        let info = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        info.get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.register("fnmesh_build_info", "fnmesh's version", info);
        let unrouted = [
            Some(m.calls(UNKNOWN, UNKNOWN, "thrift")),
            Some(m.calls(UNKNOWN, UNKNOWN, "grpc")),
        ];
        Metrics {
            registry,
            unrouted,
            ..m
        }
    }

    /// Creates `function`'s counters at zero, so that they are there (and `rate()` works) before
    /// the first event: its cold starts and exits, and for each of `methods` (name, and whether
    /// it has a breaker, a retry policy, a rate limit) the counters its policy can move.
    pub fn prepare(&self, function: &str, methods: &[(&str, bool, bool, bool)]) {
        let f = FunctionLabels {
            function: function.to_owned(),
        };
        // Counters at zero; histograms (about twenty lines each) come with their first event.
        let _ = self.cold_starts.get_or_create(&f);
        for reason in ["stopped", "crashed", "failed_start"] {
            let _ = self.exits.get_or_create(&ExitLabels {
                function: function.to_owned(),
                reason,
            });
        }
        for &(method, breaker, retry, limit) in methods {
            let labels = |to: &'static str| TransitionLabels {
                function: function.to_owned(),
                method: method.to_owned(),
                to,
            };
            for to in ["open", "half_open", "closed"]
                .into_iter()
                .filter(|_| breaker)
            {
                let _ = self.transitions.get_or_create(&labels(to));
            }
            for reason in ["connect", "unavailable", "timeout"]
                .into_iter()
                .filter(|_| retry)
            {
                let _ = self.retries.get_or_create(&RetryLabels {
                    function: function.to_owned(),
                    method: method.to_owned(),
                    reason,
                });
            }
            if limit {
                let _ = self.rate_limited.get_or_create(&LimitedLabels {
                    function: function.to_owned(),
                    method: method.to_owned(),
                });
            }
        }
    }

    /// A call refused before it reached a function (malformed, or naming no function fnmesh
    /// serves): counted as `function="unknown", method="unknown"`.
    pub fn unrouted(&self, protocol: &'static str, kind: Kind) {
        let i = usize::from(protocol == "grpc");
        if let Some(c) = &self.unrouted[i] {
            c.requests[Outcome::Error(kind).index()].inc();
        }
    }

    /// The handles for calls of `method` of `function` (`protocol`: `thrift` or `grpc`).
    pub fn calls(
        &self,
        function: &str,
        method: &str,
        protocol: &'static str,
    ) -> &'static CallMetrics {
        let key = (function.to_owned(), method.to_owned(), protocol);
        let mut interned = crate::lock(&self.interned);
        if let Some(c) = interned.get(&key) {
            return c;
        }
        let c: &'static CallMetrics =
            Box::leak(Box::new(self.new_calls(function, method, protocol)));
        interned.insert(key, c);
        c
    }

    fn new_calls(&self, function: &str, method: &str, protocol: &'static str) -> CallMetrics {
        let requests = OUTCOMES.map(|o| {
            self.requests
                .get_or_create(&CallLabels {
                    function: function.to_owned(),
                    method: method.to_owned(),
                    protocol,
                    outcome: o.label(),
                })
                .clone()
        });
        let duration = self
            .duration
            .get_or_create(&MethodLabels {
                function: function.to_owned(),
                method: method.to_owned(),
                protocol,
            })
            .clone();
        CallMetrics {
            function: function.into(),
            protocol,
            method: method.into(),
            requests,
            duration,
        }
    }

    pub fn queue_wait(&self, function: &str, waited: std::time::Duration) {
        self.queue_wait
            .get_or_create(&FunctionLabels {
                function: function.to_owned(),
            })
            .observe(waited.as_secs_f64());
    }

    pub fn cold_start(&self, function: &str, took: std::time::Duration) {
        crate::lock(&self.last_cold_start)
            .insert(function.to_owned(), (std::time::SystemTime::now(), took));
        let labels = FunctionLabels {
            function: function.to_owned(),
        };
        self.cold_starts.get_or_create(&labels).inc();
        self.cold_start_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// `function`'s last cold start: when it was ready, and how long it took.
    pub fn last_cold_start(
        &self,
        function: &str,
    ) -> Option<(std::time::SystemTime, std::time::Duration)> {
        crate::lock(&self.last_cold_start).get(function).copied()
    }

    /// An instance gone: `stopped`, `crashed` or `failed_start`.
    pub fn instance_exit(&self, function: &str, reason: &'static str) {
        self.exits
            .get_or_create(&ExitLabels {
                function: function.to_owned(),
                reason,
            })
            .inc();
    }

    /// A breaker entered state `to` (`closed`, `open`, `half_open`).
    pub fn breaker_transition(&self, function: &str, method: &str, to: &'static str) {
        self.transitions
            .get_or_create(&TransitionLabels {
                function: function.to_owned(),
                method: method.to_owned(),
                to,
            })
            .inc();
    }

    pub fn retry(&self, function: &str, method: &str, reason: &'static str) {
        self.retries
            .get_or_create(&RetryLabels {
                function: function.to_owned(),
                method: method.to_owned(),
                reason,
            })
            .inc();
    }

    /// The counter of retries `function`'s budget refused.
    pub fn retry_budget_exhausted(&self, function: &str) -> Counter {
        self.budget_exhausted
            .get_or_create(&FunctionLabels {
                function: function.to_owned(),
            })
            .clone()
    }

    /// A queue message's `event`: `acked`, `redelivered` or `dead_lettered`.
    pub fn queue_event(&self, function: &str, source: &str, event: &str) {
        let family = match event {
            "acked" => &self.queue_acked,
            "redelivered" => &self.queue_redelivered,
            _ => &self.queue_dead_lettered,
        };
        family
            .get_or_create(&QueueLabels {
                function: function.to_owned(),
                source: source.to_owned(),
            })
            .inc();
    }

    pub fn queue_pending(&self, function: &str, source: &str, n: u64) {
        self.queue_pending
            .get_or_create(&QueueLabels {
                function: function.to_owned(),
                source: source.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn rate_limited(&self, function: &str, method: &str) {
        self.rate_limited
            .get_or_create(&LimitedLabels {
                function: function.to_owned(),
                method: method.to_owned(),
            })
            .inc();
    }

    /// The exposition: these metrics, then `scraped`, in the OpenMetrics text format.
    pub fn encode(&self, scraped: &Scraped) -> String {
        let mut out = String::new();
        let _ = text::encode_registry(&mut out, &self.registry);
        let _ = text::encode_registry(&mut out, &scraped.registry);
        let _ = text::encode_eof(&mut out);
        out
    }
}

/// One method's counters (one per outcome) and latency histogram.
pub struct CallMetrics {
    function: Box<str>,
    protocol: &'static str,
    method: Box<str>,
    requests: [Calls; OUTCOMES.len()],
    duration: Latency,
}

impl CallMetrics {
    /// The method label.
    pub fn method(&self) -> &str {
        &self.method
    }

    pub fn function(&self) -> &str {
        &self.function
    }

    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// A call ended `outcome`, `took_ns` nanoseconds after it arrived.
    #[inline]
    pub fn record(&self, outcome: Outcome, took_ns: u64) {
        self.requests[outcome.index()].inc();
        self.duration.observe_ns(took_ns);
    }
}

/// A call counter that is not exposed while it is zero: every method has one per outcome from
/// the start (the request path only adds), but a sidecar with many functions does not expose
/// ten zeros for every method no call has used.
#[derive(Clone, Default, Debug)]
pub struct Calls(Arc<std::sync::atomic::AtomicU64>);

impl Calls {
    #[inline]
    fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl prometheus_client::metrics::TypedMetric for Calls {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Counter;
}

impl prometheus_client::encoding::EncodeMetric for Calls {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        match self.0.load(Ordering::Relaxed) {
            0 => Ok(()),
            n => {
                encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&n, None)
            }
        }
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

impl CallMetrics {
    /// Adds its counts to `t`.
    fn add_to(&self, t: &mut Totals) {
        for (sum, c) in t.outcomes.iter_mut().zip(&self.requests) {
            *sum += c.0.load(Ordering::Relaxed);
        }
        for (sum, b) in t.buckets.iter_mut().zip(self.duration.0.buckets.iter()) {
            *sum += b.load(Ordering::Relaxed);
        }
    }
}

/// Upper bounds of the latency buckets: 2^15 ns doubling, 21 of them (about 34 s), then +Inf.
const LATENCY_BUCKETS: usize = 21;

/// A latency histogram whose observation is two relaxed atomic adds: the bucket is computed
/// from the duration's bits, not searched for.
#[derive(Clone, Default, Debug)]
pub struct Latency(Arc<LatencyInner>);

#[derive(Default, Debug)]
struct LatencyInner {
    buckets: [std::sync::atomic::AtomicU64; LATENCY_BUCKETS + 1],
    sum_ns: std::sync::atomic::AtomicU64,
}

impl Latency {
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        self.0.buckets[latency_bucket(ns)].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// The bucket of an observation of `ns` nanoseconds: the first whose bound (2^(15+k) ns) holds
/// it, or the last (+Inf).
#[inline]
fn latency_bucket(ns: u64) -> usize {
    let units = ns.saturating_sub(1) >> 15;
    ((64 - units.leading_zeros()) as usize).min(LATENCY_BUCKETS)
}

/// The upper bound of bucket `k`, in seconds.
fn latency_bound(k: usize) -> f64 {
    match k {
        k if k < LATENCY_BUCKETS => (1u64 << (15 + k)) as f64 / 1e9,
        _ => f64::INFINITY,
    }
}

impl prometheus_client::metrics::TypedMetric for Latency {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for Latency {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = (0..=LATENCY_BUCKETS)
            .map(|k| (latency_bound(k), self.0.buckets[k].load(Ordering::Relaxed)))
            .collect();
        let count: u64 = buckets.iter().map(|(_, n)| n).sum();
        // Not exposed before its first observation (see [`Calls`]).
        if count == 0 {
            return Ok(());
        }
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// A function's calls so far, summed over its methods: by outcome, and by latency bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub outcomes: [u64; OUTCOMES.len()],
    pub buckets: [u64; LATENCY_BUCKETS + 1],
}

/// What a function's calls did between two [`Totals`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Window {
    pub seconds: f64,
    pub calls: u64,
    pub per_second: f64,
    /// Calls answered `ok` or `exception` (business outcomes), of all calls; `None` without
    /// calls.
    pub success_rate: Option<f64>,
    /// Latency quantiles, from the buckets (linear within the bucket), in milliseconds.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Totals {
    /// The calls between `earlier` and these, `seconds` apart.
    pub fn since(&self, earlier: &Totals, seconds: f64) -> Window {
        let outcomes: Vec<u64> = self
            .outcomes
            .iter()
            .zip(&earlier.outcomes)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let calls: u64 = outcomes.iter().sum();
        let good = outcomes[Outcome::Ok.index()] + outcomes[Outcome::Exception.index()];
        Window {
            seconds,
            calls,
            per_second: if seconds > 0.0 {
                calls as f64 / seconds
            } else {
                0.0
            },
            success_rate: (calls > 0).then(|| good as f64 / calls as f64),
            p50_ms: quantile(&buckets, 0.5),
            p99_ms: quantile(&buckets, 0.99),
        }
    }
}

/// The `q` quantile of bucketed observations, in milliseconds: linear within its bucket (the
/// +Inf bucket reads as its lower bound).
fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (k, n) in buckets.iter().enumerate() {
        if *n > 0 && (seen + n) as f64 >= rank {
            let lower = if k == 0 { 0.0 } else { latency_bound(k - 1) };
            let upper = latency_bound(k);
            if upper.is_infinite() {
                return Some(lower * 1e3);
            }
            let within = (rank - seen as f64) / *n as f64;
            return Some((lower + (upper - lower) * within) * 1e3);
        }
        seen += n;
    }
    None
}

/// A function's [`CallMetrics`] by method: the IDL's methods, `unknown`, and (without an IDL)
/// the first [`MAX_UNDECLARED`] names callers used.
pub struct MethodTable {
    function: String,
    protocol: &'static str,
    declared: Box<[&'static CallMetrics]>,
    unknown: &'static CallMetrics,
    /// Without an IDL: names seen so far (read without a lock; added under `adding`).
    seen: arc_swap::ArcSwap<Vec<(Box<str>, &'static CallMetrics)>>,
    adding: Mutex<()>,
}

impl MethodTable {
    pub fn new(function: &str, protocol: &'static str, declared: &[&str]) -> MethodTable {
        let m = global();
        MethodTable {
            function: function.to_owned(),
            protocol,
            declared: declared
                .iter()
                .map(|d| m.calls(function, d, protocol))
                .collect(),
            unknown: m.calls(function, UNKNOWN, protocol),
            seen: arc_swap::ArcSwap::from_pointee(Vec::new()),
            adding: Mutex::new(()),
        }
    }

    /// The handles of the IDL's method number `index`.
    #[inline]
    pub fn declared(&self, index: usize) -> &'static CallMetrics {
        self.declared.get(index).copied().unwrap_or(self.unknown)
    }

    pub fn unknown(&self) -> &'static CallMetrics {
        self.unknown
    }

    /// The function's calls so far, over all its methods.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for c in self.declared.iter().chain([&self.unknown]) {
            c.add_to(&mut t);
        }
        for (_, c) in self.seen.load().iter() {
            c.add_to(&mut t);
        }
        t
    }

    /// The handles of `method` of a function without an IDL.
    #[inline]
    pub fn undeclared(&self, method: &str) -> &'static CallMetrics {
        if let Some((_, c)) = self.seen.load().iter().find(|(n, _)| &**n == method) {
            return c;
        }
        let _adding = crate::lock(&self.adding);
        let seen = self.seen.load_full();
        if let Some((_, c)) = seen.iter().find(|(n, _)| &**n == method) {
            return c;
        }
        if seen.len() >= MAX_UNDECLARED {
            return self.unknown;
        }
        let c = global().calls(&self.function, method, self.protocol);
        let mut next = (*seen).clone();
        next.push((method.into(), c));
        self.seen.store(Arc::new(next));
        c
    }
}

/// Gauges read when scraped, from the sidecar's state.
pub struct Scraped {
    registry: Registry,
    instances: Family<Vec<(&'static str, String)>, Gauge>,
    in_flight: Family<FunctionLabels, Gauge>,
    queued: Family<FunctionLabels, Gauge>,
    breaker: Family<Vec<(&'static str, String)>, Gauge>,
    connections: Family<Vec<(&'static str, &'static str)>, Gauge>,
    registry_up: Family<Vec<(&'static str, &'static str)>, Gauge>,
}

impl Default for Scraped {
    fn default() -> Self {
        Scraped::new()
    }
}

impl Scraped {
    pub fn new() -> Scraped {
        let s = Scraped {
            registry: Registry::default(),
            instances: Family::default(),
            in_flight: Family::default(),
            queued: Family::default(),
            breaker: Family::default(),
            connections: Family::default(),
            registry_up: Family::default(),
        };
        let mut registry = Registry::default();
        registry.register(
            "fnmesh_instances",
            "Instances by state: ready, starting",
            s.instances.clone(),
        );
        registry.register(
            "fnmesh_in_flight",
            "Calls (gRPC: streams) on instances now",
            s.in_flight.clone(),
        );
        registry.register(
            "fnmesh_queued",
            "Calls waiting for an instance slot now",
            s.queued.clone(),
        );
        registry.register(
            "fnmesh_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            s.breaker.clone(),
        );
        registry.register(
            "fnmesh_connections",
            "Caller connections open now, by protocol",
            s.connections.clone(),
        );
        registry.register(
            "fnmesh_registry_up",
            "1 when the service registry holds the registrations, else 0",
            s.registry_up.clone(),
        );
        Scraped { registry, ..s }
    }

    pub fn function(
        &self,
        function: &str,
        ready: usize,
        starting: usize,
        in_flight: usize,
        queued: usize,
    ) {
        let f = |state: &'static str| {
            vec![
                ("function", function.to_owned()),
                ("state", state.to_owned()),
            ]
        };
        self.instances.get_or_create(&f("ready")).set(ready as i64);
        self.instances
            .get_or_create(&f("starting"))
            .set(starting as i64);
        let labels = FunctionLabels {
            function: function.to_owned(),
        };
        self.in_flight.get_or_create(&labels).set(in_flight as i64);
        self.queued.get_or_create(&labels).set(queued as i64);
    }

    /// A breaker's state: 0 closed, 1 open, 2 half-open.
    pub fn breaker(&self, function: &str, method: &str, state: i64) {
        self.breaker
            .get_or_create(&vec![
                ("function", function.to_owned()),
                ("method", method.to_owned()),
            ])
            .set(state);
    }

    pub fn connections(&self, protocol: &'static str, open: usize) {
        self.connections
            .get_or_create(&vec![("protocol", protocol)])
            .set(open as i64);
    }

    pub fn registry(&self, backend: &'static str, up: bool) {
        self.registry_up
            .get_or_create(&vec![("backend", backend)])
            .set(i64::from(up));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_buckets_hold_what_their_bounds_say() {
        let us = |n: u64| Duration::from_micros(n).as_nanos() as u64;
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(32_768), 0);
        assert_eq!(latency_bucket(32_769), 1);
        assert_eq!(latency_bucket(us(50)), 1, "32.8 < 50 <= 65.5 us");
        assert_eq!(latency_bucket(us(500)), 4, "262 < 500 <= 524 us");
        for k in 0..LATENCY_BUCKETS {
            let bound = (latency_bound(k) * 1e9).round() as u64;
            assert_eq!(latency_bucket(bound), k, "{k}");
            assert_eq!(latency_bucket(bound + 1), (k + 1).min(LATENCY_BUCKETS));
        }
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS);
    }

    #[test]
    fn a_window_counts_rates_success_and_quantiles() {
        let mut a = Totals::default();
        let mut b = Totals::default();
        b.outcomes[Outcome::Ok.index()] = 90;
        b.outcomes[Outcome::Exception.index()] = 5;
        b.outcomes[Outcome::Error(Kind::Timeout).index()] = 5;
        // 98 calls at (262, 524] us, 2 at (16.8, 33.6] ms.
        b.buckets[4] = 98;
        b.buckets[10] = 2;
        a.outcomes[Outcome::Ok.index()] = 0;
        let w = b.since(&a, 10.0);
        assert_eq!(w.calls, 100);
        assert_eq!(w.per_second, 10.0);
        assert_eq!(w.success_rate, Some(0.95));
        let p50 = w.p50_ms.unwrap();
        assert!(p50 > 0.262 && p50 <= 0.525, "{p50}");
        let p99 = w.p99_ms.unwrap();
        assert!(p99 > 16.7 && p99 <= 33.6, "{p99}");
        assert_eq!(Totals::default().since(&a, 1.0).p50_ms, None);
    }
}
