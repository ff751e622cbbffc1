//! The ephemeral state store: Pocket's model, per tenant, in memory.
//!
//! A tenant's objects are addressed by `(job, bucket, key)`; `job` is `None` for objects that
//! belong to the tenant rather than to a job (lookup tables, say). Jobs are registered before
//! use; deregistering a job drops its objects except those put with `persist`, which stay
//! addressable and from then on count as the tenant's standing storage. Buckets exist while
//! they hold objects. Objects may carry a TTL; an expired object is gone at its expiry
//! instant, whenever the sweeper runs.
//!
//! Capacity is a total budget and a quota per tenant, counted in held bytes: each object's value,
//! its address (job, bucket and key) and [`OBJECT_OVERHEAD`], so that empty objects with long
//! keys are not free to hoard. A put over either fails (507) and never evicts anything. A tenant
//! may have at most [`StateConfig::max_jobs_per_tenant`] jobs registered (429 beyond). Metering
//! counts the same held bytes: what a tenant occupies is what its bill's byte-seconds are.
//!
//! Metering is exact (see [`metering`]): each job's and each tenant's byte-seconds are
//! integrated at every change; objects that outlive their job move to the tenant's standing
//! account at the job's end.
//!
//! # Usage in intervals
//!
//! For billing, each tenant's byte-seconds are also split into records of fixed intervals
//! ([`StateConfig::usage_interval`], 60 s by default; boundaries are multiples of it in ns since
//! the Unix epoch, so every UTC day and month is a whole number of intervals). Before any change
//! to a tenant's state at `now` (every operation, and the sweeper), each boundary `b` passed
//! since the last one is closed in order: objects expired at or before `b` are dropped (counted
//! to their expiry), then every account (the standing account and each registered job) reports
//! `integral(b) − already reported` as a [`UsageInterval`] ending at `b`. This is exact because
//! nothing changed between the tenant's last change and `b`. A job's final partial interval is
//! reported when it is deregistered, so each job's records sum to what `deregister` returned.
//! Records never straddle a boundary, and the records of a period `[P0, P1)` sum to exactly
//! `total(P1) − total(P0)`: a billing period gets the store's integral over that period, and
//! nothing is counted twice. A record starts where its account last reported: the previous
//! boundary, the tenant's first use, the job's registration, or a final report; so its
//! [`UsageInterval::usage_id`] (owner and start) is unique per tenant, even for a job name
//! reused within an interval or a tenant used again after a restart.
//!
//! Records wait in the tenant's state until drained by [`StateStore::take_usage`] (the core's
//! housekeeping drains them every second and emits one `state.usage` span each); their number is
//! bounded by (accounts × intervals elapsed between two drains). At shutdown,
//! [`StateStore::take_usage_final`] also reports the current partial interval up to `now`.
//!
//! # Files
//!
//! This one is the store's API in one place (its settings, errors, and every operation under a
//! tenant's lock, from admission to the quota to usage reports): about 650 lines, one cohesive
//! thing. Addresses and what operations take and give are in `object.rs`, a tenant's objects,
//! indexes and accounts in `tenant_state.rs`, jobs in `jobs.rs`, exact byte-seconds and the
//! usage records in `metering.rs`.

mod jobs;
pub mod metering;
mod object;
mod tenant_state;

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;

use crate::tenant::TenantId;
use metering::{ByteSeconds, Clock};
pub use metering::{Owner, TenantUsage, UsageInterval};
pub use object::{Change, Current, Listing, MAX_PAGE, OBJECT_OVERHEAD, ObjectInfo, ObjectKey, PutOptions};
use object::{check_part, scan_hash};
use tenant_state::{Object, TenantState, usage_of};

/// Limits of the store.
#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Largest value of one object.
    pub max_value_bytes: u64,
    /// Bytes held by all tenants together (values, addresses and [`OBJECT_OVERHEAD`]).
    pub total_budget_bytes: u64,
    /// Bytes one tenant may hold, counted as the budget is.
    pub tenant_quota_bytes: u64,
    /// Jobs one tenant may have registered at once.
    pub max_jobs_per_tenant: usize,
    /// Jobs a tenant may register a second over HTTP or Redis (in bursts of ten times as many):
    /// each job's usage is at least one billed record, so registering and ending jobs in a
    /// loop would otherwise make records as fast as the tenant can ask. Flow runs register
    /// their jobs unpaced: each runs functions, which are billed.
    pub job_registrations_per_second: u32,
    /// Length of the usage records' intervals; must be > 0 and divide a day (see
    /// [`StateConfig::validate`]).
    pub usage_interval: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            max_value_bytes: 256 << 20,
            total_budget_bytes: 4 << 30,
            tenant_quota_bytes: 1 << 30,
            max_jobs_per_tenant: 10_000,
            job_registrations_per_second: 100,
            usage_interval: Duration::from_secs(60),
        }
    }
}

const NANOS_PER_DAY: u128 = 86_400 * 1_000_000_000;

/// A [`StateConfig`] the store cannot run with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("state usage interval {0:?} must be longer than zero and divide a day (86400 s) exactly")]
pub struct InvalidUsageInterval(pub Duration);

impl StateConfig {
    /// Checks that the usage interval is positive and divides a day, so that every UTC day (and
    /// so every month) is a whole number of intervals.
    pub fn validate(&self) -> Result<(), InvalidUsageInterval> {
        let ns = self.usage_interval.as_nanos();
        if ns == 0 || !NANOS_PER_DAY.is_multiple_of(ns) {
            return Err(InvalidUsageInterval(self.usage_interval));
        }
        Ok(())
    }

    fn usage_interval_ns(&self) -> u64 {
        self.usage_interval.as_nanos() as u64
    }
}

/// Why a state operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("job {0:?} is not registered")]
    JobNotRegistered(String),
    #[error("job {0:?} is already registered")]
    JobExists(String),
    #[error("no object {key:?} in bucket {bucket:?}{}", job_suffix(.job))]
    NotFound { job: Option<String>, bucket: String, key: String },
    #[error("value of {size} bytes is larger than the {max} bytes allowed")]
    ValueTooLarge { size: u64, max: u64 },
    #[error(
        "tenant {tenant} state quota exceeded (its plan's `state_bytes`, by default --state-tenant-quota-bytes): {used} of {quota} bytes held, {needed} more needed (an object holds its value, its address and {OBJECT_OVERHEAD} bytes)"
    )]
    QuotaExceeded { tenant: String, used: u64, quota: u64, needed: u64 },
    #[error("state store budget exhausted (--state-budget-bytes): {used} of {budget} bytes held, {needed} more needed")]
    BudgetExceeded { used: u64, budget: u64, needed: u64 },
    #[error(
        "tenant {tenant} has {max} state jobs registered, its quota (its plan's `state_jobs`, by default --state-tenant-max-jobs): deregister one first"
    )]
    TooManyJobs { tenant: String, max: usize },
    #[error(
        "tenant {tenant} registers jobs faster than {per_second} a second (--state-tenant-jobs-per-second), or its usage records are not leaving (its span queue is full): retry in a moment"
    )]
    JobsTooFast { tenant: String, per_second: u32 },
    #[error("invalid {what} {value:?}: use 1 to 255 characters without '/' or control characters")]
    InvalidName { what: &'static str, value: String },
}

fn job_suffix(job: &Option<String>) -> String {
    job.as_ref().map(|j| format!(" of job {j:?}")).unwrap_or_default()
}

/// One tenant's state, found once: see [`StateStore::handle`].
pub struct TenantHandle {
    tenant: TenantId,
    state: Arc<Mutex<TenantState>>,
}

impl TenantHandle {
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
}

/// The store of every tenant.
pub struct StateStore {
    config: StateConfig,
    /// Tenants' plans, where they change the quota or the jobs.
    quotas: Arc<crate::quota::Quotas>,
    interval_ns: u64,
    clock: Arc<dyn Clock>,
    tenants: RwLock<HashMap<TenantId, Arc<Mutex<TenantState>>>>,
    used: AtomicU64,
    /// Room for values being received before they are stored.
    receiving: crate::room::Room,
    /// Whether a tenant's usage records are not leaving (see [`StateStore::gate_usage`]).
    usage_gate: std::sync::OnceLock<Box<UsageGate>>,
}

type UsageGate = dyn Fn(&TenantId) -> bool + Send + Sync;

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore").field("used_bytes", &self.used_bytes()).finish_non_exhaustive()
    }
}

impl StateStore {
    /// A store with no tenant yet.
    ///
    /// # Panics
    ///
    /// If the configuration is invalid ([`StateConfig::validate`]); `Core::open` checks it first.
    pub fn new(config: StateConfig, clock: Arc<dyn Clock>, quotas: Arc<crate::quota::Quotas>) -> Self {
        if let Err(error) = config.validate() {
            panic!("{error}");
        }
        let interval_ns = config.usage_interval_ns();
        let receiving = crate::room::Room::new(
            config.total_budget_bytes / 2,
            config.max_value_bytes,
            "values being received (half of --state-budget-bytes)",
        );
        let tenants = RwLock::new(HashMap::new());
        let usage_gate = std::sync::OnceLock::new();
        Self { config, quotas, interval_ns, clock, tenants, used: AtomicU64::new(0), receiving, usage_gate }
    }

    /// The room shared by values being received (over HTTP) before they are stored.
    pub fn receiving(&self) -> &crate::room::Room {
        &self.receiving
    }

    fn tenant(&self, tenant: &TenantId) -> Arc<Mutex<TenantState>> {
        if let Some(state) = self.tenants.read().unwrap().get(tenant) {
            return state.clone();
        }
        self.tenants.write().unwrap().entry(tenant.clone()).or_default().clone()
    }

    /// Runs `f` on a tenant's state after dropping what expired.
    fn with_tenant<T>(&self, tenant: &TenantId, f: impl FnOnce(&mut TenantState, u64) -> T) -> T {
        self.with_state(&self.tenant(tenant), f)
    }

    fn with_state<T>(&self, state: &Mutex<TenantState>, f: impl FnOnce(&mut TenantState, u64) -> T) -> T {
        let mut state = state.lock().unwrap();
        let now = state.advance(self.clock.now_ns(), self.interval_ns, &self.used);
        f(&mut state, now)
    }

    /// A tenant's state held for many operations (a Redis protocol session's), so that each
    /// finds it without looking it up.
    pub fn handle(&self, tenant: &TenantId) -> TenantHandle {
        TenantHandle { tenant: tenant.clone(), state: self.tenant(tenant) }
    }

    /// Runs `f` on every tenant's state (sorted by tenant) after bringing it to now.
    fn each_tenant<T>(&self, mut f: impl FnMut(&mut TenantState, u64) -> T) -> Vec<(TenantId, T)> {
        let tenants: Vec<_> = self.tenants.read().unwrap().iter().map(|(t, s)| (t.clone(), s.clone())).collect();
        let mut out: Vec<_> = tenants
            .into_iter()
            .map(|(tenant, state)| {
                let mut state = state.lock().unwrap();
                let now = state.advance(self.clock.now_ns(), self.interval_ns, &self.used);
                (tenant, f(&mut state, now))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Whether a value of `size` bytes at `key` would fit the tenant's quota and the budget now:
    /// lets a caller refuse a body it has not read yet. [`StateStore::put`] checks again.
    pub fn check_room(&self, tenant: &TenantId, key: &ObjectKey, size: u64) -> Result<(), StateError> {
        // A tenant not seen yet holds nothing; checking must not make this its first use (its
        // usage records start at the first change).
        let existing = self.tenants.read().unwrap().get(tenant).cloned();
        let check = |state: &TenantState| {
            let (held, replaced) = self.quota(tenant, state, key, size)?;
            let (used, budget) = (self.used.load(Ordering::SeqCst), self.config.total_budget_bytes);
            if held > replaced && used + held - replaced > budget {
                return Err(StateError::BudgetExceeded { used, budget, needed: held.saturating_sub(replaced) });
            }
            Ok(())
        };
        match existing {
            Some(_) => self.with_tenant(tenant, |state, _| check(state)),
            None => check(&TenantState::default()),
        }
    }

    /// What a value of `size` at `key` would hold, and what the object it replaces holds, if
    /// the tenant's quota admits it (a write that holds no more than it replaces always is).
    fn quota(
        &self,
        tenant: &TenantId,
        state: &TenantState,
        key: &ObjectKey,
        size: u64,
    ) -> Result<(u64, u64), StateError> {
        let (held, replaced) =
            (key.held(size), state.live(key).map_or(0, |object| key.held(object.value.len() as u64)));
        self.admit(tenant, state, held, replaced)?;
        Ok((held, replaced))
    }

    /// Whether the tenant's quota admits holding `held` more bytes in place of `replaced`.
    fn admit(&self, tenant: &TenantId, state: &TenantState, held: u64, replaced: u64) -> Result<(), StateError> {
        if held <= replaced {
            return Ok(());
        }
        let quota = self.quota_of(tenant);
        if state.held - replaced + held > quota {
            return Err(StateError::QuotaExceeded {
                tenant: tenant.to_string(),
                used: state.held,
                quota,
                needed: held - replaced,
            });
        }
        Ok(())
    }

    /// Reserves `held` bytes of the shared budget in place of `replaced`, in one atomic step
    /// before anything changes, so that concurrent tenants cannot overshoot it together. The
    /// replaced object's bytes are returned when it is removed.
    fn reserve(&self, held: u64, replaced: u64) -> Result<(), StateError> {
        let budget = self.config.total_budget_bytes;
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                (held <= replaced || used + held - replaced <= budget).then_some(used + held)
            })
            .map(|_| ())
            .map_err(|used| StateError::BudgetExceeded { used, budget, needed: held.saturating_sub(replaced) })
    }

    /// Checks what a write of `value` at `key` needs that the quota does not cover: the value's
    /// size and, for a job's object, that the job is registered.
    fn check_write(&self, state: &TenantState, key: &ObjectKey, size: u64) -> Result<(), StateError> {
        if size > self.config.max_value_bytes {
            return Err(StateError::ValueTooLarge { size, max: self.config.max_value_bytes });
        }
        if let Some(job) = &key.job
            && !state.jobs.contains_key(job)
        {
            return Err(StateError::JobNotRegistered(job.clone()));
        }
        Ok(())
    }

    /// Stores a value, replacing any object at the same address.
    pub fn put(&self, tenant: &TenantId, key: ObjectKey, value: Bytes, options: PutOptions) -> Result<(), StateError> {
        self.with_tenant(tenant, |state, now| {
            let expires_at = options.ttl.map(|ttl| now.saturating_add(ttl.as_nanos() as u64));
            let replaced = state.live(&key).map_or(0, |object| key.held(object.value.len() as u64));
            self.write(tenant, state, now, &key, value, options.persist, expires_at, replaced)
        })
    }

    /// Checks, reserves and applies one write at `now`, in place of an object that holds
    /// `replaced` bytes (0: none).
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        tenant: &TenantId,
        state: &mut TenantState,
        now: u64,
        key: &ObjectKey,
        value: Bytes,
        persist: bool,
        expires_at: Option<u64>,
        replaced: u64,
    ) -> Result<(), StateError> {
        self.check_write(state, key, value.len() as u64)?;
        let held = key.held(value.len() as u64);
        self.admit(tenant, state, held, replaced)?;
        self.reserve(held, replaced)?;
        state.apply(now, key, value, persist, expires_at, held, &self.used);
        Ok(())
    }

    /// Stores several values at once, all or none (Redis's `MSET`): the quota and the budget
    /// are checked for all of them together. A key given twice keeps its last value.
    pub fn put_many(&self, handle: &TenantHandle, items: Vec<(ObjectKey, Bytes)>) -> Result<(), StateError> {
        let mut last: HashMap<&ObjectKey, usize> = HashMap::with_capacity(items.len());
        for (i, (key, _)) in items.iter().enumerate() {
            last.insert(key, i);
        }
        let tenant = &handle.tenant;
        self.with_state(&handle.state, |state, now| {
            let (mut held, mut replaced) = (0, 0);
            for (i, (key, value)) in items.iter().enumerate() {
                if last[key] != i {
                    continue;
                }
                self.check_write(state, key, value.len() as u64)?;
                held += key.held(value.len() as u64);
                replaced += state.live(key).map_or(0, |object| key.held(object.value.len() as u64));
            }
            self.admit(tenant, state, held, replaced)?;
            self.reserve(held, replaced)?;
            for (i, (key, value)) in items.iter().enumerate() {
                if last[key] == i {
                    let held = key.held(value.len() as u64);
                    state.apply(now, key, value.clone(), false, None, held, &self.used);
                }
            }
            Ok(())
        })
    }

    /// Reads and changes one object in one step: `decide` sees the object (if any) and the
    /// current time, and answers what becomes of it and what to return. A `Put` whose expiry is
    /// not after now removes the object (as Redis does with a past expiry). The quota, the
    /// budget and the largest value apply to a `Put` as to [`StateStore::put`]; a refused
    /// change returns the error and leaves the object as it was.
    pub fn modify<T>(
        &self,
        handle: &TenantHandle,
        key: &ObjectKey,
        decide: impl FnOnce(Option<Current<'_>>, u64) -> (Change, T),
    ) -> Result<T, StateError> {
        self.with_state(&handle.state, |state, now| self.change(&handle.tenant, state, now, key, decide))
    }

    /// [`StateStore::modify`] for each key in turn, in one step (Redis's `MGET`, `DEL`,
    /// `EXISTS`): answers each key's `decide`, or the first refused change.
    pub fn modify_each<T>(
        &self,
        handle: &TenantHandle,
        keys: &[ObjectKey],
        mut decide: impl FnMut(Option<Current<'_>>, u64) -> (Change, T),
    ) -> Result<Vec<T>, StateError> {
        self.with_state(&handle.state, |state, now| {
            keys.iter().map(|key| self.change(&handle.tenant, state, now, key, &mut decide)).collect()
        })
    }

    fn change<T>(
        &self,
        tenant: &TenantId,
        state: &mut TenantState,
        now: u64,
        key: &ObjectKey,
        decide: impl FnOnce(Option<Current<'_>>, u64) -> (Change, T),
    ) -> Result<T, StateError> {
        let current = state.live(key).map(|object| Current {
            value: &object.value,
            persist: object.persist,
            expires_at_ns: object.expires_at,
        });
        let replaced = current.map_or(0, |c| key.held(c.value.len() as u64));
        let exists = current.is_some();
        let (change, answer) = decide(current, now);
        match change {
            Change::Keep => {}
            Change::Remove => {
                state.remove(key, now, &self.used);
            }
            Change::Put { expires_at_ns: Some(at), .. } if at <= now => {
                state.remove(key, now, &self.used);
            }
            Change::Put { value, persist, expires_at_ns } => {
                self.write(tenant, state, now, key, value, persist, expires_at_ns, replaced)?
            }
            Change::Append(suffix) if exists => {
                let size = replaced - key.held(0) + suffix.len() as u64;
                self.check_write(state, key, size)?;
                let held = key.held(size);
                self.admit(tenant, state, held, replaced)?;
                self.reserve(held, replaced)?;
                state.append(now, key, &suffix, &self.used);
            }
            Change::Append(suffix) => self.write(tenant, state, now, key, suffix, false, None, 0)?,
        }
        Ok(answer)
    }

    /// Up to about `count` of a tenant's objects from `cursor` on (0 to start), those `keep`
    /// accepts, and the cursor to go on from (0 when done). Objects are visited in the order of
    /// a hash of their address, so a cursor stays valid across changes: every object held
    /// from the first call to the last is seen, at least once (Redis's `SCAN` guarantee).
    pub fn scan(
        &self,
        handle: &TenantHandle,
        cursor: u64,
        count: usize,
        mut keep: impl FnMut(&ObjectKey) -> bool,
        enough: impl Fn() -> bool,
    ) -> (u64, Vec<ObjectKey>) {
        self.with_state(&handle.state, |state, _| {
            let start = (cursor, Arc::new(ObjectKey { job: None, bucket: String::new(), key: String::new() }));
            let mut found = Vec::new();
            let mut last = None;
            for (visited, (hash, key)) in state.by_hash.range(start..).enumerate() {
                // Objects sharing a hash are visited together: the next cursor skips past it.
                // The walk stops after `count` objects, or once `enough` says the caller has
                // spent what it may (always after a whole hash, so every call moves on).
                if (visited >= count.max(1) || enough()) && last.is_some_and(|last| last != *hash) {
                    return (*hash, found);
                }
                last = Some(*hash);
                if keep(key) {
                    found.push(ObjectKey::clone(key));
                }
            }
            (0, found)
        })
    }

    /// How many of a tenant's objects `keep` accepts, and how many of those expire.
    pub fn count(&self, handle: &TenantHandle, keep: impl Fn(&ObjectKey) -> bool) -> (usize, usize) {
        self.with_state(&handle.state, |state, _| {
            let kept = state.objects.iter().filter(|(key, _)| keep(key));
            kept.fold((0, 0), |(all, expiring), (_, object)| (all + 1, expiring + object.expires_at.is_some() as usize))
        })
    }

    pub fn config(&self) -> &StateConfig {
        &self.config
    }

    /// The bytes a tenant may hold (its plan's, else the default quota).
    pub fn quota_of(&self, tenant: &TenantId) -> u64 {
        self.quotas.of(tenant.as_str()).state_bytes.unwrap_or(self.config.tenant_quota_bytes)
    }

    /// Reads a value (zero-copy); with `delete_after_read`, removes it in the same step.
    pub fn get(&self, tenant: &TenantId, key: &ObjectKey, delete_after_read: bool) -> Result<Bytes, StateError> {
        self.with_tenant(tenant, |state, now| {
            let not_found =
                || StateError::NotFound { job: key.job.clone(), bucket: key.bucket.clone(), key: key.key.clone() };
            if delete_after_read {
                return state.remove(key, now, &self.used).map(|object| object.value).ok_or_else(not_found);
            }
            state.live(key).map(|object| object.value.clone()).ok_or_else(not_found)
        })
    }

    /// Size and flags of an object, without its value.
    pub fn lookup(&self, tenant: &TenantId, key: &ObjectKey) -> Result<ObjectInfo, StateError> {
        self.with_tenant(tenant, |state, _| {
            state.live(key).map(|object| info(&key.key, object)).ok_or_else(|| StateError::NotFound {
                job: key.job.clone(),
                bucket: key.bucket.clone(),
                key: key.key.clone(),
            })
        })
    }

    /// Removes an object.
    pub fn delete(&self, tenant: &TenantId, key: &ObjectKey) -> Result<(), StateError> {
        self.with_tenant(tenant, |state, now| {
            state.remove(key, now, &self.used).map(|_| ()).ok_or_else(|| StateError::NotFound {
                job: key.job.clone(),
                bucket: key.bucket.clone(),
                key: key.key.clone(),
            })
        })
    }

    /// A page of a bucket's objects in key order: at most `limit` (1 to [`MAX_PAGE`]) of those
    /// after the key `after` (from the first when `None`). Costs the page, however large the
    /// bucket: a listing goes on from where the last page ended, so that it sees every object
    /// held from its first page to its last once, and those added or removed meanwhile at
    /// most once.
    pub fn enumerate(
        &self,
        tenant: &TenantId,
        job: Option<&str>,
        bucket: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Listing {
        let from = ObjectKey {
            job: job.map(str::to_string),
            bucket: bucket.to_string(),
            key: after.unwrap_or("").to_string(),
        };
        // No key is empty: from "" on is the whole bucket.
        let lower = if after.is_some() { Bound::Excluded(&from) } else { Bound::Included(&from) };
        self.with_tenant(tenant, |state, _| {
            let mut in_bucket = state
                .sorted
                .range::<ObjectKey, _>((lower, Bound::Unbounded))
                .take_while(|key| key.job.as_deref() == job && key.bucket == bucket);
            let objects: Vec<ObjectInfo> = in_bucket
                .by_ref()
                .take(limit.clamp(1, MAX_PAGE))
                .map(|key| info(&key.key, &state.objects[key]))
                .collect();
            let more = in_bucket.next().is_some();
            let next_after = objects.last().filter(|_| more).map(|last| last.key.clone());
            Listing { objects, next_after }
        })
    }

    /// A tenant's usage now.
    pub fn usage(&self, tenant: &TenantId) -> TenantUsage {
        self.with_tenant(tenant, |state, now| usage_of(state, now))
    }

    /// Byte-seconds of one registered job so far.
    pub fn job_usage(&self, tenant: &TenantId, job: &str) -> Option<ByteSeconds> {
        self.with_tenant(tenant, |state, now| state.jobs.get(job).map(|job| job.account.integral(now)))
    }

    /// Every tenant's usage (for metrics), after dropping what expired.
    pub fn usage_by_tenant(&self) -> Vec<(TenantId, TenantUsage)> {
        self.each_tenant(|state, now| usage_of(state, now))
    }

    /// Drains every tenant's pending usage records, after closing the interval boundaries passed
    /// up to now. Records come per tenant in the order they were closed.
    pub fn take_usage(&self) -> Vec<(TenantId, UsageInterval)> {
        flatten(self.each_tenant(|state, _| std::mem::take(&mut state.pending)))
    }

    /// Like [`StateStore::take_usage`], and also reports the current partial interval of every
    /// account up to now (at shutdown, so that nothing held is left unreported). Reporting
    /// resumes from now: the rest of the interval is reported at its end, never twice.
    pub fn take_usage_final(&self) -> Vec<(TenantId, UsageInterval)> {
        flatten(self.each_tenant(|state, now| {
            state.report_all(now);
            std::mem::take(&mut state.pending)
        }))
    }

    /// Bytes held by all tenants, as the budget counts them.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Drops expired objects of every tenant (the background sweeper calls this).
    pub fn sweep_expired(&self) {
        let _ = self.usage_by_tenant();
    }
}

fn info(key: &str, object: &Object) -> ObjectInfo {
    ObjectInfo {
        key: key.to_string(),
        size: object.value.len() as u64,
        persist: object.persist,
        expires_at_ns: object.expires_at,
    }
}

fn flatten(per_tenant: Vec<(TenantId, Vec<UsageInterval>)>) -> Vec<(TenantId, UsageInterval)> {
    per_tenant
        .into_iter()
        .flat_map(|(tenant, records)| records.into_iter().map(move |record| (tenant.clone(), record)))
        .collect()
}

#[cfg(test)]
mod tests;
