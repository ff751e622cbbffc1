//! Exact byte-seconds: the integral of bytes held over time, kept at every change.
//!
//! An [`Account`] holds the integral in byte·nanoseconds (integers, no rounding): closed
//! objects contribute `size × (end − start)`; open objects are summed as `bytes × now −
//! Σ size × start`, so reading the integral at any time is exact and O(1). What a tenant's
//! accounts report: [`TenantUsage`] (all of it, now) and [`UsageInterval`] (the records billing
//! reads).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Byte-seconds, kept exactly as byte·nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSeconds(u128);

const NANOS_PER_SECOND: u128 = 1_000_000_000;

impl ByteSeconds {
    pub const ZERO: ByteSeconds = ByteSeconds(0);

    pub fn from_byte_nanos(byte_nanos: u128) -> Self {
        Self(byte_nanos)
    }

    pub fn byte_nanos(self) -> u128 {
        self.0
    }

    /// Approximate value for gauges and charts; money uses [`ByteSeconds::to_decimal_string`].
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }

    /// Exact decimal text with nine fractional digits, e.g. `12.500000000`.
    pub fn to_decimal_string(self) -> String {
        format!("{}.{:09}", self.0 / NANOS_PER_SECOND, self.0 % NANOS_PER_SECOND)
    }
}

impl fmt::Display for ByteSeconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_decimal_string())
    }
}

impl std::ops::Add for ByteSeconds {
    type Output = ByteSeconds;
    fn add(self, other: ByteSeconds) -> ByteSeconds {
        ByteSeconds(self.0 + other.0)
    }
}

impl std::iter::Sum for ByteSeconds {
    fn sum<I: Iterator<Item = ByteSeconds>>(iter: I) -> ByteSeconds {
        iter.fold(ByteSeconds::ZERO, |a, b| a + b)
    }
}

impl serde::Serialize for ByteSeconds {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_decimal_string())
    }
}

/// Time source of the store, in nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ns(&self) -> u64;
}

/// The system's real-time clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    }
}

/// A clock that moves only when told: for tests with hand-computed integrals.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start_ns: u64) -> Self {
        Self(AtomicU64::new(start_ns))
    }

    pub fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::SeqCst);
    }

    pub fn advance_secs(&self, seconds: u64) {
        self.0.fetch_add(seconds * 1_000_000_000, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The exact integral of the bytes held by one owner (a job, or a tenant's standing storage).
#[derive(Debug, Clone, Default)]
pub struct Account {
    closed: u128,
    open_bytes: u64,
    open_weighted_start: u128,
}

impl Account {
    /// Starts counting `bytes` from `at`.
    pub fn open(&mut self, bytes: u64, at: u64) {
        self.open_bytes += bytes;
        self.open_weighted_start += bytes as u128 * at as u128;
    }

    /// Stops counting `bytes` opened at `opened_at`, as of `at`.
    pub fn close(&mut self, bytes: u64, opened_at: u64, at: u64) {
        debug_assert!(at >= opened_at && self.open_bytes >= bytes);
        self.open_bytes -= bytes;
        self.open_weighted_start -= bytes as u128 * opened_at as u128;
        self.closed += bytes as u128 * at.saturating_sub(opened_at) as u128;
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.open_bytes
    }

    /// The integral from the first byte up to `now`.
    pub fn integral(&self, now: u64) -> ByteSeconds {
        ByteSeconds(self.closed + self.open_bytes as u128 * now as u128 - self.open_weighted_start)
    }
}

/// Byte-seconds of a tenant, split by owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TenantUsage {
    /// Value bytes alone.
    pub bytes: u64,
    /// What the quota counts and metering integrates: values, addresses and [`OBJECT_OVERHEAD`](super::OBJECT_OVERHEAD) per object.
    pub held: u64,
    /// All of the tenant's storage, from its first byte.
    pub total: ByteSeconds,
    /// Storage outside any registered job (persisted after their job, or job-less).
    pub standing: ByteSeconds,
    /// Registered jobs, by name.
    pub jobs: Vec<(String, ByteSeconds)>,
    /// Jobs deregistered so far, all together.
    pub ended_jobs: ByteSeconds,
}

/// Who a usage record bills.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    /// The tenant's storage outside any registered job.
    Standing,
    /// A registered job (a flow run's job is named by its run id).
    Job(String),
}

/// The byte-seconds one owner accrued in `[start_ns, end_ns)`, which lies within one usage
/// interval: `end_ns` is the interval's end, or the instant the job was deregistered, or the
/// final report at shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageInterval {
    pub start_ns: u64,
    pub end_ns: u64,
    pub owner: Owner,
    pub byte_seconds: ByteSeconds,
}

impl UsageInterval {
    /// Unique per tenant: `state/standing/<start_ns>` or `state/job/<job>/<start_ns>` (billing
    /// de-duplicates on it). A job name reused later starts its records later still.
    pub fn usage_id(&self) -> String {
        match &self.owner {
            Owner::Standing => format!("state/standing/{}", self.start_ns),
            Owner::Job(job) => format!("state/job/{job}/{}", self.start_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn integrals_are_exact_at_any_time() {
        let mut account = Account::default();
        account.open(100, 10 * S); // 100 B from t=10 s
        account.open(50, 12 * S); // 50 B from t=12 s
        assert_eq!(account.integral(12 * S).to_decimal_string(), "200.000000000");
        account.close(100, 10 * S, 15 * S); // 100 B × 5 s
        assert_eq!(account.bytes(), 50);
        // 500 + 50 × (20 − 12) = 900
        assert_eq!(account.integral(20 * S).to_decimal_string(), "900.000000000");
        account.open(1, 20 * S + 1);
        assert_eq!(account.integral(20 * S + 2).byte_nanos(), 900 * S as u128 + 50 * 2 + 1);
    }
}
