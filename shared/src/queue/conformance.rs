//! The conformance suite every queue passes (the visibility timeout of the queue under test
//! is short: 300 ms; `max_receives` is 3).

use std::collections::BTreeMap;
use std::time::Duration;

use super::JobQueue;

/// `fenced_receipts`: whether a receipt from an earlier delivery is refused (the embedded
/// queue); SQS may accept an old receipt handle, so that part is not part of the contract.
pub(crate) async fn run(q: &dyn JobQueue, other: &dyn JobQueue, fenced_receipts: bool) {
    let none = BTreeMap::new();
    assert!(q.receive(10, Duration::from_millis(50)).await.unwrap().is_empty(), "starts empty");
    let backlog = |s: super::QueueStats| (s.waiting, s.in_flight);
    assert_eq!(backlog(q.stats().await.unwrap()), (0, 0), "an empty queue's backlog");

    let id1 = q.send("jobs", "one", &none).await.unwrap();
    let mut attrs = BTreeMap::new();
    attrs.insert("traceparent".to_owned(), "00-abc-def-01".to_owned());
    q.send("jobs", "two", &attrs).await.unwrap();
    other.send("jobs-dlq", "elsewhere", &none).await.unwrap();
    assert_eq!(backlog(q.stats().await.unwrap()), (2, 0), "two waiting");

    let got = q.receive(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(got.iter().map(|d| d.body.as_str()).collect::<Vec<_>>(), ["one", "two"], "in order, own queue only");
    assert_eq!(got[0].message_id, id1);
    assert_eq!(got[0].receive_count, 1);
    assert_eq!(got[1].attributes.get("traceparent").map(String::as_str), Some("00-abc-def-01"));
    assert!(q.receive(10, Duration::from_millis(50)).await.unwrap().is_empty(), "in flight: invisible");
    assert_eq!(backlog(q.stats().await.unwrap()), (0, 2), "two in flight");

    // Ack one; let the other's visibility lapse: it comes back with a new receipt.
    q.ack(&got[0]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let again = loop {
        let r = q.receive(10, Duration::from_millis(200)).await.unwrap();
        if !r.is_empty() {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "an unacked message never came back");
    };
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].body.as_str(), again[0].receive_count), ("two", 2));
    if fenced_receipts {
        assert!(q.ack(&got[1]).await.is_err(), "the old receipt is fenced out");
    }

    // Extend keeps it invisible past its timeout; release makes it visible at once.
    q.extend(&again[0], Duration::from_secs(30)).await.unwrap();
    assert!(q.receive(10, Duration::from_millis(400)).await.unwrap().is_empty());
    q.release(&again[0]).await.unwrap();
    let third = q.receive(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(third[0].receive_count, 3);

    // Dead letter with a reason.
    let dead = || async { q.stats().await.unwrap().dead_letters.expect("the queue under test has dead letters") };
    let dead_before = dead().await;
    q.dead_letter(&third[0], "not a job").await.unwrap();
    assert!(q.receive(10, Duration::from_millis(50)).await.unwrap().is_empty());
    assert_eq!(dead().await, dead_before + 1, "the dead letter is counted");

    // Redrive: a message received max_receives times without an ack is dead-lettered.
    q.send("jobs", "poison", &none).await.unwrap();
    for _ in 0..3 {
        let d = q.receive(1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(d.len(), 1);
        q.release(&d[0]).await.unwrap();
    }
    assert!(q.receive(1, Duration::from_millis(50)).await.unwrap().is_empty(), "poison went to the dead letters");
    assert_eq!(dead().await, dead_before + 2, "the redriven poison is counted");
    assert_eq!(backlog(q.stats().await.unwrap()), (0, 0), "nothing left");
    let in_other: Vec<String> =
        other.receive(10, Duration::from_millis(50)).await.unwrap().into_iter().map(|d| d.body).collect();
    assert!(in_other.contains(&"elsewhere".to_owned()), "{in_other:?}");
}
