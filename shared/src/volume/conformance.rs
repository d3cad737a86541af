//! The conformance suite every volume backend passes: the trait's contract, including
//! idempotency of every call (a step re-run after a crash repeats it).

use std::fs;

use super::{VolumeBackend, VolumeId};

pub fn run(b: &dyn VolumeBackend) {
    assert!(b.list().unwrap().is_empty(), "{}: starts empty", b.name());
    let place = b.place().unwrap();
    assert_eq!(place.backend, b.name());
    assert_eq!(b.place().unwrap(), place, "a backend's place is stable");
    assert!(!place.location.is_empty() && !place.filesystem.is_empty(), "{place}");

    b.create_base(1).unwrap();
    b.create_base(1).unwrap(); // idempotent
    assert!(b.exists(VolumeId::Base(1)).unwrap());
    assert!(!b.is_sealed(1).unwrap());

    let root = b.reset_base(1).unwrap();
    fs::write(root.join("stale"), b"from an interrupted unpack").unwrap();
    let root = b.reset_base(1).unwrap();
    assert_eq!(fs::read_dir(&root).unwrap().count(), 0, "reset empties the base");
    fs::create_dir(root.join("etc")).unwrap();
    fs::write(root.join("etc/hostname"), b"base\n").unwrap();
    std::os::unix::fs::symlink("hostname", root.join("etc/link")).unwrap();
    // Hardlink groups of files and of symlinks (what `ln etc/os-release ...` makes).
    fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname.hard")).unwrap();
    fs::hard_link(root.join("etc/link"), root.join("etc/link.hard")).unwrap();
    // Extended attributes (file capabilities live there), where the filesystem has them.
    let xattrs = xattr::set(root.join("etc/hostname"), "user.thinpipe", b"kept").is_ok();

    assert!(b.snapshot(1, 1).is_err(), "no snapshot of an unsealed base");
    b.seal_base(1).unwrap();
    b.seal_base(1).unwrap();
    assert!(b.is_sealed(1).unwrap());
    assert!(b.reset_base(1).is_err(), "a sealed base cannot be written");

    b.snapshot(1, 1).unwrap();
    b.snapshot(1, 1).unwrap();
    b.snapshot(1, 2).unwrap();
    let p1 = b.expose(1).unwrap();
    let p2 = b.expose(2).unwrap();
    assert_ne!(p1, p2);
    assert_eq!(fs::read(p1.join("etc/hostname")).unwrap(), b"base\n");
    assert_eq!(fs::read_link(p1.join("etc/link")).unwrap().to_str(), Some("hostname"));
    {
        use std::os::unix::fs::MetadataExt;
        for (a, b) in [("etc/hostname", "etc/hostname.hard"), ("etc/link", "etc/link.hard")] {
            let (ma, mb) = (fs::symlink_metadata(p1.join(a)).unwrap(), fs::symlink_metadata(p1.join(b)).unwrap());
            assert_eq!((ma.ino(), ma.nlink()), (mb.ino(), 2), "{a} and {b} stay one hardlink group");
        }
    }
    if xattrs {
        let got = xattr::get(p1.join("etc/hostname"), "user.thinpipe").unwrap();
        assert_eq!(got.as_deref(), Some(&b"kept"[..]), "extended attributes are kept");
    }
    fs::write(p1.join("etc/hostname"), b"changed\n").unwrap();
    assert_eq!(fs::read(p2.join("etc/hostname")).unwrap(), b"base\n", "snapshots are independent");
    // The base, seen through a snapshot taken after the write (a sealed base need not stay
    // mounted anywhere).
    b.snapshot(1, 3).unwrap();
    assert_eq!(fs::read(b.expose(3).unwrap().join("etc/hostname")).unwrap(), b"base\n", "the base is untouched");
    b.delete(VolumeId::Snap(3)).unwrap();

    assert!(b.snapshot(9, 4).is_err(), "a missing origin is an error");
    assert_eq!(b.list().unwrap(), [VolumeId::Base(1), VolumeId::Snap(1), VolumeId::Snap(2)]);

    b.delete(VolumeId::Snap(1)).unwrap();
    b.delete(VolumeId::Snap(1)).unwrap();
    assert!(!b.exists(VolumeId::Snap(1)).unwrap());
    assert!(b.exists(VolumeId::Snap(2)).unwrap(), "deleting one snapshot leaves the other");
    assert!(b.expose(1).is_err());
    b.delete(VolumeId::Snap(2)).unwrap();
    b.delete(VolumeId::Base(1)).unwrap();
    assert!(b.list().unwrap().is_empty());
    assert!(b.leftovers().unwrap().is_empty(), "finished calls leave no in-between artifact");
}

/// The overlay backend's per-snapshot size limits where they exist: at `root` on XFS mounted
/// with `prjquota`, the conformance suite passes with a limit set, each snapshot can write
/// up to its limit and no further (EDQUOT, or ENOSPC as XFS reports a project over its
/// limit), and another snapshot has a limit of its own. Leaves `root` empty.
pub fn overlay_size_limits(root: &std::path::Path) {
    use super::{OverlayBackend, OverlayOptions};
    const LIMIT: u64 = 8 << 20;
    let options = OverlayOptions { snapshot_bytes: Some(LIMIT), ..Default::default() };
    let b = OverlayBackend::open(root, options).expect("XFS with prjquota takes a size limit");
    run(&b);
    b.create_base(1).unwrap();
    fs::write(b.reset_base(1).unwrap().join("f"), b"base").unwrap();
    b.seal_base(1).unwrap();
    b.snapshot(1, 1).unwrap();
    let one = b.expose(1).unwrap();
    fs::write(one.join("small"), vec![1u8; 4 << 20]).expect("a write under the limit");
    let err = fs::write(one.join("large"), vec![1u8; 16 << 20]).expect_err("a write past the limit is refused");
    assert!(matches!(err.raw_os_error(), Some(libc::EDQUOT | libc::ENOSPC)), "past the limit: {err}");
    b.snapshot(1, 2).unwrap();
    fs::write(b.expose(2).unwrap().join("small"), vec![1u8; 4 << 20]).expect("another snapshot, its own limit");
    for snap in [1, 2] {
        b.delete(VolumeId::Snap(snap)).unwrap();
    }
    b.delete(VolumeId::Base(1)).unwrap();
    assert!(b.list().unwrap().is_empty());
}
