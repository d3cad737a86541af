//! Table-driven tests on tiny tarballs built here: semantics and the security rules.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use super::*;

/// A tar entry to build.
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Char(&'a str),
    Fifo(&'a str),
}

fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_600_000_000);
        // Owned by whoever runs the tests: root keeps any owner, others only their own.
        let (uid, gid) = process_owner();
        h.set_uid(uid);
        h.set_gid(gid);
        // set_path refuses '..' and absolute paths, so the name is written raw.
        let (path, data): (&str, &[u8]) = match e {
            E::Dir(p, m) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*m);
                (p, &[])
            }
            E::File(p, d, m) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*m);
                (p, d)
            }
            E::Symlink(p, t) | E::Hardlink(p, t) => {
                h.set_entry_type(if matches!(e, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_mode(0o777);
                h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                (p, &[])
            }
            E::Char(p) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o600);
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
                (p, &[])
            }
            E::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o600);
                (p, &[])
            }
        };
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("root")).unwrap();
        Self { dir }
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn apply(&self, name: &str, bytes: &[u8]) -> Result<ApplyStats, ImageError> {
        let blob = self.dir.path().join(name);
        fs::write(&blob, bytes).unwrap();
        apply_layer(&self.root(), &blob, name, &ApplyOptions::default())
    }
    fn apply_with(&self, name: &str, bytes: &[u8], opts: &ApplyOptions) -> Result<ApplyStats, ImageError> {
        let blob = self.dir.path().join(name);
        fs::write(&blob, bytes).unwrap();
        apply_layer(&self.root(), &blob, name, opts)
    }
    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.root().join(rel)).is_ok()
    }
    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.root().join(rel)).unwrap()
    }
    /// Everything in the fixture outside `root/` and the blobs: must stay empty.
    fn outside(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "root" && !n.starts_with("layer"))
            .collect();
        out.sort();
        out
    }
}

#[test]
fn files_dirs_modes_symlinks_and_hardlinks() {
    let f = Fixture::new();
    let layer = tar_of(&[
        E::Dir("etc/", 0o755),
        E::File("etc/motd", b"hi\n", 0o640),
        E::File("bin/tool", b"#!/bin/sh\n", 0o4755),
        // Bits a usual umask (022) takes from a new file: set explicitly after.
        E::File("etc/shared", b"", 0o666),
        E::Symlink("etc/link", "motd"),
        E::Hardlink("etc/hard", "etc/motd"),
        E::Fifo("run/pipe"),
    ]);
    let stats = f.apply("layer1", &layer).unwrap();
    assert_eq!(stats.entries, 7);
    assert_eq!(fs::metadata(f.root().join("etc/shared")).unwrap().permissions().mode() & 0o7777, 0o666);
    assert_eq!(f.read("etc/motd"), "hi\n");
    assert_eq!(fs::metadata(f.root().join("etc/motd")).unwrap().permissions().mode() & 0o7777, 0o640);
    assert_eq!(fs::metadata(f.root().join("bin/tool")).unwrap().permissions().mode() & 0o7777, 0o4755);
    assert_eq!(fs::read_link(f.root().join("etc/link")).unwrap(), PathBuf::from("motd"));
    use std::os::unix::fs::MetadataExt;
    let a = fs::metadata(f.root().join("etc/motd")).unwrap();
    let b = fs::metadata(f.root().join("etc/hard")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(a.mtime(), 1_600_000_000);
    assert!(fs::symlink_metadata(f.root().join("run/pipe")).unwrap().file_type().is_fifo_like());
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

#[test]
fn whiteouts_remove_files_and_directories_of_lower_layers() {
    let f = Fixture::new();
    f.apply(
        "layer1",
        &tar_of(&[E::File("a/keep", b"k", 0o644), E::File("a/gone", b"g", 0o644), E::File("d/x/y", b"y", 0o644)]),
    )
    .unwrap();
    let stats = f.apply("layer2", &tar_of(&[E::File("a/.wh.gone", b"", 0o644), E::File(".wh.d", b"", 0o644)])).unwrap();
    assert_eq!(stats.whiteouts, 2);
    assert!(f.exists("a/keep") && !f.exists("a/gone") && !f.exists("d"));
    assert!(!f.exists("a/.wh.gone"), "whiteout markers are not written");
}

#[test]
fn an_opaque_directory_hides_lower_contents_but_keeps_its_own() {
    let f = Fixture::new();
    f.apply("layer1", &tar_of(&[E::File("etc/old", b"o", 0o644), E::File("etc/sub/deep", b"d", 0o644)])).unwrap();
    // The marker comes after one of the layer's own entries: those stay.
    f.apply(
        "layer2",
        &tar_of(&[
            E::Dir("etc/", 0o755),
            E::File("etc/new", b"n", 0o644),
            E::File("etc/.wh..wh..opq", b"", 0o644),
            E::File("etc/newer", b"m", 0o644),
        ]),
    )
    .unwrap();
    assert!(!f.exists("etc/old") && !f.exists("etc/sub"));
    assert_eq!((f.read("etc/new"), f.read("etc/newer")), ("n".into(), "m".into()));
}

#[test]
fn a_later_layer_replaces_types() {
    let f = Fixture::new();
    f.apply("layer1", &tar_of(&[E::File("x/file", b"1", 0o644), E::Dir("y/", 0o755), E::File("y/in", b"i", 0o644)]))
        .unwrap();
    f.apply("layer2", &tar_of(&[E::File("x", b"now a file", 0o644), E::Symlink("y", "x")])).unwrap();
    assert_eq!(f.read("x"), "now a file");
    assert!(fs::symlink_metadata(f.root().join("y")).unwrap().file_type().is_symlink());
}

#[test]
fn writes_through_in_root_symlinks_are_followed() {
    let f = Fixture::new();
    f.apply("layer1", &tar_of(&[E::Dir("usr/lib/", 0o755), E::Symlink("lib", "usr/lib")])).unwrap();
    f.apply("layer2", &tar_of(&[E::File("lib/libc.so", b"elf", 0o755)])).unwrap();
    assert_eq!(f.read("usr/lib/libc.so"), "elf");
}

#[test]
fn gzip_and_zstd_layers_are_detected_by_magic() {
    let f = Fixture::new();
    let tar = tar_of(&[E::File("z", b"zstd!", 0o644)]);
    let zst = zstd::encode_all(tar.as_slice(), 3).unwrap();
    f.apply("layer-z", &zst).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_of(&[E::File("g", b"gzip!", 0o644)])).unwrap();
    f.apply("layer-g", &gz.finish().unwrap()).unwrap();
    assert_eq!((f.read("z"), f.read("g")), ("zstd!".into(), "gzip!".into()));
}

/// Each hostile layer: refused naming the entry and the rule, nothing written outside.
#[test]
fn hostile_layers_are_refused_with_the_entry_and_the_rule() {
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("dotdot", tar_of(&[E::File("../escaped", b"x", 0o644)]), "../escaped", "'..'"),
        ("nested-dotdot", tar_of(&[E::File("a/../../escaped", b"x", 0o644)]), "a/../../escaped", "'..'"),
        ("absolute", tar_of(&[E::File("/abs-escaped", b"x", 0o644)]), "/abs-escaped", "absolute"),
        (
            "symlink-out",
            tar_of(&[E::Symlink("evil", "../../.."), E::File("evil/escaped", b"x", 0o644)]),
            "evil/escaped",
            "points outside the volume root",
        ),
        (
            "symlink-abs-dotdot",
            tar_of(&[E::Symlink("evil", "/../outside-dir"), E::File("evil/escaped", b"x", 0o644)]),
            "evil/escaped",
            "points outside the volume root",
        ),
        (
            "symlink-abs-deep-dotdot",
            tar_of(&[E::Dir("a/", 0o755), E::Symlink("a/evil", "/a/../.."), E::File("a/evil/escaped", b"x", 0o644)]),
            "a/evil/escaped",
            "points outside the volume root",
        ),
        (
            "whiteout-through-symlink-out",
            tar_of(&[E::Symlink("evil", "../.."), E::File("x", b"x", 0o644)]),
            "evil/.wh.outside-file",
            "points outside the volume root",
        ),
        ("hardlink-out", tar_of(&[E::Hardlink("h", "../outside-file")]), "h", "outside the volume root"),
        ("hardlink-abs", tar_of(&[E::Hardlink("h", "/etc/passwd")]), "h", "outside the volume root"),
        ("device", tar_of(&[E::Char("dev/null")]), "dev/null", "device nodes are refused"),
    ];
    let refuse_devices = ApplyOptions { devices: DevicePolicy::Refuse, ..ApplyOptions::default() };
    for (name, layer, entry, rule) in cases {
        let f = Fixture::new();
        fs::write(f.dir.path().join("outside-file"), b"secret").unwrap();
        let err = if name == "whiteout-through-symlink-out" {
            // The symlink comes from a lower layer; the whiteout in the next one.
            f.apply("layer0", &layer).unwrap();
            f.apply("layer", &tar_of(&[E::File(entry, b"", 0o644)])).unwrap_err()
        } else {
            f.apply_with("layer", &layer, &refuse_devices).unwrap_err()
        };
        match &err {
            ImageError::Refused { entry: e, rule: r, .. } => {
                assert_eq!(e, entry, "{name}");
                assert!(r.contains(rule), "{name}: rule {r:?} should mention {rule:?}");
            }
            other => panic!("{name}: expected a refusal, got {other}"),
        }
        assert!(err.to_string().contains(entry), "{name}: {err}");
        assert_eq!(f.outside(), ["outside-file"], "{name}: something was written outside the root");
        assert_eq!(fs::read(f.dir.path().join("outside-file")).unwrap(), b"secret", "{name}");
    }
}

#[test]
fn a_layer_larger_than_the_cap_is_refused() {
    let f = Fixture::new();
    let opts = ApplyOptions { max_layer_bytes: 10, ..ApplyOptions::default() };
    let err = f.apply_with("layer", &tar_of(&[E::File("a", b"123456", 0o644), E::File("b", b"123456", 0o644)]), &opts);
    match err {
        Err(ImageError::Refused { entry, rule, .. }) => {
            assert_eq!(entry, "b");
            assert!(rule.contains("cap of 10 bytes"), "{rule}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_truncated_layer_is_corrupt() {
    let f = Fixture::new();
    let mut layer = tar_of(&[E::File("big", &[7u8; 4096], 0o644)]);
    layer.truncate(1024);
    let err = f.apply("layer", &layer).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
    assert!(!err.is_retryable());
}

/// umoci writes a directory that became a file (or a symlink) as the new entry followed by
/// whiteouts of the old directory's children, in the same layer: the whiteouts hide only
/// what lower layers had, so the new entry stays, and nothing is created or followed.
#[test]
fn whiteouts_never_touch_their_own_layer() {
    let f = Fixture::new();
    f.apply(
        "layer1",
        &tar_of(&[
            E::File("opt/becomes-file/inner", b"old", 0o644),
            E::File("usr/share/info/coreutils.info.gz", b"info", 0o644),
            E::File("usr/share/info/dir", b"dir", 0o644),
            E::File("usr/share/man/man1/ls.1.gz", b"man", 0o644),
            E::File("usr/share/doc/README", b"doc", 0o644),
            E::File("srv/rel/x", b"x", 0o644),
            E::Dir("srv/target/", 0o755),
        ]),
    )
    .unwrap();
    let stats = f
        .apply(
            "layer2",
            &tar_of(&[
                E::File("opt/becomes-file", b"now a file", 0o644),
                E::File("opt/becomes-file/.wh.inner", b"", 0o644),
                E::Symlink("usr/share/info", "/usr/share/doc"),
                E::File("usr/share/info/.wh.coreutils.info.gz", b"", 0o644),
                E::File("usr/share/info/.wh.dir", b"", 0o644),
                E::File("usr/share/man", b"a file now", 0o644),
                E::File("usr/share/man/man1/.wh.ls.1.gz", b"", 0o644),
                E::File("usr/share/man/.wh..wh..opq", b"", 0o644),
                E::Symlink("srv/rel", "target"),
                E::File("srv/rel/.wh.x", b"", 0o644),
                // Written, then whited out in the same layer: it stays.
                E::File("etc/kept", b"kept", 0o644),
                E::File("etc/.wh.kept", b"", 0o644),
                // A whiteout where nothing is: nothing is made.
                E::File("var/none/deeper/.wh.thing", b"", 0o644),
            ]),
        )
        .unwrap();
    assert_eq!(stats.whiteouts, 7);
    assert_eq!(f.read("opt/becomes-file"), "now a file");
    assert_eq!(fs::read_link(f.root().join("usr/share/info")).unwrap(), PathBuf::from("/usr/share/doc"));
    assert_eq!(f.read("usr/share/man"), "a file now");
    assert_eq!(fs::read_link(f.root().join("srv/rel")).unwrap(), PathBuf::from("target"));
    let doc: Vec<_> = fs::read_dir(f.root().join("usr/share/doc")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(doc, ["README"], "nothing written or removed through the layer's own symlink");
    assert_eq!(fs::read_dir(f.root().join("srv/target")).unwrap().count(), 0);
    assert_eq!(f.read("etc/kept"), "kept");
    assert!(!f.exists("var"), "a whiteout creates nothing");
}

/// Absolute symlinks of lower layers resolve with the volume root as `/`, as umoci and
/// containerd resolve them.
#[test]
fn absolute_symlinks_resolve_inside_the_root() {
    let f = Fixture::new();
    f.apply(
        "layer1",
        &tar_of(&[
            E::Dir("usr/lib/", 0o755),
            E::Symlink("lib", "/usr/lib"),
            E::Symlink("tmp-link", "/tmp"),
            E::Symlink("chain", "/lib/../usr/./lib"),
            E::File("usr/lib/old", b"old", 0o644),
        ]),
    )
    .unwrap();
    f.apply(
        "layer2",
        &tar_of(&[
            E::File("lib/x", b"x", 0o644),
            E::File("tmp-link/t", b"t", 0o644),
            E::File("chain/y", b"y", 0o644),
            E::File("lib/.wh.old", b"", 0o644),
        ]),
    )
    .unwrap();
    assert_eq!((f.read("usr/lib/x"), f.read("tmp/t"), f.read("usr/lib/y")), ("x".into(), "t".into(), "y".into()));
    assert!(!f.exists("usr/lib/old"), "a whiteout through a lower layer's symlink hides its target");
    assert_eq!(f.outside(), Vec::<String>::new());
}

#[test]
fn device_nodes_are_skipped_by_default_and_counted() {
    let f = Fixture::new();
    let layer = tar_of(&[E::Char("dev/console"), E::Char("dev/null"), E::File("etc/hostname", b"h", 0o644)]);
    let stats = f.apply("layer", &layer).unwrap();
    assert_eq!(stats.devices_skipped, 2);
    assert!(!f.exists("dev/console") && !f.exists("dev/null"));
    assert_eq!(f.read("etc/hostname"), "h");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let g = Fixture::new();
        let create = ApplyOptions { devices: DevicePolicy::Create, ..ApplyOptions::default() };
        let stats = g.apply_with("layer", &layer, &create).unwrap();
        assert_eq!(stats.devices_skipped, 0);
        use std::os::unix::fs::FileTypeExt;
        assert!(fs::symlink_metadata(g.root().join("dev/null")).unwrap().file_type().is_char_device());
    }
}

/// A header whose numeric field holds binary bytes: the error quotes them escaped.
#[test]
fn binary_bytes_of_a_corrupt_layer_are_escaped_in_the_error() {
    let f = Fixture::new();
    let mut layer = tar_of(&[E::File("a", b"x", 0o644)]);
    layer[100..108].copy_from_slice(b"Q\xff*1V\x1b\x07\x00"); // the mode field
    let mut h = tar::Header::new_old();
    h.as_mut_bytes().copy_from_slice(&layer[..512]);
    h.set_cksum();
    layer[..512].copy_from_slice(h.as_bytes());
    let err = f.apply("layer", &layer).unwrap_err().to_string();
    assert!(matches!(f.apply("layer", &layer), Err(ImageError::Corrupt { .. })), "{err}");
    assert!(!err.chars().any(|c| c.is_control() || c == '\u{fffd}'), "raw bytes in {err:?}");
    assert!(err.contains("\\u{fffd}") || err.contains("\\u{1b}"), "{err}");
}

/// A layer of one regular file `name` with `content`, owned by `uid:gid`, with `mode`.
fn owned_file(name: &str, content: &[u8], uid: u64, gid: u64, mode: u32) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mode(mode);
    h.set_size(content.len() as u64);
    b.append_data(&mut h, name, content).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn runs_of_zeros_become_holes_and_content_is_exact() {
    let f = Fixture::new();
    let mut content = vec![0u8; 32 << 20];
    content[..5].copy_from_slice(b"head\n");
    content[(16 << 20) + 3] = 7; // inside a block: that block is written whole
    let n = content.len();
    content[n - 4..].copy_from_slice(b"tail");
    let (uid, gid) = process_owner();
    let stats = f.apply("layer", &owned_file("big", &content, uid, gid, 0o644)).unwrap();
    assert_eq!(fs::read(f.root().join("big")).unwrap(), content);
    assert_eq!(stats.bytes, 32 << 20);
    assert_eq!(stats.written, 3 * 4096, "only the three blocks with data are written");
    use std::os::unix::fs::MetadataExt;
    let on_disk = fs::metadata(f.root().join("big")).unwrap().blocks() * 512;
    assert!(on_disk < 1 << 20, "a sparse file stays sparse: {on_disk} bytes allocated");
    // A file that ends in zeros keeps its length.
    let zeros = vec![0u8; 1 << 20];
    f.apply("layer2", &owned_file("zeros", &zeros, uid, gid, 0o644)).unwrap();
    assert_eq!(fs::metadata(f.root().join("zeros")).unwrap().len(), 1 << 20);
}

#[test]
fn a_layer_is_refused_before_it_writes_past_the_hosts_room() {
    let f = Fixture::new();
    let (uid, gid) = process_owner();
    let opts = ApplyOptions { room_bytes: Some(1 << 20), ..ApplyOptions::default() };
    let mut data = vec![0u8; 2 << 20];
    rand::fill(&mut data[..]);
    match f.apply_with("layer sha256:abc", &owned_file("data.bin", &data, uid, gid, 0o644), &opts) {
        Err(e @ ImageError::TooLargeForHost { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("sha256:abc") && text.contains("data.bin") && text.contains("refuse_percent"),
                "{text}"
            );
            assert_eq!(crate::pipeline::Cause::of_image(&e), crate::pipeline::Cause::HostFull);
        }
        other => panic!("{other:?}"),
    }
    let written = fs::metadata(f.root().join("data.bin")).unwrap().len();
    assert!(written <= 1 << 20, "stopped at the room, not after: {written}");
    // Zeros take no room: a sparse gigabyte passes the same limit.
    let sparse = vec![0u8; 64 << 20];
    f.apply_with("layer2", &owned_file("sparse", &sparse, uid, gid, 0o644), &opts).unwrap();
}

#[test]
fn owners_only_root_can_keep_are_refused_unless_rootless_which_strips_setid_bits() {
    // As a worker that does not run as root (whatever runs the test).
    let not_root = ApplyOptions { preserve_owners: false, ..ApplyOptions::default() };
    let (me, my_group) = process_owner();
    let other = me + 1000;
    let f = Fixture::new();
    match f.apply_with("layer", &owned_file("usr/bin/su", b"#!", other, other, 0o4755), &not_root) {
        Err(e @ ImageError::OwnersNeedRoot { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&format!("owned by {other}:{other}")) && text.contains("images.rootless"), "{text}");
            assert_eq!(crate::pipeline::Cause::of_image(&e), crate::pipeline::Cause::HostSetup);
        }
        other => panic!("{other:?}"),
    }
    let rootless = ApplyOptions { rootless: true, ..not_root };
    let stats = f.apply_with("layer2", &owned_file("su", b"#!", other, other, 0o4755), &rootless).unwrap();
    assert_eq!((stats.owners_dropped, stats.setid_stripped), (1, 1));
    let mode = fs::metadata(f.root().join("su")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755, "the setuid bit is gone");
    // The worker's own files are applied as they are.
    let stats = f.apply_with("layer3", &owned_file("mine", b"x", me, my_group, 0o2755), &rootless).unwrap();
    assert_eq!((stats.owners_dropped, stats.setid_stripped), (0, 0));
}

#[test]
fn owners_beyond_32_bits_are_refused_not_truncated() {
    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_uid(1 << 33);
    h.set_gid(0);
    h.set_mode(0o644);
    h.set_size(1);
    b.append_data(&mut h, "big-uid", &b"x"[..]).unwrap();
    match f.apply("layer", &b.into_inner().unwrap()) {
        Err(ImageError::Refused { rule, .. }) => assert!(rule.contains("32-bit"), "{rule}"),
        other => panic!("{other:?}"),
    }
}

/// The uncompressed tar is checked against its diff id when one is given: the whole tar,
/// its end-of-archive blocks and padding too, whether it came compressed or not.
#[test]
fn a_layer_is_checked_against_its_diff_id() {
    let tar = tar_of(&[E::File("etc/hostname", b"web\n", 0o644)]);
    let mut padded = tar.clone();
    padded.extend_from_slice(&[0u8; 10240]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&padded).unwrap();
    let gz = gz.finish().unwrap();
    for (name, blob, uncompressed) in [("plain", &tar, &tar), ("gzip", &gz, &padded)] {
        let f = Fixture::new();
        let path = f.dir.path().join(name);
        fs::write(&path, blob).unwrap();
        let right = Digest::of_bytes(uncompressed);
        let opts = ApplyOptions::default();
        apply_layer_reporting(&f.root(), &path, name, Some(&right), &opts, &|_| {}, &|_| {}).unwrap();
        assert_eq!(f.read("etc/hostname"), "web\n");

        let wrong = Digest::of_bytes(b"another layer");
        let err = apply_layer_reporting(&f.root(), &path, name, Some(&wrong), &opts, &|_| {}, &|_| {}).unwrap_err();
        match &err {
            ImageError::DiffIdMismatch { expected, actual, .. } => {
                assert_eq!((expected, actual), (&wrong.to_string(), &right.to_string()), "{name}");
            }
            other => panic!("{name}: {other}"),
        }
        assert!(err.to_string().contains("rootfs.diff_ids") && !err.is_retryable(), "{name}: {err}");
    }
}

#[test]
fn a_directory_replaced_later_in_its_layer_never_has_its_times_set_through_a_link() {
    // `a/b/` is made, then `a` becomes a symlink out of the root: the times of `a/b` are set
    // at the end of the layer, and must not land on the outside directory's `b`.
    let f = Fixture::new();
    let outside = f.dir.path().join("outside");
    fs::create_dir_all(outside.join("b")).unwrap();
    let before = fs::metadata(outside.join("b")).unwrap().modified().unwrap();
    f.apply(
        "layer1",
        &tar_of(&[E::Dir("a/", 0o755), E::Dir("a/b/", 0o755), E::Symlink("a", outside.to_str().unwrap())]),
    )
    .unwrap();
    assert!(fs::symlink_metadata(f.root().join("a")).unwrap().file_type().is_symlink());
    let after = fs::metadata(outside.join("b")).unwrap().modified().unwrap();
    assert_eq!(before, after, "the outside directory's times were set through the layer's symlink");
}

#[test]
fn a_name_that_changes_what_it_is_within_a_layer_is_resolved_again() {
    // The applier holds the last entry's directory open: a later entry that turns that name
    // into a symlink, or a symlink back into a directory, must be seen by the next entry.
    let f = Fixture::new();
    f.apply(
        "layer1",
        &tar_of(&[
            E::Dir("c/", 0o755),
            E::Dir("a/", 0o755),
            E::File("a/x", b"x", 0o644),
            E::Symlink("a", "c"),
            E::File("a/y", b"y", 0o644),
            E::Dir("a/", 0o755),
            E::File("a/z", b"z", 0o644),
        ]),
    )
    .unwrap();
    assert_eq!(f.read("c/y"), "y", "written through the symlink that replaced the directory");
    assert!(fs::symlink_metadata(f.root().join("a")).unwrap().is_dir());
    assert_eq!(f.read("a/z"), "z");
    assert!(!f.exists("c/z") && !f.exists("a/x") && !f.exists("a/y"));
}

#[test]
fn a_whiteout_after_a_write_through_the_layers_own_symlink_still_hides_nothing() {
    // `a/f` is written through the layer's own symlink `a -> b` (its directory is then held
    // open); the whiteout of `a/g` that follows must not take that held directory: beneath
    // this layer's symlink is nothing of a lower layer's.
    let f = Fixture::new();
    f.apply("layer1", &tar_of(&[E::File("b/g", b"g", 0o644), E::Dir("a/", 0o755)])).unwrap();
    f.apply("layer2", &tar_of(&[E::Symlink("a", "b"), E::File("a/f", b"f", 0o644), E::File("a/.wh.g", b"", 0o644)]))
        .unwrap();
    assert_eq!((f.read("b/f"), f.read("b/g")), ("f".into(), "g".into()));
}
