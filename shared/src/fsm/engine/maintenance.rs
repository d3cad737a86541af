//! Maintenance of the run log and the engine's end: shutdown, archive, prune.

use super::*;

impl Engine {
    /// Stops every run at its next await point, leaving it active for the next start, then
    /// flushes and stops the writer. Waiters get `Interrupted`. Not a cancel.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        let waiters: Vec<_> = lock(&self.inner.waiters).drain().collect();
        for (_, tx) in waiters {
            tx.send_replace(Some(RunEnd::Interrupted("the engine shut down".into())));
        }
        self.inner.writer.stop();
    }
    /// Moves finished run `id`, with its whole history, to `<id>~<finished ms>` and returns
    /// that id, so `id` can be started afresh (a new job retrying a failed prepare, or
    /// preparing again a version whose base was collected) while the old run stays
    /// inspectable. An active run is refused.
    pub async fn archive_finished(&self, id: &str) -> Result<String, ArchiveError> {
        if lock(&self.inner.unrecorded).contains_key(id) {
            // Started, its start not committed yet (guarantee 1): active.
            return Err(ArchiveError::StillActive(id.to_owned()));
        }
        let record = match self.read_record(id).map_err(|e| ArchiveError::Storage(e.into()))? {
            None => return Err(ArchiveError::NotFound(id.to_owned())),
            Some(Err(why)) => {
                return Err(ArchiveError::Storage(StorageError::Corrupt(format!(
                    "run {id} record does not decode: {why}"
                ))));
            }
            Some(Ok(r)) => r,
        };
        if !record.status.is_finished() {
            return Err(ArchiveError::StillActive(id.to_owned()));
        }
        let to = format!("{id}~{}", record.finished_at_ms.unwrap_or(record.updated_at_ms));
        match self.inner.writer.submit(Op::Archive { id: id.to_owned(), to: to.clone() }).await {
            Ok(_) => Ok(to),
            Err(OpError::NotFound(_)) => Err(ArchiveError::NotFound(id.to_owned())),
            Err(OpError::Stopped) => Err(ArchiveError::ShutDown),
            Err(e) => Err(ArchiveError::Storage(e.into())),
        }
    }
    /// Deletes finished runs that finished before `cutoff_ms` (ms since the epoch).
    pub async fn prune_finished_before(&self, cutoff_ms: u64) -> Result<usize, PruneError> {
        match self.inner.writer.submit(Op::Prune { finished_before_ms: cutoff_ms }).await {
            Ok(Reply::Pruned(n)) => Ok(n),
            Ok(_) => Err(PruneError::Storage(StorageError::Internal(
                "the writer answered a prune with something else".into(),
            ))),
            Err(OpError::Stopped) => Err(PruneError::ShutDown),
            Err(e) => Err(PruneError::Storage(e.into())),
        }
    }
    pub(super) fn spawn_pruner(&self, config: &EngineConfig) {
        let engine = self.clone();
        let shutdown = self.inner.shutdown.clone();
        let Some(interval) = config.prune_interval else {
            return;
        };
        let retention = config.retention;
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
                match engine.prune_finished_before(cutoff).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(runs = n, "pruned finished runs past retention"),
                    Err(e) => tracing::warn!(error = %e, "pruning finished runs failed; will try again"),
                }
            }
        });
    }
}
