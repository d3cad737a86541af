//! Room in the state directory: the run log, the host database and (embedded) the queue
//! live there, and a write that fails for want of space breaks more than the job that made
//! it (redb refuses every later commit until it is opened again). So while the state
//! directory's filesystem has less than a small reserve free, new prepares and activations
//! are refused with a `host_full` result (a scheduler places them elsewhere; nothing is
//! dead-lettered for it) and the worker reports itself not ready with the reason. Releases
//! still run: they give space back (a host whose disk is full of live snapshots heals as
//! they are released), and each needs only a few small commits.

use std::path::PathBuf;

/// The reserve: 2% of the filesystem, at most 16 MiB (a few thousand transitions).
fn reserve(total: u64) -> u64 {
    (total / 50).min(16 << 20)
}

#[derive(Clone, Debug)]
pub struct StateSpace {
    dir: PathBuf,
}

impl StateSpace {
    pub fn new(dir: PathBuf) -> Self {
        StateSpace { dir }
    }

    /// Why no new job should be taken now, if the state directory is short of room. A
    /// filesystem that cannot be measured is not called short (its writes report the problem).
    pub fn shortage(&self) -> Option<String> {
        let st = match nix::sys::statvfs::statvfs(&self.dir) {
            Ok(st) => st,
            Err(e) => {
                tracing::debug!(dir = %self.dir.display(), error = %e, "could not measure the state directory");
                return None;
            }
        };
        let unit = st.fragment_size() as u64;
        let free = st.blocks_available() as u64 * unit;
        let total = st.blocks() as u64 * unit;
        let need = reserve(total);
        (free < need).then(|| {
            format!(
                "host full: the state directory {} has {free} bytes free, less than the {need} it keeps to record runs",
                self.dir.display()
            )
        })
    }
}
