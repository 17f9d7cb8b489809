//! Where queued work comes from, behind a small interface so that another queue (Kafka) can
//! follow JetStream: a source hands out batches of deliveries when asked, and each delivery is
//! acknowledged, retried later, or given up on.

use std::time::Duration;

use async_nats::jetstream::{consumer::PullConsumer, AckKind};
use bytes::Bytes;
use futures_util::{stream::BoxStream, StreamExt};

/// A queue's consumer, shared by every node.
#[async_trait::async_trait]
pub(crate) trait Source: Send + Sync {
    /// Up to `n` deliveries, as they arrive, for at most `wait`.
    async fn pull(
        &self,
        n: usize,
        wait: Duration,
    ) -> Result<BoxStream<'static, Box<dyn Delivery>>, String>;
    /// Messages waiting for this consumer (none when the source cannot tell).
    async fn pending(&self) -> Option<u64>;
}

/// One delivery of a message.
#[async_trait::async_trait]
pub(crate) trait Delivery: Send + Sync {
    fn payload(&self) -> &Bytes;
    fn header(&self, name: &str) -> Option<String>;
    /// The message's identity: the publisher's id, else its place in the queue.
    fn id(&self) -> String;
    /// How many times it was delivered, this one included.
    fn delivery(&self) -> u32;
    async fn ack(&self) -> Result<(), String>;
    /// Deliver it again after `after`.
    async fn retry(&self, after: Duration) -> Result<(), String>;
    /// Still working on it: do not deliver it again yet.
    async fn progress(&self) -> Result<(), String>;
}

pub(crate) struct JetStreamSource {
    pub consumer: PullConsumer,
}

#[async_trait::async_trait]
impl Source for JetStreamSource {
    async fn pull(
        &self,
        n: usize,
        wait: Duration,
    ) -> Result<BoxStream<'static, Box<dyn Delivery>>, String> {
        let batch = self
            .consumer
            .batch()
            .max_messages(n)
            .expires(wait)
            .messages()
            .await
            .map_err(|e| e.to_string())?;
        Ok(batch
            .filter_map(|m| async move {
                match m {
                    Ok(message) => {
                        Some(Box::new(JetStreamDelivery { message }) as Box<dyn Delivery>)
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "a pull ended");
                        None
                    }
                }
            })
            .boxed())
    }

    async fn pending(&self) -> Option<u64> {
        let mut c = self.consumer.clone();
        c.info()
            .await
            .ok()
            .map(|i| i.num_pending + i.num_ack_pending as u64)
    }
}

struct JetStreamDelivery {
    message: async_nats::jetstream::Message,
}

impl JetStreamDelivery {
    async fn send(&self, kind: AckKind) -> Result<(), String> {
        self.message.ack_with(kind).await.map_err(|e| e.to_string())
    }
}

#[async_trait::async_trait]
impl Delivery for JetStreamDelivery {
    fn payload(&self) -> &Bytes {
        &self.message.payload
    }

    fn header(&self, name: &str) -> Option<String> {
        let h = self.message.headers.as_ref()?.get(name)?;
        Some(h.as_str().to_owned())
    }

    fn id(&self) -> String {
        if let Some(id) = self.header("Nats-Msg-Id") {
            return id;
        }
        match self.message.info() {
            Ok(i) => format!("{}:{}", i.stream, i.stream_sequence),
            Err(_) => String::new(),
        }
    }

    fn delivery(&self) -> u32 {
        self.message
            .info()
            .map_or(1, |i| u32::try_from(i.delivered).unwrap_or(u32::MAX))
    }

    async fn ack(&self) -> Result<(), String> {
        self.send(AckKind::Ack).await
    }

    async fn retry(&self, after: Duration) -> Result<(), String> {
        self.send(AckKind::Nak(Some(after))).await
    }

    async fn progress(&self) -> Result<(), String> {
        self.send(AckKind::Progress).await
    }
}
