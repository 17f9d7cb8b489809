//! Async invocations and queue triggers on NATS JetStream (docs/async.md). The queue connects
//! in the background (the sidecar serves without it, and `/async` answers `unavailable` until
//! it is there), then keeps a feed per function (its async calls) and per trigger, each a
//! durable consumer every node shares, reconciled after each reload.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

mod callback;
mod consume;
mod js;
mod routes;
mod source;
mod status;

use consume::{Feed, FeedKind};
use js::Js;

use crate::{
    config::{AsyncConfig, FunctionConfig},
    error::{CallError, Kind},
    lock,
    mesh::Mesh,
    thrift::{
        http::{AsyncRequest, AsyncRoutes},
        json_call::GrpcGateway,
        ThriftFront,
    },
};

/// A feed running: what it is, how to stop it, and its source (asked for its pending count).
struct Running {
    feed: Arc<Feed>,
    stop: CancellationToken,
    source: Arc<dyn source::Source>,
}

pub struct Queue {
    config: AsyncConfig,
    front: Arc<ThriftFront>,
    grpc: GrpcGateway,
    /// Set once connected and set up.
    js: OnceLock<Js>,
    /// Why it is not (yet) connected.
    problem: Mutex<String>,
    /// The feeds running, by consumer name.
    feeds: Mutex<HashMap<String, Running>>,
    /// Stops everything (the sidecar's drain).
    stop: CancellationToken,
}

impl Queue {
    /// Starts the queue when the file has `[async]`: it connects in the background, then feeds
    /// the functions and follows reloads.
    pub fn start(mesh: &Arc<Mesh>, grpc: GrpcGateway) -> Option<Arc<Queue>> {
        let config = mesh.queue_config()?;
        let q = Arc::new(Queue {
            config,
            front: mesh.thrift.clone(),
            grpc,
            js: OnceLock::new(),
            problem: Mutex::new("connecting".into()),
            feeds: Mutex::default(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(q.clone().run(mesh.clone()));
        Some(q)
    }

    /// The routes the gateway hands `/async/...` to.
    pub fn routes(self: &Arc<Self>) -> AsyncRoutes {
        let q = self.clone();
        Arc::new(move |req: AsyncRequest| Box::pin(routes::answer(q.clone(), req)))
    }

    /// Stops pulling; calls in flight end on their own (or are delivered again elsewhere).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// `None` when connected; else why not.
    pub fn problem(&self) -> Option<String> {
        let js = match self.js.get() {
            Some(js) => js,
            None => return Some(lock(&self.problem).clone()),
        };
        match js.ctx.client().connection_state() {
            async_nats::connection::State::Connected => None,
            other => Some(format!("{other} to {}", self.config.nats)),
        }
    }

    fn connected(&self) -> Result<&Js, CallError> {
        self.js.get().ok_or_else(|| {
            CallError::new(
                Kind::Unavailable,
                format!("the queue is not ready: {}", lock(&self.problem)),
            )
        })
    }

    async fn run(self: Arc<Self>, mesh: Arc<Mesh>) {
        let mut tries = 0u32;
        let js = loop {
            match js::connect(&self.config).await {
                Ok(js) => break js,
                Err(e) => {
                    tries += 1;
                    if tries == 1 || tries % 30 == 0 {
                        tracing::warn!(error = %e, "the async queue is not ready");
                    }
                    *lock(&self.problem) = e;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.stop.cancelled() => return,
                    }
                }
            }
        };
        let _ = self.js.set(js);
        tracing::info!(nats = %self.config.nats, "the async queue is connected");
        let mut reloads = mesh.grpc.reloads.subscribe();
        tokio::spawn(self.clone().watch_pending());
        loop {
            let functions: Vec<FunctionConfig> = mesh
                .functions()
                .iter()
                .map(|f| (*f.config()).clone())
                .collect();
            self.reconcile(&functions).await;
            tokio::select! {
                changed = reloads.changed() => if changed.is_err() { return },
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Starts the feeds the functions need and stops those they no longer do.
    async fn reconcile(self: &Arc<Self>, functions: &[FunctionConfig]) {
        let Some(js) = self.js.get() else { return };
        let mut wanted: Vec<(String, String, String, Feed)> = Vec::new();
        for f in functions
            .iter()
            .filter(|f| f.schema.is_some() || f.proto.is_some())
        {
            let feed = Feed {
                function: f.name.clone(),
                label: "async".into(),
                kind: FeedKind::Async,
                policy: f.async_policy,
            };
            let durable = format!("fnmesh-async-{}", js::token(&f.name));
            wanted.push((
                durable,
                js::ASYNC_STREAM.into(),
                js::async_subject(&f.name),
                feed,
            ));
            for (n, t) in f.triggers.iter().enumerate() {
                let stream = match js::ensure_trigger_stream(&js.ctx, &t.subject).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(function = %f.name, subject = %t.subject, error = %e, "the trigger cannot be set up");
                        continue;
                    }
                };
                let feed = Feed {
                    function: f.name.clone(),
                    label: t.subject.clone(),
                    kind: FeedKind::Trigger {
                        method: t.method.clone(),
                        payload: t.payload,
                        raw_field: t.raw_field.clone(),
                    },
                    policy: t.policy,
                };
                let durable = format!("fnmesh-trigger-{}-{n}", js::token(&f.name));
                wanted.push((durable, stream, t.subject.clone(), feed));
            }
        }
        let mut feeds = std::mem::take(&mut *lock(&self.feeds));
        feeds.retain(|name, r| {
            let keep = wanted.iter().any(|(n, _, _, f)| n == name && *r.feed == *f);
            if !keep {
                r.stop.cancel();
            }
            keep
        });
        for (durable, stream, filter, feed) in wanted {
            if feeds.contains_key(&durable) {
                continue;
            }
            let concurrency = feed.policy.concurrency;
            let consumer = match js::pull_consumer(
                &js.ctx,
                &stream,
                &durable,
                &filter,
                self.config.ack_wait,
                concurrency,
            )
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(function = %feed.function, error = %e, "cannot consume");
                    continue;
                }
            };
            let source: Arc<dyn source::Source> = Arc::new(source::JetStreamSource { consumer });
            let stop = self.stop.child_token();
            let feed = Arc::new(feed);
            tokio::spawn(consume::run(
                self.clone(),
                feed.clone(),
                source.clone(),
                stop.clone(),
            ));
            feeds.insert(durable, Running { feed, stop, source });
        }
        *lock(&self.feeds) = feeds;
    }

    /// Every few seconds, off the request path: each feed's pending messages, for `/metrics`.
    async fn watch_pending(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = self.stop.cancelled() => return,
            }
            let live: Vec<(Arc<Feed>, Arc<dyn source::Source>)> = lock(&self.feeds)
                .values()
                .map(|r| (r.feed.clone(), r.source.clone()))
                .collect();
            for (feed, source) in live {
                if let Some(n) = source.pending().await {
                    crate::metrics::global().queue_pending(&feed.function, &feed.label, n);
                }
            }
        }
    }
}
