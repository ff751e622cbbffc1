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
//! Money is [`Decimal`](rust_decimal::Decimal); per-invocation costs keep full precision
//! ([`Billing::invocation_costs`]); each invoice line is rounded once, half to even, and the
//! total is the sum of the lines.
//!
//! The engine's parts: the rate card in force and the tenants' plans (`rate_card.rs`), the
//! billing run (`run.rs`: extraction, finalization, import and rebuild), the running totals
//! (`totals.rs`), invoices priced and stored (`invoicing.rs`), and whole-period reads of
//! records and their costs (`period_records.rs`).

pub mod api;
#[cfg(feature = "bench")]
pub mod bench;
pub mod db;
pub mod events;
mod extract;
pub mod invoice;
mod invoicing;
pub mod period;
mod period_records;
pub mod plans;
mod rate_card;
pub mod reconcile;
pub mod records;
mod run;
pub mod segments;
mod totals;
pub mod usage;

pub use invoicing::InvoiceSummary;
pub use period_records::RecordCost;
pub use rate_card::{Assignments, share};
pub use run::RunReport;

use std::time::Duration;

use collector::store::TelemetryStore;
use db::{Db, on_pool};

/// The rate card installed when none was applied: `examples/billing/plans.yml`.
pub const DEFAULT_RATE_CARD: &str = include_str!("../../examples/billing/plans.yml");

/// Spans read per extraction chunk from the collector's head (each chunk commits with its
/// watermark; a chunk that reaches into a block ends at that block's last arrival).
const CHUNK: i64 = 100_000;

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

/// Reads of a whole period of records that may run at once (see `Billing::whole_period_reads`).
pub const WHOLE_PERIOD_READS: usize = 2;

/// The billing engine over one database.
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
}
