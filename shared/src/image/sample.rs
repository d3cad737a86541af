//! A small sample image family in the flat layout, for the demo and for tests: three
//! layers (gzip, zstd, plain tar) with files, a symlink, a hardlink, a whiteout and an
//! opaque directory, so one prepare exercises every layer rule.

use std::io::Write;
use std::path::Path;

use super::error::ImageError;

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    // Sample paths are short, relative and clean.
    if h.set_path(path).is_err() {
        unreachable!("sample path {path} is valid");
    }
    h.set_cksum();
    h
}

/// path, type, mode, content, link target
type SampleEntry<'a> = (&'a str, tar::EntryType, u32, &'a [u8], Option<&'a str>);

fn layer(entries: &[SampleEntry<'_>]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, mode, data, link) in entries {
        let mut h = header(path, *kind, *mode, data.len() as u64);
        if let Some(link) = link {
            h.set_link_name(link)?;
            h.set_cksum();
        }
        b.append(&h, *data)?;
    }
    b.into_inner()
}

/// Writes `<root>/images/<family>/` with three layers, unless it already holds layers.
/// Returns whether it wrote anything.
pub fn write_sample_family(root: &Path, family: &str) -> Result<bool, ImageError> {
    let dir = root.join("images").join(family);
    let io = |what: &str, e: std::io::Error| ImageError::io(what.to_owned(), &dir, e);
    if dir.is_dir() && std::fs::read_dir(&dir).map_err(|e| io("listing", e))?.next().is_some() {
        return Ok(false);
    }
    std::fs::create_dir_all(&dir).map_err(|e| io("creating", e))?;
    use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};
    let base = layer(&[
        ("etc/", D, 0o755, b"", None),
        ("etc/os-release", F, 0o644, b"NAME=thinpipe-sample\nVERSION=1\n", None),
        ("etc/motd", F, 0o644, b"welcome\n", None),
        ("usr/bin/", D, 0o755, b"", None),
        ("usr/bin/hello", F, 0o755, b"#!/bin/sh\necho hello from thinpipe\n", None),
        ("bin", S, 0o777, b"", Some("usr/bin")),
        ("var/cache/", D, 0o755, b"", None),
        ("var/cache/old-1", F, 0o644, b"stale\n", None),
        ("var/cache/old-2", F, 0o644, b"stale\n", None),
    ])
    .map_err(|e| io("building layer 1", e))?;
    let update = layer(&[
        ("etc/motd", F, 0o644, b"welcome to the updated image\n", None),
        ("etc/.wh.os-release", F, 0o644, b"", None),
        ("etc/release", F, 0o644, b"NAME=thinpipe-sample\nVERSION=2\n", None),
        ("usr/bin/hi", L, 0o755, b"", Some("usr/bin/hello")),
    ])
    .map_err(|e| io("building layer 2", e))?;
    let cache = layer(&[
        ("var/cache/", D, 0o755, b"", None),
        ("var/cache/.wh..wh..opq", F, 0o644, b"", None),
        ("var/cache/fresh", F, 0o644, b"fresh\n", None),
    ])
    .map_err(|e| io("building layer 3", e))?;

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&base).map_err(|e| io("compressing layer 1", e))?;
    let gz = gz.finish().map_err(|e| io("compressing layer 1", e))?;
    let zst = zstd::encode_all(update.as_slice(), 3).map_err(|e| io("compressing layer 2", e))?;
    for (name, bytes) in [("0001-base.tar.gz", gz), ("0002-update.tar.zst", zst), ("0003-cache.tar", cache)] {
        // Write then rename, so a half-written sample is never taken for a layer.
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &bytes).map_err(|e| io("writing", e))?;
        std::fs::rename(&tmp, dir.join(name)).map_err(|e| io("renaming", e))?;
    }
    Ok(true)
}
