//! Thin ids: 24-bit and unique per pool. Bases take `1..2^20`, snapshots `2^20 + n` up to
//! `2^24 - 1`; running out of a range is a clear error, never a wrap-around.

use crate::volume::{VolumeError, VolumeId};

/// Thin ids are 24-bit.
pub const THIN_ID_LIMIT: u64 = 1 << 24;
/// Snapshots take thin ids from here up; bases take those below.
pub const SNAP_THIN_ID_BASE: u64 = 1 << 20;

/// The pool-wide thin id of a volume, or an abort when its range is exhausted.
pub fn thin_id(vol: VolumeId) -> Result<u64, VolumeError> {
    let (id, ok) = match vol {
        VolumeId::Base(n) => (n, n > 0 && n < SNAP_THIN_ID_BASE),
        VolumeId::Snap(n) => (SNAP_THIN_ID_BASE.saturating_add(n), n > 0 && n < THIN_ID_LIMIT - SNAP_THIN_ID_BASE),
    };
    if ok {
        Ok(id)
    } else {
        let (range, limit) = match vol {
            VolumeId::Base(_) => ("base", SNAP_THIN_ID_BASE - 1),
            VolumeId::Snap(_) => ("snapshot", THIN_ID_LIMIT - SNAP_THIN_ID_BASE - 1),
        };
        Err(VolumeError::Abort {
            volume: vol.to_string(),
            detail: format!(
                "the {range} range of dm-thin ids is exhausted (at most {limit} {range}s per pool): \
                 drain the host and recreate its pool and state"
            ),
        })
    }
}

/// The volume a thin id belongs to (`None` for ids outside both ranges).
pub fn volume_of(thin_id: u64) -> Option<VolumeId> {
    match thin_id {
        0 => None,
        n if n < SNAP_THIN_ID_BASE => Some(VolumeId::Base(n)),
        n if n < THIN_ID_LIMIT => Some(VolumeId::Snap(n - SNAP_THIN_ID_BASE)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_id_ranges_are_disjoint_and_bounded() {
        assert_eq!(thin_id(VolumeId::Base(1)).unwrap(), 1);
        assert_eq!(thin_id(VolumeId::Base(SNAP_THIN_ID_BASE - 1)).unwrap(), SNAP_THIN_ID_BASE - 1);
        assert!(thin_id(VolumeId::Base(SNAP_THIN_ID_BASE)).unwrap_err().to_string().contains("base range"));
        assert_eq!(thin_id(VolumeId::Snap(1)).unwrap(), SNAP_THIN_ID_BASE + 1);
        assert_eq!(thin_id(VolumeId::Snap(THIN_ID_LIMIT - SNAP_THIN_ID_BASE - 1)).unwrap(), THIN_ID_LIMIT - 1);
        let err = thin_id(VolumeId::Snap(THIN_ID_LIMIT - SNAP_THIN_ID_BASE)).unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("snapshot range of dm-thin ids is exhausted"), "{err}");
        assert!(thin_id(VolumeId::Base(0)).is_err());
        for vol in [VolumeId::Base(7), VolumeId::Snap(7), VolumeId::Snap(123_456)] {
            assert_eq!(volume_of(thin_id(vol).unwrap()), Some(vol));
        }
        assert_eq!(volume_of(0), None);
        assert_eq!(volume_of(THIN_ID_LIMIT), None);
    }
}
