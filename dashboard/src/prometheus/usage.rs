//! The usage and billing counters, synthesized from billing's `usage_records`.
//!
//! A counter here behaves as if it had been scraped every minute (at whole minutes, from the
//! minute of its first record to the last whole minute up to now): its sample at time `g` is
//! the sum over the records (invocations, state intervals) that *started* before `g`. Only the
//! sample times the query reads are computed (see `eval::counter_read_times`): records are
//! summed per (invoice, usage period, plan, function) and interval between consecutive read
//! times (a [`Lattice`]: for a range query they repeat with its step; a 30-day range at a 1 h
//! step with `[1h]` windows has about three intervals per step). The sums come from the
//! per-minute [`Cache`] of the caller's scope, or from one SQL aggregation per query (see
//! [`aggregate`]).
//!
//! Costs: billing prices records in time order within (invoice, usage period, plan) — free
//! allowances and cheaper tiers go to the period's first usage — so the cost of a record
//! depends on what came before it. A charge is piecewise linear in the cumulative quantity;
//! for an interval in which no metric crosses a breakpoint (the end of a free allowance, a tier
//! bound) the cost of each function's records is `charge(a + q) - charge(a)`, exactly what the
//! per-record sums come to. An interval that does cross one is split into time slices by SQL,
//! recursively, until the slice is small enough to walk record by record the way
//! `Billing::invocation_costs` does. Costs are decimals throughout and become floats only as
//! sample values.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use billing::period::Period;
use billing::plans::{Metric, PRORATE_DIGITS, Plan, Price, RateCard};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use super::db::{fetch, is_sqlite};
use super::eval::{Counter, Labels, METRIC_NAME, QueryError, RESOLUTION_MS};
use crate::DashboardState;

pub const INVOCATIONS: &str = "sfaas_usage_invocations_total";
pub const CPU_MS: &str = "sfaas_usage_cpu_ms_total";
pub const BYTES_OUT: &str = "sfaas_usage_bytes_out_total";
pub const STATE: &str = "sfaas_usage_state_byte_seconds_total";
pub const COST: &str = "sfaas_billing_cost_total";

/// Every synthesized metric with its help text.
pub const METRICS: [(&str, &str); 5] = [
    (INVOCATIONS, "Billable invocations (usage records of kind invocation), by tenant, function and plan."),
    (CPU_MS, "CPU milliseconds of billable invocations, by tenant, function and plan."),
    (BYTES_OUT, "Bytes sent by billable invocations, by tenant, function and plan."),
    (STATE, "State byte-seconds (state usage records), by tenant and plan."),
    (
        COST,
        "Cumulative cost of usage records at full precision (before invoice rounding and minimum charges), by tenant, function and currency.",
    ),
];

/// Which synthesized metrics a query reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct Wanted {
    pub usage: bool,
    pub cost: bool,
}

/// The last sample time of every synthesized counter: the last whole minute at or before now.
pub fn last_sample(now_ms: i64) -> i64 {
    now_ms.div_euclid(RESOLUTION_MS) * RESOLUTION_MS
}

const NS_PER_MS: i64 = 1_000_000;
/// Bucket of records that started at or after the last sample time.
const AFTER: i64 = -3;
/// Row kind of the aggregation: a `usage_totals` row (every record of its group and function).
const TOTALS: i64 = -9;
/// Row kind of the aggregation: billing's watermark as the statement saw it (in `first_ns`).
const WATERMARK: i64 = -8;
/// Interval patterns with more distinct phases than this are read minute by minute.
const MAX_PHASES: usize = 64;
/// A crossing slice with at most this many records is walked record by record.
const LEAF_RECORDS: i64 = 2_000;
/// How many slices a crossing interval is split into per round.
const SLICES: i64 = 64;

/// The intervals records are grouped into: `[base + k·period + phases[j], next phase)` up to
/// `e1`, then `[e1, e2)`; bucket `-1` holds everything before `base`, `-2` `[e1, e2)`, and
/// [`AFTER`] what started at `e2` or later (read by no query; only subtracted).
#[derive(Debug, Clone)]
struct Lattice {
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
    /// A lattice whose boundaries include every read time (`points`, sorted, all on the
    /// minute grid and at most `last`).
    fn new(points: &[i64], step: Option<i64>, last: i64) -> Self {
        let (e1, e2) = (last - RESOLUTION_MS, last);
        let inner: Vec<i64> = points.iter().copied().filter(|p| *p < e1).collect();
        let (Some(&base), Some(&top)) = (inner.first(), inner.last()) else {
            return Self { base: e1, period: RESOLUTION_MS, phases: vec![0], e1, e2 };
        };
        let span = top - base + RESOLUTION_MS;
        let mut candidates = Vec::new();
        if let Some(step) = step.filter(|s| *s > 0) {
            let lcm = step / gcd(step, RESOLUTION_MS) * RESOLUTION_MS;
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
        Self { base, period: RESOLUTION_MS, phases: vec![0], e1, e2 }
    }

    fn is_empty(&self) -> bool {
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
    fn interval(&self, bucket: i64, first: i64) -> (i64, i64) {
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
struct Sums {
    records: i64,
    invocations: i64,
    cpu_ms: i64,
    bytes_out: i64,
    state: Decimal,
}

impl Sums {
    fn subtract(&mut self, other: &Sums) {
        self.records -= other.records;
        self.invocations -= other.invocations;
        self.cpu_ms -= other.cpu_ms;
        self.bytes_out -= other.bytes_out;
        self.state -= other.state;
    }

    fn add(&mut self, other: &Sums) {
        self.records += other.records;
        self.invocations += other.invocations;
        self.cpu_ms += other.cpu_ms;
        self.bytes_out += other.bytes_out;
        self.state += other.state;
    }

    fn quantity(&self, metric: Metric) -> Decimal {
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
struct Group {
    tenant: String,
    billed_period: String,
    period: String,
    plan: String,
}

/// One row of the aggregation.
struct Row {
    group: Group,
    function: String,
    bucket: i64,
    sums: Sums,
    first_ns: i64,
}

fn decimal_of(text: &str) -> Result<Decimal, QueryError> {
    text.trim()
        .parse::<Decimal>()
        .or_else(|_| Decimal::from_scientific(text.trim()))
        .map_err(|e| QueryError::Internal(format!("usage record quantity {text:?}: {e}")))
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

fn sums_of(raw: (i64, i64, i64, i64, String)) -> Result<Sums, QueryError> {
    Ok(Sums { records: raw.0, invocations: raw.1, cpu_ms: raw.2, bytes_out: raw.3, state: decimal_of(&raw.4)? })
}

/// The labels of a synthesized series (an empty value leaves the label out, as in Prometheus).
fn labels(name: &str, pairs: &[(&str, &str)]) -> Labels {
    let mut out: Vec<(String, String)> = vec![(METRIC_NAME.to_string(), name.to_string())];
    out.extend(pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.to_string(), v.to_string())));
    out.sort();
    Arc::new(out)
}

/// One row of [`grouped`]: the group, the function, the bucket ([`TOTALS`], [`WATERMARK`] or a
/// bucket number), the sums as read, and the first start (the watermark on its row).
type GroupedRow = (Group, String, i64, (i64, i64, i64, i64, String), i64);

/// The scope's usage records matching `filter` (SQL over `r.`), summed per (group, function,
/// `bucket`), with — when `totals` — the running totals of every (group, function), and
/// billing's watermark, in one statement (one snapshot).
async fn grouped(
    state: &DashboardState,
    tenant: Option<&str>,
    bucket: &str,
    filter: &str,
    totals: bool,
) -> Result<Vec<GroupedRow>, QueryError> {
    let sqlite = is_sqlite(&state.store);
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
    Ok(fetch!(&state.store, &text, &binds, pg_setup = Some("SET LOCAL work_mem = '64MB'"), |row| (
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
    state: &DashboardState,
    tenant: Option<&str>,
    lattice: &Lattice,
    part: (u32, u32),
    totals: bool,
) -> Result<(Vec<Row>, i64), QueryError> {
    let sqlite = is_sqlite(&state.store);
    let mut filter = format!(" AND r.start_ns >= {}", lattice.base * NS_PER_MS);
    let (k, n) = part;
    if n > 1 {
        let last_char =
            if sqlite { "COALESCE(unicode(substr(r.usage_id, -1)), 0)" } else { "ascii(right(r.usage_id, 1))" };
        filter.push_str(&format!(" AND {last_char} % {n} = {k}"));
    }
    let raw = grouped(state, tenant, &lattice.sql("r."), &filter, totals).await?;
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
async fn aggregated(
    state: &DashboardState,
    cache: &Cache,
    tenant: Option<&str>,
    lattice: &Lattice,
) -> Result<(Vec<Row>, HashMap<(Group, String), Sums>), QueryError> {
    // (A pending full load starts when `_load` is dropped: once this query's rows are read.)
    let _load = match cache.snapshot(state, tenant).await? {
        Ok(snapshot) => return Ok((snapshot.rows(lattice), snapshot.totals.clone())),
        Err(load) => load,
    };
    let mut parts = None;
    if is_sqlite(&state.store) {
        // Two halves at once (the grouping sort is most of the work, and each connection runs
        // on a thread of its own), when billing committed nothing in between.
        for _ in 0..2 {
            let (a, b) = tokio::join!(
                aggregate(state, tenant, lattice, (0, 2), true),
                aggregate(state, tenant, lattice, (1, 2), false)
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
        None => aggregate(state, tenant, lattice, (0, 1), true).await?.0,
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

/// Series of the synthesized metrics: what a query reads at `points` (sorted), with `step`
/// its step (range queries) and `last` the last sample time. `tenant`: the caller's scope.
pub async fn series(
    state: &DashboardState,
    cache: &Cache,
    tenant: Option<&str>,
    points: &[i64],
    step: Option<i64>,
    last: i64,
    wanted: Wanted,
) -> Result<Vec<(Labels, Arc<Counter>)>, QueryError> {
    let lattice = Lattice::new(points, step, last);
    let (rows, totals) = aggregated(state, cache, tenant, &lattice).await?;
    let mut out = Vec::new();
    if wanted.usage {
        out.extend(usage_counters(&rows, &lattice, last));
    }
    if wanted.cost {
        out.extend(cost_counters(state, &rows, &totals, &lattice, last).await?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The per-minute cache

/// Scopes whose usage has more records than this are not cached (read per query instead),
/// unless [`Cache::new`] says otherwise.
pub const MAX_CACHED_RECORDS: i64 = 500_000;
/// At most this many scopes (tenants, or the admin's "every tenant") are cached.
const MAX_CACHED_SCOPES: usize = 4;
const MINUTE_NS: i64 = RESOLUTION_MS * NS_PER_MS;

/// The records of one (group, function) that started in one minute.
#[derive(Debug, Clone)]
struct Cell {
    minute: i64,
    sums: Sums,
    first_ns: i64,
}

/// A scope's usage records summed per (group, function) and minute, as of billing's
/// `watermark`, with the running totals of the same snapshot.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    watermark: i64,
    records: i64,
    cells: HashMap<(Group, String), Vec<Cell>>,
    totals: HashMap<(Group, String), Sums>,
}

impl Snapshot {
    fn add(&mut self, rows: Vec<Row>) {
        for row in rows {
            self.records += row.sums.records;
            let cells = self.cells.entry((row.group, row.function)).or_default();
            let minute = row.bucket * RESOLUTION_MS;
            let at = cells.partition_point(|c| c.minute < minute);
            match cells.get_mut(at) {
                Some(cell) if cell.minute == minute => {
                    cell.sums.add(&row.sums);
                    cell.first_ns = cell.first_ns.min(row.first_ns);
                }
                _ => cells.insert(at, Cell { minute, sums: row.sums, first_ns: row.first_ns }),
            }
        }
    }

    /// The aggregation of [`aggregated`] for a lattice, from the cells (every lattice boundary
    /// is a whole minute, so a cell lies in one bucket; buckets follow time order).
    fn rows(&self, lattice: &Lattice) -> Vec<Row> {
        let n = lattice.phases.len() as i64;
        let bucket_of = |minute: i64| {
            if minute < lattice.base {
                -1
            } else if minute >= lattice.e2 {
                AFTER
            } else if minute >= lattice.e1 {
                -2
            } else {
                let offset = minute - lattice.base;
                let j = lattice.phases.partition_point(|p| *p <= offset % lattice.period) as i64 - 1;
                (offset / lattice.period) * n + j
            }
        };
        let mut out = Vec::new();
        for ((group, function), cells) in &self.cells {
            let mut current: Option<(i64, Sums, i64)> = None;
            for cell in cells {
                let bucket = bucket_of(cell.minute);
                match &mut current {
                    Some((b, sums, first)) if *b == bucket => {
                        sums.add(&cell.sums);
                        *first = (*first).min(cell.first_ns);
                    }
                    _ => {
                        if let Some((b, sums, first_ns)) = current.take() {
                            out.push(Row {
                                group: group.clone(),
                                function: function.clone(),
                                bucket: b,
                                sums,
                                first_ns,
                            });
                        }
                        current = Some((bucket, cell.sums.clone(), cell.first_ns));
                    }
                }
            }
            if let Some((b, sums, first_ns)) = current {
                out.push(Row { group: group.clone(), function: function.clone(), bucket: b, sums, first_ns });
            }
        }
        out.retain(|r| r.bucket != AFTER);
        out
    }
}

/// A scope's sums, and whether a full load of them is under way in the background.
#[derive(Default)]
struct SlotState {
    snapshot: Option<Arc<Snapshot>>,
    loading: bool,
}

type Slot = Arc<tokio::sync::Mutex<SlotState>>;

/// Per-minute sums of the usage records, per scope, brought up to date on every query from
/// billing's watermark: records are inserted once (extraction commits them with the watermark
/// they are below) and never change, so only those above the last watermark are read. A count
/// that disagrees with the running totals (records written some other way) reloads the scope.
/// A full load (a scope's first query, or a reload) reads and transfers every minute of the
/// scope: it runs in the background while queries read per query, unless `wait` says
/// otherwise.
pub struct Cache {
    scopes: std::sync::Mutex<HashMap<Option<String>, Slot>>,
    max_records: i64,
    wait: bool,
}

impl Cache {
    /// A cache of scopes with at most `max_records` usage records (0: none is cached); `wait`:
    /// a query that finds no sums waits for them to load (else reads per query meanwhile).
    pub fn new(max_records: i64, wait: bool) -> Self {
        Self { scopes: std::sync::Mutex::new(HashMap::new()), max_records, wait }
    }

    /// Starts loading a scope's sums, as its first query would.
    pub async fn warm(&self, state: &DashboardState, tenant: Option<&str>) {
        if let Err(error) = self.snapshot(state, tenant).await {
            tracing::warn!(%error, "warming the usage cache failed; queries read per query");
        }
    }

    /// The scope's sums, up to date, or else (read per query) perhaps a full load to start
    /// once the query is answered.
    async fn snapshot(
        &self,
        state: &DashboardState,
        tenant: Option<&str>,
    ) -> Result<Result<Arc<Snapshot>, Option<Load>>, QueryError> {
        if self.max_records == 0 {
            return Ok(Err(None));
        }
        let slot = {
            let mut scopes = self.scopes.lock().unwrap_or_else(|e| e.into_inner());
            let key = tenant.map(str::to_string);
            if !scopes.contains_key(&key) && scopes.len() >= MAX_CACHED_SCOPES {
                let evict = scopes.keys().next().cloned().flatten();
                scopes.remove(&evict);
            }
            scopes.entry(key).or_default().clone()
        };
        let mut guard = slot.lock().await;
        // Unchanged since the last query: billing's watermark and the record count tell.
        let text = format!(
            "SELECT CAST(COALESCE((SELECT value FROM billing_settings WHERE key = 'watermark_ms'), '0') AS BIGINT), \
             CAST(COALESCE((SELECT SUM(records) FROM usage_totals{}), 0) AS BIGINT)",
            if tenant.is_some() { " WHERE tenant = ?" } else { "" }
        );
        let binds: Vec<&str> = tenant.into_iter().collect();
        let now = fetch!(&state.store, &text, &binds, |row| (row.try_get::<i64, _>(0)?, row.try_get::<i64, _>(1)?));
        let (watermark, records) = now.first().copied().unwrap_or((0, 0));
        if records > self.max_records {
            guard.snapshot = None;
            return Ok(Err(None));
        }
        if let Some(snapshot) = guard.snapshot.as_ref()
            && snapshot.watermark == watermark
            && snapshot.records == records
        {
            return Ok(Ok(snapshot.clone()));
        }
        if let Some(old) = guard.snapshot.as_ref()
            && old.watermark <= watermark
            && old.records <= records
        {
            let mut next = (**old).clone();
            let (rows, totals, watermark) = minutes(state, tenant, Some(old.watermark)).await?;
            next.add(rows);
            next.totals = totals;
            next.watermark = watermark;
            if next.records == next.totals.values().map(|s| s.records).sum::<i64>() {
                let next = Arc::new(next);
                guard.snapshot = Some(next.clone());
                return Ok(Ok(next));
            }
        }
        // A full load.
        guard.snapshot = None;
        if self.wait {
            let snapshot = Arc::new(full_snapshot(state, tenant).await?);
            guard.snapshot = Some(snapshot.clone());
            return Ok(Ok(snapshot));
        }
        if !guard.loading {
            guard.loading = true;
            return Ok(Err(Some(Load {
                state: state.clone(),
                tenant: tenant.map(str::to_string),
                slot: slot.clone(),
            })));
        }
        Ok(Err(None))
    }
}

/// A full load to run in the background, started when dropped: after the query that found
/// the sums missing was answered, so that the two do not compete for the cores.
pub struct Load {
    state: DashboardState,
    tenant: Option<String>,
    slot: Slot,
}

impl Drop for Load {
    fn drop(&mut self) {
        let (state, tenant, slot) = (self.state.clone(), self.tenant.take(), self.slot.clone());
        tokio::spawn(async move {
            let loaded = full_snapshot(&state, tenant.as_deref()).await;
            let mut guard = slot.lock().await;
            guard.loading = false;
            match loaded {
                Ok(snapshot) => guard.snapshot = Some(Arc::new(snapshot)),
                Err(error) => tracing::warn!(%error, "loading the usage sums failed; reading per query"),
            }
        });
    }
}

async fn full_snapshot(state: &DashboardState, tenant: Option<&str>) -> Result<Snapshot, QueryError> {
    let (rows, totals, watermark) = minutes(state, tenant, None).await?;
    let mut snapshot = Snapshot { watermark, totals, ..Snapshot::default() };
    snapshot.add(rows);
    Ok(snapshot)
}

/// The scope's records per (group, function, minute) — those above billing's watermark `after`
/// and at or below the current one, or all — with the running totals and the watermark, in one
/// statement (one snapshot). A row's `bucket` is the minute's number.
async fn minutes(
    state: &DashboardState,
    tenant: Option<&str>,
    after: Option<i64>,
) -> Result<(Vec<Row>, HashMap<(Group, String), Sums>, i64), QueryError> {
    let filter = match after {
        Some(after) => format!(
            " AND r.received_ms > {after} AND r.received_ms <= \
             CAST(COALESCE((SELECT value FROM billing_settings WHERE key = 'watermark_ms'), '0') AS BIGINT)"
        ),
        None => String::new(),
    };
    let raw = grouped(state, tenant, &format!("CAST(r.start_ns / {MINUTE_NS} AS BIGINT)"), &filter, true).await?;
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

/// The upper end of a bucket: where its records start counting.
fn upper(lattice: &Lattice, bucket: i64) -> i64 {
    lattice.interval(bucket, lattice.base).1
}

fn first_sample(first_ns: i64) -> i64 {
    first_ns.div_euclid(NS_PER_MS).div_euclid(RESOLUTION_MS) * RESOLUTION_MS
}

/// Turns per-bucket deltas into a counter.
fn counter(first_ns: i64, last: i64, deltas: &BTreeMap<i64, f64>) -> Arc<Counter> {
    let mut total = 0.0;
    let points = deltas
        .iter()
        .map(|(t, d)| {
            total += d;
            (*t, total)
        })
        .collect();
    Arc::new(Counter { first: first_sample(first_ns), last, points })
}

fn usage_counters(rows: &[Row], lattice: &Lattice, last: i64) -> Vec<(Labels, Arc<Counter>)> {
    #[derive(Default)]
    struct Acc {
        first_invocation: Option<i64>,
        first_state: Option<i64>,
        deltas: [BTreeMap<i64, f64>; 4],
    }
    let mut series: BTreeMap<(&str, &str, &str), Acc> = BTreeMap::new();
    for row in rows {
        let acc = series.entry((&row.group.tenant, &row.function, &row.group.plan)).or_default();
        let at = upper(lattice, row.bucket);
        if row.sums.invocations > 0 {
            acc.first_invocation = Some(acc.first_invocation.map_or(row.first_ns, |f| f.min(row.first_ns)));
        }
        if row.sums.records > row.sums.invocations {
            acc.first_state = Some(acc.first_state.map_or(row.first_ns, |f| f.min(row.first_ns)));
        }
        let values = [
            row.sums.invocations as f64,
            row.sums.cpu_ms as f64,
            row.sums.bytes_out as f64,
            row.sums.state.to_f64().unwrap_or(f64::NAN),
        ];
        for (deltas, value) in acc.deltas.iter_mut().zip(values) {
            *deltas.entry(at).or_default() += value;
        }
    }
    let mut out = Vec::new();
    for ((tenant, function, plan), acc) in series {
        let pairs = [("tenant", tenant), ("function", function), ("plan", plan)];
        if let Some(first) = acc.first_invocation {
            for (name, deltas) in [INVOCATIONS, CPU_MS, BYTES_OUT].into_iter().zip(&acc.deltas) {
                out.push((labels(name, &pairs), counter(first, last, deltas)));
            }
        }
        if let Some(first) = acc.first_state {
            out.push((labels(STATE, &pairs), counter(first, last, &acc.deltas[3])));
        }
    }
    out
}

/// Where a price's charge changes slope, in its unit: the end of the free allowance and the
/// tier bounds after it (scaled by the plan's share of the period, as `Price::charge` does).
fn breakpoints(price: &Price, share: Decimal) -> Vec<Decimal> {
    let scale = |d: Decimal| if share == Decimal::ONE { d } else { (d * share).round_dp(PRORATE_DIGITS) };
    let free = scale(price.free);
    let mut out = vec![free];
    if price.unit_price.is_none() {
        out.extend(price.tiers.iter().filter_map(|t| t.up_to).map(|up_to| free + scale(up_to)));
    }
    out
}

/// Pricing state of one group: the cumulative quantity (in each price's unit) so far.
struct Pricing<'a> {
    plan: &'a Plan,
    share: Decimal,
    cumulative: BTreeMap<Metric, Decimal>,
    breakpoints: BTreeMap<Metric, Vec<Decimal>>,
}

impl Pricing<'_> {
    /// Per-function costs of a set of records priced together, when no metric crosses a
    /// breakpoint inside it (then each function's cost is independent of the order).
    fn linear(&mut self, sums: &BTreeMap<String, Sums>) -> Option<BTreeMap<String, Decimal>> {
        let mut total = Sums::default();
        for s in sums.values() {
            total.add(s);
        }
        for (metric, price) in &self.plan.prices {
            let a = self.cumulative[metric];
            let b = a + price.in_unit(*metric, total.quantity(*metric));
            if self.breakpoints[metric].iter().any(|p| a < *p && *p < b) {
                return None;
            }
        }
        let mut costs = BTreeMap::new();
        for (function, s) in sums {
            let mut cost = Decimal::ZERO;
            for (metric, price) in &self.plan.prices {
                let q = price.in_unit(*metric, s.quantity(*metric));
                if !q.is_zero() {
                    let a = self.cumulative[metric];
                    cost += price.charge(a + q, self.share) - price.charge(a, self.share);
                }
            }
            costs.insert(function.clone(), cost);
        }
        for (metric, price) in &self.plan.prices {
            *self.cumulative.get_mut(metric).expect("every priced metric") +=
                price.in_unit(*metric, total.quantity(*metric));
        }
        Some(costs)
    }

    /// One record, priced after everything before it (`Billing::invocation_costs`).
    fn record(&mut self, s: &Sums) -> Decimal {
        let mut cost = Decimal::ZERO;
        for (metric, price) in &self.plan.prices {
            let q = price.in_unit(*metric, s.quantity(*metric));
            if q.is_zero() {
                continue;
            }
            let so_far = self.cumulative.get_mut(metric).expect("every priced metric");
            cost += price.charge(*so_far + q, self.share) - price.charge(*so_far, self.share);
            *so_far += q;
        }
        cost
    }
}

type Costs = BTreeMap<String, Decimal>;
type CostFuture<'a> = Pin<Box<dyn Future<Output = Result<Costs, QueryError>> + Send + 'a>>;

/// The per-function costs of a group's records in `[lo_ns, hi_ns)` (which hold `records`
/// records), priced in order: sliced by time until each slice is linear or small enough to
/// walk record by record.
fn priced_slice<'a>(
    state: &'a DashboardState,
    group: &'a Group,
    pricing: &'a mut Pricing<'_>,
    lo_ns: i64,
    hi_ns: i64,
    records: i64,
) -> CostFuture<'a> {
    Box::pin(async move {
        let sqlite = is_sqlite(&state.store);
        let binds = [group.tenant.as_str(), &group.billed_period, &group.period, &group.plan];
        let filter = format!(
            "tenant = ? AND billed_period = ? AND period = ? AND plan = ? AND start_ns >= {lo_ns} AND start_ns < {hi_ns}"
        );
        let mut costs = Costs::new();
        if records <= LEAF_RECORDS || hi_ns - lo_ns <= 1 {
            let text = format!(
                "SELECT function, kind, cpu_ms, bytes_out, state_byte_seconds FROM usage_records WHERE {filter} \
                 ORDER BY start_ns, usage_id"
            );
            let raw = fetch!(&state.store, &text, &binds, |row| (
                row.try_get::<String, _>(0)?,
                row.try_get::<String, _>(1)?,
                row.try_get::<i64, _>(2)?,
                row.try_get::<i64, _>(3)?,
                row.try_get::<String, _>(4)?,
            ));
            for (function, kind, cpu_ms, bytes_out, state_text) in raw {
                let s = Sums {
                    records: 1,
                    invocations: i64::from(kind == "invocation"),
                    cpu_ms,
                    bytes_out,
                    state: decimal_of(&state_text)?,
                };
                *costs.entry(function).or_default() += pricing.record(&s);
            }
            return Ok(costs);
        }
        let width = (hi_ns - lo_ns + SLICES - 1) / SLICES;
        let text = format!(
            "SELECT CAST((start_ns - {lo_ns}) / {width} AS BIGINT) AS slice, function, {} \
             FROM usage_records WHERE {filter} GROUP BY slice, function",
            sums_sql(sqlite, "")
        );
        let raw = fetch!(&state.store, &text, &binds, |row| (
            row.try_get::<i64, _>(0)?,
            row.try_get::<String, _>(1)?,
            sums_at!(row, 2, sqlite)
        ));
        let mut slices: BTreeMap<i64, BTreeMap<String, Sums>> = BTreeMap::new();
        for (slice, function, sums) in raw {
            slices.entry(slice).or_default().insert(function, sums_of(sums)?);
        }
        for (slice, sums) in slices {
            let part = match pricing.linear(&sums) {
                Some(part) => part,
                None => {
                    let count = sums.values().map(|s| s.records).sum();
                    let (a, b) = (lo_ns + slice * width, (lo_ns + (slice + 1) * width).min(hi_ns));
                    priced_slice(state, group, pricing, a, b, count).await?
                }
            };
            for (function, cost) in part {
                *costs.entry(function).or_default() += cost;
            }
        }
        Ok(costs)
    })
}

async fn cost_counters(
    state: &DashboardState,
    rows: &[Row],
    totals: &HashMap<(Group, String), Sums>,
    lattice: &Lattice,
    last: i64,
) -> Result<Vec<(Labels, Arc<Counter>)>, QueryError> {
    let card: RateCard = state.billing.rate_card().await?;
    let assignments = state.billing.plan_assignments().await?;
    // Buckets in time order per group: -1 first, then the lattice, then -2.
    let order = |bucket: i64| match bucket {
        -1 => i64::MIN,
        -2 => i64::MAX,
        id => id,
    };
    // group → (its first record, buckets in order: order key → (bucket, sums by function))
    type Buckets = BTreeMap<i64, (i64, BTreeMap<String, Sums>)>;
    let mut groups: BTreeMap<&Group, (i64, Buckets)> = BTreeMap::new();
    for row in rows {
        let entry = groups.entry(&row.group).or_insert((row.first_ns, BTreeMap::new()));
        entry.0 = entry.0.min(row.first_ns);
        entry
            .1
            .entry(order(row.bucket))
            .or_insert((row.bucket, BTreeMap::new()))
            .1
            .insert(row.function.clone(), row.sums.clone());
    }
    let mut firsts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for row in rows {
        let first = firsts.entry((&row.group.tenant, &row.function)).or_insert(row.first_ns);
        *first = (*first).min(row.first_ns);
    }
    let mut deltas: BTreeMap<(String, String), (i64, BTreeMap<i64, Decimal>)> = BTreeMap::new();
    let no_assignments = Vec::new();
    for (group, (group_first_ns, buckets)) in groups {
        let Some(plan) = card.plans.get(&group.plan) else { continue };
        let period = Period::parse(card.period, &group.period).map_err(QueryError::Internal)?;
        let share = billing::share(
            assignments.get(&group.tenant).unwrap_or(&no_assignments),
            &card.default_plan,
            &group.plan,
            period,
        );
        // What earlier invoices billed of the same usage period and plan: late usage is priced
        // after it.
        let mut before = Sums::default();
        for ((g, _), sums) in totals {
            if g.tenant == group.tenant
                && g.period == group.period
                && g.plan == group.plan
                && g.billed_period < group.billed_period
            {
                before.add(sums);
            }
        }
        let mut pricing = Pricing {
            plan,
            share,
            cumulative: plan.prices.iter().map(|(m, p)| (*m, p.in_unit(*m, before.quantity(*m)))).collect(),
            breakpoints: plan.prices.iter().map(|(m, p)| (*m, breakpoints(p, share))).collect(),
        };
        let group_first_ms = group_first_ns.div_euclid(NS_PER_MS);
        for (_, (bucket, sums)) in buckets {
            let (lo, hi) = lattice.interval(bucket, group_first_ms);
            let costs = match pricing.linear(&sums) {
                Some(costs) => costs,
                None => {
                    let records = sums.values().map(|s| s.records).sum();
                    // A group's records start in its usage period.
                    let lo_ns = if bucket == -1 { period.start_ns() } else { lo * NS_PER_MS };
                    priced_slice(state, group, &mut pricing, lo_ns, hi * NS_PER_MS, records).await?
                }
            };
            for (function, cost) in costs {
                let first = firsts.get(&(group.tenant.as_str(), function.as_str())).copied().unwrap_or(group_first_ns);
                *deltas
                    .entry((group.tenant.clone(), function))
                    .or_insert((first, BTreeMap::new()))
                    .1
                    .entry(hi)
                    .or_default() += cost;
            }
        }
    }
    let currency = card.currency().to_string();
    Ok(deltas
        .into_iter()
        .map(|((tenant, function), (first_ns, by_time))| {
            let mut total = Decimal::ZERO;
            let points = by_time
                .into_iter()
                .map(|(t, d)| {
                    total += d;
                    (t, total.to_f64().unwrap_or(f64::NAN))
                })
                .collect();
            let labels = labels(COST, &[("tenant", &tenant), ("function", &function), ("currency", &currency)]);
            (labels, Arc::new(Counter { first: first_sample(first_ns), last, points }))
        })
        .collect())
}

/// Whether the caller's scope has any usage (so the synthesized metrics exist).
pub async fn any(state: &DashboardState, tenant: Option<&str>) -> Result<bool, QueryError> {
    let text =
        format!("SELECT tenant FROM usage_totals{} LIMIT 1", if tenant.is_some() { " WHERE tenant = ?" } else { "" });
    let binds: Vec<&str> = tenant.into_iter().collect();
    Ok(!fetch!(&state.store, &text, &binds, |row| row.try_get::<String, _>(0)?).is_empty())
}

/// The synthesized series that exist by `hi_ms` (for `/series`, `/labels`), from billing's
/// running totals (a small table): every series with usage in a period that began by then.
pub async fn catalogue(
    state: &DashboardState,
    tenant: Option<&str>,
    hi_ms: i64,
    now_ms: i64,
) -> Result<Vec<Labels>, QueryError> {
    let card = state.billing.rate_card().await?;
    let until = Period::containing(card.period, hi_ms.min(now_ms).saturating_mul(NS_PER_MS)).key();
    let text = format!(
        "SELECT tenant, function, plan, CAST(SUM(invocations) AS BIGINT), CAST(SUM(records) AS BIGINT) \
         FROM usage_totals WHERE period <= ?{} GROUP BY tenant, function, plan",
        if tenant.is_some() { " AND tenant = ?" } else { "" }
    );
    let mut binds: Vec<&str> = vec![&until];
    binds.extend(tenant);
    let rows = fetch!(&state.store, &text, &binds, |row| (
        row.try_get::<String, _>(0)?,
        row.try_get::<String, _>(1)?,
        row.try_get::<String, _>(2)?,
        row.try_get::<i64, _>(3)?,
        row.try_get::<i64, _>(4)?,
    ));
    let currency = card.currency().to_string();
    let mut out = Vec::new();
    let mut costs: BTreeSet<(String, String)> = BTreeSet::new();
    for (tenant, function, plan, invocations, records) in &rows {
        let pairs = [("tenant", tenant.as_str()), ("function", function), ("plan", plan)];
        if *invocations > 0 {
            out.extend([INVOCATIONS, CPU_MS, BYTES_OUT].map(|name| labels(name, &pairs)));
        }
        if records > invocations {
            out.push(labels(STATE, &pairs));
        }
        costs.insert((tenant.clone(), function.clone()));
    }
    for (tenant, function) in costs {
        out.push(labels(COST, &[("tenant", &tenant), ("function", &function), ("currency", &currency)]));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lattice_repeats_with_the_step() {
        let hour = 3_600_000;
        let last = 100 * hour;
        // l = k·h, f = k·h - h + 1 min for k = 10..20
        let mut points: Vec<i64> = (10..=20).flat_map(|k| [k * hour, k * hour - hour + RESOLUTION_MS]).collect();
        points.sort();
        let lattice = Lattice::new(&points, Some(hour), last);
        assert_eq!(
            (lattice.base, lattice.period, lattice.phases.clone()),
            (9 * hour + RESOLUTION_MS, hour, vec![0, hour - RESOLUTION_MS])
        );
        for p in points {
            assert!(lattice.phases.contains(&((p - lattice.base) % lattice.period)));
        }
        assert_eq!(lattice.interval(0, 0), (9 * hour + RESOLUTION_MS, 10 * hour));
        assert_eq!(lattice.interval(1, 0), (10 * hour, 10 * hour + RESOLUTION_MS));
        assert_eq!(lattice.interval(-2, 0), (last - RESOLUTION_MS, last));
    }

    #[test]
    fn irregular_points_fall_back_to_minutes() {
        let points: Vec<i64> = (0..200).map(|i| i * i * RESOLUTION_MS).collect();
        let lattice = Lattice::new(&points, None, 1_000_000 * RESOLUTION_MS);
        assert_eq!((lattice.period, lattice.phases.len()), (RESOLUTION_MS, 1));
    }
}
