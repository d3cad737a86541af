//! Signals: the first SIGTERM or SIGINT fires the daemon's shutdown token (a drain); a second
//! exits at once with 130 (unfinished runs resume at the next start).

use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// Installs the handlers; call before anything that may wait (`worker.wait_for_state`), so a
/// signal then ends the wait cleanly instead of killing the process by the default action.
pub fn spawn(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        for n in 0.. {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            if n == 0 {
                tracing::info!("signal received: draining (send it again to exit at once)");
                shutdown.cancel();
            } else {
                eprintln!("worker: second signal: exiting now; unfinished runs resume at the next start");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
