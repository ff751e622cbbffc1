//! Export requests the collector could not take yet, on disk until it can: the platform's spans
//! carry the bill, so a collector that is down or restarting must not lose them.
//!
//! One folder per tenant's exporter, one file per export request (`<n>.otlp`, the bytes of an
//! `ExportTraceServiceRequest`), written to a temporary name, synced and renamed, so that a
//! crash leaves whole requests or none. Requests are replayed oldest first, and nothing newer
//! is sent while older ones wait: the collector sees them in order. A replayed request that had
//! in fact arrived is harmless: the collector and billing de-duplicate spans and usage ids.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// Bytes held in every spool of the process (the `sfaas_span_spool_bytes` gauge).
pub static SPOOLED_BYTES: AtomicU64 = AtomicU64::new(0);
/// Export requests lost because a spool was full (`sfaas_span_spool_dropped_total`).
pub static DROPPED_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Space a spool leaves free on its disk: the bound is per tenant, and many tenants' spools
/// (and the core's databases beside them) share the disk. A tenant whose spans find no room
/// waits for them to leave (its calls get 429) instead.
pub const MIN_FREE_BYTES: u64 = 256 << 20;

/// Bytes free for an unprivileged writer on the file system of `dir`.
fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer statvfs fills on success.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// One exporter's spool.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// Sequence number and size of each file, oldest first.
    files: VecDeque<(u64, u64)>,
    bytes: u64,
    next: u64,
}

impl Spool {
    /// Opens (or makes) a spool folder, finding the requests a previous process left.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(seq) = name.strip_suffix(".otlp").and_then(|seq| seq.parse::<u64>().ok()) {
                files.push((seq, entry.metadata()?.len()));
            } else if name.ends_with(".tmp") {
                // A request being written when the process died: never acknowledged anywhere.
                let _ = std::fs::remove_file(entry.path());
            }
        }
        files.sort_unstable();
        let bytes = files.iter().map(|(_, len)| len).sum();
        SPOOLED_BYTES.fetch_add(bytes, Ordering::Relaxed);
        let next = files.last().map_or(0, |(seq, _)| seq + 1);
        Ok(Self { dir: dir.to_path_buf(), max_bytes, files: files.into(), bytes, next })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.otlp"))
    }

    /// Appends a request; `Ok(false)` when it would go over the bound, or leave less than
    /// [`MIN_FREE_BYTES`] free on the disk (the caller keeps it, or counts it lost in
    /// [`DROPPED_REQUESTS`]).
    pub fn push(&mut self, request: &[Bytes]) -> io::Result<bool> {
        let len: u64 = request.iter().map(|chunk| chunk.len() as u64).sum();
        if self.bytes + len > self.max_bytes || free_bytes(&self.dir)? < len.saturating_add(MIN_FREE_BYTES) {
            return Ok(false);
        }
        let path = self.path(self.next);
        let temporary = path.with_extension("tmp");
        let mut file = std::fs::File::create(&temporary)?;
        for chunk in request {
            file.write_all(chunk)?;
        }
        file.sync_all()?;
        std::fs::rename(&temporary, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.files.push_back((self.next, len));
        self.next += 1;
        self.bytes += len;
        SPOOLED_BYTES.fetch_add(len, Ordering::Relaxed);
        Ok(true)
    }

    /// The oldest request, if any.
    pub fn oldest(&self) -> Option<io::Result<Bytes>> {
        let (seq, _) = self.files.front()?;
        Some(std::fs::read(self.path(*seq)).map(Bytes::from))
    }

    /// Removes the oldest request (sent, or unreadable).
    pub fn pop(&mut self) {
        if let Some((seq, len)) = self.files.pop_front() {
            let _ = std::fs::remove_file(self.path(seq));
            self.bytes -= len;
            SPOOLED_BYTES.fetch_sub(len, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_survive_a_restart_in_order_and_the_bound_holds() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(dir.path(), 10).unwrap();
        assert!(spool.push(&[Bytes::from_static(b"ab"), Bytes::from_static(b"c")]).unwrap());
        assert!(spool.push(&[Bytes::from_static(b"defg")]).unwrap());
        assert!(!spool.push(&[Bytes::from_static(b"hijk")]).unwrap(), "over 10 bytes");
        std::fs::write(dir.path().join("00000000000000000009.tmp"), b"half").unwrap();
        drop(spool);

        let mut spool = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(&spool.oldest().unwrap().unwrap()[..], b"abc");
        spool.pop();
        assert!(spool.push(&[Bytes::from_static(b"xyz")]).unwrap());
        assert_eq!(&spool.oldest().unwrap().unwrap()[..], b"defg");
        spool.pop();
        assert_eq!(&spool.oldest().unwrap().unwrap()[..], b"xyz");
        spool.pop();
        assert!(spool.is_empty() && spool.oldest().is_none());
        assert!(!dir.path().join("00000000000000000009.tmp").exists(), "a half-written request is removed");
    }
}
