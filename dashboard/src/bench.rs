//! `sfaas bench dashboard`: server time of the main pages and query APIs with 1 million spans
//! and 100 000 billed invocations stored, a 1,000-node flow run, and 30 days of a counter per
//! function (SQLite in a temp dir). Each request is timed as a loopback round trip (the
//! median of 7, after one warm-up), which is server time plus well under a millisecond.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use billing::Billing;
use billing::api::ViewerResolver;
use collector::model::{Batch, SampleRow, SpanRow};
use collector::store::TelemetryStore;
use contract::Viewer;

use crate::{DashboardConfig, DashboardState};

const TENANTS: usize = 10;
const FUNCTIONS: usize = 10;
const NS: i64 = 1_000_000_000;
const TOKEN: &str = "bench-admin";

struct BenchTokens;

impl ViewerResolver for BenchTokens {
    fn resolve(&self, token: &str) -> Option<Viewer> {
        (token == TOKEN).then_some(Viewer::Admin)
    }
}

pub async fn run(spans: usize, invocations: usize) -> Result<String, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("sfaas-bench-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = TelemetryStore::open(&format!("sqlite://{}", dir.join("bench.db").display())).await?;
    let mut billing = Billing::open(&store).await?;
    billing.set_settle(Duration::ZERO);
    let now = store.clock().now_ns();
    let mut out = String::new();
    writeln!(
        out,
        "dashboard: {spans} spans ({invocations} billed invocations) over {TENANTS} tenants, a 1,000-node run, \
         30 days of a counter per function; SQLite"
    )?;

    let started = Instant::now();
    seed_spans(&store, spans, invocations, now).await?;
    seed_run(&store, now).await?;
    seed_counters(&store, now).await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let report = billing.run(None).await?;
    // The merges the seals made due, done before the timing (they run in the background).
    let merged = store.merge_span_blocks().await?;
    writeln!(
        out,
        "  seeding, billing and merging span blocks (not timed below): {:.0} s, {} usage records, {merged} blocks merged",
        started.elapsed().as_secs_f64(),
        report.records
    )?;

    let state = DashboardState {
        store: store.clone(),
        billing: Arc::new(billing),
        resolver: Arc::new(BenchTokens),
        settle: None,
    };
    let running = crate::start(
        DashboardConfig {
            addr: "127.0.0.1:0".parse()?,
            billing_every: None,
            collector_metrics_url: None,
            settle: None,
        },
        state.store.clone(),
        state.billing.clone(),
        state.resolver.clone(),
    )
    .await?;
    let base = format!("http://{}", running.addr);
    let month_ago = now / NS - 30 * 86_400;
    let queries: Vec<(&str, String)> = vec![
        ("UI tenants overview", "/ui/tenants".into()),
        ("UI tenant detail (t0)", "/ui/tenants/t0".into()),
        ("UI functions (t0)", "/ui/functions?tenant=t0".into()),
        ("UI flow runs (t0)", "/ui/runs?tenant=t0".into()),
        ("UI trace page, 1,000-node run", format!("/ui/runs/t0/bench-run?trace={}", run_trace_id())),
        ("UI trace search (t0)", "/ui/traces?tenant=t0&min_ms=1".into()),
        ("Jaeger: trace of the 1,000-node run", format!("/api/traces/{}", run_trace_id())),
        ("Jaeger: search, 20 traces", "/api/traces?service=shop&limit=20".into()),
        ("Jaeger: services", "/api/services".into()),
        (
            "Prometheus: 30-day query_range, 1 h step (counter)",
            format!(
                "/prometheus/api/v1/query_range?query={}&start={month_ago}&end={}&step=3600",
                crate::ui::url("sum by (function_name) (rate(gateway_function_invocation_total[1h]))"),
                now / NS
            ),
        ),
        (
            "Prometheus: 30-day query_range, 1 h step (subquery: daily peak of the hourly rate)",
            format!(
                "/prometheus/api/v1/query_range?query={}&start={month_ago}&end={}&step=3600",
                crate::ui::url(
                    "max_over_time(sum by (function_name) (rate(gateway_function_invocation_total[1h]))[1d:1h])"
                ),
                now / NS
            ),
        ),
        (
            "Prometheus: 30-day query_range, 1 h step (billing)",
            format!(
                "/prometheus/api/v1/query_range?query={}&start={month_ago}&end={}&step=3600",
                crate::ui::url("sum by (tenant) (increase(sfaas_billing_cost_total[1h]))"),
                now / NS
            ),
        ),
        ("billing API: invoice (t0)", "/billing/invoices?tenant=t0".to_string()),
    ];
    writeln!(out, "\n| request | first ms | median ms | status |\n|---|---:|---:|---:|")?;
    let http = crate::http_client();
    for (name, path) in &queries {
        let target = format!("{base}{path}");
        let authorization = format!("Bearer {TOKEN}");
        let started = Instant::now();
        let _ = crate::http_get(&http, &target, Some(&authorization)).await;
        let first = started.elapsed().as_secs_f64() * 1000.0;
        let mut times = Vec::new();
        let mut status = 0;
        for _ in 0..7 {
            let started = Instant::now();
            status = crate::http_get(&http, &target, Some(&authorization)).await.map_or(0, |r| r.0);
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        writeln!(out, "| {name} | {first:.1} | {:.1} | {status} |", times[times.len() / 2])?;
    }
    running.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

fn span(tenant: String, trace: u128, id: u64, parent: Option<u64>, name: String, start: i64, ms: i64) -> SpanRow {
    SpanRow {
        resource: serde_json::json!({"service.name": "shop", "service.namespace": tenant}).to_string(),
        tenant,
        trace_id: format!("{trace:032x}"),
        span_id: format!("{id:016x}"),
        parent_span_id: parent.map(|p| format!("{p:016x}")),
        name,
        kind: 2,
        start_ns: start,
        end_ns: start + ms * 1_000_000,
        status_code: 0,
        status_message: String::new(),
        service_name: "shop".into(),
        attributes: "{}".into(),
        events: "[]".into(),
        links: "[]".into(),
        scope: "{}".into(),
        metered: false,
    }
}

/// Invocation spans of the platform (metered, billable) and a tenant's own web traces.
async fn seed_spans(
    store: &TelemetryStore,
    spans: usize,
    invocations: usize,
    now: i64,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut batch = Vec::with_capacity(5000);
    let span_of_day = 20 * 86_400 * NS / spans.max(1) as i64;
    for i in 0..spans {
        let start = now - 20 * 86_400 * NS + i as i64 * span_of_day;
        let tenant = format!("t{}", i % TENANTS);
        let mut row = if i < invocations {
            let function = format!("f{}", (i / TENANTS) % FUNCTIONS);
            let mut row =
                span(tenant.clone(), 1 << 64 | i as u128, i as u64 + 1, None, format!("invoke {function}"), start, 5);
            row.service_name = "sfaas-core".into();
            row.resource = serde_json::json!({"service.name": "sfaas-core", "service.namespace": tenant}).to_string();
            row.metered = true;
            row.attributes = serde_json::json!({
                "faas.name": function, "faas.invocation_id": format!("00000000-0000-7000-8000-{i:012x}"), "faas.trigger": "http",
                "sfaas.cpu_ms": (i % 37) as i64, "sfaas.wall_ms": 5, "sfaas.memory.peak_bytes": 1 << 20,
                "sfaas.bytes_in": 100, "sfaas.bytes_out": (i % 2048) as i64, "http.response.status_code": 200,
                "sfaas.billable": true,
            })
            .to_string();
            row
        } else {
            // Traces of 9 spans: a root and 8 children.
            let trace = 2 << 64 | (i / 9) as u128;
            let parent = (i % 9 != 0).then(|| (i - i % 9) as u64 + 1);
            span(tenant, trace, i as u64 + 1, parent, format!("GET /api/{}", i % 7), start, 3 + (i % 50) as i64)
        };
        row.attributes = if row.attributes == "{}" {
            serde_json::json!({"http.route": format!("/api/{}", i % 7), "http.response.status_code": 200}).to_string()
        } else {
            row.attributes
        };
        batch.push(row);
        if batch.len() == 5000 {
            store.write(&Batch { spans: std::mem::take(&mut batch), ..Batch::default() }).await?;
        }
    }
    store.write(&Batch { spans: batch, ..Batch::default() }).await?;
    Ok(())
}

fn run_trace_id() -> String {
    format!("{:032x}", 3u128 << 64)
}

/// A flow run of 1,000 nodes: ten chains of 100, each node with its invocation.
async fn seed_run(store: &TelemetryStore, now: i64) -> Result<(), Box<dyn std::error::Error>> {
    let trace = 3u128 << 64;
    let start = now - 3_600 * NS;
    let mut spans = Vec::new();
    let mut flow = span("t0".into(), trace, 1, None, "flow big".into(), start, 100_000);
    flow.service_name = "sfaas-core".into();
    flow.metered = true;
    flow.attributes = serde_json::json!({"sfaas.flow.name": "big", "sfaas.flow.run_id": "bench-run",
        "sfaas.flow.status": "succeeded", "sfaas.state.byte_seconds": "12.5"})
    .to_string();
    spans.push(flow);
    for n in 0..1000u64 {
        let needs: Vec<String> = if n >= 10 { vec![format!("n{}", n - 10)] } else { vec![] };
        let node_start = start + (n / 10) as i64 * 1_000_000_000;
        let mut node = span("t0".into(), trace, 10 + n * 2, Some(1), format!("node n{n}"), node_start, 900);
        node.attributes = serde_json::json!({"sfaas.flow.run_id": "bench-run", "sfaas.flow.node": format!("n{n}"),
            "sfaas.flow.needs": needs, "sfaas.flow.attempt": 1, "sfaas.state.value_bytes": 1024})
        .to_string();
        node.metered = true;
        let mut invoke = span("t0".into(), trace, 11 + n * 2, Some(10 + n * 2), "invoke step".into(), node_start, 800);
        invoke.metered = true;
        invoke.attributes = serde_json::json!({"faas.name": "step", "faas.invocation_id": format!("00000000-0000-7000-8001-{n:012x}"),
            "sfaas.state.job": "bench-run", "sfaas.cpu_ms": 3, "sfaas.billable": true, "http.response.status_code": 200})
        .to_string();
        spans.extend([node, invoke]);
    }
    store.write(&Batch { spans, ..Batch::default() }).await?;
    Ok(())
}

/// `gateway_function_invocation_total` per function of t0, a sample a minute for 30 days.
async fn seed_counters(store: &TelemetryStore, now: i64) -> Result<(), Box<dyn std::error::Error>> {
    let minutes = 30 * 24 * 60;
    let mut samples = Vec::with_capacity(5000);
    for f in 0..FUNCTIONS {
        let labels = format!("{{\"code\":\"200\",\"function_name\":\"f{f}.t0\",\"namespace\":\"t0\"}}");
        for m in 0..minutes {
            samples.push(SampleRow {
                tenant: "t0".into(),
                metric: "gateway_function_invocation_total".into(),
                labels: labels.clone(),
                kind: "counter",
                ts_ns: now - (minutes - m) as i64 * 60 * NS,
                value: (m * (f + 1)) as f64,
                histogram: None,
                metered: true,
            });
            if samples.len() == 5000 {
                store.write(&Batch { samples: std::mem::take(&mut samples), ..Batch::default() }).await?;
            }
        }
    }
    store.write(&Batch { samples, ..Batch::default() }).await?;
    Ok(())
}
