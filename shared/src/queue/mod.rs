//! Job queues. [`JobQueue`] is the contract; `embedded` implements it on SQLite for one
//! machine without AWS, `sqs` on Amazon SQS for the fleet.
//!
//! Delivery guarantee: at least once. A received message is invisible to other receivers
//! for the visibility timeout; if it is neither acked nor extended in time it comes back
//! with its receive count raised. The worker acks only after the job's outcome is durable
//! and its result sent, and extends visibility (a heartbeat) while the job runs. A message
//! that cannot be a job is dead-lettered with the reason, never dropped; one received more
//! than `max_receives` times is dead-lettered by the queue itself.

mod embedded;
mod sqs;

#[cfg(test)]
mod conformance;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

pub use embedded::{Cancelled, DeadLetter, EmbeddedQueue};
pub use sqs::{REASON_ATTRIBUTE, SqsQueue, SqsSettings};

/// One received message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub message_id: String,
    /// Proves this receive: ack, extend and release must present it.
    pub receipt: String,
    pub body: String,
    /// 1 on the first delivery.
    pub receive_count: u32,
    pub attributes: BTreeMap<String, String>,
}

/// A queue's backlog, for the gauges an SRE alerts on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages waiting to be received.
    pub waiting: u64,
    /// Messages received and neither acked nor visible again yet.
    pub in_flight: u64,
    /// Dead letters; `None` when the queue knows of no dead-letter queue of its own (SQS
    /// without `queue.dead_letter_url`).
    pub dead_letters: Option<u64>,
}

#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    #[error("queue {queue}: message {message_id} was redelivered to another receiver (its visibility timed out)")]
    ReceiptStale { queue: String, message_id: String },
    #[error("queue {queue}: {detail}")]
    Unavailable { queue: String, detail: String },
    #[error("queue {queue}: {detail}")]
    Invalid { queue: String, detail: String },
}

impl QueueError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

#[async_trait]
pub trait JobQueue: Send + Sync {
    fn describe(&self) -> String;
    /// Waits up to `wait` for messages; returns at most `max` (possibly none).
    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError>;
    /// Like `receive`, but may end the wait early once `stop` fires. Never loses a message:
    /// whatever the queue handed out is returned (the caller hands it back). The default waits
    /// the receive out, since a long poll in flight cannot be called back without leaving the
    /// messages it took invisible for a whole visibility timeout (SQS: at most `wait`).
    async fn receive_until(
        &self,
        max: usize,
        wait: Duration,
        _stop: &CancellationToken,
    ) -> Result<Vec<Delivery>, QueueError> {
        self.receive(max, wait).await
    }
    /// Deletes a handled message.
    async fn ack(&self, d: &Delivery) -> Result<(), QueueError>;
    /// Keeps a message invisible for `visibility` from now (the heartbeat).
    async fn extend(&self, d: &Delivery, visibility: Duration) -> Result<(), QueueError>;
    /// Makes a message visible again now (for another try).
    async fn release(&self, d: &Delivery) -> Result<(), QueueError>;
    /// Puts a message back for another try in `delay`, this receive not counted towards the
    /// dead-letter limit: the job was not tried, the host could not (its storage was full).
    /// SQS counts every receive itself: there this is [`JobQueue::extend`], and its
    /// redrive policy's `maxReceiveCount` must leave room for a host's outages.
    async fn defer_uncounted(&self, d: &Delivery, delay: Duration) -> Result<(), QueueError> {
        self.extend(d, delay).await
    }
    /// Moves a message to the dead-letter queue with `reason`.
    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), QueueError>;
    /// Sends a message to queue `to` (a result to `reply_to`, or a job).
    async fn send(&self, to: &str, body: &str, attributes: &BTreeMap<String, String>) -> Result<String, QueueError>;
    /// The backlog now (SQS: approximate).
    async fn stats(&self) -> Result<QueueStats, QueueError>;
    /// The least time worth leaving between two [`JobQueue::stats`] calls: SQS bills each
    /// request, and a fleet of thousands of hosts must not pay for its dashboards.
    fn stats_interval(&self) -> Duration {
        Duration::ZERO
    }
}
