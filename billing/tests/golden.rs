//! Golden invoices: a small fixed usage set and rate card (tests/golden/plans.yml) whose
//! invoices were computed by hand and committed as JSON and CSV, on SQLite and PostgreSQL.
//!
//! acme, October 2026, plan basic: 4 invocations (one delivered twice), CPU 300 + 900 + 50 +
//! 1300 = 2550 ms, 1 + 2.5 + 0.5 + 0 MB out, state 1.5000000005 GB-s standing + 0.25 GB-s of a
//! flow run's job.
//! - invocations: 4 − 2 free = 2 × 0.001 = 0.002 → 0.00
//! - cpu_ms: 2550 − 100 free = 2450: 1000 × 0.0004 + 1450 × 0.0001 = 0.545 → 0.54 (half to even)
//! - state: 1.7500000005 GB-s × 0.5 = 0.87500000025 → 0.88
//! - bytes_out: 0.004 GB × 0.09 = 0.00036 → 0.00
//! - total 1.42 (above the 1.00 minimum).
//!
//! globex: one invocation of 10 ms, all within the allowances → 0; the minimum charge tops the
//! invoice up to 1.00.

use crate::common;

use common::{backends, invoke, ns, open, state};

const CARD: &str = include_str!("golden/plans.yml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_match_the_hand_computed_ones() {
    for backend in backends() {
        let fixture = open(&backend, CARD).await;
        let c2 = invoke("acme", "c2", "resize", ns("2026-10-04T10:00:00Z"), 900, 2_500_000, 200);
        // The same invocation in another span too (an export retried by another exporter).
        let mut c2_again = c2.clone();
        c2_again.span_id = "00000000000000c2".into();
        fixture
            .deliver(vec![
                invoke("acme", "c1", "resize", ns("2026-10-03T10:00:00Z"), 300, 1_000_000, 200),
                c2.clone(),
                c2_again,
                invoke("acme", "c3", "thumb", ns("2026-10-05T10:00:00Z"), 50, 500_000, 500),
                invoke("acme", "c4", "thumb", ns("2026-10-20T10:00:00Z"), 1300, 0, 200),
                state("acme", None, ns("2026-10-10T00:00:00Z"), ns("2026-10-10T00:01:00Z"), "1500000000.5"),
                state("acme", Some("run1"), ns("2026-10-10T00:00:00Z"), ns("2026-10-10T00:00:30Z"), "250000000"),
                invoke("globex", "c9", "hello", ns("2026-10-07T08:00:00Z"), 10, 0, 200),
            ])
            .await;
        // October ended more than its 72 h grace ago: this run bills it and makes it final.
        let report = fixture.billing.run(None).await.unwrap();
        assert_eq!((report.records, report.duplicates, report.invoices_finalized), (7, 1, 2), "{}", backend.name());

        for tenant in ["acme", "globex"] {
            let stored = fixture.billing.invoice_document(tenant, "2026-10").await.unwrap();
            let expected = std::fs::read_to_string(format!("tests/golden/invoice-{tenant}-2026-10.json")).unwrap();
            assert_eq!(stored, expected, "{tenant} on {}", backend.name());
            // Re-rating the final period from its usage records gives the same bytes.
            let again = fixture.billing.rate_invoice(tenant, "2026-10").await.unwrap();
            assert_eq!(again.to_json(), expected, "{tenant} re-rated on {}", backend.name());
            // The lines' exact amounts are the sum of the per-invocation costs.
            let invoice = fixture.billing.invoice(tenant, "2026-10").await.unwrap();
            let costs: rust_decimal::Decimal =
                fixture.billing.invocation_costs(tenant, "2026-10").await.unwrap().iter().map(|c| c.cost).sum();
            let lines: rust_decimal::Decimal = invoice
                .lines
                .iter()
                .filter(|l| l.kind != billing::invoice::LineKind::Minimum)
                .map(|l| l.amount_exact)
                .sum();
            assert_eq!(costs, lines, "{tenant} on {}", backend.name());
        }
        let csv = fixture.billing.invoice("acme", "2026-10").await.unwrap().to_csv();
        assert_eq!(csv, std::fs::read_to_string("tests/golden/invoice-acme-2026-10.csv").unwrap());

        // After finalization: a re-sent span bills nothing; late October usage (1 invocation of
        // 200 ms) goes on the next open invoice as adjustment lines naming October, priced
        // where October's usage left the tiers (past the allowances, in the second CPU tier).
        fixture.deliver(vec![c2, invoke("acme", "c5", "resize", ns("2026-10-30T10:00:00Z"), 200, 0, 200)]).await;
        let report = fixture.billing.run(None).await.unwrap();
        // (The re-sent span is stored once by the collector, so billing never sees it again.)
        assert_eq!((report.records, report.late_records, report.duplicates), (1, 1, 0), "{}", backend.name());
        let october = fixture.billing.invoice_document("acme", "2026-10").await.unwrap();
        assert_eq!(october, std::fs::read_to_string("tests/golden/invoice-acme-2026-10.json").unwrap());
        let next = fixture.billing.invoices(Some("acme")).await.unwrap();
        let next = next.iter().find(|i| i.period != "2026-10").expect("an open invoice for the late usage");
        assert_eq!((next.period.as_str(), next.status.as_str()), ("2026-11", "draft"), "open at common::NOW");
        let next = fixture.billing.invoice("acme", &next.period).await.unwrap();
        let adjustments: Vec<_> = next
            .lines
            .iter()
            .filter(|l| l.kind == billing::invoice::LineKind::Adjustment)
            .map(|l| {
                (l.usage_period.as_str(), l.metric.unwrap().name(), l.amount_exact.to_string(), l.amount.to_string())
            })
            .collect();
        assert_eq!(
            adjustments,
            [
                ("2026-10", "invocations", "0.001".to_string(), "0.00".to_string()),
                ("2026-10", "cpu_ms", "0.02".to_string(), "0.02".to_string())
            ],
            "{}",
            backend.name()
        );
        let costs: rust_decimal::Decimal =
            fixture.billing.invocation_costs("acme", &next.period).await.unwrap().iter().map(|c| c.cost).sum();
        assert_eq!(costs.to_string(), "0.021");
    }
}

/// Metered spans that claim to be billable but cannot be read as usage are skipped and
/// counted; the good ones around them are billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_usage_is_skipped_and_counted() {
    let backend = common::Backend::Sqlite(tempfile::tempdir().unwrap());
    let fixture = open(&backend, CARD).await;
    let at = ns("2026-10-03T10:00:00Z");
    let mut no_id = invoke("acme", "x1", "resize", at, 1, 0, 200);
    no_id.attributes = no_id.attributes.replace("faas.invocation_id", "other");
    let float_state = state("acme", None, at, at + 60_000_000_000, "1.5");
    let mut float_state_bad = float_state.clone();
    float_state_bad.attributes = float_state_bad.attributes.replace("\"1.5\"", "1.5");
    let mut not_decimal = state("acme", Some("r"), at, at + 1, "12.5e3");
    not_decimal.span_id = "00000000000000aa".into();
    let mut unbilled = invoke("acme", "x2", "resize", at, 1, 0, 200);
    unbilled.attributes = unbilled.attributes.replace("\"sfaas.billable\":true", "\"sfaas.billable\":false");
    fixture
        .deliver(vec![no_id, float_state_bad, not_decimal, unbilled, invoke("acme", "ok", "resize", at, 7, 0, 200)])
        .await;
    let report = fixture.billing.run(None).await.unwrap();
    assert_eq!((report.records, report.malformed, report.duplicates), (1, 3, 0), "{report:?}");
    let records = fixture.billing.records("acme", "2026-10").await.unwrap();
    assert_eq!(
        records.iter().map(|r| (r.usage_id.clone(), r.cpu_ms)).collect::<Vec<_>>(),
        [(common::execution_id("ok"), 7)]
    );
}

/// A plan change in mid-period prorates each plan's allowance and minimum by the share of the
/// period it covered: acme is on `basic` from October 1 and on `flat` from October 16 00:00,
/// so basic covers 15 of October's 31 days and flat 16.
/// - basic: 1 invocation, allowance 2 × 15/31 = 0.967741935 (9 decimals) → 0.032258065
///   billable × 0.001 = 0.000032258065 → 0.00; 50 ms against an allowance of 100 × 15/31 =
///   48.387096774 → 1.612903226 × 0.0004 = 0.0006451612904 → 0.00; minimum 1.00 × 15/31 →
///   0.483870968 → 0.48, so a minimum line of 0.48.
/// - flat: 1 invocation of 2000 ms: 2000 × 0.0005 = 1.00; minimum 3.10 × 16/31 = 1.60 → a
///   minimum line of 0.60.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_change_prorates_allowances_and_minimums() {
    let card = format!(
        "{CARD}  flat:\n    currency: EUR\n    minimum_charge: \"3.10\"\n    prices:\n      cpu_ms: {{ unit_price: \"0.0005\" }}\n"
    );
    for backend in backends() {
        let fixture = open(&backend, &card).await;
        fixture.billing.assign_plan("acme", "basic", Some(ns("2026-10-01T00:00:00Z"))).await.unwrap();
        fixture.billing.assign_plan("acme", "flat", Some(ns("2026-10-16T00:00:00Z"))).await.unwrap();
        fixture
            .deliver(vec![
                invoke("acme", "early", "resize", ns("2026-10-05T10:00:00Z"), 50, 0, 200),
                invoke("acme", "late", "resize", ns("2026-10-20T10:00:00Z"), 2000, 0, 200),
            ])
            .await;
        fixture.billing.run(None).await.unwrap();
        let invoice = fixture.billing.invoice("acme", "2026-10").await.unwrap();
        let lines: Vec<_> = invoice
            .lines
            .iter()
            .map(|l| {
                let kind = serde_json::to_value(l.kind).unwrap().as_str().unwrap().to_string();
                (kind, l.plan.clone(), l.metric.map(|m| m.name()), l.amount_exact.to_string(), l.amount.to_string())
            })
            .collect();
        let line = |kind: &str, plan: &str, metric: Option<&'static str>, exact: &str, amount: &str| {
            (kind.to_string(), plan.to_string(), metric, exact.to_string(), amount.to_string())
        };
        assert_eq!(
            lines,
            [
                line("usage", "basic", Some("invocations"), "0.000032258065", "0.00"),
                line("usage", "basic", Some("cpu_ms"), "0.0006451612904", "0.00"),
                line("usage", "flat", Some("cpu_ms"), "1", "1.00"),
                line("minimum", "basic", None, "0.48", "0.48"),
                line("minimum", "flat", None, "0.60", "0.60"),
            ],
            "{}",
            backend.name()
        );
        assert_eq!(invoice.total.to_string(), "2.08");
        // Rated usage is never re-rated: the plan cannot change before it.
        let error = fixture.billing.assign_plan("acme", "basic", Some(ns("2026-10-19T00:00:00Z"))).await.unwrap_err();
        assert!(error.to_string().contains("takes effect after it"), "{error}");
    }
}

/// A second billing over the same database (another dashboard process) sees every change the
/// first one makes, so its caches of costs never go stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_sees_every_billing_change() {
    for backend in backends() {
        let fixture = open(&backend, CARD).await;
        let store =
            collector::store::TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap();
        let other = billing::Billing::open(&store.with_clock(fixture.store.clock().clone())).await.unwrap();
        let before = other.version().await;
        fixture.deliver(vec![invoke("acme", "g1", "resize", ns("2026-10-03T10:00:00Z"), 5, 0, 200)]).await;
        fixture.billing.run(None).await.unwrap();
        let after_run = other.version().await;
        assert_ne!(before, after_run, "{}: a billing run elsewhere changes the version", backend.name());
        fixture.billing.assign_plan("acme", "basic", None).await.unwrap();
        assert_ne!(after_run, other.version().await, "{}: a plan assignment elsewhere too", backend.name());
    }
}

/// The golden month's usage as stored before segments: a row each in `usage_records`.
async fn as_rows(fixture: &common::Fixture, records: &[billing::usage::UsageRecord]) {
    let db = fixture.billing.db();
    let create = "CREATE TABLE usage_records (tenant TEXT NOT NULL, usage_id TEXT NOT NULL, kind TEXT NOT NULL, \
        function TEXT NOT NULL, flow_run TEXT, trace_id TEXT NOT NULL, span_id TEXT NOT NULL, start_ns BIGINT NOT NULL, \
        end_ns BIGINT NOT NULL, cpu_ms BIGINT NOT NULL, wall_ms BIGINT NOT NULL, memory_peak_bytes BIGINT NOT NULL, \
        bytes_in BIGINT NOT NULL, bytes_out BIGINT NOT NULL, status_code BIGINT NOT NULL, \
        state_byte_seconds TEXT NOT NULL, period TEXT NOT NULL, billed_period TEXT NOT NULL, plan TEXT NOT NULL, \
        received_ms BIGINT NOT NULL, call_id TEXT, PRIMARY KEY (tenant, usage_id))";
    let insert = format!("INSERT INTO usage_records VALUES ({})", vec!["?"; 21].join(", "));
    macro_rules! rows {
        ($pool:expr) => {{
            sqlx::query("DELETE FROM usage_segments").execute($pool).await.unwrap();
            sqlx::query(create).execute($pool).await.unwrap();
            for r in records {
                sqlx::query(db.sql(&insert))
                    .bind(&r.tenant)
                    .bind(&r.usage_id)
                    .bind(r.kind.as_str())
                    .bind(&r.function)
                    .bind(&r.flow_run)
                    .bind(&r.trace_id)
                    .bind(&r.span_id)
                    .bind(r.start_ns)
                    .bind(r.end_ns)
                    .bind(r.cpu_ms)
                    .bind(r.wall_ms)
                    .bind(r.memory_peak_bytes)
                    .bind(r.bytes_in)
                    .bind(r.bytes_out)
                    .bind(r.status_code)
                    .bind(r.state_byte_seconds.to_string())
                    .bind(&r.period)
                    .bind(&r.billed_period)
                    .bind(&r.plan)
                    .bind(r.received_ms)
                    .bind(&r.call_id)
                    .execute($pool)
                    .await
                    .unwrap();
            }
        }};
    }
    match db {
        billing::db::Db::Sqlite(pool) => rows!(pool),
        billing::db::Db::Postgres(pool) => rows!(pool),
    }
}

/// A database whose usage records are rows (the layout before segments) is converted when
/// billing opens it: every record, its cost and the invoices survive, the rows' table is gone,
/// and a record already billed is still recognized when its usage comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_records_stored_as_rows_survive_the_move_to_segments() {
    for backend in backends() {
        let name = backend.name();
        let fixture = open(&backend, CARD).await;
        let c2 = invoke("acme", "c2", "resize", ns("2026-10-04T10:00:00Z"), 900, 2_500_000, 200);
        fixture
            .deliver(vec![
                invoke("acme", "c1", "resize", ns("2026-10-03T10:00:00Z"), 300, 1_000_000, 200),
                c2.clone(),
                invoke("acme", "c3", "thumb", ns("2026-10-05T10:00:00Z"), 50, 500_000, 500),
                state("acme", None, ns("2026-10-10T00:00:00Z"), ns("2026-10-10T00:01:00Z"), "1500000000.5"),
                state("acme", Some("run1"), ns("2026-10-10T00:00:00Z"), ns("2026-10-10T00:00:30Z"), "250000000"),
                invoke("globex", "c9", "hello", ns("2026-10-07T08:00:00Z"), 10, 0, 200),
                invoke("globex", "c8", "hello", ns("2026-11-07T08:00:00Z"), 10, 0, 200),
            ])
            .await;
        fixture.billing.run(None).await.unwrap();
        let keys = [("acme", "2026-10"), ("globex", "2026-10"), ("globex", "2026-11")];
        let mut before = Vec::new();
        let mut all = Vec::new();
        for (tenant, period) in keys {
            let records = fixture.billing.records(tenant, period).await.unwrap();
            all.extend(records.clone());
            let costs = fixture.billing.invocation_costs(tenant, period).await.unwrap();
            let invoice = fixture.billing.rate_invoice(tenant, period).await.unwrap().to_json();
            before.push((records, costs, invoice));
        }
        assert_eq!(all.len(), 7, "{name}");
        as_rows(&fixture, &all).await;

        let mut billing = billing::Billing::open(&fixture.store).await.unwrap();
        billing.set_settle(std::time::Duration::ZERO);
        for ((tenant, period), before) in keys.iter().zip(&before) {
            let records = billing.records(tenant, period).await.unwrap();
            let costs = billing.invocation_costs(tenant, period).await.unwrap();
            let invoice = billing.rate_invoice(tenant, period).await.unwrap().to_json();
            assert_eq!(&(records, costs, invoice), before, "{tenant} {period} on {name}");
        }
        let table = match billing.db() {
            billing::db::Db::Sqlite(pool) => {
                sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM sqlite_master WHERE name = 'usage_records'")
                    .fetch_one(pool)
                    .await
                    .unwrap()
            }
            billing::db::Db::Postgres(pool) => sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = 'usage_records'",
            )
            .fetch_one(pool)
            .await
            .unwrap(),
        };
        assert_eq!(table, 0, "the rows' table is dropped on {name}");
        // The same invocation in another span: already billed.
        let mut again = c2;
        again.span_id = "00000000000000c2".into();
        fixture.deliver(vec![again]).await;
        let report = billing.run(None).await.unwrap();
        assert_eq!((report.records, report.duplicates), (0, 1), "{name}");
    }
}

/// Usage stored in many small runs is merged into few segments, level by level, and every
/// record is stored once however often it comes: across segments and across merges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stay_unique_across_segments_and_merges() {
    for backend in backends() {
        let name = backend.name();
        let fixture = open(&backend, CARD).await;
        let record = |i: usize| billing::usage::UsageRecord {
            tenant: "acme".into(),
            usage_id: format!("0190b4e2-7c3a-7d2e-9f00-{i:012x}"),
            kind: billing::usage::Kind::Invocation,
            function: format!("f{}", i % 3),
            flow_run: None,
            call_id: None,
            trace_id: format!("{i:032x}"),
            span_id: format!("{i:016x}"),
            start_ns: ns("2026-10-01T00:00:00Z") + (i as i64 % 1000) * 1_000_000_000,
            end_ns: ns("2026-10-01T00:00:00Z") + (i as i64 % 1000) * 1_000_000_000 + 5_000_000,
            cpu_ms: i as i64 % 7,
            wall_ms: 5,
            memory_peak_bytes: 0,
            bytes_in: 0,
            bytes_out: 0,
            log_bytes: 0,
            status_code: 200,
            state_byte_seconds: Default::default(),
            period: "2026-10".into(),
            billed_period: "2026-10".into(),
            plan: "basic".into(),
            received_ms: i as i64,
        };
        let segments = || async {
            match fixture.billing.db() {
                billing::db::Db::Sqlite(pool) => {
                    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM usage_segments").fetch_one(pool).await.unwrap()
                }
                billing::db::Db::Postgres(pool) => {
                    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM usage_segments").fetch_one(pool).await.unwrap()
                }
            }
        };
        // 70 runs of 10, a segment each; merged after, 8 of a level at a time (merged ones of
        // 80 records are still level 0 and merge again) until fewer than 8 are left.
        for run in 0..70 {
            let records: Vec<_> = (run * 10..run * 10 + 10).map(record).collect();
            assert_eq!(fixture.billing.import(&records).await.unwrap(), 10, "run {run} on {name}");
        }
        assert_eq!(segments().await, 70, "{name}");
        let merged = fixture.billing.merge_segments().await.unwrap();
        let left = segments().await;
        assert!(left < 8 && merged >= 70 - left as u64, "{merged} merged away, {left} left on {name}");
        // Every record again, in other groupings, and a fresh process (no cached keys): none new.
        let everything: Vec<_> = (0..700).map(record).collect();
        assert_eq!(fixture.billing.import(&everything).await.unwrap(), 0, "{name}");
        let fresh = billing::Billing::open(&fixture.store).await.unwrap();
        assert_eq!(fresh.import(&everything[350..]).await.unwrap(), 0, "{name}");
        let mut more = everything[690..].to_vec();
        more.push(record(700));
        assert_eq!(fresh.import(&more).await.unwrap(), 1, "{name}");
        let stored = fresh.records("acme", "2026-10").await.unwrap();
        assert_eq!(stored.len(), 701, "{name}");
        let mut expected: Vec<_> = (0..=700).map(record).collect();
        expected.sort_by(|a, b| (a.start_ns, &a.usage_id).cmp(&(b.start_ns, &b.usage_id)));
        assert_eq!(stored, expected, "{name}");
        let totals = fresh.totals("acme", "2026-10").await.unwrap();
        assert_eq!(totals.values().map(|t| t.records).sum::<i64>(), 701, "{name}");
    }
}

/// Log bytes (`sfaas.log_bytes` on invocation spans) are billed by the plans that price them,
/// per invocation in time order like every metric (free bytes to the first), and cost nothing
/// on a plan that does not name them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_bytes_are_billed_per_invocation_where_the_plan_prices_them() {
    const LOG_CARD: &str = r#"
period: month
grace_hours: 72
default_plan: quiet
plans:
  quiet:
    currency: EUR
    prices:
      invocations: { unit_price: "0.001" }
  chatty:
    currency: EUR
    prices:
      invocations: { unit_price: "0.001" }
      log_bytes: { unit_price: "0.001", free: "1000" }
"#;
    let with_log_bytes = |mut span: collector::model::SpanRow, bytes: i64| {
        let mut attributes: serde_json::Value = serde_json::from_str(&span.attributes).unwrap();
        attributes["sfaas.log_bytes"] = bytes.into();
        span.attributes = attributes.to_string();
        span
    };
    for backend in backends() {
        let name = backend.name();
        let fixture = open(&backend, LOG_CARD).await;
        fixture.billing.assign_plan("acme", "chatty", Some(ns("2026-10-01T00:00:00Z"))).await.unwrap();
        fixture
            .deliver(vec![
                with_log_bytes(invoke("acme", "l1", "resize", ns("2026-10-03T10:00:00Z"), 10, 0, 200), 600),
                with_log_bytes(invoke("acme", "l2", "resize", ns("2026-10-04T10:00:00Z"), 10, 0, 200), 1500),
                invoke("acme", "l3", "thumb", ns("2026-10-05T10:00:00Z"), 10, 0, 200),
                with_log_bytes(invoke("globex", "g1", "hello", ns("2026-10-05T10:00:00Z"), 10, 0, 200), 5000),
            ])
            .await;
        fixture.billing.run(None).await.unwrap();
        // acme: 2 100 bytes, 1 000 free: 1 100 × 0.001 = 1.1.
        let invoice = fixture.billing.invoice("acme", "2026-10").await.unwrap();
        let line = invoice.lines.iter().find(|l| l.metric == Some(billing::plans::Metric::LogBytes));
        let line = line.unwrap_or_else(|| panic!("{name}: no log_bytes line: {:?}", invoice.lines));
        assert_eq!((line.quantity.to_string(), line.amount.to_string()), ("2100".into(), "1.10".into()), "{name}");
        // Each invocation carries its bytes and its share: the first's are free.
        let costs = fixture.billing.invocation_costs("acme", "2026-10").await.unwrap();
        let per: Vec<(i64, String)> = costs.iter().map(|c| (c.log_bytes, c.cost.to_string())).collect();
        assert_eq!(per, [(600, "0.001".into()), (1500, "1.101".into()), (0, "0.001".into())], "{name}");
        // globex's plan does not price log bytes: no line, nothing charged for them.
        let invoice = fixture.billing.invoice("globex", "2026-10").await.unwrap();
        assert!(invoice.lines.iter().all(|l| l.metric != Some(billing::plans::Metric::LogBytes)), "{name}");
        let totals = fixture.billing.usage_by_function("globex", "2026-10").await.unwrap();
        assert_eq!(totals["hello"].log_bytes, 5000, "{name}: the usage is counted all the same");
    }
}
