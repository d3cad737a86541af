//! Key encoding for the tables keyed by (run id, number).
//!
//! A key is `len(run_id) as u32 BE ‖ run_id ‖ n as u64 BE`. The length prefix makes the
//! encoding injective (no id is a prefix-collision of another), and every key of one run
//! lies in `[encode(id, 0), encode(id, u64::MAX)]`, a range that holds no other run's keys,
//! so "all events of a run" is one range scan and deleting a run cannot touch a neighbour.

/// Encodes `(run_id, n)` into an ordered, collision-free key.
pub fn encode(run_id: &str, n: u64) -> Vec<u8> {
    let id = run_id.as_bytes();
    let mut key = Vec::with_capacity(4 + id.len() + 8);
    // Run ids longer than 4 GiB cannot be stored; the engine rejects them at start.
    key.extend_from_slice(&(id.len() as u32).to_be_bytes());
    key.extend_from_slice(id);
    key.extend_from_slice(&n.to_be_bytes());
    key
}

/// The inclusive key range that holds every key of `run_id`, and no other run's.
pub fn run_range(run_id: &str) -> (Vec<u8>, Vec<u8>) {
    (encode(run_id, 0), encode(run_id, u64::MAX))
}

/// Decodes a key made by [`encode`]; `None` if it is not one.
pub fn decode(key: &[u8]) -> Option<(&str, u64)> {
    let len_bytes: [u8; 4] = key.get(..4)?.try_into().ok()?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    let id = std::str::from_utf8(key.get(4..4 + len)?).ok()?;
    let n_bytes: [u8; 8] = key.get(4 + len..)?.try_into().ok()?;
    Some((id, u64::from_be_bytes(n_bytes)))
}

/// In the `log` table, everything about one run shares the prefix `len ‖ id`: its events
/// at `n < 2^62` (their sequence number), its header at `n = 2^62`, its input at
/// `2^62 + 1`, its responses at `n = 2^63 + index`. So a transition's writes sit next to
/// each other (one leaf page, usually), each kind is one range scan, and deleting a run is
/// one range delete.
const HEADER_N: u64 = 1 << 62;
const INPUT_N: u64 = HEADER_N + 1;
const RESPONSE_BIT: u64 = 1 << 63;

/// Key of event `seq` of `run_id` in the `log` table.
pub fn event_key(run_id: &str, seq: u64) -> Vec<u8> {
    encode(run_id, seq & (HEADER_N - 1))
}

/// Key of `run_id`'s header (its live `RunRecord`) in the `log` table.
pub fn header_key(run_id: &str) -> Vec<u8> {
    encode(run_id, HEADER_N)
}

/// Key of `run_id`'s input in the `log` table.
pub fn input_key(run_id: &str) -> Vec<u8> {
    encode(run_id, INPUT_N)
}

/// Key of response `index` of `run_id` in the `log` table (0 = the initial response).
pub fn response_key(run_id: &str, index: u64) -> Vec<u8> {
    encode(run_id, RESPONSE_BIT | index)
}

/// The inclusive range of `run_id`'s events.
pub fn event_range(run_id: &str) -> (Vec<u8>, Vec<u8>) {
    (encode(run_id, 0), encode(run_id, HEADER_N - 1))
}

/// The inclusive range of `run_id`'s responses.
pub fn response_range(run_id: &str) -> (Vec<u8>, Vec<u8>) {
    (encode(run_id, RESPONSE_BIT), encode(run_id, u64::MAX))
}

/// The response index in a response key made by [`response_key`].
pub fn response_index(key: &[u8]) -> Option<u64> {
    decode(key).and_then(|(_, n)| (n & RESPONSE_BIT != 0).then_some(n & !RESPONSE_BIT))
}

/// The longest run id the engine accepts, in bytes.
pub const MAX_RUN_ID_LEN: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn distinct_ids_never_collide(a in ".{0,40}", b in ".{0,40}", n in any::<u64>(), m in any::<u64>()) {
            prop_assume!(a != b);
            prop_assert_ne!(encode(&a, n), encode(&b, m));
        }

        #[test]
        fn one_run_range_never_holds_another_runs_key(a in "[a-c-]{0,6}", b in "[a-c-]{0,6}", m in any::<u64>()) {
            prop_assume!(a != b);
            let (lo, hi) = run_range(&a);
            let k = encode(&b, m);
            prop_assert!(!(lo <= k && k <= hi), "{b:?}/{m} falls inside the range of {a:?}");
        }

        #[test]
        fn decode_inverts_encode(a in ".{0,40}", n in any::<u64>()) {
            let k = encode(&a, n);
            prop_assert_eq!(decode(&k), Some((a.as_str(), n)));
        }

        #[test]
        fn order_within_a_run_follows_n(a in ".{0,20}", n in any::<u64>(), m in any::<u64>()) {
            prop_assert_eq!(encode(&a, n).cmp(&encode(&a, m)), n.cmp(&m));
        }
    }

    proptest! {
        #[test]
        fn events_responses_header_and_input_never_share_a_key(a in ".{0,20}", n in 0u64..(1 << 62), m in 0u64..(1 << 62)) {
            let keys = [event_key(&a, n), response_key(&a, m), header_key(&a), input_key(&a)];
            for i in 0..keys.len() {
                for j in i + 1..keys.len() {
                    prop_assert_ne!(&keys[i], &keys[j]);
                }
            }
            let (lo, hi) = event_range(&a);
            for k in &keys[1..] {
                prop_assert!(!(&lo <= k && k <= &hi));
            }
            let (lo, hi) = response_range(&a);
            for k in [&keys[0], &keys[2], &keys[3]] {
                prop_assert!(!(&lo <= k && k <= &hi));
            }
            let (lo, hi) = run_range(&a);
            for k in &keys {
                prop_assert!(&lo <= k && k <= &hi);
            }
            let r = response_key(&a, m);
            prop_assert_eq!(response_index(&r), Some(m));
            prop_assert_eq!(response_index(&event_key(&a, n)), None);
        }
    }

    #[test]
    fn prefix_ids_do_not_collide() {
        // "ab" + n could collide with "a" + ('b' ‖ n) without the length prefix.
        assert_ne!(encode("a", 0x62_00_00_00_00_00_00_00), encode("ab", 0));
        assert_eq!(decode(b"\x00\x00\x00\x05ab"), None);
    }
}
