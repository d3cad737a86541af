//! Forgotten activations: a snapshot whose activation carried `ttl_secs`, or that is older
//! than `activations.max_age_secs`, is released by the worker through the release workflow,
//! as if its scheduler had sent the `release` it never sent (containerd's leases with an
//! expiry are the model).

use super::{Lifecycle, LifecycleError};
use crate::fsm::Outcome;
use crate::telemetry::{kv, metrics};

impl Lifecycle {
    /// Releases every expired snapshot; returns how many were released.
    pub async fn release_expired(&self) -> Result<usize, LifecycleError> {
        let now = crate::store::epoch_ms(std::time::SystemTime::now());
        let max_age = self.settings.max_activation_age.map(|d| d.as_millis() as i64);
        let expired = self.store().call(move |s| s.expired_snapshots(now, max_age)).await?;
        let mut released = 0;
        for row in expired {
            let invocation = row.run_id.strip_prefix("activate-").unwrap_or(&row.run_id).to_owned();
            let why = if row.expires_at_ms.is_some_and(|t| t <= now) { "ttl" } else { "max_age" };
            match self.pipeline.release(&row.family, &invocation).await {
                Ok(r) => match r.outcome {
                    Outcome::Completed(_) => {
                        released += 1;
                        metrics().snapshots_expired.add(1, &[kv("why", why)]);
                        tracing::info!(family = %row.family, invocation = %invocation, snapshot = row.id, why, "released an expired activation");
                    }
                    Outcome::Failed(f) => {
                        tracing::warn!(invocation = %invocation, failure = %f, "releasing an expired activation failed")
                    }
                },
                Err(e) => {
                    tracing::warn!(invocation = %invocation, error = %e, "releasing an expired activation failed")
                }
            }
        }
        if released > 0 {
            self.wake();
        }
        Ok(released)
    }
}
