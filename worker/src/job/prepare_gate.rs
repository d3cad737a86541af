//! The per-family prepare gate: one prepare of a family at a time in this process (an async
//! mutex per family) and on this host (the `prepare/<family>` lease in the host database,
//! renewed at a third of its TTL while held). The executor takes the process's turn first,
//! checks whether another task prepared the version meanwhile, then takes the lease; losing
//! the lease fires [`Held::lost`], and the executor stops the run (not only its wait).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thinpipe::store::{Acquired, Holder, Store, StoreError};
use thinpipe::sync::lock;
use thinpipe::telemetry;
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

pub struct PrepareGate {
    store: Arc<Store>,
    ttl: Duration,
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// This process's turn to prepare a family (no other task of ours prepares it meanwhile).
pub struct Turn {
    family: String,
    _turn: OwnedMutexGuard<()>,
}

/// The host's prepare lease of a family, renewed until dropped or [`Held::leave`]; the turn
/// is held with it.
pub struct Held {
    store: Arc<Store>,
    key: String,
    lost: CancellationToken,
    // Aborted when dropped: however the job ends (its task aborted at the drain deadline
    // included), nothing renews its lease after it.
    _renewer: AbortOnDropHandle<()>,
    _turn: Turn,
}

/// Why the lease was not taken.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("family {family} is being prepared by {holder}")]
    Busy { family: String, holder: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PrepareGate {
    pub fn new(store: Arc<Store>, ttl: Duration) -> Self {
        Self { store, ttl, turns: Mutex::new(HashMap::new()) }
    }

    /// Waits for this process's turn at `family`; `None` if `draining` fires first (the job
    /// has not started: it is handed back).
    pub async fn turn(&self, family: &str, draining: &CancellationToken) -> Option<Turn> {
        let turn = lock(&self.turns).entry(family.to_owned()).or_default().clone();
        tokio::select! {
            guard = turn.lock_owned() => Some(Turn { family: family.to_owned(), _turn: guard }),
            _ = draining.cancelled() => None,
        }
    }

    /// Takes the host's lease for the family of `turn` (reclaiming it from a process that is
    /// gone) and starts renewing it.
    pub async fn lease(&self, turn: Turn) -> Result<Held, GateError> {
        let family = turn.family.clone();
        let key = format!("prepare/{family}");
        let (k, ttl) = (key.clone(), self.ttl);
        let acquired = self.store.call(move |s| s.acquire_lease_reclaiming(&k, Holder::this_process(), ttl)).await?;
        match acquired {
            Acquired::Yes => {}
            Acquired::TookOver { from } => {
                telemetry::metrics().lease_takeovers.add(1, &[telemetry::kv("lease", "prepare")]);
                tracing::warn!(family, previous = %from, "took over the prepare lease of a process that is gone")
            }
            Acquired::HeldBy(holder) => return Err(GateError::Busy { family, holder: holder.to_string() }),
        }
        let lost = CancellationToken::new();
        let renewer = {
            let (store, key, lost, ttl) = (self.store.clone(), key.clone(), lost.clone(), self.ttl);
            AbortOnDropHandle::new(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    let k = key.clone();
                    match store.call(move |s| s.renew_lease(&k, Holder::this_process(), ttl)).await {
                        Ok(()) => {}
                        Err(e) if e.is_retryable() => {
                            tracing::warn!(error = %e, "renewing the prepare lease failed; retrying")
                        }
                        _ => {
                            lost.cancel();
                            return;
                        }
                    }
                }
            }))
        };
        Ok(Held { store: self.store.clone(), key, lost, _renewer: renewer, _turn: turn })
    }
}

impl Held {
    /// Fires when the lease could not be renewed (another process may hold it now).
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Gives the lease back (it expires by itself if that fails) and ends the turn.
    pub async fn leave(self) {
        let key = self.key.clone();
        let family = key.trim_start_matches("prepare/").to_owned();
        if let Err(e) = self.store.call(move |s| s.release_lease(&key, Holder::this_process())).await {
            tracing::warn!(family, "could not release the prepare lease ({e}); it expires by itself")
        }
    }
}
