//! Jobs of one invocation run one after another, in the order the worker received them. A
//! FIFO queue delivers an invocation's activate and release in order, possibly in one
//! receive batch; without this, the two would start side by side and the release could win
//! a race its sender did not intend. Jobs of different invocations are not ordered.
//!
//! The job loop takes a [`Turn`] for each message as it dispatches it (one task, in receive
//! order); the job's task waits for its turn once its visibility heartbeat runs. A turn ends
//! when it is dropped, however the job ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use thinpipe::sync::lock;

use tokio::sync::oneshot;

/// Resolves (with an error: its sender dropped) when a job's turn ends. Each is awaited by
/// at most one job, the invocation's next.
type Done = oneshot::Receiver<()>;

#[derive(Default)]
pub struct JobOrder {
    /// The last turn taken per invocation: its number and when it ends.
    last: Mutex<HashMap<String, (u64, Done)>>,
    taken: std::sync::atomic::AtomicU64,
}

/// One job's place in its invocation's line.
pub struct Turn {
    order: Arc<JobOrder>,
    invocation: Option<(String, u64)>,
    previous: Option<Done>,
    _done: Option<oneshot::Sender<()>>,
}

impl JobOrder {
    /// The next turn of `invocation` (a job without one is never made to wait).
    pub fn take(self: &Arc<Self>, invocation: Option<&str>) -> Turn {
        let Some(inv) = invocation else {
            return Turn { order: self.clone(), invocation: None, previous: None, _done: None };
        };
        let n = self.taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let previous = lock(&self.last).insert(inv.to_owned(), (n, rx)).map(|(_, done)| done);
        Turn { order: self.clone(), invocation: Some((inv.to_owned(), n)), previous, _done: Some(tx) }
    }
}

impl Turn {
    /// Waits until the invocation's previous job (if any) has ended.
    pub async fn wait(&mut self) {
        if let Some(previous) = self.previous.take() {
            // Its sender is dropped when that job ends: an error here means "ended".
            let _ended = previous.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some((inv, n)) = &self.invocation {
            let mut last = lock(&self.order.last);
            if last.get(inv).is_some_and(|(m, _)| m == n) {
                last.remove(inv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_invocations_jobs_take_turns_and_others_do_not_wait() {
        let order = Arc::new(JobOrder::default());
        let first = order.take(Some("a"));
        let mut second = order.take(Some("a"));
        let mut other = order.take(Some("b"));
        let mut free = order.take(None);
        other.wait().await;
        free.wait().await;
        let waiting = tokio::spawn(async move {
            second.wait().await;
            second
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the second job of `a` waits for the first");
        drop(first);
        let second = waiting.await.unwrap();
        drop((second, other, free));
        assert!(lock(&order.last).is_empty(), "nothing kept once every turn ended");
    }
}
