//! Which function a Thrift call goes to (docs/design.md "Thrift routing"), and its admission.

use std::{sync::Arc, time::Duration};

use fnmesh_codec::{Frame, MessageType};
use tokio::time::Instant;

use crate::{
    error::{CallError, Kind},
    governance::{outcome::Verdict, retry::Attempts, Function, Route, Services},
};

/// A routed call: its function, deadline, budget, breaker verdict, whether replies are read for
/// failures, and retry state, as the function's policy was when the call arrived.
pub(super) struct Routed {
    pub function: Arc<Function>,
    pub deadline: Option<Instant>,
    pub budget: Option<Duration>,
    pub verdict: Verdict,
    pub classify: bool,
    pub retry: Option<Attempts>,
    /// Forwarded by another fnmesh node (it carries the hop marker): served by an instance
    /// here with room, or refused, never forwarded again.
    pub hop: bool,
}

/// ToService, then `isn`, then a `Service:` name prefix (stripped), then the only Thrift
/// function for a call that names no service at all. A call naming a service no function serves
/// is `no-route`, and so is a method the IDL lacks, without starting anything.
///
/// On the egress listener (`services`), a call no function here serves goes to the service
/// the registry lists by its ToService name, else by its `isn` or `Service:` prefix as an IDL
/// service.
#[inline]
pub(super) fn route(
    table: &[Route],
    services: Option<&Services>,
    frame: &mut Frame,
) -> Result<Routed, CallError> {
    let egress;
    let function = match services {
        None => match find(table, frame).inspect_err(|e| unrouted(e.kind))? {
            Some(index) => &table[index].function,
            None => return Err(no_route(frame, "function")),
        },
        Some(services) => {
            let found = find_egress(table, services, frame).inspect_err(|e| unrouted(e.kind))?;
            egress = found.ok_or_else(|| no_route_egress(frame))?;
            &egress
        }
    };
    let caller = frame
        .ttheader()
        .and_then(|h| h.rpc_timeout_ms(frame.head()))
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    let oneway = frame.kind() == MessageType::Oneway;
    let traced = crate::trace::enabled();
    let parent = if traced { caller_trace(frame) } else { None };
    let admitted = function.admit(frame.name(), caller, Some(oneway), parent.as_ref())?;
    if traced {
        if let Some(span) = admitted.verdict.span() {
            pass_on(frame, &span.traceparent());
        }
    }
    // Only a function with peers can be sent a forwarded call, or forward one.
    let hop = function.peers.get().is_some() && forwarded(frame);
    Ok(Routed {
        hop,
        function: function.clone(),
        deadline: admitted.deadline,
        budget: admitted.budget,
        verdict: admitted.verdict,
        classify: admitted.classify,
        retry: admitted.retry,
    })
}

/// TTHeader's string key for the trace context: `traceparent`, or with Kitex/Volo's metainfo
/// transit prefix (`RPC_TRANSIT_traceparent`), in any case.
fn is_traceparent(key: &[u8]) -> bool {
    key.eq_ignore_ascii_case(b"traceparent") || key.eq_ignore_ascii_case(b"rpc_transit_traceparent")
}

fn is_tracestate(key: &[u8]) -> bool {
    key.eq_ignore_ascii_case(b"tracestate") || key.eq_ignore_ascii_case(b"rpc_transit_tracestate")
}

/// Gives the instance fnmesh's span as its parent: in place where the caller sent a context;
/// as Kitex/Volo's transient `RPC_TRANSIT_traceparent` (which a Volo or Kitex function reads
/// from its metainfo) where a TTHeader call sent none. Framed and unframed calls carry no keys.
#[cold]
fn pass_on(frame: &mut Frame, traceparent: &str) {
    if frame.overwrite_str_value(is_traceparent, traceparent.as_bytes()) {
        return;
    }
    let Some(h) = frame.ttheader() else {
        return;
    };
    if h.str_kvs(frame.head()).any(|(k, _)| is_traceparent(k)) {
        return; // a context fnmesh could not read: left as the caller sent it
    }
    if let Err(e) = frame.add_str_key(b"RPC_TRANSIT_traceparent", traceparent.as_bytes()) {
        tracing::debug!(error = %e, "cannot pass the trace context on");
    }
}

/// The caller's trace context from the frame's TTHeader string keys (traces are on).
#[cold]
fn caller_trace(frame: &Frame) -> Option<crate::trace::Parent> {
    let h = frame.ttheader()?;
    let head = frame.head();
    let mut parent = None;
    let mut state = None;
    for (k, v) in h.str_kvs(head) {
        if is_traceparent(k) {
            parent = crate::trace::parse_traceparent(v);
        } else if is_tracestate(k) {
            state = Some(String::from_utf8_lossy(v).into_owned());
        }
    }
    let mut parent = parent?;
    parent.state = state;
    Some(parent)
}

/// Whether another fnmesh node forwarded the call (TTHeader string key `fnmesh-hop`).
fn forwarded(frame: &Frame) -> bool {
    let hop = crate::governance::services::HOP.as_bytes();
    frame
        .ttheader()
        .is_some_and(|h| h.str_kvs(frame.head()).any(|(k, _)| k == hop))
}

/// `no-route` for a call naming what no function (or service) serves.
#[cold]
fn no_route(frame: &Frame, what: &str) -> CallError {
    unrouted(Kind::NoRoute);
    let asked = asked_service(frame);
    CallError::new(Kind::NoRoute, format!("no {what} for service {asked}"))
}

/// `no-route` for an egress call, naming the first name it carries (the one that decided).
#[cold]
fn no_route_egress(frame: &Frame) -> CallError {
    unrouted(Kind::NoRoute);
    let head = frame.head();
    let named = |s: &&[u8]| !s.is_empty();
    let asked = frame
        .ttheader()
        .and_then(|h| {
            h.to_service(head)
                .filter(named)
                .or_else(|| h.idl_service(head).filter(named))
        })
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_else(|| asked_service(frame));
    CallError::new(Kind::NoRoute, format!("no service for service {asked}"))
}

/// The function or registry service an egress call names, by the first name it carries:
/// ToService (a function's or a registered name), else `isn` (an IDL service), else a
/// `Service:` prefix (either; stripped), else the only Thrift function here. A name found
/// neither here nor in the registry is `no-route`: it never falls through to a later rule.
#[cold]
fn find_egress(
    table: &[Route],
    services: &Services,
    frame: &mut Frame,
) -> Result<Option<Arc<Function>>, CallError> {
    let thrift = crate::config::Protocol::Thrift;
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let by_name = |n: &str| {
        let local = table.iter().find(|r| r.function.name == n);
        local
            .map(|r| r.function.clone())
            .or_else(|| services.by_name(n, thrift))
    };
    let by_service = |s: &str| {
        let local = table.iter().find(|r| r.service.as_deref() == Some(s));
        local
            .map(|r| r.function.clone())
            .or_else(|| services.by_idl_service(s, thrift))
    };
    if let Some(h) = frame.ttheader() {
        let head = frame.head();
        if let Some(to) = h.to_service(head).and_then(text) {
            return Ok(by_name(&to));
        }
        if let Some(isn) = h.idl_service(head).and_then(text) {
            return Ok(by_service(&isn));
        }
    }
    if let Some((prefix, _)) = frame.name().split_once(':') {
        let prefix = prefix.to_owned();
        let found = by_service(&prefix).or_else(|| by_name(&prefix));
        if found.is_some() {
            frame
                .strip_service_prefix()
                .map_err(|e| CallError::new(Kind::BadRequest, e.to_string()))?;
        }
        return Ok(found);
    }
    Ok((table.len() == 1).then(|| table[0].function.clone()))
}

#[cold]
fn unrouted(kind: Kind) {
    crate::metrics::global().unrouted("thrift", kind);
}

/// The index of the function the call names (stripping a `Service:` prefix it matched), or of
/// the only function when the call names none.
#[inline]
fn find(table: &[Route], frame: &mut Frame) -> Result<Option<usize>, CallError> {
    let by_name = |n: &[u8]| table.iter().position(|r| r.function.name.as_bytes() == n);
    let by_service = |s: &[u8]| {
        table
            .iter()
            .position(|r| r.service.as_deref().map(str::as_bytes) == Some(s))
    };
    // An empty key names nothing (some clients send one).
    let named = |s: &Option<&[u8]>| s.is_some_and(|s| !s.is_empty());
    let mut names_one = false;
    if let Some(h) = frame.ttheader() {
        let (to, isn) = (h.to_service(frame.head()), h.idl_service(frame.head()));
        let found = to.and_then(by_name).or_else(|| isn.and_then(by_service));
        if found.is_some() {
            return Ok(found);
        }
        names_one = named(&to) || named(&isn);
    }
    if let Some((service, _)) = frame.name().split_once(':') {
        let hit = by_service(service.as_bytes()).or_else(|| by_name(service.as_bytes()));
        if hit.is_some() {
            frame
                .strip_service_prefix()
                .map_err(|e| CallError::new(Kind::BadRequest, e.to_string()))?;
            return Ok(hit);
        }
        names_one = true;
    }
    Ok((!names_one && table.len() == 1).then_some(0))
}

/// The service an unroutable call asked for, for its error: the last routing rule that named one
/// (a `Service:` prefix, else `isn`, else ToService). Only the failure path pays for the text.
fn asked_service(frame: &Frame) -> String {
    if let Some((service, _)) = frame.name().split_once(':') {
        return service.to_owned();
    }
    let head = frame.head();
    let named = |s: &&[u8]| !s.is_empty();
    frame
        .ttheader()
        .and_then(|h| {
            h.idl_service(head)
                .filter(named)
                .or_else(|| h.to_service(head).filter(named))
        })
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_else(|| "(none named)".into())
}
