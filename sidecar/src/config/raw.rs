//! The policy file as written: what serde reads it into (spans kept, for errors that name the
//! line), and the parsers of its durations and sizes.

use std::{collections::BTreeMap, time::Duration};

use serde::{de, Deserialize, Deserializer};
use toml::Spanned;

use super::ScaleConfig;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) sidecar: Spanned<RawSidecar>,
    #[serde(default)]
    pub(super) discovery: Option<Spanned<RawDiscovery>>,
    #[serde(default)]
    pub(super) function: Vec<Spanned<RawFunction>>,
    #[serde(default)]
    pub(super) telemetry: Option<Spanned<RawTelemetry>>,
    #[serde(default)]
    pub(super) service: Vec<Spanned<RawService>>,
    #[serde(default, rename = "async")]
    pub(super) queue: Option<Spanned<RawAsync>>,
}

/// `[async]`: async invocations and queue triggers over NATS JetStream.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAsync {
    pub(super) nats: Spanned<String>,
    // The keys of RawAsyncPolicy (serde's flatten cannot refuse unknown keys).
    pub(super) concurrency: Option<Spanned<usize>>,
    pub(super) max_attempts: Option<Spanned<u32>>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) backoff: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) max_backoff: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) retention: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) ack_wait: Option<Duration>,
}

/// The keys `[async]` sets for every function and `[function.async]` for one.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAsyncPolicy {
    pub(super) concurrency: Option<Spanned<usize>>,
    pub(super) max_attempts: Option<Spanned<u32>>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) backoff: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) max_backoff: Option<Duration>,
}

/// `[[function.trigger]]`: messages on a subject call a method.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrigger {
    pub(super) subject: Spanned<String>,
    pub(super) method: Spanned<String>,
    pub(super) payload: Option<Spanned<String>>,
    pub(super) max_deliver: Option<Spanned<u32>>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) backoff: Option<Duration>,
}

/// `[[service]]`: a service egress calls reach through the registry, and its policy.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: Spanned<String>,
    pub(super) protocol: Spanned<String>,
    pub(super) idl: Option<Spanned<String>>,
    pub(super) service: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) policy: Option<Spanned<RawPolicy>>,
    #[serde(default)]
    pub(super) method: BTreeMap<String, Spanned<RawPolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    #[serde(default)]
    pub(super) access_log: bool,
    pub(super) access_log_ratio: Option<Spanned<f64>>,
    pub(super) otlp_endpoint: Option<Spanned<String>>,
    pub(super) otlp_protocol: Option<Spanned<String>>,
    pub(super) sample_ratio: Option<Spanned<f64>>,
    pub(super) service_name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSidecar {
    pub(super) listen: Spanned<String>,
    pub(super) admin: Option<Spanned<String>>,
    pub(super) advertise: Option<Spanned<String>>,
    pub(super) egress: Option<Spanned<String>>,
    #[serde(default = "default_drain", deserialize_with = "duration")]
    pub(super) drain_timeout: Duration,
    #[serde(default = "default_frame", deserialize_with = "size")]
    pub(super) max_frame_size: usize,
    pub(super) workers: Option<Spanned<usize>>,
    #[serde(default = "default_busy_poll", deserialize_with = "busy_poll")]
    pub(super) busy_poll: Duration,
    pub(super) max_connections: Option<Spanned<usize>>,
    #[serde(default = "default_header_timeout", deserialize_with = "duration")]
    pub(super) header_timeout: Duration,
    #[serde(default = "default_idle_timeout", deserialize_with = "duration")]
    pub(super) idle_timeout: Duration,
    #[serde(default = "default_connection_buffer", deserialize_with = "size")]
    pub(super) connection_buffer: usize,
    /// Removed: gRPC is served by fnmesh's relay only. Kept here so that a file still setting it
    /// gets an error naming the key and its line rather than serde's "unknown field".
    pub(super) grpc_engine: Option<Spanned<toml::Value>>,
}

pub(super) fn default_drain() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn default_connection_buffer() -> usize {
    16 << 20
}
pub(super) fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
pub(super) fn default_busy_poll() -> Duration {
    Duration::from_micros(50)
}
pub(super) fn default_frame() -> usize {
    fnmesh_codec::Limits::DEFAULT_MAX_FRAME_SIZE
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    pub(super) backend: Spanned<String>,
    pub(super) address: Option<Spanned<String>>,
    pub(super) token: Option<Spanned<String>>,
    pub(super) endpoints: Option<Spanned<Vec<String>>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) username: Option<Spanned<String>>,
    pub(super) password: Option<Spanned<String>>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) cert_file: Option<Spanned<String>>,
    pub(super) key_file: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) ttl: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFunction {
    pub(super) name: Spanned<String>,
    pub(super) protocol: Spanned<String>,
    pub(super) transport: Option<Spanned<String>>,
    pub(super) idl: Option<Spanned<String>>,
    pub(super) service: Option<Spanned<String>>,
    pub(super) thrift_protocol: Option<Spanned<String>>,
    pub(super) command: Spanned<Vec<String>>,
    #[serde(default)]
    pub(super) env: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) scale: Option<Spanned<ScaleConfig>>,
    #[serde(default)]
    pub(super) policy: Option<Spanned<RawPolicy>>,
    #[serde(default)]
    pub(super) method: BTreeMap<String, Spanned<RawPolicy>>,
    #[serde(default, rename = "async")]
    pub(super) queue: Option<Spanned<RawAsyncPolicy>>,
    #[serde(default)]
    pub(super) trigger: Vec<Spanned<RawTrigger>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default, deserialize_with = "opt_duration")]
    pub(super) timeout: Option<Duration>,
    pub(super) rate_limit: Option<Spanned<toml::Value>>,
    pub(super) circuit_breaker: Option<Spanned<toml::Value>>,
    pub(super) retry: Option<Spanned<toml::Value>>,
    pub(super) idempotent: Option<Spanned<bool>>,
}

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

pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(de::Error::custom)
}

/// At most 1 ms: longer windows keep a CPU busy for no measurable latency gain.
pub(super) fn busy_poll<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = duration(d)?;
    if v > Duration::from_millis(1) {
        return Err(de::Error::custom(format!(
            "busy_poll {v:?} is over 1ms (0s turns busy polling off)"
        )));
    }
    Ok(v)
}

pub(super) fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

pub(super) fn size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let s = String::deserialize(d)?;
    parse_size(&s).map_err(de::Error::custom)
}
