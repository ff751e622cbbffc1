//! An object's address and what callers give and get for one: options of a put, what a lookup
//! or a listing tells, and the changes [`StateStore::modify`] makes.
//!
//! [`StateStore::modify`]: super::StateStore::modify

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use super::StateError;

/// What an object holds beyond its value and address, as the quota and the budget count it:
/// about what its entry costs in memory (the map's slot, the expiry index, three strings' heads).
pub const OBJECT_OVERHEAD: u64 = 128;

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub job: Option<String>,
    pub bucket: String,
    pub key: String,
}

impl ObjectKey {
    /// What the object at this address holds beside a value of `value_bytes`.
    pub(super) fn held(&self, value_bytes: u64) -> u64 {
        let address = self.job.as_ref().map_or(0, String::len) + self.bucket.len() + self.key.len();
        value_bytes + address as u64 + OBJECT_OVERHEAD
    }

    pub fn new(job: Option<&str>, bucket: &str, key: &str) -> Result<Self, StateError> {
        if let Some(job) = job {
            check_part("job", job)?;
        }
        check_part("bucket", bucket)?;
        check_part("key", key)?;
        Ok(Self { job: job.map(str::to_string), bucket: bucket.to_string(), key: key.to_string() })
    }
}

pub(super) fn check_part(what: &'static str, value: &str) -> Result<(), StateError> {
    // One pass over the bytes; text beyond ASCII is checked again by characters (C1 controls).
    let bad_byte = value.bytes().any(|b| b == b'/' || b.is_ascii_control() || !b.is_ascii());
    let bad = bad_byte && (value.contains('/') || value.chars().any(char::is_control));
    if value.is_empty() || value.len() > 255 || bad {
        return Err(StateError::InvalidName { what, value: value.to_string() });
    }
    Ok(())
}

/// Options of a put.
#[derive(Debug, Clone, Copy, Default)]
pub struct PutOptions {
    /// Keep the object after its job is deregistered.
    pub persist: bool,
    /// Drop the object this long after the put.
    pub ttl: Option<Duration>,
}

/// What `lookup` and `enumerate` tell about an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    pub persist: bool,
    /// Expiry instant, ns since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ns: Option<u64>,
}

/// Most objects a listing answers at once (and its default page).
pub const MAX_PAGE: usize = 1000;

/// A page of a bucket's objects: see [`StateStore::enumerate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub objects: Vec<ObjectInfo>,
    /// The last key listed, when more follow: the next page starts after it.
    pub next_after: Option<String>,
}

/// An object as [`StateStore::modify`] shows it.
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    pub value: &'a Bytes,
    pub persist: bool,
    /// Expiry instant, ns since the epoch.
    pub expires_at_ns: Option<u64>,
}

/// What [`StateStore::modify`] does with an object.
#[derive(Debug, Clone)]
pub enum Change {
    Keep,
    Remove,
    Put {
        value: Bytes,
        persist: bool,
        expires_at_ns: Option<u64>,
    },
    /// These bytes at the end of the value (a new object if there is none), in place when no
    /// reader shares the value: a value built by many appends copies each byte a bounded
    /// number of times, not the whole value at every append (Redis's `APPEND`).
    Append(Bytes),
}

/// The order [`StateStore::scan`] visits objects in: a hash of the address, fixed for the
/// life of the process (a cursor is only meaningful within it).
pub(super) fn scan_hash(key: &ObjectKey) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    // Never 0, which starts and ends a scan.
    hasher.finish().max(1)
}
