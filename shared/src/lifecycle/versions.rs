//! Which version of a family a job uses, and making a prepared version current.
//!
//! - `prepare` without a digest resolves the family at the source ([`Want::Latest`]); with
//!   one, that version ([`Want::Pinned`]). Either way the version becomes the family's current
//!   one once its base is sealed.
//! - `activate` uses the host's current version ([`Want::Current`], no source lookup), or the
//!   pinned one; a version not prepared yet is prepared first. An activation makes a version
//!   current only if the family had none.

use std::time::Duration;

use crate::fsm::{RetryPolicy, retry_transient};
use crate::image::{Digest, ImageError, Manifest};
use crate::store::{BaseRow, BaseState, StoreError};

use super::{Hold, Lifecycle};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// The source's current version.
    Latest,
    /// The host's current version (the source's, if the family has none here yet).
    Current,
    /// This version.
    Pinned(Digest),
}

/// A resolved version, held against garbage collection until dropped.
pub struct Version {
    pub hold: Hold,
    pub target: Target,
}

pub enum Target {
    /// Prepared: its sealed base.
    Sealed(BaseRow),
    /// To prepare: its manifest.
    Prepare(Manifest),
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Source(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ResolveError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ResolveError::Source(e) => e.is_retryable(),
            ResolveError::Store(e) => e.is_retryable(),
        }
    }
}

/// A source lookup, retried while its errors are transient (an S3 outage, throttling), with
/// a prepare step's patience: the lookup happens before the run, outside its retries.
async fn at_source<F, Fut>(mut lookup: F) -> Result<Manifest, ImageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Manifest, ImageError>>,
{
    let policy = RetryPolicy {
        max_attempts: 10,
        max_interval: Duration::from_secs(30),
        max_elapsed: Duration::from_secs(120),
        ..RetryPolicy::default()
    };
    retry_transient(&policy, ImageError::is_retryable, || {
        let attempt = lookup();
        async move {
            let result = attempt.await;
            if let Err(e) = &result
                && e.is_retryable()
            {
                tracing::warn!(error = %e, "looking the family up at its source failed; retrying");
            }
            result
        }
    })
    .await
}

impl Lifecycle {
    /// Resolves `want` for `family` and holds the version. A base that garbage collection
    /// took before the hold is treated as not prepared.
    pub async fn resolve(&self, family: &str, want: &Want) -> Result<Version, ResolveError> {
        if *want == Want::Current {
            let f = family.to_owned();
            if let Some(current) = self.store().call(move |s| s.current_base(&f)).await? {
                let hold = self.in_use.hold(family, &current.digest);
                let id = current.id;
                // Re-read under the hold: the pointer may have moved and the base been taken.
                if let Some(row) = self.store().call(move |s| s.base(id)).await?
                    && row.state == BaseState::Sealed
                {
                    return Ok(Version { hold, target: Target::Sealed(row) });
                }
            }
        }
        let source = self.pipeline.context().source.clone();
        let (hold, manifest, digest) = match want {
            Want::Pinned(d) => {
                let hold = self.in_use.hold(family, d.as_str());
                (hold, None, d.clone())
            }
            Want::Latest | Want::Current => {
                let m = at_source(|| source.manifest(family)).await?;
                let hold = self.in_use.hold(family, m.digest.as_str());
                let d = m.digest.clone();
                (hold, Some(m), d)
            }
        };
        let (f, ds) = (family.to_owned(), digest.to_string());
        if let Some(row) = self.store().call(move |s| s.base_of_version(&f, &ds)).await?
            && row.state == BaseState::Sealed
        {
            return Ok(Version { hold, target: Target::Sealed(row) });
        }
        let manifest = match manifest {
            Some(m) => m,
            None => at_source(|| source.manifest_at(family, &digest)).await?,
        };
        Ok(Version { hold, target: Target::Prepare(manifest) })
    }

    /// Makes `base` its family's current version if `always`, or if the family has none.
    /// Returns whether the pointer moved. Only the job executor calls this.
    pub async fn make_current(&self, base: &BaseRow, always: bool) -> Result<bool, StoreError> {
        let (family, id) = (base.family.clone(), base.id);
        let current = self
            .store()
            .call({
                let f = family.clone();
                move |s| s.image(&f)
            })
            .await?
            .and_then(|i| i.current_base);
        if current == Some(id) || (!always && current.is_some()) {
            return Ok(false);
        }
        crate::fault::point("lifecycle.before_make_current", &format!("{family}@{}", base.short_digest()));
        let previous = self.store().call(move |s| s.make_current(&family, id)).await?;
        tracing::info!(family = %base.family, version = %base.digest, base = id, previous, "current version");
        // The old version may be garbage now, and the new base took space.
        self.wake();
        Ok(true)
    }
}
