//! `sfaas bench billing`: bill a month of usage (10 million invocations across 100 tenants and
//! 1,000 functions by default), then bill 100k new invocations incrementally.
//!
//! - first run: the month's usage arrives as metered spans (`invoke` spans and hourly
//!   `state.usage` spans per tenant) through the collector's store, then one [`Billing::run`]
//!   bills all of it from scratch: extraction, de-duplication, totals, every invoice;
//! - re-rating: every running total rebuilt from the stored usage records and every draft
//!   invoice priced again ([`Billing::rebuild`]), no extraction;
//! - incremental run: [`Billing::run`] on 100k new metered spans: extraction of those only,
//!   de-duplication, totals, the invoices they touch.
//!
//! Peak memory is the process's resident high-water mark during each phase (reset through
//! `/proc/self/clear_refs` before it).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use collector::bench::process_cpu;
use collector::model::{Batch, SpanRow};
use collector::store::TelemetryStore;

use crate::Billing;
use crate::db::{on_pool, value_groups};
use crate::period::{Period, PeriodKind};

const TENANTS: usize = 100;
const FUNCTIONS_PER_TENANT: usize = 10;

pub async fn run(invocations: usize, new: usize, database_url: Option<String>) -> anyhow::Result<String> {
    let dir = tempfile_dir()?;
    let url = database_url.unwrap_or_else(|| format!("sqlite://{}", dir.join("bench.db").display()));
    let store = TelemetryStore::open_with_blocks(&url, &dir.join("blocks")).await?;
    let mut billing = Billing::open(&store).await?;
    billing.set_settle(Duration::ZERO);
    let backend = if url.starts_with("sqlite") { "SQLite" } else { "PostgreSQL" };
    let mut out = String::new();
    writeln!(
        out,
        "billing: {invocations} invocations over {TENANTS} tenants × {FUNCTIONS_PER_TENANT} functions, \
         rate card examples/billing/plans.yml, {backend}"
    )?;

    // This month, up to now, so that its invoices stay drafts.
    let now = billing.now_ns();
    let period = Period::containing(PeriodKind::Month, now);
    let (start, end) = (period.start_ns(), now - 60_000_000_000);
    let started = Instant::now();
    let step = (end - start) / invocations.max(1) as i64;
    let spans = seed(&billing, &store, invocations, start, step, end).await?;
    writeln!(
        out,
        "  writing {spans} metered spans through the collector's store (not timed below): {:.1} s",
        started.elapsed().as_secs_f64()
    )?;
    // The merges the seals made due, done before the timing (a server runs them in the
    // background; here they would take CPU and memory from the run measured).
    let started = Instant::now();
    let mut merged = 0;
    loop {
        match store.merge_span_blocks().await? {
            0 => break,
            blocks => merged += blocks,
        }
    }
    writeln!(out, "  merging {merged} span blocks (not timed below): {:.1} s", started.elapsed().as_secs_f64())?;
    tokio::time::sleep(Duration::from_millis(5)).await;

    let (report, first) = measured(billing.run(None)).await?;
    anyhow::ensure!(report.spans_read == spans, "the first run read {} of {spans} spans", report.spans_read);
    writeln!(
        out,
        "  first run (the month from its spans): {}, {} invoices",
        first.line(report.records),
        report.invoices_updated
    )?;

    // The usage segments' merges above level 0, which a server runs after each billing run.
    let (merged, merging) = measured(billing.merge_segments()).await?;
    writeln!(out, "  merging usage segments after it: {merged} merged away in {}", merging.line(report.records))?;

    let (invoices, full) = measured(billing.rebuild()).await?;
    writeln!(
        out,
        "  re-rating (totals rebuilt from the {} records): {}, {invoices} invoices",
        report.records,
        full.line(report.records)
    )?;

    // New usage arrives as spans.
    let fresh = (0..new).map(|i| span(invocations + i, start + (i as i64 % 1000) * 1_000_000, "bench-new"));
    write_spans(&store, fresh).await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (report, incremental) = measured(billing.run(None)).await?;
    anyhow::ensure!(report.records == new as u64, "incremental run billed {} of {new} records", report.records);
    writeln!(
        out,
        "  incremental run: {new} new invocations in {}, {} invoices updated",
        incremental.line(report.records),
        report.invoices_updated
    )?;
    let (merged, merging) = measured(billing.merge_segments()).await?;
    writeln!(out, "  merging usage segments after it: {merged} merged away in {}", merging.line(report.records))?;
    // A run that finds nothing new: the cost of an idle run.
    let started = Instant::now();
    billing.run(None).await?;
    writeln!(out, "  idle run (nothing new): {:.1} ms", started.elapsed().as_secs_f64() * 1000.0)?;
    // The row store's floor: as many records written straight into a table of rows.
    let started = Instant::now();
    insert_invocations(&billing, invocations + new..invocations + 2 * new, start, step).await?;
    let raw = started.elapsed();
    writeln!(
        out,
        "  raw inserts of {new} usage records into an empty table of rows (multi-row INSERT, no \
         extraction): {:.3} s ({:.0} records/s); \
         incremental / raw: {:.1}×",
        raw.as_secs_f64(),
        new as f64 / raw.as_secs_f64(),
        incremental.time.as_secs_f64() / raw.as_secs_f64()
    )?;
    writeln!(
        out,
        "  first run / incremental: {:.1}×; re-rating / incremental: {:.1}×",
        first.time.as_secs_f64() / incremental.time.as_secs_f64(),
        full.time.as_secs_f64() / incremental.time.as_secs_f64()
    )?;
    on_pool!(billing.db(), pool => pool.close().await);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// The month's usage as metered spans through the collector's store: `invocations` invoke
/// spans from `start`, `step` ns apart, and each tenant's standing state as one `state.usage`
/// span per hour up to `end`; plans assigned first. Returns the number of spans.
async fn seed(
    billing: &Billing,
    store: &TelemetryStore,
    invocations: usize,
    start: i64,
    step: i64,
    end: i64,
) -> anyhow::Result<u64> {
    for t in 0..TENANTS {
        billing.assign_plan(&format!("t{t:03}"), if t < TENANTS / 2 { "free" } else { "pro" }, Some(0)).await?;
    }
    let hours = ((end - start) / HOUR_NS).max(1);
    let invoke = (0..invocations).map(|i| span(i, start + i as i64 * step, "bench"));
    let state = (0..hours).flat_map(|hour| (0..TENANTS).map(move |t| standing_state(t, start + hour * HOUR_NS, hour)));
    write_spans(store, invoke.chain(state)).await
}

/// Writes spans through the collector's store, [`BATCH`] at a time, with a progress line every
/// 10 s; returns how many.
async fn write_spans(store: &TelemetryStore, spans: impl Iterator<Item = SpanRow>) -> anyhow::Result<u64> {
    let (mut batch, mut written, mut last_report) = (Vec::with_capacity(BATCH), 0, Instant::now());
    for span in spans {
        batch.push(span);
        if batch.len() == BATCH {
            store.write(&Batch { spans: std::mem::take(&mut batch), ..Batch::default() }).await?;
            written += BATCH as u64;
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!("  seeding: {written} spans written");
                last_report = Instant::now();
            }
        }
    }
    written += batch.len() as u64;
    store.write(&Batch { spans: batch, ..Batch::default() }).await?;
    Ok(written)
}

/// What one phase took: its time, the process's CPU time (s) and peak RSS (MiB) while it ran.
struct Cost {
    time: Duration,
    cpu: f64,
    rss: f64,
}

impl Cost {
    /// `12.34 s (81 000 records/s, CPU 13.1 s), peak RSS 120 MiB`
    fn line(&self, records: u64) -> String {
        let seconds = self.time.as_secs_f64();
        format!(
            "{seconds:.3} s ({:.0} records/s, CPU {:.2} s), peak RSS {:.0} MiB",
            records as f64 / seconds,
            self.cpu,
            self.rss
        )
    }
}

/// Runs one phase: its result and its [`Cost`].
async fn measured<T>(phase: impl Future<Output = crate::Result<T>>) -> anyhow::Result<(T, Cost)> {
    reset_peak_rss();
    let (started, cpu) = (Instant::now(), process_cpu());
    let out = phase.await?;
    Ok((out, Cost { time: started.elapsed(), cpu: process_cpu() - cpu, rss: peak_rss_mib() }))
}

const BATCH: usize = 5000;
const HOUR_NS: i64 = 3_600_000_000_000;

/// The columns of a usage record as a row (the layout before segments).
const RAW_COLUMNS: &str = "tenant TEXT NOT NULL, usage_id TEXT NOT NULL, kind TEXT NOT NULL, function TEXT NOT NULL, \
    flow_run TEXT, trace_id TEXT NOT NULL, span_id TEXT NOT NULL, start_ns BIGINT NOT NULL, end_ns BIGINT NOT NULL, \
    cpu_ms BIGINT NOT NULL, wall_ms BIGINT NOT NULL, memory_peak_bytes BIGINT NOT NULL, bytes_in BIGINT NOT NULL, \
    bytes_out BIGINT NOT NULL, status_code BIGINT NOT NULL, state_byte_seconds TEXT NOT NULL, period TEXT NOT NULL, \
    billed_period TEXT NOT NULL, plan TEXT NOT NULL, received_ms BIGINT NOT NULL, call_id TEXT, \
    PRIMARY KEY (tenant, usage_id)";

/// The row store's floor: invocation records `ids` written straight into a table of rows
/// (`bench_usage_rows`, the layout before segments) with multi-row inserts (1000 rows per
/// statement, 50 statements per transaction).
async fn insert_invocations(
    billing: &Billing,
    ids: std::ops::Range<usize>,
    start: i64,
    step: i64,
) -> anyhow::Result<()> {
    let without_rowid = if matches!(billing.db(), crate::db::Db::Sqlite(_)) { " WITHOUT ROWID" } else { "" };
    let create = format!("CREATE TABLE IF NOT EXISTS bench_usage_rows ({RAW_COLUMNS}){without_rowid}");
    on_pool!(billing.db(), pool => sqlx::query(sqlx::AssertSqlSafe(create)).execute(pool).await.map(drop)?);
    const ROWS: usize = 1000;
    let period = Period::containing(PeriodKind::Month, start).key();
    let (mut done, invocations) = (ids.start, ids.end);
    while done < invocations {
        // 50 statements per transaction.
        on_pool!(billing.db(), pool => {
            let mut tx = pool.begin().await?;
            for _ in 0..50 {
                if done == invocations {
                    break;
                }
                let rows = ROWS.min(invocations - done);
                let text = format!("INSERT INTO bench_usage_rows VALUES {}", value_groups(rows, 21));
                let mut query = sqlx::query(billing.db().sql(&text));
                for i in done..done + rows {
                    let tenant = format!("t{:03}", i % TENANTS);
                    let function = format!("f{}", (i / TENANTS) % FUNCTIONS_PER_TENANT);
                    let plan = if i % TENANTS < TENANTS / 2 { "free" } else { "pro" };
                    query = query
                        .bind(tenant).bind(format!("raw-{i:010}")).bind("invocation").bind(function).bind(None::<String>)
                        .bind(format!("{i:032x}")).bind(format!("{i:016x}")).bind(start + i as i64 * step)
                        .bind(start + i as i64 * step + 5_000_000).bind((i % 97) as i64).bind(5i64).bind(1i64 << 20)
                        .bind(200i64).bind((i % 4096) as i64).bind(if i % 50 == 0 { 500i64 } else { 200 }).bind("0")
                        .bind(period.clone()).bind(period.clone()).bind(plan).bind(0i64).bind(None::<String>);
                }
                query.execute(&mut *tx).await?;
                done += rows;
            }
            tx.commit().await?;
        });
    }
    Ok(())
}

/// A tenant's standing storage over one hour: a `state.usage` span as the core emits it.
fn standing_state(t: usize, at: i64, hour: i64) -> SpanRow {
    let tenant = format!("t{t:03}");
    let attributes = serde_json::json!({
        "sfaas.state.owner": "standing", "sfaas.usage_id": format!("state/standing/{at}"),
        "sfaas.state.byte_seconds": format!("{}.{:09}", 3_600 * (1 << 20) * (t + 1), hour * 7 % 1_000_000_000),
        "sfaas.billable": true,
    });
    let ids = (format!("{:032x}", at + t as i64), format!("{t:016x}"));
    core_span(tenant, ids, "state.usage".into(), 1, (at, at + HOUR_NS), attributes)
}

/// Invocation `i` as its metered `invoke` span, its execution id a UUID made of `prefix` and `i`.
fn span(i: usize, start_ns: i64, prefix: &str) -> SpanRow {
    let stem = prefix.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    let tenant = format!("t{:03}", i % TENANTS);
    let function = format!("f{}", (i / TENANTS) % FUNCTIONS_PER_TENANT);
    let attributes = serde_json::json!({
        "faas.name": function, "faas.invocation_id": format!("{stem:08x}-0000-7000-8000-{i:012x}"), "faas.trigger": "http",
        "faas.coldstart": false, "sfaas.cpu_ms": (i % 97) as i64, "sfaas.wall_ms": 5,
        "sfaas.memory.peak_bytes": 1 << 20, "sfaas.bytes_in": 200, "sfaas.bytes_out": (i % 4096) as i64,
        "http.response.status_code": 200, "sfaas.billable": true,
    });
    let ids = (format!("{i:032x}"), format!("{:016x}", i + 1));
    core_span(tenant, ids, format!("invoke {function}"), 2, (start_ns, start_ns + 5_000_000), attributes)
}

/// A root span of the core's (`sfaas-core`, the tenant's namespace), metered.
fn core_span(
    tenant: String,
    (trace_id, span_id): (String, String),
    name: String,
    kind: i64,
    (start_ns, end_ns): (i64, i64),
    attributes: serde_json::Value,
) -> SpanRow {
    SpanRow {
        resource: serde_json::json!({"service.name": "sfaas-core", "service.namespace": tenant}).to_string(),
        tenant,
        trace_id,
        span_id,
        parent_span_id: None,
        name,
        kind,
        start_ns,
        end_ns,
        status_code: 0,
        status_message: String::new(),
        service_name: "sfaas-core".into(),
        attributes: attributes.to_string(),
        events: "[]".into(),
        links: "[]".into(),
        scope: "{}".into(),
        metered: true,
    }
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("sfaas-bench-billing-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmHWM:")).map(|v| v.trim().trim_end_matches("kB").trim().to_string())
        })
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
