//! The backlog gauges: for each queue the worker reads, the messages waiting, in flight and
//! dead-lettered, read with [`JobQueue::stats`] no more often than the queue allows (SQS:
//! once a minute, so a fleet of thousands of hosts does not pay for its dashboards).
//!
//! A scrape of `/metrics` refreshes them; while metrics go out over OTLP, so does a timer.

use std::sync::Arc;
use std::time::Duration;

use thinpipe::queue::JobQueue;
use thinpipe::telemetry::{self, kv};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the timer refreshes the gauges while metrics go out over OTLP.
const PERIOD: Duration = Duration::from_secs(60);

pub struct Backlog {
    queues: Vec<Watched>,
}

/// A queue and when its backlog was last read (a failed read counts: a failing queue is
/// not asked more often).
struct Watched {
    queue: Arc<dyn JobQueue>,
    last_read: tokio::sync::Mutex<Option<Instant>>,
}

impl Backlog {
    pub fn new(queues: &[Arc<dyn JobQueue>]) -> Self {
        Self {
            queues: queues
                .iter()
                .map(|q| Watched { queue: q.clone(), last_read: tokio::sync::Mutex::new(None) })
                .collect(),
        }
    }

    /// Reads each queue whose last read is older than its [`JobQueue::stats_interval`] and
    /// records the gauges; the others keep their last values.
    pub async fn refresh(&self) {
        let m = telemetry::metrics();
        for Watched { queue, last_read } in &self.queues {
            // Held across the read: concurrent scrapes make one request, not several.
            let mut last_read = last_read.lock().await;
            if last_read.is_some_and(|at| at.elapsed() < queue.stats_interval()) {
                continue;
            }
            *last_read = Some(Instant::now());
            let name = queue.describe();
            match queue.stats().await {
                Ok(stats) => {
                    for (state, n) in [("waiting", stats.waiting), ("in_flight", stats.in_flight)] {
                        m.queue_messages.record(n, &[kv("queue", name.clone()), kv("state", state)]);
                    }
                    if let Some(dead) = stats.dead_letters {
                        m.queue_dead_letters.record(dead, &[kv("queue", name.clone())]);
                    }
                }
                Err(e) => tracing::warn!(
                    queue = %name,
                    error = %e,
                    "could not read the queue's backlog; its gauges keep their last values"
                ),
            }
        }
    }

    /// Refreshes every [`PERIOD`] until `stop` fires.
    pub async fn run(&self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.refresh() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(PERIOD) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;
    use thinpipe::queue::{Delivery, QueueError, QueueStats};

    use super::*;

    /// A queue that only counts how often its backlog is read.
    struct Counted {
        interval: Duration,
        reads: AtomicU32,
    }

    #[async_trait]
    impl JobQueue for Counted {
        fn describe(&self) -> String {
            "counted".into()
        }
        async fn receive(&self, _: usize, _: Duration) -> Result<Vec<Delivery>, QueueError> {
            Ok(Vec::new())
        }
        async fn ack(&self, _: &Delivery) -> Result<(), QueueError> {
            Ok(())
        }
        async fn extend(&self, _: &Delivery, _: Duration) -> Result<(), QueueError> {
            Ok(())
        }
        async fn release(&self, _: &Delivery) -> Result<(), QueueError> {
            Ok(())
        }
        async fn dead_letter(&self, _: &Delivery, _: &str) -> Result<(), QueueError> {
            Ok(())
        }
        async fn send(&self, _: &str, _: &str, _: &BTreeMap<String, String>) -> Result<String, QueueError> {
            Ok(String::new())
        }
        async fn stats(&self) -> Result<QueueStats, QueueError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Ok(QueueStats::default())
        }
        fn stats_interval(&self) -> Duration {
            self.interval
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_queue_is_read_no_more_often_than_it_allows() {
        let sqs_like = Arc::new(Counted { interval: Duration::from_secs(60), reads: AtomicU32::new(0) });
        let local = Arc::new(Counted { interval: Duration::ZERO, reads: AtomicU32::new(0) });
        let queues: Vec<Arc<dyn JobQueue>> = vec![sqs_like.clone(), local.clone()];
        let backlog = Backlog::new(&queues);
        for _ in 0..5 {
            backlog.refresh().await;
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        assert_eq!(sqs_like.reads.load(Ordering::SeqCst), 1, "five scrapes in 50 s: one request");
        assert_eq!(local.reads.load(Ordering::SeqCst), 5, "a local queue is read at each scrape");
        tokio::time::advance(Duration::from_secs(10)).await;
        backlog.refresh().await;
        assert_eq!(sqs_like.reads.load(Ordering::SeqCst), 2, "read again once a minute has passed");
    }
}
