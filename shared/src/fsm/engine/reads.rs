//! Raw reads of the run log: a run's header, input, a logged value, and how it ended.

use super::*;

impl Engine {
    pub(super) fn read_log(&self, key: &[u8]) -> Result<Option<Vec<u8>>, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        Ok(txn.open_table(LOG)?.get(key)?.map(|v| v.value().to_vec()))
    }
    pub(super) fn read_record(&self, id: &str) -> Result<Option<Result<RunRecord, String>>, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        read_header(&txn.open_table(LOG)?, id)
    }
    /// The input a run was started with, as stored.
    pub(super) fn read_input(&self, id: &str) -> Result<Option<Vec<u8>>, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        Ok(log.get(key::input_key(id).as_slice())?.map(|v| v.value().to_vec()))
    }
    pub(super) fn read_end(&self, id: &str) -> Result<Lookup, redb::Error> {
        let txn = self.inner.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let record: RunRecord = match read_header(&log, id)? {
            None => return Ok(Lookup::NotFound),
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                return Ok(Lookup::Finished(RawOutcome::Failed(Failure {
                    step: "(unknown)".into(),
                    error: format!("run record does not decode: {e}"),
                    kind: FailureKind::Corrupt,
                    code: None,
                })));
            }
        };
        Ok(match record.status {
            RunStatus::Active => Lookup::Active,
            RunStatus::Failed => Lookup::Finished(RawOutcome::Failed(record.failure.unwrap_or(Failure {
                step: "(unknown)".into(),
                error: "failed without a recorded reason".into(),
                kind: FailureKind::Corrupt,
                code: None,
            }))),
            RunStatus::Completed => {
                let k = key::response_key(id, u64::from(record.next_step));
                match log.get(k.as_slice())? {
                    Some(row) => match super::super::schema::decode_response(row.value()) {
                        Ok((_, w)) => Lookup::Finished(RawOutcome::Completed(w.to_vec())),
                        Err(why) => Lookup::Finished(RawOutcome::Failed(Failure {
                            step: "(final)".into(),
                            error: why,
                            kind: FailureKind::Corrupt,
                            code: None,
                        })),
                    },
                    None => Lookup::Finished(RawOutcome::Failed(Failure {
                        step: "(final)".into(),
                        error: "completed run has no final response".into(),
                        kind: FailureKind::Corrupt,
                        code: None,
                    })),
                }
            }
        })
    }
}

pub(super) enum Lookup {
    NotFound,
    Active,
    Finished(RawOutcome),
}
