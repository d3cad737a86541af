//! Group commit for snapshot intents: intents recorded at the same moment by concurrent
//! activations share one durable SQLite commit (one fsync), as transitions share redb
//! commits in the run log's writer. The protocol is [`crate::sync::GroupCommit`]'s; this
//! file says what a commit of intents is.
//!
//! No answer is given before its commit is durable. If a shared commit fails, each intent
//! of it is tried again on its own, so each caller gets its own error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use super::snapshots::{Intent, Request, intend_in};
use super::{Store, StoreError};
use crate::sync::{GroupCommit, Joined};

/// Intents recorded in one transaction at most.
const MAX_BATCH: usize = 256;

type Answer = Result<Intent, StoreError>;

#[derive(Default)]
pub(super) struct IntentGroup {
    group: GroupCommit<(Request, mpsc::SyncSender<Answer>)>,
    /// Shared commits made (for tests of the grouping).
    pub(super) commits: AtomicU64,
}

impl IntentGroup {
    /// Records `request` (with whatever else is queued now) and returns its answer.
    pub(super) fn intend(&self, store: &Store, request: Request) -> Answer {
        let (answer, rx) = mpsc::sync_channel(1);
        let role = self.group.join((request, answer)).map_err(|e| interrupted(&e.to_string()))?;
        if role == Joined::Lead {
            self.group.lead(MAX_BATCH, |batch| {
                let answers = record(store, &batch);
                self.commits.fetch_add(1, Ordering::Relaxed);
                for ((_, to), answer) in batch.into_iter().zip(answers) {
                    // The channel has room for its one answer, and its caller is blocked in
                    // `recv` below: the send cannot fail or wait.
                    if to.try_send(answer).is_err() {
                        tracing::debug!("store: an intent's caller left before its answer");
                    }
                }
            });
        }
        rx.recv().unwrap_or_else(|_| Err(interrupted("the commit recording this intent panicked")))
    }
}

fn interrupted(detail: &str) -> StoreError {
    StoreError::Interrupted { detail: detail.to_owned() }
}

/// Records a batch in one transaction; if that fails, each request on its own.
fn record(store: &Store, batch: &[(Request, mpsc::SyncSender<Answer>)]) -> Vec<Answer> {
    let now = super::epoch_ms(std::time::SystemTime::now());
    let shared = store.with_conn(|c| {
        let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(batch.len());
        for (r, _) in batch {
            out.push(intend_in(&tx, r, now)?);
        }
        tx.commit()?;
        Ok(out)
    });
    match shared {
        Ok(out) => out.into_iter().map(Ok).collect(),
        Err(_) if batch.len() > 1 => batch.iter().map(|(r, _)| record_one(store, r, now)).collect(),
        Err(e) => vec![Err(e)],
    }
}

fn record_one(store: &Store, r: &Request, now: i64) -> Answer {
    store.with_conn(|c| {
        let tx = rusqlite::Transaction::new_unchecked(c, rusqlite::TransactionBehavior::Immediate)?;
        let out = intend_in(&tx, r, now)?;
        tx.commit()?;
        Ok(out)
    })
}
