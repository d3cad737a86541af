//! Layer semantics against real OCI image layouts built by `umoci` from real files: a
//! layer that deletes files and a directory (umoci writes the whiteouts), one that replaces
//! a directory wholesale (an opaque whiteout), hardlinks and symlinks across layers. Our
//! unpacked tree must equal `umoci unpack`'s, entry by entry (type, mode, link target,
//! content hash).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use thinpipe::image::{ApplyOptions, BlobCache, BlobSource, LocalDir, apply_layer};
use thinpipe_tests::tree;

fn umoci(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new("umoci");
    // SAFETY: geteuid has no preconditions.
    let rootless = unsafe { libc::geteuid() } != 0;
    let (sub, rest) = args.split_first().unwrap();
    cmd.current_dir(dir).arg(sub);
    if rootless && ["unpack", "repack"].contains(sub) {
        cmd.arg("--rootless");
    }
    let out =
        cmd.args(rest).output().unwrap_or_else(|e| panic!("umoci is not installed ({e}); scripts/test installs it"));
    assert!(out.status.success(), "umoci {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn write(root: &Path, rel: &str, content: &str, mode: u32) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A hand-made layer (umoci only writes per-file whiteouts): `opq/` replaced wholesale.
fn opaque_layer(path: &Path) {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add("opq/", tar::EntryType::Directory, 0o750, b"");
    add("opq/.wh..wh..opq", tar::EntryType::Regular, 0o644, b"");
    add("opq/only-new", tar::EntryType::Regular, 0o600, b"replaced wholesale\n");
    // umoci raw add-layer takes a plain tar and compresses it itself.
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

#[test]
fn unpacked_tree_equals_umoci_unpack() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    umoci(d, &["init", "--layout", "oci"]);
    umoci(d, &["new", "--image", "oci:fam"]);

    // Layer 1: a tree of real files.
    umoci(d, &["unpack", "--image", "oci:fam", "work"]);
    let root = d.join("work/rootfs");
    write(&root, "etc/hostname", "base\n", 0o644);
    write(&root, "etc/secret", "s3cr3t\n", 0o600);
    write(&root, "usr/bin/tool", "#!/bin/sh\necho tool\n", 0o755);
    write(&root, "gone/a", "a\n", 0o644);
    write(&root, "gone/sub/b", "b\n", 0o644);
    write(&root, "opq/old-1", "old\n", 0o644);
    write(&root, "opq/old-dir/old-2", "old\n", 0o644);
    write(&root, "data/original", "shared inode\n", 0o640);
    umoci(d, &["repack", "--image", "oci:fam", "work"]);
    fs::remove_dir_all(d.join("work")).unwrap();

    // Layer 2: delete a file and a directory (umoci emits whiteouts), change a file.
    umoci(d, &["unpack", "--image", "oci:fam", "work"]);
    let root = d.join("work/rootfs");
    fs::remove_file(root.join("etc/secret")).unwrap();
    fs::remove_dir_all(root.join("gone")).unwrap();
    write(&root, "etc/hostname", "changed\n", 0o644);
    umoci(d, &["repack", "--image", "oci:fam", "work"]);
    fs::remove_dir_all(d.join("work")).unwrap();

    // Layer 3: replace opq/ wholesale (opaque whiteout).
    let layer3 = d.join("layer3.tar");
    opaque_layer(&layer3);
    umoci(d, &["raw", "add-layer", "--image", "oci:fam", layer3.to_str().unwrap()]);

    // Layer 4: a hardlink and symlinks to files of earlier layers.
    umoci(d, &["unpack", "--image", "oci:fam", "work"]);
    let root = d.join("work/rootfs");
    fs::hard_link(root.join("data/original"), root.join("data/hardlink")).unwrap();
    std::os::unix::fs::symlink("../usr/bin/tool", root.join("etc/tool-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).unwrap();
    umoci(d, &["repack", "--image", "oci:fam", "work"]);
    fs::remove_dir_all(d.join("work")).unwrap();

    // The reference: umoci's own unpack.
    umoci(d, &["unpack", "--image", "oci:fam", "reference"]);
    let reference = tree(&d.join("reference/rootfs"));

    // Ours: resolve through the OCI layout, cache, apply in order.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let source = LocalDir::new(d.join("oci"));
    let manifest = rt.block_on(source.manifest("fam")).unwrap();
    assert_eq!(manifest.layers.len(), 4);
    let cache = BlobCache::open(d.join("cache")).unwrap();
    let ours = d.join("ours");
    fs::create_dir(&ours).unwrap();
    for layer in &manifest.layers {
        let (blob, _) = rt.block_on(cache.ensure(&source, layer)).unwrap();
        apply_layer(&ours, &blob, layer.digest.as_str(), &ApplyOptions::default()).unwrap();
    }
    let ours_tree = tree(&ours);

    assert!(!ours_tree.contains_key("gone") && !ours_tree.contains_key("etc/secret"), "whiteouts applied");
    assert_eq!(
        ours_tree.keys().filter(|k| k.starts_with("opq/")).collect::<Vec<_>>(),
        ["opq/only-new"],
        "opaque applied"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(ours.join("data/hardlink")).unwrap().ino(),
        fs::metadata(ours.join("data/original")).unwrap().ino()
    );
    for (path, theirs) in &reference {
        let mine = ours_tree.get(path).unwrap_or_else(|| panic!("{path} is missing from our tree"));
        assert_eq!(mine, theirs, "{path} differs from umoci's");
    }
    let extra: Vec<_> = ours_tree.keys().filter(|k| !reference.contains_key(*k)).collect();
    assert!(extra.is_empty(), "entries umoci does not have: {extra:?}");
}
