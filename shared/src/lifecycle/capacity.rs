//! Capacity watermarks: what a backend's usage means for the host.
//!
//! Above `high_percent`, garbage collection runs and then evicts whole families that have no
//! live snapshot, least recently used first, until usage is below `low_percent` (kubelet's
//! image GC, with the last use kept in SQLite so a restart does not forget it). Above
//! `refuse_percent` (or dm-thin metadata above `refuse_metadata_percent`), new prepares and
//! activations are refused with the reason, so a thin pool never reaches out-of-data-space
//! mode (where the kernel queues or fails all IO) nor exhausts its metadata.

use serde::Serialize;

use crate::volume::Usage;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Watermarks {
    pub high_percent: f64,
    pub low_percent: f64,
    pub refuse_percent: f64,
    pub refuse_metadata_percent: f64,
}

impl Default for Watermarks {
    fn default() -> Self {
        Watermarks { high_percent: 85.0, low_percent: 80.0, refuse_percent: 95.0, refuse_metadata_percent: 90.0 }
    }
}

/// What usage means now.
#[derive(Clone, Debug, PartialEq)]
pub enum Pressure {
    Normal,
    /// Above the high watermark: collect and evict down to the low one.
    High,
    /// Above a refusal limit: the message says which ("host full: pool data 96% used (limit 95%)").
    Full(String),
}

impl Watermarks {
    /// Checks the settings make sense (low < high ≤ refuse ≤ 100).
    pub fn validate(&self) -> Result<(), String> {
        let ok = 0.0 < self.low_percent
            && self.low_percent < self.high_percent
            && self.high_percent <= self.refuse_percent
            && self.refuse_percent <= 100.0
            && 0.0 < self.refuse_metadata_percent
            && self.refuse_metadata_percent <= 100.0;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "capacity watermarks must satisfy 0 < low_percent < high_percent <= refuse_percent <= 100 and 0 < refuse_metadata_percent <= 100 (got low {}, high {}, refuse {}, refuse_metadata {})",
                self.low_percent, self.high_percent, self.refuse_percent, self.refuse_metadata_percent
            ))
        }
    }

    pub fn assess(&self, usage: &Usage) -> Pressure {
        let data = usage.percent();
        if data >= self.refuse_percent {
            return Pressure::Full(format!(
                "host full: {} {data:.0}% used (limit {:.0}%)",
                usage.what, self.refuse_percent
            ));
        }
        if let Some(meta) = usage.metadata_percent()
            && meta >= self.refuse_metadata_percent
        {
            return Pressure::Full(format!(
                "host full: pool metadata {meta:.0}% used (limit {:.0}%)",
                self.refuse_metadata_percent
            ));
        }
        if data >= self.high_percent { Pressure::High } else { Pressure::Normal }
    }

    /// Whether eviction may stop.
    pub fn below_low(&self, usage: &Usage) -> bool {
        usage.percent() < self.low_percent
            && usage.metadata_percent().is_none_or(|m| m < self.refuse_metadata_percent.min(self.low_percent))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(used: u64, meta: Option<(u64, u64)>) -> Usage {
        Usage { what: "pool data".into(), used_bytes: used, total_bytes: 100, metadata_blocks: meta }
    }

    #[test]
    fn watermarks_say_what_is_full() {
        let w = Watermarks::default();
        assert_eq!(w.assess(&usage(50, None)), Pressure::Normal);
        assert_eq!(w.assess(&usage(86, None)), Pressure::High);
        assert_eq!(w.assess(&usage(96, None)), Pressure::Full("host full: pool data 96% used (limit 95%)".into()));
        assert_eq!(
            w.assess(&usage(10, Some((91, 100)))),
            Pressure::Full("host full: pool metadata 91% used (limit 90%)".into())
        );
        assert!(w.below_low(&usage(79, None)) && !w.below_low(&usage(81, None)));
        assert!(Watermarks { low_percent: 90.0, ..w }.validate().is_err());
    }
}
