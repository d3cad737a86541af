//! One run's task: run the current step under its retry policy, commit the transition,
//! move on. Returns how the run ended, or `None` when it stopped without ending (shutdown,
//! cancel, fenced), in which case it stays as the run log says.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::retry::{AttemptResult, retry};
use super::schema::{AttemptErrorKind, EventKind, Failure, FailureKind};
use super::state::{Inner, RawOutcome, RunEnd};
use super::stop::StopSignal;
use super::workflow::{BoundRun, CallError, ErasedWorkflow, StepError};
use super::writer::{Change, Op, OpError, Unrecorded, Update};
use crate::fault;

/// Why a step did not advance.
enum StepStop {
    /// The run fails; `last_attempt` is recorded before the `Finished` event.
    Fail { failure: Failure, last_attempt: Option<EventKind> },
    /// Stop the task without touching the run (shutdown, cancel, fenced) — or, with
    /// `interrupted`, because the run log could not be written.
    Stop { why: String, interrupted: bool },
}

/// Where a run stands: the response of its last completed step, the step to run next, and
/// the failed attempts of that step so far.
pub(crate) struct Position {
    pub w: Vec<u8>,
    pub step: u32,
    pub attempts: u32,
}

/// The start of a run not yet in the run log: every change carries it until one commits
/// (guarantee 1 of `fsm/DESIGN.md`: the start is durable with the first transition).
struct StartSlot<'a> {
    inner: &'a Arc<Inner>,
    id: &'a str,
    start: std::sync::Mutex<Option<Box<Unrecorded>>>,
}

impl StartSlot<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<Unrecorded>>> {
        crate::sync::lock(&self.start)
    }

    /// What the next change must carry.
    fn for_change(&self) -> Option<Box<Unrecorded>> {
        self.lock().clone()
    }

    /// A change committed: the run is in the run log from now on.
    fn committed(&self) {
        if self.lock().take().is_some() {
            crate::sync::lock(&self.inner.unrecorded).remove(self.id);
        }
    }
}

/// Submits `change` (with the run's start while it is unrecorded).
async fn submit(inner: &Arc<Inner>, slot: &StartSlot<'_>, mut change: Change) -> Result<(), OpError> {
    change.start = slot.for_change();
    inner.submit(Op::Change(change)).await?;
    slot.committed();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn drive(
    inner: &Arc<Inner>,
    wf: Arc<dyn ErasedWorkflow>,
    bound: Arc<dyn BoundRun>,
    id: &str,
    position: Position,
    unrecorded: Option<Unrecorded>,
    trace_parent: Option<&str>,
    cancel: &CancellationToken,
) -> Option<RunEnd> {
    let Position { mut w, mut step, mut attempts } = position;
    let slot = StartSlot { inner, id, start: std::sync::Mutex::new(unrecorded.map(Box::new)) };
    let slot = &slot;
    let span = tracing::info_span!("run", run_id = %id, workflow = wf.name());
    if let Some(parent) = trace_parent {
        crate::telemetry::set_parent(&span, parent);
    }
    let in_flight = crate::telemetry::metrics();
    let workflow_kv = [crate::telemetry::kv("workflow", wf.name().to_owned())];
    in_flight.runs_in_flight.add(1, &workflow_kv);
    let end = async move {
        loop {
            let last = step as usize + 1 == wf.step_count();
            match run_step(inner, slot, &*wf, &bound, id, &w, step, attempts, last, cancel).await {
                Ok(next) => {
                    if last {
                        return Some(RunEnd::Finished(RawOutcome::Completed(next)));
                    }
                    w = next;
                    step += 1;
                    attempts = 0;
                }
                Err(StepStop::Fail { failure, last_attempt }) => {
                    let change = Change {
                        id: id.to_owned(),
                        start: None,
                        expect_step: Some(step),
                        update: Update::Fail(failure.clone()),
                        events: last_attempt.into_iter().collect(),
                    };
                    return match submit(inner, slot, change).await {
                        Ok(_) => {
                            tracing::warn!(step = %failure.step, kind = ?failure.kind, error = %failure.error, "run failed");
                            Some(RunEnd::Finished(RawOutcome::Failed(failure)))
                        }
                        Err(e) => stopped(e),
                    };
                }
                Err(StepStop::Stop { why, interrupted }) => {
                    tracing::debug!(%why, "run task stopped");
                    return interrupted.then_some(RunEnd::Interrupted(why));
                }
            }
        }
    }
    .instrument(span)
    .await;
    in_flight.runs_in_flight.add(-1, &workflow_kv);
    end
}

/// A write the run needed was refused or failed: fenced and stopped are quiet ends, a
/// storage failure interrupts waiters (the run stays active for the next start).
fn stopped(e: OpError) -> Option<RunEnd> {
    match e {
        OpError::Storage(_) => {
            tracing::error!(error = %e, "run log write failed; the run stays active and resumes at the next start");
            Some(RunEnd::Interrupted(e.to_string()))
        }
        OpError::NotFound(_) | OpError::Fenced { .. } | OpError::Stopped => None,
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_step(
    inner: &Arc<Inner>,
    slot: &StartSlot<'_>,
    wf: &dyn ErasedWorkflow,
    bound: &Arc<dyn BoundRun>,
    id: &str,
    w: &[u8],
    step: u32,
    attempts_before: u32,
    last: bool,
    cancel: &CancellationToken,
) -> Result<Vec<u8>, StepStop> {
    let name = wf.step_name(step as usize);
    let policy = wf.policy(step as usize).clone();
    let mut attempts = attempts_before;
    let fault_detail = format!("{id}/{name}");
    retry(&policy, cancel, || {
        attempts += 1;
        let attempt = attempts;
        // Fires with the run's token (shutdown, cancel, stop) and when the attempt ends.
        let stop_signal = StopSignal::new(cancel.child_token());
        let call = bound.call(step as usize, w, attempt, stop_signal.clone());
        let inner = inner.clone();
        let policy = policy.clone();
        let fault_detail = fault_detail.clone();
        let span = tracing::info_span!(
            "step",
            run_id = %id,
            workflow = wf.name(),
            step = name,
            attempt,
            outcome = tracing::field::Empty,
            error_kind = tracing::field::Empty,
        );
        let span_outcome = span.clone();
        let workflow = wf.name();
        // Records how the attempt ended on its span and in the step duration histogram.
        let observe = move |started: Instant, outcome: &'static str, error_kind: Option<String>| {
            span_outcome.record("outcome", outcome);
            if let Some(k) = &error_kind {
                span_outcome.record("error_kind", k.as_str());
            }
            let attrs = [
                crate::telemetry::kv("workflow", workflow.to_owned()),
                crate::telemetry::kv("step", name.to_owned()),
                crate::telemetry::kv("outcome", outcome),
            ];
            crate::telemetry::metrics().step_duration.record(started.elapsed().as_secs_f64(), &attrs);
        };
        async move {
            fault::point("fsm.before_step", &fault_detail);
            let started = Instant::now();
            let guarded = tokio::time::timeout(policy.attempt_timeout, AssertUnwindSafe(call).catch_unwind());
            let result = tokio::select! {
                biased;
                _ = inner.shutdown.cancelled() => Err("shutdown"),
                _ = cancel.cancelled() => Err("stopped or cancelled"),
                r = guarded => Ok(r),
            };
            // The attempt is over however it ended: its blocking work returns before the run
            // moves on, retries, commits or stops (no step body outlives its run's task). A
            // stopped attempt that had blocking work says so, even when that work saw the
            // signal and returned before this task was polled (the log then tells the same
            // story whichever thread won).
            let stopping = stop_signal.running() > 0 || (result.is_err() && stop_signal.had_work());
            if stopping {
                tracing::info!("waiting for the step's blocking work to stop");
            }
            stop_signal.finish().await;
            if stopping {
                tracing::info!("the step's blocking work stopped");
            }
            let result = match result {
                Ok(r) => r,
                Err(why) => return stop(why),
            };
            let duration_ms = started.elapsed().as_millis() as u64;
            let failed = |kind: AttemptErrorKind, error: String| EventKind::AttemptFailed {
                step: name.to_owned(),
                attempt,
                error,
                kind,
                duration_ms,
            };
            let (kind, error) = match result {
                Ok(Ok(Ok(next))) => {
                    fault::point("fsm.before_commit", &fault_detail);
                    let change = Change {
                        id: id.to_owned(),
                        start: None,
                        expect_step: Some(step),
                        update: Update::Advance { w: next.clone(), last },
                        events: vec![EventKind::StepCompleted { step: name.to_owned(), attempt, duration_ms }],
                    };
                    match submit(&inner, slot, change).await {
                        Ok(_) => {
                            fault::point("fsm.after_commit", &fault_detail);
                            observe(started, "completed", None);
                            return AttemptResult::Done(next);
                        }
                        Err(OpError::Storage(e)) => (
                            AttemptErrorKind::Commit,
                            format!("the step succeeded but its transition could not be committed: {e}"),
                        ),
                        Err(e) => return stop(&e.to_string()),
                    }
                }
                Ok(Ok(Err(CallError::Step(StepError::Transient(e))))) => (AttemptErrorKind::Transient, e),
                Ok(Ok(Err(CallError::Step(StepError::Abort { message, code })))) => {
                    observe(started, "aborted", Some("abort".into()));
                    let last = failed(AttemptErrorKind::Abort, message.clone());
                    let failure = Failure {
                        step: name.to_owned(),
                        error: message,
                        kind: FailureKind::Aborted,
                        code: code.map(str::to_owned),
                    };
                    return AttemptResult::Permanent(StepStop::Fail { failure, last_attempt: Some(last) });
                }
                Ok(Ok(Err(CallError::Corrupt(e)))) => {
                    observe(started, "corrupt", Some("corrupt".into()));
                    return fail(name, FailureKind::Corrupt, &e, failed(AttemptErrorKind::Corrupt, e.clone()));
                }
                Ok(Err(panic)) => (AttemptErrorKind::Panic, format!("step panicked: {}", panic_message(&*panic))),
                Err(_) => (AttemptErrorKind::Timeout, format!("attempt timed out after {:?}", policy.attempt_timeout)),
            };
            observe(started, "failed", Some(format!("{kind:?}").to_lowercase()));
            tracing::warn!(error = %error, ?kind, "step attempt failed");
            if attempt >= policy.max_attempts {
                let why = format!("{error} (attempt {attempt} of {})", policy.max_attempts);
                return fail(name, FailureKind::RetriesExhausted, &why, failed(kind, error));
            }
            let attrs =
                [crate::telemetry::kv("workflow", workflow.to_owned()), crate::telemetry::kv("step", name.to_owned())];
            crate::telemetry::metrics().retries.add(1, &attrs);
            // Record the failed attempt before backing off, so the count survives a restart.
            let change = Change {
                id: id.to_owned(),
                start: None,
                expect_step: Some(step),
                update: Update::CountAttempt,
                events: vec![failed(kind, error.clone())],
            };
            match submit(&inner, slot, change).await {
                Ok(_) => {}
                Err(e @ OpError::Storage(_)) => {
                    return AttemptResult::Permanent(StepStop::Stop { why: e.to_string(), interrupted: true });
                }
                Err(e) => return stop(&e.to_string()),
            }
            // Returned as the final error if the policy's elapsed-time bound ends the retries.
            AttemptResult::Transient(StepStop::Fail {
                failure: Failure {
                    step: name.to_owned(),
                    error: format!("{error} (retry time limit {:?} reached)", policy.max_elapsed),
                    kind: FailureKind::RetriesExhausted,
                    code: None,
                },
                last_attempt: None,
            })
        }
        .instrument(span)
    })
    .await
}

fn stop(why: &str) -> AttemptResult<Vec<u8>, StepStop> {
    AttemptResult::Permanent(StepStop::Stop { why: why.to_owned(), interrupted: false })
}

fn fail(step: &str, kind: FailureKind, error: &str, last_attempt: EventKind) -> AttemptResult<Vec<u8>, StepStop> {
    AttemptResult::Permanent(StepStop::Fail {
        failure: Failure { step: step.to_owned(), error: error.to_owned(), kind, code: None },
        last_attempt: Some(last_attempt),
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}
