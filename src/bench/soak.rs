//! `sfaas bench soak`: one tenant attacks, another works, and the platform holds. A `sfaas up`
//! process runs with its defaults (quotas included; `--sandbox off` unless `--sandbox on`).
//! Tenant `calm` calls a function 16 times a second and asks a PromQL query 4 times a second,
//! from start to end. After a quiet spell, tenant `storm`, for the soak's length, offers
//! open-loop (at a fixed rate, whatever the answers):
//! - OTLP spans at `--ingest-rate` (by default about twice what the collector stores on this
//!   machine), in requests of 512;
//! - calls at `--call-rate`, and a tenth as many 200 ms naps (more than its builtin threads);
//! - PromQL at `--query-rate`: hour-long range queries at one-second steps, and a query over
//!   every series;
//! - a flood of log lines: `--flood-rate` calls a second of an exec function that writes
//!   100 000 lines of 200 bytes to stderr; the calm tenant's own exec function writes one line
//!   a call, every tenth of its ticks.
//!
//! Then a recovery spell. Reported: the calm tenant's p50/p99 per spell, the storm's answers
//! by status, the process's resident memory, and whether each holds: the storm is refused
//! (429/503), memory stays under `--max-rss-mib`, the calm p99 during the storm is within 2×
//! of its quiet figure, after the storm the calm figures come back and the storm tenant is
//! served again, the storm's stored lines stay within its line rate (2 000 a second, a burst of
//! ten seconds') and bytes a day, and every line of the calm tenant's is stored.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

use super::etl::{cpu_ms, start_up};

const QUIET: u8 = 0;
const STORM: u8 = 1;
const RECOVERY: u8 = 2;
const SPELLS: [&str; 3] = ["quiet", "storm", "recovery"];
/// The calm tenant's first seconds are not counted (first connections, caches filling).
const WARM_UP: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct Options {
    /// Minutes of storm.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Seconds of quiet before and of recovery after.
    #[arg(long, default_value_t = 60)]
    pub quiet_secs: u64,
    /// Spans a second the storm offers (about twice what the collector stores on a 2-core machine).
    #[arg(long, default_value_t = 100_000)]
    pub ingest_rate: u64,
    /// Calls a second the storm offers (and a tenth as many 200 ms naps).
    #[arg(long, default_value_t = 2000)]
    pub call_rate: u64,
    /// PromQL queries a second the storm offers (half of them hour-long ranges at 1 s steps).
    #[arg(long, default_value_t = 20)]
    pub query_rate: u64,
    /// Calls a second of the storm's function that writes 100 000 log lines.
    #[arg(long, default_value_t = 2.0)]
    pub flood_rate: f64,
    /// Resident memory the sfaas process must stay under, MiB.
    #[arg(long, default_value_t = 2048)]
    pub max_rss_mib: u64,
    /// Nice value of the storm's client threads (0: the same priority as the platform).
    /// On a machine that also runs the platform, they stand for clients on other machines.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub storm_nice: i32,
    /// Run the tenants' exec functions in sandboxes (`on` needs root), where the flood
    /// function's `limits.cpu` (a quarter of a CPU) holds; `off` leaves it unconfined.
    #[arg(long, default_value = "off", value_parser = ["on", "off"])]
    pub sandbox: String,
}

/// Latencies of the calm tenant's requests, per spell.
#[derive(Default)]
struct Calm {
    calls: [Vec<Duration>; 3],
    queries: [Vec<Duration>; 3],
    failed: [u64; 3],
    /// Calls of its exec function that answered (each wrote one log line).
    lines: u64,
}

/// The storm's function: 100 000 lines of 200 bytes to stderr. The calm tenant's: one line.
const FLOOD: &str =
    "import sys\nw = sys.stderr.write\nline = 'x' * 199 + '\\n'\nfor i in range(100000):\n    w(line)\n";
const TALK: &str = "import sys\nsys.stderr.write('calm line %s\\n' % sys.stdin.read())\n";

/// The storm's answers: (what, status) → count.
type Answers = Mutex<BTreeMap<(&'static str, u16), u64>>;

fn count(answers: &Answers, what: &'static str, status: u16) {
    *answers.lock().unwrap().entry((what, status)).or_default() += 1;
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()))
        .map_or(0.0, |kib: f64| kib / 1024.0)
}

fn percentile(latencies: &[Duration], p: f64) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        n => sorted[((n as f64 * p).ceil() as usize).clamp(1, n) - 1],
    }
}

/// Sends `request(n)` for n = 0, 1, … at `per_second` (every 10 ms what is due), each on a task
/// of its own, at most 512 in flight (beyond, a request is counted as not sent), until
/// `storming` ends; answers are counted under `what`.
async fn open_loop(
    what: &'static str,
    per_second: f64,
    request: Box<dyn Fn(usize) -> reqwest::RequestBuilder + Send>,
    storming: Arc<AtomicBool>,
    answers: Arc<Answers>,
) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut n = 0;
    while storming.load(Ordering::Relaxed) {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * per_second) as usize;
        while n < due {
            n += 1;
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                count(&answers, what, 0);
                continue;
            };
            let (request, answers) = (request(n), answers.clone());
            tokio::spawn(async move {
                let status = request.send().await.map_or(1, |r| r.status().as_u16());
                count(&answers, what, status);
                drop(permit);
            });
        }
    }
}

/// A Prometheus API URL of the dashboard.
fn url(ui: &str, api: &str, params: &[(&str, &str)]) -> reqwest::Url {
    reqwest::Url::parse_with_params(&format!("{ui}/prometheus/api/v1/{api}"), params).expect("a valid URL")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run(options: Options) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let (up, addresses) = start_up(dir.path(), &["--sandbox", &options.sandbox])?;
    let pid = up.0.id();
    let address = |name: &str| addresses[name].as_str().map(|a| format!("http://{a}")).context("no address");
    let (gateway, otlp, ui) = (address("gateway")?, address("otlp_http")?, address("ui")?);
    let admin = std::fs::read_to_string(dir.path().join("admin.token"))?.trim().to_string();
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build()?;

    // Outside the data directory: a sandbox refuses a workdir inside it.
    let functions_dir = tempfile::tempdir()?;
    let functions = functions_dir.path();
    // The system's Python where there is one: a sandbox sees the host's system folders only.
    let python = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    std::fs::write(functions.join("flood.py"), FLOOD)?;
    std::fs::write(functions.join("talk.py"), TALK)?;
    let mut tokens = BTreeMap::new();
    for tenant in ["calm", "storm"] {
        let (ingest, read) = super::create_tenant(&http, &gateway, &admin, tenant).await?;
        let writer = if tenant == "calm" { ("talk", "talk.py") } else { ("flood", "flood.py") };
        let specs = [
            json!({"service": "echo", "builtin": "echo"}),
            json!({"service": "nap", "builtin": "sleep"}),
            json!({"service": writer.0, "kind": "exec", "workdir": functions.display().to_string(),
                   "envProcess": format!("{python} {}", writer.1), "limits": {"cpu": "250m"}}),
        ];
        for spec in specs {
            http.post(format!("{gateway}/system/functions"))
                .bearer_auth(&ingest)
                .json(&spec)
                .send()
                .await?
                .error_for_status()
                .with_context(|| format!("deploying {} for {tenant}", spec["service"]))?;
        }
        tokens.insert(tenant, (ingest, read));
    }
    let (calm_ingest, calm_read) = tokens["calm"].clone();
    let (storm_ingest, storm_read) = tokens["storm"].clone();

    let spell = Arc::new(AtomicU8::new(QUIET));
    let done = Arc::new(AtomicBool::new(false));
    let calm = Arc::new(Mutex::new(Calm::default()));
    let answers: Arc<Answers> = Arc::default();
    let rss: Arc<Mutex<[f64; 3]>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();

    // Memory, every second.
    {
        let (spell, done, rss) = (spell.clone(), done.clone(), rss.clone());
        tasks.spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let now = rss_mib(pid);
                {
                    let mut peaks = rss.lock().unwrap();
                    let peak = &mut peaks[spell.load(Ordering::Relaxed) as usize];
                    *peak = peak.max(now);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    // The calm tenant: every 50 ms a call, or every fifth time a query, open-loop, from a thread
    // and runtime of its own, so that the storm's own client work does not delay its clock.
    let calm_thread = {
        let (spell, done, calm, gateway, ui) = (spell.clone(), done.clone(), calm.clone(), gateway.clone(), ui.clone());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let http = reqwest::Client::builder().no_proxy().build()?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                let mut n = 0u64;
                let warm = Instant::now() + WARM_UP;
                while !done.load(Ordering::Relaxed) {
                    tick.tick().await;
                    n += 1;
                    let query = n.is_multiple_of(5);
                    if n % 10 == 3 {
                        // A line of the calm tenant's logs (not timed: a process starts).
                        let request =
                            http.post(format!("{gateway}/function/talk")).bearer_auth(&calm_ingest).body(n.to_string());
                        let calm = calm.clone();
                        tokio::spawn(async move {
                            if request.send().await.is_ok_and(|r| r.status().is_success()) {
                                calm.lock().unwrap().lines += 1;
                            }
                        });
                        continue;
                    }
                    let request = if query {
                        let promql = "sum by (function_name) (rate(gateway_function_invocation_total[1m]))";
                        http.get(url(&ui, "query", &[("query", promql)])).bearer_auth(&calm_read)
                    } else {
                        http.post(format!("{gateway}/function/echo")).bearer_auth(&calm_ingest).body("hello")
                    };
                    let (spell, calm) = (spell.load(Ordering::Relaxed) as usize, calm.clone());
                    tokio::spawn(async move {
                        let started = Instant::now();
                        let ok = request.send().await.is_ok_and(|r| r.status().is_success());
                        if started < warm {
                            return;
                        }
                        let mut calm = calm.lock().unwrap();
                        match (ok, query) {
                            (false, _) => calm.failed[spell] += 1,
                            (true, true) => calm.queries[spell].push(started.elapsed()),
                            (true, false) => calm.calls[spell].push(started.elapsed()),
                        }
                    });
                }
            })
        })
    };
    eprintln!("bench soak: quiet for {} s (the first {} s not counted)", options.quiet_secs, WARM_UP.as_secs());
    tokio::time::sleep(Duration::from_secs(options.quiet_secs)).await;

    // The storm.
    let storm_for = Duration::from_secs_f64(options.minutes * 60.0);
    eprintln!(
        "bench soak: storm for {:.1} min: {} spans/s, {} calls/s (and a tenth as many 200 ms naps), {} PromQL queries/s",
        options.minutes, options.ingest_rate, options.call_rate, options.query_rate
    );
    spell.store(STORM, Ordering::Relaxed);
    let storming = Arc::new(AtomicBool::new(true));
    let cpu_before = cpu_ms(pid);
    // The storm's client runs on a runtime of its own, its threads at `storm_nice`: on a
    // machine that also runs the platform and the calm tenant, it stands for clients on other
    // machines (the platform's own work for the storm keeps its priority).
    let nice = options.storm_nice;
    let storm_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            // SAFETY: setpriority on the calling thread (Linux keeps a nice value per thread).
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
        })
        .build()?;
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build()?;
    let mut storm = Vec::new();
    // The ingest benchmark's requests of 512 spans, each of its own traces.
    let spans = collector::bench::SPANS_PER_REQUEST;
    let bodies: Arc<Vec<Vec<u8>>> =
        Arc::new((0..64).map(|seed| collector::bench::realistic_body(1_000_000 + seed, spans)).collect());
    let drive = |what: &'static str, per_second: f64, request: Box<dyn Fn(usize) -> reqwest::RequestBuilder + Send>| {
        open_loop(what, per_second, request, storming.clone(), answers.clone())
    };
    let (h, o, t) = (http.clone(), otlp.clone(), storm_ingest.clone());
    storm.push(storm_runtime.spawn(drive(
        "ingest",
        options.ingest_rate as f64 / spans as f64,
        Box::new(move |n| {
            h.post(format!("{o}/v1/traces"))
                .bearer_auth(&t)
                .header("content-type", "application/x-protobuf")
                .body(bodies[n % bodies.len()].clone())
        }),
    )));
    let (h, g, t) = (http.clone(), gateway.clone(), storm_ingest.clone());
    storm.push(storm_runtime.spawn(drive(
        "call",
        options.call_rate as f64,
        Box::new(move |_| h.post(format!("{g}/function/echo")).bearer_auth(&t).body("x".repeat(4096))),
    )));
    // Naps of 200 ms: at a tenth of the call rate, more than its 16 builtin threads can hold.
    let (h, g, t) = (http.clone(), gateway.clone(), storm_ingest.clone());
    storm.push(storm_runtime.spawn(drive(
        "nap",
        options.call_rate as f64 / 10.0,
        Box::new(move |_| h.post(format!("{g}/function/nap")).bearer_auth(&t).body("200")),
    )));
    let (h, u, t) = (http.clone(), ui.clone(), storm_read.clone());
    storm.push(storm_runtime.spawn(drive(
        "promql",
        options.query_rate as f64,
        Box::new(move |n| {
            if n.is_multiple_of(2) {
                return h.get(url(&u, "query", &[("query", "count({__name__=~\".+\"})")])).bearer_auth(&t);
            }
            let end = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
            let (start, end) = ((end - 3600).to_string(), end.to_string());
            let promql = "histogram_quantile(0.99, sum by (le, function_name) \
                          (rate(gateway_functions_seconds_bucket[5m])))";
            let params = [("query", promql), ("start", &start), ("end", &end), ("step", "1")];
            h.get(url(&u, "query_range", &params)).bearer_auth(&t)
        }),
    )));
    let (h, g, t) = (http.clone(), gateway.clone(), storm_ingest.clone());
    storm.push(storm_runtime.spawn(drive(
        "flood",
        options.flood_rate,
        Box::new(move |_| h.post(format!("{g}/function/flood")).bearer_auth(&t)),
    )));
    let started = Instant::now();
    while started.elapsed() < storm_for {
        tokio::time::sleep(Duration::from_secs(30).min(storm_for.saturating_sub(started.elapsed()))).await;
        let calm = calm.lock().unwrap();
        eprintln!(
            "bench soak: {:>4.0} s of storm: calm p99 {:.1} ms ({} calls), rss {:.0} MiB",
            started.elapsed().as_secs_f64(),
            ms(percentile(&calm.calls[STORM as usize], 0.99)),
            calm.calls[STORM as usize].len(),
            rss_mib(pid)
        );
    }
    storming.store(false, Ordering::Relaxed);
    for task in storm {
        let _ = task.await;
    }
    storm_runtime.shutdown_background();
    let storm_cpu_s = (cpu_ms(pid) - cpu_before) / 1000.0;
    let storm_secs = started.elapsed().as_secs_f64();

    // Recovery: the storm tenant is served again once its quotas' Retry-After have passed.
    spell.store(RECOVERY, Ordering::Relaxed);
    eprintln!("bench soak: recovery for {} s", options.quiet_secs);
    tokio::time::sleep(Duration::from_secs(options.quiet_secs)).await;
    let storm_call = http.post(format!("{gateway}/function/echo")).bearer_auth(&storm_ingest).body("again");
    let storm_call = storm_call.send().await?.status().as_u16();
    let small = collector::bench::realistic_body(9_999_999, 1);
    let storm_ingest_again = http
        .post(format!("{otlp}/v1/traces"))
        .bearer_auth(&storm_ingest)
        .header("content-type", "application/x-protobuf")
        .body(small)
        .send()
        .await?
        .status()
        .as_u16();
    done.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    tasks.abort_all();
    let _ = calm_thread.join();
    // Log lines as stored, once the last export is in (a few seconds at most).
    let store =
        collector::store::TelemetryStore::open(&format!("sqlite://{}", dir.path().join("telemetry.db").display()))
            .await
            .context("opening the telemetry store")?;
    let calm_lines_sent = calm.lock().unwrap().lines;
    let waited = Instant::now();
    let (mut calm_lines, mut storm_lines) = (0, 0);
    while waited.elapsed() < Duration::from_secs(15) {
        (calm_lines, storm_lines) = (store.counts("calm").await?.logs, store.counts("storm").await?.logs);
        if calm_lines >= calm_lines_sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(up);

    // The report.
    let calm = calm.lock().unwrap();
    let rss = *rss.lock().unwrap();
    let answers = answers.lock().unwrap();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "sfaas bench soak: {:.1} min of storm between {} s quiet spells; offered {} spans/s, {} calls/s, \
         {} naps/s, {} PromQL queries/s; the storm's client at nice {}; --sandbox {} (exec functions \
         limited to a quarter of a CPU{})",
        options.minutes,
        options.quiet_secs,
        options.ingest_rate,
        options.call_rate,
        options.call_rate / 10,
        options.query_rate,
        options.storm_nice,
        options.sandbox,
        if options.sandbox == "off" { ", not enforced" } else { "" }
    );
    let _ = writeln!(
        out,
        "\n| spell | calm calls | p50 ms | p99 ms | calm queries | p50 ms | p99 ms | failed | RSS peak MiB |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, name) in SPELLS.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {name} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {:.0} |",
            calm.calls[i].len(),
            ms(percentile(&calm.calls[i], 0.5)),
            ms(percentile(&calm.calls[i], 0.99)),
            calm.queries[i].len(),
            ms(percentile(&calm.queries[i], 0.5)),
            ms(percentile(&calm.queries[i], 0.99)),
            calm.failed[i],
            rss[i]
        );
    }
    let _ =
        writeln!(out, "\nThe storm's answers ({storm_secs:.0} s; the sfaas process used {storm_cpu_s:.0} CPU-s):\n");
    let _ = writeln!(out, "| what | status | count | per second |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for ((what, status), n) in answers.iter() {
        let status = match status {
            0 => "not sent (512 in flight)".to_string(),
            1 => "no answer".to_string(),
            s => s.to_string(),
        };
        let _ = writeln!(out, "| {what} | {status} | {n} | {:.0} |", *n as f64 / storm_secs);
    }
    let refused: u64 = answers.iter().filter(|((_, s), _)| matches!(s, 429 | 503)).map(|(_, n)| n).sum();
    // The storm's lines: its line rate over the storm and after (its last calls end in the
    // recovery), and a burst of ten seconds' worth.
    let rate = stateful_faas_core::function::output::EXPORTED_LINES_PER_SECOND;
    let allowed = (rate * (storm_secs + options.quiet_secs as f64 + 10.0)) as u64;
    let flood_calls: u64 = answers.iter().filter(|((what, s), _)| *what == "flood" && *s == 200).map(|(_, n)| n).sum();
    let peak = rss.iter().cloned().fold(0.0, f64::max);
    let p99 = |spell: u8| ms(percentile(&calm.calls[spell as usize], 0.99));
    let q99 = |spell: u8| ms(percentile(&calm.queries[spell as usize], 0.99));
    let checks = [
        (format!("the storm was refused ({refused} answers 429/503)"), refused > 0),
        (
            format!("resident memory peaked at {peak:.0} MiB (bound {} MiB)", options.max_rss_mib),
            peak < options.max_rss_mib as f64,
        ),
        (
            format!("calm calls p99 in the storm {:.1} ms ≤ 2 × quiet {:.1} ms", p99(STORM), p99(QUIET)),
            p99(STORM) <= 2.0 * p99(QUIET),
        ),
        (
            format!("calm queries p99 in the storm {:.1} ms ≤ 2 × quiet {:.1} ms", q99(STORM), q99(QUIET)),
            q99(STORM) <= 2.0 * q99(QUIET),
        ),
        (
            format!("calm calls p99 after the storm {:.1} ms ≤ 2 × quiet", p99(RECOVERY)),
            p99(RECOVERY) <= 2.0 * p99(QUIET),
        ),
        (
            format!("no calm request failed ({} failed)", calm.failed.iter().sum::<u64>()),
            calm.failed.iter().all(|&n| n == 0),
        ),
        (
            format!(
                "the storm's log lines held to its rate: {storm_lines} stored of {} written (at most {allowed})",
                flood_calls * 100_000
            ),
            storm_lines <= allowed,
        ),
        (
            format!("every calm log line was stored ({calm_lines} of {calm_lines_sent})"),
            calm_lines >= calm_lines_sent && calm_lines_sent > 0,
        ),
        (
            format!("the storm tenant is served after it (call {storm_call}, ingest {storm_ingest_again})"),
            storm_call == 200 && storm_ingest_again == 200,
        ),
    ];
    let _ = writeln!(out);
    for (check, held) in &checks {
        let _ = writeln!(out, "- {} {check}", if *held { "holds:" } else { "FAILS:" });
    }
    Ok(out)
}
