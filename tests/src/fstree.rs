//! Whole-tree comparison for "file for file" claims: every path's type, permission bits
//! (setuid, setgid and sticky included), owner, size, content hash, symlink target, hardlink
//! group and extended attributes, with the differences between two trees as lines for people.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What one path is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// `d`, `f`, `l`, `p` (fifo), `c`, `b` or `s`.
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Files only.
    pub size: u64,
    /// Files: the content's sha256.
    pub hash: String,
    /// Symlinks: the target.
    pub target: String,
    /// Char and block devices: the device number.
    pub rdev: u64,
    /// The first path (in name order) of this entry's hardlink group; empty when alone.
    pub hardlink_group: String,
    /// Extended attributes, name → value (hex).
    pub xattrs: BTreeMap<String, String>,
}

/// Every entry under a root, by relative path (the root itself left out).
pub type Tree = BTreeMap<String, Node>;

/// Reads the tree under `root`.
pub fn read(root: &Path) -> Tree {
    let mut out = Tree::new();
    let mut groups: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())) {
            let path = entry.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())).path();
            let meta = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let rel = path.strip_prefix(root).expect("under the root").display().to_string();
            let ft = meta.file_type();
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_dir() {
                stack.push(path.clone());
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_file() {
                'f'
            } else if ft.is_fifo() {
                'p'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else {
                's'
            };
            if kind != 'd' && meta.nlink() > 1 {
                groups.entry((meta.dev(), meta.ino())).or_default().push(rel.clone());
            }
            let hash = if kind == 'f' {
                let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                thinpipe::image::Digest::of_bytes(&bytes).to_string()
            } else {
                String::new()
            };
            let target = if kind == 'l' {
                std::fs::read_link(&path).expect("a symlink").display().to_string()
            } else {
                String::new()
            };
            let mut xattrs = BTreeMap::new();
            // Not following symlinks: a symlink's own attributes, if any.
            for name in xattr::list(&path).unwrap_or_else(|e| panic!("xattrs of {}: {e}", path.display())) {
                let value = xattr::get(&path, &name)
                    .unwrap_or_else(|e| panic!("xattr {name:?} of {}: {e}", path.display()))
                    .unwrap_or_default();
                xattrs.insert(name.to_string_lossy().into_owned(), hex::encode(value));
            }
            out.insert(
                rel,
                Node {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    size: if kind == 'f' { meta.size() } else { 0 },
                    hash,
                    target,
                    rdev: if matches!(kind, 'c' | 'b') { meta.rdev() } else { 0 },
                    hardlink_group: String::new(),
                    xattrs,
                },
            );
        }
    }
    for mut paths in groups.into_values() {
        paths.sort();
        let first = paths[0].clone();
        if paths.len() > 1 {
            for p in paths {
                out.get_mut(&p).expect("read above").hardlink_group = first.clone();
            }
        }
    }
    out
}

/// Every difference between `expected` and `actual`, one line each, in path order.
pub fn differences(expected: &Tree, actual: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (path, want) in expected {
        let Some(got) = actual.get(path) else {
            out.push(format!("{path}: missing (expected {})", describe(want)));
            continue;
        };
        let mut fields = Vec::new();
        let mut field = |name: &str, w: String, g: String| {
            if w != g {
                fields.push(format!("{name} {w:?} != {g:?}"));
            }
        };
        field("type", want.kind.to_string(), got.kind.to_string());
        field("mode", format!("{:o}", want.mode), format!("{:o}", got.mode));
        field("owner", format!("{}:{}", want.uid, want.gid), format!("{}:{}", got.uid, got.gid));
        field("size", want.size.to_string(), got.size.to_string());
        field("content", want.hash.clone(), got.hash.clone());
        field("target", want.target.clone(), got.target.clone());
        field("device", want.rdev.to_string(), got.rdev.to_string());
        field("hardlink group", want.hardlink_group.clone(), got.hardlink_group.clone());
        field("xattrs", format!("{:?}", want.xattrs), format!("{:?}", got.xattrs));
        if !fields.is_empty() {
            out.push(format!("{path}: {}", fields.join(", ")));
        }
    }
    for (path, got) in actual {
        if !expected.contains_key(path) {
            out.push(format!("{path}: unexpected {}", describe(got)));
        }
    }
    out
}

fn describe(n: &Node) -> String {
    match n.kind {
        'l' => format!("symlink -> {}", n.target),
        'f' => format!("file of {} bytes, mode {:o}", n.size, n.mode),
        'd' => format!("directory, mode {:o}", n.mode),
        k => format!("entry of type {k}"),
    }
}

/// Panics listing the differences (the first 60 and how many in all), if there are any.
pub fn assert_same(what: &str, expected: &Tree, actual: &Tree) {
    let diff = differences(expected, actual);
    if !diff.is_empty() {
        let shown: Vec<&str> = diff.iter().take(60).map(String::as_str).collect();
        panic!(
            "{what}: {} differences in {} expected entries:\n  {}{}",
            diff.len(),
            expected.len(),
            shown.join("\n  "),
            if diff.len() > shown.len() { "\n  ..." } else { "" }
        );
    }
}
