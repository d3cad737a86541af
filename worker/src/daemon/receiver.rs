//! A receiver: long-polls one queue while job slots are free, and hands what it receives to
//! the job loop with a slot reserved for each message. One per queue the worker reads; they
//! share the slots. Stopping never loses a message: a receive in flight is finished, and what
//! it brought is handed back at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use thinpipe::queue::{Delivery, JobQueue};
use thinpipe::telemetry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// A message handed from a receiver to the loop, with the job slot reserved for it.
pub(crate) struct Received {
    pub(crate) queue: Arc<dyn JobQueue>,
    pub(crate) delivery: Delivery,
    pub(crate) permit: OwnedSemaphorePermit,
}

/// How long a receiver waits for more free slots to fill a receive call.
const BATCH_LINGER: Duration = Duration::from_millis(25);

/// Long-polls one queue while job slots are free.
pub(crate) struct Receiver {
    pub(crate) queue: Arc<dyn JobQueue>,
    pub(crate) slots: Arc<Semaphore>,
    /// Most slots this receiver reserves for one poll, so that one queue's long poll
    /// does not hold every slot while another queue has work.
    pub(crate) share: usize,
    pub(crate) wait: Duration,
    pub(crate) stop: CancellationToken,
    pub(crate) tx: tokio::sync::mpsc::Sender<Received>,
    /// Counts queues whose last receive failed; this receiver adds itself while failing.
    pub(crate) failing: Arc<AtomicUsize>,
}

impl Receiver {
    pub(crate) async fn run(self) {
        let mut healthy = true;
        loop {
            // Reserve the slots first: every message received has a slot to run in, so
            // none waits (invisible, unextended) for one.
            let first = tokio::select! {
                _ = self.stop.cancelled() => return,
                p = self.slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return, // closed: the loop is gone
                },
            };
            let mut permits = vec![first];
            // Under load, slots free up one by one; waiting a moment for a few more makes
            // one receive call fetch several messages instead of one each.
            let linger = tokio::time::Instant::now() + BATCH_LINGER;
            while permits.len() < self.share {
                match self.slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => match tokio::time::timeout_at(linger, self.slots.clone().acquire_owned()).await {
                        Ok(Ok(p)) => permits.push(p),
                        _ => break,
                    },
                }
            }
            let asked = std::time::Instant::now();
            // Not raced against `stop`: a receive dropped half-way can take messages nobody
            // sees. The queue ends its wait early where it can do so without losing any.
            let received = self.queue.receive_until(permits.len(), self.wait, &self.stop).await;
            if self.stop.is_cancelled() {
                // Draining: what arrived is handed back at once, not run.
                if let Ok(deliveries) = &received {
                    for d in deliveries {
                        release(self.queue.as_ref(), d).await;
                    }
                    if !deliveries.is_empty() {
                        tracing::info!(jobs = deliveries.len(), queue = %self.queue.describe(), "draining: handed back messages received as the drain began");
                    }
                }
                return;
            }
            if let Ok(d) = &received
                && !d.is_empty()
            {
                telemetry::metrics().receive_latency.record(asked.elapsed().as_secs_f64(), &[]);
            }
            let ok = received.is_ok();
            if ok != healthy {
                healthy = ok;
                if ok {
                    self.failing.fetch_sub(1, Ordering::SeqCst)
                } else {
                    self.failing.fetch_add(1, Ordering::SeqCst)
                };
            }
            let deliveries = match received {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(queue = %self.queue.describe(), error = %e, "receiving jobs failed; retrying");
                    drop(permits);
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            };
            for delivery in deliveries {
                let Some(permit) = permits.pop() else {
                    // The queue returned more than asked for; make the extra one visible again.
                    release(self.queue.as_ref(), &delivery).await;
                    continue;
                };
                let handed = Received { queue: self.queue.clone(), delivery, permit };
                if let Err(unsent) = self.tx.send(handed).await {
                    release(self.queue.as_ref(), &unsent.0.delivery).await;
                    return;
                }
            }
        }
    }
}

/// Makes a message visible again now (a job handed back, or not run).
pub(crate) async fn release(queue: &dyn JobQueue, d: &Delivery) {
    if let Err(e) = queue.release(d).await {
        tracing::warn!(message_id = %d.message_id, error = %e, "could not release a message; it returns when its visibility ends");
    }
}
