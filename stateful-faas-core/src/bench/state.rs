//! `sfaas bench state`: put/get latency and throughput of the state store, in process and over
//! HTTP, for 1 KiB and 1 MiB values, beside `redis-benchmark` against a Redis server started
//! here in the same run (when `redis-server` and `redis-benchmark` are installed).

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{BenchCore, ms, percentiles, us};
use crate::state::metering::SystemClock;
use crate::state::{ObjectKey, PutOptions, StateConfig, StateStore};
use crate::tenant::TenantId;

/// One measured series.
struct Row {
    system: String,
    op: &'static str,
    size: usize,
    ops_per_second: f64,
    p50: Duration,
    p99: Duration,
}

/// Runs every series and renders the Markdown report.
pub async fn run(operations: usize, concurrency: usize) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    for size in [1024usize, 1 << 20] {
        // Fewer operations for large values, so one run stays within a minute.
        let count = if size > 4096 { (operations / 20).max(200) } else { operations };
        eprintln!("bench state: in-process, {size} B values, {count} ops");
        rows.extend(in_process(size, count));
        eprintln!("bench state: HTTP, {size} B values, {count} ops, concurrency {concurrency}");
        rows.extend(over_http(size, count, concurrency).await?);
        match redis(size, count, concurrency) {
            Ok(redis_rows) => rows.extend(redis_rows),
            Err(error) => eprintln!("bench state: Redis comparison skipped: {error}"),
        }
    }
    Ok(render(&rows, concurrency))
}

fn in_process(size: usize, count: usize) -> Vec<Row> {
    let store = StateStore::new(
        StateConfig {
            max_value_bytes: 1 << 30,
            total_budget_bytes: 64 << 30,
            tenant_quota_bytes: 64 << 30,
            ..StateConfig::default()
        },
        Arc::new(SystemClock),
        Default::default(),
    );
    let tenant = TenantId::new("bench").expect("valid");
    let value = Bytes::from(vec![7u8; size]);
    let keys: Vec<ObjectKey> =
        (0..count).map(|i| ObjectKey::new(None, "b", &format!("k{i}")).expect("valid")).collect();
    let mut put_latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for key in &keys {
        let t = Instant::now();
        store.put(&tenant, key.clone(), value.clone(), PutOptions::default()).expect("fits");
        put_latencies.push(t.elapsed());
    }
    let put_elapsed = started.elapsed();
    let mut get_latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for key in &keys {
        let t = Instant::now();
        std::hint::black_box(store.get(&tenant, key, false).expect("present"));
        get_latencies.push(t.elapsed());
    }
    let get_elapsed = started.elapsed();
    let (put_p50, put_p99) = percentiles(&mut put_latencies);
    let (get_p50, get_p99) = percentiles(&mut get_latencies);
    vec![
        Row {
            system: "sfaas in-process".into(),
            op: "PUT",
            size,
            ops_per_second: count as f64 / put_elapsed.as_secs_f64(),
            p50: put_p50,
            p99: put_p99,
        },
        Row {
            system: "sfaas in-process".into(),
            op: "GET",
            size,
            ops_per_second: count as f64 / get_elapsed.as_secs_f64(),
            p50: get_p50,
            p99: get_p99,
        },
    ]
}

async fn over_http(size: usize, count: usize, concurrency: usize) -> anyhow::Result<Vec<Row>> {
    let core = BenchCore::start(|config| {
        config.state.max_value_bytes = 1 << 30;
        config.state.tenant_quota_bytes = 64 << 30;
        config.state.total_budget_bytes = 64 << 30;
    })
    .await?;
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(concurrency).build()?;
    let value = Bytes::from(vec![7u8; size]);
    let mut rows = Vec::new();
    for op in ["PUT", "GET"] {
        let started = Instant::now();
        let mut workers = Vec::new();
        for worker in 0..concurrency {
            let (client, value, token) = (client.clone(), value.clone(), core.credentials.ingest_token.clone());
            let base = format!("{}/state/buckets/b/objects", core.url);
            let keys: Vec<usize> = (worker..count).step_by(concurrency).collect();
            workers.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(keys.len());
                for key in keys {
                    let url = format!("{base}/k{key}");
                    let t = Instant::now();
                    let request = match op {
                        "PUT" => client.put(&url).body(value.clone()),
                        _ => client.get(&url),
                    };
                    let response = request.bearer_auth(&token).send().await?;
                    anyhow::ensure!(response.status().is_success(), "{op} answered {}", response.status());
                    std::hint::black_box(response.bytes().await?);
                    latencies.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(latencies)
            }));
        }
        let mut latencies = Vec::with_capacity(count);
        for worker in workers {
            latencies.extend(worker.await??);
        }
        let elapsed = started.elapsed();
        let (p50, p99) = percentiles(&mut latencies);
        rows.push(Row {
            system: "sfaas HTTP".into(),
            op,
            size,
            ops_per_second: count as f64 / elapsed.as_secs_f64(),
            p50,
            p99,
        });
    }
    core.stop().await;
    Ok(rows)
}

/// Starts `redis-server` on a free port (no persistence) and runs `redis-benchmark` against it.
fn redis(size: usize, count: usize, concurrency: usize) -> anyhow::Result<Vec<Row>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut server = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start redis-server: {e}"))?;
    let ready = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let result = (|| {
        anyhow::ensure!(ready, "redis-server did not listen on port {port}");
        let version = Command::new("redis-server").arg("--version").output()?;
        let version = String::from_utf8_lossy(&version.stdout);
        let version =
            version.split_whitespace().find(|w| w.starts_with("v=")).unwrap_or("v=?").trim_start_matches("v=");
        eprintln!(
            "bench state: redis-benchmark (Redis {version}), {size} B values, {count} ops, concurrency {concurrency}"
        );
        let output = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "set,get", "-d", &size.to_string()])
            .args(["-n", &count.to_string(), "-c", &concurrency.to_string(), "--csv"])
            .output()
            .map_err(|e| anyhow::anyhow!("cannot run redis-benchmark: {e}"))?;
        anyhow::ensure!(output.status.success(), "redis-benchmark failed: {}", String::from_utf8_lossy(&output.stderr));
        parse_redis_csv(&String::from_utf8_lossy(&output.stdout), size, version)
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// Parses `redis-benchmark --csv`: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
/// "p95_latency_ms","p99_latency_ms","max_latency_ms".
fn parse_redis_csv(csv: &str, size: usize, version: &str) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for line in csv.lines().skip_while(|l| l.starts_with("\"test\"")) {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        if fields.len() < 7 {
            continue;
        }
        let op = match fields[0] {
            "SET" => "PUT",
            "GET" => "GET",
            _ => continue,
        };
        let millis =
            |text: &str| -> anyhow::Result<Duration> { Ok(Duration::from_secs_f64(text.parse::<f64>()? / 1e3)) };
        rows.push(Row {
            system: format!("Redis {version} (redis-benchmark)"),
            op,
            size,
            ops_per_second: fields[1].parse()?,
            p50: millis(fields[4])?,
            p99: millis(fields[6])?,
        });
    }
    anyhow::ensure!(!rows.is_empty(), "no SET/GET lines in redis-benchmark's output: {csv}");
    Ok(rows)
}

fn render(rows: &[Row], concurrency: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| system | op | value | ops/s | p50 | p99 |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
    for row in rows {
        let size =
            if row.size >= 1 << 20 { format!("{} MiB", row.size >> 20) } else { format!("{} KiB", row.size >> 10) };
        let latency = |d: Duration| if d < Duration::from_millis(1) { us(d) } else { ms(d) };
        let _ = writeln!(
            out,
            "| {} | {} | {size} | {:.0} | {} | {} |",
            row.system,
            row.op,
            row.ops_per_second,
            latency(row.p50),
            latency(row.p99)
        );
    }
    let _ = writeln!(out, "\nHTTP and Redis: {concurrency} concurrent clients; in-process: one thread.");
    let _ = writeln!(out);
    for size in [1024usize, 1 << 20] {
        for op in ["PUT", "GET"] {
            let find =
                |prefix: &str| rows.iter().find(|r| r.system.starts_with(prefix) && r.op == op && r.size == size);
            if let (Some(http), Some(redis)) = (find("sfaas HTTP"), find("Redis")) {
                let in_process = find("sfaas in-process").map_or(f64::NAN, |r| r.ops_per_second / redis.ops_per_second);
                let _ = writeln!(
                    out,
                    "- {op} {} B: sfaas over HTTP / Redis throughput = {:.2}; sfaas in-process / Redis = {:.1}",
                    size,
                    http.ops_per_second / redis.ops_per_second,
                    in_process
                );
            }
        }
    }
    out
}
