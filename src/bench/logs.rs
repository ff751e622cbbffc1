//! `sfaas bench logs`: function log lines from the function to durable storage. A `sfaas up`
//! process (`--sandbox off`) runs one exec function per tenant that writes `--lines` lines of
//! `--bytes` bytes to stderr (within the tenant's burst of the line rate and its share of the
//! export queue, so that those limits are not what is measured); all are called at once, and the time until the collector's
//! store holds every line is taken, with the CPU the `sfaas` process used (the gateway reading,
//! exporting; the collector receiving, storing; not the functions'). Beside it, the store's own
//! floor: the same records written straight into a fresh SQLite store, 1 024 a write.

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
    Ok(out)
}
