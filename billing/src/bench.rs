//! `sfaas bench billing`: rate a month of usage (10 million invocations across 100 tenants and
//! 1,000 functions by default), then bill 100k new invocations incrementally.
//!
//! - full run: every running total rebuilt from the usage records, every draft invoice priced
//!   ([`Billing::rebuild`]);
//! - incremental run: [`Billing::run`] on 100k new metered spans written through the
//!   collector's store: extraction (JSON attributes → records), de-duplication, totals, the
//!   invoices they touch.
//!
//! Peak memory is the process's resident high-water mark during each phase (reset through
//! `/proc/self/clear_refs` before it).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use collector::model::{Batch, SpanRow};
use collector::store::TelemetryStore;

use crate::db::{on_pool, value_groups};
use crate::period::{Period, PeriodKind};
use crate::{Billing, now_ns};

const TENANTS: usize = 100;
const FUNCTIONS_PER_TENANT: usize = 10;

pub async fn run(invocations: usize, new: usize, database_url: Option<String>) -> anyhow::Result<String> {
    let dir = tempfile_dir()?;
    let url = database_url.unwrap_or_else(|| format!("sqlite://{}", dir.join("bench.db").display()));
    let store = TelemetryStore::open(&url).await?;
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
    let period = Period::containing(PeriodKind::Month, now_ns());
    let (start, end) = (period.start_ns(), now_ns() - 60_000_000_000);
    let started = Instant::now();
    seed(&billing, invocations, start, end).await?;
    let seeding = started.elapsed();
    writeln!(out, "  seeding usage records (not timed below): {:.1} s", seeding.as_secs_f64())?;

    reset_peak_rss();
    let started = Instant::now();
    let invoices = billing.rebuild().await?;
    let full = started.elapsed();
    let full_rss = peak_rss_mib();
    writeln!(
        out,
        "  full run: {:.2} s ({:.0} records/s), {invoices} invoices, peak RSS {full_rss:.0} MiB",
        full.as_secs_f64(),
        invocations as f64 / full.as_secs_f64()
    )?;

    // New usage arrives as spans.
    let mut spans = Vec::with_capacity(5000);
    for i in 0..new {
        spans.push(span(invocations + i, start + (i as i64 % 1000) * 1_000_000, "bench-new"));
        if spans.len() == 5000 {
            store.write(&Batch { spans: std::mem::take(&mut spans), ..Batch::default() }).await?;
        }
    }
    store.write(&Batch { spans, ..Batch::default() }).await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    // A run that finds nothing new: the cost of an idle run.
    reset_peak_rss();
    let started = Instant::now();
    let report = billing.run(None).await?;
    let incremental = started.elapsed();
    let incremental_rss = peak_rss_mib();
    anyhow::ensure!(report.records == new as u64, "incremental run billed {} of {new} records", report.records);
    writeln!(
        out,
        "  incremental run: {new} new invocations in {:.3} s ({:.0} records/s, {} invoices updated), peak RSS {incremental_rss:.0} MiB",
        incremental.as_secs_f64(),
        new as f64 / incremental.as_secs_f64(),
        report.invoices_updated
    )?;
    let started = Instant::now();
    billing.run(None).await?;
    writeln!(out, "  idle run (nothing new): {:.1} ms", started.elapsed().as_secs_f64() * 1000.0)?;
    // The floor: the same number of records written straight into the table.
    let step = (end - start) / invocations.max(1) as i64;
    let started = Instant::now();
    insert_invocations(&billing, invocations + new..invocations + 2 * new, start, step).await?;
    let raw = started.elapsed();
    writeln!(
        out,
        "  raw inserts of {new} usage records (multi-row INSERT, no extraction): {:.3} s ({:.0} records/s); \
         incremental / raw: {:.1}×",
        raw.as_secs_f64(),
        new as f64 / raw.as_secs_f64(),
        incremental.as_secs_f64() / raw.as_secs_f64()
    )?;
    writeln!(out, "  full / incremental: {:.1}×", full.as_secs_f64() / incremental.as_secs_f64())?;
    on_pool!(billing.db(), pool => pool.close().await);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// Usage records written straight into the table (as extraction would have), in big
/// transactions; state intervals hourly per tenant too.
async fn seed(billing: &Billing, invocations: usize, start: i64, end: i64) -> anyhow::Result<()> {
    let step = (end - start) / invocations.max(1) as i64;
    insert_invocations(billing, 0..invocations, start, step).await?;
    state_and_plans(billing, start, end).await
}

const INSERT_RECORDS: &str = "INSERT INTO usage_records (tenant, usage_id, kind, function, flow_run, trace_id, span_id, \
     start_ns, end_ns, cpu_ms, wall_ms, memory_peak_bytes, bytes_in, bytes_out, status_code, state_byte_seconds, period, \
     billed_period, plan, received_ms) VALUES ";

/// Invocation records `ids`, written with multi-row inserts (1000 rows per statement, 50
/// statements per transaction).
async fn insert_invocations(
    billing: &Billing,
    ids: std::ops::Range<usize>,
    start: i64,
    step: i64,
) -> anyhow::Result<()> {
    const ROWS: usize = 1000;
    let head = INSERT_RECORDS;
    let period = Period::containing(PeriodKind::Month, start).key();
    let (mut done, invocations) = (ids.start, ids.end);
    let mut last_report = Instant::now();
    while done < invocations {
        // 50 statements per transaction.
        on_pool!(billing.db(), pool => {
            let mut tx = pool.begin().await?;
            for _ in 0..50 {
                if done == invocations {
                    break;
                }
                let rows = ROWS.min(invocations - done);
                let mut query = sqlx::query(billing.db().sql(&format!("{head}{}", value_groups(rows, 20))));
                for i in done..done + rows {
                    let tenant = format!("t{:03}", i % TENANTS);
                    let function = format!("f{}", (i / TENANTS) % FUNCTIONS_PER_TENANT);
                    let plan = if i % TENANTS < TENANTS / 2 { "free" } else { "pro" };
                    query = query
                        .bind(tenant).bind(format!("inv-{i}")).bind("invocation").bind(function).bind(None::<String>)
                        .bind(format!("{i:032x}")).bind(format!("{i:016x}")).bind(start + i as i64 * step)
                        .bind(start + i as i64 * step + 5_000_000).bind((i % 97) as i64).bind(5i64).bind(1i64 << 20)
                        .bind(200i64).bind((i % 4096) as i64).bind(if i % 50 == 0 { 500i64 } else { 200 }).bind("0")
                        .bind(period.clone()).bind(period.clone()).bind(plan).bind(0i64);
                }
                query.execute(&mut *tx).await?;
                done += rows;
            }
            tx.commit().await?;
        });
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("  seeding: {done} of {} records", invocations - ids.start);
            last_report = Instant::now();
        }
    }
    Ok(())
}

/// State records (each tenant's standing storage, one interval per hour) and plans.
async fn state_and_plans(billing: &Billing, start: i64, end: i64) -> anyhow::Result<()> {
    let head = INSERT_RECORDS;
    let period = Period::containing(PeriodKind::Month, start).key();
    let hours = ((end - start) / 3_600_000_000_000).max(1);
    let state_sql = format!("{head}{}", value_groups(TENANTS, 20));
    on_pool!(billing.db(), pool => {
        let mut tx = pool.begin().await?;
        for hour in 0..hours {
            let mut query = sqlx::query(billing.db().sql(&state_sql));
            for t in 0..TENANTS {
                let at = start + hour * 3_600_000_000_000;
                query = query
                    .bind(format!("t{t:03}")).bind(format!("state/standing/{at}")).bind("state").bind("")
                    .bind(None::<String>).bind(format!("{:032x}", at + t as i64)).bind(format!("{t:016x}"))
                    .bind(at).bind(at + 3_600_000_000_000).bind(0i64).bind(0i64).bind(0i64).bind(0i64).bind(0i64)
                    .bind(0i64).bind(format!("{}.{:09}", 3_600 * (1 << 20) * (t + 1), hour * 7 % 1_000_000_000))
                    .bind(period.clone()).bind(period.clone()).bind(if t < TENANTS / 2 { "free" } else { "pro" }).bind(0i64);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
    });
    for t in 0..TENANTS {
        billing.assign_plan(&format!("t{t:03}"), if t < TENANTS / 2 { "free" } else { "pro" }, Some(0)).await.ok();
    }
    Ok(())
}

fn span(i: usize, start_ns: i64, prefix: &str) -> SpanRow {
    let tenant = format!("t{:03}", i % TENANTS);
    let function = format!("f{}", (i / TENANTS) % FUNCTIONS_PER_TENANT);
    SpanRow {
        tenant: tenant.clone(),
        trace_id: format!("{i:032x}"),
        span_id: format!("{:016x}", i + 1),
        parent_span_id: None,
        name: format!("invoke {function}"),
        kind: 2,
        start_ns,
        end_ns: start_ns + 5_000_000,
        status_code: 0,
        status_message: String::new(),
        service_name: "sfaas-core".into(),
        attributes: serde_json::json!({
            "faas.name": function, "faas.invocation_id": format!("{prefix}-{i}"), "faas.trigger": "http",
            "faas.coldstart": false, "sfaas.cpu_ms": (i % 97) as i64, "sfaas.wall_ms": 5,
            "sfaas.memory.peak_bytes": 1 << 20, "sfaas.bytes_in": 200, "sfaas.bytes_out": (i % 4096) as i64,
            "http.response.status_code": 200, "sfaas.billable": true,
        })
        .to_string(),
        events: "[]".into(),
        links: "[]".into(),
        resource: serde_json::json!({"service.name": "sfaas-core", "service.namespace": tenant}).to_string(),
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
