//! The rate card in force and the tenants' plan assignments: stored in `billing_settings` and
//! `tenant_plans`, changed under the rules that keep rated usage as it was rated, and read
//! back (each tenant's limits now, each plan's share of a period).

use std::collections::BTreeMap;

use rust_decimal::Decimal;

use crate::db::on_pool;
use crate::period::{self, Period};
use crate::plans::{self, RateCard};
use crate::{Billing, BillingError, Result};

impl Billing {
    /// The rate card in force.
    pub async fn rate_card(&self) -> Result<RateCard> {
        let text = self.setting("rate_card").await?.ok_or_else(|| BillingError::NotFound("rate card".into()))?;
        serde_json::from_str(&text).map_err(|e| BillingError::Corrupt { what: "rate card", detail: e.to_string() })
    }

    /// Replaces the rate card (YAML or JSON). Plans that tenants use must stay; the period
    /// length cannot change once usage exists.
    pub async fn apply_rate_card(&self, text: &str) -> Result<RateCard> {
        let card = RateCard::parse(text).map_err(BillingError::InvalidRateCard)?;
        if let Some(old) = self.setting("rate_card").await? {
            let old: RateCard = serde_json::from_str(&old)
                .map_err(|e| BillingError::Corrupt { what: "rate card", detail: e.to_string() })?;
            let sql = self.db.sql("SELECT COUNT(*) FROM usage_segments");
            let records: i64 = on_pool!(&self.db, pool => sqlx::query_scalar(sql).fetch_one(pool).await?);
            if records > 0 && old.period != card.period {
                return Err(BillingError::Locked {
                    what: "period",
                    from: format!("{:?}", old.period),
                    to: format!("{:?}", card.period),
                });
            }
            if records > 0 && old.currency() != card.currency() {
                return Err(BillingError::Locked {
                    what: "currency",
                    from: old.currency().to_string(),
                    to: card.currency().to_string(),
                });
            }
            let sql = self.db.sql("SELECT DISTINCT plan FROM tenant_plans");
            let used: Vec<String> = on_pool!(&self.db, pool => sqlx::query_scalar(sql).fetch_all(pool).await?);
            let missing: Vec<String> = used.into_iter().filter(|p| !card.plans.contains_key(p)).collect();
            if !missing.is_empty() {
                return Err(BillingError::PlansInUse(missing));
            }
        }
        self.set_setting("rate_card", &serde_json::to_string(&card).expect("json")).await?;
        self.changed().await?;
        Ok(card)
    }

    /// Every plan assignment: tenant → [(effective from, ns; plan)].
    pub async fn plan_assignments(&self) -> Result<Assignments> {
        let rows = on_pool!(&self.db, pool => sqlx::query_as(PLAN_ASSIGNMENTS).fetch_all(pool).await?);
        Ok(assignments(rows))
    }

    /// Puts a tenant on a plan from `from_ns` (default now). Usage already rated is never
    /// re-rated: the change cannot take effect before usage the tenant already has.
    pub async fn assign_plan(&self, tenant: &str, plan: &str, from_ns: Option<i64>) -> Result<i64> {
        let card = self.rate_card().await?;
        if !card.plans.contains_key(plan) {
            let known = card.plans.keys().cloned().collect();
            return Err(BillingError::UnknownPlan { plan: plan.to_string(), known });
        }
        let from = from_ns.unwrap_or_else(|| self.now_ns());
        let sql = self.db.sql("SELECT MAX(last_start_ns) FROM usage_segments WHERE tenant = ?");
        let latest: Option<i64> =
            on_pool!(&self.db, pool => sqlx::query_scalar(sql).bind(tenant).fetch_one(pool).await?);
        if let Some(latest) = latest
            && latest >= from
        {
            return Err(BillingError::PlanChangeTooEarly {
                tenant: tenant.to_string(),
                rated_up_to: period::rfc3339(latest),
            });
        }
        let sql = self.db.sql(
            "INSERT INTO tenant_plans (tenant, effective_from_ns, plan) VALUES (?, ?, ?) \
             ON CONFLICT (tenant, effective_from_ns) DO UPDATE SET plan = excluded.plan",
        );
        on_pool!(&self.db, pool => sqlx::query(sql).bind(tenant).bind(from).bind(plan).execute(pool).await?.rows_affected());
        self.changed().await?;
        Ok(from)
    }

    /// Each tenant's limits as of now, from the plan in effect for it: the default plan's for
    /// tenants never assigned one, then each assigned tenant's.
    pub async fn limits_now(&self) -> Result<(plans::Limits, BTreeMap<String, plans::Limits>)> {
        let card = self.rate_card().await?;
        let now = self.now_ns();
        let of = |plan: &str| card.plans.get(plan).map(|p| p.limits).unwrap_or_default();
        let tenants = self
            .plan_assignments()
            .await?
            .into_iter()
            .map(|(tenant, history)| {
                let current = history.iter().rev().find(|(from, _)| *from <= now).map(|(_, plan)| plan.as_str());
                (tenant, of(current.unwrap_or(&card.default_plan)))
            })
            .collect();
        Ok((of(&card.default_plan), tenants))
    }
}

/// Plan assignments: tenant → [(effective from, ns; plan)], in time order.
pub type Assignments = BTreeMap<String, Vec<(i64, String)>>;

/// The rows of every plan assignment, for [`assignments`].
pub(crate) const PLAN_ASSIGNMENTS: &str =
    "SELECT tenant, effective_from_ns, plan FROM tenant_plans ORDER BY tenant, effective_from_ns";

pub(crate) fn assignments(rows: Vec<(String, i64, String)>) -> Assignments {
    let mut out = Assignments::new();
    for (tenant, from, plan) in rows {
        out.entry(tenant).or_default().push((from, plan));
    }
    out
}

/// The share of `period` during which `plan` was the tenant's plan (1 for all of it): how
/// allowances, tier bounds and minimums are prorated. Before its first assignment a tenant
/// counts as on its first plan.
pub fn share(assignments: &[(i64, String)], default_plan: &str, plan: &str, period: Period) -> Decimal {
    let (start, end) = (period.start_ns(), period.end_ns());
    let mut covered: i128 = 0;
    let mut segments: Vec<(i64, &str)> = Vec::new();
    if assignments.first().is_none_or(|(from, _)| *from > i64::MIN) {
        segments.push((i64::MIN, assignments.first().map_or(default_plan, |(_, p)| p.as_str())));
    }
    segments.extend(assignments.iter().map(|(from, p)| (*from, p.as_str())));
    for (i, (from, name)) in segments.iter().enumerate() {
        let until = segments.get(i + 1).map_or(i64::MAX, |(next, _)| *next);
        if *name == plan {
            let (a, b) = ((*from).max(start), until.min(end));
            if b > a {
                covered += i128::from(b - a);
            }
        }
    }
    let length = i128::from(end - start);
    if covered >= length {
        Decimal::ONE
    } else {
        Decimal::from_i128_with_scale(covered, 0) / Decimal::from_i128_with_scale(length, 0)
    }
}
