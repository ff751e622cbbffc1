//! Pocket's jobs: registering (paced for the tenant's own registrations), and deregistering,
//! which drops a job's objects but the persistent ones and reports its last usage record.

use super::metering::ByteSeconds;
use super::tenant_state::{Job, Reported};
use super::{Owner, StateError, StateStore, check_part};
use crate::tenant::TenantId;

impl StateStore {
    /// Registers a job.
    pub fn register(&self, tenant: &TenantId, job: &str) -> Result<(), StateError> {
        check_part("job", job)?;
        self.with_tenant(tenant, |state, now| {
            if state.jobs.contains_key(job) {
                return Err(StateError::JobExists(job.to_string()));
            }
            let max =
                self.quotas.of(tenant.as_str()).state_jobs.map_or(self.config.max_jobs_per_tenant, crate::quota::count);
            if state.jobs.len() >= max {
                return Err(StateError::TooManyJobs { tenant: tenant.to_string(), max });
            }
            // Its first record starts at its registration, so that a job name reused within
            // an interval never repeats a usage id.
            let job_state = Job { reported: Reported { since: now, byte_nanos: 0 }, ..Job::default() };
            state.jobs.insert(job.to_string(), job_state);
            Ok(())
        })
    }

    /// Registers a job for the tenant itself (over HTTP or Redis): paced to
    /// [`StateConfig::job_registrations_per_second`], and refused while the tenant's usage
    /// records cannot leave (the gate set by [`StateStore::gate_usage`]).
    pub fn register_paced(&self, tenant: &TenantId, job: &str) -> Result<(), StateError> {
        let per_second = self.config.job_registrations_per_second.max(1);
        let too_fast = || StateError::JobsTooFast { tenant: tenant.to_string(), per_second };
        if self.usage_gate.get().is_some_and(|behind| behind(tenant)) {
            return Err(too_fast());
        }
        self.with_tenant(tenant, |state, now| {
            // Ten seconds' worth at once, then `per_second`.
            let interval = 1_000_000_000 / per_second as u64;
            let due = state.registrations_due.max(now);
            if due - now >= 10_000_000_000 {
                return Err(too_fast());
            }
            state.registrations_due = due + interval;
            Ok(())
        })?;
        self.register(tenant, job)
    }

    /// Sets what says whether a tenant's usage records are not leaving (its telemetry is
    /// behind), so that it may not make more of them by registering jobs.
    pub fn gate_usage(&self, behind: impl Fn(&TenantId) -> bool + Send + Sync + 'static) {
        let _ = self.usage_gate.set(Box::new(behind));
    }

    /// Whether a job is registered.
    pub fn is_registered(&self, tenant: &TenantId, job: &str) -> bool {
        self.with_tenant(tenant, |state, _| state.jobs.contains_key(job))
    }

    /// Deregisters a job: drops its objects except persistent ones, which move to the tenant's
    /// standing storage. Returns the job's byte-seconds; its last usage record (from its last
    /// report, a boundary or its registration, up to now) is added to the pending records, so
    /// that its records sum to the returned figure. Costs the job's objects, not the tenant's.
    pub fn deregister(&self, tenant: &TenantId, job: &str) -> Result<ByteSeconds, StateError> {
        self.with_tenant(tenant, |state, now| {
            let Some(registered) = state.jobs.get_mut(job) else {
                return Err(StateError::JobNotRegistered(job.to_string()));
            };
            let keys = std::mem::take(&mut registered.objects);
            for key in keys {
                let object = state.objects.get(&key).expect("listed above");
                if !object.persist {
                    state.remove(&key, now, &self.used);
                    continue;
                }
                let (held, since) = (key.held(object.value.len() as u64), object.counted_since);
                state.jobs.get_mut(job).expect("checked").account.close(held, since, now);
                state.standing.open(held, now);
                let object = state.objects.get_mut(&key).expect("listed above");
                object.in_job = false;
                object.counted_since = now;
            }
            let mut ended = state.jobs.remove(job).expect("checked");
            let total = ended.account.integral(now);
            state.ended_jobs = state.ended_jobs + total;
            if let Some(record) = ended.reported.report(&ended.account, now, || Owner::Job(job.to_string())) {
                state.pending.push(record);
            }
            Ok(total)
        })
    }
}
