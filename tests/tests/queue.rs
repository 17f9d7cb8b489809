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
    // `fnmesh call --async`: the id printed, the call run; refusals exit by their kind.
    let fnmesh_call = |args: &[&str]| {
        let out = std::process::Command::new(fnmesh_tests::sidecar::fnmesh_bin())
            .args(["call", "-c"])
            .arg(sc.config_path())
            .arg("--async")
            .args(args)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (
            out.status.code(),
            v,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, v, err) = fnmesh_call(&["echo", "Echo", r#"{"message": "by the cli"}"#]);
    assert_eq!(
        (code, v["state"].as_str()),
        (Some(0), Some("queued")),
        "{err}"
    );
    let done = wait_state(
        &sc,
        v["id"].as_str().unwrap(),
        &["succeeded"],
        Duration::from_secs(20),
    );
    assert_eq!(done["result"]["message"], "by the cli");
    let (code, _, err) = fnmesh_call(&["echo", "Nope", "{}"]);
    assert_eq!(code, Some(10), "{err}");
    assert!(err.starts_with("fnmesh: no-route: "), "{err}");
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

/// An HTTP server on 127.0.0.1 that answers 200 to one request and hands over its head and
/// body: a callback's receiver.
fn callback_receiver() -> (u16, std::sync::mpsc::Receiver<(String, String)>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut r = BufReader::new(sock);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let len = fnmesh_tests::registries::content_length(&head);
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        let mut sock = r.into_inner();
        let _ =
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        let _ = tx.send((head, String::from_utf8_lossy(&body).into_owned()));
    });
    (port, rx)
}

#[test]
fn a_cancelled_queued_call_never_runs_and_a_callback_gets_the_result() {
    let nats = Nats::start();
    let sc = Sidecar::start(&format!(
        "{}{}[function.async]\nconcurrency = 1\n",
        nats.async_table(""),
        echo_function("echo", "max = 1", "")
    ));
    // One slot: a slow call holds it, so the next one stays queued.
    let slow = enqueue(
        &sc,
        "echo",
        "Echo",
        "",
        r#"{"message": "slow", "sleep_ms": 1500}"#,
    );
    wait_state(&sc, &slow, &["running"], Duration::from_secs(20));
    let queued = enqueue(&sc, "echo", "Echo", "", r#"{"message": "never"}"#);
    let (status, v) = http(&sc, "DELETE", &format!("/async/{queued}"), "", "");
    assert_eq!(
        (status, v["state"].as_str()),
        (200, Some("cancelled")),
        "{v}"
    );
    wait_state(&sc, &slow, &["succeeded"], Duration::from_secs(20));
    // A running or ended call cannot be cancelled.
    let (status, v) = http(&sc, "DELETE", &format!("/async/{slow}"), "", "");
    assert_eq!(status, 409, "{v}");
    // The cancelled call was pulled after the slow one and dropped: still cancelled, and the
    // instance saw only the slow call (and the count itself).
    std::thread::sleep(Duration::from_millis(500));
    let v = wait_state(&sc, &queued, &["cancelled"], Duration::from_secs(1));
    assert_eq!(v["attempts"], 0);
    let count = enqueue(&sc, "echo", "Echo", "", r#"{"message": "__count__"}"#);
    let v = wait_state(&sc, &count, &["succeeded"], Duration::from_secs(20));
    assert_eq!(v["result"]["message"], "1", "calls before this one: {v}");
    // A callback gets the result, with OpenFaaS's headers.
    let (port, received) = callback_receiver();
    let header = format!("X-Callback-Url: http://127.0.0.1:{port}/done\r\n");
    let id = enqueue(&sc, "echo", "Echo", &header, r#"{"message": "call me"}"#);
    let (head, body) = received.recv_timeout(Duration::from_secs(20)).unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("post /done http/1.1"), "{head}");
    assert!(head.contains(&format!("x-call-id: {id}")), "{head}");
    assert!(head.contains("x-function-name: echo"), "{head}");
    assert!(head.contains("x-function-status: 200"), "{head}");
    assert!(head.contains("x-duration-seconds: "), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["message"], "call me");
}

/// The value of `series` in the sidecar's `/metrics`, once it is at least `at_least`.
fn wait_metric(sc: &Sidecar, series: &str, at_least: f64, within: Duration) -> f64 {
    let until = Instant::now() + within;
    loop {
        let v = sc.metric(series);
        if v >= at_least {
            return v;
        }
        assert!(
            Instant::now() < until,
            "{series} stayed at {v}, below {at_least}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn queue_series(name: &str, function: &str, source: &str) -> String {
    format!("fnmesh_queue_{name}{{function=\"{function}\",source=\"{source}\"}}")
}

#[test]
fn trigger_messages_call_the_function_and_bad_ones_are_dead_lettered() {
    let nats = Nats::start();
    let types = format!(
        "[[function]]\nname = \"types\"\nprotocol = \"thrift\"\nidl = \"{}\"\nservice = \"Types\"\ncommand = [\"{}\"]\n\n[[function.trigger]]\nsubject = \"blobs\"\nmethod = \"Raw\"\npayload = \"raw\"\n\n",
        fnmesh_tests::sidecar::idl("tests/thrift/types.thrift").display(),
        fnmesh_tests::sidecar::bin("types-fn")
    );
    let sc = Sidecar::start(&format!(
        "{}{}[[function.trigger]]\nsubject = \"jobs.>\"\nmethod = \"Echo\"\nmax_deliver = 3\nbackoff = \"200ms\"\n\n{types}",
        nats.async_table(""),
        echo_function("echo", "", ""),
    ));
    // The feeds are live once their pending counts show (messages published before a trigger's
    // first consumer exists are not kept: docs/async.md).
    let within = Duration::from_secs(20);
    let until = Instant::now() + within;
    for series in [
        queue_series("pending", "echo", "jobs.>"),
        queue_series("pending", "types", "blobs"),
    ] {
        while !sc.admin_get("/metrics").1.contains(&series) {
            assert!(Instant::now() < until, "{series} never showed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let js = rt.block_on(nats.jetstream());
    let publish = |subject: &str, payload: &[u8]| {
        rt.block_on(async {
            let ack = js
                .publish(subject.to_owned(), payload.to_vec().into())
                .await
                .unwrap();
            ack.await.unwrap();
        })
    };
    // Fails on its first delivery, succeeds on the second (the function sees the count).
    publish("jobs.retry", br#"{"message": "__fail_below__ 2"}"#);
    // Not JSON: dead-lettered at once. Always failing: dead-lettered after 3 deliveries.
    publish("jobs.bad", b"not json");
    // The publisher's id is the message's identity (else its stream and sequence).
    rt.block_on(async {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", "order-42");
        let body = br#"{"message": "__fail__"}"#.to_vec();
        let ack = js
            .publish_with_headers("jobs.fail", h, body.into())
            .await
            .unwrap();
        ack.await.unwrap();
    });
    // Raw bytes: the method's binary argument.
    publish("blobs", &[0, 1, 2, 255]);
    wait_metric(
        &sc,
        &queue_series("acked_total", "types", "blobs"),
        1.0,
        within,
    );
    wait_metric(
        &sc,
        &queue_series("dead_lettered_total", "echo", "jobs.>"),
        2.0,
        within,
    );
    wait_metric(
        &sc,
        &queue_series("acked_total", "echo", "jobs.>"),
        3.0,
        within,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sc.metric(&queue_series("acked_total", "echo", "jobs.>")),
        3.0,
        "each message once"
    );
    assert_eq!(
        sc.metric(&queue_series("redelivered_total", "echo", "jobs.>")),
        3.0
    );
    rt.block_on(async {
        let dlq = js.get_stream("FNMESH_DLQ").await.unwrap();
        let mut seen = Vec::new();
        for seq in 1..=2 {
            let m = dlq.get_raw_message(seq).await.unwrap();
            let h = |k: &str| {
                m.headers
                    .get(k)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            seen.push((
                h("Fnmesh-Attempts"),
                h("Fnmesh-Error"),
                m.payload.clone(),
                h("Fnmesh-Message-Id"),
            ));
        }
        seen.sort();
        assert_eq!(seen[0].0, "1");
        assert!(seen[0].1.contains("malformed JSON"), "{seen:?}");
        assert_eq!(&seen[0].2[..], b"not json");
        assert!(
            seen[0].3.starts_with("FNMESH_T_") && seen[0].3.contains(':'),
            "{seen:?}"
        );
        assert_eq!(seen[1].0, "3");
        assert!(seen[1].1.contains("__fail__"), "{seen:?}");
        assert_eq!(seen[1].3, "order-42");
    });
}

/// A sidecar SIGKILLed while its calls run: JetStream delivers them again after `ack_wait`,
/// and a new sidecar completes them.
#[test]
fn calls_running_when_the_sidecar_is_killed_are_delivered_again_and_complete() {
    let nats = Nats::start();
    let config = format!(
        "{}{}",
        nats.async_table("ack_wait = \"2s\""),
        echo_function("echo", "max = 2\nconcurrency = 4", "")
    );
    let mut first = Sidecar::start(&config);
    let ids: Vec<String> = (0..5)
        .map(|i| {
            let body = format!(r#"{{"message": "slow {i}", "sleep_ms": 1500}}"#);
            enqueue(&first, "echo", "Echo", "", &body)
        })
        .collect();
    for id in &ids {
        wait_state(&first, id, &["running"], Duration::from_secs(20));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let second = Sidecar::start(&config);
    for (i, id) in ids.iter().enumerate() {
        let v = wait_state(&second, id, &["succeeded"], Duration::from_secs(30));
        assert_eq!(v["result"]["message"], format!("slow {i}"));
        assert_eq!(v["attempts"], 2, "delivered again: {v}");
    }
    assert_eq!(
        second.metric(&queue_series("redelivered_total", "echo", "async")),
        5.0
    );
}

/// Scale on lag: a burst of trigger messages for a function at zero instances starts it, scales
/// it to its `max`, and idle brings it back to zero.
#[test]
fn a_burst_of_messages_scales_a_function_from_zero_to_max_and_back() {
    let nats = Nats::start();
    let sc = Sidecar::start(&format!(
        "{}{}[function.async]\nconcurrency = 16\n\n[[function.trigger]]\nsubject = \"burst\"\nmethod = \"Echo\"\n",
        nats.async_table(""),
        echo_function("echo", "max = 3\nconcurrency = 1\nidle = \"1s\"", "")
    ));
    let series = queue_series("pending", "echo", "burst");
    let until = Instant::now() + Duration::from_secs(20);
    while !sc.admin_get("/metrics").1.contains(&series) {
        assert!(Instant::now() < until, "{series} never showed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sc.stat("echo", "processes"), 0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let js = nats.jetstream().await;
        for i in 0..40 {
            let body = format!(r#"{{"message": "m{i}", "sleep_ms": 150}}"#);
            js.publish("burst", body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let until = Instant::now() + Duration::from_secs(20);
    let mut most = 0;
    while most < 3 {
        most = most.max(sc.stat("echo", "processes"));
        assert!(Instant::now() < until, "scaled to {most} instances only");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_metric(
        &sc,
        &queue_series("acked_total", "echo", "burst"),
        40.0,
        Duration::from_secs(30),
    );
    let until = Instant::now() + Duration::from_secs(20);
    while sc.stat("echo", "processes") > 0 {
        assert!(Instant::now() < until, "never back to zero");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sum of `fnmesh_requests_total` for `function` (every method and outcome).
fn calls_of(sc: &Sidecar, function: &str) -> f64 {
    let prefix = format!("fnmesh_requests_total{{function=\"{function}\"");
    sc.admin_get("/metrics")
        .1
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `work` for each of `items` on 8 threads.
fn on_threads<T: Sync, R: Send>(items: &[T], work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let chunk = items.len().div_ceil(8);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(|| c.iter().map(&work).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// 10,000 async calls and 10,000 trigger messages: every one processed, every call id ends
/// `succeeded`, and the function saw each once plus the counted redeliveries.
#[test]
fn ten_thousand_async_calls_and_trigger_messages_are_all_processed() {
    const N: usize = 10_000;
    let nats = Nats::start();
    let sc = Sidecar::start(&format!(
        "{}{}{}[[function.trigger]]\nsubject = \"many\"\nmethod = \"Echo\"\n",
        nats.async_table("concurrency = 32"),
        echo_function("echo", "max = 2\nconcurrency = 16", ""),
        echo_function("techo", "max = 2\nconcurrency = 16", ""),
    ));
    let started = Instant::now();
    let numbers: Vec<usize> = (0..N).collect();
    let ids = on_threads(&numbers, |i| {
        enqueue(
            &sc,
            "echo",
            "Echo",
            "",
            &format!(r#"{{"message": "n{i}"}}"#),
        )
    });
    let series = queue_series("pending", "techo", "many");
    let until = Instant::now() + Duration::from_secs(20);
    while !sc.admin_get("/metrics").1.contains(&series) {
        assert!(Instant::now() < until, "{series} never showed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let js = nats.jetstream().await;
        // In rounds: the client holds at most so many acknowledgments in flight.
        for round in 0..N / 500 {
            let mut acks = Vec::with_capacity(500);
            for i in round * 500..(round + 1) * 500 {
                let body = format!(r#"{{"message": "t{i}"}}"#);
                acks.push(js.publish("many", body.into()).await.unwrap());
            }
            for a in acks {
                a.await.unwrap();
            }
        }
    });
    let within = Duration::from_secs(120);
    wait_metric(
        &sc,
        &queue_series("acked_total", "echo", "async"),
        N as f64,
        within,
    );
    wait_metric(
        &sc,
        &queue_series("acked_total", "techo", "many"),
        N as f64,
        within,
    );
    let states = on_threads(&ids, |id| {
        let (status, v) = http(&sc, "GET", &format!("/async/{id}"), "", "");
        (status, v["state"].as_str().unwrap_or("").to_owned())
    });
    let done = states
        .iter()
        .filter(|(s, st)| *s == 200 && st == "succeeded")
        .count();
    assert_eq!(done, N, "calls that ended succeeded");
    for (function, source) in [("echo", "async"), ("techo", "many")] {
        assert_eq!(
            sc.metric(&queue_series("acked_total", function, source)),
            N as f64
        );
        let redelivered = sc.metric(&queue_series("redelivered_total", function, source));
        assert_eq!(
            sc.metric(&queue_series("dead_lettered_total", function, source)),
            0.0
        );
        assert_eq!(
            calls_of(&sc, function),
            N as f64 + redelivered,
            "{function}"
        );
    }
    eprintln!(
        "{} async calls and {N} trigger messages in {:?}",
        N,
        started.elapsed()
    );
}

/// A reload adds a trigger (its messages are consumed from then on) and removes one (its
/// consumer stops).
#[test]
fn a_reload_adds_and_removes_triggers() {
    let nats = Nats::start();
    let table = |subject: &str| {
        format!(
            "{}{}[[function.trigger]]\nsubject = \"{subject}\"\nmethod = \"Echo\"\n",
            nats.async_table(""),
            echo_function("echo", "", "")
        )
    };
    let sc = Sidecar::start(&table("first"));
    let wait_series = |series: &str| {
        let until = Instant::now() + Duration::from_secs(20);
        while !sc.admin_get("/metrics").1.contains(series) {
            assert!(Instant::now() < until, "{series} never showed");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_series(&queue_series("pending", "echo", "first"));
    sc.rewrite(&table("second"));
    let (ok, text) = sc.reload();
    assert!(ok, "{text}");
    wait_series(&queue_series("pending", "echo", "second"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let js = nats.jetstream().await;
        for subject in ["first", "second"] {
            let ack = js
                .publish(subject, r#"{"message": "m"}"#.into())
                .await
                .unwrap();
            ack.await.unwrap();
        }
    });
    let second = queue_series("acked_total", "echo", "second");
    wait_metric(&sc, &second, 1.0, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        sc.metric(&queue_series("acked_total", "echo", "first")),
        0.0,
        "its feed stopped"
    );
}

/// A gRPC (volo-grpc) function's async calls take the gRPC callers' path.
#[test]
fn async_calls_reach_a_grpc_function() {
    let nats = Nats::start();
    let sc = Sidecar::start(&format!(
        "{}{}",
        nats.async_table(""),
        fnmesh_tests::sidecar::grpc_echo_function("gecho", "", "")
    ));
    let id = enqueue(
        &sc,
        "gecho",
        "UnaryEcho",
        "",
        r#"{"message": "grpc later"}"#,
    );
    let v = wait_state(&sc, &id, &["succeeded"], Duration::from_secs(20));
    assert_eq!(v["result"]["message"], "grpc later", "{v}");
    // No body: the request message's defaults, as the gateway takes it.
    let id = enqueue(&sc, "gecho", "UnaryEcho", "", "");
    let v = wait_state(&sc, &id, &["succeeded"], Duration::from_secs(20));
    assert_eq!(v["result"]["message"], "", "{v}");
    let (status, v) = http(&sc, "POST", "/async/gecho/ServerStreamingEcho", "", "{}");
    assert_eq!(status, 404, "streaming methods cannot be queued: {v}");
}

/// NATS going away: synchronous calls are untouched, async calls get `unavailable` (nothing is
/// lost: nothing was accepted), and once NATS is back, queued work flows again.
#[test]
fn nats_going_away_hurts_only_async_calls_and_they_resume() {
    let mut nats = Nats::start();
    let sc = async_sidecar(&nats, "", "");
    let id = enqueue(&sc, "echo", "Echo", "", r#"{"message": "before"}"#);
    wait_state(&sc, &id, &["succeeded"], Duration::from_secs(20));
    assert!(sc.admin_get("/readyz").1.contains("async: connected"));
    nats.stop();
    let (status, v) = http(
        &sc,
        "POST",
        "/async/echo/Echo",
        "",
        r#"{"message": "during"}"#,
    );
    assert_eq!(
        (status, v["error"].as_str()),
        (503, Some("unavailable")),
        "{v}"
    );
    let (status, ready) = sc.admin_get("/readyz");
    assert!(
        status.contains("200") && ready.contains("async: not ready"),
        "{status} {ready}"
    );
    let (status, v) = http(&sc, "POST", "/echo/Echo", "", r#"{"message": "sync"}"#);
    assert_eq!((status, v["message"].as_str()), (200, Some("sync")), "{v}");
    nats.restart();
    let id = enqueue(&sc, "echo", "Echo", "", r#"{"message": "after"}"#);
    let v = wait_state(&sc, &id, &["succeeded"], Duration::from_secs(30));
    assert_eq!(v["result"]["message"], "after");
}

/// A call longer than `ack_wait` keeps its message (in-progress reports), so it runs once; a
/// call's status expires after `retention`.
#[test]
fn long_calls_are_not_delivered_again_and_statuses_expire() {
    let nats = Nats::start();
    let sc = async_sidecar(&nats, "ack_wait = \"1s\"\nretention = \"3s\"", "");
    let id = enqueue(
        &sc,
        "echo",
        "Echo",
        "",
        r#"{"message": "long", "sleep_ms": 3500}"#,
    );
    let v = wait_state(&sc, &id, &["succeeded"], Duration::from_secs(20));
    assert_eq!(v["attempts"], 1, "{v}");
    assert_eq!(
        sc.metric(&queue_series("redelivered_total", "echo", "async")),
        0.0
    );
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = http(&sc, "GET", &format!("/async/{id}"), "", "");
        if status == 404 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the status outlived its retention: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Two nodes on one NATS share a function's async calls: each call runs once, and both nodes
/// take part.
#[test]
fn two_nodes_share_the_calls_and_run_each_once() {
    let nats = Nats::start();
    let table = format!(
        "{}{}",
        nats.async_table("concurrency = 4"),
        echo_function("echo", "max = 1\nconcurrency = 4", "")
    );
    let (a, b) = (Sidecar::start(&table), Sidecar::start(&table));
    let ids: Vec<String> = (0..200)
        .map(|i| {
            let node = if i % 2 == 0 { &a } else { &b };
            enqueue(
                node,
                "echo",
                "Echo",
                "",
                &format!(r#"{{"message": "s{i}", "sleep_ms": 20}}"#),
            )
        })
        .collect();
    for id in &ids {
        wait_state(&a, id, &["succeeded"], Duration::from_secs(60));
    }
    let (ran_a, ran_b) = (calls_of(&a, "echo"), calls_of(&b, "echo"));
    assert_eq!(ran_a + ran_b, 200.0, "each call once: {ran_a} + {ran_b}");
    assert!(
        ran_a > 0.0 && ran_b > 0.0,
        "both nodes worked: {ran_a} + {ran_b}"
    );
}
