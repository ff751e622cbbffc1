//! Invoices priced from the running totals (`invoice::build`, with what earlier invoices billed
//! of the same usage and each plan's share of its period), stored (a final invoice is never
//! rewritten), and read back.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::Serialize;

use crate::db::on_pool;
use crate::invoice::{self, Group, Invoice, Status};
use crate::period::Period;
use crate::plans::RateCard;
use crate::rate_card::share;
use crate::totals::decimal;
use crate::{Billing, BillingError, Result};

/// A stored invoice.
#[derive(Debug, Clone, Serialize)]
pub struct InvoiceSummary {
    pub tenant: String,
    pub period: String,
    pub status: String,
    pub currency: String,
    pub total: Decimal,
}

impl Billing {
    /// Prices one invoice from the totals and stores it (a final invoice is never rewritten).
    pub(crate) async fn price_invoice(
        &self,
        card: &RateCard,
        tenant: &str,
        period: Period,
        status: Status,
    ) -> Result<Invoice> {
        let invoice = self.rate_invoice_with(card, tenant, period, status).await?;
        let sql = self.db.sql(
            "INSERT INTO invoices (tenant, period, status, currency, total, document, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (tenant, period) DO UPDATE SET status = excluded.status, currency = excluded.currency, \
             total = excluded.total, document = excluded.document, updated_ms = excluded.updated_ms \
             WHERE invoices.status = 'draft'",
        );
        on_pool!(&self.db, pool => sqlx::query(sql)
            .bind(tenant).bind(period.key()).bind(invoice.status.as_str()).bind(&invoice.currency)
            .bind(invoice.total.to_string()).bind(invoice.to_json()).bind(self.now_ns() / 1_000_000)
            .execute(pool).await?.rows_affected());
        Ok(invoice)
    }

    /// Prices a tenant's invoice for a period from the usage records as they stand, without
    /// storing it: for a final period this reproduces the stored invoice byte for byte.
    pub async fn rate_invoice(&self, tenant: &str, period: &str) -> Result<Invoice> {
        let card = self.rate_card().await?;
        let period = Period::parse(card.period, period)?;
        let status = if self.finalized_through(card.period).await?.is_some_and(|f| period <= f) {
            Status::Final
        } else {
            Status::Draft
        };
        self.rate_invoice_with(&card, tenant, period, status).await
    }

    async fn rate_invoice_with(
        &self,
        card: &RateCard,
        tenant: &str,
        period: Period,
        status: Status,
    ) -> Result<Invoice> {
        let groups = self.groups(card, tenant, period).await?;
        Ok(invoice::build(tenant, &period, status, card, &groups))
    }

    /// The (usage period, plan) groups of an invoice, with what earlier invoices billed of the
    /// same groups (where late usage sits in the tiers) and the plan's share of the period.
    pub(crate) async fn groups(
        &self,
        card: &RateCard,
        tenant: &str,
        period: Period,
    ) -> Result<BTreeMap<(String, String), Group>> {
        let key = period.key();
        let mut groups: BTreeMap<(String, String), Group> = BTreeMap::new();
        for (k, totals) in self.totals(tenant, &key).await? {
            groups.entry((k.period, k.plan)).or_default().totals.add(&totals);
        }
        let assignments = self.plan_assignments().await?.remove(tenant).unwrap_or_default();
        let usage_periods: BTreeMap<String, ()> = groups.keys().map(|(p, _)| (p.clone(), ())).collect();
        for usage_period in usage_periods.keys() {
            if *usage_period != key {
                for (k, totals) in self
                    .totals_where("tenant = ? AND period = ? AND billed_period < ?", &[tenant, usage_period, &key])
                    .await?
                {
                    if let Some(group) = groups.get_mut(&(k.period, k.plan)) {
                        group.billed_before.add(&totals);
                    }
                }
            }
        }
        for ((usage_period, plan), group) in groups.iter_mut() {
            let usage_period = Period::parse(card.period, usage_period)?;
            group.share = share(&assignments, &card.default_plan, plan, usage_period);
        }
        Ok(groups)
    }

    /// A stored invoice.
    pub async fn invoice(&self, tenant: &str, period: &str) -> Result<Invoice> {
        let document = self.invoice_document(tenant, period).await?;
        serde_json::from_str(&document).map_err(|e| BillingError::Corrupt { what: "invoice", detail: e.to_string() })
    }

    /// The stored JSON of an invoice, byte for byte.
    pub async fn invoice_document(&self, tenant: &str, period: &str) -> Result<String> {
        let sql = self.db.sql("SELECT document FROM invoices WHERE tenant = ? AND period = ?");
        let document: Option<String> =
            on_pool!(&self.db, pool => sqlx::query_scalar(sql).bind(tenant).bind(period).fetch_optional(pool).await?);
        document.ok_or_else(|| BillingError::NotFound(format!("invoice of {tenant} for {period}")))
    }

    /// Invoices, of one tenant or all.
    pub async fn invoices(&self, tenant: Option<&str>) -> Result<Vec<InvoiceSummary>> {
        let sql = self.db.sql(
            "SELECT tenant, period, status, currency, total FROM invoices WHERE (? IS NULL OR tenant = ?) \
             ORDER BY period DESC, tenant",
        );
        let rows: Vec<(String, String, String, String, String)> =
            on_pool!(&self.db, pool => sqlx::query_as(sql).bind(tenant).bind(tenant).fetch_all(pool).await?);
        rows.into_iter()
            .map(|(tenant, period, status, currency, total)| {
                Ok(InvoiceSummary { tenant, period, status, currency, total: decimal(&total)? })
            })
            .collect()
    }
}
