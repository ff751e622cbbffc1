//! Invoices: lines per plan and metric from the usage totals, rounded once per line.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::period::{Period, rfc3339};
use crate::plans::{Metric, Plan, RateCard, prorate, round_money};
use crate::usage::Totals;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Draft,
    Final,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Final => "final",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineKind {
    /// Usage of the invoice's own period.
    Usage,
    /// Usage of an earlier, already final period that arrived late.
    Adjustment,
    /// The plan's minimum charge, topping up the usage lines.
    Minimum,
}

/// One invoice line. `amount` is `amount_exact` rounded half-even to the currency's minor unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub kind: LineKind,
    /// The period the usage happened in (the invoice's own, or an earlier one for adjustments).
    pub usage_period: String,
    pub plan: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    pub description: String,
    pub quantity: Decimal,
    pub unit: String,
    /// Free units applied.
    pub free: Decimal,
    /// Usage records behind the line.
    pub records: i64,
    pub amount_exact: Decimal,
    pub amount: Decimal,
}

/// An invoice: what the API serves and stores, byte for byte.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invoice {
    pub tenant: String,
    pub period: String,
    pub period_start: String,
    pub period_end: String,
    pub status: Status,
    pub currency: String,
    pub lines: Vec<Line>,
    pub total: Decimal,
}

/// Usage of one (period, plan) group on an invoice: its totals, and for adjustments the totals
/// of the same group billed on earlier invoices (the position in the graduated tiers).
#[derive(Debug, Clone, Default)]
pub struct Group {
    pub totals: Totals,
    pub billed_before: Totals,
    /// The share of the usage period the plan covered (prorating allowances, tiers, minimum).
    pub share: Decimal,
}

/// Prices the groups of one invoice. Keys: (usage period, plan).
pub fn build(
    tenant: &str,
    period: &Period,
    status: Status,
    card: &RateCard,
    groups: &BTreeMap<(String, String), Group>,
) -> Invoice {
    let currency = card.currency().to_string();
    let own = period.key();
    let mut usage_lines = Vec::new();
    let mut adjustment_lines = Vec::new();
    let mut minimum_lines = Vec::new();
    for ((usage_period, plan_name), group) in groups {
        let Some(plan) = card.plans.get(plan_name) else {
            tracing::warn!(tenant, plan = plan_name, "usage under a plan that is no longer in the rate card");
            continue;
        };
        let adjustment = *usage_period != own;
        let lines = lines_of(plan, plan_name, usage_period, group, adjustment, &currency);
        if adjustment {
            adjustment_lines.extend(lines);
            continue;
        }
        if let Some(minimum) = plan.minimum_charge {
            let minimum = round_money(prorate(minimum, group.share), &currency);
            let charged: Decimal = lines.iter().map(|l| l.amount).sum();
            if charged < minimum {
                let top_up = minimum - charged;
                minimum_lines.push(Line {
                    kind: LineKind::Minimum,
                    usage_period: usage_period.clone(),
                    plan: plan_name.clone(),
                    metric: None,
                    description: format!("minimum charge of plan {plan_name} ({minimum} {currency})"),
                    quantity: Decimal::ONE,
                    unit: "period".into(),
                    free: Decimal::ZERO,
                    records: 0,
                    amount_exact: top_up,
                    amount: money(top_up, &currency),
                });
            }
        }
        usage_lines.extend(lines);
    }
    let lines: Vec<Line> = usage_lines.into_iter().chain(minimum_lines).chain(adjustment_lines).collect();
    let total = money(lines.iter().map(|l| l.amount).sum(), &currency);
    Invoice {
        tenant: tenant.to_string(),
        period: own,
        period_start: rfc3339(period.start_ns()),
        period_end: rfc3339(period.end_ns()),
        status,
        currency,
        lines,
        total,
    }
}

fn lines_of(
    plan: &Plan,
    plan_name: &str,
    usage_period: &str,
    group: &Group,
    adjustment: bool,
    currency: &str,
) -> Vec<Line> {
    let mut lines = Vec::new();
    for metric in Metric::ALL {
        let Some(price) = plan.prices.get(&metric) else { continue };
        let raw = group.totals.quantity(metric);
        if raw.is_zero() {
            continue;
        }
        let before = price.in_unit(metric, group.billed_before.quantity(metric));
        let quantity = price.in_unit(metric, raw);
        let exact = price.cost_between(before, before + quantity, group.share);
        let free = price.free_applied(before + quantity, group.share) - price.free_applied(before, group.share);
        let (unit, _) = price.unit(metric);
        let description = if adjustment {
            format!("{} in {usage_period} (late usage, period already final)", metric.name())
        } else {
            metric.name().to_string()
        };
        lines.push(Line {
            kind: if adjustment { LineKind::Adjustment } else { LineKind::Usage },
            usage_period: usage_period.to_string(),
            plan: plan_name.to_string(),
            metric: Some(metric),
            description,
            quantity,
            unit: unit.to_string(),
            free: free.normalize(),
            records: group.totals.records,
            amount_exact: exact.normalize(),
            amount: money(exact, currency),
        });
    }
    lines
}

/// Money rounded and shown with exactly the currency's minor digits (`5.00`).
fn money(amount: Decimal, currency: &str) -> Decimal {
    let mut rounded = round_money(amount, currency);
    rounded.rescale(crate::plans::minor_unit_digits(currency));
    rounded
}

impl Invoice {
    /// The stored and served JSON (field order fixed by the struct; decimals as strings).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("an invoice serializes") + "\n"
    }

    /// CSV: one row per line, then the total.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "tenant,period,status,kind,usage_period,plan,metric,description,quantity,unit,free,records,amount_exact,amount,currency\n",
        );
        for line in &self.lines {
            let fields = [
                self.tenant.clone(),
                self.period.clone(),
                self.status.as_str().to_string(),
                serde_json::to_value(line.kind).expect("kind").as_str().unwrap_or_default().to_string(),
                line.usage_period.clone(),
                line.plan.clone(),
                line.metric.map_or("", |m| m.name()).to_string(),
                line.description.clone(),
                line.quantity.to_string(),
                line.unit.clone(),
                line.free.to_string(),
                line.records.to_string(),
                line.amount_exact.to_string(),
                line.amount.to_string(),
                self.currency.clone(),
            ];
            out.push_str(&fields.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
            out.push('\n');
        }
        out.push_str(&format!(
            "{},{},{},total,,,,,,,,,,{},{}\n",
            csv_field(&self.tenant),
            self.period,
            self.status.as_str(),
            self.total,
            self.currency
        ));
        out
    }
}

/// RFC 4180 quoting where needed.
fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}
