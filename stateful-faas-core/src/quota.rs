//! Per-tenant quotas that a plan may change. Each resource keeps its platform default (the
//! `--tenant-…` flags, in [`crate::CoreConfig`]); [`Quotas`] holds what tenants' plans say
//! instead, set by whoever follows the rate card (`sfaas up` does, every few seconds). A limit
//! a plan leaves out is the default.

use std::collections::HashMap;
use std::sync::RwLock;

/// A plan's limits on what the core holds for a tenant; `None` is the platform default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub functions: Option<u64>,
    pub flows: Option<u64>,
    pub instances: Option<u64>,
    pub async_calls: Option<u64>,
    pub async_bytes: Option<u64>,
    pub state_bytes: Option<u64>,
    pub state_jobs: Option<u64>,
}

/// The limits of every tenant's plan.
#[derive(Debug, Default)]
pub struct Quotas {
    plans: RwLock<Plans>,
}

#[derive(Debug, Default)]
struct Plans {
    /// The default plan's, for tenants assigned none.
    fallback: Limits,
    tenants: HashMap<String, Limits>,
}

impl Quotas {
    /// The limits of `tenant`'s plan.
    pub fn of(&self, tenant: &str) -> Limits {
        let plans = self.plans.read().unwrap();
        plans.tenants.get(tenant).copied().unwrap_or(plans.fallback)
    }

    /// Replaces every plan's limits: `fallback` for tenants not in `tenants`. What a tenant
    /// already holds beyond a lowered limit stays; only new requests are refused.
    pub fn set(&self, fallback: Limits, tenants: HashMap<String, Limits>) {
        *self.plans.write().unwrap() = Plans { fallback, tenants };
    }
}

/// A limit as a count, saturating (a plan's limit is at most `i64::MAX`).
pub fn count(limit: u64) -> usize {
    usize::try_from(limit).unwrap_or(usize::MAX)
}
