//! Decompression ahead of the applier: a compressed layer (gzip, zstd) is decompressed, and
//! the tar it holds hashed for its diff_id, on a thread of its own, a few chunks ahead of the
//! thread that makes the files. An unpack is then two halves on two cores instead of one
//! thread doing both, which is what a streamed prepare waits on. A plain tar is read (and
//! hashed) on the applier's thread: a thread would only add a copy.
//!
//! The thread owns the blob's reader and reads it to its end (a blob may go on past the
//! compressed stream, and its digest covers it all), then hands the reader back with the
//! tar's digest. When the applier stops early (an error, a stop), it drops its end: the
//! thread's next hand-off fails and it ends, dropping the reader; nothing waits for it.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc;

use super::READ_BUF;
use crate::image::digest::{Digest, Hasher};

/// Decompressed bytes handed over at a time.
const CHUNK: usize = 256 << 10;
/// Chunks between the two threads: with the one each side holds, what a layer keeps in
/// memory whatever its size (1.5 MiB).
const CHUNKS_AHEAD: usize = 4;

enum Msg<R> {
    /// Decompressed bytes, and how many bytes of the blob were read for them.
    Bytes {
        data: Vec<u8>,
        read: u64,
    },
    /// The end: the tar's digest (when asked for) and the blob's reader, read to its end.
    End {
        digest: Option<Digest>,
        input: R,
    },
    Failed(std::io::Error),
}

/// The applier's end: a reader of the decompressed tar.
pub(super) struct Inflated<'a, R> {
    from: From<R>,
    on_read: &'a dyn Fn(u64),
}

enum From<R> {
    /// A compressed blob, from the decompressing thread.
    Thread { rx: mpsc::Receiver<Msg<R>>, chunk: Vec<u8>, at: usize, end: Option<(Option<Digest>, R)> },
    /// A plain tar, read here: a thread would only add a copy.
    /// `reported`: the blob bytes told to `on_read` so far (the first buffer was read
    /// before any of the tar, to see what the blob is).
    Inline { reader: BufReader<Counted<R>>, hasher: Option<Hasher>, reported: u64 },
}

/// A reader that counts what it has read.
struct Counted<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

enum Decoder<R: Read> {
    // Boxed: the gzip state is four times the others'.
    Gzip(Box<flate2::bufread::MultiGzDecoder<BufReader<Counted<R>>>>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<Counted<R>>>),
}

impl<R: Read> Decoder<R> {
    fn read_so_far(&self) -> u64 {
        match self {
            Self::Gzip(d) => d.get_ref().get_ref().read,
            Self::Zstd(d) => d.get_ref().get_ref().read,
        }
    }

    fn into_input(self) -> BufReader<Counted<R>> {
        match self {
            Self::Gzip(d) => d.into_inner(),
            Self::Zstd(d) => d.finish(),
        }
    }
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Gzip(d) => d.read(buf),
            Self::Zstd(d) => d.read(buf),
        }
    }
}

/// Starts decompressing `input` on a thread of its own; the tar is hashed when `hash`.
pub(super) fn spawn<'a, R: Read + Send + 'static>(
    input: R,
    hash: bool,
    on_read: &'a dyn Fn(u64),
) -> std::io::Result<Inflated<'a, R>> {
    let mut reader = BufReader::with_capacity(READ_BUF, Counted { inner: input, read: 0 });
    let magic = reader.fill_buf()?;
    let decoder = if magic.starts_with(&[0x1f, 0x8b]) {
        Decoder::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(reader)))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(reader)?)
    } else {
        return Ok(Inflated {
            from: From::Inline { reader, hasher: hash.then(Hasher::default), reported: 0 },
            on_read,
        });
    };
    let (tx, rx) = mpsc::sync_channel(CHUNKS_AHEAD);
    std::thread::Builder::new()
        .name("thinpipe-inflate".into())
        .spawn(move || inflate(decoder, hash.then(Hasher::default), &tx))?;
    Ok(Inflated { from: From::Thread { rx, chunk: Vec::new(), at: 0, end: None }, on_read })
}

/// The thread: decompress, hash, hand over; at the end read what is left of the blob.
fn inflate<R: Read>(mut decoder: Decoder<R>, mut hasher: Option<Hasher>, tx: &mpsc::SyncSender<Msg<R>>) {
    let mut reported = 0;
    loop {
        let mut data = Vec::with_capacity(CHUNK);
        match (&mut decoder).take(CHUNK as u64).read_to_end(&mut data) {
            Err(e) => {
                // The applier may be gone already: then nobody is left to tell.
                drop(tx.send(Msg::Failed(e)));
                return;
            }
            Ok(0) => break,
            Ok(_) => {}
        }
        if let Some(h) = &mut hasher {
            h.update(&data);
        }
        let read = decoder.read_so_far();
        if tx.send(Msg::Bytes { data, read: read - reported }).is_err() {
            return; // the applier stopped
        }
        reported = read;
    }
    let mut input = decoder.into_input();
    let rest = match std::io::copy(&mut input, &mut std::io::sink()) {
        Ok(_) => input.get_ref().read - reported,
        Err(e) => {
            drop(tx.send(Msg::Failed(e)));
            return;
        }
    };
    if rest > 0 && tx.send(Msg::Bytes { data: Vec::new(), read: rest }).is_err() {
        return;
    }
    let digest = hasher.map(Hasher::finish);
    // Whether the applier is still there to take it changes nothing here.
    drop(tx.send(Msg::End { digest, input: input.into_inner().inner }));
}

impl<R: Read> Inflated<'_, R> {
    /// Reads the rest of the tar (its end blocks and any padding, which the entries never
    /// read and the digest covers), then returns the tar's digest, when asked for, and the
    /// blob's reader, read to its end.
    pub(super) fn finish(mut self) -> std::io::Result<(Option<Digest>, R)> {
        std::io::copy(&mut self, &mut std::io::sink())?;
        match self.from {
            From::Thread { end, .. } => {
                end.ok_or_else(|| std::io::Error::other("the decompressing thread ended without its end"))
            }
            From::Inline { reader, hasher, .. } => Ok((hasher.map(Hasher::finish), reader.into_inner().inner)),
        }
    }
}

impl<R: Read> Read for Inflated<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let (rx, chunk, at, end) = match &mut self.from {
            From::Inline { reader, hasher, reported } => {
                let n = reader.read(buf)?;
                if let Some(h) = hasher {
                    h.update(&buf[..n]);
                }
                let read = reader.get_ref().read;
                if read > *reported {
                    (self.on_read)(read - *reported);
                    *reported = read;
                }
                return Ok(n);
            }
            From::Thread { rx, chunk, at, end } => (rx, chunk, at, end),
        };
        while *at == chunk.len() {
            if end.is_some() {
                return Ok(0);
            }
            match rx.recv() {
                Ok(Msg::Bytes { data, read }) => {
                    (self.on_read)(read);
                    (*chunk, *at) = (data, 0);
                }
                Ok(Msg::End { digest, input }) => *end = Some((digest, input)),
                Ok(Msg::Failed(e)) => return Err(e),
                // Only a panic drops the sender before the end.
                Err(mpsc::RecvError) => return Err(std::io::Error::other("the decompressing thread stopped")),
            }
        }
        let n = buf.len().min(chunk.len() - *at);
        buf[..n].copy_from_slice(&chunk[*at..*at + n]);
        *at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn the_tar_is_handed_over_whole_hashed_and_the_blob_read_to_its_end() {
        let data: Vec<u8> = (0..3 * CHUNK + 1234).map(|i| (i % 251) as u8).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let blob = gz.finish().unwrap();
        let read = AtomicU64::new(0);
        let on_read = |n| {
            read.fetch_add(n, Ordering::Relaxed);
        };
        let mut inflated = spawn(std::io::Cursor::new(blob.clone()), true, &on_read).unwrap();
        let mut head = vec![0u8; 1000];
        inflated.read_exact(&mut head).unwrap();
        assert_eq!(head, data[..1000]);
        let (digest, input) = inflated.finish().unwrap();
        assert_eq!(digest, Some(Digest::of_bytes(&data)), "the digest covers what was not read too");
        assert_eq!(input.position(), blob.len() as u64);
        assert_eq!(read.load(Ordering::Relaxed), blob.len() as u64, "every byte of the blob reported once");
    }

    #[test]
    fn a_zstd_blob_is_handed_over_whole_as_a_gzip_one_is() {
        for len in [300, 3 * CHUNK + 1234] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let blob = zstd::encode_all(data.as_slice(), 3).unwrap();
            let read = AtomicU64::new(0);
            let on_read = |n| {
                read.fetch_add(n, Ordering::Relaxed);
            };
            let mut inflated = spawn(std::io::Cursor::new(blob.clone()), true, &on_read).unwrap();
            assert!(matches!(inflated.from, From::Thread { .. }));
            let mut all = Vec::new();
            inflated.read_to_end(&mut all).unwrap();
            assert_eq!(all.len(), data.len(), "{len}");
            assert!(all == data, "{len}: the same bytes");
            let (digest, input) = inflated.finish().unwrap();
            assert_eq!(digest, Some(Digest::of_bytes(&data)));
            assert_eq!(input.position(), blob.len() as u64);
            assert_eq!(read.load(Ordering::Relaxed), blob.len() as u64);
        }
    }

    #[test]
    fn a_plain_tar_is_read_inline_hashed_and_read_to_its_end() {
        let data: Vec<u8> = (0..CHUNK + 77).map(|i| (i % 13) as u8).collect();
        let read = AtomicU64::new(0);
        let on_read = |n| {
            read.fetch_add(n, Ordering::Relaxed);
        };
        let mut inflated = spawn(std::io::Cursor::new(data.clone()), true, &on_read).unwrap();
        assert!(matches!(inflated.from, From::Inline { .. }));
        let mut head = vec![0u8; 100];
        inflated.read_exact(&mut head).unwrap();
        assert_eq!(head, data[..100]);
        let (digest, input) = inflated.finish().unwrap();
        assert_eq!(digest, Some(Digest::of_bytes(&data)));
        assert_eq!(input.position(), data.len() as u64);
        assert_eq!(read.load(Ordering::Relaxed), data.len() as u64);
    }

    #[test]
    fn a_corrupt_stream_is_an_error_of_the_read() {
        let mut blob = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        blob.extend_from_slice(&[0xff; 64]);
        let mut inflated = spawn(std::io::Cursor::new(blob), false, &|_| {}).unwrap();
        assert!(inflated.read(&mut [0u8; 16]).is_err());
    }

    /// An endless gzip blob (one member over and over) that says when it is dropped.
    struct Endless {
        member: Vec<u8>,
        at: usize,
        dropped: Arc<AtomicBool>,
    }
    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.member.len() - self.at);
            buf[..n].copy_from_slice(&self.member[self.at..self.at + n]);
            self.at = (self.at + n) % self.member.len();
            Ok(n)
        }
    }
    impl Drop for Endless {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn an_applier_that_stops_early_leaves_no_thread_reading() {
        let dropped = Arc::new(AtomicBool::new(false));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[b'x'; 1 << 20]).unwrap();
        let endless = Endless { member: gz.finish().unwrap(), at: 0, dropped: dropped.clone() };
        let mut inflated = spawn(endless, true, &|_| {}).unwrap();
        assert!(matches!(inflated.from, From::Thread { .. }));
        inflated.read_exact(&mut [0u8; 4096]).unwrap();
        drop(inflated);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dropped.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the decompressing thread still holds the blob");
            std::thread::yield_now();
        }
    }
}
