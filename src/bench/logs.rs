//! `sfaas bench logs`: function log lines from the function to durable storage. A `sfaas up`
//! process (`--sandbox off`) runs one exec function per tenant that writes `--lines` lines of
//! `--bytes` bytes to stderr (within the tenant's burst of the line rate and its share of the
//! export queue, so that those limits are not what is measured); all are called at once, and the time until the collector's
//! store holds every line is taken, with the CPU the `sfaas` process used (the gateway reading,
//! exporting; the collector receiving, storing; not the functions'). Beside it, the store's own
//! floor: the same records written straight into a fresh SQLite store, 1 024 a write.
//!
//! Then LogQL: `--query-lines` lines (10 M by default) of one tenant over a day, 8 functions,
//! JSON and logfmt bodies, are written into a fresh SQLite store, and the dashboard's Loki API
//! answers a few queries Grafana sends (each timed end to end over HTTP, best of three); beside
//! them, the floor of reading those rows at all: SQLite counting them by level.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::etl::start_up;

#[derive(clap::Args)]
pub struct Options {
    /// Tenants, each with its function, all called at once.
    #[arg(long, default_value_t = 8)]
    pub tenants: usize,
    /// Lines each function writes (at most 16 384: its tenant's share of the export queue).
    #[arg(long, default_value_t = 6_000)]
    pub lines: usize,
    /// Bytes a line.
    #[arg(long, default_value_t = 100)]
    pub bytes: usize,
    /// Lines stored for the LogQL queries (0: no queries).
    #[arg(long, default_value_t = 10_000_000)]
    pub query_lines: usize,
}

const WRITER: &str = "import sys\nn, size = int(sys.argv[1]), int(sys.argv[2])\nline = 'x' * size + '\\n'\n\
                      w = sys.stderr.write\nfor i in range(n):\n    w(line)\nsys.stderr.flush()\n";

/// CPU milliseconds a process used itself (user and system, not its children's).
fn own_cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let fields: Vec<&str> = stat[stat.rfind(')').map_or(0, |i| i + 2)..].split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

pub async fn run(options: Options) -> anyhow::Result<String> {
    let lines = options.lines.min(stateful_faas_core::telemetry::logs::TENANT_QUEUE_LINES);
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let functions = dir.path().join("functions");
    std::fs::create_dir_all(&functions)?;
    std::fs::write(functions.join("lines.py"), WRITER)?;
    let (up, addresses) = start_up(&data, &["--sandbox", "off"])?;
    let pid = up.0.id();
    let gateway = format!("http://{}", addresses["gateway"].as_str().context("no gateway address")?);
    let admin = std::fs::read_to_string(data.join("admin.token"))?.trim().to_string();
    let http = reqwest::Client::builder().no_proxy().build()?;
    let mut tokens = Vec::new();
    for t in 0..options.tenants {
        let tenant = format!("t{t}");
        let (ingest, _) = super::create_tenant(&http, &gateway, &admin, &tenant).await?;
        http.post(format!("{gateway}/system/functions"))
            .bearer_auth(&ingest)
            .json(&json!({
                "service": "lines", "kind": "exec", "workdir": functions.display().to_string(),
                "envProcess": format!("python3 lines.py {lines} {}", options.bytes),
            }))
            .send()
            .await?
            .error_for_status()
            .context("deploying the writer")?;
        tokens.push((tenant, ingest));
    }
    let url = format!("sqlite://{}", data.join("telemetry.db").display());
    let store = collector::store::TelemetryStore::open_with_blocks(&url, &data.join("blocks"))
        .await
        .context("opening the telemetry store")?;
    let total = (lines * options.tenants) as u64;
    let cpu_before = own_cpu_ms(pid);
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for (_, ingest) in &tokens {
        let (http, url, token) = (http.clone(), format!("{gateway}/function/lines"), ingest.clone());
        calls.spawn(async move { http.post(url).bearer_auth(token).send().await.map(|r| r.status()) });
    }
    while let Some(status) = calls.join_next().await {
        let status = status??;
        anyhow::ensure!(status.is_success(), "the writer answered {status}");
    }
    let called = started.elapsed();
    let mut stored = 0;
    while started.elapsed() < Duration::from_secs(300) {
        stored = 0;
        for (tenant, _) in &tokens {
            stored += store.counts(tenant).await?.logs;
        }
        if stored >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    let cpu_s = (own_cpu_ms(pid) - cpu_before) / 1000.0;
    drop(up);

    // The floor: the same records written straight into a store of their own.
    let floor_dir = tempfile::tempdir()?;
    let floor =
        collector::store::TelemetryStore::open(&format!("sqlite://{}", floor_dir.path().join("t.db").display()))
            .await?;
    let line = "x".repeat(options.bytes);
    let records: Vec<collector::model::LogRow> = (0..total)
        .map(|i| collector::model::LogRow {
            tenant: format!("t{}", i % options.tenants as u64),
            record_hash: format!("{i:064x}"),
            ts_ns: 1_700_000_000_000_000_000 + i as i64,
            severity_number: 13,
            severity_text: "WARN".into(),
            body: line.clone(),
            attributes: json!({"faas.name": "lines", "faas.instance": "exec", "faas.invocation_id": "0190", "log.iostream": "stderr", "sfaas.log.sequence": i}).to_string(),
            resource: r#"{"service.name":"sfaas-core"}"#.into(),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            span_id: Some("00f067aa0ba902b7".into()),
            metered: true,
        })
        .collect();
    let floor_started = Instant::now();
    for chunk in records.chunks(1024) {
        floor.write(&collector::model::Batch { logs: chunk.to_vec(), ..Default::default() }).await?;
    }
    let floor_elapsed = floor_started.elapsed();

    let mut out = String::new();
    writeln!(
        out,
        "logs: {} tenants × {lines} lines of {} bytes to stderr, at once; sfaas up --sandbox off on SQLite",
        options.tenants, options.bytes
    )?;
    writeln!(
        out,
        "\n| | lines | seconds | lines/s | sfaas CPU s | lines per CPU-second |\n|---|---:|---:|---:|---:|---:|"
    )?;
    writeln!(
        out,
        "| function → stored (calls answered in {:.2} s) | {stored} of {total} | {:.2} | {:.0} | {cpu_s:.2} | {:.0} |",
        called.as_secs_f64(),
        elapsed.as_secs_f64(),
        stored as f64 / elapsed.as_secs_f64(),
        stored as f64 / cpu_s.max(0.001)
    )?;
    writeln!(
        out,
        "| the same records written straight into SQLite (1 024 a write) | {total} | {:.2} | {:.0} | | |",
        floor_elapsed.as_secs_f64(),
        total as f64 / floor_elapsed.as_secs_f64()
    )?;
    if options.query_lines > 0 {
        out.push('\n');
        out.push_str(&logql(options.query_lines).await?);
    }
    Ok(out)
}

const FUNCTIONS: usize = 8;
const DAY_NS: i64 = 86_400_000_000_000;

/// Line `i` of the LogQL data: (function, severity, body). `f3` writes JSON, the others
/// logfmt; one line in ten of each function's is an error (status 503), one in a hundred
/// mentions a timeout.
fn query_line(i: usize) -> (String, (i64, &'static str), String) {
    let function = format!("f{}", i % FUNCTIONS);
    let k = i / FUNCTIONS;
    let severity = match k % 10 {
        0 => (17, "ERROR"),
        1 | 2 => (13, "WARN"),
        _ => (9, "INFO"),
    };
    let status = if k.is_multiple_of(10) { 503 } else { 200 };
    let body = if i % FUNCTIONS == 3 {
        format!(r#"{{"status":{status},"path":"/api/items/{}","ms":{}}}"#, i % 977, i % 1000)
    } else if i % 100 == 7 {
        format!("level=error msg=\"timeout talking to the store\" attempt={} ms={}", i % 5, i % 1000)
    } else {
        format!("level=info msg=\"request done\" status={status} path=/api/items/{} ms={}", i % 977, i % 1000)
    };
    (function, severity, body)
}

struct AdminOnly;

impl billing::api::ViewerResolver for AdminOnly {
    fn resolve(&self, token: &str) -> Option<contract::Viewer> {
        (token == "bench").then_some(contract::Viewer::Admin)
    }
}

async fn logql(lines: usize) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("logs.db").display());
    let store = collector::store::TelemetryStore::open(&url).await?;
    let end_ns = 1_791_676_800_000_000_000; // 2026-10-11T00:00:00Z
    let start_ns = end_ns - DAY_NS;
    // The alternative: the same lines in a plain SQLite table (time index), counted by level.
    let floor_url = format!("sqlite://{}?mode=rwc", dir.path().join("floor.db").display());
    let floor = sqlx::SqlitePool::connect(&floor_url).await?;
    sqlx::query("PRAGMA journal_mode = WAL").execute(&floor).await?;
    sqlx::query("CREATE TABLE logs (ts_ns INTEGER NOT NULL, severity_text TEXT NOT NULL, body TEXT NOT NULL, attributes TEXT NOT NULL)")
        .execute(&floor)
        .await?;
    sqlx::query("CREATE INDEX logs_by_time ON logs (ts_ns)").execute(&floor).await?;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..lines {
        let (function, (severity_number, severity_text), body) = query_line(i);
        batch.push(collector::model::LogRow {
            tenant: "acme".into(),
            record_hash: format!("{i:016x}"),
            ts_ns: start_ns + (DAY_NS as i128 * i as i128 / lines as i128) as i64,
            severity_number,
            severity_text: severity_text.into(),
            body,
            attributes: json!({
                "faas.name": function, "faas.instance": "exec", "log.iostream": "stderr",
                "faas.invocation_id": format!("0190b4e2-7c3a-7d2e-9f00-{:012x}", i / 3),
            })
            .to_string(),
            resource: r#"{"service.name":"sfaas-core"}"#.into(),
            trace_id: Some(format!("{:032x}", i / 3)),
            span_id: Some(format!("{:016x}", i)),
            metered: true,
        });
        if batch.len() == batch.capacity() || i + 1 == lines {
            let mut tx = floor.begin().await?;
            for row in &batch {
                sqlx::query("INSERT INTO logs VALUES (?, ?, ?, ?)")
                    .bind(row.ts_ns)
                    .bind(&row.severity_text)
                    .bind(&row.body)
                    .bind(&row.attributes)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            store.write(&collector::model::Batch { logs: std::mem::take(&mut batch), ..Default::default() }).await?;
            batch.reserve(10_000);
            if (i + 1) % 1_000_000 == 0 {
                eprintln!("logs: {} of {lines} lines stored ({:.0} s)", i + 1, started.elapsed().as_secs_f64());
            }
        }
    }
    let seeded = started.elapsed();
    // A day's lines are in blocks by the next day: sealed here at once, not timed below.
    let began = Instant::now();
    let sealed = store.seal_logs(true).await?;
    let sealing = began.elapsed();
    let billing = std::sync::Arc::new(billing::Billing::open(&store).await?);
    let running = dashboard::start(
        dashboard::DashboardConfig {
            addr: "127.0.0.1:0".parse()?,
            billing_every: None,
            collector_metrics_url: None,
            settle: None,
        },
        store.clone(),
        billing,
        std::sync::Arc::new(AdminOnly),
    )
    .await?;
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(600)).build()?;
    let (start, end) = (start_ns.to_string(), end_ns.to_string());
    let range = |query: Option<&str>, more: &[(&'static str, &'static str)]| {
        let mut params = vec![("start", start.clone()), ("end", end.clone())];
        params.extend(query.map(|q| ("query", q.to_string())));
        params.extend(more.iter().map(|(k, v)| (*k, v.to_string())));
        params
    };
    let queries = [
        (
            "Explore: `{function=\"f3\"} |= \"503\"`, newest 1 000 lines of the day",
            "query_range",
            range(Some(r#"{function="f3"} |= "503""#), &[("limit", "1000")]),
        ),
        (
            "Explore: `{source=\"function\"} | logfmt | ms > 990`, newest 1 000",
            "query_range",
            range(Some(r#"{source="function"} | logfmt | ms > 990"#), &[("limit", "1000")]),
        ),
        (
            "logs volume: `sum by (level) (count_over_time({source=\"function\"} | drop __error__ [5m]))`, the day at 5 m",
            "query_range",
            range(
                Some(r#"sum by (level) (count_over_time({source="function"} | drop __error__ [5m]))"#),
                &[("step", "300")],
            ),
        ),
        (
            "`sum by (function) (rate({source=\"function\"} |= \"timeout\" [1h]))`, the day at 1 h",
            "query_range",
            range(Some(r#"sum by (function) (rate({source="function"} |= "timeout" [1h]))"#), &[("step", "3600")]),
        ),
        (
            "`sum(count_over_time({function=\"f3\"} | json | status >= 500 [1h]))`, the day at 1 h",
            "query_range",
            range(Some(r#"sum(count_over_time({function="f3"} | json | status >= 500 [1h]))"#), &[("step", "3600")]),
        ),
        ("label values of `function` over the day", "label/function/values", range(None, &[])),
    ];
    let mut out = String::new();
    writeln!(
        out,
        "LogQL: {lines} lines of one tenant over a day ({FUNCTIONS} functions), in log blocks (SQLite catalog); \
         stored in {:.0} s with a plain SQLite copy beside, the last {sealed} sealed in {:.1} s (not timed below); \
         the dashboard's Loki API over HTTP, best of 3",
        seeded.as_secs_f64(),
        sealing.as_secs_f64()
    )?;
    writeln!(out, "\n| query | seconds | lines read | answer bytes |\n|---|---:|---:|---:|")?;
    for (name, api, params) in queries {
        let url = reqwest::Url::parse_with_params(&format!("{base}/loki/api/v1/{api}"), &params)?;
        let mut best = f64::INFINITY;
        let (mut read, mut size) = (String::new(), 0);
        for _ in 0..3 {
            let began = Instant::now();
            let response = http.get(url.clone()).bearer_auth("bench").header("X-Scope-OrgID", "acme").send().await?;
            let status = response.status();
            let body = response.text().await?;
            anyhow::ensure!(status.is_success(), "{name}: {status}: {body}");
            best = best.min(began.elapsed().as_secs_f64());
            size = body.len();
            let answer: serde_json::Value = serde_json::from_str(&body)?;
            read = answer["data"]["stats"]["summary"]["totalLinesProcessed"]
                .as_u64()
                .map_or(String::new(), |n| n.to_string());
        }
        writeln!(out, "| {name} | {best:.2} | {read} | {size} |")?;
    }
    running.shutdown().await;
    // The alternative: SQLite reading the same rows at all (counting them by level), and
    // finding a text in them.
    for (name, sql) in [
        (
            "`SELECT severity_text, COUNT(*) … GROUP BY 1` over the day",
            "SELECT severity_text, COUNT(*) FROM logs WHERE ts_ns >= ? AND ts_ns < ? GROUP BY 1",
        ),
        (
            "`… WHERE instr(body, 'timeout') > 0 GROUP BY json_extract(attributes, '$.\"faas.name\"')`",
            "SELECT json_extract(attributes, '$.\"faas.name\"'), COUNT(*) FROM logs WHERE ts_ns >= ? AND ts_ns < ? \
             AND instr(body, 'timeout') > 0 GROUP BY 1",
        ),
    ] {
        let began = Instant::now();
        let _: Vec<(String, i64)> = sqlx::query_as(sql).bind(start_ns).bind(end_ns + 1).fetch_all(&floor).await?;
        writeln!(out, "| plain SQLite: {name} | {:.2} | {lines} | |", began.elapsed().as_secs_f64())?;
    }
    Ok(out)
}
