//! The usage and billing counters, synthesized from billing's usage records.
//!
//! A counter here behaves as if it had been scraped every minute (at whole minutes, from the
//! minute of its first record to the last whole minute up to now): its sample at time `g` is
//! the sum over the records (invocations, state intervals) that *started* before `g`. Only the
//! sample times the query reads are computed (see `eval::counter_read_times`): records are
//! summed per (invoice, usage period, plan, function) and interval between consecutive read
//! times (a [`Lattice`]: for a range query they repeat with its step; a 30-day range at a 1 h
//! step with `[1h]` windows has about three intervals per step). The sums come from the
//! per-minute [`Cache`] of the caller's scope, or from one aggregation per query (see
//! [`aggregate`]).
//!
//! Costs: billing prices records in time order within (invoice, usage period, plan) — free
//! allowances and cheaper tiers go to the period's first usage — so the cost of a record
//! depends on what came before it. Pricing is billing's own ([`Position`]); this module only
//! chooses how finely to walk. A charge is piecewise linear in the cumulative quantity; for an
//! interval in which no metric crosses a breakpoint (the end of a free allowance, a tier bound)
//! the cost of each function's records is `charge(a + q) - charge(a)`, exactly what the
//! per-record sums come to. An interval that does cross one is split into time slices,
//! recursively, until the slice is small enough to walk record by record the way
//! `Billing::invocation_costs` does. Costs are decimals throughout and become floats only as
//! sample values.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use billing::period::Period;
use billing::plans::{Position, RateCard};
use billing::records::{AFTER, Group, Lattice, Row, Sums};
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;

use super::data::TENANT_LABEL;
use super::eval::{Counter, Labels, METRIC_NAME, QueryError, RESOLUTION_MS};
use crate::DashboardState;

pub const INVOCATIONS: &str = "sfaas_usage_invocations_total";
pub const CPU_MS: &str = "sfaas_usage_cpu_ms_total";
pub const BYTES_OUT: &str = "sfaas_usage_bytes_out_total";
pub const LOG_BYTES: &str = "sfaas_usage_log_bytes_total";
pub const STATE: &str = "sfaas_usage_state_byte_seconds_total";
pub const COST: &str = "sfaas_billing_cost_total";

/// Every synthesized metric with its help text.
pub const METRICS: [(&str, &str); 6] = [
    (INVOCATIONS, "Billable invocations (usage records of kind invocation), by tenant, function and plan."),
    (CPU_MS, "CPU milliseconds of billable invocations, by tenant, function and plan."),
    (BYTES_OUT, "Bytes sent by billable invocations, by tenant, function and plan."),
    (LOG_BYTES, "Bytes of the log lines exported for billable invocations, by tenant, function and plan."),
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
/// A crossing slice with at most this many records is walked record by record.
const LEAF_RECORDS: i64 = 2_000;
/// How many slices a crossing interval is split into per round.
const SLICES: i64 = 64;

/// The labels of a synthesized series (an empty value leaves the label out, as in Prometheus).
fn labels(name: &str, pairs: &[(&str, &str)]) -> Labels {
    let mut out: Vec<(String, String)> = vec![(METRIC_NAME.to_string(), name.to_string())];
    out.extend(pairs.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.to_string(), v.to_string())));
    out.sort();
    Arc::new(out)
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
    let (rows, totals) = match cache.snapshot(state, tenant).await? {
        Ok(snapshot) => (snapshot.rows(&lattice), snapshot.totals.clone()),
        Err(load) => {
            let read = state.billing.usage_by_bucket(tenant, &lattice).await;
            // A pending full load starts now that this query's rows are read.
            if let Some(load) = load {
                load.start();
            }
            read?
        }
    };
    let mut out = Vec::new();
    if wanted.usage {
        out.extend(usage_counters(&rows, &lattice, last));
    }
    if wanted.cost {
        out.extend(cost_counters(state, &rows, &totals, &lattice, last).await?);
    }
    Ok(out.into_iter().map(|(labels, counter)| (own_labels(labels, tenant), counter)).collect())
}

/// A tenant reads its series without the `tenant` label (its token scopes the query); the
/// admin, who reads every tenant's, with it.
fn own_labels(labels: Labels, tenant: Option<&str>) -> Labels {
    match tenant {
        Some(_) => Arc::new(labels.iter().filter(|(name, _)| name != TENANT_LABEL).cloned().collect()),
        None => labels,
    }
}

// ---------------------------------------------------------------------------------------------
// The per-minute cache

/// Scopes whose usage has more records than this are not cached (read per query instead),
/// unless [`Cache::new`] says otherwise.
pub const MAX_CACHED_RECORDS: i64 = 500_000;
/// At most this many scopes (tenants, or the admin's "every tenant") are cached.
const MAX_CACHED_SCOPES: usize = 4;

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
        let bucket_of = |minute: i64| lattice.bucket_of_minute(minute);
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

/// A scope's sums, and whether a full load of them is under way in the background (or handed
/// to a query, to start once it is answered).
#[derive(Default)]
struct Scope {
    snapshot: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
    loading: AtomicBool,
}

type Slot = Arc<Scope>;

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
        match self.snapshot(state, tenant).await {
            Ok(Err(Some(load))) => load.start(),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "warming the usage cache failed; queries read per query"),
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
        let mut guard = slot.snapshot.lock().await;
        // Unchanged since the last query: billing's watermark and the record count tell.
        let (watermark, records) = state.billing.usage_version(tenant).await?;
        if records > self.max_records {
            *guard = None;
            return Ok(Err(None));
        }
        if let Some(snapshot) = guard.as_ref()
            && snapshot.watermark == watermark
            && snapshot.records == records
        {
            return Ok(Ok(snapshot.clone()));
        }
        if let Some(old) = guard.as_ref()
            && old.watermark <= watermark
            && old.records <= records
        {
            let mut next = (**old).clone();
            let (rows, totals, watermark) = state.billing.usage_by_minute(tenant, Some(old.watermark)).await?;
            next.add(rows);
            next.totals = totals;
            next.watermark = watermark;
            if next.records == next.totals.values().map(|s| s.records).sum::<i64>() {
                let next = Arc::new(next);
                *guard = Some(next.clone());
                return Ok(Ok(next));
            }
        }
        // A full load.
        *guard = None;
        if self.wait {
            let snapshot = Arc::new(full_snapshot(state, tenant).await?);
            *guard = Some(snapshot.clone());
            return Ok(Ok(snapshot));
        }
        if !slot.loading.swap(true, Ordering::AcqRel) {
            return Ok(Err(Some(Load {
                state: state.clone(),
                tenant: tenant.map(str::to_string),
                slot: Some(slot.clone()),
            })));
        }
        Ok(Err(None))
    }
}

/// A full load to run in the background, started by the query that found the sums missing
/// once it is answered, so that the two do not compete for the cores.
#[must_use = "a load not started is given up"]
pub struct Load {
    state: DashboardState,
    tenant: Option<String>,
    slot: Option<Slot>,
}

impl Load {
    fn start(mut self) {
        let (state, tenant, slot) = (self.state.clone(), self.tenant.take(), self.slot.take());
        let Some(slot) = slot else { return };
        tokio::spawn(async move {
            let loaded = full_snapshot(&state, tenant.as_deref()).await;
            let mut snapshot = slot.snapshot.lock().await;
            match loaded {
                Ok(loaded) => *snapshot = Some(Arc::new(loaded)),
                Err(error) => tracing::warn!(%error, "loading the usage sums failed; reading per query"),
            }
            slot.loading.store(false, Ordering::Release);
        });
    }
}

impl Drop for Load {
    /// Not started (its query was cancelled): the next query hands the load out again.
    fn drop(&mut self) {
        if let Some(slot) = &self.slot {
            slot.loading.store(false, Ordering::Release);
        }
    }
}

async fn full_snapshot(state: &DashboardState, tenant: Option<&str>) -> Result<Snapshot, QueryError> {
    let (rows, totals, watermark) = state.billing.usage_by_minute(tenant, None).await?;
    let mut snapshot = Snapshot { watermark, totals, ..Snapshot::default() };
    snapshot.add(rows);
    Ok(snapshot)
}

/// The upper end of a bucket: where its records start counting.
fn upper(lattice: &Lattice, bucket: i64) -> i64 {
    lattice.interval(bucket, lattice.base()).1
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
        deltas: [BTreeMap<i64, f64>; 5],
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
            row.sums.log_bytes as f64,
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
            for (name, deltas) in [INVOCATIONS, CPU_MS, BYTES_OUT, LOG_BYTES].into_iter().zip(&acc.deltas) {
                out.push((labels(name, &pairs), counter(first, last, deltas)));
            }
        }
        if let Some(first) = acc.first_state {
            out.push((labels(STATE, &pairs), counter(first, last, &acc.deltas[4])));
        }
    }
    out
}

/// Per-function costs of a set of records priced together, when no metric crosses a
/// breakpoint inside it (then each function's cost is independent of the order).
fn linear(position: &mut Position<'_>, sums: &BTreeMap<String, Sums>) -> Option<Costs> {
    let mut total = Sums::default();
    for s in sums.values() {
        total.add(s);
    }
    if position.crosses_breakpoint(|metric| total.quantity(metric)) {
        return None;
    }
    let costs =
        sums.iter().map(|(function, s)| (function.clone(), position.cost(|metric| s.quantity(metric)))).collect();
    position.advance(|metric| total.quantity(metric));
    Some(costs)
}

type Costs = BTreeMap<String, Decimal>;
type CostFuture<'a> = Pin<Box<dyn Future<Output = Result<Costs, QueryError>> + Send + 'a>>;

/// The per-function costs of a group's records in `[lo_ns, hi_ns)` (which hold `records`
/// records), priced in order: sliced by time until each slice is linear or small enough to
/// walk record by record.
fn priced_slice<'a>(
    state: &'a DashboardState,
    group: &'a Group,
    position: &'a mut Position<'_>,
    lo_ns: i64,
    hi_ns: i64,
    records: i64,
) -> CostFuture<'a> {
    Box::pin(async move {
        let mut costs = Costs::new();
        if records <= LEAF_RECORDS || hi_ns - lo_ns <= 1 {
            for (function, sums) in state.billing.usage_records_of(group, lo_ns, hi_ns).await? {
                *costs.entry(function).or_default() += position.price(|metric| sums.quantity(metric));
            }
            return Ok(costs);
        }
        let width = (hi_ns - lo_ns + SLICES - 1) / SLICES;
        let mut slices: BTreeMap<i64, BTreeMap<String, Sums>> = BTreeMap::new();
        for (slice, function, sums) in state.billing.usage_slices(group, lo_ns, hi_ns, width).await? {
            slices.entry(slice).or_default().insert(function, sums);
        }
        for (slice, sums) in slices {
            let part = match linear(position, &sums) {
                Some(part) => part,
                None => {
                    let count = sums.values().map(|s| s.records).sum();
                    let (a, b) = (lo_ns + slice * width, (lo_ns + (slice + 1) * width).min(hi_ns));
                    priced_slice(state, group, position, a, b, count).await?
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
        let period = Period::parse(card.period, &group.period).map_err(billing::BillingError::from)?;
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
        let mut position = Position::new(plan, share, |metric| before.quantity(metric));
        let group_first_ms = group_first_ns.div_euclid(NS_PER_MS);
        for (_, (bucket, sums)) in buckets {
            let (lo, hi) = lattice.interval(bucket, group_first_ms);
            let costs = match linear(&mut position, &sums) {
                Some(costs) => costs,
                None => {
                    let records = sums.values().map(|s| s.records).sum();
                    // A group's records start in its usage period: the interval is cut to it
                    // (a query's read times, and so the lattice, can reach far past any ns time).
                    let (start_ns, end_ns) = (period.start_ns(), period.end_ns());
                    let lo_ns = if bucket == -1 { start_ns } else { lo.saturating_mul(NS_PER_MS).max(start_ns) };
                    let hi_ns = hi.saturating_mul(NS_PER_MS).clamp(lo_ns, end_ns.max(lo_ns));
                    priced_slice(state, group, &mut position, lo_ns, hi_ns, records).await?
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
    Ok(state.billing.has_usage(tenant).await?)
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
    let rows = state.billing.usage_functions(tenant, &until).await?;
    let currency = card.currency().to_string();
    let mut out = Vec::new();
    let mut costs: BTreeSet<(String, String)> = BTreeSet::new();
    for (tenant, function, plan, invocations, records) in &rows {
        let pairs = [("tenant", tenant.as_str()), ("function", function), ("plan", plan)];
        if *invocations > 0 {
            out.extend([INVOCATIONS, CPU_MS, BYTES_OUT, LOG_BYTES].map(|name| labels(name, &pairs)));
        }
        if records > invocations {
            out.push(labels(STATE, &pairs));
        }
        costs.insert((tenant.clone(), function.clone()));
    }
    for (tenant, function) in costs {
        out.push(labels(COST, &[("tenant", &tenant), ("function", &function), ("currency", &currency)]));
    }
    Ok(out.into_iter().map(|labels| own_labels(labels, tenant)).collect())
}
