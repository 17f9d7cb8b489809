//! The gRPC front end: fnmesh's own HTTP/2 relay (`relay`) and what it shares: routing by
//! `:path`, `grpc-timeout`, and the health service the sidecar answers itself (`health`).

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

pub mod health;
pub mod relay;

pub use relay::serve;

use crate::{
    config::ConnectionLimits,
    drain::Drain,
    error::{CallError, Kind},
    governance::{Function, Route, Services},
};

/// What every gRPC connection shares.
pub struct GrpcFront {
    /// The gRPC functions; a reload swaps the table (and bumps `reloads`).
    pub functions: Arc<arc_swap::ArcSwap<Vec<Route>>>,
    /// Counts reloads, for health `Watch` streams.
    pub reloads: watch::Sender<u64>,
    /// The sidecar's drain: connections get GOAWAY and health turns NOT_SERVING when it
    /// starts; it waits for every stream and every HTTP/2 connection (after GOAWAY each closes
    /// once its streams are done, those fnmesh answers itself, such as health `Watch`, included).
    pub drain: Drain,
    /// How long a started frame may take, and an idle connection may stay.
    pub connections: ConnectionLimits,
    /// On the egress listener: the services in the registry, for streams no function here
    /// serves.
    pub services: Option<Arc<Services>>,
}

impl GrpcFront {
    pub fn new(functions: Vec<Route>, drain: Drain, connections: ConnectionLimits) -> GrpcFront {
        GrpcFront {
            functions: Arc::new(arc_swap::ArcSwap::from_pointee(functions)),
            reloads: watch::Sender::new(0),
            drain,
            connections,
            services: None,
        }
    }

    /// The function serving `service` (its IDL service, or its name without an IDL).
    pub(crate) fn function(&self, service: &str) -> Option<Arc<Function>> {
        self.functions
            .load()
            .iter()
            .find(|r| r.service.as_deref().unwrap_or(&r.function.name) == service)
            .map(|r| r.function.clone())
    }
}

/// `/package.Service/Method` split in two.
pub(crate) fn service_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// gRPC's `grpc-timeout`: digits and a unit (H, M, S, m, u, n). The specification allows 8
/// digits; Volo's client sends more (1.997 s as `1997000000n`), so up to 19 are taken.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc-timeout` for a remaining budget: microseconds while they fit in 8 digits, then
/// milliseconds, then seconds.
pub fn format_grpc_timeout(d: Duration) -> String {
    let us = d.as_micros().max(1);
    if us < 100_000_000 {
        format!("{us}u")
    } else if d.as_millis() < 100_000_000 {
        format!("{}m", d.as_millis())
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    }
}

/// Where a stream goes: a function, or the health service the sidecar answers itself.
pub(crate) enum Target<'a> {
    Function(Arc<Function>, &'a str),
    Health { watch: bool },
}

/// Routes a stream by its `:path`; on the egress listener, a stream no function here serves
/// goes to the registry's service its `:authority` names (without a port), else to the one
/// whose IDL service is the path's.
pub(crate) fn target<'a>(
    front: &GrpcFront,
    path: &'a str,
    authority: Option<&str>,
) -> Result<Target<'a>, CallError> {
    let Some((service, method)) = service_method(path) else {
        return Err(CallError::new(
            Kind::NoRoute,
            format!("{path:?} is not a gRPC path (/package.Service/Method)"),
        ));
    };
    if let Some(function) = front.function(service) {
        return Ok(Target::Function(function, method));
    }
    if let Some(services) = &front.services {
        if let Some(function) = remote(&front.functions.load(), services, service, authority) {
            return Ok(Target::Function(function, method));
        }
        return Err(CallError::new(
            Kind::NoRoute,
            format!("no service for {service}"),
        ));
    }
    if service != health::SERVICE {
        return Err(CallError::new(
            Kind::NoRoute,
            format!("no function for service {service}"),
        ));
    }
    match method {
        "Check" => Ok(Target::Health { watch: false }),
        "Watch" => Ok(Target::Health { watch: true }),
        other => Err(CallError::new(
            Kind::NoRoute,
            format!("{} has no method {other}", health::SERVICE),
        )),
    }
}

/// An egress stream's function: a local one its `:authority` names, else the registry's
/// service it names, else the registry's service for the path's IDL service.
#[cold]
fn remote(
    local: &[Route],
    services: &Services,
    service: &str,
    authority: Option<&str>,
) -> Option<Arc<Function>> {
    let grpc = crate::config::Protocol::Grpc;
    let name = authority
        .map(|a| a.rsplit_once(':').map_or(a, |(host, _)| host))
        .filter(|n| !n.is_empty() && n.parse::<std::net::IpAddr>().is_err() && *n != "localhost");
    if let Some(name) = name {
        if let Some(r) = local.iter().find(|r| r.function.name == name) {
            return Some(r.function.clone());
        }
        if let Some(f) = services.by_name(name, grpc) {
            return Some(f);
        }
    }
    services.by_idl_service(service, grpc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_format() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        // Volo's client writes sub-second remainders in nanoseconds, past 8 digits.
        assert_eq!(
            parse_grpc_timeout("1997000000n"),
            Some(Duration::from_millis(1997))
        );
        assert_eq!(
            parse_grpc_timeout("9999999999999999999H"),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in ["", "m", "12345678901234567890m", "10x", "-1S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        for d in [
            Duration::from_micros(1),
            Duration::from_millis(250),
            Duration::from_secs(3 * 3600),
            Duration::from_secs(500_000),
        ] {
            let back = parse_grpc_timeout(&format_grpc_timeout(d)).unwrap();
            assert!(
                back <= d && d - back < Duration::from_secs(1),
                "{d:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn health_check_requests_parse_and_never_panic() {
        let frame = |msg: &[u8]| {
            let mut f = vec![0];
            f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            f.extend_from_slice(msg);
            f
        };
        let mut m = vec![0x0a, 9];
        m.extend_from_slice(b"echo.Echo");
        assert_eq!(
            health::parse_request(&frame(&m)).as_deref(),
            Some("echo.Echo")
        );
        assert_eq!(health::parse_request(&frame(&[])).as_deref(), Some(""));
        assert_eq!(health::parse_request(&[]).as_deref(), Some(""));
        // Unknown fields of every wire type are skipped.
        let mut m2 = vec![
            0x10, 0x96, 0x01, 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x25, 1, 2, 3, 4,
        ];
        m2.extend_from_slice(&m);
        assert_eq!(
            health::parse_request(&frame(&m2)).as_deref(),
            Some("echo.Echo")
        );
        for bad in [
            vec![1, 0, 0, 0, 0],
            vec![0, 0, 0, 0, 5, 0x0a],
            frame(&[0x0a, 200]),
            frame(&[0x0b]),
            frame(&[0x0a, 2, 0xff, 0xfe]),
            frame(&[
                0x08, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80,
            ]),
            vec![0, 0, 0],
        ] {
            assert_eq!(health::parse_request(&bad), None, "{bad:?}");
        }
        // Every prefix and every single-byte change of a valid request: an answer, no panic.
        let good = frame(&m2);
        for n in 0..good.len() {
            let _ = health::parse_request(&good[..n]);
            for b in [0u8, 0x7f, 0x80, 0xff] {
                let mut x = good.clone();
                x[n] = b;
                let _ = health::parse_request(&x);
            }
        }
    }

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            service_method("/echo.Echo/UnaryEcho"),
            Some(("echo.Echo", "UnaryEcho"))
        );
        for bad in [
            "",
            "/",
            "/echo.Echo",
            "/echo.Echo/",
            "//M",
            "/a/b/c",
            "echo.Echo/M",
        ] {
            assert_eq!(service_method(bad), None, "{bad:?}");
        }
    }
}
