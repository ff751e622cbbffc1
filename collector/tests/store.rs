//! The store boundary: every reader of spans and samples, asked for one tenant, returns
//! nothing of another, on both backends. Two tenants store the same trace ids, span ids,
//! services, operations, metric names and labels; only the values that say whose they are
//! differ, and those are what is checked.

use crate::common;

use collector::model::{Batch, LogRow, SampleRow, SpanRow};
use collector::store::{LogQuery, TelemetryStore, TraceSearch};
use common::backends;

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const T0: i64 = 1_700_000_000_000_000_000;
const MS: i64 = 1_000_000;

fn span(tenant: &str, span_id: &str, parent: Option<&str>, service: &str, name: &str, at: i64) -> SpanRow {
    SpanRow {
        tenant: tenant.into(),
        trace_id: TRACE.into(),
        span_id: span_id.into(),
        parent_span_id: parent.map(str::to_string),
        name: name.into(),
        kind: 2,
        start_ns: at,
        end_ns: at + 5 * MS,
        status_code: 0,
        status_message: String::new(),
        service_name: service.into(),
        attributes: format!(r#"{{"owner":"{tenant}","faas.name":"f"}}"#),
        events: "[]".into(),
        links: "[]".into(),
        resource: format!(r#"{{"service.name":"{service}","owner":"{tenant}"}}"#),
        scope: r#"{"name":"t","version":"1"}"#.into(),
        metered: true,
    }
}

fn sample(tenant: &str, ts_ns: i64) -> SampleRow {
    SampleRow {
        tenant: tenant.into(),
        metric: "orders_total".into(),
        labels: r#"{"job":"shop"}"#.into(),
        kind: "counter",
        ts_ns,
        // The value says whose it is: acme's are below 1000, globex's above.
        value: if tenant == "acme" { 1.0 } else { 5000.0 },
        histogram: None,
        metered: false,
    }
}

/// The same shapes for both tenants: a gateway span calling a function span, an invocation.
fn batch(tenant: &str) -> Batch {
    Batch {
        spans: vec![
            span(tenant, "00f067aa0ba902b7", None, "gateway", "GET /", T0),
            span(tenant, "1111111111111111", Some("00f067aa0ba902b7"), "sfaas-core", "invoke f", T0 + MS),
        ],
        samples: (0..5).map(|i| sample(tenant, T0 + i * 1000 * MS)).collect(),
        logs: Vec::new(),
    }
}

fn all_acme(spans: &[SpanRow], reader: &str) {
    assert!(!spans.is_empty(), "{reader} found nothing of acme");
    for span in spans {
        assert_eq!(span.tenant, "acme", "{reader}: {span:?}");
        assert!(span.attributes.contains(r#""owner":"acme""#), "{reader}: {span:?}");
    }
}

async fn check(store: &TelemetryStore, backend: &str) {
    let reader = |name: &str| format!("{name} on {backend}");
    all_acme(&store.trace("acme", TRACE).await.unwrap(), &reader("trace"));
    let traces = store.traces("acme", &[TRACE]).await.unwrap();
    all_acme(&traces[TRACE], &reader("traces"));
    all_acme(
        &store.spans_named("acme", "invoke ", (T0, T0 + 1000 * MS), 100, &|_| true).await.unwrap(),
        &reader("spans_named"),
    );

    let mut search = TraceSearch {
        service: "sfaas-core".into(),
        operation: Some("invoke f".into()),
        tags: vec![("owner".into(), "globex".into())],
        min_ns: 0,
        max_ns: 0,
        limit: 20,
        start_ns: T0 - 1000 * MS,
        end_ns: T0 + 1000 * MS,
    };
    assert!(store.find_traces("acme", &search).await.unwrap().is_empty(), "{}", reader("find_traces (globex's tag)"));
    search.tags = vec![("owner".into(), "acme".into())];
    assert_eq!(store.find_traces("acme", &search).await.unwrap(), vec![(TRACE.to_string(), T0 + MS)]);
    assert!(store.find_traces("nobody", &search).await.unwrap().is_empty(), "{}", reader("find_traces (no tenant)"));

    assert_eq!(store.services("acme").await.unwrap(), vec!["gateway", "sfaas-core"], "{}", reader("services"));
    assert!(store.services("nobody").await.unwrap().is_empty());
    assert_eq!(store.operations("acme", "sfaas-core").await.unwrap(), vec![("invoke f".to_string(), 2)]);
    // One call from the gateway to the core in acme's window: globex's would make it two.
    assert_eq!(
        store.dependencies("acme", T0 - MS, T0 + 10 * MS).await.unwrap(),
        vec![("gateway".to_string(), "sfaas-core".to_string(), 1)],
        "{}",
        reader("dependencies")
    );

    // Billing reads every tenant's metered spans at once: each carries its own tenant.
    let metered = store.metered_spans(i64::MIN, i64::MAX).await.unwrap();
    assert_eq!(metered.len(), 2, "{}: only the invocations", reader("metered_spans"));
    for span in &metered {
        assert!(
            span.attributes.contains(&format!(r#""owner":"{}""#, span.tenant)),
            "{}: {span:?}",
            reader("metered_spans")
        );
    }

    let samples = store.samples("acme", "orders_total").await.unwrap();
    assert_eq!(samples.len(), 5, "{}", reader("samples"));
    assert!(samples.iter().all(|s| s.tenant == "acme" && s.value < 1000.0), "{}: {samples:?}", reader("samples"));
    assert_eq!(store.stored_metrics("acme").await.unwrap(), vec![("orders_total".to_string(), "counter".to_string())]);
    let acme = ["acme".to_string()];
    let series = store.series_in(&acme, None, T0, T0 + 10_000 * MS).await.unwrap();
    assert_eq!(series.len(), 1, "{}: {series:?}", reader("series_in"));
    assert_eq!(series[0].0, "acme");
    let mut budget = 100;
    let rows = store.series_samples(&acme, "orders_total", T0 - 1, T0 + 10_000 * MS, &mut budget).await.unwrap();
    assert_eq!(rows.len(), 1, "{}", reader("series_samples"));
    assert!(rows[0].tenant == "acme" && rows[0].samples.iter().all(|(_, v, _)| v.unwrap() < 1000.0));
    // Five samples, and on SQLite one for the series looked at.
    let series_cost = usize::from(backend.starts_with("sqlite"));
    assert_eq!(budget, 95 - series_cost, "the budget is left with what was not read");
    let mut small = 3;
    assert!(
        matches!(
            store.series_samples(&acme, "orders_total", T0 - 1, T0 + 10_000 * MS, &mut small).await,
            Err(collector::store::StoreError::OverBudget)
        ),
        "{}: more than the budget is refused",
        reader("series_samples")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reader_returns_another_tenants_data() {
    for backend in backends() {
        let store = TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap();
        store.write(&batch("acme")).await.unwrap();
        store.write(&batch("globex")).await.unwrap();
        let mut tenants = store.span_tenants().await.unwrap();
        tenants.sort();
        assert_eq!(tenants, vec!["acme", "globex"]);
        check(&store, backend.name()).await;
        // The same, read from blocks.
        store.seal_spans().await.unwrap();
        check(&store, &format!("{} (sealed)", backend.name())).await;
    }
}

/// A varied set of one tenant's spans: three services, parents in and out of a window, tags,
/// errors, metered invocations and state usage, spans of another tenant with the same ids.
fn varied(tenant: &str) -> Vec<SpanRow> {
    let mut spans = Vec::new();
    for t in 0..40i64 {
        let trace = format!("{:032x}", 0xabc0000 + t);
        let at = T0 + t * 50 * MS;
        let mut root = span(tenant, &format!("{:016x}", t * 10 + 1), None, "gateway", "GET /", at);
        root.trace_id = trace.clone();
        root.kind = 2;
        let mut call =
            span(tenant, &format!("{:016x}", t * 10 + 2), Some(&root.span_id), "sfaas-core", "invoke f", at + 3 * MS);
        call.trace_id = trace.clone();
        call.end_ns = call.start_ns + (t % 7 + 1) * MS;
        call.metered = t % 2 == 0;
        if t % 5 == 0 {
            call.status_code = 2;
            call.status_message = "boom".into();
            call.attributes = format!(r#"{{"owner":"{tenant}","http.response.status_code":500}}"#);
        }
        let mut db = span(tenant, &format!("{:016x}", t * 10 + 3), Some(&call.span_id), "db", "SELECT", at + 4 * MS);
        db.trace_id = trace.clone();
        db.kind = 3;
        let mut usage = span(tenant, &format!("{:016x}", t * 10 + 4), None, "sfaas-core", "state.usage", at);
        usage.trace_id = format!("{:032x}", 0xdef0000 + t);
        spans.extend([root, call, db, usage]);
    }
    spans
}

/// Stores spans as the layout before blocks did: rows of the `spans` table.
async fn insert_rows(url: &str, spans: &[SpanRow], received_ms: i64) {
    let text = "INSERT INTO spans (tenant, trace_id, span_id, parent_span_id, name, kind, start_ns, end_ns, \
                status_code, status_message, service_name, attributes, events, links, resource, scope, metered, \
                received_ms) ";
    macro_rules! insert {
        ($pool:expr, $db:ty) => {{
            let mut builder = sqlx::QueryBuilder::<$db>::new(text);
            builder.push_values(spans, |mut row, s| {
                row.push_bind(s.tenant.clone())
                    .push_bind(s.trace_id.clone())
                    .push_bind(s.span_id.clone())
                    .push_bind(s.parent_span_id.clone())
                    .push_bind(s.name.clone())
                    .push_bind(s.kind)
                    .push_bind(s.start_ns)
                    .push_bind(s.end_ns)
                    .push_bind(s.status_code)
                    .push_bind(s.status_message.clone())
                    .push_bind(s.service_name.clone())
                    .push_bind(s.attributes.clone())
                    .push_bind(s.events.clone())
                    .push_bind(s.links.clone())
                    .push_bind(s.resource.clone())
                    .push_bind(s.scope.clone())
                    .push_bind(i64::from(s.metered))
                    .push_bind(received_ms);
            });
            builder.build().execute(&$pool).await.unwrap();
        }};
    }
    if url.starts_with("sqlite") {
        insert!(sqlx::SqlitePool::connect(url).await.unwrap(), sqlx::Sqlite);
    } else {
        insert!(sqlx::PgPool::connect(url).await.unwrap(), sqlx::Postgres);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_stored_as_rows_move_into_blocks_when_the_store_opens() {
    for backend in backends() {
        let name = backend.name();
        // A store of the earlier layout: the schema, and spans as rows.
        drop(TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap());
        let (acme, globex) = (varied("acme"), varied("globex"));
        insert_rows(&backend.url(), &acme, 1000).await;
        insert_rows(&backend.url(), &globex, 2000).await;

        let store = TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap();
        assert_eq!(store.counts("acme").await.unwrap().spans, acme.len() as u64, "{name}");
        assert_eq!(store.counts("globex").await.unwrap().spans, globex.len() as u64, "{name}");
        let trace = acme[9].trace_id.clone();
        let mut expected: Vec<SpanRow> = acme.iter().filter(|s| s.trace_id == trace).cloned().collect();
        expected.sort_by(|a, b| (a.start_ns, &a.span_id).cmp(&(b.start_ns, &b.span_id)));
        assert_eq!(store.trace("acme", &trace).await.unwrap(), expected, "{name}");
        assert_eq!(store.services("acme").await.unwrap(), vec!["db", "gateway", "sfaas-core"], "{name}");
        let metered = store.metered_spans(1000, 2000).await.unwrap();
        let expected =
            globex.iter().filter(|s| s.metered && (s.name.starts_with("invoke ") || s.name == "state.usage"));
        assert_eq!(metered.len(), expected.count(), "{name}: globex's metered spans, with their arrival kept");
        let search = TraceSearch {
            service: "sfaas-core".into(),
            operation: Some("invoke f".into()),
            tags: vec![("error".into(), "true".into())],
            min_ns: 0,
            max_ns: 0,
            limit: 100,
            start_ns: T0,
            end_ns: T0 + 10_000 * MS,
        };
        assert_eq!(
            store.find_traces("acme", &search).await.unwrap().len(),
            8,
            "{name}: every fifth of 40 traces failed"
        );
        drop(store);
        // Moved once: the rows are gone, and a restart finds the spans in blocks alone.
        let store = TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap();
        assert_eq!(store.counts("acme").await.unwrap().spans, acme.len() as u64, "{name}");
    }
}

/// A tenant's spans may all start at one instant, or all be of one trace: a search still
/// answers `limit` distinct traces, newest first, ties by trace id (the same answer however
/// the spans are split between the head and blocks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_over_spans_at_one_instant_answer_the_limit() {
    for backend in backends() {
        let store = TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap();
        let mut spans = Vec::new();
        // 3 000 traces of one span each, all at T0; and one trace of 3 000 spans at T0 - 1 ms.
        for i in 0..3_000u64 {
            let mut one = span("acme", &format!("{:016x}", i + 1), None, "shop", "checkout", T0);
            one.trace_id = format!("{:032x}", i + 1);
            spans.push(one);
            spans.push(span("acme", &format!("{:016x}", 1_000_000 + i), None, "shop", "checkout", T0 - MS));
        }
        store.write(&Batch { spans, ..Batch::default() }).await.unwrap();
        let search = TraceSearch {
            service: "shop".into(),
            operation: None,
            tags: vec![],
            min_ns: 0,
            max_ns: 0,
            limit: 20,
            start_ns: T0 - 60_000 * MS,
            end_ns: T0 + MS,
        };
        let found = store.find_traces("acme", &search).await.unwrap();
        let expected: Vec<(String, i64)> = (2_981..=3_000u64).rev().map(|i| (format!("{i:032x}"), T0)).collect();
        assert_eq!(found, expected, "{}", backend.name());
        let all = TraceSearch { limit: 3_001, ..search };
        let found = store.find_traces("acme", &all).await.unwrap();
        assert_eq!(found.len(), 3_001, "{}", backend.name());
        assert_eq!(found.last(), Some(&(TRACE.to_string(), T0 - MS)), "the trace of 3 000 spans, once");
    }
}

/// Pages read a tenant's newest spans by name, and a trace's earliest spans, without holding
/// all of them: the answers are the newest `limit` (by start, ties by span id) and at most
/// `MAX_TRACE_SPANS` of a trace, the same whether spans are in the head or in blocks, and
/// another tenant's newer spans with the same ids never enter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_spans_and_traces_are_read_bounded_newest_and_earliest_first() {
    use collector::store::MAX_TRACE_SPANS;
    let n = MAX_TRACE_SPANS as i64 + 2_000;
    let make = |tenant: &str, range: std::ops::Range<i64>, shift: i64| -> Vec<SpanRow> {
        range
            .map(|i| span(tenant, &format!("{:016x}", i + 1), None, "shop", "invoke f", T0 + (i + shift) * MS))
            .collect()
    };
    for backend in backends() {
        let store = TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap();
        // The older half sealed into blocks, the newer half (and a copy of the last sealed span)
        // in the head; globex's spans, with the same ids, are all newer.
        store.write(&Batch { spans: make("acme", 0..n / 2, 0), ..Batch::default() }).await.unwrap();
        store.seal_spans().await.unwrap();
        store.write(&Batch { spans: make("acme", n / 2 - 1..n, 0), ..Batch::default() }).await.unwrap();
        store.write(&Batch { spans: make("globex", 0..n, n), ..Batch::default() }).await.unwrap();
        let ids = |spans: &[SpanRow]| {
            spans.iter().map(|s| i64::from_str_radix(&s.span_id, 16).unwrap() - 1).collect::<Vec<_>>()
        };
        let all = (T0 - MS, T0 + 10 * n * MS);
        let newest = store.spans_named("acme", "invoke ", all, 10, &|_| true).await.unwrap();
        all_acme(&newest, "spans_named");
        assert_eq!(ids(&newest), (n - 10..n).rev().collect::<Vec<_>>(), "{}", backend.name());
        // Only in blocks, and across the seam between head and blocks (no span twice).
        let older = store.spans_named("acme", "invoke ", (T0, T0 + (n / 2) * MS), 5, &|_| true).await.unwrap();
        assert_eq!(ids(&older), (n / 2 - 5..n / 2).rev().collect::<Vec<_>>(), "{}", backend.name());
        let seam = (T0 + (n / 2 - 3) * MS, T0 + (n / 2 + 3) * MS);
        let across = store.spans_named("acme", "invoke ", seam, 100, &|_| true).await.unwrap();
        assert_eq!(ids(&across), (n / 2 - 3..n / 2 + 3).rev().collect::<Vec<_>>(), "{}", backend.name());
        // A predicate that only old spans pass: found below everything newer.
        let early = |s: &SpanRow| i64::from_str_radix(&s.span_id, 16).unwrap() <= 3;
        let first = store.spans_named("acme", "invoke ", all, 1, &early).await.unwrap();
        assert_eq!(ids(&first), vec![2], "{}", backend.name());
        assert!(store.spans_named("acme", "GET ", all, 10, &|_| true).await.unwrap().is_empty());
        // A trace of more spans than a page holds: the earliest, in order.
        let trace = store.trace("acme", TRACE).await.unwrap();
        all_acme(&trace, "trace");
        assert_eq!(ids(&trace), (0..MAX_TRACE_SPANS as i64).collect::<Vec<_>>(), "{}", backend.name());
        assert_eq!(store.counts("acme").await.unwrap().spans, n as u64, "{}", backend.name());
    }
}

/// A read of samples is bounded by what it costs, not by rows alone: a histogram sample costs
/// one per 64 bytes of its buckets more, and on SQLite (which reads series by series) each
/// series looked at costs one, so a metric of many series with nothing in the window is
/// refused under a small budget instead of listed whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_reads_are_charged_for_histograms_and_series() {
    use collector::store::StoreError;
    let tenants = vec!["acme".to_string()];
    for backend in backends() {
        let store = TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap();
        let buckets = format!(r#"{{"buckets":"{}"}}"#, "9".repeat(640 - 14));
        assert_eq!(buckets.len(), 640);
        let histograms = (0..10)
            .map(|i| SampleRow {
                metric: "latency".into(),
                histogram: Some(buckets.clone()),
                ..sample("acme", T0 + i * MS)
            })
            .collect();
        let churn = (0..300)
            .map(|i| SampleRow { metric: "churn".into(), labels: format!(r#"{{"pod":"p{i}"}}"#), ..sample("acme", T0) })
            .collect();
        store.write(&Batch { samples: histograms, ..Batch::default() }).await.unwrap();
        store.write(&Batch { samples: churn, ..Batch::default() }).await.unwrap();
        let (lo, hi) = (T0 - MS, T0 + 100 * MS);
        // Ten histograms of 640 bytes: 11 each (on SQLite, one more for the series).
        let mut budget = 100;
        let refused = store.series_samples(&tenants, "latency", lo, hi, &mut budget).await;
        assert!(matches!(refused, Err(StoreError::OverBudget)), "{}", backend.name());
        let mut budget = 200;
        let read = store.series_samples(&tenants, "latency", lo, hi, &mut budget).await.unwrap();
        assert_eq!(read[0].samples.len(), 10, "{}", backend.name());
        let series_cost = usize::from(backend.name() == "sqlite");
        assert_eq!(budget, 200 - 110 - series_cost, "{}", backend.name());
        // 300 series, none with a sample after T0.
        let mut budget = 100;
        let later = store.series_samples(&tenants, "churn", T0, T0 + 100 * MS, &mut budget).await;
        match backend.name() {
            "sqlite" => assert!(matches!(later, Err(StoreError::OverBudget)), "300 series looked at"),
            _ => assert!(later.unwrap().is_empty()),
        }
    }
}

/// A function log record as the gateway's export stores it (metered, with its attributes).
fn function_log(tenant: &str, n: i64, function: &str, invocation: &str, severity: &str, body: &str) -> LogRow {
    LogRow {
        tenant: tenant.into(),
        record_hash: format!("{tenant}-{n:04}"),
        ts_ns: T0 + n * MS,
        severity_number: 13,
        severity_text: severity.into(),
        body: body.into(),
        attributes: serde_json::json!({
            "faas.name": function, "faas.invocation_id": invocation, "sfaas.call_id": format!("call-{invocation}"),
            "faas.instance": "exec", "log.iostream": "stderr"
        })
        .to_string(),
        resource: "{}".into(),
        trace_id: Some(format!("{TRACE:.30}{n:02}")),
        span_id: None,
        metered: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_logs_are_read_by_tenant_function_invocation_text_and_arrival() {
    for backend in backends() {
        let store = TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap();
        let mut logs = Vec::new();
        for n in 0..6 {
            let (function, invocation) = if n < 4 { ("talker", "inv-a") } else { ("other", "inv-b") };
            let severity = if n == 1 { "ERROR" } else { "WARN" };
            logs.push(function_log("acme", n, function, invocation, severity, &format!("line {n} of 100%_")));
            logs.push(function_log("globex", n, function, invocation, severity, &format!("globex line {n}")));
        }
        // A tenant's own SDK logs (not metered) are not its functions' logs, whatever they say.
        let mut forged = function_log("acme", 9, "talker", "inv-a", "WARN", "forged");
        forged.metered = false;
        logs.push(forged);
        store.write(&Batch { logs: logs.clone(), ..Batch::default() }).await.unwrap();
        // The same reads from the table, from blocks, and from both with records delivered
        // again after they were sealed (a retry): each record once.
        for phase in ["in the table", "in blocks", "in blocks and delivered again"] {
            match phase {
                "in blocks" => assert_eq!(store.seal_logs(true).await.unwrap(), 13),
                "in blocks and delivered again" => {
                    store.write(&Batch { logs: logs[..5].to_vec(), ..Batch::default() }).await.unwrap();
                }
                _ => {}
            }
            let name = format!("{}, {phase}", backend.name());
            let read = |query: LogQuery| {
                let store = store.clone();
                async move { store.function_logs(&query).await.unwrap().into_iter().map(|l| l.body).collect::<Vec<_>>() }
            };
            let acme = |function: Option<&str>| LogQuery {
                tenant: "acme".into(),
                function: function.map(str::to_string),
                limit: 100,
                ..LogQuery::default()
            };
            let talker: Vec<String> = (0..4).map(|n| format!("line {n} of 100%_")).collect();
            assert_eq!(read(acme(Some("talker"))).await, talker, "{name}");
            assert_eq!(read(acme(None)).await.len(), 6, "{name}");
            assert_eq!(read(LogQuery { limit: 2, ..acme(Some("talker")) }).await, talker[2..], "{name}: the newest 2");
            let by_invocation = LogQuery { invocation: Some("call-inv-b".into()), ..acme(None) };
            assert_eq!(read(by_invocation).await, vec!["line 4 of 100%_", "line 5 of 100%_"], "{name}: by call id");
            let by_severity = LogQuery { severity: Some("ERROR".into()), ..acme(None) };
            assert_eq!(read(by_severity).await, vec!["line 1 of 100%_"], "{name}");
            // Text is matched as it is: `%` and `_` are not patterns.
            let by_text = LogQuery { contains: Some("3 of 100%_".into()), ..acme(None) };
            assert_eq!(read(by_text).await, vec!["line 3 of 100%_"], "{name}");
            let no_text = LogQuery { contains: Some("2 of 10_%".into()), ..acme(None) };
            assert!(read(no_text).await.is_empty(), "{name}");
            let by_trace = LogQuery { trace_id: Some(format!("{TRACE:.30}05")), ..acme(None) };
            assert_eq!(read(by_trace).await, vec!["line 5 of 100%_"], "{name}");
            let since = LogQuery { since_ns: T0 + 3 * MS, ..acme(Some("talker")) };
            assert_eq!(read(since).await, talker[3..], "{name}");
            if phase != "in blocks and delivered again" {
                // After a cursor: what arrived later (all arrived in one write: by record id).
                let all = store.function_logs(&acme(None)).await.unwrap();
                let after = LogQuery { after: Some(all[2].cursor.clone()), ..acme(None) };
                assert_eq!(read(after).await.len(), 3, "{name}");
            }
            // Another tenant's read returns only its own.
            let globex = read(LogQuery { tenant: "globex".into(), ..acme(Some("talker")) }).await;
            assert!(globex.len() == 4 && globex.iter().all(|b| b.starts_with("globex")), "{name}: {globex:?}");
        }
    }
}
