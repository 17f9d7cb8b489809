//! What fnmesh keeps in NATS JetStream (docs/async.md): the async calls' work-queue stream,
//! the dead-letter stream, a stream per trigger subject, a durable pull consumer per function
//! and trigger (shared by every node), and the calls' key-value bucket.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::config::AsyncConfig;

pub(crate) const ASYNC_STREAM: &str = "FNMESH_ASYNC";
pub(crate) const DLQ_STREAM: &str = "FNMESH_DLQ";
pub(crate) const CALLS_STREAM: &str = "FNMESH_CALLS";
const DLQ_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// A connected JetStream, with the calls' status stream.
#[derive(Clone)]
pub(crate) struct Js {
    pub ctx: jetstream::Context,
    pub calls: stream::Stream,
}

/// A name as a NATS token and a stream or consumer name allow it: `.` (a token separator) is
/// replaced, with a hash of the original so that `a.b` and `a_b` stay apart.
pub(crate) fn token(name: &str) -> String {
    if !name.contains(['.', '*', '>', ' ']) {
        return name.to_owned();
    }
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{cleaned}-{:08x}", fnv(name) as u32)
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The subject a function's async calls are published on.
pub(crate) fn async_subject(function: &str) -> String {
    format!("fnmesh.async.{function}")
}

/// The subject a function's dead letters are published on.
pub(crate) fn dlq_subject(function: &str) -> String {
    format!("fnmesh.dlq.{function}")
}

/// The stream that captures a trigger's subject (one per distinct subject, so that functions
/// triggered by the same subject each get every message).
pub(crate) fn trigger_stream(subject: &str) -> String {
    format!("FNMESH_T_{:016x}", fnv(subject))
}

/// Connects (retrying in the background while the server is away) and makes sure the streams
/// and the bucket exist as configured.
pub(crate) async fn connect(config: &AsyncConfig) -> Result<Js, String> {
    let client = async_nats::ConnectOptions::new()
        .name("fnmesh")
        .connection_timeout(Duration::from_secs(3))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(config.nats.as_str())
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", config.nats))?;
    let ctx = jetstream::new(client);
    ensure_stream(
        &ctx,
        stream::Config {
            name: ASYNC_STREAM.into(),
            subjects: vec!["fnmesh.async.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        },
    )
    .await?;
    ensure_stream(
        &ctx,
        stream::Config {
            name: DLQ_STREAM.into(),
            subjects: vec!["fnmesh.dlq.>".into()],
            max_age: DLQ_AGE,
            storage: stream::StorageType::File,
            ..Default::default()
        },
    )
    .await?;
    // The calls' statuses: a stream holding the last message of each call's subject, which is
    // what a JetStream key-value bucket is (async-nats's bucket API cannot read nats-server
    // 2.9's answers).
    ensure_stream(
        &ctx,
        stream::Config {
            name: CALLS_STREAM.into(),
            subjects: vec!["fnmesh.calls.>".into()],
            max_messages_per_subject: 1,
            max_age: config.retention,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            ..Default::default()
        },
    )
    .await?;
    let calls = ctx
        .get_stream(CALLS_STREAM)
        .await
        .map_err(|e| format!("stream {CALLS_STREAM}: {e}"))?;
    Ok(Js { ctx, calls })
}

pub(crate) async fn ensure_stream(
    ctx: &jetstream::Context,
    config: stream::Config,
) -> Result<(), String> {
    let name = config.name.clone();
    ctx.create_or_update_stream(config)
        .await
        .map(drop)
        .map_err(|e| format!("cannot create stream {name}: {e}"))
}

/// The stream capturing a trigger's `subject` (messages kept until every consumer of it has
/// acknowledged them).
pub(crate) async fn ensure_trigger_stream(
    ctx: &jetstream::Context,
    subject: &str,
) -> Result<String, String> {
    let name = trigger_stream(subject);
    ensure_stream(
        ctx,
        stream::Config {
            name: name.clone(),
            subjects: vec![subject.to_owned()],
            retention: stream::RetentionPolicy::Interest,
            storage: stream::StorageType::File,
            description: Some(format!("fnmesh trigger: {subject}")),
            ..Default::default()
        },
    )
    .await?;
    Ok(name)
}

/// A durable pull consumer, created or brought to this configuration. Redelivery after a
/// failure is fnmesh's (a NAK with its backoff), so JetStream's own limit is left off; `ack_wait`
/// covers a consumer that went away.
pub(crate) async fn pull_consumer(
    ctx: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
    ack_wait: Duration,
    max_in_flight: usize,
) -> Result<consumer::PullConsumer, String> {
    let fail = |e: &dyn std::fmt::Display| format!("consumer {durable} on {stream}: {e}");
    let s = ctx.get_stream(stream).await.map_err(|e| fail(&e))?;
    s.create_consumer(consumer::pull::Config {
        durable_name: Some(durable.to_owned()),
        filter_subject: filter.to_owned(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_ack_pending: i64::try_from(max_in_flight.max(1000)).unwrap_or(i64::MAX),
        ..Default::default()
    })
    .await
    .map_err(|e| fail(&e))
}
