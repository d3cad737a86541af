//! Every backend's volume calls as spans, named once: `volume.create_base`,
//! `volume.reset_base`, `volume.seal_base`, `volume.snapshot`, `volume.expose`,
//! `volume.delete`, each with the backend's name and the volume, and the error when one
//! fails. Backends stay free of tracing; whoever opens one for the pipeline wraps it
//! ([`Traced::new`]). Reads (`exists`, `list`, `usage`, ...) are not spans: they are many and
//! cheap.

use std::path::PathBuf;

use super::{Leftover, Place, Usage, VolumeBackend, VolumeError, VolumeId};

/// A backend whose changing calls are spans.
pub struct Traced<B>(B);

impl<B: VolumeBackend> Traced<B> {
    pub fn new(backend: B) -> Self {
        Traced(backend)
    }
}

impl<B: VolumeBackend> VolumeBackend for Traced<B> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn constant_time_snapshots(&self) -> bool {
        self.0.constant_time_snapshots()
    }

    #[tracing::instrument(name = "volume.create_base", skip(self), fields(backend = self.0.name()), err(Display))]
    fn create_base(&self, id: u64) -> Result<(), VolumeError> {
        self.0.create_base(id)
    }

    #[tracing::instrument(name = "volume.reset_base", skip(self), fields(backend = self.0.name()), err(Display))]
    fn reset_base(&self, id: u64) -> Result<PathBuf, VolumeError> {
        self.0.reset_base(id)
    }

    #[tracing::instrument(name = "volume.seal_base", skip(self), fields(backend = self.0.name()), err(Display))]
    fn seal_base(&self, id: u64) -> Result<(), VolumeError> {
        self.0.seal_base(id)
    }

    fn is_sealed(&self, id: u64) -> Result<bool, VolumeError> {
        self.0.is_sealed(id)
    }

    #[tracing::instrument(name = "volume.snapshot", skip(self), fields(backend = self.0.name()), err(Display))]
    fn snapshot(&self, base: u64, snap: u64) -> Result<(), VolumeError> {
        self.0.snapshot(base, snap)
    }

    #[tracing::instrument(name = "volume.expose", skip(self), fields(backend = self.0.name()), err(Display))]
    fn expose(&self, snap: u64) -> Result<PathBuf, VolumeError> {
        self.0.expose(snap)
    }

    fn is_exposed(&self, snap: u64) -> Result<bool, VolumeError> {
        self.0.is_exposed(snap)
    }

    #[tracing::instrument(name = "volume.delete", skip(self), fields(backend = self.0.name(), %vol), err(Display))]
    fn delete(&self, vol: VolumeId) -> Result<(), VolumeError> {
        self.0.delete(vol)
    }

    fn exists(&self, vol: VolumeId) -> Result<bool, VolumeError> {
        self.0.exists(vol)
    }

    fn list(&self) -> Result<Vec<VolumeId>, VolumeError> {
        self.0.list()
    }

    fn usage(&self) -> Result<Usage, VolumeError> {
        self.0.usage()
    }

    fn place(&self) -> Result<Place, VolumeError> {
        self.0.place()
    }

    fn leftovers(&self) -> Result<Vec<Leftover>, VolumeError> {
        self.0.leftovers()
    }

    #[tracing::instrument(name = "volume.remove_leftover", skip(self), fields(backend = self.0.name(), path = %leftover.path.display()), err(Display))]
    fn remove_leftover(&self, leftover: &Leftover) -> Result<(), VolumeError> {
        self.0.remove_leftover(leftover)
    }

    fn wait_reclaimed(&self, timeout: std::time::Duration) -> Result<(), VolumeError> {
        self.0.wait_reclaimed(timeout)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::volume::DirBackend;

    /// Collects the names of the spans opened.
    struct Names(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Names {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            crate::sync::lock(&self.0).push(attrs.metadata().name().to_owned());
        }
    }

    #[test]
    fn every_changing_call_is_one_span_named_the_same_for_any_backend() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Traced::new(DirBackend::open(dir.path()).unwrap());
        let names = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Names(names.clone()));
        tracing::subscriber::with_default(subscriber, || {
            backend.create_base(1).unwrap();
            backend.reset_base(1).unwrap();
            backend.seal_base(1).unwrap();
            backend.snapshot(1, 2).unwrap();
            backend.expose(2).unwrap();
            backend.delete(VolumeId::Snap(2)).unwrap();
            assert!(backend.is_sealed(1).unwrap() && backend.list().unwrap().len() == 1);
        });
        assert_eq!(
            *crate::sync::lock(&names),
            [
                "volume.create_base",
                "volume.reset_base",
                "volume.seal_base",
                "volume.snapshot",
                "volume.expose",
                "volume.delete"
            ]
        );
    }
}
