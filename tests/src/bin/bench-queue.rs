//! Queue triggers against a plain JetStream consumer, in one run (issue 22): the example
//! function fed from NATS JetStream by fnmesh's trigger, and by a plain `async-nats` pull
//! consumer that calls the same function directly with a Volo client and acknowledges, both
//! with 64 messages in flight. Throughput (target: fnmesh at least 0.8x the plain consumer),
//! then publish-to-acknowledgment latency at low load and from zero instances.
//!
//! Run: `cargo run --release -p fnmesh-tests --bin bench-queue`. It prints figures; it asserts
//! nothing.
#![forbid(unsafe_code)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer, stream};
use fnmesh_tests::{
    bench::{pct, print_machine, start_function},
    gen::volo_gen::echo::{EchoRequest, EchoServiceClientBuilder},
    nats::Nats,
    sidecar::{echo_fn, echo_function, Sidecar},
};
use futures_util::StreamExt;

const IN_FLIGHT: usize = 64;
const MESSAGES: usize = 20_000;

fn message(i: usize) -> bytes::Bytes {
    format!(r#"{{"message": "m{i} {}"}}"#, "x".repeat(100)).into()
}

/// The plain consumer: pulls continuously, calls the function directly, acknowledges.
async fn plain_consumer(js: jetstream::Context, function: std::net::SocketAddr) {
    let s = js
        .get_or_create_stream(stream::Config {
            name: "BENCH_PLAIN".into(),
            subjects: vec!["bench.plain".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
    let c = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("plain".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: IN_FLIGHT as i64,
            ..Default::default()
        })
        .await
        .unwrap();
    let client = EchoServiceClientBuilder::new("echo")
        .address(function)
        .build();
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut messages = c.messages().await.unwrap();
    while let Some(Ok(m)) = messages.next().await {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        tokio::spawn(async move {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            let req = EchoRequest {
                message: v["message"].as_str().unwrap().to_owned().into(),
                sleep_ms: None,
                meta: None,
            };
            client.echo(req).await.expect("call");
            m.ack().await.unwrap();
            drop(permit);
        });
    }
}

/// Waits until `stream` holds no message (every one acknowledged).
async fn drained(js: &jetstream::Context, stream: &str) {
    let mut s = js.get_stream(stream).await.unwrap();
    while s.info().await.unwrap().state.messages > 0 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Publishes `n` messages on `subject` (while nothing consumes it).
async fn fill(js: &jetstream::Context, subject: &str, n: usize) {
    for round in 0..n / 500 {
        let mut acks = Vec::with_capacity(500);
        for i in round * 500..(round + 1) * 500 {
            acks.push(js.publish(subject.to_owned(), message(i)).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
        }
    }
}

/// How fast `stream`'s backlog of `n` goes once its consumer starts: messages acknowledged per
/// second, from the first acknowledgment to the last.
async fn drain_rate(js: &jetstream::Context, stream: &str, n: u64) -> f64 {
    let mut s = js.get_stream(stream).await.unwrap();
    let (t0, m0) = loop {
        let m = s.info().await.unwrap().state.messages;
        if m < n {
            break (Instant::now(), m);
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    drained(js, stream).await;
    m0 as f64 / t0.elapsed().as_secs_f64()
}

/// One message at a time: publish to acknowledgment.
async fn latencies(
    js: &jetstream::Context,
    subject: &str,
    stream: &str,
    n: usize,
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        js.publish(subject.to_owned(), message(i))
            .await
            .unwrap()
            .await
            .unwrap();
        drained(js, stream).await;
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn trigger_sidecar(nats: &Nats, subject: &str, scale: &str) -> Sidecar {
    Sidecar::start(&format!(
        "{}{}[function.async]\nconcurrency = {IN_FLIGHT}\n\n[[function.trigger]]\nsubject = \"{subject}\"\nmethod = \"Echo\"\n",
        nats.async_table(""),
        echo_function("echo", scale, ""),
    ))
}

/// The trigger stream fnmesh made for `subject`, once there.
async fn trigger_stream(js: &jetstream::Context, subject: &str) -> String {
    loop {
        if let Ok(name) = js.stream_by_subject(subject).await {
            return name;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() {
    print_machine();
    let nats = Nats::start();
    let js = nats.jetstream().await;
    let (_direct, direct) = start_function(&echo_fn());
    let warm_scale = "min = 1\nmax = 1\nconcurrency = 1024";
    let plain_task = tokio::spawn(plain_consumer(js.clone(), direct));
    let warm = trigger_sidecar(&nats, "bench.fnmesh", warm_scale);
    let fnmesh_stream = trigger_stream(&js, "bench.fnmesh").await;
    // Both feeds are live once a first message goes through.
    latencies(&js, "bench.fnmesh", &fnmesh_stream, 1).await;
    latencies(&js, "bench.plain", "BENCH_PLAIN", 1).await;
    plain_task.abort();
    drop(warm);
    println!("\ntriggered calls: a backlog of {MESSAGES} messages of ~120 bytes drained with {IN_FLIGHT} in flight (3 rounds, taking turns)");
    let (mut plain, mut mesh) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        fill(&js, "bench.plain", MESSAGES).await;
        let task = tokio::spawn(plain_consumer(js.clone(), direct));
        plain.push(drain_rate(&js, "BENCH_PLAIN", MESSAGES as u64).await);
        task.abort();
        // The durable consumer keeps the backlog while no sidecar runs.
        fill(&js, "bench.fnmesh", MESSAGES).await;
        let sc = trigger_sidecar(&nats, "bench.fnmesh", warm_scale);
        mesh.push(drain_rate(&js, &fnmesh_stream, MESSAGES as u64).await);
        drop(sc);
    }
    let warm = trigger_sidecar(&nats, "bench.fnmesh", warm_scale);
    let _plain = tokio::spawn(plain_consumer(js.clone(), direct));
    println!("| path | calls/s (each round) | best | vs plain consumer |");
    println!("|---|---|---|---|");
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let rounds = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "| plain async-nats consumer, direct Volo call | {} | {:.0} | 1.00x |",
        rounds(&plain),
        best(&plain)
    );
    println!(
        "| fnmesh trigger | {} | {:.0} | **{:.2}x** |",
        rounds(&mesh),
        best(&mesh),
        best(&mesh) / best(&plain)
    );
    println!("\npublish to acknowledgment, one message at a time (300 each)");
    println!("| path | p50 | p99 |");
    println!("|---|---|---|");
    let l = latencies(&js, "bench.plain", "BENCH_PLAIN", 300).await;
    println!(
        "| plain consumer | {:.2?} | {:.2?} |",
        pct(&l, 0.5),
        pct(&l, 0.99)
    );
    let l = latencies(&js, "bench.fnmesh", &fnmesh_stream, 300).await;
    println!(
        "| fnmesh trigger, warm | {:.2?} | {:.2?} |",
        pct(&l, 0.5),
        pct(&l, 0.99)
    );
    drop(warm);
    // From zero: the instance idles out (300 ms) before each message.
    let cold = trigger_sidecar(&nats, "bench.cold", "idle = \"300ms\"");
    let cold_stream = trigger_stream(&js, "bench.cold").await;
    latencies(&js, "bench.cold", &cold_stream, 1).await;
    let mut l = Vec::new();
    for _ in 0..15 {
        while cold.stat("echo", "processes") > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        l.extend(latencies(&js, "bench.cold", &cold_stream, 1).await);
    }
    l.sort();
    println!(
        "| fnmesh trigger, from zero instances (15) | {:.2?} | {:.2?} (max) |",
        pct(&l, 0.5),
        l[l.len() - 1]
    );
}
