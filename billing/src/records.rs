//! Usage records summed for readers: the Prometheus API's usage and cost counters read
//! billing's records through these, by time bucket, by minute, by time slice and one by one.
//! The SQL over billing's tables is here and nowhere else.

use std::collections::HashMap;

use rust_decimal::Decimal;

use crate::db::Db;
use crate::plans::Metric;
use crate::{Billing, BillingError, Result};

/// The counters' resolution: a synthesized counter has a sample every whole minute.
pub const MINUTE_MS: i64 = 60_000;
const MINUTE_NS: i64 = MINUTE_MS * NS_PER_MS;

/// Runs `$sql` binding the strings `$binds` on whichever pool `$db` holds, and decodes every
/// row with `$decode` (compiled once per backend).
macro_rules! fetch {
    ($db:expr, $sql:expr, $binds:expr, |$row:ident| $decode:expr) => {
        fetch!($db, $sql, $binds, pg_setup = None, |$row| $decode)
    };
    // `pg_setup`: a statement run first in the same transaction on PostgreSQL (`SET LOCAL`).
    ($db:expr, $sql:expr, $binds:expr, pg_setup = $setup:expr, |$row:ident| $decode:expr) => {{
        let setup: Option<&'static str> = $setup;
        let db: &Db = $db;
        let text = db.sql($sql);
        let binds: &[&str] = $binds;
        macro_rules! run {
            ($pool:expr) => {{
                let mut query = sqlx::query(text);
                for bind in binds {
                    query = query.bind(*bind);
                }
                query
                    .fetch_all($pool)
                    .await?
                    .iter()
                    .map(|$row| -> std::result::Result<_, sqlx::Error> {
                        #[allow(unused_imports)]
                        use sqlx::Row as _;
                        Ok($decode)
                    })
                    .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?
            }};
        }
        match (db, setup) {
            (Db::Sqlite(pool), _) => run!(pool),
            (Db::Postgres(pool), None) => run!(pool),
            (Db::Postgres(pool), Some(setup)) => {
                let mut tx = pool.begin().await?;
                sqlx::query(setup).execute(&mut *tx).await?;
                let rows = run!(&mut *tx);
                tx.commit().await?;
                rows
            }
        }
    }};
}

const NS_PER_MS: i64 = 1_000_000;
/// Bucket of records that started at or after the last sample time.
pub const AFTER: i64 = -3;
/// Row kind of the aggregation: a `usage_totals` row (every record of its group and function).
const TOTALS: i64 = -9;
/// Row kind of the aggregation: billing's watermark as the statement saw it (in `first_ns`).
const WATERMARK: i64 = -8;
/// Interval patterns with more distinct phases than this are read minute by minute.
const MAX_PHASES: usize = 64;

/// The intervals records are grouped into: `[base + k·period + phases[j], next phase)` up to
/// `e1`, then `[e1, e2)`; bucket `-1` holds everything before `base`, `-2` `[e1, e2)`, and
/// [`AFTER`] what started at `e2` or later (read by no query; only subtracted).
#[derive(Debug, Clone)]
pub struct Lattice {
    base: i64,
    period: i64,
    phases: Vec<i64>,
    e1: i64,
    e2: i64,
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a.abs() } else { gcd(b, a % b) }
}

impl Lattice {
    /// Where the lattice begins (ms): every read time is at or after it.
    pub fn base(&self) -> i64 {
        self.base
    }

    /// The bucket of a whole minute (ms) that records started in: every lattice boundary is a
    /// whole minute, so a minute lies in one bucket, and buckets follow time order.
    pub fn bucket_of_minute(&self, minute: i64) -> i64 {
        if minute < self.base {
            -1
        } else if minute >= self.e2 {
            AFTER
        } else if minute >= self.e1 {
            -2
        } else {
            let offset = minute - self.base;
            let j = self.phases.partition_point(|p| *p <= offset % self.period) as i64 - 1;
            (offset / self.period) * self.phases.len() as i64 + j
        }
    }

    /// A lattice whose boundaries include every read time (`points`, sorted, all on the
    /// minute grid and at most `last`).
    pub fn new(points: &[i64], step: Option<i64>, last: i64) -> Self {
        let (e1, e2) = (last - MINUTE_MS, last);
        let inner: Vec<i64> = points.iter().copied().filter(|p| *p < e1).collect();
        let (Some(&base), Some(&top)) = (inner.first(), inner.last()) else {
            return Self { base: e1, period: MINUTE_MS, phases: vec![0], e1, e2 };
        };
        let span = top - base + MINUTE_MS;
        let mut candidates = Vec::new();
        if let Some(step) = step.filter(|s| *s > 0) {
            let lcm = step / gcd(step, MINUTE_MS) * MINUTE_MS;
            if lcm < span {
                candidates.push(lcm);
            }
        }
        candidates.push(span);
        for period in candidates {
            let mut phases: Vec<i64> = inner.iter().map(|p| (p - base) % period).collect();
            phases.sort_unstable();
            phases.dedup();
            if phases.len() <= MAX_PHASES {
                return Self { base, period, phases, e1, e2 };
            }
        }
        Self { base, period: MINUTE_MS, phases: vec![0], e1, e2 }
    }

    pub fn is_empty(&self) -> bool {
        self.base >= self.e1
    }

    /// The SQL expression of a record's bucket (from `{table}start_ns`).
    fn sql(&self, table: &str) -> String {
        let (b, e1) = (self.base * NS_PER_MS, self.e1 * NS_PER_MS);
        let start = format!("{table}start_ns");
        let e2 = self.e2 * NS_PER_MS;
        if self.is_empty() {
            return format!("CASE WHEN {start} < {b} THEN -1 WHEN {start} >= {e2} THEN {AFTER} ELSE -2 END");
        }
        let period = self.period * NS_PER_MS;
        let phases: Vec<i64> = self.phases.iter().map(|p| p * NS_PER_MS).collect();
        let x = format!("(({start} - {b}) % {period})");
        fn tree(phases: &[i64], lo: usize, hi: usize, x: &str) -> String {
            if hi - lo == 1 {
                return lo.to_string();
            }
            let mid = (lo + hi) / 2;
            format!(
                "(CASE WHEN {x} < {} THEN {} ELSE {} END)",
                phases[mid],
                tree(phases, lo, mid, x),
                tree(phases, mid, hi, x)
            )
        }
        let j = tree(&phases, 0, phases.len(), &x);
        format!(
            "CASE WHEN {start} < {b} THEN -1 WHEN {start} >= {e2} THEN {AFTER} WHEN {start} >= {e1} THEN -2 \
             ELSE (({start} - {b}) / {period}) * {} + {j} END",
            phases.len()
        )
    }

    /// A bucket's interval `[lo, hi)` in ms (bucket -1 starts at `first`).
    pub fn interval(&self, bucket: i64, first: i64) -> (i64, i64) {
        match bucket {
            -1 => (first, self.base),
            -2 => (self.e1, self.e2),
            AFTER => (self.e2, i64::MAX),
            id => {
                let n = self.phases.len() as i64;
                let (k, j) = (id / n, (id % n) as usize);
                let origin = self.base + k * self.period;
                let hi = self.phases.get(j + 1).map_or(origin + self.period, |p| origin + p);
                (origin + self.phases[j], hi.min(self.e1))
            }
        }
    }
}

/// Quantities of a set of usage records.
#[derive(Debug, Clone, Default)]
pub struct Sums {
    pub records: i64,
    pub invocations: i64,
    pub cpu_ms: i64,
    pub bytes_out: i64,
    pub state: Decimal,
}

impl Sums {
    pub fn subtract(&mut self, other: &Sums) {
        self.records -= other.records;
        self.invocations -= other.invocations;
        self.cpu_ms -= other.cpu_ms;
        self.bytes_out -= other.bytes_out;
        self.state -= other.state;
    }

    pub fn add(&mut self, other: &Sums) {
        self.records += other.records;
        self.invocations += other.invocations;
        self.cpu_ms += other.cpu_ms;
        self.bytes_out += other.bytes_out;
        self.state += other.state;
    }

    pub fn quantity(&self, metric: Metric) -> Decimal {
        match metric {
            Metric::Invocations => Decimal::from(self.invocations),
            Metric::CpuMs => Decimal::from(self.cpu_ms),
            Metric::BytesOut => Decimal::from(self.bytes_out),
            Metric::StateByteSeconds => self.state,
        }
    }
}

/// Usage is billed per (tenant, invoice, usage period, plan), in time order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    pub tenant: String,
    pub billed_period: String,
    pub period: String,
    pub plan: String,
}

/// One row of the aggregation.
pub struct Row {
    pub group: Group,
    pub function: String,
    /// A bucket of the lattice, or a minute's number.
    pub bucket: i64,
    pub sums: Sums,
    pub first_ns: i64,
}

pub fn decimal_of(text: &str) -> Result<Decimal> {
    text.trim()
        .parse::<Decimal>()
        .or_else(|_| Decimal::from_scientific(text.trim()))
        .map_err(|e| BillingError::Invalid(format!("usage record quantity {text:?}: {e}")))
}

/// The SQL sums of records (columns of `{t}`, a table prefix): records, invocations, CPU ms,
/// bytes out, state byte-seconds — exact (NUMERIC, as text) on PostgreSQL; SQLite has no
/// decimal type, so there a double-precision sum.
fn sums_sql(sqlite: bool, t: &str) -> String {
    let state = if sqlite {
        format!("SUM(CASE WHEN {t}kind = 'state' THEN CAST({t}state_byte_seconds AS REAL) ELSE 0.0 END)")
    } else {
        format!("CAST(SUM(CASE WHEN {t}kind = 'state' THEN CAST({t}state_byte_seconds AS NUMERIC) ELSE 0 END) AS TEXT)")
    };
    format!(
        "CAST(COUNT(*) AS BIGINT) AS records, CAST(SUM(CASE WHEN {t}kind = 'invocation' THEN 1 ELSE 0 END) AS BIGINT) \
         AS invocations, CAST(SUM({t}cpu_ms) AS BIGINT) AS cpu, CAST(SUM({t}bytes_out) AS BIGINT) AS bytes, {state} AS state"
    )
}

/// Decodes the columns of [`sums_sql`] at `at..at+5` of a row.
macro_rules! sums_at {
    ($row:expr, $at:expr, $sqlite:expr) => {{
        // SQLite: a sum is REAL, a `usage_totals` value TEXT.
        let state_text: String = if $sqlite {
            match $row.try_get::<Option<f64>, _>($at + 4) {
                Ok(v) => format!("{}", v.unwrap_or(0.0)),
                Err(_) => $row.try_get::<Option<String>, _>($at + 4)?.unwrap_or_else(|| "0".into()),
            }
        } else {
            $row.try_get::<Option<String>, _>($at + 4)?.unwrap_or_else(|| "0".into())
        };
        (
            $row.try_get::<i64, _>($at)?,
            $row.try_get::<i64, _>($at + 1)?,
            $row.try_get::<i64, _>($at + 2)?,
            $row.try_get::<i64, _>($at + 3)?,
            state_text,
        )
    }};
}

fn sums_of(raw: (i64, i64, i64, i64, String)) -> Result<Sums> {
    Ok(Sums { records: raw.0, invocations: raw.1, cpu_ms: raw.2, bytes_out: raw.3, state: decimal_of(&raw.4)? })
}

/// One row of [`grouped`]: the group, the function, the bucket ([`TOTALS`], [`WATERMARK`] or a
/// bucket number), the sums as read, and the first start (the watermark on its row).
type GroupedRow = (Group, String, i64, (i64, i64, i64, i64, String), i64);

/// The scope's usage records matching `filter` (SQL over `r.`), summed per (group, function,
/// `bucket`), with — when `totals` — the running totals of every (group, function), and
/// billing's watermark, in one statement (one snapshot).
impl Billing {
    async fn grouped(&self, tenant: Option<&str>, bucket: &str, filter: &str, totals: bool) -> Result<Vec<GroupedRow>> {
        let sqlite = matches!(self.db, Db::Sqlite(_));
        let scope = if tenant.is_some() { " AND r.tenant = ?" } else { "" };
        let sums = sums_sql(sqlite, "r.");
        let mut text = if sqlite {
            // SQLite sorts to group: on the row id of the records' `usage_totals` row (every
            // record has one, written in the same transaction) rather than on five text columns,
            // which takes a third of the time.
            format!(
                "SELECT t.tenant, t.billed_period, t.period, t.plan, t.function, g.bucket, g.records, g.invocations, \
             g.cpu, g.bytes, g.state, g.first_ns FROM (\
               SELECT t.rowid AS id, {bucket} AS bucket, {sums}, CAST(MIN(r.start_ns) AS BIGINT) AS first_ns \
               FROM usage_records r JOIN usage_totals t ON t.tenant = r.tenant AND t.billed_period = r.billed_period \
               AND t.period = r.period AND t.plan = r.plan AND t.function = r.function \
               WHERE 1 = 1{scope}{filter} GROUP BY t.rowid, bucket\
             ) g JOIN usage_totals t ON t.rowid = g.id"
            )
        } else {
            format!(
                // BIGINT: a bucket expression of literals only (an empty lattice) would be INT4.
                "SELECT r.tenant, r.billed_period, r.period, r.plan, r.function, CAST({bucket} AS BIGINT) AS bucket, {sums}, \
             CAST(MIN(r.start_ns) AS BIGINT) AS first_ns FROM usage_records r WHERE 1 = 1{scope}{filter} \
             GROUP BY r.tenant, r.billed_period, r.period, r.plan, r.function, bucket"
            )
        };
        let mut binds: Vec<&str> = tenant.into_iter().collect();
        if totals {
            text.push_str(&format!(
            " UNION ALL SELECT tenant, billed_period, period, plan, function, {TOTALS}, records, invocations, cpu_ms, \
             bytes_out, state_byte_seconds, 0 FROM usage_totals{}",
            if tenant.is_some() { " WHERE tenant = ?" } else { "" }
        ));
            binds.extend(tenant);
        }
        text.push_str(&format!(
            " UNION ALL SELECT '', '', '', '', '', {WATERMARK}, 0, 0, 0, 0, '0', \
         CAST(COALESCE((SELECT value FROM billing_settings WHERE key = 'watermark_ms'), '0') AS BIGINT)"
        ));
        // PostgreSQL estimates one group per record (it cannot know the buckets) and would sort
        // on disk with the default 4 MB; with room it hashes, in memory.
        Ok(fetch!(&self.db, &text, &binds, pg_setup = Some("SET LOCAL work_mem = '64MB'"), |row| (
            Group {
                tenant: row.try_get(0)?,
                billed_period: row.try_get(1)?,
                period: row.try_get(2)?,
                plan: row.try_get(3)?,
            },
            row.try_get::<String, _>(4)?,
            row.try_get::<i64, _>(5)?,
            sums_at!(row, 6, sqlite),
            row.try_get::<i64, _>(11)?,
        )))
    }

    /// The usage records of the caller's scope (`tenant`) that started at or after
    /// `lattice.base`, summed by (group, function, bucket), for the records of `part` (k of n,
    /// split by the last character of the usage id, so that the parts can be summed on as many
    /// connections at once); with `totals`, also the running totals of every (group, function)
    /// (rows of bucket [`TOTALS`]): what started before `base` is their difference, without
    /// reading those records. The same statement reports billing's watermark, by which the parts'
    /// snapshots are checked to agree (billing commits records and watermark together).
    async fn aggregate(
        &self,
        tenant: Option<&str>,
        lattice: &Lattice,
        part: (u32, u32),
        totals: bool,
    ) -> Result<(Vec<Row>, i64)> {
        let sqlite = matches!(self.db, Db::Sqlite(_));
        let mut filter = format!(" AND r.start_ns >= {}", lattice.base * NS_PER_MS);
        let (k, n) = part;
        if n > 1 {
            let last_char =
                if sqlite { "COALESCE(unicode(substr(r.usage_id, -1)), 0)" } else { "ascii(right(r.usage_id, 1))" };
            filter.push_str(&format!(" AND {last_char} % {n} = {k}"));
        }
        let raw = self.grouped(tenant, &lattice.sql("r."), &filter, totals).await?;
        let mut rows = Vec::with_capacity(raw.len());
        let mut watermark = 0;
        for (group, function, bucket, sums, first_ns) in raw {
            if bucket == WATERMARK {
                watermark = first_ns;
            } else {
                rows.push(Row { group, function, bucket, sums: sums_of(sums)?, first_ns });
            }
        }
        Ok((rows, watermark))
    }

    /// The aggregation of [`aggregate`] over every record of the scope, with what started before
    /// the lattice's base as bucket -1 (from the totals).
    pub async fn usage_by_bucket(
        &self,
        tenant: Option<&str>,
        lattice: &Lattice,
    ) -> Result<(Vec<Row>, HashMap<(Group, String), Sums>)> {
        let mut parts = None;
        if matches!(self.db, Db::Sqlite(_)) {
            // Two halves at once (the grouping sort is most of the work, and each connection runs
            // on a thread of its own), when billing committed nothing in between.
            for _ in 0..2 {
                let (a, b) = tokio::join!(
                    self.aggregate(tenant, lattice, (0, 2), true),
                    self.aggregate(tenant, lattice, (1, 2), false)
                );
                let ((a, wa), (b, wb)) = (a?, b?);
                if wa == wb {
                    parts = Some(a.into_iter().chain(b).collect::<Vec<_>>());
                    break;
                }
            }
        }
        let parts = match parts {
            Some(parts) => parts,
            None => self.aggregate(tenant, lattice, (0, 1), true).await?.0,
        };
        let mut totals: HashMap<(Group, String), Sums> = HashMap::new();
        let mut from_base: HashMap<(Group, String), Sums> = HashMap::new();
        let mut merged: HashMap<(Group, String, i64), (Sums, i64)> = HashMap::new();
        for row in parts {
            if row.bucket == TOTALS {
                totals.entry((row.group, row.function)).or_default().add(&row.sums);
                continue;
            }
            from_base.entry((row.group.clone(), row.function.clone())).or_default().add(&row.sums);
            let entry = merged.entry((row.group, row.function, row.bucket)).or_insert((Sums::default(), row.first_ns));
            entry.0.add(&row.sums);
            entry.1 = entry.1.min(row.first_ns);
        }
        // Before the base: the totals less what the records from the base on came to (the series
        // began before the base; when exactly is never read: every read time is at or after it).
        for (key, total) in &totals {
            let mut before = total.clone();
            if let Some(sums) = from_base.get(key) {
                before.subtract(sums);
            }
            if before.records > 0 {
                merged.insert((key.0.clone(), key.1.clone(), -1), (before, lattice.base * NS_PER_MS - 1));
            }
        }
        let rows = merged
            .into_iter()
            .filter(|((_, _, bucket), _)| *bucket != AFTER)
            .map(|((group, function, bucket), (sums, first_ns))| Row { group, function, bucket, sums, first_ns })
            .collect();
        Ok((rows, totals))
    }

    /// The scope's records per (group, function, minute) — those above billing's watermark `after`
    /// and at or below the current one, or all — with the running totals and the watermark, in one
    /// statement (one snapshot). A row's `bucket` is the minute's number.
    pub async fn usage_by_minute(
        &self,
        tenant: Option<&str>,
        after: Option<i64>,
    ) -> Result<(Vec<Row>, HashMap<(Group, String), Sums>, i64)> {
        let filter = match after {
            Some(after) => format!(
                " AND r.received_ms > {after} AND r.received_ms <= \
             CAST(COALESCE((SELECT value FROM billing_settings WHERE key = 'watermark_ms'), '0') AS BIGINT)"
            ),
            None => String::new(),
        };
        let raw = self.grouped(tenant, &format!("CAST(r.start_ns / {MINUTE_NS} AS BIGINT)"), &filter, true).await?;
        let (mut rows, mut totals, mut watermark) = (Vec::with_capacity(raw.len()), HashMap::new(), 0);
        for (group, function, bucket, sums, first_ns) in raw {
            match bucket {
                WATERMARK => watermark = first_ns,
                TOTALS => totals.entry((group, function)).or_insert_with(Sums::default).add(&sums_of(sums)?),
                minute => rows.push(Row { group, function, bucket: minute, sums: sums_of(sums)?, first_ns }),
            }
        }
        Ok((rows, totals, watermark))
    }

    /// Billing's watermark and the number of usage records of the scope (`tenant`, or every
    /// tenant): together they tell whether the scope's usage changed since they were last read.
    pub async fn usage_version(&self, tenant: Option<&str>) -> Result<(i64, i64)> {
        let text = format!(
            "SELECT CAST(COALESCE((SELECT value FROM billing_settings WHERE key = 'watermark_ms'), '0') AS BIGINT), \
             CAST(COALESCE((SELECT SUM(records) FROM usage_totals{}), 0) AS BIGINT)",
            if tenant.is_some() { " WHERE tenant = ?" } else { "" }
        );
        let binds: Vec<&str> = tenant.into_iter().collect();
        let now = fetch!(&self.db, &text, &binds, |row| (row.try_get::<i64, _>(0)?, row.try_get::<i64, _>(1)?));
        Ok(now.first().copied().unwrap_or((0, 0)))
    }

    /// A group's records that started in `[lo_ns, hi_ns)`, one by one in billing's order
    /// (start, then usage id): (function, its quantities).
    pub async fn usage_records_of(&self, group: &Group, lo_ns: i64, hi_ns: i64) -> Result<Vec<(String, Sums)>> {
        let text = format!(
            "SELECT function, kind, cpu_ms, bytes_out, state_byte_seconds FROM usage_records WHERE {} \
             ORDER BY start_ns, usage_id",
            group_filter(lo_ns, hi_ns)
        );
        let raw = fetch!(&self.db, &text, &group_binds(group), |row| (
            row.try_get::<String, _>(0)?,
            row.try_get::<String, _>(1)?,
            row.try_get::<i64, _>(2)?,
            row.try_get::<i64, _>(3)?,
            row.try_get::<String, _>(4)?,
        ));
        raw.into_iter()
            .map(|(function, kind, cpu_ms, bytes_out, state)| {
                let invocations = i64::from(kind == "invocation");
                let sums = Sums { records: 1, invocations, cpu_ms, bytes_out, state: decimal_of(&state)? };
                Ok((function, sums))
            })
            .collect()
    }

    /// A group's records that started in `[lo_ns, hi_ns)`, summed per time slice of `width`
    /// ns (slice k starts at `lo_ns + k·width`) and function.
    pub async fn usage_slices(
        &self,
        group: &Group,
        lo_ns: i64,
        hi_ns: i64,
        width: i64,
    ) -> Result<Vec<(i64, String, Sums)>> {
        let sqlite = matches!(self.db, Db::Sqlite(_));
        let text = format!(
            "SELECT CAST((start_ns - {lo_ns}) / {width} AS BIGINT) AS slice, function, {} \
             FROM usage_records WHERE {} GROUP BY slice, function",
            sums_sql(sqlite, ""),
            group_filter(lo_ns, hi_ns)
        );
        let raw = fetch!(&self.db, &text, &group_binds(group), |row| (
            row.try_get::<i64, _>(0)?,
            row.try_get::<String, _>(1)?,
            sums_at!(row, 2, sqlite)
        ));
        raw.into_iter().map(|(slice, function, sums)| Ok((slice, function, sums_of(sums)?))).collect()
    }

    /// Whether the scope (`tenant`, or every tenant) has any usage record.
    pub async fn has_usage(&self, tenant: Option<&str>) -> Result<bool> {
        let text = format!(
            "SELECT tenant FROM usage_totals{} LIMIT 1",
            if tenant.is_some() { " WHERE tenant = ?" } else { "" }
        );
        let binds: Vec<&str> = tenant.into_iter().collect();
        Ok(!fetch!(&self.db, &text, &binds, |row| row.try_get::<String, _>(0)?).is_empty())
    }

    /// The scope's (tenant, function, plan, invocations, records) with usage in a period up to
    /// `until` (a period key), from the running totals (a small table).
    pub async fn usage_functions(
        &self,
        tenant: Option<&str>,
        until: &str,
    ) -> Result<Vec<(String, String, String, i64, i64)>> {
        let text = format!(
            "SELECT tenant, function, plan, CAST(SUM(invocations) AS BIGINT), CAST(SUM(records) AS BIGINT) \
             FROM usage_totals WHERE period <= ?{} GROUP BY tenant, function, plan",
            if tenant.is_some() { " AND tenant = ?" } else { "" }
        );
        let mut binds: Vec<&str> = vec![until];
        binds.extend(tenant);
        Ok(fetch!(&self.db, &text, &binds, |row| (
            row.try_get::<String, _>(0)?,
            row.try_get::<String, _>(1)?,
            row.try_get::<String, _>(2)?,
            row.try_get::<i64, _>(3)?,
            row.try_get::<i64, _>(4)?,
        )))
    }
}

/// The records of one group that started in `[lo_ns, hi_ns)` (binds: [`group_binds`]).
fn group_filter(lo_ns: i64, hi_ns: i64) -> String {
    format!(
        "tenant = ? AND billed_period = ? AND period = ? AND plan = ? AND start_ns >= {lo_ns} AND start_ns < {hi_ns}"
    )
}

fn group_binds(group: &Group) -> [&str; 4] {
    [&group.tenant, &group.billed_period, &group.period, &group.plan]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lattice_repeats_with_the_step() {
        let hour = 3_600_000;
        let last = 100 * hour;
        // l = k·h, f = k·h - h + 1 min for k = 10..20
        let mut points: Vec<i64> = (10..=20).flat_map(|k| [k * hour, k * hour - hour + MINUTE_MS]).collect();
        points.sort();
        let lattice = Lattice::new(&points, Some(hour), last);
        assert_eq!(
            (lattice.base, lattice.period, lattice.phases.clone()),
            (9 * hour + MINUTE_MS, hour, vec![0, hour - MINUTE_MS])
        );
        for p in points {
            assert!(lattice.phases.contains(&((p - lattice.base) % lattice.period)));
        }
        assert_eq!(lattice.interval(0, 0), (9 * hour + MINUTE_MS, 10 * hour));
        assert_eq!(lattice.interval(1, 0), (10 * hour, 10 * hour + MINUTE_MS));
        assert_eq!(lattice.interval(-2, 0), (last - MINUTE_MS, last));
    }

    #[test]
    fn irregular_points_fall_back_to_minutes() {
        let points: Vec<i64> = (0..200).map(|i| i * i * MINUTE_MS).collect();
        let lattice = Lattice::new(&points, None, 1_000_000 * MINUTE_MS);
        assert_eq!((lattice.period, lattice.phases.len()), (MINUTE_MS, 1));
    }

    #[test]
    fn a_minute_lies_in_the_bucket_whose_interval_holds_it() {
        let hour = 3_600_000;
        let points: Vec<i64> = (10..=20).map(|k| k * hour).collect();
        let lattice = Lattice::new(&points, Some(hour), 100 * hour);
        for minute in (0..100 * 60 + 5).map(|m| m * MINUTE_MS) {
            let bucket = lattice.bucket_of_minute(minute);
            let (lo, hi) = lattice.interval(bucket, 0);
            assert!(lo <= minute && minute < hi, "minute {minute} in bucket {bucket} [{lo}, {hi})");
        }
    }
}
