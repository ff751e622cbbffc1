//! `sfaas bench etl`: the thesis's claim, measured. The ETL flow (examples/etl/) runs with its
//! intermediate data handed between stages (a) through the ephemeral state store, (b) through
//! an S3-compatible object store on this machine (s3rver, from npm: the block-storage
//! baseline), and (c) inline in the requests, on batches of about 1 KiB and 1 MiB. Everything
//! runs as a user runs it: a `sfaas up` process, a tenant per case on the `pro` plan, batches
//! sent to `POST /flow/etl` two at a time (the stream's default `max_runs`), then billing.
//!
//! Reported per case: records/s, batch latency p50/p99, CPU-ms per million records (billed:
//! the functions' own; and all: the sfaas process with its Python children, plus the object
//! store's process), and the billed cost per million records (the tenant's per-invocation
//! and state costs, summed at full precision). Charts go to `--charts-dir` (plotters SVG).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::client::Gateway;
use crate::etl;

const TRANSPORTS: [&str; 3] = ["state", "s3", "inline"];
const START_MS: i64 = 1_764_151_200_000;

struct Case {
    transport: &'static str,
    size_label: &'static str,
    tenant: String,
    batches: Vec<String>,
    records: u64,
    latencies: Vec<Duration>,
    wall: Duration,
    cpu_ms_all: f64,
    billed_cpu_ms: i64,
    invocations: i64,
    cost: Decimal,
}

/// CPU time (user + system) of a process and its reaped children, in ms.
pub fn cpu_ms(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').map_or(0, |i| i + 2)..].split_whitespace().collect();
    let ticks: f64 = [11, 12, 13, 14].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

fn s3rver_program() -> anyhow::Result<String> {
    if let Ok(path) = std::env::var("SFAAS_S3RVER") {
        return Ok(path);
    }
    let found = std::process::Command::new("sh").args(["-c", "command -v s3rver"]).output()?;
    if found.status.success() {
        return Ok(String::from_utf8_lossy(&found.stdout).trim().to_string());
    }
    bail!(
        "the S3 baseline needs s3rver: `npm install s3rver@3`, then put node_modules/.bin on PATH or set SFAAS_S3RVER"
    )
}

/// A child process killed when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// s3rver on a free port with its files in `dir`, and a bucket `bucket` made in it: the
/// process and the bucket's URL (path style: `http://127.0.0.1:PORT/BUCKET`).
pub(crate) async fn s3rver(dir: &Path, bucket: &str) -> anyhow::Result<(Child, String)> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let s3 = Child(
        std::process::Command::new(s3rver_program()?)
            .args(["-d", &dir.to_string_lossy(), "-p", &port.to_string(), "--silent"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting s3rver")?,
    );
    let bucket = format!("http://127.0.0.1:{port}/{bucket}");
    let http = reqwest::Client::builder().no_proxy().build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http.put(&bucket).send().await.is_ok_and(|r| r.status().is_success()) {
        anyhow::ensure!(Instant::now() < deadline, "s3rver did not answer on port {port}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((s3, bucket))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `sfaas up` in `dir` on free ports, with `args` besides; the process and its
/// addresses.
pub fn start_up(dir: &Path, args: &[&str]) -> anyhow::Result<(Child, Value)> {
    use std::io::BufRead;
    let any = "127.0.0.1:0";
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["up", "--data-dir"])
        .arg(dir)
        .args(["--gateway-addr", any, "--otlp-grpc-addr", any, "--otlp-http-addr", any, "--jaeger-addr", any])
        .args(["--ui-addr", any, "--billing-interval-secs", "0", "--state-usage-interval-secs", "1"])
        .args(args)
        .env("SFAAS_LOG", "warn")
        .env_remove("SFAAS_ADMIN_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting sfaas up")?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    let addresses: Value = serde_json::from_str(&line).context("reading the addresses sfaas up prints")?;
    Ok((Child(child), addresses))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

pub async fn run(small_batches: usize, large_batches: usize, charts_dir: Option<PathBuf>) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let (s3, bucket) = s3rver(&dir.path().join("s3"), "etl").await?;
    // The s3 transport's Python stage reaches the bucket on loopback.
    let (up, addresses) =
        start_up(dir.path(), &["--etl-s3-url", &bucket, "--sandbox-egress", "bench-s3-kib,bench-s3-mib"])?;
    let gateway = format!("http://{}", addresses["gateway"].as_str().context("no gateway address")?);
    let ui = format!("http://{}", addresses["ui"].as_str().context("no dashboard address")?);
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))?.trim().to_string();
    let api = Gateway::new(&gateway, &admin)?;
    let billing = Gateway::new(&ui, &admin)?;

    // Batches of about 1 KiB (8 records) and 1 MiB (8600 records), the same for every transport.
    let mut generator = etl_example::Generator::new(7, START_MS, 50);
    let mut make = |records: usize, count: usize| -> Vec<String> {
        (0..count).map(|_| etl_example::body(&generator.trips(records), false)).collect()
    };
    let sizes = [("1 KiB", make(8, small_batches)), ("1 MiB", make(8600, large_batches))];
    eprintln!(
        "bench etl: batches of {} and {} bytes on average",
        sizes[0].1.iter().map(String::len).sum::<usize>() / small_batches.max(1),
        sizes[1].1.iter().map(String::len).sum::<usize>() / large_batches.max(1)
    );

    let mut cases = Vec::new();
    for (size_label, batches) in &sizes {
        for transport in TRANSPORTS {
            let tenant = format!("bench-{transport}-{}", if size_label.contains('K') { "kib" } else { "mib" });
            api.text(api.request(reqwest::Method::POST, "/system/tenants").json(&json!({"name": tenant}))).await?;
            billing
                .text(
                    billing
                        .request(reqwest::Method::PUT, &format!("/billing/tenants/{tenant}/plan"))
                        .json(&json!({"plan": "pro"})),
                )
                .await?;
            let setup = etl::Setup { transport, script_dir: &dir.path().join("etl") };
            etl::setup(&api, &tenant, &setup).await?;
            cases.push(Case {
                transport,
                size_label,
                tenant,
                batches: batches.clone(),
                records: 0,
                latencies: vec![],
                wall: Duration::ZERO,
                cpu_ms_all: 0.0,
                billed_cpu_ms: 0,
                invocations: 0,
                cost: Decimal::ZERO,
            });
        }
    }

    for case in &mut cases {
        // One warm-up batch (Python's first start, caches), billed and counted like the rest.
        let warm = case.batches[0].clone();
        run_batch(&api, &case.tenant, warm).await?;
        let cpu_before = cpu_ms(up.0.id()) + cpu_ms(s3.0.id());
        let started = Instant::now();
        let mut in_flight = tokio::task::JoinSet::new();
        let mut queue = case.batches.clone().into_iter();
        loop {
            while in_flight.len() < 2
                && let Some(batch) = queue.next()
            {
                let (api, tenant) = (api.clone(), case.tenant.clone());
                in_flight.spawn(async move { run_batch(&api, &tenant, batch).await });
            }
            let Some(done) = in_flight.join_next().await else { break };
            case.latencies.push(done??);
        }
        case.wall = started.elapsed();
        case.cpu_ms_all = cpu_ms(up.0.id()) + cpu_ms(s3.0.id()) - cpu_before;
        case.records = case.batches.iter().map(|b| b.lines().count() as u64).sum();
        eprintln!(
            "bench etl: {} {}: {} batches in {:.1} s",
            case.transport,
            case.size_label,
            case.batches.len(),
            case.wall.as_secs_f64()
        );
    }

    // Bill: wait until every invocation (4 per batch, warm-up included) is rated.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        billing.text(billing.request(reqwest::Method::POST, "/billing/run")).await?;
        let mut complete = true;
        for case in &mut cases {
            let usage: Value = serde_json::from_str(
                &billing
                    .text(billing.request(reqwest::Method::GET, &format!("/billing/usage/{}", case.tenant)))
                    .await?,
            )?;
            let rows = usage["rows"].as_object().cloned().unwrap_or_default();
            case.invocations = rows.values().map(|r| r["invocations"].as_i64().unwrap_or(0)).sum();
            case.billed_cpu_ms = rows.values().map(|r| r["cpu_ms"].as_i64().unwrap_or(0)).sum();
            case.cost = rows.values().filter_map(|r| r["cost"].as_str()?.parse::<Decimal>().ok()).sum();
            complete &= case.invocations as usize >= 4 * (case.batches.len() + 1);
        }
        if complete {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "not every invocation was billed within 2 minutes");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    drop(s3);
    drop(up);

    let report = report(&cases);
    if let Some(dir) = charts_dir {
        write_charts(&dir, &cases)?;
    }
    Ok(report)
}

async fn run_batch(api: &Gateway, tenant: &str, batch: String) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let answer = api.text(api.request(reqwest::Method::POST, &format!("/flow/etl.{tenant}")).body(batch)).await?;
    let elapsed = started.elapsed();
    let answer: Value = serde_json::from_str(&answer).with_context(|| format!("the etl flow answered {answer}"))?;
    anyhow::ensure!(answer["loaded"].as_u64().is_some(), "the etl flow answered {answer}");
    Ok(elapsed)
}

fn per_million(value: f64, records: u64) -> f64 {
    value * 1e6 / records.max(1) as f64
}

fn report(cases: &[Case]) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "| batch | transport | records/s | batch p50 | batch p99 | billed CPU-ms / M records | all CPU-ms / M records | billed cost / M records (EUR) |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for case in cases {
        let mut sorted = case.latencies.clone();
        sorted.sort();
        // Warm-up batch included in the billed figures: normalise by the records billed.
        let billed_records = case.records + case.batches[0].lines().count() as u64;
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.1} ms | {:.1} ms | {:.0} | {:.0} | {:.4} |",
            case.size_label,
            case.transport,
            case.records as f64 / case.wall.as_secs_f64(),
            percentile(&sorted, 0.5).as_secs_f64() * 1e3,
            percentile(&sorted, 0.99).as_secs_f64() * 1e3,
            per_million(case.billed_cpu_ms as f64, billed_records),
            per_million(case.cpu_ms_all, case.records),
            (case.cost * Decimal::from(1_000_000) / Decimal::from(billed_records.max(1))).round_dp(4),
        );
    }
    let _ = writeln!(out, "\nRatios to the state store (records/s, p50):");
    for size in ["1 KiB", "1 MiB"] {
        let rate = |t: &str| {
            cases
                .iter()
                .find(|c| c.transport == t && c.size_label == size)
                .map(|c| (c.records as f64 / c.wall.as_secs_f64(), median(&c.latencies)))
        };
        if let (Some(state), Some(s3), Some(inline)) = (rate("state"), rate("s3"), rate("inline")) {
            let _ = writeln!(
                out,
                "- {size}: state/s3 throughput {:.2}×, p50 {:.2}×; state/inline throughput {:.2}×, p50 {:.2}×",
                state.0 / s3.0,
                s3.1.as_secs_f64() / state.1.as_secs_f64(),
                state.0 / inline.0,
                inline.1.as_secs_f64() / state.1.as_secs_f64(),
            );
        }
    }
    out
}

fn median(latencies: &[Duration]) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    percentile(&sorted, 0.5)
}

fn write_charts(dir: &Path, cases: &[Case]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let series: Vec<&str> = TRANSPORTS.to_vec();
    let metric = |f: &dyn Fn(&Case) -> f64, size: &str| -> (String, Vec<f64>) {
        let values = TRANSPORTS
            .iter()
            .map(|t| cases.iter().find(|c| c.transport == *t && c.size_label == size).map_or(0.0, f))
            .collect();
        (size.to_string(), values)
    };
    let throughput = |c: &Case| c.records as f64 / c.wall.as_secs_f64();
    let p50 = |c: &Case| median(&c.latencies).as_secs_f64() * 1e3;
    let p99 = |c: &Case| {
        let mut sorted = c.latencies.clone();
        sorted.sort();
        percentile(&sorted, 0.99).as_secs_f64() * 1e3
    };
    for (file, title, unit, f) in [
        ("etl-throughput", "ETL records/s by transport", "records/s", &throughput as &dyn Fn(&Case) -> f64),
        ("etl-latency-p50", "ETL batch latency p50", "ms", &p50),
        ("etl-latency-p99", "ETL batch latency p99", "ms", &p99),
    ] {
        for size in ["1 KiB", "1 MiB"] {
            let svg =
                dashboard::charts::grouped_bars(&format!("{title}, {size} batches"), unit, &series, &[metric(f, size)]);
            let name = format!("{file}-{}.svg", if size.contains('K') { "1kib" } else { "1mib" });
            std::fs::write(dir.join(&name), svg).with_context(|| format!("writing {name}"))?;
        }
    }
    Ok(())
}
