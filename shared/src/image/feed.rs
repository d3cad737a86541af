//! The hand-off of one layer's bytes from its download (a task) to the unpacker (a blocking
//! thread) while the download is still running: a bounded channel of chunks, so a download
//! that runs ahead of the unpacker waits instead of filling memory.
//!
//! The download sends [`Feed::Verified`] after the last chunk, and only once the whole blob
//! matched its digest. The unpacker reads the chunks through a [`FeedReader`]; a channel
//! that closes without `Verified` means the download failed or did not match, and the
//! bytes applied from it must not be sealed (the download's own error says why).

use std::io::Read;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Bytes per chunk (the capacity each chunk allocates): with the channel's capacity in
/// chunks, this bounds the memory one layer's read-ahead holds.
pub const FEED_CHUNK: usize = 256 * 1024;

/// What a download sends to the unpacker.
#[derive(Debug)]
pub enum Feed {
    Bytes(Vec<u8>),
    /// Every byte was sent and the blob matched its digest.
    Verified,
}

/// The unpacker's end: reads the chunks as they come, blocking the thread (never a runtime
/// worker) until the next one arrives, the download ends, or `stop` fires.
pub struct FeedReader {
    rx: mpsc::Receiver<Feed>,
    runtime: tokio::runtime::Handle,
    stop: CancellationToken,
    chunk: Vec<u8>,
    at: usize,
    verified: bool,
    ended: bool,
}

impl FeedReader {
    /// Reads `rx` from a blocking thread of `runtime`.
    pub fn new(rx: mpsc::Receiver<Feed>, runtime: tokio::runtime::Handle, stop: CancellationToken) -> Self {
        Self { rx, runtime, stop, chunk: Vec::new(), at: 0, verified: false, ended: false }
    }

    /// Whether the download sent every byte and they matched the blob's digest. Meaningful
    /// once the reader returned end of file.
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// Reads (and drops) what is left, so that the download is not left waiting on a full
    /// channel: the unpacker stops at the tar's end blocks, the blob may go on.
    pub fn drain(&mut self) -> std::io::Result<()> {
        std::io::copy(self, &mut std::io::sink()).map(|_| ())
    }
}

impl Read for FeedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            let (rx, stop) = (&mut self.rx, &self.stop);
            let next = self.runtime.block_on(async {
                tokio::select! {
                    next = rx.recv() => Ok(next),
                    () = stop.cancelled() => Err(std::io::Error::other("the prepare was stopped")),
                }
            })?;
            match next {
                Some(Feed::Bytes(chunk)) => (self.chunk, self.at) = (chunk, 0),
                Some(Feed::Verified) => (self.verified, self.ended) = (true, true),
                // The download ended without verifying: its error is the cause.
                None => self.ended = true,
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_sees_every_byte_and_whether_they_were_verified() {
        for verified in [true, false] {
            let (tx, rx) = mpsc::channel(2);
            let mut reader = FeedReader::new(rx, tokio::runtime::Handle::current(), CancellationToken::new());
            let read = tokio::task::spawn_blocking(move || {
                let mut all = Vec::new();
                reader.read_to_end(&mut all).unwrap();
                (all, reader.verified())
            });
            for i in 0..10u8 {
                tx.send(Feed::Bytes(vec![i; 1000])).await.unwrap();
            }
            if verified {
                tx.send(Feed::Verified).await.unwrap();
            }
            drop(tx);
            let (all, seen) = read.await.unwrap();
            assert_eq!(all.len(), 10_000);
            assert!(all.chunks(1000).enumerate().all(|(i, c)| c.iter().all(|b| *b == i as u8)));
            assert_eq!(seen, verified, "a channel closed without Verified is not verified");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_ends_a_read_that_waits_for_the_next_chunk() {
        let (_tx, rx) = mpsc::channel(2);
        let stop = CancellationToken::new();
        let mut reader = FeedReader::new(rx, tokio::runtime::Handle::current(), stop.clone());
        let read = tokio::task::spawn_blocking(move || reader.read(&mut [0u8; 10]));
        stop.cancel();
        assert!(read.await.unwrap().is_err());
    }
}
