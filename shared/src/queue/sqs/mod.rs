//! The SQS queue: long polling, visibility heartbeats, batched deletes (`acks.rs`) and sends
//! (`sends.rs`), a dead-letter queue with the reason as a message attribute, FIFO queues ([`fifo_ids`]: an invocation's jobs
//! are ordered and different invocations run in parallel; a family's prepares are ordered;
//! a re-sent job is deduplicated). One `SqsQueue` receives from one queue URL; `send` resolves any queue by
//! URL or name. The backlog gauges come from `GetQueueAttributes`, at most once a minute.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

mod acks;
mod sends;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};

use super::{Delivery, JobQueue, QueueError, QueueStats};

/// The message attribute that carries a dead letter's reason.
pub const REASON_ATTRIBUTE: &str = "thinpipe-dead-letter-reason";

#[derive(Clone, Debug)]
pub struct SqsSettings {
    /// The queue jobs are received from.
    pub queue_url: String,
    /// Where invalid messages go; `None` leaves them to the queue's redrive policy.
    pub dead_letter_url: Option<String>,
    /// Visibility of a received message (the heartbeat extends it).
    pub visibility: Duration,
}

pub struct SqsQueue {
    client: Client,
    settings: SqsSettings,
    urls: Mutex<HashMap<String, String>>,
    /// Acks are gathered into `DeleteMessageBatch` calls of up to 10 by one task.
    acks: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<acks::AckRequest>>,
    /// Sends are gathered into `SendMessageBatch` calls by another.
    sends: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<sends::SendRequest>>,
}

impl SqsQueue {
    pub fn new(client: Client, settings: SqsSettings) -> Self {
        // `urls` caches name → URL lookups for `send`.
        Self {
            client,
            settings,
            urls: Mutex::new(HashMap::new()),
            acks: std::sync::OnceLock::new(),
            sends: std::sync::OnceLock::new(),
        }
    }

    fn send_sender(&self) -> &tokio::sync::mpsc::UnboundedSender<sends::SendRequest> {
        self.sends.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(sends::send_batcher(self.client.clone(), rx));
            tx
        })
    }

    fn ack_sender(&self) -> &tokio::sync::mpsc::UnboundedSender<acks::AckRequest> {
        self.acks.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(acks::ack_batcher(self.client.clone(), self.settings.queue_url.clone(), rx));
            tx
        })
    }

    fn err<E: ProvideErrorMetadata + std::fmt::Debug>(&self, what: &str, e: SdkError<E>) -> QueueError {
        classify(&self.settings.queue_url, what, e)
    }

    /// A queue URL for `to`: a URL as is, a name looked up (and remembered).
    async fn url_of(&self, to: &str) -> Result<String, QueueError> {
        if to.starts_with("https://") || to.starts_with("http://") {
            return Ok(to.to_owned());
        }
        if let Some(u) = crate::sync::lock(&self.urls).get(to) {
            return Ok(u.clone());
        }
        let out = self
            .client
            .get_queue_url()
            .queue_name(to)
            .send()
            .await
            .map_err(|e| classify(to, "looking up the queue", e))?;
        let url = out
            .queue_url()
            .ok_or_else(|| QueueError::Invalid { queue: to.to_owned(), detail: "no URL returned".into() })?
            .to_owned();
        crate::sync::lock(&self.urls).insert(to.to_owned(), url.clone());
        Ok(url)
    }

    /// `ApproximateNumberOfMessages` and `...NotVisible` of the queue at `url`.
    async fn counts(&self, url: &str) -> Result<(u64, u64), QueueError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| classify(url, "reading the queue's attributes", e))?;
        let count = |name: QueueAttributeName| -> Result<u64, QueueError> {
            let value = out.attributes().and_then(|a| a.get(&name)).ok_or_else(|| QueueError::Invalid {
                queue: url.to_owned(),
                detail: format!("GetQueueAttributes did not return {name}"),
            })?;
            value.parse().map_err(|e| QueueError::Invalid {
                queue: url.to_owned(),
                detail: format!("GetQueueAttributes returned {name}={value:?}: {e}"),
            })
        };
        Ok((
            count(QueueAttributeName::ApproximateNumberOfMessages)?,
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?,
        ))
    }

    async fn change_visibility(&self, d: &Delivery, secs: i32) -> Result<(), QueueError> {
        self.client
            .change_message_visibility()
            .queue_url(&self.settings.queue_url)
            .receipt_handle(&d.receipt)
            .visibility_timeout(secs)
            .send()
            .await
            .map_err(|e| self.err("changing visibility", e))?;
        Ok(())
    }
}

fn classify<E: ProvideErrorMetadata + std::fmt::Debug>(queue: &str, what: &str, e: SdkError<E>) -> QueueError {
    let queue = queue.to_owned();
    let detail = match &e {
        SdkError::ServiceError(s) => {
            format!("{what}: {} {}", s.err().code().unwrap_or("error"), s.err().message().unwrap_or_default())
        }
        other => format!("{what}: {other}"),
    };
    match &e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or_default();
            let status = s.raw().status().as_u16();
            if code.contains("ReceiptHandleIsInvalid")
                || code.contains("InvalidParameterValue") && detail.contains("receipt")
            {
                QueueError::ReceiptStale { queue, message_id: String::new() }
            } else if status >= 500
                || code.contains("Throttl")
                || code.contains("RequestThrottled")
                || code == "OverLimit"
            {
                QueueError::Unavailable { queue, detail }
            } else {
                QueueError::Invalid { queue, detail }
            }
        }
        // Timeouts, connection errors, dispatch failures: try again.
        _ => QueueError::Unavailable { queue, detail },
    }
}

fn fifo(url: &str) -> bool {
    url.ends_with(".fifo")
}

/// A FIFO message's group and deduplication ids. A job (or result) about an invocation is
/// grouped by the invocation: its activate and release stay in order, and activations of one
/// family run in parallel. Anything else (a prepare) is grouped by family, so a family's
/// prepares are ordered. A re-sent job is deduplicated: by kind and invocation, else by body.
fn fifo_ids(body: &str) -> (String, String) {
    // A body that is not JSON still gets ids (its own group); the receiver dead-letters it.
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let text = |k: &str| v.get(k).and_then(|x| x.as_str());
    let group = match (text("invocation_id"), text("family")) {
        (Some(inv), _) => format!("invocation-{inv}"),
        (None, Some(family)) => format!("family-{family}"),
        (None, None) => "thinpipe".to_owned(),
    };
    let dedup = match (text("kind"), text("invocation_id")) {
        (Some(kind), Some(inv)) => format!("{kind}-{inv}"),
        _ => crate::image::Digest::of_bytes(body.as_bytes()).hex().to_owned(),
    };
    (group, dedup)
}

#[async_trait]
impl JobQueue for SqsQueue {
    fn describe(&self) -> String {
        format!("sqs:{}", self.settings.queue_url)
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let (waiting, in_flight) = self.counts(&self.settings.queue_url).await?;
        let dead_letters = match &self.settings.dead_letter_url {
            // Messages in a dead-letter queue are never received, so all of them wait.
            Some(dlq) => Some(self.counts(dlq).await?.0),
            None => None,
        };
        Ok(QueueStats { waiting, in_flight, dead_letters })
    }

    fn stats_interval(&self) -> Duration {
        Duration::from_secs(60)
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.settings.queue_url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .visibility_timeout(self.settings.visibility.as_secs().max(1) as i32)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| self.err("receiving", e))?;
        let mut deliveries = Vec::new();
        for m in out.messages() {
            let (Some(id), Some(receipt)) = (m.message_id(), m.receipt_handle()) else { continue };
            let receive_count = m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let attributes = m
                .message_attributes()
                .map(|attrs| {
                    attrs.iter().filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_owned()))).collect()
                })
                .unwrap_or_default();
            deliveries.push(Delivery {
                message_id: id.to_owned(),
                receipt: receipt.to_owned(),
                body: m.body().unwrap_or_default().to_owned(),
                receive_count,
                attributes,
            });
        }
        Ok(deliveries)
    }

    async fn ack(&self, d: &Delivery) -> Result<(), QueueError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stopped = || QueueError::Unavailable { queue: self.describe(), detail: "the ack batcher stopped".into() };
        self.ack_sender().send((d.clone(), tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    async fn extend(&self, d: &Delivery, visibility: Duration) -> Result<(), QueueError> {
        self.change_visibility(d, visibility.as_secs().min(43_200) as i32).await
    }

    async fn release(&self, d: &Delivery) -> Result<(), QueueError> {
        self.change_visibility(d, 0).await
    }

    async fn dead_letter(&self, d: &Delivery, reason: &str) -> Result<(), QueueError> {
        let Some(dlq) = self.settings.dead_letter_url.clone() else {
            tracing::warn!(message_id = %d.message_id, %reason, "no dead-letter queue configured: leaving the message to the queue's redrive policy");
            return Ok(());
        };
        let mut attrs = d.attributes.clone();
        attrs.insert(REASON_ATTRIBUTE.to_owned(), crate::quote::shorten(reason, 1000));
        attrs.insert("thinpipe-source-message-id".to_owned(), d.message_id.clone());
        self.send(&dlq, &d.body, &attrs).await?;
        self.ack(d).await
    }

    async fn send(&self, to: &str, body: &str, attributes: &BTreeMap<String, String>) -> Result<String, QueueError> {
        let url = self.url_of(to).await?;
        let (answer, answered) = tokio::sync::oneshot::channel();
        let request =
            sends::SendRequest { url: url.clone(), body: body.to_owned(), attributes: attributes.clone(), answer };
        let stopped = || QueueError::Unavailable { queue: url.clone(), detail: "the send batcher stopped".into() };
        self.send_sender().send(request).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws;

    /// Creates `jobs-<n>` with a redrive policy (3 receives) to `jobs-<n>-dlq`.
    async fn queues(client: &Client, suffix: &str) -> (String, String) {
        let dlq = client.create_queue().queue_name(format!("dlq-{suffix}")).send().await.unwrap();
        let dlq_url = dlq.queue_url().unwrap().to_owned();
        let arn = client
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes()
            .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
            .clone();
        let policy = format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"3"}}"#);
        let q = client
            .create_queue()
            .queue_name(format!("jobs-{suffix}"))
            .attributes(aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy, policy)
            .send()
            .await
            .unwrap();
        (q.queue_url().unwrap().to_owned(), dlq_url)
    }

    #[tokio::test]
    async fn sqs_queue_passes_the_conformance_suite_against_moto() {
        let Some(endpoint) = aws::test_endpoint() else { return };
        let (config, _) = aws::test_config(&endpoint).await;
        let client = aws::sqs_client(&config);
        let suffix = format!("{:x}", rand::random::<u64>());
        let (url, dlq_url) = queues(&client, &suffix).await;
        let settings = SqsSettings {
            queue_url: url.clone(),
            dead_letter_url: Some(dlq_url.clone()),
            visibility: Duration::from_secs(1),
        };
        let q = SqsQueue::new(client.clone(), settings);
        let dlq = SqsQueue::new(
            client.clone(),
            SqsSettings { queue_url: dlq_url.clone(), dead_letter_url: None, visibility: Duration::from_secs(30) },
        );
        // The suite names queues; map its names onto this test's.
        q.urls.lock().unwrap().insert("jobs".into(), url.clone());
        q.urls.lock().unwrap().insert("jobs-dlq".into(), dlq_url.clone());
        dlq.urls.lock().unwrap().insert("jobs-dlq".into(), dlq_url.clone());
        crate::queue::conformance::run(&q, &dlq, false).await;
    }

    #[tokio::test]
    async fn a_dead_letter_carries_its_reason_as_an_attribute() {
        let Some(endpoint) = aws::test_endpoint() else { return };
        let (config, _) = aws::test_config(&endpoint).await;
        let client = aws::sqs_client(&config);
        let suffix = format!("{:x}", rand::random::<u64>());
        let (url, dlq_url) = queues(&client, &suffix).await;
        let q = SqsQueue::new(
            client.clone(),
            SqsSettings {
                queue_url: url.clone(),
                dead_letter_url: Some(dlq_url.clone()),
                visibility: Duration::from_secs(30),
            },
        );
        let dlq = SqsQueue::new(
            client,
            SqsSettings { queue_url: dlq_url, dead_letter_url: None, visibility: Duration::from_secs(30) },
        );
        q.send(&url, "{not json", &BTreeMap::new()).await.unwrap();
        let d = q.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();
        q.dead_letter(&d, "the message is not JSON").await.unwrap();
        let dead = dlq.receive(1, Duration::from_secs(5)).await.unwrap().pop().unwrap();
        assert_eq!(dead.body, "{not json");
        assert_eq!(dead.attributes.get(REASON_ATTRIBUTE).map(String::as_str), Some("the message is not JSON"));
        assert_eq!(dead.attributes.get("thinpipe-source-message-id"), Some(&d.message_id));
        assert!(q.receive(1, Duration::from_secs(1)).await.unwrap().is_empty(), "deleted from the source");
    }

    #[test]
    fn fifo_groups_are_per_invocation_and_prepares_per_family() {
        let (g, d) = fifo_ids(r#"{"v":1,"kind":"activate","family":"web","invocation_id":"a"}"#);
        assert_eq!((g.as_str(), d.as_str()), ("invocation-a", "activate-a"));
        assert_eq!(fifo_ids(r#"{"v":1,"kind":"release","family":"web","invocation_id":"a"}"#).0, "invocation-a");
        let (g, d) = fifo_ids(r#"{"v":1,"kind":"prepare","family":"web"}"#);
        assert_eq!(g, "family-web");
        assert_eq!(d.len(), 64, "a prepare is deduplicated by its body");
    }

    #[tokio::test]
    async fn fifo_queues_order_each_invocation_run_invocations_in_parallel_and_deduplicate() {
        let Some(endpoint) = aws::test_endpoint() else { return };
        let (config, _) = aws::test_config(&endpoint).await;
        let client = aws::sqs_client(&config);
        let name = format!("jobs-{:x}.fifo", rand::random::<u64>());
        let out = client
            .create_queue()
            .queue_name(&name)
            .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
            .send()
            .await
            .unwrap();
        let url = out.queue_url().unwrap().to_owned();
        let q = SqsQueue::new(
            client,
            SqsSettings { queue_url: url.clone(), dead_letter_url: None, visibility: Duration::from_secs(30) },
        );
        let activate = |inv: &str| format!(r#"{{"v":1,"kind":"activate","family":"web","invocation_id":"{inv}"}}"#);
        let release = r#"{"v":1,"kind":"release","family":"web","invocation_id":"inv-1"}"#;
        q.send(&url, &activate("inv-1"), &BTreeMap::new()).await.unwrap();
        q.send(&url, &activate("inv-1"), &BTreeMap::new()).await.unwrap();
        q.send(&url, release, &BTreeMap::new()).await.unwrap();
        q.send(&url, &activate("inv-2"), &BTreeMap::new()).await.unwrap();
        // inv-1's activation in flight: inv-2's (same family, another group) is delivered;
        // inv-1's release waits behind its activation; the duplicate was dropped.
        let head = q.receive(1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(head.iter().map(|d| d.body.as_str()).collect::<Vec<_>>(), [activate("inv-1").as_str()]);
        let mut more = Vec::new();
        for _ in 0..3 {
            more.extend(q.receive(10, Duration::from_secs(1)).await.unwrap());
        }
        let bodies: Vec<&str> = more.iter().map(|d| d.body.as_str()).collect();
        assert_eq!(bodies, [activate("inv-2").as_str()], "only the other invocation's job, in parallel");
        for d in head.iter().chain(&more) {
            q.ack(d).await.unwrap();
        }
        let mut then = Vec::new();
        for _ in 0..3 {
            for d in q.receive(10, Duration::from_secs(1)).await.unwrap() {
                then.push(d.body.clone());
                q.ack(&d).await.unwrap();
            }
        }
        assert_eq!(then, [release], "inv-1's release comes after its activation was done");
    }
}
