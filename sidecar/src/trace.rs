//! Traces (`[telemetry] otlp_endpoint`): a span per call, the caller's W3C trace context read
//! from gRPC metadata or TTHeader string keys, fnmesh's span passed to the instance as its
//! parent, and spans exported over OTLP by the OpenTelemetry SDK's batch processor, off the
//! request path. Without `otlp_endpoint`, nothing here runs: the request path checks one flag.

use std::{
    borrow::Cow,
    sync::{
        atomic::{AtomicBool, Ordering},
        OnceLock,
    },
};

use opentelemetry::{
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
        Tracer as _, TracerProvider as _,
    },
    Context, KeyValue,
};

use crate::metrics::Outcome;

static ON: AtomicBool = AtomicBool::new(false);
static TRACER: OnceLock<opentelemetry_sdk::trace::SdkTracer> = OnceLock::new();
static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

/// Whether spans are recorded: the one check the request path pays when they are not.
#[inline]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

pub use crate::config::OtlpProtocol;

/// Starts exporting spans to `endpoint`; call it inside a Tokio runtime (the gRPC exporter's
/// client lives there). `ratio` samples root spans; a caller's sampled flag decides for its
/// calls.
pub fn init(
    endpoint: &str,
    protocol: OtlpProtocol,
    ratio: f64,
    service: &str,
) -> Result<(), String> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = match protocol {
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
        OtlpProtocol::HttpProtobuf => {
            use opentelemetry_otlp::WithHttpConfig;
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(OnRuntime::here())
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
        }
    }
    .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
    let sampler = opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
        opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(ratio),
    ));
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    let _ = TRACER.set(provider.tracer("fnmesh"));
    let _ = PROVIDER.set(provider);
    ON.store(true, Ordering::Release);
    Ok(())
}

/// The OTLP/HTTP exporter's client: hyper's, its requests run on the runtime that started
/// traces (the SDK's batch processor calls it from a thread of its own, with no runtime).
#[derive(Debug)]
struct OnRuntime {
    runtime: tokio::runtime::Handle,
    client: std::sync::Arc<
        opentelemetry_http::hyper::HyperClient<hyper_util::client::legacy::connect::HttpConnector>,
    >,
}

impl OnRuntime {
    fn here() -> OnRuntime {
        OnRuntime {
            runtime: tokio::runtime::Handle::current(),
            client: std::sync::Arc::new(
                opentelemetry_http::hyper::HyperClient::with_default_connector(
                    std::time::Duration::from_secs(10),
                    None,
                ),
            ),
        }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await
            .map_err(|e| Box::new(e) as opentelemetry_http::HttpError)?
    }
}

/// Exports what is left (at shutdown).
pub fn flush() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
    }
}

/// A caller's W3C trace context: `traceparent` (and `tracestate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
    pub state: Option<String>,
}

/// `traceparent` as W3C Trace Context writes it: `00-{32 hex}-{16 hex}-{2 hex}` (a later
/// version's longer value is read by its first four fields). All-zero ids are invalid.
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = u128::from_str_radix(trace, 16).ok()?;
    let span_id = u64::from_str_radix(span, 16).ok()?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Parent {
        trace_id: trace_id.to_be_bytes(),
        span_id: span_id.to_be_bytes(),
        sampled: u8::from_str_radix(flags, 16).ok()? & 1 == 1,
        state: None,
    })
}

/// A call's span: recording (when sampled) until the call ends.
pub struct CallSpan {
    span: opentelemetry_sdk::trace::Span,
    context: SpanContext,
    retries: i64,
}

impl CallSpan {
    /// A span for a call of `function`'s `method`, the child of `parent` when the caller sent
    /// one, else a new root (sampled by the ratio).
    pub fn start(
        parent: Option<&Parent>,
        function: &str,
        method: &str,
        protocol: &'static str,
    ) -> Option<CallSpan> {
        let tracer = TRACER.get()?;
        let cx = match parent {
            Some(p) => {
                let state = p
                    .state
                    .as_deref()
                    .and_then(|s| s.parse::<TraceState>().ok())
                    .unwrap_or_default();
                let flags = if p.sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                };
                let remote = SpanContext::new(
                    TraceId::from_bytes(p.trace_id),
                    SpanId::from_bytes(p.span_id),
                    flags,
                    true,
                    state,
                );
                Context::new().with_remote_span_context(remote)
            }
            None => Context::new(),
        };
        let name: Cow<'static, str> = format!("{function}/{method}").into();
        let builder = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new(
                    "rpc.system",
                    if protocol == "grpc" { "grpc" } else { "thrift" },
                ),
                KeyValue::new("rpc.service", function.to_owned()),
                KeyValue::new("rpc.method", method.to_owned()),
                KeyValue::new("fnmesh.function", function.to_owned()),
            ]);
        let span = tracer.build_with_context(builder, &cx);
        let context = span.span_context().clone();
        Some(CallSpan {
            span,
            context,
            retries: 0,
        })
    }

    /// The `traceparent` the instance gets: this span as its parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.context.trace_id(),
            self.context.span_id(),
            self.context.trace_flags().to_u8()
        )
    }

    /// The `tracestate` to pass on, if any.
    pub fn tracestate(&self) -> Option<String> {
        let s = self.context.trace_state().header();
        (!s.is_empty()).then_some(s)
    }

    /// The trace id, in hex (for the access log).
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.context.trace_id())
    }

    /// The call got a slot on instance `instance`; `waited` is how long it queued for it (none
    /// when a slot was free), and `cold` whether the instance became ready meanwhile.
    pub fn leased(&mut self, instance: u64, waited: Option<std::time::Duration>, cold: bool) {
        self.span
            .set_attribute(KeyValue::new("fnmesh.instance", instance as i64));
        if let Some(w) = waited {
            self.span
                .set_attribute(KeyValue::new("fnmesh.queue_wait_ms", w.as_secs_f64() * 1e3));
        }
        self.span
            .set_attribute(KeyValue::new("fnmesh.cold_start", cold));
    }

    /// The call is sent again.
    pub fn retried(&mut self) {
        self.retries += 1;
    }

    /// Ends the span with the call's outcome.
    pub fn end(mut self, outcome: Outcome) {
        self.span
            .set_attribute(KeyValue::new("fnmesh.retries", self.retries));
        self.span
            .set_attribute(KeyValue::new("fnmesh.outcome", outcome.label()));
        if outcome.is_failure() {
            self.span
                .set_status(opentelemetry::trace::Status::error(outcome.label()));
        }
        self.span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_as_w3c_writes_them() {
        let p =
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(p.trace_id[0], 0x4b);
        assert_eq!(p.span_id[7], 0xb7);
        assert!(p.sampled);
        let p =
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!p.sampled);
        // A later version may add fields.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
        for bad in [
            &b""[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        ] {
            assert_eq!(
                parse_traceparent(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
