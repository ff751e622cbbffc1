//! Billing: usage extraction, rate cards, rating, invoices, periods and exports (docs/contracts.md,
//! "Tenants, tokens and trust", "Telemetry contract" and "Billing contract").
//!
//! The data path: the collector stores metered spans → [`Billing::run`] turns the spans that
//! arrived since its watermark into usage records (one per invocation or state interval, never
//! two) and adds them to running totals → invoices are priced from the totals (graduated tiers
//! depend only on a total, so the cost of a run grows with new usage, not with history) → once
//! a period and its grace window are over, its invoices become final and immutable; usage that
//! arrives later is billed on the next invoice as an adjustment line naming its period.
//!
//! Money is [`Decimal`]; per-invocation costs keep full precision ([`Billing::invocation_costs`]);
//! each invoice line is rounded once, half to even, and the total is the sum of the lines.

pub mod api;
#[cfg(feature = "bench")]
pub mod bench;
pub mod db;
pub mod events;
mod extract;
pub mod invoice;
pub mod period;
pub mod plans;
pub mod reconcile;
pub mod records;
pub mod segments;
pub mod usage;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::Row;

use collector::store::TelemetryStore;
use db::{Db, on_pool, value_groups};
use invoice::{Group, Invoice, Status};
use period::{Period, PeriodKind};
use plans::{Position, RateCard};
use usage::{Totals, TotalsKey, UsageRecord};

/// The rate card installed when none was applied: `examples/billing/plans.yml`.
pub const DEFAULT_RATE_CARD: &str = include_str!("../../examples/billing/plans.yml");

/// Spans read per extraction chunk from the collector's head (each chunk commits with its
/// watermark; a chunk that reaches into a block ends at that block's last arrival).
const CHUNK: i64 = 100_000;
/// Rows per multi-row statement.
pub(crate) const ROWS_PER_STATEMENT: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// A rate card that does not parse or validate (the message says where).
    #[error("{0}")]
    InvalidRateCard(String),
    #[error("the billing {what} cannot change from {from} to {to} once usage is recorded")]
    Locked { what: &'static str, from: String, to: String },
    #[error("plans {0:?} are assigned to tenants and must stay")]
    PlansInUse(Vec<String>),
    #[error("no plan {plan:?} in the rate card (plans: {known:?})")]
    UnknownPlan { plan: String, known: Vec<String> },
    #[error(
        "tenant {tenant:?} has usage rated up to {rated_up_to}; a plan change takes effect after it (now or later)"
    )]
    PlanChangeTooEarly { tenant: String, rated_up_to: String },
    #[error("billing cannot run as of a time in the future")]
    RunInFuture,
    #[error("period {period} is not over yet (it ends {end})")]
    PeriodOpen { period: String, end: String },
    #[error(transparent)]
    Period(#[from] period::PeriodError),
    #[error("not found: {0}")]
    NotFound(String),
    /// Stored billing data that does not read back (a damaged database, or a bug): the
    /// operator's problem, never the caller's.
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("billing database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("billing schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Telemetry(#[from] collector::store::StoreError),
    /// Work handed to a blocking thread that did not finish (it panicked: a bug).
    #[error("billing task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

type Result<T, E = BillingError> = std::result::Result<T, E>;

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

/// A stored invoice.
#[derive(Debug, Clone, Serialize)]
pub struct InvoiceSummary {
    pub tenant: String,
    pub period: String,
    pub status: String,
    pub currency: String,
    pub total: Decimal,
}

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
    pub state_byte_seconds: Decimal,
    pub cost: Decimal,
}

/// The billing engine over one database.
/// Reads of a whole period of records that may run at once (see `Billing::whole_period_reads`).
pub const WHOLE_PERIOD_READS: usize = 2;

pub struct Billing {
    db: Db,
    /// The metered spans usage is extracted from.
    telemetry: TelemetryStore,
    /// What "now" is: the telemetry store's clock, which also stamps the spans' arrival.
    clock: collector::clock::Clock,
    /// Spans that arrived less than this long ago are left for the next run (their commit may
    /// still be under way).
    settle: Duration,
    /// Metered spans per extraction chunk (about; a chunk ends at a millisecond boundary).
    chunk_spans: i64,
    run_lock: tokio::sync::Mutex<()>,
    /// Reads that hold a whole period of a tenant's records in memory ([`Billing::records`],
    /// [`Billing::invocation_costs`]): [`WHOLE_PERIOD_READS`] at a time, so that many readers
    /// at once wait instead of holding many periods.
    whole_period_reads: tokio::sync::Semaphore,
    /// The usage segments' keys, for de-duplication.
    keys: segments::KeyCache,
    /// Bumped by every change of what billing computes (new usage, plans, finalization), so
    /// readers can cache derived figures such as per-invocation costs.
    version: std::sync::atomic::AtomicU64,
}

impl Billing {
    /// Billing over the telemetry store's database (its tables are created if missing).
    pub async fn open(store: &TelemetryStore) -> Result<Self> {
        let db = Db::open(store).await?;
        let billing = Self {
            db,
            telemetry: store.clone(),
            clock: store.clock().clone(),
            settle: Duration::from_secs(5),
            chunk_spans: CHUNK,
            run_lock: tokio::sync::Mutex::new(()),
            whole_period_reads: tokio::sync::Semaphore::new(WHOLE_PERIOD_READS),
            keys: segments::KeyCache::default(),
            version: std::sync::atomic::AtomicU64::new(0),
        };
        let converted = segments::convert_rows(&billing.db).await?;
        if converted > 0 {
            tracing::info!(records = converted, "usage records moved from rows into segments");
        }
        if billing.setting("rate_card").await?.is_none() {
            billing.apply_rate_card(DEFAULT_RATE_CARD).await?;
        }
        Ok(billing)
    }

    /// How long after arrival a span is billed (default 5 s; tests use less).
    pub fn set_settle(&mut self, settle: Duration) {
        self.settle = settle;
    }

    /// How long after arrival a span is billed.
    pub fn settle(&self) -> Duration {
        self.settle
    }

    /// How many metered spans an extraction chunk holds, about (default 100 000; tests use
    /// fewer to bill one run in many chunks).
    pub fn set_chunk_spans(&mut self, spans: i64) {
        self.chunk_spans = spans.max(1);
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Now, in nanoseconds since the epoch, as billing decides periods and finalization.
    pub fn now_ns(&self) -> i64 {
        self.clock.now_ns()
    }

    /// Changes with every change to usage, plans or invoices, made by this process or by any
    /// other billing the same database (a dashboard that does not bill itself still sees them):
    /// the stored generation, or this process's count if the database cannot be read.
    pub async fn version(&self) -> u64 {
        match self.setting("generation").await {
            Ok(stored) => stored.and_then(|g| g.parse().ok()).unwrap_or(0),
            Err(_) => self.version.load(std::sync::atomic::Ordering::SeqCst) | (1 << 63),
        }
    }

    /// Counts a change, here and in the database (for other processes' caches).
    async fn changed(&self) -> Result<()> {
        self.version.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sql = "INSERT INTO billing_settings (key, value) VALUES ('generation', '1') ON CONFLICT (key) \
                   DO UPDATE SET value = CAST(CAST(billing_settings.value AS BIGINT) + 1 AS TEXT)";
        on_pool!(&self.db, pool => sqlx::query(sql).execute(pool).await?.rows_affected());
        Ok(())
    }

    async fn setting(&self, key: &str) -> Result<Option<String>> {
        let sql = self.db.sql("SELECT value FROM billing_settings WHERE key = ?");
        Ok(on_pool!(&self.db, pool => sqlx::query_scalar(sql).bind(key).fetch_optional(pool).await?))
    }

    async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let sql = self.db.sql(
            "INSERT INTO billing_settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        );
        on_pool!(&self.db, pool => sqlx::query(sql).bind(key).bind(value).execute(pool).await?.rows_affected());
        Ok(())
    }

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

    /// The last period that is final (periods up to it are immutable).
    async fn finalized_through(&self, kind: PeriodKind) -> Result<Option<Period>> {
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

    /// Merges the usage segments of every invoice whose level is full (`segments.rs`): run after
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

    /// Totals of one tenant's invoice, by (usage period, plan, function).
    pub async fn totals(&self, tenant: &str, billed_period: &str) -> Result<BTreeMap<TotalsKey, Totals>> {
        self.totals_where("tenant = ? AND billed_period = ?", &[tenant, billed_period]).await
    }

    async fn totals_where(&self, condition: &str, binds: &[&str]) -> Result<BTreeMap<TotalsKey, Totals>> {
        let sql = self.db.sql(&format!(
            "SELECT tenant, billed_period, period, plan, function, records, invocations, errors, cpu_ms, wall_ms, \
             bytes_out, state_byte_seconds FROM usage_totals WHERE {condition}"
        ));
        on_pool!(&self.db, pool => {
            let mut query = sqlx::query(sql);
            for bind in binds {
                query = query.bind(*bind);
            }
            let rows = query.fetch_all(pool).await?;
            rows.iter().map(|row| Ok((
                TotalsKey {
                    tenant: row.try_get("tenant")?,
                    billed_period: row.try_get("billed_period")?,
                    period: row.try_get("period")?,
                    plan: row.try_get("plan")?,
                    function: row.try_get("function")?,
                },
                Totals {
                    records: row.try_get("records")?,
                    invocations: row.try_get("invocations")?,
                    errors: row.try_get("errors")?,
                    cpu_ms: row.try_get("cpu_ms")?,
                    wall_ms: row.try_get("wall_ms")?,
                    bytes_out: row.try_get("bytes_out")?,
                    state_byte_seconds: decimal(&row.try_get::<String, _>("state_byte_seconds")?)?,
                },
            ))).collect()
        })
    }

    /// Prices one invoice from the totals and stores it (a final invoice is never rewritten).
    async fn price_invoice(&self, card: &RateCard, tenant: &str, period: Period, status: Status) -> Result<Invoice> {
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
    async fn groups(&self, card: &RateCard, tenant: &str, period: Period) -> Result<BTreeMap<(String, String), Group>> {
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

    /// Usage of a tenant's period (whatever invoice it is billed on), by function.
    pub async fn usage_by_function(&self, tenant: &str, period: &str) -> Result<BTreeMap<String, Totals>> {
        let mut out: BTreeMap<String, Totals> = BTreeMap::new();
        for (key, totals) in self.totals_where("tenant = ? AND period = ?", &[tenant, period]).await? {
            out.entry(key.function).or_default().add(&totals);
        }
        Ok(out)
    }

    /// Tenants with usage or a plan.
    pub async fn tenants(&self) -> Result<Vec<String>> {
        let sql = "SELECT tenant FROM tenant_plans UNION SELECT tenant FROM usage_totals ORDER BY 1";
        Ok(on_pool!(&self.db, pool => sqlx::query_scalar(sql).fetch_all(pool).await?))
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

/// Adds sums to the totals rows (read, add, write back), inside the caller's transaction.
pub(crate) async fn add_totals<DB>(
    db: &Db,
    tx: &mut sqlx::Transaction<'_, DB>,
    delta: HashMap<TotalsKey, Totals>,
) -> Result<()>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments: sqlx::IntoArguments<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::ColumnIndex<DB::Row>,
{
    if delta.is_empty() {
        return Ok(());
    }
    let mut merged: BTreeMap<TotalsKey, Totals> = BTreeMap::new();
    let invoices: HashSet<(String, String)> =
        delta.keys().map(|k| (k.tenant.clone(), k.billed_period.clone())).collect();
    for (tenant, billed_period) in invoices {
        let sql = db.sql(
            "SELECT period, plan, function, records, invocations, errors, cpu_ms, wall_ms, bytes_out, state_byte_seconds \
             FROM usage_totals WHERE tenant = ? AND billed_period = ?",
        );
        let rows = sqlx::query(sql).bind(tenant.clone()).bind(billed_period.clone()).fetch_all(&mut **tx).await?;
        for row in rows {
            let key = TotalsKey {
                tenant: tenant.clone(),
                billed_period: billed_period.clone(),
                period: row.try_get("period")?,
                plan: row.try_get("plan")?,
                function: row.try_get("function")?,
            };
            if delta.contains_key(&key) {
                let existing = Totals {
                    records: row.try_get("records")?,
                    invocations: row.try_get("invocations")?,
                    errors: row.try_get("errors")?,
                    cpu_ms: row.try_get("cpu_ms")?,
                    wall_ms: row.try_get("wall_ms")?,
                    bytes_out: row.try_get("bytes_out")?,
                    state_byte_seconds: decimal(&row.try_get::<String, _>("state_byte_seconds")?)?,
                };
                merged.insert(key, existing);
            }
        }
    }
    for (key, totals) in delta {
        merged.entry(key).or_default().add(&totals);
    }
    let rows: Vec<_> = merged.into_iter().collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = db.sql(&format!(
            "INSERT INTO usage_totals (tenant, billed_period, period, plan, function, records, invocations, errors, \
             cpu_ms, wall_ms, bytes_out, state_byte_seconds) VALUES {} \
             ON CONFLICT (tenant, billed_period, period, plan, function) DO UPDATE SET records = excluded.records, \
             invocations = excluded.invocations, errors = excluded.errors, cpu_ms = excluded.cpu_ms, \
             wall_ms = excluded.wall_ms, bytes_out = excluded.bytes_out, state_byte_seconds = excluded.state_byte_seconds",
            value_groups(chunk.len(), 12)
        ));
        let mut query = sqlx::query(sql);
        for (k, t) in chunk {
            query = query
                .bind(k.tenant.clone())
                .bind(k.billed_period.clone())
                .bind(k.period.clone())
                .bind(k.plan.clone())
                .bind(k.function.clone())
                .bind(t.records)
                .bind(t.invocations)
                .bind(t.errors)
                .bind(t.cpu_ms)
                .bind(t.wall_ms)
                .bind(t.bytes_out)
                .bind(t.state_byte_seconds.to_string());
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

fn decimal(text: &str) -> Result<Decimal, sqlx::Error> {
    text.parse().map_err(|e| sqlx::Error::Decode(format!("{text:?} is not a decimal: {e}").into()))
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
