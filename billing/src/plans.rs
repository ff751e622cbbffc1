//! Rate cards: plans with a currency and a decimal unit price per metric, graduated tiers,
//! free allowances per period and an optional minimum charge (docs/contracts.md, "Billing contract").
//!
//! Prices are written as strings (`"0.0000002"`): a YAML float is inexact and is refused.

use std::collections::BTreeMap;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Deserializer, Serialize};

use crate::period::PeriodKind;

/// What is billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Invocations,
    CpuMs,
    StateByteSeconds,
    BytesOut,
    /// Bytes of the log lines the platform exported for a tenant's invocations.
    LogBytes,
}

impl Metric {
    pub const ALL: [Metric; 5] =
        [Metric::Invocations, Metric::CpuMs, Metric::StateByteSeconds, Metric::BytesOut, Metric::LogBytes];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Invocations => "invocations",
            Metric::CpuMs => "cpu_ms",
            Metric::StateByteSeconds => "state_byte_seconds",
            Metric::BytesOut => "bytes_out",
            Metric::LogBytes => "log_bytes",
        }
    }

    /// Units a price may be stated in, with how many raw units each holds (powers of ten
    /// only, so that converting stays exact).
    fn units(self) -> &'static [(&'static str, u32)] {
        match self {
            Metric::Invocations => &[("invocation", 0), ("1M invocations", 6)],
            Metric::CpuMs => &[("ms", 0), ("s", 3)],
            Metric::StateByteSeconds => &[("byte-s", 0), ("GB-s", 9)],
            Metric::BytesOut | Metric::LogBytes => &[("byte", 0), ("GB", 9)],
        }
    }
}

/// The whole rate card, as `sfaas plan apply -f plans.yml` takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateCard {
    /// `month` (calendar months, UTC; the default) or `day`.
    #[serde(default)]
    pub period: PeriodKind,
    /// How long an ended period's invoices stay `draft` before they become `final`.
    #[serde(default = "default_grace_hours")]
    pub grace_hours: u32,
    /// The plan of tenants that were assigned none.
    pub default_plan: String,
    pub plans: BTreeMap<String, Plan>,
}

fn default_grace_hours() -> u32 {
    72
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// ISO 4217 code; the minor unit (cents) decides the rounding of invoice lines.
    pub currency: String,
    /// Charged when the period's usage lines come to less (prorated for partial periods).
    #[serde(default, deserialize_with = "exact_option", skip_serializing_if = "Option::is_none")]
    pub minimum_charge: Option<Decimal>,
    pub prices: BTreeMap<Metric, Price>,
    /// What a tenant on this plan may hold and send, where it differs from the platform's
    /// defaults (the `--tenant-…` flags of `sfaas up`).
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
}

/// A plan's quotas. A limit left out is the platform's default; each is enforced where the
/// resource is (the gateway, the state store, the async queue, the collector), over the plan
/// in effect for the tenant now. Lowering one takes nothing away: what a tenant holds beyond
/// it stays, and only new functions, objects, calls or telemetry are refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Functions deployed (`--tenant-max-functions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub functions: Option<u64>,
    /// Flows deployed (`--tenant-max-flows`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<u64>,
    /// Managed `http` instances running at once (`--tenant-max-instances`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instances: Option<u64>,
    /// Async calls waiting or running (`--tenant-max-async-calls`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_calls: Option<u64>,
    /// Bytes of those calls' bodies (`--tenant-max-async-bytes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub async_bytes: Option<u64>,
    /// Bytes the state store holds, keys and overhead counted (`--state-tenant-quota-bytes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_bytes: Option<u64>,
    /// State jobs registered (`--state-tenant-max-jobs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_jobs: Option<u64>,
    /// Spans and log records ingested a second (`--tenant-ingest-spans-per-second`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest_spans_per_second: Option<u64>,
    /// Metric samples ingested a second (`--tenant-ingest-samples-per-second`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest_samples_per_second: Option<u64>,
    /// Bytes of telemetry stored a UTC day (`--tenant-ingest-bytes-per-day`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest_bytes_per_day: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// Each limit with its name in the rate card.
    pub fn named(&self) -> [(&'static str, Option<u64>); 10] {
        [
            ("functions", self.functions),
            ("flows", self.flows),
            ("instances", self.instances),
            ("async_calls", self.async_calls),
            ("async_bytes", self.async_bytes),
            ("state_bytes", self.state_bytes),
            ("state_jobs", self.state_jobs),
            ("ingest_spans_per_second", self.ingest_spans_per_second),
            ("ingest_samples_per_second", self.ingest_samples_per_second),
            ("ingest_bytes_per_day", self.ingest_bytes_per_day),
        ]
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// The unit quantities, allowances and tier bounds are stated in (default: the raw unit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Price of one unit when there are no tiers.
    #[serde(default, deserialize_with = "exact_option", skip_serializing_if = "Option::is_none")]
    pub unit_price: Option<Decimal>,
    /// Graduated tiers: each unit is priced by the tier it falls in; the last has no `up_to`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiers: Vec<Tier>,
    /// Units free per period, consumed first.
    #[serde(default, deserialize_with = "exact", skip_serializing_if = "Decimal::is_zero")]
    pub free: Decimal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    #[serde(default, deserialize_with = "exact_option", skip_serializing_if = "Option::is_none")]
    pub up_to: Option<Decimal>,
    #[serde(deserialize_with = "exact")]
    pub unit_price: Decimal,
}

/// A decimal written as a string or an integer; floats are refused (they are inexact).
fn exact<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Text(String),
        Float(f64),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Int(i) => Ok(Decimal::from(i)),
        Raw::Text(text) => text
            .trim()
            .parse::<Decimal>()
            .or_else(|_| Decimal::from_scientific(text.trim()))
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a decimal number"))),
        Raw::Float(f) => Err(serde::de::Error::custom(format!(
            "{f} is a floating-point number; write money and quantities as strings, for example \"{f}\""
        ))),
    }
}

fn exact_option<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Decimal>, D::Error> {
    exact(deserializer).map(Some)
}

/// Digits after the decimal point of a currency's minor unit (ISO 4217).
pub fn minor_unit_digits(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX" | "UYI" | "VND"
        | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// Rounds money to the currency's minor unit, half to even.
pub fn round_money(amount: Decimal, currency: &str) -> Decimal {
    amount.round_dp_with_strategy(minor_unit_digits(currency), RoundingStrategy::MidpointNearestEven)
}

/// Digits kept when prorating allowances, tier bounds and minimum charges.
pub const PRORATE_DIGITS: u32 = 9;

/// An allowance, tier bound or minimum charge prorated to the `share` of a period a plan
/// covered (1 for a whole period: unchanged).
pub fn prorate(value: Decimal, share: Decimal) -> Decimal {
    if share == Decimal::ONE { value } else { (value * share).round_dp(PRORATE_DIGITS) }
}

impl RateCard {
    /// Parses and checks a rate card (YAML or JSON).
    pub fn parse(text: &str) -> Result<Self, String> {
        let card: RateCard = serde_norway::from_str(text).map_err(|e| format!("rate card: {e}"))?;
        card.validate()?;
        Ok(card)
    }

    fn validate(&self) -> Result<(), String> {
        if self.plans.is_empty() {
            return Err("rate card: no plans".into());
        }
        if !self.plans.contains_key(&self.default_plan) {
            return Err(format!("rate card: default_plan {:?} is not one of the plans", self.default_plan));
        }
        for (name, plan) in &self.plans {
            let at = |what: String| format!("rate card: plan {name:?}: {what}");
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(at("plan names use letters, digits, - and _".into()));
            }
            if plan.currency.len() != 3 || !plan.currency.chars().all(|c| c.is_ascii_uppercase()) {
                return Err(at(format!("currency {:?} is not an ISO 4217 code like EUR", plan.currency)));
            }
            for (limit, value) in plan.limits.named() {
                if value.is_some_and(|v| v > i64::MAX as u64) {
                    return Err(at(format!("limits: {limit} must be at most {}", i64::MAX)));
                }
            }
            if plan.minimum_charge.is_some_and(|m| m.is_sign_negative()) {
                return Err(at("minimum_charge is negative".into()));
            }
            for (metric, price) in &plan.prices {
                let at = |what: String| at(format!("{}: {what}", metric.name()));
                if let Some(unit) = &price.unit
                    && !metric.units().iter().any(|(name, _)| name == unit)
                {
                    let known: Vec<_> = metric.units().iter().map(|(name, _)| *name).collect();
                    return Err(at(format!("unit {unit:?} is not one of {known:?}")));
                }
                match (&price.unit_price, price.tiers.is_empty()) {
                    (Some(_), false) => return Err(at("give unit_price or tiers, not both".into())),
                    (None, true) => return Err(at("give unit_price or tiers".into())),
                    _ => {}
                }
                if price.unit_price.is_some_and(|p| p.is_sign_negative()) || price.free.is_sign_negative() {
                    return Err(at("prices and allowances cannot be negative".into()));
                }
                let mut previous = Decimal::ZERO;
                for (i, tier) in price.tiers.iter().enumerate() {
                    let last = i + 1 == price.tiers.len();
                    match tier.up_to {
                        None if !last => return Err(at(format!("tier {}: only the last tier may omit up_to", i + 1))),
                        Some(_) if last => return Err(at("the last tier must omit up_to (it has no end)".into())),
                        Some(up_to) if up_to <= previous => {
                            return Err(at(format!("tier {}: up_to {up_to} must exceed {previous}", i + 1)));
                        }
                        Some(up_to) => previous = up_to,
                        None => {}
                    }
                    if tier.unit_price.is_sign_negative() {
                        return Err(at(format!("tier {}: negative unit_price", i + 1)));
                    }
                }
            }
        }
        let currencies: std::collections::BTreeSet<_> = self.plans.values().map(|p| p.currency.as_str()).collect();
        if currencies.len() > 1 {
            return Err(format!("rate card: all plans must use one currency, found {currencies:?}"));
        }
        if self.grace_hours > 24 * 90 {
            return Err("rate card: grace_hours must be at most 2160 (90 days)".into());
        }
        Ok(())
    }

    pub fn currency(&self) -> &str {
        &self.plans.values().next().expect("validated: at least one plan").currency
    }
}

impl Price {
    /// The unit's name and its size in raw units (10^digits).
    pub fn unit(&self, metric: Metric) -> (&'static str, u32) {
        let units = metric.units();
        self.unit.as_ref().and_then(|u| units.iter().find(|(name, _)| name == u)).copied().unwrap_or(units[0])
    }

    /// A raw quantity (ms, bytes, byte-seconds, invocations) in this price's unit, exactly.
    pub fn in_unit(&self, metric: Metric, raw: Decimal) -> Decimal {
        let (_, digits) = self.unit(metric);
        let mut quantity = raw;
        quantity.set_scale(raw.scale() + digits).expect("scale within 28 digits");
        quantity.normalize()
    }

    /// The charge for `quantity` units used in a period, the allowance and tier bounds scaled
    /// by `share` (the part of the period this plan covered; 1 for a whole period).
    /// Graduated: so the charge of a period depends only on its total (see [`Price::cost_between`]).
    pub fn charge(&self, quantity: Decimal, share: Decimal) -> Decimal {
        let billable = (quantity - prorate(self.free, share)).max(Decimal::ZERO);
        if let Some(price) = self.unit_price {
            return billable * price;
        }
        let mut amount = Decimal::ZERO;
        let mut lower = Decimal::ZERO;
        for tier in &self.tiers {
            let upper = tier.up_to.map(|up_to| prorate(up_to, share));
            let top = upper.map_or(billable, |u| billable.min(u));
            if top > lower {
                amount += (top - lower) * tier.unit_price;
            }
            match upper {
                Some(u) if billable > u => lower = u,
                _ => break,
            }
        }
        amount
    }

    /// The cost of the usage between cumulative quantities `from` and `to` (`from ≤ to`) of a
    /// period: `charge(to) − charge(from)`, so the costs of consecutive usage telescope to the
    /// charge of their total, at full precision.
    pub fn cost_between(&self, from: Decimal, to: Decimal, share: Decimal) -> Decimal {
        self.charge(to, share) - self.charge(from, share)
    }

    /// Where [`Price::charge`] changes slope: the end of the free allowance and the tier bounds
    /// after it, as cumulative quantities (prorated by `share`). Between two of them, usage
    /// costs the same wherever it falls.
    pub fn breakpoints(&self, share: Decimal) -> impl Iterator<Item = Decimal> + '_ {
        let free = prorate(self.free, share);
        let tiers = if self.unit_price.is_none() { self.tiers.as_slice() } else { &[] };
        std::iter::once(free).chain(tiers.iter().filter_map(|t| t.up_to).map(move |up_to| free + prorate(up_to, share)))
    }

    /// The free units applied to `quantity`.
    pub fn free_applied(&self, quantity: Decimal, share: Decimal) -> Decimal {
        quantity.min(prorate(self.free, share))
    }
}

/// Where the usage of one (usage period, plan) group stands in the plan's free allowances and
/// graduated tiers: the cumulative quantity of each priced metric, in its price's unit. Billing
/// prices a group's usage in time order from here, so allowances and cheaper tiers go to the
/// period's first usage and the costs add up to the invoice line's exact amount.
#[derive(Debug, Clone)]
pub struct Position<'a> {
    plan: &'a Plan,
    share: Decimal,
    cumulative: BTreeMap<Metric, Decimal>,
}

impl<'a> Position<'a> {
    /// The position after `before` (the raw quantity of each metric billed already, on earlier
    /// invoices), under `plan` covering `share` of the period.
    pub fn new(plan: &'a Plan, share: Decimal, before: impl Fn(Metric) -> Decimal) -> Self {
        let cumulative =
            plan.prices.iter().map(|(metric, price)| (*metric, price.in_unit(*metric, before(*metric)))).collect();
        Self { plan, share, cumulative }
    }

    /// The cost of `usage` (the raw quantity of each metric) priced here, without moving past it.
    pub fn cost(&self, usage: impl Fn(Metric) -> Decimal) -> Decimal {
        let mut cost = Decimal::ZERO;
        for (metric, price) in &self.plan.prices {
            let quantity = price.in_unit(*metric, usage(*metric));
            if quantity.is_zero() {
                continue;
            }
            let so_far = self.cumulative[metric];
            cost += price.cost_between(so_far, so_far + quantity, self.share);
        }
        cost
    }

    /// The cost of `usage` priced here; moves past it.
    pub fn price(&mut self, usage: impl Fn(Metric) -> Decimal) -> Decimal {
        let cost = self.cost(&usage);
        self.advance(usage);
        cost
    }

    /// Moves past `usage` without pricing it.
    pub fn advance(&mut self, usage: impl Fn(Metric) -> Decimal) {
        for (metric, price) in &self.plan.prices {
            *self.cumulative.get_mut(metric).expect("every priced metric") += price.in_unit(*metric, usage(*metric));
        }
    }

    /// Whether `usage` priced here crosses a breakpoint of a metric's charge: if not, each
    /// part of it costs the same, in whatever order the parts are priced.
    pub fn crosses_breakpoint(&self, usage: impl Fn(Metric) -> Decimal) -> bool {
        self.plan.prices.iter().any(|(metric, price)| {
            let from = self.cumulative[metric];
            let to = from + price.in_unit(*metric, usage(*metric));
            price.breakpoints(self.share).any(|point| from < point && point < to)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    const CARD: &str = r#"
default_plan: starter
plans:
  starter:
    currency: EUR
    minimum_charge: "5"
    prices:
      invocations: { unit_price: "0.0000002", free: 1000 }
      cpu_ms:
        free: 100
        tiers:
          - { up_to: 1000, unit_price: "0.001" }
          - { up_to: 5000, unit_price: "0.0005" }
          - { unit_price: "0.0001" }
      state_byte_seconds: { unit: GB-s, unit_price: "0.0000166667" }
"#;

    #[test]
    fn graduated_tiers_after_the_allowance() {
        let card = RateCard::parse(CARD).unwrap();
        let cpu = &card.plans["starter"].prices[&Metric::CpuMs];
        assert_eq!(cpu.charge(d("100"), Decimal::ONE), d("0"));
        // 1100 ms: 100 free, then 1000 in tier 1
        assert_eq!(cpu.charge(d("1100"), Decimal::ONE), d("1.000"));
        // 7100 ms: 100 free, 1000 × 0.001 + 4000 × 0.0005 + 2000 × 0.0001 = 1 + 2 + 0.2
        assert_eq!(cpu.charge(d("7100"), Decimal::ONE), d("3.2"));
        // half a period: 50 free, bounds 500 and 2500
        assert_eq!(cpu.charge(d("1050"), d("0.5")), d("0.5") + d("500") * d("0.0005"));
        let state = &card.plans["starter"].prices[&Metric::StateByteSeconds];
        assert_eq!(state.in_unit(Metric::StateByteSeconds, d("1500000000.5")), d("1.5000000005"));
    }

    #[test]
    fn a_position_prices_usage_after_what_came_before() {
        let card = RateCard::parse(CARD).unwrap();
        let plan = &card.plans["starter"];
        let cpu = &plan.prices[&Metric::CpuMs];
        assert_eq!(cpu.breakpoints(Decimal::ONE).collect::<Vec<_>>(), [d("100"), d("1100"), d("5100")]);
        assert_eq!(cpu.breakpoints(d("0.5")).collect::<Vec<_>>(), [d("50"), d("550"), d("2550")]);
        let cpu_ms = |ms: &str| {
            let ms = d(ms);
            move |metric| if metric == Metric::CpuMs { ms } else { Decimal::ZERO }
        };
        // 50 ms billed on an earlier invoice: 50 of the 100 free ms are left.
        let mut position = Position::new(plan, Decimal::ONE, cpu_ms("50"));
        assert!(!position.crosses_breakpoint(cpu_ms("50")));
        assert!(position.crosses_breakpoint(cpu_ms("51")));
        assert_eq!(position.cost(cpu_ms("150")), d("0.100"));
        assert_eq!(position.price(cpu_ms("50")), d("0"));
        assert_eq!(position.price(cpu_ms("7000")), cpu.cost_between(d("100"), d("7100"), Decimal::ONE));
        position.advance(cpu_ms("1000"));
        assert_eq!(position.cost(cpu_ms("10")), d("0.0010"));
    }

    #[test]
    fn refuses_floats_and_bad_cards() {
        let error = RateCard::parse(&CARD.replace("\"0.0000002\"", "0.0000002")).unwrap_err();
        assert!(error.contains("floating-point"), "{error}");
        let error = RateCard::parse(&CARD.replace("GB-s", "GiB-s")).unwrap_err();
        assert!(error.contains("unit \"GiB-s\""), "{error}");
        let error = RateCard::parse(&CARD.replace("default_plan: starter", "default_plan: pro")).unwrap_err();
        assert!(error.contains("default_plan"), "{error}");
        let error = RateCard::parse(&CARD.replace("up_to: 5000", "up_to: 500")).unwrap_err();
        assert!(error.contains("must exceed"), "{error}");
    }

    #[test]
    fn limits_are_whole_and_named() {
        let with =
            |limits: &str| CARD.replace("    minimum_charge", &format!("    limits: {{{limits}}}\n    minimum_charge"));
        let card = RateCard::parse(&with("functions: 10, ingest_bytes_per_day: 1000000")).unwrap();
        let limits = card.plans["starter"].limits;
        assert_eq!((limits.functions, limits.ingest_bytes_per_day, limits.flows), (Some(10), Some(1_000_000), None));
        let error = RateCard::parse(&with("function: 10")).unwrap_err();
        assert!(error.contains("unknown field `function`"), "{error}");
        let error = RateCard::parse(&with("flows: -1")).unwrap_err();
        assert!(error.contains("flows"), "{error}");
        let error = RateCard::parse(&with("flows: 1.5")).unwrap_err();
        assert!(error.contains("flows"), "{error}");
        let error = RateCard::parse(&with("state_bytes: 18446744073709551615")).unwrap_err();
        assert!(error.contains("state_bytes must be at most"), "{error}");
    }

    #[test]
    fn money_rounds_half_to_even_at_the_minor_unit() {
        assert_eq!(round_money(d("0.125"), "EUR"), d("0.12"));
        assert_eq!(round_money(d("0.135"), "EUR"), d("0.14"));
        assert_eq!(round_money(d("12.5"), "JPY"), d("12"));
        assert_eq!(round_money(d("0.0005"), "KWD"), d("0.000"));
    }
}
