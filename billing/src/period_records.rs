//! Reads of a tenant's whole period of usage records, one by one: the records as stored (for
//! exports) and each record's cost at full precision. They hold the period in memory, so
//! [`WHOLE_PERIOD_READS`](crate::WHOLE_PERIOD_READS) of them run at a time.

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde::Serialize;

use crate::period::Period;
use crate::plans::Position;
use crate::usage::{self, Totals, UsageRecord};
use crate::{Billing, Result, segments};

/// The cost of one usage record, at full precision.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecordCost {
    pub usage_id: String,
    pub kind: usage::Kind,
    pub function: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_run: Option<String>,
    /// The caller's call id (invocations): the attempts of one call share it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
    pub trace_id: String,
    pub span_id: String,
    pub start_ns: i64,
    pub usage_period: String,
    pub plan: String,
    pub cpu_ms: i64,
    pub bytes_out: i64,
    pub log_bytes: i64,
    pub state_byte_seconds: Decimal,
    pub cost: Decimal,
}

impl Billing {
    /// The cost of every usage record billed on a tenant's invoice for `period`, at full
    /// precision. Within a (usage period, plan) group, records are priced in time order
    /// (start, then id) from the group's [`Position`]: record i costs
    /// `charge(before + q₁…qᵢ) − charge(before + q₁…qᵢ₋₁)` per metric, so the costs of a line's
    /// records add up to its exact amount, and free allowances and cheaper tiers go to the
    /// period's first usage.
    pub async fn invocation_costs(&self, tenant: &str, period: &str) -> Result<Vec<RecordCost>> {
        let _turn = self.whole_period_reads.acquire().await.expect("never closed");
        let card = self.rate_card().await?;
        let invoice_period = Period::parse(card.period, period)?;
        let groups = self.groups(&card, tenant, invoice_period).await?;
        let mut by_group: HashMap<(String, String), Vec<RecordCost>> = HashMap::new();
        segments::scan(
            &self.db,
            Some(tenant),
            false,
            |segment| segment.billed_period == period,
            |_, bytes, _| {
                segments::each(bytes, |r| {
                    let cost = RecordCost {
                        usage_id: r.usage_id.into(),
                        kind: r.kind,
                        function: r.function.into(),
                        flow_run: r.flow_run.map(str::to_owned),
                        call_id: r.call_id.map(str::to_owned),
                        trace_id: r.trace_id.into(),
                        span_id: r.span_id.into(),
                        start_ns: r.start_ns,
                        usage_period: r.period.into(),
                        plan: r.plan.into(),
                        cpu_ms: r.cpu_ms,
                        bytes_out: r.bytes_out,
                        log_bytes: r.log_bytes,
                        state_byte_seconds: r.state_decimal()?,
                        cost: Decimal::ZERO,
                    };
                    by_group.entry((cost.usage_period.clone(), cost.plan.clone())).or_default().push(cost);
                    Ok(())
                })
            },
        )
        .await?;
        let mut out = Vec::new();
        for (key, group) in &groups {
            let (Some(plan), Some(mut rows)) = (card.plans.get(&key.1), by_group.remove(key)) else { continue };
            rows.sort_unstable_by(|a, b| (a.start_ns, &a.usage_id).cmp(&(b.start_ns, &b.usage_id)));
            let mut position = Position::new(plan, group.share, |metric| group.billed_before.quantity(metric));
            for mut record in rows {
                let mut totals = Totals::default();
                if record.kind == usage::Kind::Invocation {
                    totals.invocations = 1;
                }
                totals.cpu_ms = record.cpu_ms;
                totals.bytes_out = record.bytes_out;
                totals.log_bytes = record.log_bytes;
                totals.state_byte_seconds = record.state_byte_seconds;
                record.cost = position.price(|metric| totals.quantity(metric)).normalize();
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Usage records of a tenant's period (for exports), in time order.
    pub async fn records(&self, tenant: &str, period: &str) -> Result<Vec<UsageRecord>> {
        let _turn = self.whole_period_reads.acquire().await.expect("never closed");
        let mut out = Vec::new();
        // Late usage is billed on a later invoice, never an earlier one.
        segments::scan(
            &self.db,
            Some(tenant),
            false,
            |segment| segment.billed_period.as_str() >= period,
            |segment, bytes, _| {
                segments::each(bytes, |r| {
                    if r.period == period {
                        out.push(r.to_record(tenant, &segment.billed_period)?);
                    }
                    Ok(())
                })
            },
        )
        .await?;
        out.sort_unstable_by(|a, b| (a.start_ns, &a.usage_id).cmp(&(b.start_ns, &b.usage_id)));
        Ok(out)
    }
}
