//! Extraction: metered spans become usage records, one chunk of arrivals per transaction with
//! the watermark.
//!
//! The chunk's metered `invoke`/`state.usage` spans are read as stored; the rules below are
//! applied in Rust, once for both databases; the records whose (tenant, usage id) is new are
//! stored as segments (`segments/`) and added to the running totals.
//!
//! What makes a span billable (docs/contracts.md, "Telemetry contract"): an `invoke <function>` span with
//! `sfaas.billable = true` and a `faas.invocation_id`, or a `state.usage` span with a
//! `sfaas.usage_id` and decimal `sfaas.state.byte_seconds` (a JSON string of digits with an
//! optional fraction). Anything else named like them is counted as malformed and skipped.
//! Attributes must be a JSON object; ids and names are JSON strings or numbers (written as their
//! JSON text; anything else counts as absent); usage figures are whole numbers of at least 0
//! (absent counts 0; negative, fractional or text ones make the span malformed), and CPU-ms
//! may not exceed the span's duration on 1 024 cores. An invocation's id is the gateway's
//! execution id, a UUID; an instance's usage id starts with `instance/`: ids of another form
//! are malformed, so that no record of one kind can take another's key. Among copies of one usage id, the first to
//! arrive is kept (ordered by arrival, then trace and span id).

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt;

use rust_decimal::Decimal;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use collector::store::{MeteredSpan as Span, TelemetryStore};

use crate::Result;
use crate::db::{Db, on_pool};
use crate::period::{Period, PeriodKind};
use crate::rate_card::{PLAN_ASSIGNMENTS, assignments};
use crate::segments::{KeyCache, New};
use crate::totals::add_totals;
use crate::usage::{Kind, Totals, TotalsKey};

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
    /// Candidates that named usage already recorded, or recorded by an earlier span of the
    /// chunk.
    pub duplicates: u64,
}

/// One attribute value, as far as extraction reads it.
#[derive(Debug, Default)]
enum Attr<'a> {
    #[default]
    Absent,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(Cow<'a, str>),
    /// `null`, an array or an object.
    Other,
}

impl<'a> Attr<'a> {
    /// An id: a string, or a number's JSON text.
    fn id(&self) -> Option<Cow<'a, str>> {
        match self {
            Attr::Text(text) => Some(text.clone()),
            Attr::Int(n) => Some(n.to_string().into()),
            Attr::Float(x) => Some(serde_json::Number::from_f64(*x)?.to_string().into()),
            _ => None,
        }
    }

    /// A usage figure: a whole number of at least 0, or 0 when absent; anything else
    /// (negative, fractional, text) is no figure, and its span is malformed.
    fn figure(&self) -> Option<i64> {
        match self {
            Attr::Absent => Some(0),
            Attr::Int(n) if *n >= 0 => Some(*n),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Attr<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Values<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Values<'a> {
            type Value = Attr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Attr<'a>, E> {
                Ok(Attr::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Attr<'a>, E> {
                Ok(Attr::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Attr<'a>, E> {
                Ok(i64::try_from(v).map_or(Attr::Float(v as f64), Attr::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Attr<'a>, E> {
                Ok(Attr::Float(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Attr<'a>, E> {
                Ok(Attr::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Attr<'a>, E> {
                Ok(Attr::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_unit<E>(self) -> Result<Attr<'a>, E> {
                Ok(Attr::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Attr<'a>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Attr::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Attr<'a>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Attr::Other)
            }
        }
        deserializer.deserialize_any(Values(std::marker::PhantomData))
    }
}

/// The attributes extraction reads (docs/contracts.md, "Telemetry contract"); the others are skipped unparsed.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Attributes<'a> {
    #[serde(rename = "sfaas.billable", borrow)]
    billable: Attr<'a>,
    #[serde(rename = "faas.invocation_id", borrow)]
    invocation_id: Attr<'a>,
    #[serde(rename = "faas.name", borrow)]
    function: Attr<'a>,
    #[serde(rename = "sfaas.call_id", borrow)]
    call_id: Attr<'a>,
    #[serde(rename = "sfaas.flow.run_id", borrow)]
    run_id: Attr<'a>,
    #[serde(rename = "sfaas.state.job", borrow)]
    job: Attr<'a>,
    #[serde(rename = "sfaas.state.owner", borrow)]
    owner: Attr<'a>,
    #[serde(rename = "sfaas.usage_id", borrow)]
    usage_id: Attr<'a>,
    #[serde(rename = "sfaas.state.byte_seconds", borrow)]
    byte_seconds: Attr<'a>,
    #[serde(rename = "sfaas.cpu_ms", borrow)]
    cpu_ms: Attr<'a>,
    #[serde(rename = "sfaas.wall_ms", borrow)]
    wall_ms: Attr<'a>,
    #[serde(rename = "sfaas.memory.peak_bytes", borrow)]
    memory: Attr<'a>,
    #[serde(rename = "sfaas.bytes_in", borrow)]
    bytes_in: Attr<'a>,
    #[serde(rename = "sfaas.bytes_out", borrow)]
    bytes_out: Attr<'a>,
    #[serde(rename = "sfaas.log_bytes", borrow)]
    log_bytes: Attr<'a>,
    #[serde(rename = "http.response.status_code", borrow)]
    status: Attr<'a>,
}

/// A record's usage figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Figures {
    cpu_ms: i64,
    wall_ms: i64,
    memory_peak_bytes: i64,
    bytes_in: i64,
    bytes_out: i64,
    log_bytes: i64,
    status_code: i64,
}

/// A usage record about to be inserted (the columns of `usage_records`, in order): its span and
/// what the rules read from it. It owns its data, so that a chunk is read and parsed on one
/// thread while the chunk before is written on another; the plan is chosen when it is written.
struct Record {
    span: Span,
    usage_id: String,
    kind: Kind,
    function: String,
    flow_run: Option<String>,
    /// The caller's call id (invocations).
    call_id: Option<String>,
    figures: Figures,
    state: (String, Decimal),
    period: Period,
}

impl Record {
    fn key(&self) -> (&str, &str) {
        (&self.span.tenant, &self.usage_id)
    }

    fn arrival(&self) -> (i64, &str, &str) {
        (self.span.received_ms, &self.span.trace_id, &self.span.span_id)
    }

    /// The record as a segment stores it, billed where `billed` says.
    fn stored<'a>(&'a self, billed: &Billed<'a>) -> crate::segments::Stored<'a> {
        let (s, f) = (&self.span, self.figures);
        crate::segments::Stored {
            usage_id: &self.usage_id,
            kind: self.kind,
            function: &self.function,
            flow_run: self.flow_run.as_deref(),
            call_id: self.call_id.as_deref(),
            trace_id: &s.trace_id,
            span_id: &s.span_id,
            start_ns: s.start_ns,
            end_ns: s.end_ns,
            cpu_ms: f.cpu_ms,
            wall_ms: f.wall_ms,
            memory_peak_bytes: f.memory_peak_bytes,
            bytes_in: f.bytes_in,
            bytes_out: f.bytes_out,
            log_bytes: f.log_bytes,
            status_code: f.status_code,
            state: &self.state.0,
            period: billed.period,
            plan: billed.plan,
            received_ms: s.received_ms,
        }
    }
}

/// Where a record is billed, settled once per record when its chunk is written: the keys of its
/// period and of the invoice it goes on, and the tenant's plan at its start.
struct Billed<'a> {
    period: &'a str,
    billed_period: &'a str,
    plan: &'a str,
}

/// Cores a span's CPU time may have run on at once, at most: CPU-ms over (its duration + 1 ms)
/// × this are malformed.
const MAX_CORES: i64 = 1024;

/// A UUID in its canonical text: 8-4-4-4-12 hexadecimal digits.
fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text
            .bytes()
            .enumerate()
            .all(|(i, b)| if [8, 13, 18, 23].contains(&i) { b == b'-' } else { b.is_ascii_hexdigit() })
}

/// Digits with an optional fraction: `^[0-9]+(\.[0-9]+)?$`.
fn is_decimal(text: &str) -> bool {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, "1"));
    [whole, fraction].iter().all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

/// Each tenant's plans, ordered by the time they take effect.
struct Plans(crate::Assignments);

impl Plans {
    /// The plan in effect at `ns`, or the tenant's first plan for usage before it.
    fn at(&self, tenant: &str, ns: i64) -> Option<&str> {
        let plans = self.0.get(tenant)?;
        let index = plans.partition_point(|(from, _)| *from <= ns).saturating_sub(1);
        plans.get(index).map(|(_, plan)| plan.as_str())
    }
}

/// The key of each period a chunk's spans fall in, and of the invoice its usage is billed on:
/// usage of a final period is late and billed on the period after the last final one.
struct PeriodKeys(HashMap<Period, (String, String)>);

impl PeriodKeys {
    fn new(final_through: Option<Period>, periods: impl IntoIterator<Item = Period>) -> Self {
        let mut keys = HashMap::new();
        for period in periods {
            keys.entry(period).or_insert_with_key(|period: &Period| {
                let billed = match final_through {
                    Some(last) if *period <= last => last.next(),
                    _ => *period,
                };
                (period.key(), billed.key())
            });
        }
        Self(keys)
    }

    /// The keys of a period and of the invoice its usage is billed on.
    fn keys(&self, period: Period) -> (&str, &str) {
        let (key, billed) = &self.0[&period];
        (key, billed)
    }
}

/// The chunk's spans as records, in key order, the first arrival of each usage id only; with
/// the number of candidates and of malformed ones.
fn records(spans: Vec<Span>, period_kind: PeriodKind) -> (Vec<Record>, u64, u64) {
    let (mut candidates, mut malformed) = (0, 0);
    let mut out = Vec::with_capacity(spans.len());
    for span in spans {
        let kind = match span.name.as_str() {
            contract::semconv::SPAN_STATE_USAGE => Kind::State,
            contract::semconv::SPAN_INSTANCE_USAGE => Kind::Instance,
            _ => Kind::Invocation,
        };
        let state = kind == Kind::State;
        let parsed = span.attributes.starts_with('{').then(|| serde_json::from_str::<Attributes>(&span.attributes));
        let Some(Ok(a)) = parsed else {
            // Not a JSON object of distinct keys (the collector never stores one).
            candidates += 1;
            malformed += 1;
            continue;
        };
        if !state && !matches!(a.billable, Attr::Bool(true)) {
            continue;
        }
        candidates += 1;
        let no_state = || (Cow::Borrowed("0"), Decimal::ZERO);
        let usage = match kind {
            Kind::State => {
                let byte_seconds = match &a.byte_seconds {
                    Attr::Text(text) if is_decimal(text) => text.parse::<Decimal>().ok().map(|d| (text.clone(), d)),
                    _ => None,
                };
                a.usage_id.id().zip(byte_seconds)
            }
            // Its id must be the platform's own kind of id, so that no other record's is taken.
            Kind::Instance => a
                .usage_id
                .id()
                .filter(|id| id.starts_with("instance/") && a.function.id().is_some())
                .map(|id| (id, no_state())),
            // The gateway's execution id: a UUID, never a caller's text.
            Kind::Invocation => a.invocation_id.id().filter(|id| is_uuid(id)).map(|id| (id, no_state())),
        };
        let Some((usage_id, (byte_seconds, state_decimal))) = usage else {
            malformed += 1;
            continue;
        };
        let (usage_id, byte_seconds) = (usage_id.into_owned(), byte_seconds.into_owned());
        let function = match state {
            true => String::new(),
            false => a.function.id().map_or_else(
                || span.name.strip_prefix(contract::semconv::INVOKE_SPAN_PREFIX).unwrap_or("").into(),
                Cow::into_owned,
            ),
        };
        let flow_run = match state {
            true => matches!(&a.owner, Attr::Text(owner) if owner == "job").then(|| a.job.id()).flatten(),
            false => a.run_id.id().or_else(|| a.job.id()),
        }
        .map(Cow::into_owned);
        let call_id = (kind == Kind::Invocation).then(|| a.call_id.id()).flatten().map(Cow::into_owned);
        let figures = (|| {
            Some(Figures {
                cpu_ms: a.cpu_ms.figure()?,
                wall_ms: a.wall_ms.figure()?,
                memory_peak_bytes: a.memory.figure()?,
                bytes_in: a.bytes_in.figure()?,
                bytes_out: a.bytes_out.figure()?,
                log_bytes: a.log_bytes.figure()?,
                status_code: a.status.figure()?,
            })
        })();
        // CPU beyond what the span's time on every core allows is not usage but an error.
        let duration_ms = (span.end_ns.saturating_sub(span.start_ns) / 1_000_000).max(1);
        let Some(figures) = figures.filter(|f| f.cpu_ms <= duration_ms.saturating_add(1).saturating_mul(MAX_CORES))
        else {
            malformed += 1;
            continue;
        };
        drop(a);
        // Read: the record keeps the span's ids and times, not its attributes' text.
        let span = Span { attributes: String::new(), name: String::new(), ..span };
        out.push(Record {
            period: Period::containing(period_kind, span.start_ns),
            span,
            usage_id,
            kind,
            function,
            flow_run,
            call_id,
            figures,
            state: (byte_seconds, state_decimal),
        });
    }
    // By key, and within a key by arrival: the first is kept.
    out.sort_unstable_by(|a, b| a.key().cmp(&b.key()).then_with(|| a.arrival().cmp(&b.arrival())));
    out.dedup_by(|later, first| later.key() == first.key());
    (out, candidates, malformed)
}

/// The spans that arrived in `(after_ms, upto_ms]`, read and turned into records: the part of
/// extraction that writes nothing, so that it runs while the chunk before is written
/// ([`write`]). Reading outside the writing transaction sees the same spans: arrivals at or
/// before the billing run's upper bound are settled before the run starts (`Billing::run`).
pub struct Prepared {
    upto_ms: i64,
    /// Every tenant with a span in the chunk (pinned to the default plan if it has none).
    tenants: Vec<String>,
    records: Vec<Record>,
    periods: PeriodKeys,
    candidates: u64,
    malformed: u64,
    /// Candidates whose usage an earlier span of the chunk named.
    duplicates: u64,
}

impl Prepared {
    pub fn upto_ms(&self) -> i64 {
        self.upto_ms
    }
}

/// Reads the chunk `(after_ms, upto_ms]` and applies the rules (on a blocking thread: parsing a
/// chunk is tens of milliseconds of CPU per 10 000 spans).
pub async fn prepare(
    telemetry: &TelemetryStore,
    kind: PeriodKind,
    final_through: Option<Period>,
    after_ms: i64,
    upto_ms: i64,
) -> Result<Prepared> {
    let spans = telemetry.metered_spans(after_ms, upto_ms).await?;
    let parse = move || {
        let tenants: BTreeSet<&str> = spans.iter().map(|span| span.tenant.as_str()).collect();
        let tenants = tenants.into_iter().map(str::to_owned).collect();
        let (records, candidates, malformed) = records(spans, kind);
        let duplicates = candidates - malformed - records.len() as u64;
        let periods = PeriodKeys::new(final_through, records.iter().map(|record| record.period));
        Prepared { upto_ms, tenants, records, periods, candidates, malformed, duplicates }
    };
    Ok(tokio::task::spawn_blocking(parse).await?)
}

/// Writes a prepared chunk in one transaction: pins tenants without a plan to the default one,
/// inserts the records with the plan in effect at their start (those already stored are
/// skipped), adds the new ones to the running totals and moves the watermark to the chunk's end.
pub async fn write(db: &Db, keys: &KeyCache, default_plan: &str, prepared: Prepared) -> Result<Chunk> {
    let sqlite = matches!(db, Db::Sqlite(_));
    let watermark = db.sql(
        "INSERT INTO billing_settings (key, value) VALUES ('watermark_ms', ?) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    );
    let Prepared { upto_ms, tenants, records, periods, candidates, malformed, duplicates } = prepared;
    let mut out = Chunk { candidates, malformed, duplicates, ..Chunk::default() };
    on_pool!(db, pool => {
        // SQLite: take the write lock first; a read that later upgrades to a write fails with
        // SQLITE_BUSY_SNAPSHOT when the collector committed in between (busy_timeout cannot wait
        // that out).
        let mut tx = if sqlite { pool.begin_with("BEGIN IMMEDIATE").await? } else { pool.begin().await? };
        if !sqlite {
            // One writer of the totals at a time, across processes (read-add-write below).
            sqlx::query("SELECT pg_advisory_xact_lock(7305011)").execute(&mut *tx).await?;
        }
        if !tenants.is_empty() {
            // Read in the transaction: the plans the records are pinned to.
            let mut plans = Plans(assignments(sqlx::query_as(PLAN_ASSIGNMENTS).fetch_all(&mut *tx).await?));
            // A tenant billed for the first time is pinned to the default plan.
            let pin = "INSERT INTO tenant_plans (tenant, effective_from_ns, plan) VALUES (?, 0, ?) ON CONFLICT DO NOTHING";
            for tenant in tenants {
                if let std::collections::btree_map::Entry::Vacant(entry) = plans.0.entry(tenant) {
                    sqlx::query(db.sql(pin)).bind(entry.key()).bind(default_plan).execute(&mut *tx).await?;
                    entry.insert(vec![(0, default_plan.to_string())]);
                }
            }
            let billed: Vec<Billed> = records
                .iter()
                .map(|r| {
                    let (period, billed_period) = periods.keys(r.period);
                    let plan = plans.at(&r.span.tenant, r.span.start_ns).unwrap_or(default_plan);
                    Billed { period, billed_period, plan }
                })
                .collect();
            let stored: Vec<New> = records
                .iter()
                .zip(&billed)
                .map(|(r, b)| (r.span.tenant.as_str(), b.billed_period, r.stored(b)))
                .collect();
            let new = crate::segments::store(&mut *tx, keys, &stored).await?;
            (out.totals, out.records, out.late_records) = crate::segments::sum_new(&stored, &new)?;
            out.duplicates += records.len() as u64 - out.records;
            add_totals(db, &mut tx, out.totals.clone()).await?;
        }
        sqlx::query(watermark).bind(upto_ms.to_string()).execute(&mut *tx).await?;
        tx.commit().await?;
    });
    Ok(out)
}

#[cfg(test)]
mod tests;
