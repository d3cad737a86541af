//! Acks gathered into `DeleteMessageBatch` calls of up to 10 (SQS's limit), by one task per
//! `SqsQueue`: each entry that fails on the server's side is retried (twice) and otherwise
//! reported to its acker; none is ever assumed deleted. The twin of `sends.rs`.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use tokio::sync::{mpsc, oneshot};

use super::classify;
use crate::queue::{Delivery, QueueError};

/// One message to delete, and where the outcome goes.
pub(super) type AckRequest = (Delivery, oneshot::Sender<Result<(), QueueError>>);

/// How long the ack batcher waits for more acks to share a request. Acks are off the jobs'
/// critical path (a job's slot is free before its ack), so they can wait to fill a batch:
/// fewer requests per job is what lets a fleet share one queue.
const ACK_LINGER: Duration = Duration::from_millis(250);

/// Deletes acked messages in batches of up to 10: each `DeleteMessageBatch` entry that fails
/// for a reason on the server's side is retried (twice), then reported to its acker; none is
/// ever assumed deleted.
pub(super) async fn ack_batcher(client: Client, url: String, mut rx: mpsc::UnboundedReceiver<AckRequest>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let linger = tokio::time::sleep(ACK_LINGER);
        tokio::pin!(linger);
        while batch.len() < 10 {
            tokio::select! {
                more = rx.recv() => match more { Some(a) => batch.push(a), None => break },
                _ = &mut linger => break,
            }
        }
        let mut pending: Vec<(usize, AckRequest)> = batch.into_iter().enumerate().collect();
        for attempt in 0..3 {
            let entries: Result<Vec<_>, _> = pending
                .iter()
                .map(|(i, (d, _))| {
                    DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(&d.receipt).build()
                })
                .collect();
            let result = match entries {
                Ok(entries) => client.delete_message_batch().queue_url(&url).set_entries(Some(entries)).send().await,
                Err(e) => {
                    for (_, (_, tx)) in pending.drain(..) {
                        // The acker may have gone; nothing else to tell.
                        drop(tx.send(Err(QueueError::Invalid { queue: url.clone(), detail: e.to_string() })));
                    }
                    break;
                }
            };
            let out = match result {
                Ok(out) => out,
                Err(e) => {
                    let err = classify(&url, "deleting", e);
                    tracing::warn!(attempt, error = %err, "DeleteMessageBatch failed");
                    if attempt == 2 {
                        for (_, (_, tx)) in pending.drain(..) {
                            drop(tx.send(Err(QueueError::Unavailable { queue: url.clone(), detail: err.to_string() })));
                        }
                    }
                    continue;
                }
            };
            let failed: HashMap<String, (String, bool)> = out
                .failed()
                .iter()
                .map(|f| {
                    (
                        f.id().to_owned(),
                        (format!("{}: {}", f.code(), f.message().unwrap_or_default()), f.sender_fault()),
                    )
                })
                .collect();
            let mut retry = Vec::new();
            for (i, (d, tx)) in pending.drain(..) {
                match failed.get(&i.to_string()) {
                    None => drop(tx.send(Ok(()))),
                    Some((why, sender_fault)) if *sender_fault || attempt == 2 => {
                        tracing::warn!(message_id = %d.message_id, error = %why, "delete failed");
                        drop(tx.send(Err(QueueError::Unavailable {
                            queue: url.clone(),
                            detail: format!("deleting message {}: {why}", d.message_id),
                        })));
                    }
                    Some((why, _)) => {
                        tracing::warn!(message_id = %d.message_id, attempt, error = %why, "batch delete entry failed; retrying");
                        retry.push((i, (d, tx)));
                    }
                }
            }
            if retry.is_empty() {
                break;
            }
            pending = retry;
        }
    }
}
