//! How far the steps running in this process have got: which step of which run, and for
//! the steps that move bytes (downloading and unpacking a version's layers) how many of how
//! many, in all and per layer. In memory only: the run log says which steps completed; this says how far the
//! running one is. Read by the admin API (`GET /api/progress`) and drawn by [`ProgressView`]
//! (`worker run`, the demo, `enqueue --wait`) when stderr is a terminal.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One running step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepProgress {
    pub run_id: String,
    pub family: String,
    pub step: String,
    /// Bytes this step has moved (downloaded, or read from the cached layers while unpacking).
    pub done_bytes: u64,
    /// What the step moves in all; 0 for a step that moves no bytes of its own.
    pub total_bytes: u64,
    /// While unpacking: layer entries applied, and the file bytes they wrote.
    #[serde(default)]
    pub applied_entries: u64,
    #[serde(default)]
    pub applied_bytes: u64,
    /// For a step that moves layers: each one, in the manifest's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerProgress>,
}

/// One layer of a step that moves layers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerProgress {
    pub digest: String,
    pub size: u64,
    /// Bytes of this layer moved so far (downloaded, or read while unpacking).
    pub done_bytes: u64,
    /// While unpacking: the file bytes its entries wrote.
    #[serde(default)]
    pub applied_bytes: u64,
    /// Whether the step is through with this layer.
    pub finished: bool,
}

impl StepProgress {
    /// Layers finished, of how many (0 of 0 for a step without layers).
    pub fn layers_finished(&self) -> (usize, usize) {
        (self.layers.iter().filter(|l| l.finished).count(), self.layers.len())
    }
}

/// The steps running now, by run id. Cloning shares the board.
#[derive(Clone, Debug, Default)]
pub struct ProgressBoard {
    running: Arc<Mutex<BTreeMap<String, StepProgress>>>,
}

impl ProgressBoard {
    /// Records that `step` of `run_id` started; it is on the board until the returned
    /// tracker is dropped (however the step ends).
    pub fn begin(&self, run_id: &str, family: &str, step: &str, total_bytes: u64) -> StepTracker {
        self.begin_layers(run_id, family, step, total_bytes, Vec::new())
    }

    /// [`ProgressBoard::begin`] for a step that moves `layers` (digest, size): their bytes
    /// are its total, and each is followed on its own.
    pub fn begin_with_layers(&self, run_id: &str, family: &str, step: &str, layers: &[(String, u64)]) -> StepTracker {
        let layers: Vec<LayerProgress> = layers
            .iter()
            .map(|(digest, size)| LayerProgress {
                digest: digest.clone(),
                size: *size,
                done_bytes: 0,
                applied_bytes: 0,
                finished: false,
            })
            .collect();
        let total = layers.iter().map(|l| l.size).sum();
        self.begin_layers(run_id, family, step, total, layers)
    }

    fn begin_layers(
        &self,
        run_id: &str,
        family: &str,
        step: &str,
        total_bytes: u64,
        layers: Vec<LayerProgress>,
    ) -> StepTracker {
        let entry = StepProgress {
            run_id: run_id.to_owned(),
            family: family.to_owned(),
            step: step.to_owned(),
            done_bytes: 0,
            total_bytes,
            applied_entries: 0,
            applied_bytes: 0,
            layers,
        };
        self.lock().insert(run_id.to_owned(), entry);
        StepTracker { board: self.clone(), run_id: run_id.to_owned(), step: step.to_owned() }
    }

    /// The steps running now, ordered by run id.
    pub fn current(&self) -> Vec<StepProgress> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StepProgress>> {
        // The map is whole after any panic (each change is one insert, remove or add).
        crate::sync::lock(&self.running)
    }
}

/// A step's place on the board; dropping it takes the step off.
#[derive(Debug)]
pub struct StepTracker {
    board: ProgressBoard,
    run_id: String,
    step: String,
}

impl StepTracker {
    /// Changes this step's entry, if the run is still at this step.
    fn update(&self, f: impl FnOnce(&mut StepProgress)) {
        if let Some(p) = self.board.lock().get_mut(&self.run_id)
            && p.step == self.step
        {
            f(p);
        }
    }

    /// Counts `n` more bytes of layer `layer` (its index) done.
    pub fn advance(&self, layer: usize, n: u64) {
        self.update(|p| {
            p.done_bytes = p.done_bytes.saturating_add(n);
            if let Some(l) = p.layers.get_mut(layer) {
                l.done_bytes = l.done_bytes.saturating_add(n);
            }
        });
    }

    /// Counts one more entry of layer `layer` applied, which wrote `bytes` of file data.
    pub fn applied(&self, layer: usize, bytes: u64) {
        self.update(|p| {
            p.applied_entries += 1;
            p.applied_bytes = p.applied_bytes.saturating_add(bytes);
            if let Some(l) = p.layers.get_mut(layer) {
                l.applied_bytes = l.applied_bytes.saturating_add(bytes);
            }
        });
    }

    /// The step is through with layer `layer`.
    pub fn finished(&self, layer: usize) {
        self.update(|p| {
            if let Some(l) = p.layers.get_mut(layer) {
                l.finished = true;
            }
        });
    }
}

impl Drop for StepTracker {
    fn drop(&mut self) {
        let mut running = self.board.lock();
        // A later step of the same run may have taken the entry over already.
        if running.get(&self.run_id).is_some_and(|p| p.step == self.step) {
            running.remove(&self.run_id);
        }
    }
}

/// The bar on stderr now, if any: log lines are written above it ([`above_the_bar`]).
static SHOWN: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Runs `write` (a write to stderr) with the bar shown now, if any, cleared from the
/// terminal meanwhile and drawn again after: a log line goes above the bar, not through it.
pub fn above_the_bar<T>(write: impl FnOnce() -> T) -> T {
    let shown = crate::sync::lock(&SHOWN).clone();
    match shown {
        Some(bar) => bar.suspend(write),
        None => write(),
    }
}

/// A progress bar on stderr following the steps of one family's runs: the step's name, and
/// for a step that moves bytes a bar with bytes done, total and rate.
pub struct ProgressView {
    bar: indicatif::ProgressBar,
    family: String,
}

impl ProgressView {
    /// A view of `family`'s runs, or `None` when stderr is not a terminal (a log file or a
    /// pipe gets no bar).
    pub fn on_terminal(family: &str, waiting: &str) -> Option<ProgressView> {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return None;
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(Self::spinner());
        bar.set_message(waiting.to_owned());
        bar.enable_steady_tick(Duration::from_millis(100));
        *crate::sync::lock(&SHOWN) = Some(bar.clone());
        Some(ProgressView { bar, family: family.to_owned() })
    }

    fn spinner() -> indicatif::ProgressStyle {
        indicatif::ProgressStyle::with_template("{spinner} {elapsed} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner())
    }

    fn bytes() -> indicatif::ProgressStyle {
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed} [{bar:20}] {bytes}/{total_bytes} {binary_bytes_per_sec} {wide_msg}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    }

    /// Shows the first of `running` that belongs to the family (the board as read now);
    /// with none, keeps what it showed.
    pub fn show(&self, running: &[StepProgress]) {
        let Some(p) = running.iter().find(|p| p.family == self.family) else { return };
        let mut message = format!("{} ({})", p.step, p.run_id);
        let (finished, layers) = p.layers_finished();
        if layers > 0 {
            message.push_str(&format!(": {finished} of {layers} layers done"));
        }
        if p.applied_entries > 0 {
            message.push_str(&format!(
                ", {} entries, {} applied",
                p.applied_entries,
                indicatif::HumanBytes(p.applied_bytes)
            ));
        }
        if p.total_bytes > 0 {
            self.bar.set_style(Self::bytes());
            self.bar.set_length(p.total_bytes);
            self.bar.set_position(p.done_bytes);
        } else {
            self.bar.set_style(Self::spinner());
        }
        self.bar.set_message(message);
    }

    /// Clears the bar (before the result is printed).
    pub fn finish(self) {
        *crate::sync::lock(&SHOWN) = None;
        self.bar.finish_and_clear();
    }
}

/// Awaits `work` while `view` (if any) shows what `read` returns, read five times a second.
pub async fn while_running<T>(
    view: Option<ProgressView>,
    mut read: impl AsyncFnMut() -> Vec<StepProgress>,
    work: impl Future<Output = T>,
) -> T {
    let Some(view) = view else { return work.await };
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            out = &mut work => {
                view.finish();
                return out;
            }
            _ = tick.tick() => view.show(&read().await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacking_counts_entries_and_bytes_applied_beside_bytes_read() {
        let board = ProgressBoard::default();
        let layers = [("sha256:a".to_owned(), 100), ("sha256:b".to_owned(), 50)];
        let step = board.begin_with_layers("prepare-web@1", "web", "unpack_into_base", &layers);
        assert_eq!(board.current()[0].total_bytes, 150, "the layers' bytes are the total");
        step.advance(0, 100); // the whole (small) layer read at once
        for bytes in [10, 0, 5] {
            step.applied(0, bytes);
        }
        step.finished(0);
        step.advance(1, 20);
        step.applied(1, 7);
        let now = &board.current()[0];
        assert_eq!((now.done_bytes, now.applied_entries, now.applied_bytes), (120, 4, 22));
        assert_eq!(now.layers_finished(), (1, 2));
        let per_layer: Vec<(u64, u64, bool)> =
            now.layers.iter().map(|l| (l.done_bytes, l.applied_bytes, l.finished)).collect();
        assert_eq!(per_layer, [(100, 15, true), (20, 7, false)]);
        // Older readers of /api/progress without the new fields still parse.
        let old: StepProgress =
            serde_json::from_str(r#"{"run_id":"r","family":"f","step":"s","done_bytes":1,"total_bytes":2}"#).unwrap();
        assert_eq!(old.applied_entries, 0);
    }

    #[test]
    fn a_step_is_on_the_board_while_its_tracker_lives() {
        let board = ProgressBoard::default();
        let download = board.begin_with_layers("prepare-web@1", "web", "download_blobs", &[("sha256:a".into(), 100)]);
        download.advance(0, 30);
        download.advance(0, 20);
        assert_eq!(board.current()[0].done_bytes, 50);
        assert_eq!(board.current()[0].step, "download_blobs");
        // The next step takes the run's place; the old tracker's end leaves it there.
        let unpack = board.begin("prepare-web@1", "web", "unpack_into_base", 10);
        download.advance(0, 5);
        drop(download);
        assert_eq!(board.current().len(), 1);
        assert_eq!((board.current()[0].step.as_str(), board.current()[0].done_bytes), ("unpack_into_base", 0));
        drop(unpack);
        assert!(board.current().is_empty());
    }
}
