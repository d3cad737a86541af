//! Retry policy and the retry loop. The only module that touches the `backoff` crate.
//!
//! `backoff` 0.4 is unmaintained upstream (RUSTSEC-2025-0012); keeping every use of it here
//! means a swap to `backon` or `tokio-retry2` touches this file alone.

use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use serde::{Deserialize, Serialize};

/// How one step is retried. Every bound is finite, so a step can never retry forever.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Delay before the second attempt.
    pub initial_interval: Duration,
    /// Each delay is the previous one times this.
    pub multiplier: f64,
    /// Delays stop growing here.
    pub max_interval: Duration,
    /// Jitter: a delay is drawn from `[d·(1−f), d·(1+f)]`. 0 disables it.
    pub randomization_factor: f64,
    /// Attempts in all, counted across restarts of the process.
    pub max_attempts: u32,
    /// Time since the first attempt in this process after which no new attempt starts.
    pub max_elapsed: Duration,
    /// One attempt that runs longer than this fails as transient.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_millis(200),
            multiplier: 2.0,
            max_interval: Duration::from_secs(30),
            randomization_factor: 0.3,
            max_attempts: 8,
            max_elapsed: Duration::from_secs(15 * 60),
            attempt_timeout: Duration::from_secs(10 * 60),
        }
    }
}

impl RetryPolicy {
    /// A policy that runs the step once: any error ends the run.
    pub fn no_retry() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    fn backoff(&self) -> backoff::exponential::ExponentialBackoff<TokioClock> {
        backoff::exponential::ExponentialBackoff {
            current_interval: self.initial_interval,
            initial_interval: self.initial_interval,
            randomization_factor: self.randomization_factor,
            multiplier: self.multiplier,
            max_interval: self.max_interval,
            start_time: TokioClock.now_std(),
            max_elapsed_time: Some(self.max_elapsed),
            clock: TokioClock,
        }
    }
}

/// What one attempt tells the retry loop.
#[derive(Debug)]
pub(crate) enum AttemptResult<T, E> {
    Done(T),
    /// Retry after the policy's next delay, unless a bound is reached.
    Transient(E),
    /// Stop now (`backoff::Error::Permanent`).
    Permanent(E),
}

/// Runs `attempt` until it is done, permanent, or the policy's delay or elapsed bound ends it.
/// The attempt count bound is the caller's, because it survives restarts. A delay ends early
/// when `stop` fires (the next attempt then sees it and stops), so a stopped run does not
/// wait out its backoff. Delays are `tokio::time::sleep`, so tests can drive them with a
/// paused clock.
pub(crate) async fn retry<T, E, F, Fut>(policy: &RetryPolicy, stop: &CancellationToken, mut attempt: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = AttemptResult<T, E>>,
{
    let operation = || {
        let fut = attempt();
        async move {
            match fut.await {
                AttemptResult::Done(v) => Ok(v),
                AttemptResult::Transient(e) => Err(backoff::Error::transient(e)),
                AttemptResult::Permanent(e) => Err(backoff::Error::Permanent(e)),
            }
        }
    };
    let notify = |_: E, _: std::time::Duration| {};
    backoff::future::Retry::new(StoppableSleep(stop.clone()), policy.backoff(), notify, operation).await
}

/// `backoff`'s sleeper: tokio's sleep, cut short by a stop token.
struct StoppableSleep(CancellationToken);

impl backoff::future::Sleeper for StoppableSleep {
    type Sleep = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

    fn sleep(&self, dur: std::time::Duration) -> Self::Sleep {
        let stop = self.0.clone();
        Box::pin(async move {
            tokio::select! {
                _ = tokio::time::sleep(dur) => {}
                _ = stop.cancelled() => {}
            }
        })
    }
}

/// Calls `f` until it succeeds, fails with an error `transient` says is not worth retrying,
/// or the policy's attempts (counted here) or time run out; the last error is returned. For
/// work outside a run that still deserves a step's patience (resolving a family at its
/// source before a prepare).
pub async fn retry_transient<T, E, F, Fut>(
    policy: &RetryPolicy,
    transient: impl Fn(&E) -> bool,
    mut f: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempts = 0;
    retry(policy, &CancellationToken::new(), || {
        attempts += 1;
        let last = attempts >= policy.max_attempts;
        let fut = f();
        let transient = &transient;
        async move {
            match fut.await {
                Ok(v) => AttemptResult::Done(v),
                Err(e) if transient(&e) && !last => AttemptResult::Transient(e),
                Err(e) => AttemptResult::Permanent(e),
            }
        }
    })
    .await
}

/// `backoff`'s elapsed-time bound on tokio's clock, so a paused clock pauses it too.
#[derive(Clone, Copy, Debug, Default)]
struct TokioClock;

impl TokioClock {
    fn now_std(self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

impl backoff::Clock for TokioClock {
    fn now(&self) -> std::time::Instant {
        self.now_std()
    }
}
