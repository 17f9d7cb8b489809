//! Async invocations and queue triggers end to end (docs/async.md): a real `nats-server -js`
//! started by each test, a sidecar with `[async]`, and the example Volo function.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use fnmesh_tests::{
    nats::Nats,
    registries::http_request,
    sidecar::{echo_function, Sidecar},
};
use serde_json::{json, Value};

/// `method path` on the sidecar's main listener: status and JSON body.
fn http(sc: &Sidecar, method: &str, path: &str, headers: &str, body: &str) -> (u16, Value) {
    let (status, body) = http_request(sc.addr.port(), method, path, headers, body);
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// Queues `body` for `function`'s `method` (waiting while the queue connects): the call id.
fn enqueue(sc: &Sidecar, function: &str, method: &str, headers: &str, body: &str) -> String {
    let path = format!("/async/{function}/{method}");
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = http(sc, "POST", &path, headers, body);
        if status == 202 {
            return v["id"].as_str().unwrap().to_owned();
        }
        assert!(
            status == 503 && Instant::now() < until,
            "{path}: {status} {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Call `id`'s status once its state is one of `states`.
fn wait_state(sc: &Sidecar, id: &str, states: &[&str], within: Duration) -> Value {
    let until = Instant::now() + within;
    loop {
        let (status, v) = http(sc, "GET", &format!("/async/{id}"), "", "");
        if status == 200 && states.iter().any(|s| v["state"] == *s) {
            return v;
        }
        assert!(
            Instant::now() < until,
            "call {id} never became {states:?}: {status} {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn async_sidecar(nats: &Nats, extra: &str, scale: &str) -> Sidecar {
    Sidecar::start(&format!(
        "{}{}",
        nats.async_table(extra),
        echo_function("echo", scale, "")
    ))
}

#[test]
fn async_calls_are_queued_run_and_their_status_kept() {
    let nats = Nats::start();
    let sc = async_sidecar(&nats, "", "");
    let id = enqueue(&sc, "echo", "Echo", "", r#"{"message": "later"}"#);
    let done = wait_state(&sc, &id, &["succeeded"], Duration::from_secs(20));
    assert_eq!(done["result"], json!({"message": "later", "instance": "1"}));
    assert_eq!(done["attempts"], 1);
    assert_eq!(
        (done["function"].as_str(), done["method"].as_str()),
        (Some("echo"), Some("Echo"))
    );
    assert!(
        done["duration_ms"].is_u64() && done["queued_at"].is_string(),
        "{done}"
    );
    // The function got the call id and the delivery count, to be idempotent with.
    let id2 = enqueue(
        &sc,
        "echo",
        "Echo",
        "",
        r#"{"message": "__meta__ fnmesh-message-id"}"#,
    );
    let v = wait_state(&sc, &id2, &["succeeded"], Duration::from_secs(20));
    assert_eq!(v["result"]["message"], json!(id2));
    // Refused before anything is queued: unknown function or method, JSON the IDL refuses.
    for (path, body, status, kind) in [
        ("/async/nope/Echo", r#"{"message": "x"}"#, 404, "no-route"),
        ("/async/echo/Nope", r#"{"message": "x"}"#, 404, "no-route"),
        ("/async/echo/Echo", r#"{"message": 5}"#, 400, "bad-request"),
        ("/async/echo/Echo", r#"{"message": "#, 400, "bad-request"),
    ] {
        let (got, v) = http(&sc, "POST", path, "", body);
        assert_eq!(
            (got, v["error"].as_str()),
            (status, Some(kind)),
            "{path} {body}: {v}"
        );
    }
    let (status, v) = http(&sc, "GET", "/async/0123456789abcdef", "", "");
    assert_eq!(
        (status, v["error"].as_str()),
        (404, Some("no-route")),
        "{v}"
    );
}

#[test]
fn failures_are_retried_with_backoff_then_fail_to_the_dead_letter_subject() {
    let nats = Nats::start();
    let sc = async_sidecar(&nats, "max_attempts = 3\nbackoff = \"200ms\"", "");
    // Fails on deliveries 1 and 2, succeeds on the third.
    let id = enqueue(
        &sc,
        "echo",
        "Echo",
        "",
        r#"{"message": "__fail_below__ 3"}"#,
    );
    let v = wait_state(&sc, &id, &["succeeded"], Duration::from_secs(20));
    assert_eq!(v["result"]["message"], "delivery 3");
    assert_eq!(v["attempts"], 3);
    // Always fails: `failed` after 3 attempts, with the error, and in the dead-letter stream.
    let id = enqueue(&sc, "echo", "Echo", "", r#"{"message": "__fail__"}"#);
    let v = wait_state(&sc, &id, &["failed"], Duration::from_secs(20));
    assert_eq!(v["attempts"], 3);
    assert_eq!(v["error"]["error"], "application-exception", "{v}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let js = nats.jetstream().await;
        let mut dlq = js.get_stream("FNMESH_DLQ").await.unwrap();
        let info = dlq.info().await.unwrap();
        assert_eq!(info.state.messages, 1);
        let m = dlq
            .get_last_raw_message_by_subject("fnmesh.dlq.echo")
            .await
            .unwrap();
        let h = m.headers;
        assert_eq!(
            h.get("Fnmesh-Message-Id").map(|v| v.as_str()),
            Some(id.as_str())
        );
        assert_eq!(h.get("Fnmesh-Attempts").map(|v| v.as_str()), Some("3"));
        assert!(h.get("Fnmesh-Error").unwrap().as_str().contains("__fail__"));
        assert_eq!(&m.payload[..], br#"{"message": "__fail__"}"#);
    });
    let (_, metrics) = sc.admin_get("/metrics");
    let series = |name: &str| format!("{name}{{function=\"echo\",source=\"async\"}}");
    assert!(
        metrics.contains(&format!("{} 1", series("fnmesh_queue_dead_lettered_total"))),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("{} 4", series("fnmesh_queue_redelivered_total"))),
        "{metrics}"
    );
}
