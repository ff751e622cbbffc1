//! Usage records as immutable segments: the billing engine's storage of records.
//!
//! A segment holds the records of one tenant's invoice (tenant, billed period) that one
//! extraction chunk wrote, or that one merge joined, sorted in billing's order (start, then
//! usage id). It is one row of `usage_segments`: a catalog (tenant, billed period, level,
//! count, start and arrival ranges), the sorted 64-bit hashes of its usage ids (`keys`), and the
//! records themselves (`data`, the format below). A chunk's segments, its running totals and
//! billing's watermark commit in one transaction, so a crash loses nothing acknowledged and
//! bills nothing twice.
//!
//! - **De-duplication** by (tenant, usage id), across every segment: a new record's hash is
//!   looked up in its tenant's index of every hash in its segments ([`KeyCache`], in memory,
//!   built from the segments' keys and kept up to date with them: a segment never changes,
//!   and ids are never reused); a hit is verified against the tenant's records, so a hash
//!   collision never drops a record.
//! - **Merges.** Segments are levelled by size ([`level`]); when an invoice has [`FANOUT`]
//!   segments of one level, they become one segment (of the next level, by its size), by
//!   [`merge_levels`] after billing runs, a transaction per merge, out of extraction's way;
//!   level [`TOP_LEVEL`] and above are never merged, since a merge holds its records in
//!   memory. Between runs an invoice keeps fewer than `FANOUT` segments per merged level, so
//!   a reader reads few rows. De-duplication does not depend on the number of segments.
//! - **Reading.** Readers list the catalog, keep the segments their scope, start range or
//!   arrival range needs, and decode them one at a time ([`each`]), borrowing the strings from
//!   the segment's bytes; the list and the segments are read in one snapshot, with the
//!   watermark.
//!
//! The format (version 1): `SFU1`, the record count, a dictionary of the functions, periods
//! and plans, then the records, each: usage id, kind (a byte), function (dictionary index),
//! flow run and call id (optional strings), trace and span id, start (delta from the record
//! before), duration, CPU-ms, wall-ms, memory peak, bytes in, bytes out, status code, the
//! state byte-seconds as exact decimal text, period and plan (dictionary indexes), and arrival
//! (delta). Integers are zigzag LEB128 varints; strings are a length and UTF-8 bytes; an
//! optional string's length is 0 when absent and length + 1 otherwise.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use rust_decimal::Decimal;
use sqlx::Row;

use crate::db::{Db, on_pool};
use crate::usage::{Kind, Totals, TotalsKey, UsageRecord};
use crate::{BillingError, Result};

const MAGIC: &[u8; 4] = b"SFU1";
/// Segments of one level of one invoice are merged into one when there are this many.
pub const FANOUT: usize = 8;
/// The largest segment of level 0, in records; each level holds up to [`FANOUT`] times more.
const LEVEL_0: usize = 1024;

/// A segment's level by its size: 0 up to [`LEVEL_0`] records, then one more per factor of
/// [`FANOUT`].
pub fn level(records: usize) -> i64 {
    let (mut level, mut cap) = (0, LEVEL_0);
    while records > cap {
        cap = cap.saturating_mul(FANOUT);
        level += 1;
    }
    level
}

/// A usage record as a segment holds it (its tenant and billed period are the segment's),
/// borrowed from the segment's bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stored<'a> {
    pub usage_id: &'a str,
    pub kind: Kind,
    pub function: &'a str,
    pub flow_run: Option<&'a str>,
    pub call_id: Option<&'a str>,
    pub trace_id: &'a str,
    pub span_id: &'a str,
    pub start_ns: i64,
    pub end_ns: i64,
    pub cpu_ms: i64,
    pub wall_ms: i64,
    pub memory_peak_bytes: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub status_code: i64,
    /// Exact byte-seconds as decimal text ("0" for records that are not state).
    pub state: &'a str,
    /// The period the usage happened in.
    pub period: &'a str,
    pub plan: &'a str,
    pub received_ms: i64,
}

impl<'a> Stored<'a> {
    /// Billing's order: start, then usage id.
    pub fn order(&self) -> (i64, &'a str) {
        (self.start_ns, self.usage_id)
    }

    pub fn state_decimal(&self) -> Result<Decimal> {
        crate::records::decimal_of(self.state)
    }

    /// The record's sums, as the running totals count it.
    pub fn totals(&self) -> Result<Totals> {
        let invocation = self.kind == Kind::Invocation;
        Ok(Totals {
            records: 1,
            invocations: i64::from(invocation),
            errors: i64::from(invocation && self.status_code >= 500),
            cpu_ms: self.cpu_ms,
            wall_ms: self.wall_ms,
            bytes_out: self.bytes_out,
            state_byte_seconds: if self.kind == Kind::State { self.state_decimal()? } else { Decimal::ZERO },
        })
    }

    /// The record, owned, with its segment's tenant and billed period.
    pub fn to_record(&self, tenant: &str, billed_period: &str) -> Result<UsageRecord> {
        Ok(UsageRecord {
            tenant: tenant.into(),
            usage_id: self.usage_id.into(),
            kind: self.kind,
            function: self.function.into(),
            flow_run: self.flow_run.map(str::to_owned),
            call_id: self.call_id.map(str::to_owned),
            trace_id: self.trace_id.into(),
            span_id: self.span_id.into(),
            start_ns: self.start_ns,
            end_ns: self.end_ns,
            cpu_ms: self.cpu_ms,
            wall_ms: self.wall_ms,
            memory_peak_bytes: self.memory_peak_bytes,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            status_code: self.status_code,
            state_byte_seconds: self.state_decimal()?,
            period: self.period.into(),
            billed_period: billed_period.into(),
            plan: self.plan.into(),
            received_ms: self.received_ms,
        })
    }

    /// A record borrowed from an owned one (its tenant and billed period aside).
    pub fn of(record: &'a UsageRecord, state: &'a str) -> Self {
        Stored {
            usage_id: &record.usage_id,
            kind: record.kind,
            function: &record.function,
            flow_run: record.flow_run.as_deref(),
            call_id: record.call_id.as_deref(),
            trace_id: &record.trace_id,
            span_id: &record.span_id,
            start_ns: record.start_ns,
            end_ns: record.end_ns,
            cpu_ms: record.cpu_ms,
            wall_ms: record.wall_ms,
            memory_peak_bytes: record.memory_peak_bytes,
            bytes_in: record.bytes_in,
            bytes_out: record.bytes_out,
            status_code: record.status_code,
            state,
            period: &record.period,
            plan: &record.plan,
            received_ms: record.received_ms,
        }
    }
}

fn kind_byte(kind: Kind) -> u8 {
    match kind {
        Kind::Invocation => 0,
        Kind::State => 1,
        Kind::Instance => 2,
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_int(out: &mut Vec<u8>, value: i64) {
    put_varint(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_varint(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

fn put_opt(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        None => put_varint(out, 0),
        Some(text) => {
            put_varint(out, text.len() as u64 + 1);
            out.extend_from_slice(text.as_bytes());
        }
    }
}

/// The segment's bytes for `records`, which are in billing's order.
pub fn encode(records: &[Stored<'_>]) -> Vec<u8> {
    let mut words: Vec<&str> = Vec::new();
    let mut index: HashMap<&str, u64> = HashMap::new();
    let mut word = |text| {
        *index.entry(text).or_insert_with(|| {
            words.push(text);
            words.len() as u64 - 1
        })
    };
    let mut rows = Vec::with_capacity(records.len() * 100);
    let (mut start, mut received) = (0i64, 0i64);
    for r in records {
        put_str(&mut rows, r.usage_id);
        rows.push(kind_byte(r.kind));
        put_varint(&mut rows, word(r.function));
        put_opt(&mut rows, r.flow_run);
        put_opt(&mut rows, r.call_id);
        put_str(&mut rows, r.trace_id);
        put_str(&mut rows, r.span_id);
        put_int(&mut rows, r.start_ns.wrapping_sub(start));
        put_int(&mut rows, r.end_ns.wrapping_sub(r.start_ns));
        for figure in [r.cpu_ms, r.wall_ms, r.memory_peak_bytes, r.bytes_in, r.bytes_out, r.status_code] {
            put_int(&mut rows, figure);
        }
        put_str(&mut rows, r.state);
        put_varint(&mut rows, word(r.period));
        put_varint(&mut rows, word(r.plan));
        put_int(&mut rows, r.received_ms.wrapping_sub(received));
        (start, received) = (r.start_ns, r.received_ms);
    }
    let mut out = Vec::with_capacity(rows.len() + 64);
    out.extend_from_slice(MAGIC);
    put_varint(&mut out, records.len() as u64);
    put_varint(&mut out, words.len() as u64);
    for w in &words {
        put_str(&mut out, w);
    }
    out.extend_from_slice(&rows);
    out
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

fn corrupt(why: &str) -> BillingError {
    BillingError::Corrupt { what: "usage segment", detail: why.to_string() }
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.data.get(self.at).ok_or_else(|| corrupt("it ends inside a number"))?;
            self.at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(corrupt("a number is too long"))
    }

    fn int(&mut self) -> Result<i64> {
        let raw = self.varint()?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    fn bytes(&mut self, len: u64) -> Result<&'a str> {
        let end = usize::try_from(len).ok().and_then(|len| self.at.checked_add(len));
        let bytes = end.and_then(|end| self.data.get(self.at..end)).ok_or_else(|| corrupt("it ends inside a text"))?;
        self.at += bytes.len();
        std::str::from_utf8(bytes).map_err(|_| corrupt("a text is not UTF-8"))
    }

    fn str(&mut self) -> Result<&'a str> {
        let len = self.varint()?;
        self.bytes(len)
    }

    fn opt(&mut self) -> Result<Option<&'a str>> {
        match self.varint()? {
            0 => Ok(None),
            len => self.bytes(len - 1).map(Some),
        }
    }
}

/// Calls `f` with each record of a segment's bytes, in order.
pub fn each<'a>(data: &'a [u8], mut f: impl FnMut(Stored<'a>) -> Result<()>) -> Result<()> {
    if data.get(..4) != Some(MAGIC) {
        return Err(corrupt("not a usage segment of this version"));
    }
    let mut r = Reader { data, at: 4 };
    let count = r.varint()?;
    let words = (0..r.varint()?).map(|_| r.str()).collect::<Result<Vec<_>>>()?;
    let word = |r: &mut Reader<'a>| -> Result<&'a str> {
        let i = r.varint()?;
        usize::try_from(i)
            .ok()
            .and_then(|i| words.get(i).copied())
            .ok_or_else(|| corrupt("a word is not in its dictionary"))
    };
    let (mut start, mut received) = (0i64, 0i64);
    for _ in 0..count {
        let usage_id = r.str()?;
        let kind = match r.data.get(r.at) {
            Some(0) => Kind::Invocation,
            Some(1) => Kind::State,
            Some(2) => Kind::Instance,
            _ => return Err(corrupt("an unknown kind")),
        };
        r.at += 1;
        let function = word(&mut r)?;
        let (flow_run, call_id) = (r.opt()?, r.opt()?);
        let (trace_id, span_id) = (r.str()?, r.str()?);
        start = start.wrapping_add(r.int()?);
        let end_ns = start.wrapping_add(r.int()?);
        let [cpu_ms, wall_ms, memory_peak_bytes, bytes_in, bytes_out, status_code] =
            [r.int()?, r.int()?, r.int()?, r.int()?, r.int()?, r.int()?];
        let state = r.str()?;
        let (period, plan) = (word(&mut r)?, word(&mut r)?);
        received = received.wrapping_add(r.int()?);
        f(Stored {
            usage_id,
            kind,
            function,
            flow_run,
            call_id,
            trace_id,
            span_id,
            start_ns: start,
            end_ns,
            cpu_ms,
            wall_ms,
            memory_peak_bytes,
            bytes_in,
            bytes_out,
            status_code,
            state,
            period,
            plan,
            received_ms: received,
        })?;
    }
    if r.at != data.len() {
        return Err(corrupt("bytes after its last record"));
    }
    Ok(())
}

/// The hash of a usage id in a segment's keys (FNV-1a, then SplitMix64's finalizer so that the
/// hashes spread evenly over 64 bits, for [`contains`]). Stored: it never changes.
pub fn key_hash(usage_id: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for byte in usage_id.bytes() {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The keys column of `records`: their hashes, sorted, little-endian.
pub fn keys_of(records: &[Stored<'_>]) -> (Vec<u64>, Vec<u8>) {
    let mut hashes: Vec<u64> = records.iter().map(|r| key_hash(r.usage_id)).collect();
    hashes.sort_unstable();
    let bytes = hashes.iter().flat_map(|h| h.to_le_bytes()).collect();
    (hashes, bytes)
}

fn hashes_of(bytes: &[u8]) -> Result<Vec<u64>> {
    if !bytes.len().is_multiple_of(8) {
        return Err(corrupt("its keys are not whole 64-bit hashes"));
    }
    Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// Whether the sorted hashes hold `h`: interpolation search (hashes are spread evenly, so a
/// few probes), then binary search if that has not converged.
pub fn contains(sorted: &[u64], h: u64) -> bool {
    let (mut lo, mut hi) = (0, sorted.len());
    for _ in 0..8 {
        if lo >= hi {
            return false;
        }
        let (a, b) = (sorted[lo], sorted[hi - 1]);
        if h < a || h > b {
            return false;
        }
        if a == b {
            return true;
        }
        let offset = (u128::from(h - a) * (hi - 1 - lo) as u128 / u128::from(b - a)) as usize;
        let probe = lo + offset;
        match sorted[probe].cmp(&h) {
            std::cmp::Ordering::Equal => return true,
            std::cmp::Ordering::Less => lo = probe + 1,
            std::cmp::Ordering::Greater => hi = probe,
        }
    }
    sorted[lo.min(hi)..hi].binary_search(&h).is_ok()
}

/// The usage-id hashes of each tenant's segments, for de-duplication: one lookup per record
/// however many segments a tenant has. Built from the segments' keys the first time a tenant
/// is billed in this process, then kept up to date with the segments written (by this process
/// or another: the segments it covers are checked against the catalog on every chunk).
#[derive(Default)]
pub struct KeyCache(Mutex<HashMap<String, TenantKeys>>);

#[derive(Default)]
struct TenantKeys {
    /// The segments whose hashes are in: segments never change and ids are never reused.
    covered: HashSet<i64>,
    /// Sorted hashes, and those added since (merged in when they are an eighth as many: a
    /// linear merge, about nine moves per hash over a tenant's life).
    sorted: Vec<u64>,
    recent: HashSet<u64>,
}

impl TenantKeys {
    fn contains(&self, h: u64) -> bool {
        self.recent.contains(&h) || contains(&self.sorted, h)
    }

    fn add(&mut self, hashes: &[u64]) {
        self.recent.extend(hashes);
        if self.recent.len() > 4096 && self.recent.len() * 8 > self.sorted.len() {
            let mut recent: Vec<u64> = self.recent.drain().collect();
            recent.sort_unstable();
            let old = std::mem::take(&mut self.sorted);
            self.sorted.reserve(old.len() + recent.len());
            let (mut i, mut j) = (0, 0);
            while i < old.len() || j < recent.len() {
                let next = match (old.get(i), recent.get(j)) {
                    (Some(a), Some(b)) if a <= b => {
                        i += 1;
                        *a
                    }
                    (_, Some(b)) => {
                        j += 1;
                        *b
                    }
                    (Some(a), None) => {
                        i += 1;
                        *a
                    }
                    (None, None) => unreachable!(),
                };
                if self.sorted.last() != Some(&next) {
                    self.sorted.push(next);
                }
            }
        }
    }
}

/// What a catalog row says of a segment.
#[derive(Debug, Clone)]
pub struct Listed {
    pub id: i64,
    pub tenant: String,
    pub billed_period: String,
    pub first_start_ns: i64,
    pub last_start_ns: i64,
    pub last_received_ms: i64,
}

/// The statements on segments, on one connection of either backend (the same code, compiled
/// for each by [`impl_conn`]); the logic above them ([`store`], [`merge`]) is written once.
pub(crate) trait Conn {
    /// The catalog rows of `tenant`'s segments (or every tenant's), by id.
    async fn list(&mut self, tenant: Option<&str>) -> Result<Vec<Listed>>;
    /// The segments of these tenants: (id, tenant, billed period, level).
    async fn segments_of(&mut self, tenants: &[&str]) -> Result<Vec<(i64, String, String, i64)>>;
    /// The ids of an invoice's segments of one level.
    async fn level_ids(&mut self, tenant: &str, billed_period: &str, level: i64) -> Result<Vec<i64>>;
    /// The (tenant, billed period, level) with [`FANOUT`] segments or more, for levels in
    /// `levels`.
    async fn full_levels(&mut self, levels: std::ops::Range<i64>) -> Result<Vec<(String, String, i64)>>;
    /// A segment's keys column.
    async fn keys(&mut self, id: i64) -> Result<Vec<u8>>;
    /// A segment's records' bytes.
    async fn data(&mut self, id: i64) -> Result<Vec<u8>>;
    /// Writes one segment of an invoice's records (in billing's order); returns its id and keys.
    async fn insert(&mut self, tenant: &str, billed_period: &str, records: &[Stored<'_>]) -> Result<(i64, Vec<u64>)>;
    async fn delete(&mut self, id: i64) -> Result<()>;
    /// Billing's watermark (0 before the first run).
    async fn watermark(&mut self) -> Result<i64>;
    /// The running totals of `tenant` (or every tenant).
    async fn totals(&mut self, tenant: Option<&str>) -> Result<Vec<(TotalsKey, Totals)>>;
}

const LIST: &str =
    "SELECT id, tenant, billed_period, first_start_ns, last_start_ns, last_received_ms FROM usage_segments";

macro_rules! impl_conn {
    ($conn:ty, $postgres:expr) => {
        impl Conn for $conn {
            async fn list(&mut self, tenant: Option<&str>) -> Result<Vec<Listed>> {
                let rows = match tenant {
                    Some(tenant) => {
                        let text = sql($postgres, &format!("{LIST} WHERE tenant = ? ORDER BY id"));
                        sqlx::query(text).bind(tenant).fetch_all(&mut *self).await?
                    }
                    None => sqlx::query(sql($postgres, &format!("{LIST} ORDER BY id"))).fetch_all(&mut *self).await?,
                };
                let listed = rows.iter().map(|row| {
                    Ok(Listed {
                        id: row.try_get(0)?,
                        tenant: row.try_get(1)?,
                        billed_period: row.try_get(2)?,
                        first_start_ns: row.try_get(3)?,
                        last_start_ns: row.try_get(4)?,
                        last_received_ms: row.try_get(5)?,
                    })
                });
                Ok(listed.collect::<Result<_, sqlx::Error>>()?)
            }

            async fn segments_of(&mut self, tenants: &[&str]) -> Result<Vec<(i64, String, String, i64)>> {
                let mut out = Vec::new();
                for part in tenants.chunks(500) {
                    let text = format!(
                        "SELECT id, tenant, billed_period, level FROM usage_segments WHERE tenant IN ({}) ORDER BY id",
                        vec!["?"; part.len()].join(", ")
                    );
                    let mut query = sqlx::query_as(sql($postgres, &text));
                    for tenant in part {
                        query = query.bind(*tenant);
                    }
                    out.extend(query.fetch_all(&mut *self).await?);
                }
                Ok(out)
            }

            async fn level_ids(&mut self, tenant: &str, billed_period: &str, level: i64) -> Result<Vec<i64>> {
                let text = sql(
                    $postgres,
                    "SELECT id FROM usage_segments WHERE tenant = ? AND billed_period = ? AND level = ? ORDER BY id",
                );
                Ok(sqlx::query_scalar(text).bind(tenant).bind(billed_period).bind(level).fetch_all(&mut *self).await?)
            }

            async fn full_levels(&mut self, levels: std::ops::Range<i64>) -> Result<Vec<(String, String, i64)>> {
                let text = sql(
                    $postgres,
                    "SELECT tenant, billed_period, level FROM usage_segments WHERE level >= ? AND level < ? \
                     GROUP BY tenant, billed_period, level HAVING COUNT(*) >= ?",
                );
                let query = sqlx::query_as(text).bind(levels.start).bind(levels.end).bind(FANOUT as i64);
                Ok(query.fetch_all(&mut *self).await?)
            }

            async fn keys(&mut self, id: i64) -> Result<Vec<u8>> {
                let text = sql($postgres, "SELECT keys FROM usage_segments WHERE id = ?");
                Ok(sqlx::query_scalar(text).bind(id).fetch_one(&mut *self).await?)
            }

            async fn data(&mut self, id: i64) -> Result<Vec<u8>> {
                let text = sql($postgres, "SELECT data FROM usage_segments WHERE id = ?");
                Ok(sqlx::query_scalar(text).bind(id).fetch_one(&mut *self).await?)
            }

            async fn insert(
                &mut self,
                tenant: &str,
                billed_period: &str,
                records: &[Stored<'_>],
            ) -> Result<(i64, Vec<u64>)> {
                let (hashes, keys) = keys_of(records);
                let starts = records.iter().map(|r| r.start_ns);
                let arrivals = records.iter().map(|r| r.received_ms);
                let text = sql(
                    $postgres,
                    "INSERT INTO usage_segments (tenant, billed_period, level, records, first_start_ns, last_start_ns, \
                     first_received_ms, last_received_ms, keys, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                );
                let id: i64 = sqlx::query_scalar(text)
                    .bind(tenant)
                    .bind(billed_period)
                    .bind(level(records.len()))
                    .bind(records.len() as i64)
                    .bind(starts.clone().min().unwrap_or(0))
                    .bind(starts.max().unwrap_or(0))
                    .bind(arrivals.clone().min().unwrap_or(0))
                    .bind(arrivals.max().unwrap_or(0))
                    .bind(keys)
                    .bind(encode(records))
                    .fetch_one(&mut *self)
                    .await?;
                Ok((id, hashes))
            }

            async fn delete(&mut self, id: i64) -> Result<()> {
                let text = sql($postgres, "DELETE FROM usage_segments WHERE id = ?");
                sqlx::query(text).bind(id).execute(&mut *self).await?;
                Ok(())
            }

            async fn watermark(&mut self) -> Result<i64> {
                let text = "SELECT value FROM billing_settings WHERE key = 'watermark_ms'";
                let value: Option<String> = sqlx::query_scalar(text).fetch_optional(&mut *self).await?;
                Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
            }

            async fn totals(&mut self, tenant: Option<&str>) -> Result<Vec<(TotalsKey, Totals)>> {
                let text = format!(
                    "SELECT tenant, billed_period, period, plan, function, records, invocations, errors, cpu_ms, \
                     wall_ms, bytes_out, state_byte_seconds FROM usage_totals{}",
                    if tenant.is_some() { " WHERE tenant = ?" } else { "" }
                );
                let mut query = sqlx::query(sql($postgres, &text));
                if let Some(tenant) = tenant {
                    query = query.bind(tenant);
                }
                let rows = query.fetch_all(&mut *self).await?;
                rows.iter()
                    .map(|row| {
                        let key = TotalsKey {
                            tenant: row.try_get(0)?,
                            billed_period: row.try_get(1)?,
                            period: row.try_get(2)?,
                            plan: row.try_get(3)?,
                            function: row.try_get(4)?,
                        };
                        let totals = Totals {
                            records: row.try_get(5)?,
                            invocations: row.try_get(6)?,
                            errors: row.try_get(7)?,
                            cpu_ms: row.try_get(8)?,
                            wall_ms: row.try_get(9)?,
                            bytes_out: row.try_get(10)?,
                            state_byte_seconds: crate::records::decimal_of(&row.try_get::<String, _>(11)?)?,
                        };
                        Ok((key, totals))
                    })
                    .collect()
            }
        }
    };
}

/// `text` with `?` placeholders in the backend's syntax.
fn sql(postgres: bool, text: &str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(if postgres { collector::store::numbered_placeholders(text) } else { text.to_string() })
}

impl_conn!(sqlx::SqliteConnection, false);
impl_conn!(sqlx::PgConnection, true);

/// What a snapshot read besides the records: billing's watermark and, if asked, the running
/// totals.
pub struct Snapshot {
    pub watermark: i64,
    pub totals: Vec<(TotalsKey, Totals)>,
}

/// Reads in one snapshot: the catalog of `tenant`'s segments (or every tenant's), the records
/// of those `keep` chooses (their bytes to `f`, one segment at a time, in id order; read them
/// with [`each`]), billing's watermark,
/// and with `totals` the running totals. Billing commits records, totals and watermark
/// together, so they agree.
pub async fn scan(
    db: &Db,
    tenant: Option<&str>,
    totals: bool,
    keep: impl Fn(&Listed) -> bool,
    mut f: impl FnMut(&Listed, &[u8], &Snapshot) -> Result<()>,
) -> Result<Snapshot> {
    let begin = match db {
        Db::Sqlite(_) => "BEGIN",
        Db::Postgres(_) => "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    };
    on_pool!(db, pool => {
        let mut tx = pool.begin_with(begin).await?;
        let watermark = tx.watermark().await?;
        let totals = if totals { tx.totals(tenant).await? } else { Vec::new() };
        let snapshot = Snapshot { watermark, totals };
        for listed in tx.list(tenant).await? {
            if keep(&listed) {
                f(&listed, &tx.data(listed.id).await?, &snapshot)?;
            }
        }
        tx.commit().await?;
        Ok(snapshot)
    })
}

/// Rows converted per transaction (a segment each).
const CONVERT_ROWS: i64 = 65_536;

/// Moves the rows of `usage_records` (the layout before segments), if that table is there,
/// into segments: an invoice at a time, [`CONVERT_ROWS`] rows per transaction (written as a
/// segment and deleted together, so an interrupted conversion resumes where it stopped), then
/// drops the table. The running totals already count those records and stay as they are.
/// Returns how many records were moved.
pub async fn convert_rows(db: &Db) -> Result<u64> {
    let exists = match db {
        Db::Sqlite(_) => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'usage_records'",
        Db::Postgres(_) => {
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'usage_records' \
             AND table_schema = current_schema()"
        }
    };
    let postgres = matches!(db, Db::Postgres(_));
    let mut moved = 0u64;
    on_pool!(db, pool => {
        let found: i64 = sqlx::query_scalar(exists).fetch_one(pool).await?;
        if found == 0 {
            return Ok(0);
        }
        let invoices: Vec<(String, String)> =
            sqlx::query_as("SELECT DISTINCT tenant, billed_period FROM usage_records").fetch_all(pool).await?;
        for (tenant, billed_period) in invoices {
            loop {
                let mut tx = pool.begin().await?;
                let text = sql(
                    postgres,
                    &format!(
                        "SELECT usage_id, kind, function, flow_run, call_id, trace_id, span_id, start_ns, end_ns, cpu_ms, \
                         wall_ms, memory_peak_bytes, bytes_in, bytes_out, status_code, state_byte_seconds, period, plan, \
                         received_ms FROM usage_records WHERE tenant = ? AND billed_period = ? \
                         ORDER BY start_ns, usage_id LIMIT {CONVERT_ROWS}"
                    ),
                );
                let rows = sqlx::query(text).bind(&tenant).bind(&billed_period).fetch_all(&mut *tx).await?;
                if rows.is_empty() {
                    break;
                }
                let records = rows
                    .iter()
                    .map(|row| {
                        Ok(UsageRecord {
                            tenant: tenant.clone(),
                            usage_id: row.try_get(0)?,
                            kind: Kind::parse(&row.try_get::<String, _>(1)?),
                            function: row.try_get(2)?,
                            flow_run: row.try_get(3)?,
                            call_id: row.try_get(4)?,
                            trace_id: row.try_get(5)?,
                            span_id: row.try_get(6)?,
                            start_ns: row.try_get(7)?,
                            end_ns: row.try_get(8)?,
                            cpu_ms: row.try_get(9)?,
                            wall_ms: row.try_get(10)?,
                            memory_peak_bytes: row.try_get(11)?,
                            bytes_in: row.try_get(12)?,
                            bytes_out: row.try_get(13)?,
                            status_code: row.try_get(14)?,
                            // Kept as stored (its text), below.
                            state_byte_seconds: Decimal::ZERO,
                            period: row.try_get(16)?,
                            billed_period: billed_period.clone(),
                            plan: row.try_get(17)?,
                            received_ms: row.try_get(18)?,
                        })
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()?;
                let states =
                    rows.iter().map(|row| row.try_get::<String, _>(15)).collect::<Result<Vec<_>, sqlx::Error>>()?;
                for state in &states {
                    crate::records::decimal_of(state)?;
                }
                let stored: Vec<Stored> = records.iter().zip(&states).map(|(r, s)| Stored::of(r, s)).collect();
                tx.insert(&tenant, &billed_period, &stored).await?;
                for r in &records {
                    let text = sql(postgres, "DELETE FROM usage_records WHERE tenant = ? AND usage_id = ?");
                    sqlx::query(text).bind(&tenant).bind(&r.usage_id).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                moved += records.len() as u64;
                tracing::info!(%tenant, %billed_period, records = moved, "moving usage records into segments");
            }
        }
        sqlx::query("DROP TABLE usage_records").execute(pool).await?;
    });
    Ok(moved)
}

/// A new record: its tenant and billed period, and the record.
pub type New<'a> = (&'a str, &'a str, Stored<'a>);

/// The sums of the records that were `new`, by totals key, with how many were new and how many
/// of them late (billed on a later invoice than their period's).
pub fn sum_new(records: &[New<'_>], new: &[bool]) -> Result<(HashMap<TotalsKey, Totals>, u64, u64)> {
    // Summed under borrowed keys; one owned key per group.
    let mut sums: HashMap<[&str; 5], Totals> = HashMap::new();
    let (mut count, mut late) = (0, 0);
    for ((tenant, billed_period, r), _) in records.iter().zip(new).filter(|(_, new)| **new) {
        sums.entry([tenant, billed_period, r.period, r.plan, r.function]).or_default().add(&r.totals()?);
        count += 1;
        late += u64::from(r.period != *billed_period);
    }
    let totals = sums
        .into_iter()
        .map(|([tenant, billed_period, period, plan, function], totals)| {
            let key = TotalsKey {
                tenant: tenant.into(),
                billed_period: billed_period.into(),
                period: period.into(),
                plan: plan.into(),
                function: function.into(),
            };
            (key, totals)
        })
        .collect();
    Ok((totals, count, late))
}

/// Stores the records that are new by (tenant, usage id) — `records` hold each key once — as
/// one segment per invoice, then merges full levels; inside the caller's transaction. Returns
/// which records were new.
pub(crate) async fn store(conn: &mut impl Conn, cache: &KeyCache, records: &[New<'_>]) -> Result<Vec<bool>> {
    let tenants: Vec<&str> =
        records.iter().map(|r| r.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    let mut ids: HashMap<String, Vec<i64>> = HashMap::new();
    for (id, tenant, ..) in conn.segments_of(&tenants).await? {
        ids.entry(tenant).or_default().push(id);
    }
    // Each tenant's index brought up to its segments (taken out of the cache meanwhile: the
    // run lock makes this the only writer).
    let mut index: HashMap<&str, TenantKeys> = HashMap::new();
    for tenant in &tenants {
        let mut keys = cache.0.lock().expect("key cache").remove(*tenant).unwrap_or_default();
        let listed = ids.remove(*tenant).unwrap_or_default();
        keys.covered.retain(|id| listed.contains(id));
        for id in listed {
            if !keys.covered.contains(&id) {
                keys.add(&hashes_of(&conn.keys(id).await?)?);
                keys.covered.insert(id);
            }
        }
        index.insert(tenant, keys);
    }
    let mut new = Vec::with_capacity(records.len());
    let mut verified: HashMap<&str, HashSet<String>> = HashMap::new();
    for (tenant, _, record) in records {
        let seen = index[tenant].contains(key_hash(record.usage_id))
            && verified_in(conn, &mut verified, tenant, record.usage_id).await?;
        new.push(!seen);
    }
    let mut invoices: BTreeMap<(&str, &str), Vec<usize>> = BTreeMap::new();
    for (i, (tenant, billed_period, _)) in records.iter().enumerate().filter(|(i, _)| new[*i]) {
        invoices.entry((tenant, billed_period)).or_default().push(i);
    }
    for ((tenant, billed_period), indexes) in invoices {
        let mut records: Vec<Stored> = indexes.into_iter().map(|i| records[i].2).collect();
        records.sort_unstable_by(|a, b| a.order().cmp(&b.order()));
        let (id, hashes) = conn.insert(tenant, billed_period, &records).await?;
        let keys = index.get_mut(tenant).expect("indexed");
        keys.add(&hashes);
        keys.covered.insert(id);
    }
    let mut cache = cache.0.lock().expect("key cache");
    for (tenant, keys) in index {
        cache.insert(tenant.to_string(), keys);
    }
    Ok(new)
}

/// Whether a tenant's segments hold a record of `usage_id` (its hash was found: a duplicate,
/// or rarely a collision). The tenant's usage ids are read once per chunk, when the first of
/// its hashes is found.
async fn verified_in<'a>(
    conn: &mut impl Conn,
    verified: &mut HashMap<&'a str, HashSet<String>>,
    tenant: &'a str,
    usage_id: &str,
) -> Result<bool> {
    if !verified.contains_key(tenant) {
        let mut ids = HashSet::new();
        for id in conn.segments_of(&[tenant]).await?.into_iter().map(|(id, ..)| id) {
            each(&conn.data(id).await?, |r| {
                ids.insert(r.usage_id.to_string());
                Ok(())
            })?;
        }
        verified.insert(tenant, ids);
    }
    Ok(verified[tenant].contains(usage_id))
}

/// Segments of this level and above are never merged: a merge holds its records in memory
/// (level 3 is up to 524 288 records).
pub const TOP_LEVEL: i64 = 3;

/// Merges every full level below [`TOP_LEVEL`] (of an invoice that has [`FANOUT`] segments of
/// it), each merge in a transaction of its own, until none is full; returns how many segments
/// were merged away. This runs after billing runs, out of extraction's way.
pub async fn merge_levels(db: &Db, cache: &KeyCache) -> Result<u64> {
    let mut merged = 0;
    loop {
        let full = on_pool!(db, pool => pool.acquire().await?.full_levels(0..TOP_LEVEL).await?);
        if full.is_empty() {
            return Ok(merged);
        }
        for (tenant, billed_period, level) in full {
            on_pool!(db, pool => {
                let mut tx = match db {
                    Db::Sqlite(_) => pool.begin_with("BEGIN IMMEDIATE").await?,
                    Db::Postgres(_) => {
                        let mut tx = pool.begin().await?;
                        sqlx::query("SELECT pg_advisory_xact_lock(7305011)").execute(&mut *tx).await?;
                        tx
                    }
                };
                let (ids, into) = merge(&mut *tx, &tenant, &billed_period, level).await?;
                tx.commit().await?;
                merged += ids.len() as u64;
                // The merged segment holds the hashes of those it replaced.
                if let (Some(into), Some(keys)) = (into, cache.0.lock().expect("key cache").get_mut(&tenant))
                    && ids.iter().all(|id| keys.covered.contains(id))
                {
                    keys.covered.retain(|id| !ids.contains(id));
                    keys.covered.insert(into);
                }
            });
        }
    }
}

/// Merges the oldest [`FANOUT`] of an invoice's segments of one level into one, if it has that
/// many; returns the ids merged away and the new segment's.
async fn merge(conn: &mut impl Conn, tenant: &str, billed_period: &str, level: i64) -> Result<(Vec<i64>, Option<i64>)> {
    let mut ids = conn.level_ids(tenant, billed_period, level).await?;
    if ids.len() < FANOUT {
        return Ok((Vec::new(), None));
    }
    // The oldest FANOUT: a merge's records are in memory at once.
    ids.truncate(FANOUT);
    let mut blobs = Vec::with_capacity(ids.len());
    for id in &ids {
        blobs.push(conn.data(*id).await?);
    }
    let mut records = Vec::new();
    for blob in &blobs {
        each(blob, |r| {
            records.push(r);
            Ok(())
        })?;
    }
    records.sort_unstable_by(|a, b| a.order().cmp(&b.order()));
    let (id, _) = conn.insert(tenant, billed_period, &records).await?;
    for old in &ids {
        conn.delete(*old).await?;
    }
    Ok((ids, Some(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> UsageRecord {
        UsageRecord {
            tenant: "acme".into(),
            usage_id: format!("0190b4e2-7c3a-7d2e-9f00-{i:012x}"),
            kind: [Kind::Invocation, Kind::State, Kind::Instance][i % 3],
            function: format!("f{}", i % 4),
            flow_run: i.is_multiple_of(2).then(|| format!("run-{i}")),
            call_id: i.is_multiple_of(5).then(String::new),
            trace_id: format!("{i:032x}"),
            span_id: format!("{i:016x}"),
            start_ns: 1_790_000_000_000_000_000 + (i as i64 % 7) * 1_000 - 3_000,
            end_ns: i64::MAX - i as i64,
            cpu_ms: i as i64,
            wall_ms: i64::MIN + i as i64,
            memory_peak_bytes: 1 << 20,
            bytes_in: 0,
            bytes_out: -1,
            status_code: 200,
            state_byte_seconds: Decimal::new(150 + i as i64, 2),
            period: "2026-10".into(),
            billed_period: "2026-11".into(),
            plan: ["free", "pro"][i % 2].into(),
            received_ms: 1_790_000_000_000 - i as i64,
        }
    }

    #[test]
    fn a_segment_gives_back_every_field_of_every_record() {
        let records: Vec<UsageRecord> = (0..300).map(record).collect();
        let states: Vec<String> = records.iter().map(|r| r.state_byte_seconds.to_string()).collect();
        let stored: Vec<Stored> = records.iter().zip(&states).map(|(r, s)| Stored::of(r, s)).collect();
        let bytes = encode(&stored);
        let mut back = Vec::new();
        each(&bytes, |r| {
            back.push(r.to_record("acme", "2026-11")?);
            Ok(())
        })
        .unwrap();
        assert_eq!(back, records);
        // Every cut of the bytes is an error, never a panic or a shorter list.
        for cut in 0..bytes.len() {
            assert!(each(&bytes[..cut], |_| Ok(())).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn keys_find_every_member_and_few_others() {
        let ids: Vec<String> = (0..50_000).map(|i| format!("0190b4e2-7c3a-7d2e-9f00-{i:012x}")).collect();
        let mut hashes: Vec<u64> = ids.iter().map(|id| key_hash(id)).collect();
        hashes.sort_unstable();
        assert!(ids.iter().all(|id| contains(&hashes, key_hash(id))));
        let strangers =
            (50_000..100_000).filter(|i| contains(&hashes, key_hash(&format!("0190b4e2-7c3a-7d2e-9f00-{i:012x}"))));
        assert_eq!(strangers.count(), 0);
        // Uneven arrays: duplicates, extremes, one element, none.
        let odd = [0, 0, 5, 5, 5, 9, u64::MAX];
        for h in [0, 5, 9, u64::MAX] {
            assert!(contains(&odd, h));
        }
        for h in [1, 6, 10, u64::MAX - 1] {
            assert!(!contains(&odd, h));
        }
        assert!(contains(&[7], 7) && !contains(&[7], 8) && !contains(&[], 7));
    }

    #[test]
    fn levels_grow_by_the_fanout() {
        assert_eq!([level(0), level(1024), level(1025), level(8192), level(8193)], [0, 0, 1, 1, 2]);
    }
}
