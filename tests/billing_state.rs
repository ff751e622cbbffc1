//! State byte-seconds from the store to the invoice, across a UTC day boundary (docs/contracts.md,
//! "Telemetry contract" and "Billing contract"): the usage records the state store drains,
//! emitted as the core emits them (`state.usage` spans), stored by the collector's store and
//! billed with daily periods, bill each day exactly the store's own integral over that day: per
//! tenant, per job and for standing storage, with nothing counted twice or missed, also when
//! every record is delivered again.
//!
//! Timeline (B = 2026-11-01T00:00:00Z, a 60 s usage interval, a manual clock):
//! - acme, B − 120 s: job run1 registered; run1/tmp/a (1000 B), run1/out/p (2500 B, persist),
//!   standing lookup/s (777 B). (Sizes are values; each object holds, and is billed for, its
//!   value, its address and 128 B.)
//! - acme, B − 99.876543211 s: standing cache/t (4096 B, TTL 170 s: expires after B).
//! - acme, B − 74.5 s: run1/tmp/d (333 B), deleted at B + 40.333 s.
//! - acme, B − 30.25 s: run1/tmp/a replaced by 1500 B.
//! - globex, B − 1 ns: lookup/k (10 B), deleted at B + 1 ns (145 byte-ns on each side of B).
//! - acme, B + 90.000000001 s: run1 deregistered (p moves to standing storage).
//! - acme, B + 130 s: job run2 registered, run2/x/y (64 B).
//! - B + 180.5 s: shutdown-style final report (`take_usage_final`), then on to B + 1 day, where
//!   run2 is deregistered.
//!
//! The store is drained every 13 s of the clock and at every step, as the core's housekeeping
//! does, and its totals are read at B − 1 day, B and B + 1 day.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use billing::Billing;
use billing::invoice::LineKind;
use billing::period::{Period, PeriodKind};
use billing::plans::Metric;
use collector::model::{Batch, SpanRow};
use collector::store::TelemetryStore;
use stateful_faas_core::semconv;
use stateful_faas_core::state::metering::{ByteSeconds, ManualClock};
use stateful_faas_core::state::{ObjectKey, Owner, PutOptions, StateConfig, StateStore, UsageInterval};
use stateful_faas_core::tenant::TenantId;

const CARD: &str = r#"
period: day
grace_hours: 0
default_plan: metered
plans:
  metered:
    currency: EUR
    prices:
      state_byte_seconds: { unit: byte-s, unit_price: "0.000001" }
"#;

const S: i64 = 1_000_000_000;
const DAY: i64 = 86_400 * S;

/// Exact byte·nanoseconds of a non-negative decimal with at most 9 fractional digits.
fn byte_nanos(decimal: &str) -> u128 {
    let (int, fraction) = decimal.split_once('.').unwrap_or((decimal, ""));
    assert!(fraction.len() <= 9 && !int.starts_with('-'), "{decimal:?} is not whole byte-nanoseconds");
    int.parse::<u128>().unwrap() * 1_000_000_000 + format!("{fraction:0<9}").parse::<u128>().unwrap()
}

/// A tenant's totals at one instant: all, standing, and registered jobs (byte·ns).
#[derive(Debug, Clone, Default)]
struct Reading {
    total: u128,
    standing: u128,
    jobs: BTreeMap<String, u128>,
}

fn read(store: &StateStore) -> BTreeMap<String, Reading> {
    store
        .usage_by_tenant()
        .into_iter()
        .map(|(tenant, usage)| {
            // The decimal text is what billing reads; it must be the exact integral.
            assert_eq!(byte_nanos(&usage.total.to_decimal_string()), usage.total.byte_nanos());
            let reading = Reading {
                total: usage.total.byte_nanos(),
                standing: usage.standing.byte_nanos(),
                jobs: usage.jobs.iter().map(|(job, b)| (job.clone(), b.byte_nanos())).collect(),
            };
            (tenant.to_string(), reading)
        })
        .collect()
}

/// A usage record as `Telemetry::emit_state_usage` exports it and the collector stores it: an
/// INTERNAL root span of the tenant's `sfaas-core` resource, metered (sent with the meter
/// token). `n` makes its trace and span ids unique.
fn state_usage_span(tenant: &TenantId, record: &UsageInterval, n: u64) -> SpanRow {
    let mut attributes = serde_json::Map::new();
    match &record.owner {
        Owner::Standing => {
            attributes.insert(semconv::SFAAS_STATE_OWNER.into(), semconv::STATE_OWNER_STANDING.into());
        }
        Owner::Job(job) => {
            attributes.insert(semconv::SFAAS_STATE_OWNER.into(), semconv::STATE_OWNER_JOB.into());
            attributes.insert(semconv::SFAAS_STATE_JOB.into(), job.clone().into());
        }
    }
    attributes.insert(semconv::SFAAS_STATE_BYTE_SECONDS.into(), record.byte_seconds.to_decimal_string().into());
    attributes.insert(semconv::SFAAS_USAGE_ID.into(), record.usage_id().into());
    attributes.insert(semconv::SFAAS_BILLABLE.into(), true.into());
    SpanRow {
        tenant: tenant.to_string(),
        trace_id: format!("{:032x}", (u128::from(n) << 64) | 0x5ae7),
        span_id: format!("{:016x}", n | (1 << 60)),
        parent_span_id: None,
        name: semconv::SPAN_STATE_USAGE.into(),
        kind: 1, // SPAN_KIND_INTERNAL
        start_ns: record.start_ns as i64,
        end_ns: record.end_ns as i64,
        status_code: 0,
        status_message: String::new(),
        service_name: semconv::SERVICE_NAME.into(),
        attributes: serde_json::Value::Object(attributes).to_string(),
        events: "[]".into(),
        links: "[]".into(),
        resource: serde_json::json!({
            semconv::ATTR_SERVICE_NAME: semconv::SERVICE_NAME,
            semconv::ATTR_SERVICE_NAMESPACE: tenant.to_string(),
        })
        .to_string(),
        scope: serde_json::json!({"name": semconv::SERVICE_NAME, "version": ""}).to_string(),
        metered: true,
    }
}

/// Everything the store and billing are checked against.
struct Expected {
    /// Store readings at B − 1 day, B and B + 1 day.
    readings: [BTreeMap<String, Reading>; 3],
    /// What `deregister` returned, by (tenant, job).
    deregistered: BTreeMap<(String, String), u128>,
    /// Every drained record.
    records: Vec<(TenantId, UsageInterval)>,
}

/// Runs the timeline on a store with a manual clock.
fn run_store(b: i64) -> Expected {
    let clock = Arc::new(ManualClock::new((b - DAY) as u64));
    let config = StateConfig { usage_interval: Duration::from_secs(60), ..StateConfig::default() };
    let store = StateStore::new(config, clock.clone(), Default::default());
    let acme = TenantId::new("acme").unwrap();
    let globex = TenantId::new("globex").unwrap();
    let key = |job: Option<&str>, bucket: &str, key: &str| ObjectKey::new(job, bucket, key).unwrap();
    let value = |bytes: usize| vec![7u8; bytes].into();
    let plain = PutOptions::default();

    // Nothing before the tenants' first use.
    let start = read(&store);
    assert!(start.is_empty(), "{start:?}");

    let mut records = Vec::new();
    let mut deregistered = BTreeMap::new();
    let mut at_boundary = None;
    let events: Vec<(i64, &str)> = vec![
        (b - 120 * S, "acme: run1, a, p, s"),
        (b - 99 * S - 876_543_211, "acme: t with a TTL"),
        (b - 74 * S - 500_000_000, "acme: d"),
        (b - 30 * S - 250_000_000, "acme: replace a"),
        (b - 1, "globex: k"),
        (b, "read at B"),
        (b + 1, "globex: delete k"),
        (b + 40 * S + 333_000_000, "acme: delete d"),
        (b + 90 * S + 1, "acme: deregister run1"),
        (b + 130 * S, "acme: run2, y"),
        (b + 180 * S + 500_000_000, "final report"),
    ];
    // Housekeeping drains every 13 s, plus one at every event.
    let mut times: BTreeSet<i64> = events.iter().map(|(t, _)| *t).collect();
    times.extend((b - 120 * S..b + 181 * S).step_by(13 * S as usize));
    for t in times {
        clock.set(t as u64);
        records.extend(store.take_usage());
        for (_, event) in events.iter().filter(|(at, _)| *at == t) {
            match *event {
                "acme: run1, a, p, s" => {
                    store.register(&acme, "run1").unwrap();
                    store.put(&acme, key(Some("run1"), "tmp", "a"), value(1000), plain).unwrap();
                    let persist = PutOptions { persist: true, ttl: None };
                    store.put(&acme, key(Some("run1"), "out", "p"), value(2500), persist).unwrap();
                    store.put(&acme, key(None, "lookup", "s"), value(777), plain).unwrap();
                }
                "acme: t with a TTL" => {
                    let ttl = PutOptions { persist: false, ttl: Some(Duration::from_secs(170)) };
                    store.put(&acme, key(None, "cache", "t"), value(4096), ttl).unwrap();
                }
                "acme: d" => store.put(&acme, key(Some("run1"), "tmp", "d"), value(333), plain).unwrap(),
                "acme: replace a" => store.put(&acme, key(Some("run1"), "tmp", "a"), value(1500), plain).unwrap(),
                "globex: k" => store.put(&globex, key(None, "lookup", "k"), value(10), plain).unwrap(),
                "read at B" => at_boundary = Some(read(&store)),
                "globex: delete k" => store.delete(&globex, &key(None, "lookup", "k")).unwrap(),
                "acme: delete d" => store.delete(&acme, &key(Some("run1"), "tmp", "d")).unwrap(),
                "acme: deregister run1" => {
                    let total = store.deregister(&acme, "run1").unwrap();
                    deregistered.insert(("acme".to_string(), "run1".to_string()), total.byte_nanos());
                }
                "acme: run2, y" => {
                    store.register(&acme, "run2").unwrap();
                    store.put(&acme, key(Some("run2"), "x", "y"), value(64), plain).unwrap();
                }
                "final report" => records.extend(store.take_usage_final()),
                other => unreachable!("{other}"),
            }
        }
    }
    // The TTL object expired at its instant, whenever the store noticed.
    assert!(store.lookup(&acme, &key(None, "cache", "t")).is_err());
    // On to the end of the day: what is still held (s, p, y) keeps accruing.
    clock.set((b + DAY) as u64);
    let at_end = read(&store);
    records.extend(store.take_usage());
    let total = store.deregister(&acme, "run2").unwrap();
    deregistered.insert(("acme".to_string(), "run2".to_string()), total.byte_nanos());
    records.extend(store.take_usage());
    let at_boundary = at_boundary.expect("read at B");

    // By hand, in held bytes (value + address + 128): acme at B: standing s 912 B × 120 s + t
    // 4230 B × 99.876543211 s; run1 a 1136 B × 89.75 s + 1636 B × 30.25 s, p 2636 B × 120 s,
    // d 469 B × 74.5 s. At its deregistration run1 adds a and p × 90.000000001 s and d × 40.333 s.
    assert_eq!(ByteSeconds::from_byte_nanos(at_boundary["acme"].standing).to_decimal_string(), "531917.777782530");
    assert_eq!(ByteSeconds::from_byte_nanos(at_boundary["acme"].jobs["run1"]).to_decimal_string(), "502705.500000000");
    assert_eq!(deregistered[&("acme".to_string(), "run1".to_string())], 906_101_677_004_272);
    // globex held 145 B (10 + 7 + 128) for 1 ns on each side of B: exactly 145 byte-ns in each day.
    assert_eq!(at_boundary["globex"].total, 145);
    assert_eq!(at_end["globex"].total, 290);
    assert_eq!(ByteSeconds::from_byte_nanos(at_end["globex"].total).to_decimal_string(), "0.000000290");
    Expected { readings: [BTreeMap::new(), at_boundary, at_end], deregistered, records }
}

/// A tenant's usage of one period in billing: state byte-ns of the "" key (state), of each
/// job, and of standing storage.
async fn billed(billing: &Billing, tenant: &str, period: &str) -> (u128, BTreeMap<String, u128>, u128) {
    let state = billing
        .usage_by_function(tenant, period)
        .await
        .unwrap()
        .get("")
        .map_or(0, |totals| byte_nanos(&totals.state_byte_seconds.to_string()));
    let mut jobs: BTreeMap<String, u128> = BTreeMap::new();
    let mut standing = 0;
    for record in billing.records(tenant, period).await.unwrap() {
        let value = byte_nanos(&record.state_byte_seconds.to_string());
        match record.flow_run {
            Some(job) => *jobs.entry(job).or_default() += value,
            None => standing += value,
        }
    }
    (state, jobs, standing)
}

/// Each day bills exactly the store's integral over it, in total, per job and for standing
/// storage; each job's days add up to what `deregister` returned; the invoices' state lines
/// show the same quantities.
async fn check_billing(billing: &Billing, expected: &Expected, periods: &[(Period, usize, usize)]) {
    let readings = &expected.readings;
    let mut per_job: BTreeMap<(String, String), u128> = BTreeMap::new();
    for tenant in ["acme", "globex"] {
        let mut all_days = 0;
        for (period, from, to) in periods {
            let key = period.key();
            let (state, jobs, standing) = billed(billing, tenant, &key).await;
            let (before, after) = (readings[*from].get(tenant).cloned().unwrap_or_default(), &readings[*to][tenant]);
            assert_eq!(state, after.total - before.total, "{tenant} {key}: billed vs the store's integral");
            assert_eq!(standing, after.standing - before.standing, "{tenant} {key}: standing storage");
            assert_eq!(jobs.values().sum::<u128>() + standing, state, "{tenant} {key}: jobs + standing");
            for (job, value) in &jobs {
                // While registered, a job's integral at the boundaries is its day's usage.
                if let (Some(a), Some(b)) = (after.jobs.get(job), before.jobs.get(job).or(Some(&0))) {
                    assert_eq!(*value, a - b, "{tenant} {key}: job {job}");
                }
                *per_job.entry((tenant.to_string(), job.clone())).or_default() += value;
            }
            all_days += state;
            // The invoice bills the same quantity (its unit is byte-s).
            let invoice = billing.invoice(tenant, &key).await.unwrap();
            let quantity = invoice
                .lines
                .iter()
                .find(|l| l.kind == LineKind::Usage && l.metric == Some(Metric::StateByteSeconds))
                .map_or(0, |l| byte_nanos(&l.quantity.to_string()));
            assert_eq!(quantity, state, "{tenant} {key}: invoice line");
            assert_eq!(invoice.status, billing::invoice::Status::Final, "{tenant} {key}");
        }
        assert_eq!(all_days, readings[2][tenant].total, "{tenant}: all days vs the store's total");
    }
    assert_eq!(per_job, expected.deregistered, "each job's records add up to what deregister returned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_day_bills_exactly_the_store_integral_over_it() {
    let b = Period::parse(PeriodKind::Day, "2026-11-01").unwrap().start_ns();
    let expected = run_store(b);

    // The records: unique usage ids per tenant, each within one day, none empty.
    let mut ids = BTreeSet::new();
    for (tenant, record) in &expected.records {
        assert!(ids.insert((tenant.clone(), record.usage_id())), "{tenant} {record:?} reported twice");
        assert!(record.end_ns > record.start_ns && record.byte_seconds > ByteSeconds::ZERO, "{record:?}");
        let (first, last) = (record.start_ns as i64, record.end_ns as i64 - 1);
        assert_eq!(Period::containing(PeriodKind::Day, first), Period::containing(PeriodKind::Day, last), "{record:?}");
    }
    // Intervals that cross B were cut at B.
    assert!(expected.records.iter().any(|(_, r)| r.end_ns as i64 == b));
    assert!(expected.records.iter().any(|(_, r)| r.start_ns as i64 == b));

    let dir = tempfile::tempdir().unwrap();
    // Billing's "now": both days are over (grace 0), and stay so whatever the date.
    let clock = collector::clock::Clock::starting_at(b + 20 * 86_400 * 1_000_000_000);
    let store = TelemetryStore::open(&format!("sqlite://{}", dir.path().join("telemetry.db").display()))
        .await
        .unwrap()
        .with_clock(clock);
    let mut billing = Billing::open(&store).await.unwrap();
    billing.set_settle(Duration::ZERO);
    billing.apply_rate_card(CARD).await.unwrap();

    let spans: Vec<SpanRow> =
        expected.records.iter().enumerate().map(|(n, (t, r))| state_usage_span(t, r, n as u64 + 1)).collect();
    let written = store.write(&Batch { spans: spans.clone(), ..Batch::default() }).await.unwrap();
    assert_eq!(written.spans, spans.len() as u64);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let report = billing.run(None).await.unwrap();
    assert_eq!(
        (report.records, report.duplicates, report.malformed, report.late_records),
        (expected.records.len() as u64, 0, 0, 0),
        "{report:?}"
    );

    let day = Period::parse(PeriodKind::Day, "2026-10-31").unwrap();
    // 2026-10-31 bills total(B) − total(B − 1 day); 2026-11-01 bills total(B + 1 day) − total(B).
    let periods = [(day, 0, 1), (day.next(), 1, 2)];
    for tenant in ["acme", "globex"] {
        let invoiced: Vec<String> =
            billing.invoices(Some(tenant)).await.unwrap().into_iter().map(|i| i.period).collect();
        assert_eq!(invoiced, ["2026-11-01", "2026-10-31"], "{tenant}: no usage outside the two days");
    }
    check_billing(&billing, &expected, &periods).await;

    // Every record delivered again, by another exporter (other trace and span ids), after the
    // days are final: nothing is billed twice.
    let again: Vec<SpanRow> = expected
        .records
        .iter()
        .enumerate()
        .map(|(n, (t, r))| state_usage_span(t, r, n as u64 + 1 + (1 << 32)))
        .collect();
    store.write(&Batch { spans: again, ..Batch::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let report = billing.run(None).await.unwrap();
    assert_eq!((report.records, report.duplicates), (0, expected.records.len() as u64), "{report:?}");
    check_billing(&billing, &expected, &periods).await;
}
