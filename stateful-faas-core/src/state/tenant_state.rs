//! One tenant's objects, their indexes and their metering: what [`super::StateStore`] holds
//! under each tenant's lock, and the changes that keep the byte-second accounts exact.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::metering::{Account, ByteSeconds};
use super::{ObjectKey, Owner, TenantUsage, UsageInterval, scan_hash};

/// What an account has reported so far: its integral up to `since`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Reported {
    pub(super) since: u64,
    pub(super) byte_nanos: u128,
}

impl Reported {
    /// The record of `account` from `since` to `at` (None when nothing accrued); from then on,
    /// reported up to `at`.
    pub(super) fn report(
        &mut self,
        account: &Account,
        at: u64,
        owner: impl FnOnce() -> Owner,
    ) -> Option<UsageInterval> {
        let integral = account.integral(at).byte_nanos();
        debug_assert!(integral >= self.byte_nanos && at >= self.since);
        let accrued = integral - self.byte_nanos;
        let record = (accrued > 0).then(|| UsageInterval {
            start_ns: self.since,
            end_ns: at,
            owner: owner(),
            byte_seconds: ByteSeconds::from_byte_nanos(accrued),
        });
        *self = Reported { since: at, byte_nanos: integral };
        record
    }
}

/// A registered job's account, what it has reported, and the objects counted in it.
#[derive(Default)]
pub(super) struct Job {
    pub(super) account: Account,
    pub(super) reported: Reported,
    /// The objects its account counts (not those persisted from an earlier job of the same
    /// name), so that its end costs its own objects, not the tenant's.
    pub(super) objects: HashSet<Arc<ObjectKey>>,
}

pub(super) struct Object {
    pub(super) value: Bytes,
    pub(super) persist: bool,
    pub(super) expires_at: Option<u64>,
    /// Counted in its job's account (true) or in the standing account (false).
    pub(super) in_job: bool,
    /// When the current account started counting it.
    pub(super) counted_since: u64,
}

#[derive(Default)]
pub(super) struct TenantState {
    /// Each address is allocated once and shared by the indexes below.
    pub(super) objects: HashMap<Arc<ObjectKey>, Object>,
    pub(super) expiries: BTreeSet<(u64, Arc<ObjectKey>)>,
    /// Every object's address by [`scan_hash`], so that [`StateStore::scan`] resumes from a
    /// cursor that stays valid while objects come and go.
    pub(super) by_hash: BTreeSet<(u64, Arc<ObjectKey>)>,
    /// Every object's address in order (job, bucket, key), so that a bucket lists a page from
    /// where the last one ended.
    pub(super) sorted: BTreeSet<Arc<ObjectKey>>,
    pub(super) jobs: HashMap<String, Job>,
    pub(super) standing: Account,
    /// Byte-seconds of jobs already deregistered.
    pub(super) ended_jobs: ByteSeconds,
    /// Value bytes alone.
    pub(super) bytes: u64,
    /// What the quota counts and the accounts integrate ([`ObjectKey::held`] of each object).
    pub(super) held: u64,
    /// What the standing account has reported.
    pub(super) standing_reported: Reported,
    /// The instant up to which every account has reported: the last closed interval boundary,
    /// or the time of the tenant's first use or of the last final report. `None` before first use.
    pub(super) reported_until: Option<u64>,
    /// The latest time seen, so that a clock stepping back never runs an integral backwards.
    pub(super) latest: u64,
    /// Records not yet drained.
    pub(super) pending: Vec<UsageInterval>,
    /// When the next paced job registration is due, without burst (generic cell rate
    /// algorithm: a registration is admitted while this is at most a burst ahead of now).
    pub(super) registrations_due: u64,
}

impl TenantState {
    pub(super) fn account(&mut self, job: &Option<String>, in_job: bool) -> &mut Account {
        match job {
            Some(job) if in_job => {
                &mut self.jobs.get_mut(job).expect("objects counted in a job belong to a registered job").account
            }
            _ => &mut self.standing,
        }
    }

    /// Brings the tenant to `now`: closes every usage interval boundary passed since the last
    /// report (dropping what expired up to each boundary first), then drops what expired up to
    /// `now`. Returns `now`, never earlier than a time already seen.
    pub(super) fn advance(&mut self, now: u64, interval: u64, used: &AtomicU64) -> u64 {
        let now = now.max(self.latest);
        self.latest = now;
        let mut until = *self.reported_until.get_or_insert_with(|| {
            // First use: nothing was held before, so reporting starts here (not at the
            // interval's start, whose id a record of a previous process may already carry).
            self.standing_reported.since = now;
            now
        });
        loop {
            let boundary = (until / interval).saturating_add(1).saturating_mul(interval);
            if boundary > now {
                break;
            }
            self.sweep(boundary, used);
            self.report_all(boundary);
            until = boundary;
            if self.held == 0 {
                // Nothing held: no account accrues until the next change, which is at `now` or
                // later, so skip to the last boundary before it.
                let last = now / interval * interval;
                if last > until {
                    self.report_all(last);
                    until = last;
                }
            }
        }
        self.reported_until = Some(until);
        self.sweep(now, used);
        now
    }

    /// Reports every account up to `at` (no change may have happened after `at`).
    pub(super) fn report_all(&mut self, at: u64) {
        if let Some(record) = self.standing_reported.report(&self.standing, at, || Owner::Standing) {
            self.pending.push(record);
        }
        for (name, job) in &mut self.jobs {
            if let Some(record) = job.reported.report(&job.account, at, || Owner::Job(name.clone())) {
                self.pending.push(record);
            }
        }
        self.reported_until = Some(at);
    }

    /// Removes an object, counting it up to `at`.
    pub(super) fn remove(&mut self, key: &ObjectKey, at: u64, used: &AtomicU64) -> Option<Object> {
        let (key, object) = self.objects.remove_entry(key)?;
        if let Some(expires_at) = object.expires_at {
            self.expiries.remove(&(expires_at, key.clone()));
        }
        self.by_hash.remove(&(scan_hash(&key), key.clone()));
        self.sorted.remove(&key);
        if let Some(job) = key.job.as_ref().filter(|_| object.in_job) {
            self.jobs.get_mut(job).expect("objects counted in a job belong to a registered job").objects.remove(&key);
        }
        let size = object.value.len() as u64;
        let held = key.held(size);
        let since = object.counted_since;
        self.account(&key.job, object.in_job).close(held, since, at);
        self.bytes -= size;
        self.held -= held;
        used.fetch_sub(held, Ordering::SeqCst);
        Some(object)
    }

    /// Stores `value` at `key` in place of what is there, counted from `now`; `held` (what it
    /// holds) is already reserved in the budget.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn apply(
        &mut self,
        now: u64,
        key: &ObjectKey,
        value: Bytes,
        persist: bool,
        expires_at: Option<u64>,
        held: u64,
        used: &AtomicU64,
    ) {
        let in_job = key.job.is_some();
        let size = value.len() as u64;
        let object = Object { value, persist, expires_at, in_job, counted_since: now };
        let replaced = match self.objects.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, object)),
            None => {
                let shared = Arc::new(key.clone());
                self.by_hash.insert((scan_hash(key), shared.clone()));
                self.sorted.insert(shared.clone());
                self.objects.insert(shared, object);
                None
            }
        };
        // The expiry index shares the map's address (looked up only when there is an expiry).
        let shared = |objects: &HashMap<Arc<ObjectKey>, Object>| {
            objects.get_key_value(key).map(|(shared, _)| shared.clone()).expect("stored above")
        };
        if let Some(old) = replaced {
            let old_size = old.value.len() as u64;
            let old_held = key.held(old_size);
            self.account(&key.job, old.in_job).close(old_held, old.counted_since, now);
            self.bytes -= old_size;
            self.held -= old_held;
            used.fetch_sub(old_held, Ordering::SeqCst);
            if let Some(at) = old.expires_at
                && Some(at) != expires_at
            {
                self.expiries.remove(&(at, shared(&self.objects)));
            }
        }
        self.account(&key.job, in_job).open(held, now);
        if let Some(job) = key.job.as_ref().filter(|_| in_job) {
            // (Already there when it replaces an object of the same job.)
            let shared = shared(&self.objects);
            self.jobs.get_mut(job).expect("objects counted in a job belong to a registered job").objects.insert(shared);
        }
        self.bytes += size;
        self.held += held;
        if let Some(at) = expires_at {
            self.expiries.insert((at, shared(&self.objects)));
        }
    }

    /// Appends `suffix` to the live object at `key`, its new size already reserved in the
    /// budget: in place if no reader shares the value and it has room, else into a new buffer
    /// with an eighth more room than needed (so appends copy each byte about 9 times in all,
    /// and an appended value holds at most an eighth more memory than its bytes).
    pub(super) fn append(&mut self, now: u64, key: &ObjectKey, suffix: &[u8], used: &AtomicU64) {
        let object = self.objects.get_mut(key).expect("appended to a live object");
        let value = std::mem::take(&mut object.value);
        let (old_size, size) = (value.len() as u64, (value.len() + suffix.len()) as u64);
        let mut grown = match value.try_into_mut() {
            Ok(unique) if unique.capacity() - unique.len() >= suffix.len() => unique,
            Ok(unique) => grow(&unique, suffix.len()),
            Err(shared) => grow(&shared, suffix.len()),
        };
        grown.extend_from_slice(suffix);
        object.value = grown.freeze();
        let (in_job, since) = (object.in_job, object.counted_since);
        object.counted_since = now;
        let (old_held, held) = (key.held(old_size), key.held(size));
        let account = self.account(&key.job, in_job);
        account.close(old_held, since, now);
        account.open(held, now);
        self.bytes += size - old_size;
        self.held += held - old_held;
        used.fetch_sub(old_held, Ordering::SeqCst);
    }

    /// Drops every object whose expiry is at or before `now`, each counted to its own expiry.
    pub(super) fn sweep(&mut self, now: u64, used: &AtomicU64) {
        while let Some((expires_at, key)) = self.expiries.first().cloned() {
            if expires_at > now {
                break;
            }
            self.remove(&key, expires_at, used);
        }
    }

    pub(super) fn live(&self, key: &ObjectKey) -> Option<&Object> {
        self.objects.get(key)
    }
}

/// A copy of `value` with room for `more` bytes and an eighth of the whole besides.
fn grow(value: &[u8], more: usize) -> bytes::BytesMut {
    let len = value.len() + more;
    let mut grown = bytes::BytesMut::with_capacity(len + len / 8);
    grown.extend_from_slice(value);
    grown
}

pub(super) fn usage_of(state: &TenantState, now: u64) -> TenantUsage {
    let mut jobs: Vec<_> = state.jobs.iter().map(|(job, j)| (job.clone(), j.account.integral(now))).collect();
    jobs.sort();
    let standing = state.standing.integral(now);
    let total = standing + state.ended_jobs + jobs.iter().map(|(_, b)| *b).sum();
    TenantUsage { bytes: state.bytes, held: state.held, total, standing, jobs, ended_jobs: state.ended_jobs }
}
