//! The billing run: the spans that arrived since the watermark become usage records and running
//! totals, chunk by chunk (`extract.rs`), the invoices they touch are priced again, and periods
//! past their grace window are finalized; besides it, importing records, rebuilding every total,
//! and merging the usage segments, all under the run lock.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::db::{Db, on_pool};
use crate::invoice::Status;
use crate::period::{Period, PeriodKind};
use crate::plans::RateCard;
use crate::totals::add_totals;
use crate::usage::{Totals, TotalsKey, UsageRecord};
use crate::{Billing, BillingError, Result, extract, segments};

/// What one billing run did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct RunReport {
    /// Metered spans read since the last run.
    pub spans_read: u64,
    /// New usage records.
    pub records: u64,
    /// Of which billed on a later invoice because their period was already final.
    pub late_records: u64,
    /// Spans that named usage already recorded (duplicate deliveries).
    pub duplicates: u64,
    /// Metered spans that could not be read as usage (logged, skipped).
    pub malformed: u64,
    pub invoices_updated: u64,
    pub invoices_finalized: u64,
    /// Spans that arrived up to this time (ms since the epoch) are billed.
    pub watermark_ms: i64,
}

impl Billing {
    /// The last period that is final (periods up to it are immutable).
    pub(crate) async fn finalized_through(&self, kind: PeriodKind) -> Result<Option<Period>> {
        match self.setting("finalized_through").await? {
            Some(key) => Ok(Some(Period::parse(kind, &key)?)),
            None => Ok(None),
        }
    }

    /// Bills what arrived since the last run, refreshes the draft invoices it touched, and
    /// finalizes periods whose grace window is over as of `now_ns` (default: now).
    pub async fn run(&self, now: Option<i64>) -> Result<RunReport> {
        let _running = self.run_lock.lock().await;
        let card = self.rate_card().await?;
        let clock_now = self.now_ns();
        if now.is_some_and(|t| t > clock_now) {
            return Err(BillingError::RunInFuture);
        }
        let now = now.unwrap_or(clock_now);
        let upto_ms = now / 1_000_000 - self.settle.as_millis() as i64 - 1;
        let mut report = RunReport::default();
        let mut touched: HashSet<(String, String)> = HashSet::new();
        let mut watermark: i64 = self.setting("watermark_ms").await?.and_then(|w| w.parse().ok()).unwrap_or(i64::MIN);
        let final_through = self.finalized_through(card.period).await?;
        // Chunks are read and parsed by a task of their own, one ahead of the chunk being written
        // (a bounded channel: at most three chunks in memory); each chunk is written, with the
        // watermark, in its own transaction, in order.
        let (sender, mut prepared) = tokio::sync::mpsc::channel(1);
        let mut reader = tokio::task::JoinSet::new(); // aborted if this run fails
        reader.spawn({
            let (telemetry, kind, spans) = (self.telemetry.clone(), card.period, self.chunk_spans);
            async move {
                let mut after = watermark;
                while after < upto_ms {
                    let chunk = match telemetry.metered_chunk_end(after, upto_ms, spans).await {
                        Ok(end) => extract::prepare(&telemetry, kind, final_through, after, end).await,
                        Err(error) => Err(error.into()),
                    };
                    after = chunk.as_ref().map_or(upto_ms, extract::Prepared::upto_ms);
                    if sender.send(chunk).await.is_err() {
                        return;
                    }
                }
            }
        });
        while let Some(chunk) = prepared.recv().await {
            let chunk = chunk?;
            let chunk_end = chunk.upto_ms();
            let chunk = extract::write(&self.db, &self.keys, &card.default_plan, chunk).await?;
            if chunk.malformed > 0 {
                tracing::warn!(spans = chunk.malformed, "metered spans that cannot be billed were skipped");
            }
            report.spans_read += chunk.candidates;
            report.malformed += chunk.malformed;
            report.records += chunk.records;
            report.late_records += chunk.late_records;
            report.duplicates += chunk.duplicates;
            touched.extend(chunk.totals.keys().map(|k| (k.tenant.clone(), k.billed_period.clone())));
            watermark = chunk_end;
        }
        report.watermark_ms = watermark;
        if report.records > 0 {
            self.changed().await?;
        }
        // Finalize every period whose grace window is over.
        let grace = i64::from(card.grace_hours) * 3_600_000_000_000;
        let mut due = final_through;
        let mut candidate = match final_through {
            Some(p) => p.next(),
            None => self.first_period(card.period).await?.unwrap_or(Period::containing(card.period, now)),
        };
        while candidate.end_ns() + grace <= now {
            due = Some(candidate);
            candidate = candidate.next();
        }
        for (tenant, period) in touched {
            let period = Period::parse(card.period, &period)?;
            self.price_invoice(&card, &tenant, period, Status::Draft).await?;
            report.invoices_updated += 1;
        }
        if let Some(due) = due
            && Some(due) != final_through
        {
            report.invoices_finalized = self.finalize_through(&card, due).await?;
        }
        Ok(report)
    }

    /// Merges the usage segments of every invoice whose level is full (`segments/`): run after
    /// billing runs, out of their way. Returns how many segments were merged away.
    pub async fn merge_segments(&self) -> Result<u64> {
        let _running = self.run_lock.lock().await;
        segments::merge_levels(&self.db, &self.keys).await
    }

    /// Makes every invoice up to and including `period` final (an operator closing a period
    /// before its grace window ends). The period must be over.
    pub async fn finalize(&self, period: &str) -> Result<u64> {
        let _running = self.run_lock.lock().await;
        let card = self.rate_card().await?;
        let period = Period::parse(card.period, period)?;
        if period.end_ns() > self.now_ns() {
            return Err(BillingError::PeriodOpen { period: period.to_string(), end: period.end().to_string() });
        }
        if self.finalized_through(card.period).await?.is_some_and(|f| f >= period) {
            return Ok(0);
        }
        self.finalize_through(&card, period).await
    }

    async fn finalize_through(&self, card: &RateCard, through: Period) -> Result<u64> {
        let sql = self.db.sql("SELECT tenant, period FROM invoices WHERE status = 'draft' AND period <= ?");
        let drafts: Vec<(String, String)> =
            on_pool!(&self.db, pool => sqlx::query_as(sql).bind(through.key()).fetch_all(pool).await?);
        for (tenant, period) in &drafts {
            let period = Period::parse(card.period, period)?;
            self.price_invoice(card, tenant, period, Status::Final).await?;
        }
        self.set_setting("finalized_through", &through.key()).await?;
        self.changed().await?;
        tracing::info!(through = %through, invoices = drafts.len(), "billing periods finalized");
        Ok(drafts.len() as u64)
    }

    async fn first_period(&self, kind: PeriodKind) -> Result<Option<Period>> {
        let sql = self.db.sql("SELECT MIN(period) FROM usage_totals");
        let first: Option<String> = on_pool!(&self.db, pool => sqlx::query_scalar(sql).fetch_one(pool).await?);
        Ok(first.map(|p| Period::parse(kind, &p)).transpose()?)
    }

    /// Stores usage records as extraction would (a record whose tenant and usage id are
    /// stored already is skipped, and so is a second copy in `records`), adds the new ones to the
    /// running totals, and returns how many were new. Invoices are priced by the next run or
    /// [`Billing::rebuild`]. For moving usage in from elsewhere, and for tests.
    pub async fn import(&self, records: &[UsageRecord]) -> Result<u64> {
        let _running = self.run_lock.lock().await;
        let states: Vec<String> = records.iter().map(|r| r.state_byte_seconds.to_string()).collect();
        let mut seen = HashSet::new();
        let stored: Vec<segments::New> = records
            .iter()
            .zip(&states)
            .filter(|(r, _)| seen.insert((&r.tenant, &r.usage_id)))
            .map(|(r, state)| (r.tenant.as_str(), r.billed_period.as_str(), segments::Stored::of(r, state)))
            .collect();
        let begin = if matches!(self.db, Db::Sqlite(_)) { "BEGIN IMMEDIATE" } else { "BEGIN" };
        on_pool!(&self.db, pool => {
            let mut tx = pool.begin_with(begin).await?;
            if matches!(self.db, Db::Postgres(_)) {
                // One writer of the totals and segments at a time, across processes.
                sqlx::query("SELECT pg_advisory_xact_lock(7305011)").execute(&mut *tx).await?;
            }
            let new = segments::store(&mut *tx, &self.keys, &stored).await?;
            let (delta, count, _) = segments::sum_new(&stored, &new)?;
            add_totals(&self.db, &mut tx, delta).await?;
            tx.commit().await?;
            self.changed().await?;
            Ok(count)
        })
    }

    /// Rebuilds every running total from the usage records (a full rating run; the normal
    /// path is incremental) and re-prices the invoices that are not final.
    pub async fn rebuild(&self) -> Result<u64> {
        let _running = self.run_lock.lock().await;
        let card = self.rate_card().await?;
        let mut totals: HashMap<TotalsKey, Totals> = HashMap::new();
        segments::scan(
            &self.db,
            None,
            false,
            |_| true,
            |segment, bytes, _| {
                // Summed under the segment's borrowed names, then into the owned keys.
                let mut sums: HashMap<[&str; 3], Totals> = HashMap::new();
                segments::each(bytes, |r| {
                    sums.entry([r.period, r.plan, r.function]).or_default().add(&r.totals()?);
                    Ok(())
                })?;
                for ([period, plan, function], sum) in sums {
                    let key = TotalsKey {
                        tenant: segment.tenant.clone(),
                        billed_period: segment.billed_period.clone(),
                        period: period.into(),
                        plan: plan.into(),
                        function: function.into(),
                    };
                    totals.entry(key).or_default().add(&sum);
                }
                Ok(())
            },
        )
        .await?;
        on_pool!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM usage_totals").execute(&mut *tx).await?;
            add_totals(&self.db, &mut tx, totals).await?;
            tx.commit().await?;
        });
        self.changed().await?;
        // Every invoice the totals name, except final ones (never rewritten).
        let final_through = self.finalized_through(card.period).await?;
        let sql = "SELECT DISTINCT tenant, billed_period FROM usage_totals";
        let invoices: Vec<(String, String)> = on_pool!(&self.db, pool => sqlx::query_as(sql).fetch_all(pool).await?);
        let mut priced = 0;
        for (tenant, period) in &invoices {
            let period = Period::parse(card.period, period)?;
            if final_through.is_none_or(|f| period > f) {
                self.price_invoice(&card, tenant, period, Status::Draft).await?;
                priced += 1;
            }
        }
        Ok(priced)
    }
}
