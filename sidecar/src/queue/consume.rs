//! A feed: one source's deliveries turned into calls of one function, at most `concurrency`
//! at a time on this node (a delivery is pulled only when a slot is free), each acknowledged
//! after its call ended, retried later after a failure, or dead-lettered.

use std::{sync::Arc, time::Duration};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{
    source::{Delivery, Source},
    status::{self, State, Status},
    Queue,
};
use crate::{
    config::{AsyncPolicy, Payload},
    error::Kind,
    thrift::json_call::{invoke, json_args, JsonCall},
};

/// How long a pull waits for messages before asking again.
const PULL_WAIT: Duration = Duration::from_secs(5);

/// Message headers fnmesh sets and reads.
pub(crate) const METHOD_HEADER: &str = "Fnmesh-Method";
pub(crate) const TIMEOUT_HEADER: &str = "Fnmesh-Timeout-Ms";
pub(crate) const CALLBACK_HEADER: &str = "X-Callback-Url";

/// What a feed's messages are.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FeedKind {
    /// Async calls: the method, deadline and callback ride in headers; the status is kept.
    Async,
    /// A trigger's messages, all calling `method`.
    Trigger {
        method: String,
        payload: Payload,
        raw_field: Option<String>,
    },
}

/// A source's deliveries for one function.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Feed {
    pub function: String,
    /// The metrics' `source` label: `async`, or the trigger's subject.
    pub label: String,
    pub kind: FeedKind,
    pub policy: AsyncPolicy,
}

/// How a delivery ended.
enum Outcome {
    Done,
    Retry(Duration),
    Dead(String),
}

/// Pulls and handles deliveries until `stop`.
pub(crate) async fn run(
    q: Arc<Queue>,
    feed: Arc<Feed>,
    source: Arc<dyn Source>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(feed.policy.concurrency));
    let mut failures = 0u32;
    loop {
        let first = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = stop.cancelled() => return,
        };
        let n = 1 + slots.available_permits();
        let mut batch = tokio::select! {
            b = source.pull(n, PULL_WAIT) => match b {
                Ok(b) => { failures = 0; b }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures % 30 == 0 {
                        tracing::warn!(function = %feed.function, source = %feed.label, error = %e, "cannot pull");
                    }
                    drop(first);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            },
            _ = stop.cancelled() => return,
        };
        let mut first = Some(first);
        loop {
            let d = tokio::select! {
                d = batch.next() => d,
                _ = stop.cancelled() => return,
            };
            let Some(d) = d else { break };
            let permit = match first.take() {
                Some(p) => p,
                None => slots.clone().acquire_owned().await.expect("never closed"),
            };
            tokio::spawn(handle(q.clone(), feed.clone(), d, permit));
        }
    }
}

/// One delivery, from pull to acknowledgment.
async fn handle(q: Arc<Queue>, feed: Arc<Feed>, d: Box<dyn Delivery>, _slot: OwnedSemaphorePermit) {
    let metrics = crate::metrics::global();
    if d.delivery() > 1 {
        metrics.queue_event(&feed.function, &feed.label, "redelivered");
    }
    // While the call runs, JetStream hears that it is in progress, so it is not delivered again.
    let d: Arc<dyn Delivery> = Arc::from(d);
    let every = q.config.ack_wait / 3;
    let alive = {
        let d = d.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let _ = d.progress().await;
            }
        })
    };
    let outcome = match &feed.kind {
        FeedKind::Async => async_call(&q, &feed, d.as_ref()).await,
        FeedKind::Trigger { .. } => trigger_call(&q, &feed, d.as_ref()).await,
    };
    alive.abort();
    // Counted as acknowledged: a message done with (run, or dead-lettered), not one sent back.
    let (sent, done) = match outcome {
        Outcome::Done => (d.ack().await, true),
        Outcome::Retry(after) => (d.retry(after).await, false),
        Outcome::Dead(reason) => match dead_letter(&q, &feed, d.as_ref(), &reason).await {
            Ok(()) => {
                metrics.queue_event(&feed.function, &feed.label, "dead_lettered");
                (d.ack().await, true)
            }
            // Not dead-lettered: it comes back after ack_wait and ends here again.
            Err(e) => (Err(e), false),
        },
    };
    match sent {
        Ok(()) if done => metrics.queue_event(&feed.function, &feed.label, "acked"),
        Ok(()) => {}
        Err(e) => {
            tracing::warn!(function = %feed.function, error = %e, "cannot acknowledge a message")
        }
    }
}

/// The error of a call that did not succeed, as the gateway answers it, and whether trying it
/// again cannot help (the IDL refused the arguments, or there is no such method).
fn failure(
    result: &Result<(http::StatusCode, Value), crate::error::CallError>,
) -> Option<(Value, bool)> {
    match result {
        Ok((s, _)) if s.is_success() => None,
        Ok((_, body)) => Some((body.clone(), false)),
        Err(e) => {
            let hopeless = matches!(e.kind, Kind::BadRequest | Kind::NoRoute | Kind::TooLarge);
            Some((
                json!({ "error": e.kind.as_str(), "message": e.to_string() }),
                hopeless,
            ))
        }
    }
}

/// A queued async call: its status moves to running, then to its end (or back to queued for a
/// retry); a cancelled call is dropped.
async fn async_call(q: &Arc<Queue>, feed: &Feed, d: &dyn Delivery) -> Outcome {
    let Some(js) = q.js.get() else {
        return Outcome::Retry(Duration::from_secs(1));
    };
    let id = d.id();
    let method = d.header(METHOD_HEADER).unwrap_or_default();
    let callback = d.header(CALLBACK_HEADER);
    let Some(mut st) = start_attempt(js, &id, feed, &method, callback.as_deref(), d).await else {
        return Outcome::Done;
    };
    let started = std::time::Instant::now();
    let timeout = d
        .header(TIMEOUT_HEADER)
        .and_then(|t| t.parse().ok())
        .map(Duration::from_millis);
    let result = match json_args(d.payload()) {
        Ok(args) => {
            let call = JsonCall {
                function: &feed.function,
                method: &method,
                args,
                timeout,
                meta: identity(&id, d.delivery()),
            };
            invoke(&q.front, Some(&q.grpc), call).await
        }
        Err(e) => Err(e),
    };
    let duration = started.elapsed();
    st.doc["duration_ms"] = json!(duration.as_millis() as u64);
    let attempt = d.delivery();
    let (outcome, http_status, body) = match failure(&result) {
        None => {
            let (code, body) = result.unwrap_or((http::StatusCode::OK, Value::Null));
            st.set(State::Succeeded);
            st.doc["result"] = body.clone();
            (Outcome::Done, code, body)
        }
        Some((error, hopeless)) => {
            let code = result.as_ref().map_or_else(
                |e| {
                    http::StatusCode::from_u16(e.kind.http_status())
                        .unwrap_or(http::StatusCode::BAD_GATEWAY)
                },
                |(c, _)| *c,
            );
            st.doc["error"] = error.clone();
            if !hopeless && attempt < feed.policy.max_attempts {
                st.set(State::Queued);
                record(js, &id, &mut st).await;
                return Outcome::Retry(feed.policy.delay(attempt + 1));
            }
            st.set(State::Failed);
            (Outcome::Dead(error.to_string()), code, error)
        }
    };
    record(js, &id, &mut st).await;
    if let Some(url) = callback {
        let (function, id) = (feed.function.clone(), id.clone());
        tokio::spawn(async move {
            super::callback::post(&url, &id, &function, http_status, duration, &body).await;
        });
    }
    outcome
}

/// Records what an attempt came to. The attempt ran, so nothing else may win: if the stored
/// status changed meanwhile (or expired, with a `retention` shorter than the call), it is
/// written over.
async fn record(js: &super::js::Js, id: &str, st: &mut Status) {
    for _ in 0..3 {
        match status::store(js, id, st).await {
            Ok(true) => return,
            Ok(false) => {
                st.revision = match status::load(js, id).await {
                    Ok(Some(current)) => current.revision,
                    _ => 0,
                };
            }
            Err(e) => {
                tracing::warn!(call = %id, error = %e, "cannot record a call's attempt");
                return;
            }
        }
    }
}

/// Marks call `id` running (attempt `d.delivery()`), unless it was cancelled or already ended:
/// then nothing is to be done.
async fn start_attempt(
    js: &super::js::Js,
    id: &str,
    feed: &Feed,
    method: &str,
    callback: Option<&str>,
    d: &dyn Delivery,
) -> Option<Status> {
    for _ in 0..5 {
        let mut st = match status::load(js, id).await {
            Ok(Some(st)) => st,
            // Expired, or never written: the message is the truth.
            Ok(None) => Status::queued(id, &feed.function, method, callback),
            Err(e) => {
                tracing::warn!(call = %id, error = %e, "cannot read a call's status");
                Status::queued(id, &feed.function, method, callback)
            }
        };
        if let Some(State::Cancelled | State::Succeeded | State::Failed) = st.state() {
            return None;
        }
        st.set(State::Running);
        st.doc["attempts"] = json!(d.delivery());
        st.doc["started_at"] = json!(status::now_rfc3339());
        match status::store(js, id, &mut st).await {
            Ok(true) => return Some(st),
            // Someone wrote it meanwhile (a cancel): read it again.
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(call = %id, error = %e, "cannot record a call's start");
                return Some(st);
            }
        }
    }
    None
}

/// The keys the function gets with a queued call, to be idempotent with.
fn identity(id: &str, delivery: u32) -> Vec<(&'static str, String)> {
    vec![
        ("fnmesh-message-id", id.to_owned()),
        ("fnmesh-delivery", delivery.to_string()),
    ]
}

/// A trigger's message: one call of its method.
async fn trigger_call(q: &Arc<Queue>, feed: &Feed, d: &dyn Delivery) -> Outcome {
    let FeedKind::Trigger {
        method,
        payload,
        raw_field,
    } = &feed.kind
    else {
        return Outcome::Done;
    };
    let args = match payload {
        Payload::Raw => {
            use base64::Engine;
            let field = raw_field.clone().unwrap_or_default();
            json!({ field: base64::engine::general_purpose::STANDARD.encode(d.payload()) })
        }
        Payload::Json => match json_args(d.payload()) {
            Ok(v) => v,
            Err(e) => return Outcome::Dead(e.to_string()),
        },
    };
    let call = JsonCall {
        function: &feed.function,
        method,
        args,
        timeout: None,
        meta: identity(&d.id(), d.delivery()),
    };
    let result = invoke(&q.front, Some(&q.grpc), call).await;
    match failure(&result) {
        None => Outcome::Done,
        Some((error, true)) => Outcome::Dead(error.to_string()),
        Some((_, false)) if d.delivery() < feed.policy.max_attempts => {
            Outcome::Retry(feed.policy.delay(d.delivery() + 1))
        }
        Some((error, false)) => Outcome::Dead(error.to_string()),
    }
}

/// Copies a message that failed for good to `fnmesh.dlq.FUNCTION`, with why.
async fn dead_letter(q: &Queue, feed: &Feed, d: &dyn Delivery, reason: &str) -> Result<(), String> {
    let Some(js) = q.js.get() else {
        return Err("not connected".into());
    };
    let mut headers = HeaderMap::new();
    headers.insert("Fnmesh-Error", one_line(reason));
    headers.insert("Fnmesh-Attempts", d.delivery().to_string().as_str());
    headers.insert("Fnmesh-Message-Id", d.id().as_str());
    headers.insert("Fnmesh-Source", feed.label.as_str());
    if let Some(m) = d.header(METHOD_HEADER) {
        headers.insert(METHOD_HEADER, m.as_str());
    }
    let subject = super::js::dlq_subject(&feed.function);
    let ack = js
        .ctx
        .publish_with_headers(subject, headers, Bytes::clone(d.payload()))
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(drop).map_err(|e| e.to_string())
}

/// A header value: one line, at most 1 KiB.
fn one_line(s: &str) -> String {
    let mut t: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if t.len() > 1024 {
        let mut end = 1024;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t.truncate(end);
    }
    t
}
