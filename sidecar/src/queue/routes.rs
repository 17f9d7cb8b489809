//! `POST /async/{function}/{method}`, `GET /async/{id}` and `DELETE /async/{id}` on the main
//! listener (docs/async.md).

use std::{hash::BuildHasher, sync::Arc};

use async_nats::HeaderMap;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::{
    consume::{CALLBACK_HEADER, METHOD_HEADER, TIMEOUT_HEADER},
    status::{self, State, Status},
    Queue,
};
use crate::{
    error::{CallError, Kind},
    thrift::{
        http::AsyncRequest,
        json_call::{deadline, json_args, prepare, JsonCall},
    },
};

fn bad(message: impl Into<String>) -> CallError {
    CallError::new(Kind::BadRequest, message)
}

fn unavailable(message: impl Into<String>) -> CallError {
    CallError::new(Kind::Unavailable, message)
}

pub(crate) async fn answer(
    q: Arc<Queue>,
    req: AsyncRequest,
) -> Result<(StatusCode, Value), CallError> {
    let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    match (&req.method, parts.as_slice()) {
        (&Method::POST, [function, method]) => enqueue(&q, function, method, &req).await,
        (&Method::GET, [id]) => {
            let js = q.connected()?;
            match status::load(js, id).await.map_err(unavailable)? {
                Some(st) => Ok((StatusCode::OK, st.doc)),
                None => Err(CallError::new(Kind::NoRoute, format!("no async call {id}"))),
            }
        }
        (&Method::DELETE, [id]) => cancel(&q, id).await,
        _ => Err(CallError::new(
            Kind::NoRoute,
            format!(
                "{} /async{}: use POST /async/FUNCTION/METHOD, GET or DELETE /async/ID",
                req.method, req.path
            ),
        )),
    }
}

/// Checks the call as the gateway would (404, 400), records it queued, and publishes it; 202
/// once JetStream has stored it.
async fn enqueue(
    q: &Queue,
    function: &str,
    method: &str,
    req: &AsyncRequest,
) -> Result<(StatusCode, Value), CallError> {
    let timeout = deadline(req.headers.get(crate::thrift::http::TIMEOUT_HEADER))?;
    let callback = req
        .headers
        .get(CALLBACK_HEADER)
        .and_then(|v| v.to_str().ok());
    if let Some(url) = callback {
        let ok = url
            .parse::<http::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some());
        if !ok {
            return Err(bad(format!(
                "{CALLBACK_HEADER}: want an http:// URL, got {url:?}"
            )));
        }
    }
    let call = JsonCall {
        function,
        method,
        args: json_args(&req.body)?,
        timeout,
        meta: Vec::new(),
    };
    prepare(&q.front, Some(&q.grpc), call)?;
    let js = q.connected()?;
    let id = new_id();
    let mut st = Status::queued(&id, function, method, callback);
    status::store(js, &id, &mut st)
        .await
        .map_err(|e| unavailable(format!("cannot record the call: {e}")))?;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    headers.insert(METHOD_HEADER, method);
    if let Some(t) = timeout {
        headers.insert(TIMEOUT_HEADER, t.as_millis().to_string().as_str());
    }
    if let Some(url) = callback {
        headers.insert(CALLBACK_HEADER, url);
    }
    let subject = super::js::async_subject(function);
    let published = match js
        .ctx
        .publish_with_headers(subject, headers, req.body.clone())
        .await
    {
        Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = published {
        st.set(State::Failed);
        st.doc["error"] = json!({ "error": "unavailable", "message": format!("not queued: {e}") });
        let _ = status::store(js, &id, &mut st).await;
        return Err(unavailable(format!("the call was not queued: {e}")));
    }
    Ok((StatusCode::ACCEPTED, json!({ "id": id, "state": "queued" })))
}

/// A queued call becomes `cancelled` (it will never run); a running or ended one is 409.
async fn cancel(q: &Queue, id: &str) -> Result<(StatusCode, Value), CallError> {
    let js = q.connected()?;
    for _ in 0..5 {
        let Some(mut st) = status::load(js, id).await.map_err(unavailable)? else {
            return Err(CallError::new(Kind::NoRoute, format!("no async call {id}")));
        };
        match st.state() {
            Some(State::Queued) => {}
            Some(State::Cancelled) => return Ok((StatusCode::OK, st.doc)),
            other => {
                let state = other.map_or("unknown", State::as_str);
                let body = json!({ "error": "conflict", "message": format!("call {id} is {state}: only a queued call can be cancelled") });
                return Ok((StatusCode::CONFLICT, body));
            }
        }
        st.set(State::Cancelled);
        if status::store(js, id, &mut st).await.map_err(unavailable)? {
            return Ok((StatusCode::OK, st.doc));
        }
    }
    Err(unavailable(format!("call {id} kept changing")))
}

/// A call id: 128 random bits as hex (the std hasher's keys come from the OS's randomness),
/// made unique in this process by a counter.
fn new_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let a = std::collections::hash_map::RandomState::new().hash_one(n);
    let b = std::collections::hash_map::RandomState::new().hash_one((n, std::process::id()));
    format!("{a:016x}{b:016x}")
}
