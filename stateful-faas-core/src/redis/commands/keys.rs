//! Redis keys as objects' addresses, and the budget of a `KEYS` or `SCAN` pattern's matching.

use bytes::Bytes;

use crate::redis::glob;
use crate::state::ObjectKey;

/// The bucket of keys that name none (`SET counter 1`).
pub const PLAIN_BUCKET: &str = "_";

/// A Redis key as an object's address: `bucket/key`, `key` (in [`PLAIN_BUCKET`]), or either
/// after `{job:ID}`.
pub fn parse_key(raw: &[u8]) -> Result<ObjectKey, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "ERR keys are UTF-8 text here".to_string())?;
    let (job, rest) = match text.strip_prefix("{job:") {
        Some(tagged) => {
            let (job, rest) = tagged
                .split_once('}')
                .ok_or_else(|| format!("ERR invalid key '{text}': a job's key is {{job:ID}}bucket/key"))?;
            (Some(job), rest)
        }
        None => (None, text),
    };
    let (bucket, key) = rest.split_once('/').unwrap_or((PLAIN_BUCKET, rest));
    ObjectKey::new(job, bucket, key).map_err(|error| format!("ERR invalid key '{text}': {error}"))
}

/// An object's address as a Redis key (the inverse of [`parse_key`]).
pub fn key_name(key: &ObjectKey) -> String {
    let mut name = String::with_capacity(key.bucket.len() + key.key.len() + 8);
    if let Some(job) = &key.job {
        name.push_str("{job:");
        name.push_str(job);
        name.push('}');
    }
    if key.bucket != PLAIN_BUCKET {
        name.push_str(&key.bucket);
        name.push('/');
    }
    name.push_str(&key.key);
    name
}

/// Steps of glob matching one `KEYS` or `SCAN` call may take (tens of milliseconds of the
/// shared event loop), and bytes of names it may answer: `KEYS` beyond them is an error,
/// `SCAN` returns early.
pub(super) const MATCH_STEPS: u64 = 50_000_000;
pub(super) const LISTED_BYTES: u64 = 16 << 20;

/// What one `KEYS` or `SCAN` call has spent: steps of matching, bytes of names kept.
#[derive(Default)]
pub(super) struct Budget {
    steps: std::cell::Cell<u64>,
    bytes: std::cell::Cell<u64>,
}

impl Budget {
    /// Whether an object's name matches `pattern` (any name without one), counted.
    pub(super) fn matches(&self, pattern: Option<&[u8]>, key: &ObjectKey) -> bool {
        let name = key_name(key);
        let matched = match pattern {
            Some(pattern) => {
                let mut steps = self.steps.get();
                let matched = glob::matches_counting(pattern, name.as_bytes(), &mut steps);
                self.steps.set(steps);
                matched
            }
            None => true,
        };
        if matched {
            self.bytes.set(self.bytes.get() + name.len() as u64);
        }
        matched
    }

    pub(super) fn spent(&self) -> bool {
        self.steps.get() > MATCH_STEPS || self.bytes.get() > LISTED_BYTES
    }
}

/// A command's glob pattern, if it is short enough to match ([`glob::MAX_PATTERN`]).
pub(super) fn pattern(pattern: &Bytes) -> Result<&Bytes, String> {
    if pattern.len() > glob::MAX_PATTERN {
        return Err(format!("ERR pattern longer than {} bytes", glob::MAX_PATTERN));
    }
    Ok(pattern)
}
