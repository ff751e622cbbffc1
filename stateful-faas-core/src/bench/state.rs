//! `sfaas bench state`: put/get latency and throughput of the state store, in process and over
//! HTTP, for 1 KiB and 1 MiB values; then `redis-benchmark` against a Redis server started here
//! and against the store's own Redis protocol listener, in the same run (when `redis-server`
//! and `redis-benchmark` are installed).

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
    }
    let resp = match resp_matrix(operations).await {
        Ok(resp) => resp,
        Err(error) => {
            eprintln!("bench state: the Redis comparison was skipped: {error}");
            Vec::new()
        }
    };
    Ok(render(&rows, &resp, concurrency))
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

/// One `redis-benchmark` figure: a test against a server, with its clients and pipeline depth.
struct Resp {
    server: &'static str,
    test: String,
    size: usize,
    clients: usize,
    pipeline: usize,
    ops_per_second: f64,
    p50: Duration,
    p99: Duration,
    /// The server's CPU time (user and system) per request: steadier than throughput on a
    /// machine the client shares.
    cpu_per_request: Duration,
}

/// CPU time (user and system) used so far by the process or thread whose `/proc/…/stat` this
/// is.
fn cpu_time(stat: &str) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(stat)?;
    // The fields after the command's closing parenthesis; utime and stime are 14th and 15th.
    let fields: Vec<&str> = text.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let ticks = field(11).zip(field(12)).map(|(user, system)| user + system);
    let ticks = ticks.ok_or_else(|| anyhow::anyhow!("no CPU times in {stat}"))?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / per_second))
}

/// `redis-benchmark` against a real `redis-server` and against our listener, in turn, for
/// every combination of value size, clients and pipelining.
async fn resp_matrix(operations: usize) -> anyhow::Result<Vec<Resp>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    // With two cores or more, each server gets a core of its own and the client another, so
    // that neither is preempted by the other (the servers are measured in turn).
    let pinned = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    let mut redis = if pinned { Command::new("taskset") } else { Command::new("redis-server") };
    if pinned {
        redis.args(["-c", "1", "redis-server"]);
    }
    let mut redis = redis
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start redis-server: {e}"))?;
    let core = BenchCore::start(|config| {
        config.state.max_value_bytes = 1 << 30;
        config.state.tenant_quota_bytes = 64 << 30;
        config.state.total_budget_bytes = 64 << 30;
        // One event loop, as Redis has one thread.
        config.state_redis.threads = 1;
    })
    .await?;
    let ours = core.running.state_redis_addr.ok_or_else(|| anyhow::anyhow!("the core serves no Redis protocol"))?;
    // Our server's CPU is its event loop thread's (the bench's own threads share the process).
    let event_loop = event_loop_thread(ours, pinned)?;
    let token = core.credentials.ingest_token.clone();
    let redis_stat = format!("/proc/{}/stat", redis.id());
    let result = tokio::task::spawn_blocking(move || {
        let ready = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        anyhow::ensure!(ready, "redis-server did not listen on port {port}");
        let version = Command::new("redis-server").arg("--version").output()?;
        let version = String::from_utf8_lossy(&version.stdout).to_string();
        let version = version.split_whitespace().find_map(|w| w.strip_prefix("v=")).unwrap_or("?").to_string();
        let mut all = Vec::new();
        for size in [1024usize, 1 << 20] {
            for clients in [8usize, 50] {
                for pipeline in [1usize, 16] {
                    let n = match (size > 4096, pipeline > 1) {
                        (false, false) => operations,
                        (false, true) => operations * 5,
                        // 1 MiB values: MSET and MGET move 10 MiB a request.
                        (true, _) => 500,
                    };
                    // Small runs are short and noisy: three rounds, the two servers in turn, and
                    // the median of each.
                    let rounds = if size > 4096 { 1 } else { 3 };
                    for (round, (server, target, auth, stat)) in (0..rounds)
                        .flat_map(|_| {
                            [
                                ("Redis", ("127.0.0.1".to_string(), port), None, &redis_stat),
                                (
                                    "sfaas",
                                    (ours.ip().to_string(), ours.port()),
                                    Some(("bench", token.as_str())),
                                    &event_loop,
                                ),
                            ]
                        })
                        .enumerate()
                    {
                        eprintln!(
                            "bench state: redis-benchmark against {server}, {size} B, {clients} clients, pipeline {pipeline}, {n} requests, round {}",
                            round / 2 + 1
                        );
                        // One test a run, so that the server's CPU time is the test's.
                        // redis-benchmark has no MGET test: ten keys, the one its SET test wrote.
                        let mut mget = vec!["MGET"];
                        mget.extend(["key:__rand_int__"; 10]);
                        let tests: [&[&str]; 5] =
                            [&["-t", "set"], &["-t", "get"], &["-t", "incr"], &["-t", "mset"], &mget];
                        // INCR does not depend on -d: measured with the small values only.
                        for test in tests.into_iter().filter(|t| size <= 4096 || t[1] != "incr") {
                            let before = cpu_time(stat)?;
                            let csv = benchmark(&target, auth, size, clients, pipeline, n, test)?;
                            let cpu_per_request = (cpu_time(stat)? - before) / n as u32;
                            all.extend(parse_csv(&csv)?.into_iter().map(|(test, ops_per_second, p50, p99)| Resp {
                                server,
                                test,
                                size,
                                clients,
                                pipeline,
                                ops_per_second,
                                p50,
                                p99,
                                cpu_per_request,
                            }));
                        }
                    }
                }
            }
        }
        eprintln!("bench state: Redis {version}");
        Ok(medians(all))
    })
    .await?;
    let _ = redis.kill();
    let _ = redis.wait();
    core.stop().await;
    result
}

/// The median round of each series, by throughput.
fn medians(mut all: Vec<Resp>) -> Vec<Resp> {
    all.sort_by(|a, b| {
        (a.size, a.clients, a.pipeline, &a.test, a.server)
            .cmp(&(b.size, b.clients, b.pipeline, &b.test, b.server))
            .then(a.ops_per_second.total_cmp(&b.ops_per_second))
    });
    let mut medians = Vec::new();
    let mut rest = all.as_slice();
    while let Some(first) = rest.first() {
        let same = rest
            .iter()
            .take_while(|r| {
                (r.size, r.clients, r.pipeline, &r.test, r.server)
                    == (first.size, first.clients, first.pipeline, &first.test, first.server)
            })
            .count();
        let median = &rest[same / 2];
        medians.push(Resp { test: median.test.clone(), ..*median });
        rest = &rest[same..];
    }
    medians
}

/// The `/proc/…/stat` of the listener's event loop thread (it starts with the first connection,
/// made here); `pin`: the thread is pinned to core 1, where Redis runs.
fn event_loop_thread(address: std::net::SocketAddr, pin: bool) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut connection = std::net::TcpStream::connect(address)?;
    connection.write_all(b"PING\r\n")?;
    let mut pong = [0u8; 7];
    connection.read_exact(&mut pong)?;
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?;
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if name.trim() != "sfaas-redis-0" {
            continue;
        }
        let tid: libc::pid_t = task.file_name().to_string_lossy().parse()?;
        if pin {
            // SAFETY: a CPU set built with the libc macros, for a thread of this process.
            let pinned = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(1, &mut set);
                libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            anyhow::ensure!(pinned == 0, "cannot pin the event loop: {}", std::io::Error::last_os_error());
        }
        return Ok(format!("/proc/self/task/{tid}/stat"));
    }
    anyhow::bail!("the Redis protocol event loop thread was not found")
}

/// Runs `redis-benchmark --csv` (on core 0) and answers its output.
fn benchmark(
    (host, port): &(String, u16),
    auth: Option<(&str, &str)>,
    size: usize,
    clients: usize,
    pipeline: usize,
    n: usize,
    extra: &[&str],
) -> anyhow::Result<String> {
    let mut command = Command::new("taskset");
    command.args([
        "-c",
        "0",
        "redis-benchmark",
        "-h",
        host,
        "-p",
        &port.to_string(),
        "-d",
        &size.to_string(),
        "-n",
        &n.to_string(),
    ]);
    command.args(["-c", &clients.to_string(), "-P", &pipeline.to_string(), "--csv"]);
    if let Some((user, token)) = auth {
        command.args(["--user", user, "-a", token]);
    }
    let output = command.args(extra).output().map_err(|e| anyhow::anyhow!("cannot run redis-benchmark: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    anyhow::ensure!(
        output.status.success() && !stdout.contains("ERR"),
        "redis-benchmark failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

/// Parses `redis-benchmark --csv`: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
/// "p95_latency_ms","p99_latency_ms","max_latency_ms".
fn parse_csv(csv: &str) -> anyhow::Result<Vec<(String, f64, Duration, Duration)>> {
    let mut rows = Vec::new();
    for line in csv.lines().filter(|l| !l.starts_with("\"test\"")) {
        let fields: Vec<&str> = line.split("\",\"").map(|f| f.trim_matches('"')).collect();
        if fields.len() < 7 {
            continue;
        }
        let millis =
            |text: &str| -> anyhow::Result<Duration> { Ok(Duration::from_secs_f64(text.parse::<f64>()? / 1e3)) };
        let test = fields[0].split_whitespace().next().unwrap_or_default().to_string();
        rows.push((test, fields[1].parse()?, millis(fields[4])?, millis(fields[6])?));
    }
    anyhow::ensure!(!rows.is_empty(), "no results in redis-benchmark's output: {csv}");
    Ok(rows)
}

fn size_text(size: usize) -> String {
    if size >= 1 << 20 { format!("{} MiB", size >> 20) } else { format!("{} KiB", size >> 10) }
}

fn render(rows: &[Row], resp: &[Resp], concurrency: usize) -> String {
    let mut out = String::new();
    let latency = |d: Duration| if d < Duration::from_millis(1) { us(d) } else { ms(d) };
    let _ = writeln!(out, "| system | op | value | ops/s | p50 | p99 |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} |",
            row.system,
            row.op,
            size_text(row.size),
            row.ops_per_second,
            latency(row.p50),
            latency(row.p99)
        );
    }
    let _ = writeln!(out, "\nHTTP: {concurrency} concurrent clients; in-process: one thread.\n");
    if resp.is_empty() {
        return out;
    }
    let _ = writeln!(out, "redis-benchmark against Redis and against the state store's Redis protocol listener:\n");
    let _ = writeln!(
        out,
        "| test | value | clients | pipeline | Redis ops/s | sfaas ops/s | ratio | Redis p50 / p99 | sfaas p50 / p99 | server CPU per request, Redis / sfaas |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for theirs in resp.iter().filter(|r| r.server == "Redis") {
        let same = |r: &&Resp| {
            r.server == "sfaas"
                && r.test == theirs.test
                && (r.size, r.clients, r.pipeline) == (theirs.size, theirs.clients, theirs.pipeline)
        };
        let Some(ours) = resp.iter().find(same) else { continue };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2} | {} / {} | {} / {} | {} / {} |",
            theirs.test,
            size_text(theirs.size),
            theirs.clients,
            theirs.pipeline,
            theirs.ops_per_second,
            ours.ops_per_second,
            ours.ops_per_second / theirs.ops_per_second,
            latency(theirs.p50),
            latency(theirs.p99),
            latency(ours.p50),
            latency(ours.p99),
            us(theirs.cpu_per_request),
            us(ours.cpu_per_request)
        );
    }
    let _ = writeln!(out);
    for size in [1024usize, 1 << 20] {
        for (op, test) in [("PUT", "SET"), ("GET", "GET")] {
            let http = rows.iter().find(|r| r.system == "sfaas HTTP" && r.op == op && r.size == size);
            let redis = resp.iter().find(|r| {
                r.server == "Redis" && r.test == test && (r.size, r.clients, r.pipeline) == (size, concurrency, 1)
            });
            if let (Some(http), Some(redis)) = (http, redis) {
                let _ = writeln!(
                    out,
                    "- {op} {}: sfaas over HTTP / Redis throughput = {:.2} ({concurrency} clients)",
                    size_text(size),
                    http.ops_per_second / redis.ops_per_second
                );
            }
        }
    }
    out
}
