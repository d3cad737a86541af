//! Group commit for snapshot intents: intents recorded at the same moment by concurrent
//! activations share one durable SQLite commit (one fsync), as transitions share redb
//! commits in the run log's writer.
//!
//! Protocol (leader/follower, in the callers' own threads): a caller queues its intent; if
//! no commit is in progress it becomes the leader and records everything queued in one
//! `IMMEDIATE` transaction, commits, hands each caller its answer, and repeats until the
//! queue is empty; a caller that queued while a commit was in progress waits for its answer.
//! A lone intent therefore pays one commit and no hand-off. No answer is given before its
//! commit is durable. If a shared commit fails, each intent of it is tried again on its own,
//! so each caller gets its own error.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::snapshots::{Intent, Request, intend_in};
use super::{Store, StoreError};

#[derive(Default)]
pub(super) struct IntentGroup {
    state: Mutex<State>,
    answered: Condvar,
    /// Shared commits made (for tests of the grouping).
    pub(super) commits: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct State {
    pending: Vec<(u64, Request)>,
    answers: HashMap<u64, Result<Intent, StoreError>>,
    next_ticket: u64,
    leading: bool,
}

impl IntentGroup {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain collections and a flag; a panic cannot leave them half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `request` (with whatever else is queued now) and returns its answer.
    pub(super) fn intend(&self, store: &Store, request: Request) -> Result<Intent, StoreError> {
        let ticket = {
            let mut state = self.lock();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            state.pending.push((ticket, request));
            ticket
        };
        loop {
            {
                let mut state = self.lock();
                loop {
                    if let Some(answer) = state.answers.remove(&ticket) {
                        return answer;
                    }
                    if !state.leading {
                        // No commit in progress (or its leader is gone): lead one.
                        state.leading = true;
                        break;
                    }
                    state = self.answered.wait(state).unwrap_or_else(|p| p.into_inner());
                }
            }
            self.lead(store);
        }
    }

    /// Commits batches until the queue is empty. Stops leading in the same critical section
    /// that finds the queue empty, so an intent queued meanwhile is never left unanswered.
    fn lead(&self, store: &Store) {
        // If recording panics: answers what it took, stops leading, wakes the followers (one
        // of them leads next).
        struct Lead<'a> {
            group: &'a IntentGroup,
            taken: Vec<u64>,
            armed: bool,
        }
        impl Drop for Lead<'_> {
            fn drop(&mut self) {
                if !self.armed {
                    return;
                }
                let mut state = self.group.lock();
                for t in self.taken.drain(..) {
                    state.answers.entry(t).or_insert_with(|| {
                        Err(StoreError::Interrupted { detail: "the commit recording this intent panicked".into() })
                    });
                }
                state.leading = false;
                drop(state);
                self.group.answered.notify_all();
            }
        }
        let mut lead = Lead { group: self, taken: Vec::new(), armed: true };
        loop {
            let batch: Vec<(u64, Request)> = {
                let mut state = self.lock();
                if state.pending.is_empty() {
                    state.leading = false;
                    lead.armed = false;
                    drop(state);
                    self.answered.notify_all();
                    return;
                }
                let batch: Vec<(u64, Request)> = state.pending.drain(..).collect();
                lead.taken = batch.iter().map(|(t, _)| *t).collect();
                batch
            };
            let answers = record(store, &batch);
            self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut state = self.lock();
            state.answers.extend(answers);
            lead.taken.clear();
            drop(state);
            self.answered.notify_all();
        }
    }
}

/// Records a batch in one transaction; if that fails, each request on its own.
fn record(store: &Store, batch: &[(u64, Request)]) -> Vec<(u64, Result<Intent, StoreError>)> {
    let now = super::epoch_ms(std::time::SystemTime::now());
    let shared = store.with_conn(|c| {
        let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(batch.len());
        for (ticket, r) in batch {
            out.push((*ticket, intend_in(&tx, r, now)?));
        }
        tx.commit()?;
        Ok(out)
    });
    match shared {
        Ok(out) => out.into_iter().map(|(t, i)| (t, Ok(i))).collect(),
        Err(_) if batch.len() > 1 => batch.iter().map(|(t, r)| (*t, record_one(store, r, now))).collect(),
        Err(e) => vec![(batch[0].0, Err(e))],
    }
}

fn record_one(store: &Store, r: &Request, now: i64) -> Result<Intent, StoreError> {
    store.with_conn(|c| {
        let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
        let out = intend_in(&tx, r, now)?;
        tx.commit()?;
        Ok(out)
    })
}
