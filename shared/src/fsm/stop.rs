//! A step body's stop signal and the blocking work it owns.
//!
//! Each attempt of a step gets a [`StopSignal`]. It fires when the attempt must end
//! without completing: the engine shuts down, the run is cancelled or stopped
//! ([`super::Engine::stop_run`]), or the attempt timed out. A step body that works on a
//! blocking thread starts that work through [`StopSignal::spawn_blocking`] and checks
//! [`StopSignal::is_stopped`] between units of work (the unpacker between entries). The
//! runner does not move on, retry, commit or report the run stopped until every piece of
//! blocking work of the attempt has returned: so no step body outlives its run's task, the
//! engine's shutdown waits for them, and the worker lease is given back only after them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// See the module docs. Cheap to clone; every clone is the same signal.
#[derive(Clone, Debug, Default)]
pub struct StopSignal {
    token: CancellationToken,
    work: TaskTracker,
    /// Whether any blocking work was started (it may have returned already).
    had_work: Arc<AtomicBool>,
}

impl StopSignal {
    /// A signal that fires with `token` (and when the attempt ends).
    pub(crate) fn new(token: CancellationToken) -> Self {
        Self { token, work: TaskTracker::new(), had_work: Arc::default() }
    }

    /// Whether the step must stop now.
    pub fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves when the step must stop.
    pub async fn stopped(&self) {
        self.token.cancelled().await
    }

    /// The signal as a token, for code that knows nothing of the engine (the unpacker).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Runs `f` on a blocking thread as work of this attempt: the runner waits for it
    /// before the run moves on or stops. `f` should check [`StopSignal::is_stopped`].
    pub fn spawn_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let held = self.work.token();
        self.had_work.store(true, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || {
            let _held = held;
            f()
        })
    }

    /// Runs short blocking work `f` (a few system calls, one small transaction) on the step's
    /// own thread, as work of this attempt: two thread hand-offs fewer than
    /// [`StopSignal::spawn_blocking`] (about 0.1 ms on an activation's path). Such work cannot
    /// stop half-way anyway, so nothing is lost by not being able to leave it: a stop that
    /// comes meanwhile is seen once it returns. On a multi-thread runtime the thread's other
    /// tasks move to another worker meanwhile (`block_in_place`); elsewhere (tests, small
    /// tools) it goes to a blocking thread as `spawn_blocking` does.
    pub async fn run_short<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                let _held = self.work.token();
                self.had_work.store(true, Ordering::SeqCst);
                Ok(tokio::task::block_in_place(f))
            }
            _ => self.spawn_blocking(f).await,
        }
    }

    /// Fires the signal and waits for the attempt's blocking work to return.
    pub(crate) async fn finish(&self) {
        self.token.cancel();
        self.work.close();
        self.work.wait().await;
    }

    /// Blocking work of this attempt still running.
    pub(crate) fn running(&self) -> usize {
        self.work.len()
    }

    /// Whether this attempt started any blocking work (running or returned).
    pub(crate) fn had_work(&self) -> bool {
        self.had_work.load(Ordering::SeqCst)
    }
}
