//! Usage records summed for readers: the Prometheus API's usage and cost counters read
//! billing's records through these, by time bucket, by minute, by time slice and one by one,
//! from the segments (`segments/`) and the running totals.

use std::collections::HashMap;

use rust_decimal::Decimal;

use crate::db::{Db, on_pool};
use crate::plans::Metric;
use crate::segments::{self, Listed, Stored};
use crate::usage::Totals;
use crate::{Billing, BillingError, Result};

/// The counters' resolution: a synthesized counter has a sample every whole minute.
pub const MINUTE_MS: i64 = 60_000;
const MINUTE_NS: i64 = MINUTE_MS * NS_PER_MS;

/// Runs `$sql` binding the strings `$binds` on whichever pool `$db` holds, and decodes every
/// row with `$decode` (compiled once per backend).
macro_rules! fetch {
    ($db:expr, $sql:expr, $binds:expr, |$row:ident| $decode:expr) => {{
        let db: &Db = $db;
        let text = db.sql($sql);
        let binds: &[&str] = $binds;
        on_pool!(db, pool => {
            let mut query = sqlx::query(text);
            for bind in binds {
                query = query.bind(*bind);
            }
            query
                .fetch_all(pool)
                .await?
                .iter()
                .map(|$row| -> std::result::Result<_, sqlx::Error> {
                    use sqlx::Row as _;
                    Ok($decode)
                })
                .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?
        })
    }};
}

const NS_PER_MS: i64 = 1_000_000;
/// Bucket of records that started at or after the last sample time.
pub const AFTER: i64 = -3;
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
            // A query's step is the caller's (up to an i64 of ms): past i64, no lattice period.
            let lcm = (step / gcd(step, MINUTE_MS)).checked_mul(MINUTE_MS);
            if let Some(lcm) = lcm.filter(|lcm| *lcm < span) {
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

    /// The bucket of a record that started at `start_ns` (boundaries are whole minutes, so
    /// its minute's).
    pub fn bucket_of_ns(&self, start_ns: i64) -> i64 {
        self.bucket_of_minute(start_ns.div_euclid(MINUTE_NS) * MINUTE_MS)
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
    pub log_bytes: i64,
    pub state: Decimal,
}

impl Sums {
    /// One record's quantities.
    pub fn of(r: &Stored<'_>) -> Result<Sums> {
        Ok(Sums::of_totals(&r.totals()?))
    }

    fn of_totals(t: &Totals) -> Sums {
        Sums {
            records: t.records,
            invocations: t.invocations,
            cpu_ms: t.cpu_ms,
            bytes_out: t.bytes_out,
            log_bytes: t.log_bytes,
            state: t.state_byte_seconds,
        }
    }

    pub fn subtract(&mut self, other: &Sums) {
        self.records -= other.records;
        self.invocations -= other.invocations;
        self.cpu_ms -= other.cpu_ms;
        self.bytes_out -= other.bytes_out;
        self.log_bytes -= other.log_bytes;
        self.state -= other.state;
    }

    pub fn add(&mut self, other: &Sums) {
        self.records += other.records;
        self.invocations += other.invocations;
        self.cpu_ms += other.cpu_ms;
        self.bytes_out += other.bytes_out;
        self.log_bytes += other.log_bytes;
        self.state += other.state;
    }

    pub fn quantity(&self, metric: Metric) -> Decimal {
        match metric {
            Metric::Invocations => Decimal::from(self.invocations),
            Metric::CpuMs => Decimal::from(self.cpu_ms),
            Metric::BytesOut => Decimal::from(self.bytes_out),
            Metric::LogBytes => Decimal::from(self.log_bytes),
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
        .map_err(|e| BillingError::Corrupt { what: "usage record quantity", detail: format!("{text:?}: {e}") })
}

/// Sums per (group, function, bucket), with the first start of each.
type Buckets = HashMap<(Group, String, i64), (Sums, i64)>;

impl Billing {
    /// The scope's records in the segments `keep` chooses, summed per (group, function,
    /// `bucket`) — `bucket` gives a record's, or None to leave it out — with the running totals
    /// and the watermark of the same snapshot.
    async fn grouped(
        &self,
        tenant: Option<&str>,
        keep: impl Fn(&Listed) -> bool,
        bucket: impl Fn(&Stored<'_>, i64) -> Option<i64>,
    ) -> Result<(Buckets, HashMap<(Group, String), Sums>, i64)> {
        let mut out: Buckets = HashMap::new();
        let snapshot = segments::scan(&self.db, tenant, true, keep, |segment, bytes, snapshot| {
            // Summed under the segment's borrowed names, then into the owned keys.
            let mut sums: HashMap<(&str, &str, &str, i64), (Sums, i64)> = HashMap::new();
            segments::each(bytes, |r| {
                if let Some(bucket) = bucket(&r, snapshot.watermark) {
                    let entry =
                        sums.entry((r.period, r.plan, r.function, bucket)).or_insert((Sums::default(), r.start_ns));
                    entry.0.add(&Sums::of(&r)?);
                    entry.1 = entry.1.min(r.start_ns);
                }
                Ok(())
            })?;
            for ((period, plan, function, bucket), (sum, first_ns)) in sums {
                let group = Group {
                    tenant: segment.tenant.clone(),
                    billed_period: segment.billed_period.clone(),
                    period: period.into(),
                    plan: plan.into(),
                };
                let entry = out.entry((group, function.into(), bucket)).or_insert((Sums::default(), first_ns));
                entry.0.add(&sum);
                entry.1 = entry.1.min(first_ns);
            }
            Ok(())
        })
        .await?;
        let mut totals: HashMap<(Group, String), Sums> = HashMap::new();
        for (k, t) in snapshot.totals {
            let group = Group { tenant: k.tenant, billed_period: k.billed_period, period: k.period, plan: k.plan };
            totals.entry((group, k.function)).or_default().add(&Sums::of_totals(&t));
        }
        Ok((out, totals, snapshot.watermark))
    }

    /// Every record of the scope summed by (group, function, lattice bucket), with what started
    /// before the lattice's base as bucket -1, and the running totals of every (group,
    /// function). Segments whose records all started before the base are not read: what
    /// started before it is the totals less what the records from the base on came to.
    pub async fn usage_by_bucket(
        &self,
        tenant: Option<&str>,
        lattice: &Lattice,
    ) -> Result<(Vec<Row>, HashMap<(Group, String), Sums>)> {
        let base_ns = lattice.base * NS_PER_MS;
        let (merged, totals, _) = self
            .grouped(
                tenant,
                |s| s.last_start_ns >= base_ns,
                |r, _| (r.start_ns >= base_ns).then(|| lattice.bucket_of_ns(r.start_ns)),
            )
            .await?;
        let mut from_base: HashMap<(Group, String), Sums> = HashMap::new();
        for ((group, function, _), (sums, _)) in &merged {
            from_base.entry((group.clone(), function.clone())).or_default().add(sums);
        }
        let mut rows: Vec<Row> = merged
            .into_iter()
            .filter(|((_, _, bucket), _)| *bucket != AFTER)
            .map(|((group, function, bucket), (sums, first_ns))| Row { group, function, bucket, sums, first_ns })
            .collect();
        // Before the base: the totals less what the records from the base on came to (the series
        // began before the base; when exactly is never read: every read time is at or after it).
        for (key, total) in &totals {
            let mut before = total.clone();
            if let Some(sums) = from_base.get(key) {
                before.subtract(sums);
            }
            if before.records > 0 {
                let (group, function) = key.clone();
                rows.push(Row { group, function, bucket: -1, sums: before, first_ns: base_ns - 1 });
            }
        }
        Ok((rows, totals))
    }

    /// The scope's records per (group, function, minute) — those that arrived after billing's
    /// watermark `after` and at or before the current one, or all — with the running totals and
    /// the watermark, in one snapshot. A row's `bucket` is the minute's number.
    pub async fn usage_by_minute(
        &self,
        tenant: Option<&str>,
        after: Option<i64>,
    ) -> Result<(Vec<Row>, HashMap<(Group, String), Sums>, i64)> {
        let after_ms = after.unwrap_or(i64::MIN);
        let (merged, totals, watermark) = self
            .grouped(
                tenant,
                |s| s.last_received_ms > after_ms,
                |r, watermark| {
                    let arrived = after.is_none() || (r.received_ms > after_ms && r.received_ms <= watermark);
                    arrived.then(|| r.start_ns.div_euclid(MINUTE_NS))
                },
            )
            .await?;
        let rows = merged
            .into_iter()
            .map(|((group, function, bucket), (sums, first_ns))| Row { group, function, bucket, sums, first_ns })
            .collect();
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

    /// Calls `f` with each of a group's records that started in `[lo_ns, hi_ns)`.
    async fn group_records(
        &self,
        group: &Group,
        (lo_ns, hi_ns): (i64, i64),
        mut f: impl FnMut(&Stored<'_>) -> Result<()>,
    ) -> Result<()> {
        let keep =
            |s: &Listed| s.billed_period == group.billed_period && s.last_start_ns >= lo_ns && s.first_start_ns < hi_ns;
        segments::scan(&self.db, Some(&group.tenant), false, keep, |_, bytes, _| {
            segments::each(bytes, |r| {
                if r.period == group.period && r.plan == group.plan && r.start_ns >= lo_ns && r.start_ns < hi_ns {
                    f(&r)?;
                }
                Ok(())
            })
        })
        .await?;
        Ok(())
    }

    /// A group's records that started in `[lo_ns, hi_ns)`, one by one in billing's order
    /// (start, then usage id): (function, its quantities).
    pub async fn usage_records_of(&self, group: &Group, lo_ns: i64, hi_ns: i64) -> Result<Vec<(String, Sums)>> {
        let mut out = Vec::new();
        self.group_records(group, (lo_ns, hi_ns), |r| {
            out.push(((r.start_ns, r.usage_id.to_string()), r.function.to_string(), Sums::of(r)?));
            Ok(())
        })
        .await?;
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out.into_iter().map(|(_, function, sums)| (function, sums)).collect())
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
        let mut out: HashMap<(i64, String), Sums> = HashMap::new();
        self.group_records(group, (lo_ns, hi_ns), |r| {
            let slice = (r.start_ns - lo_ns) / width;
            let sums = Sums::of(r)?;
            match out.get_mut(&(slice, r.function.to_string())) {
                Some(sum) => sum.add(&sums),
                None => drop(out.insert((slice, r.function.to_string()), sums)),
            }
            Ok(())
        })
        .await?;
        Ok(out.into_iter().map(|((slice, function), sums)| (slice, function, sums)).collect())
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
    fn a_step_of_any_size_makes_a_lattice() {
        let points: Vec<i64> = (0..3).map(|i| i * MINUTE_MS).collect();
        for step in [i64::MAX, i64::MAX - 1, 1 << 62] {
            let lattice = Lattice::new(&points, Some(step), 10 * MINUTE_MS);
            assert_eq!((lattice.base, lattice.period), (0, 3 * MINUTE_MS), "step {step}");
        }
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
