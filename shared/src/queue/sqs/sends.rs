//! Sends gathered into `SendMessageBatch` calls: results of jobs that end together (and any
//! other message this worker sends) share requests, up to 10 per destination queue. Each
//! entry that fails on the server's side is retried (twice) and otherwise reported to its
//! sender; none is assumed sent.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use tokio::sync::{mpsc, oneshot};

use super::{classify, fifo, fifo_ids};
use crate::queue::QueueError;

/// One message to send, and where its message id (or error) goes.
pub(super) struct SendRequest {
    pub url: String,
    pub body: String,
    pub attributes: BTreeMap<String, String>,
    pub answer: oneshot::Sender<Result<String, QueueError>>,
}

/// How long a send waits for others to share its request. Results are sent after a job's
/// slot is free, so a few milliseconds cost no throughput; a burst of results shares calls.
const SEND_LINGER: Duration = Duration::from_millis(5);

pub(super) async fn send_batcher(client: Client, mut rx: mpsc::UnboundedReceiver<SendRequest>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let linger = tokio::time::sleep(SEND_LINGER);
        tokio::pin!(linger);
        while batch.len() < 100 {
            tokio::select! {
                more = rx.recv() => match more { Some(s) => batch.push(s), None => break },
                _ = &mut linger => break,
            }
        }
        let mut by_queue: BTreeMap<String, Vec<SendRequest>> = BTreeMap::new();
        for s in batch {
            by_queue.entry(s.url.clone()).or_default().push(s);
        }
        for (url, mut sends) in by_queue {
            while !sends.is_empty() {
                let rest = sends.split_off(sends.len().min(10));
                send_one_batch(&client, &url, sends).await;
                sends = rest;
            }
        }
    }
}

/// Sends up to 10 messages to `url` in one request, retrying failed entries twice.
async fn send_one_batch(client: &Client, url: &str, sends: Vec<SendRequest>) {
    let mut pending: Vec<(usize, SendRequest)> = sends.into_iter().enumerate().collect();
    for attempt in 0..3 {
        let entries: Result<Vec<_>, String> = pending.iter().map(|(i, s)| entry(*i, s, url)).collect();
        let entries = match entries {
            Ok(e) => e,
            Err(why) => {
                for (_, s) in pending.drain(..) {
                    // The sender may have gone; nothing else to tell.
                    drop(s.answer.send(Err(QueueError::Invalid { queue: url.to_owned(), detail: why.clone() })));
                }
                return;
            }
        };
        let out = match client.send_message_batch().queue_url(url).set_entries(Some(entries)).send().await {
            Ok(out) => out,
            Err(e) => {
                let err = classify(url, "sending", e);
                tracing::warn!(attempt, error = %err, "SendMessageBatch failed");
                // A queue that does not exist (a requester gone) will not come back: answer now.
                if attempt == 2 || !err.is_retryable() {
                    for (_, s) in pending.drain(..) {
                        drop(s.answer.send(Err(err.clone())));
                    }
                    return;
                }
                continue;
            }
        };
        let sent: HashMap<&str, &str> = out.successful().iter().map(|s| (s.id(), s.message_id())).collect();
        let failed: HashMap<&str, (String, bool)> = out
            .failed()
            .iter()
            .map(|f| (f.id(), (format!("{}: {}", f.code(), f.message().unwrap_or_default()), f.sender_fault())))
            .collect();
        let mut retry = Vec::new();
        for (i, s) in pending.drain(..) {
            let id = i.to_string();
            if let Some(message_id) = sent.get(id.as_str()) {
                drop(s.answer.send(Ok((*message_id).to_owned())));
            } else {
                let (why, sender_fault) =
                    failed.get(id.as_str()).cloned().unwrap_or_else(|| ("no answer for the entry".into(), false));
                if sender_fault || attempt == 2 {
                    let detail = format!("sending: {why}");
                    let err = if sender_fault {
                        QueueError::Invalid { queue: url.to_owned(), detail }
                    } else {
                        QueueError::Unavailable { queue: url.to_owned(), detail }
                    };
                    drop(s.answer.send(Err(err)));
                } else {
                    tracing::warn!(attempt, error = %why, "batch send entry failed; retrying");
                    retry.push((i, s));
                }
            }
        }
        if retry.is_empty() {
            return;
        }
        pending = retry;
    }
}

fn entry(i: usize, s: &SendRequest, url: &str) -> Result<SendMessageBatchRequestEntry, String> {
    let mut e = SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(&s.body);
    for (k, v) in &s.attributes {
        let value =
            MessageAttributeValue::builder().data_type("String").string_value(v).build().map_err(|e| e.to_string())?;
        e = e.message_attributes(k, value);
    }
    if fifo(url) {
        let (group, dedup) = fifo_ids(&s.body);
        e = e.message_group_id(group).message_deduplication_id(dedup);
    }
    e.build().map_err(|e| e.to_string())
}
