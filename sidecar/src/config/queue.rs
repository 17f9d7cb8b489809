//! `[async]`, `[function.async]` and `[[function.trigger]]` (docs/async.md): validated after
//! the functions, whose IDLs the triggers' methods are checked against.

use std::time::Duration;

use toml::Spanned;

use super::{
    ctx::Ctx,
    raw::{RawAsyncPolicy, RawFile, RawTrigger},
    AsyncConfig, AsyncPolicy, ConfigError, FunctionConfig, Payload, Protocol, TriggerConfig,
};

/// `[async]` (none without it), and each function's async policy and triggers, which need it.
pub(super) fn apply(
    cx: &Ctx<'_>,
    raw: &RawFile,
    functions: &mut [FunctionConfig],
) -> Result<Option<AsyncConfig>, ConfigError> {
    let (config, defaults) = match &raw.queue {
        None => (None, AsyncPolicy::default()),
        Some(a) => {
            let r = a.get_ref();
            let nats = nats_url(cx, &r.nats)?;
            let at = a.span().start;
            let defaults = policy(
                cx,
                at,
                "async",
                AsyncPolicy::default(),
                &RawAsyncPolicy {
                    concurrency: r.concurrency.clone(),
                    max_attempts: r.max_attempts.clone(),
                    backoff: r.backoff,
                    max_backoff: r.max_backoff,
                },
            )?;
            let retention = r.retention.unwrap_or(Duration::from_secs(24 * 3600));
            let ack_wait = r.ack_wait.unwrap_or(Duration::from_secs(30));
            for (key, d) in [("async.retention", retention), ("async.ack_wait", ack_wait)] {
                if d < Duration::from_secs(1) {
                    return cx.invalid(at, key, "must be at least 1s");
                }
            }
            let config = AsyncConfig {
                nats,
                retention,
                ack_wait,
            };
            (Some(config), defaults)
        }
    };
    for (f, rf) in functions.iter_mut().zip(&raw.function) {
        let rf = rf.get_ref();
        let key = |k: &str| format!("function[{}].{k}", f.name);
        let needs_async = rf
            .queue
            .as_ref()
            .map(|q| q.span().start)
            .or(rf.trigger.first().map(|t| t.span().start));
        if let (Some(at), None) = (needs_async, &config) {
            return cx.invalid(
                at,
                key("async"),
                "needs [async] with the NATS server (`nats = \"nats://HOST:PORT\"`)",
            );
        }
        f.async_policy = match &rf.queue {
            Some(q) => policy(cx, q.span().start, &key("async"), defaults, q.get_ref())?,
            None => defaults,
        };
        let mut triggers = Vec::new();
        for (n, t) in rf.trigger.iter().enumerate() {
            triggers.push(trigger(cx, t, f, &key(&format!("trigger[{n}]")))?);
        }
        f.triggers = triggers;
    }
    Ok(config)
}

/// `nats://HOST:PORT` (or `HOST:PORT`).
fn nats_url(cx: &Ctx<'_>, v: &Spanned<String>) -> Result<String, ConfigError> {
    let text = v.get_ref().trim();
    let hostport = text.strip_prefix("nats://").unwrap_or(text);
    let ok = match hostport.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    };
    if !ok || hostport.contains('/') {
        return cx.invalid(
            v.span().start,
            "async.nats",
            format!("{text:?} is not nats://HOST:PORT (TLS and credentials are not supported yet)"),
        );
    }
    Ok(format!("nats://{hostport}"))
}

/// `defaults` with what `r` sets, checked.
fn policy(
    cx: &Ctx<'_>,
    at: usize,
    key: &str,
    defaults: AsyncPolicy,
    r: &RawAsyncPolicy,
) -> Result<AsyncPolicy, ConfigError> {
    let mut p = defaults;
    if let Some(c) = &r.concurrency {
        if !(1..=10_000).contains(c.get_ref()) {
            let message = format!("{} is not between 1 and 10000", c.get_ref());
            return cx.invalid(c.span().start, format!("{key}.concurrency"), message);
        }
        p.concurrency = *c.get_ref();
    }
    if let Some(m) = &r.max_attempts {
        if !(1..=100).contains(m.get_ref()) {
            let message = format!("{} is not between 1 and 100", m.get_ref());
            return cx.invalid(m.span().start, format!("{key}.max_attempts"), message);
        }
        p.max_attempts = *m.get_ref();
    }
    p.backoff = r.backoff.unwrap_or(p.backoff);
    p.max_backoff = r.max_backoff.unwrap_or(p.max_backoff);
    if p.backoff.is_zero() || p.max_backoff < p.backoff {
        return cx.invalid(
            at,
            format!("{key}.backoff"),
            format!(
                "backoff {:?} must be above zero and at most max_backoff {:?}",
                p.backoff, p.max_backoff
            ),
        );
    }
    Ok(p)
}

/// A trigger: its subject, and a method the function's IDL declares (for `raw`, one whose only
/// argument is bytes).
fn trigger(
    cx: &Ctx<'_>,
    t: &Spanned<RawTrigger>,
    f: &FunctionConfig,
    key: &str,
) -> Result<TriggerConfig, ConfigError> {
    let r = t.get_ref();
    let subject = r.subject.get_ref().clone();
    if let Err(why) = check_subject(&subject) {
        let message = format!("{subject:?}: {why}");
        return cx.invalid(r.subject.span().start, format!("{key}.subject"), message);
    }
    let method = r.method.get_ref().clone();
    let at = r.method.span().start;
    let Some(methods) = &f.methods else {
        return cx.invalid(
            at,
            format!("{key}.method"),
            "triggers need the function's IDL",
        );
    };
    if methods.iter().all(|m| m.name != method) {
        return cx.invalid(
            at,
            format!("{key}.method"),
            "the IDL declares no such method",
        );
    }
    let payload = match r
        .payload
        .as_ref()
        .map(|p| (p.get_ref().as_str(), p.span().start))
    {
        None | Some(("json", _)) => Payload::Json,
        Some(("raw", _)) => Payload::Raw,
        Some((other, at)) => {
            let message = format!("{other:?} is not one of json, raw");
            return cx.invalid(at, format!("{key}.payload"), message);
        }
    };
    let raw_field = match payload {
        Payload::Json => None,
        Payload::Raw => match raw_field(f, &method) {
            Some(name) => Some(name),
            None => {
                return cx.invalid(
                    at,
                    format!("{key}.payload"),
                    format!("\"raw\" needs a method whose only argument is binary (Thrift) or bytes (proto): {method} is not"),
                )
            }
        },
    };
    let mut policy = f.async_policy;
    if let Some(m) = &r.max_deliver {
        if !(1..=100).contains(m.get_ref()) {
            let message = format!("{} is not between 1 and 100", m.get_ref());
            return cx.invalid(m.span().start, format!("{key}.max_deliver"), message);
        }
        policy.max_attempts = *m.get_ref();
    }
    if let Some(b) = r.backoff {
        if b.is_zero() {
            return cx.invalid(
                t.span().start,
                format!("{key}.backoff"),
                "must be above zero",
            );
        }
        policy.backoff = b;
        policy.max_backoff = policy.max_backoff.max(b);
    }
    Ok(TriggerConfig {
        subject,
        method,
        payload,
        policy,
        raw_field,
    })
}

/// A NATS subject to subscribe to: dot-separated tokens, `*` a whole token, `>` the last;
/// fnmesh's own subjects (`fnmesh.`) and the system's (`$`) are not for triggers.
fn check_subject(s: &str) -> Result<(), &'static str> {
    if s.starts_with("fnmesh.") || s.starts_with('$') {
        return Err("subjects starting with fnmesh. or $ are reserved");
    }
    let tokens: Vec<&str> = s.split('.').collect();
    for (i, t) in tokens.iter().enumerate() {
        if t.is_empty() || t.chars().any(char::is_whitespace) {
            return Err("tokens must be non-empty and without spaces");
        }
        if t.contains('>') && (*t != ">" || i + 1 != tokens.len()) {
            return Err("`>` must be the whole last token");
        }
        if t.contains('*') && *t != "*" {
            return Err("`*` must be a whole token");
        }
    }
    Ok(())
}

/// The argument (Thrift) or field (proto) of `method`'s request that holds its only bytes.
fn raw_field(f: &FunctionConfig, method: &str) -> Option<String> {
    use fnmesh_idl::schema::TType;
    let service = f.service.as_deref()?;
    match f.protocol {
        Protocol::Thrift => {
            let m = f.schema.as_ref()?.service(service)?.method(method)?;
            match m.args.as_slice() {
                [only] if only.ty == TType::Binary => Some(only.name.clone()),
                _ => None,
            }
        }
        Protocol::Grpc => f.proto.as_ref()?.raw_field(service, method),
    }
}
