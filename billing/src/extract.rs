//! Extraction, inside the database: one `INSERT … SELECT … ON CONFLICT DO NOTHING RETURNING`
//! per chunk turns metered spans into usage records (the JSON attributes are read by the
//! database's own JSON functions; nothing is shipped to Rust and back), and the rows it returns
//! — the records that were new — are added to the running totals in the same transaction as the
//! watermark.
//!
//! What makes a span billable (DESIGN.md §4): an `invoke <function>` span with
//! `sfaas.billable = true` and a `faas.invocation_id`, or a `state.usage` span with a
//! `sfaas.usage_id` and decimal `sfaas.state.byte_seconds`. Anything else named like them is
//! counted as malformed and skipped. Among copies of one usage id, the first to arrive is kept
//! (ordered by arrival, then trace and span id).

use std::collections::HashMap;

use rust_decimal::Decimal;
use sqlx::Row;

use crate::db::{Db, on_pool};
use crate::period::{Period, PeriodKind};
use crate::usage::{Totals, TotalsKey};
use crate::{BillingError, Result};

/// What one chunk gave.
#[derive(Debug, Default)]
pub struct Chunk {
    /// Spans that claim to be billable.
    pub candidates: u64,
    /// Of which malformed.
    pub malformed: u64,
    /// New records, summed by totals key.
    pub totals: HashMap<TotalsKey, Totals>,
    pub records: u64,
    pub late_records: u64,
}

struct Dialect {
    sqlite: bool,
}

impl Dialect {
    fn text(&self, key: &str) -> String {
        if self.sqlite { format!("json_extract(s.a, '$.\"{key}\"')") } else { format!("(s.a ->> '{key}')") }
    }

    fn int(&self, key: &str) -> String {
        if self.sqlite {
            format!("COALESCE(CAST(json_extract(s.a, '$.\"{key}\"') AS INTEGER), 0)")
        } else {
            format!(
                "COALESCE(CASE WHEN jsonb_typeof(s.a -> '{key}') = 'number' THEN floor((s.a ->> '{key}')::numeric)::bigint END, 0)"
            )
        }
    }

    fn is_true(&self, key: &str) -> String {
        if self.sqlite {
            format!("json_type(s.a, '$.\"{key}\"') = 'true'")
        } else {
            format!("(s.a -> '{key}') = 'true'::jsonb")
        }
    }

    fn is_string(&self, key: &str) -> String {
        if self.sqlite {
            format!("json_type(s.a, '$.\"{key}\"') = 'text'")
        } else {
            format!("jsonb_typeof(s.a -> '{key}') = 'string'")
        }
    }

    fn is_decimal(&self, expression: &str) -> String {
        if self.sqlite {
            format!(
                "({expression} GLOB '[0-9]*' AND {expression} NOT GLOB '*[^0-9.]*' AND {expression} NOT GLOB '*.*.*')"
            )
        } else {
            // (No question mark: `Db::sql` turns those into placeholders.)
            format!("({expression} ~ '^[0-9]+(\\.[0-9]+){{0,1}}$')")
        }
    }

    fn period(&self, kind: PeriodKind) -> &'static str {
        match (self.sqlite, kind) {
            (true, PeriodKind::Month) => "strftime('%Y-%m', s.start_ns / 1000000000, 'unixepoch')",
            (true, PeriodKind::Day) => "strftime('%Y-%m-%d', s.start_ns / 1000000000, 'unixepoch')",
            (false, PeriodKind::Month) => {
                "to_char(to_timestamp(s.start_ns / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM')"
            }
            (false, PeriodKind::Day) => {
                "to_char(to_timestamp(s.start_ns / 1000000000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
        }
    }

    /// The chunk's metered spans with their attributes parsed once (`s.a`), as a CTE.
    fn spans(&self) -> &'static str {
        if self.sqlite {
            "WITH s AS MATERIALIZED (SELECT sp.tenant, sp.trace_id, sp.span_id, sp.name, sp.start_ns, sp.end_ns, \
             sp.received_ms, jsonb(sp.attributes) AS a FROM spans sp WHERE sp.metered = 1 AND sp.received_ms > ? \
             AND sp.received_ms <= ? AND (sp.name LIKE 'invoke %' OR sp.name = 'state.usage')) "
        } else {
            "WITH s AS MATERIALIZED (SELECT sp.tenant, sp.trace_id, sp.span_id, sp.name, sp.start_ns, sp.end_ns, \
             sp.received_ms, sp.attributes::jsonb AS a FROM spans sp WHERE sp.metered = 1 AND sp.received_ms > ? \
             AND sp.received_ms <= ? AND (sp.name LIKE 'invoke %' OR sp.name = 'state.usage')) "
        }
    }
}

/// A record the extraction inserted: a row of its `RETURNING` (tenant, billed_period, period,
/// plan, function, kind, status_code, cpu_ms, wall_ms, bytes_out, state_byte_seconds).
struct Inserted {
    key: TotalsKey,
    invocation: bool,
    status_code: i64,
    cpu_ms: i64,
    wall_ms: i64,
    bytes_out: i64,
    state: String,
}

impl Inserted {
    fn from_row<R: Row>(row: &R) -> Result<Self, sqlx::Error>
    where
        usize: sqlx::ColumnIndex<R>,
        for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
        for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    {
        Ok(Self {
            key: TotalsKey {
                tenant: row.try_get(0)?,
                billed_period: row.try_get(1)?,
                period: row.try_get(2)?,
                plan: row.try_get(3)?,
                function: row.try_get(4)?,
            },
            invocation: row.try_get::<String, _>(5)? == "invocation",
            status_code: row.try_get(6)?,
            cpu_ms: row.try_get(7)?,
            wall_ms: row.try_get(8)?,
            bytes_out: row.try_get(9)?,
            state: row.try_get(10)?,
        })
    }
}

/// Runs the extracting statement on SQLite through its C API and reads the records it returns.
async fn inserted_sqlite(
    connection: &mut sqlx::SqliteConnection,
    sql: &str,
    (after_ms, upto_ms, final_key, next_key): (i64, i64, &str, &str),
) -> Result<Vec<Inserted>> {
    use collector::sqlite::Value::{Int, Text};
    collector::sqlite::run(connection, |db| {
        let mut statement = db.prepare(sql)?;
        for (index, value) in (1..).zip([Int(after_ms), Int(upto_ms), Text(final_key), Text(next_key)]) {
            statement.bind(index, value)?;
        }
        let mut out = Vec::new();
        while statement.step()? {
            let text = |column| String::from_utf8_lossy(statement.text(column).unwrap_or_default()).into_owned();
            out.push(Inserted {
                key: TotalsKey {
                    tenant: text(0),
                    billed_period: text(1),
                    period: text(2),
                    plan: text(3),
                    function: text(4),
                },
                invocation: statement.text(5) == Some(b"invocation".as_slice()),
                status_code: statement.int(6),
                cpu_ms: statement.int(7),
                wall_ms: statement.int(8),
                bytes_out: statement.int(9),
                state: text(10),
            });
        }
        Ok(out)
    })
    .await
    .map_err(BillingError::Sqlite)
}

/// `(candidate, valid)` conditions.
fn conditions(d: &Dialect) -> (String, String) {
    let state = "s.name = 'state.usage'";
    let candidate = format!("({state} OR {})", d.is_true("sfaas.billable"));
    let valid = format!(
        "(CASE WHEN {state} THEN {usage_id} IS NOT NULL AND {bs_is_text} AND {is_decimal} \
         ELSE {invocation_id} IS NOT NULL END)",
        usage_id = d.text("sfaas.usage_id"),
        bs_is_text = d.is_string("sfaas.state.byte_seconds"),
        is_decimal = d.is_decimal(&d.text("sfaas.state.byte_seconds")),
        invocation_id = d.text("faas.invocation_id"),
    );
    (candidate, valid)
}

/// Extracts the spans that arrived in `(after_ms, upto_ms]` and moves the watermark to
/// `upto_ms`, in one transaction.
pub async fn chunk(
    db: &Db,
    kind: PeriodKind,
    default_plan: &str,
    final_through: Option<Period>,
    after_ms: i64,
    upto_ms: i64,
) -> Result<Chunk> {
    let d = Dialect { sqlite: matches!(db, Db::Sqlite(_)) };
    let (candidate, valid) = conditions(&d);
    let period = d.period(kind);
    // Late usage (its period is final) is billed on the first open period.
    let (final_key, next_key) = match final_through {
        Some(f) => (f.key(), f.next().key()),
        None => (String::new(), String::new()),
    };
    let plan_at = "COALESCE(\
        (SELECT p.plan FROM tenant_plans p WHERE p.tenant = s.tenant AND p.effective_from_ns <= s.start_ns \
         ORDER BY p.effective_from_ns DESC LIMIT 1), \
        (SELECT p.plan FROM tenant_plans p WHERE p.tenant = s.tenant ORDER BY p.effective_from_ns LIMIT 1))";
    let counts = format!(
        "{spans}SELECT COUNT(*) AS candidates, COALESCE(SUM(CASE WHEN {valid} THEN 0 ELSE 1 END), 0) AS malformed \
         FROM s WHERE {candidate}",
        spans = d.spans()
    );
    let in_range = "FROM spans sp WHERE sp.metered = 1 AND sp.received_ms > ? AND sp.received_ms <= ? \
         AND (sp.name LIKE 'invoke %' OR sp.name = 'state.usage')";
    let total = format!("SELECT COUNT(*) {in_range}");
    let pin = format!(
        "INSERT INTO tenant_plans (tenant, effective_from_ns, plan) SELECT DISTINCT sp.tenant, 0, ? {in_range} \
         AND NOT EXISTS (SELECT 1 FROM tenant_plans p WHERE p.tenant = sp.tenant) ON CONFLICT DO NOTHING"
    );
    let insert = format!(
        "{spans}INSERT INTO usage_records (tenant, usage_id, kind, function, flow_run, trace_id, span_id, start_ns, end_ns, \
         cpu_ms, wall_ms, memory_peak_bytes, bytes_in, bytes_out, status_code, state_byte_seconds, period, \
         billed_period, plan, received_ms) \
         SELECT s.tenant, \
           CASE WHEN s.name = 'state.usage' THEN {usage_id} ELSE {invocation_id} END, \
           CASE WHEN s.name = 'state.usage' THEN 'state' ELSE 'invocation' END, \
           CASE WHEN s.name = 'state.usage' THEN '' ELSE COALESCE({faas_name}, substr(s.name, 8)) END, \
           CASE WHEN s.name = 'state.usage' THEN (CASE WHEN {owner} = 'job' THEN {job} END) \
                ELSE COALESCE({run_id}, {job}) END, \
           s.trace_id, s.span_id, s.start_ns, s.end_ns, \
           {cpu}, {wall}, {memory}, {bytes_in}, {bytes_out}, {status}, \
           CASE WHEN s.name = 'state.usage' THEN {byte_seconds} ELSE '0' END, \
           {period}, \
           CASE WHEN {period} <= ? THEN ? ELSE {period} END, \
           {plan_at}, s.received_ms \
         FROM s WHERE {candidate} AND {valid} \
         ORDER BY s.received_ms, s.trace_id, s.span_id \
         ON CONFLICT (tenant, usage_id) DO NOTHING \
         RETURNING tenant, billed_period, period, plan, function, kind, status_code, cpu_ms, wall_ms, bytes_out, \
           state_byte_seconds",
        usage_id = d.text("sfaas.usage_id"),
        invocation_id = d.text("faas.invocation_id"),
        faas_name = d.text("faas.name"),
        owner = d.text("sfaas.state.owner"),
        job = d.text("sfaas.state.job"),
        run_id = d.text("sfaas.flow.run_id"),
        cpu = d.int("sfaas.cpu_ms"),
        wall = d.int("sfaas.wall_ms"),
        memory = d.int("sfaas.memory.peak_bytes"),
        bytes_in = d.int("sfaas.bytes_in"),
        bytes_out = d.int("sfaas.bytes_out"),
        status = d.int("http.response.status_code"),
        byte_seconds = d.text("sfaas.state.byte_seconds"),
        spans = d.spans(),
    );
    let watermark = db.sql(
        "INSERT INTO billing_settings (key, value) VALUES ('watermark_ms', ?) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    );
    // With no final period, `period <= ''` is never true.
    let mut out = Chunk::default();
    on_pool!(db, pool => {
        // SQLite: take the write lock first; a read that later upgrades to a write fails with
        // SQLITE_BUSY_SNAPSHOT when the collector committed in between (busy_timeout cannot wait
        // that out).
        let mut tx = if d.sqlite { pool.begin_with("BEGIN IMMEDIATE").await? } else { pool.begin().await? };
        if !d.sqlite {
            // One writer of the totals at a time, across processes (read-add-write below).
            sqlx::query("SELECT pg_advisory_xact_lock(7305011)").execute(&mut *tx).await?;
        }
        let total: i64 = sqlx::query_scalar(db.sql(&total)).bind(after_ms).bind(upto_ms).fetch_one(&mut *tx).await?;
        if total > 0 {
            sqlx::query(db.sql(&pin)).bind(default_plan).bind(after_ms).bind(upto_ms).execute(&mut *tx).await?;
            let binds = (after_ms, upto_ms, final_key.as_str(), next_key.as_str());
            // SQLite: the returned rows come through the C API (sqlx hands each row over from its
            // worker thread, a quarter of the run); the same statement either way.
            let sqlite = (&mut *tx as &mut dyn std::any::Any).downcast_mut::<sqlx::SqliteConnection>();
            let inserted = match sqlite {
                Some(connection) => inserted_sqlite(connection, &insert, binds).await?,
                None => {
                    let (after, upto, final_key, next_key) = binds;
                    let rows = sqlx::query(db.sql(&insert))
                        .bind(after)
                        .bind(upto)
                        .bind(final_key)
                        .bind(next_key)
                        .fetch_all(&mut *tx)
                        .await?;
                    rows.iter().map(Inserted::from_row).collect::<Result<Vec<_>, sqlx::Error>>()?
                }
            };
            for Inserted { key, invocation, status_code, cpu_ms, wall_ms, bytes_out, state } in inserted {
                let totals = out.totals.entry(key.clone()).or_default();
                totals.records += 1;
                if invocation {
                    totals.invocations += 1;
                    totals.errors += i64::from(status_code >= 500);
                }
                totals.cpu_ms += cpu_ms;
                totals.wall_ms += wall_ms;
                totals.bytes_out += bytes_out;
                if state != "0" {
                    totals.state_byte_seconds += state
                        .parse::<Decimal>()
                        .map_err(|e| BillingError::Invalid(format!("state byte-seconds {state:?}: {e}")))?;
                }
                out.records += 1;
                out.late_records += u64::from(key.period != key.billed_period);
            }
            crate::add_totals(db, &mut tx, out.totals.clone()).await?;
            out.candidates = total as u64;
            if out.records < out.candidates {
                // Some spans billed nothing: duplicates, malformed, or not billable. Tell them apart.
                let row = sqlx::query(db.sql(&counts)).bind(after_ms).bind(upto_ms).fetch_one(&mut *tx).await?;
                out.candidates = row.try_get::<i64, _>("candidates")? as u64;
                out.malformed = row.try_get::<i64, _>("malformed")? as u64;
            }
        }
        sqlx::query(watermark).bind(upto_ms.to_string()).execute(&mut *tx).await?;
        tx.commit().await?;
    });
    Ok(out)
}
