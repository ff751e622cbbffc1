//! `sfaas etl`: the streaming ETL example (examples/etl/) — set up in a namespace, its records
//! generated, and streamed into the gateway. The demo and `sfaas bench etl` use the same steps.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use etl_example::{self as etl, Generator};
use serde_json::{Value, json};

use crate::client::Gateway;

pub const FLOW: &str = include_str!("../examples/etl/flow.yml");
const CLEAN_PY: &str = include_str!("../examples/etl/etl_clean.py");
const ZONES: &str = include_str!("../examples/etl/zones.json");

/// How a namespace's pipeline is deployed.
pub struct Setup<'a> {
    /// inline, state or s3.
    /// (Where `etl-load` loads and the `s3` transport's bucket are the platform's settings,
    /// `--etl-database-url` and `--etl-s3-url`.)
    pub transport: &'a str,
    /// A folder on the gateway's machine for the Python function (written there): see
    /// [`script_dir`].
    pub script_dir: &'a Path,
}

/// Where the ETL's Python function is written for a data directory: beside it, never in it (no
/// sandboxed function may see the data directory).
pub fn script_dir(data_dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let data_dir = std::path::absolute(data_dir)?;
    let name = data_dir.file_name().map_or_else(|| "sfaas".into(), |name| name.to_string_lossy().into_owned());
    Ok(data_dir.with_file_name(format!("{name}.functions")).join("etl"))
}

/// Deploys the four functions, the `etl` flow and the zone lookup table into `namespace`.
pub async fn setup(api: &Gateway, namespace: &str, setup: &Setup<'_>) -> anyhow::Result<()> {
    std::fs::create_dir_all(setup.script_dir).with_context(|| format!("creating {}", setup.script_dir.display()))?;
    let script = setup.script_dir.join("etl_clean.py");
    std::fs::write(&script, CLEAN_PY).with_context(|| format!("writing {}", script.display()))?;
    // Readable by the tenants' sandboxed processes (they run as uids of their own).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(setup.script_dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644))?;
    let script_dir = std::fs::canonicalize(setup.script_dir)?;
    let transport = json!({"ETL_TRANSPORT": setup.transport});
    let functions = [
        json!({"service": "etl-extract", "kind": "builtin", "builtin": "etl-extract", "envVars": transport}),
        json!({"service": "etl-clean", "kind": "exec", "envProcess": format!("{} -S etl_clean.py", python()),
               "workdir": script_dir.to_string_lossy(), "limits": {"memory": "512Mi"},
               "envVars": {"ETL_TRANSPORT": setup.transport, "exec_timeout": "60s", "max_inflight": "16"}}),
        json!({"service": "etl-aggregate", "kind": "builtin", "builtin": "etl-aggregate", "envVars": transport}),
        json!({"service": "etl-load", "kind": "builtin", "builtin": "etl-load"}),
    ];
    for mut function in functions {
        function["namespace"] = json!(namespace);
        api.deploy(&function).await.with_context(|| format!("deploying {}", function["service"]))?;
    }
    api.text(api.request(reqwest::Method::POST, "/system/flows").header("x-scope-orgid", namespace).body(FLOW))
        .await
        .context("deploying the etl flow")?;
    api.text(
        api.request(reqwest::Method::PUT, "/state/buckets/etl-lookup/objects/zones?persist=true")
            .header("x-scope-orgid", namespace)
            .body(ZONES),
    )
    .await
    .context("storing the zone lookup table")?;
    Ok(())
}

/// The Python interpreter itself, not a version manager's shim in front of it (a pyenv shim
/// costs about 100 ms per process start, and the watchdog model starts one per batch): the
/// system's own when there is one, as a sandboxed function sees only the system's folders.
fn python() -> String {
    if Path::new("/usr/bin/python3").exists() {
        return "/usr/bin/python3".into();
    }
    std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|path| !path.is_empty() && !path.contains(char::is_whitespace))
        .unwrap_or_else(|| "python3".into())
}

/// What a stream sent.
#[derive(Debug, Default, Clone)]
pub struct Streamed {
    pub records: u64,
    pub requests: u64,
    /// 429 answers (the pipeline was behind), each retried after its Retry-After.
    pub throttled: u64,
    pub runs: Vec<String>,
}

/// Streams records into `namespace`'s `etl` flow, `per_request` lines a request and up to
/// `in_flight` requests at once (an answer waits for its batch to be cut, as a producer's
/// linger), at most `rate` records a second (0: as fast as accepted); a 429 is retried after
/// its Retry-After.
pub async fn stream(
    api: &Gateway,
    namespace: &str,
    lines: impl IntoIterator<Item = String>,
    per_request: usize,
    in_flight: usize,
    rate: u64,
    mut progress: impl FnMut(&Streamed),
) -> anyhow::Result<Streamed> {
    let started = Instant::now();
    let mut streamed = Streamed::default();
    let mut sent = 0u64;
    let mut lines = lines.into_iter().peekable();
    let mut requests = tokio::task::JoinSet::new();
    loop {
        while requests.len() < in_flight.max(1) && lines.peek().is_some() {
            let chunk: Vec<String> = lines.by_ref().take(per_request.max(1)).collect();
            sent += chunk.len() as u64;
            let body = chunk.join("\n") + "\n";
            requests.spawn(send_records(api.clone(), namespace.to_string(), body, chunk.len() as u64));
            if rate > 0 {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(ahead).await;
                }
            }
        }
        let Some(done) = requests.join_next().await else { break };
        let (records, runs, requests_made, throttled) = done??;
        streamed.records += records;
        streamed.requests += requests_made;
        streamed.throttled += throttled;
        for run in runs {
            if !streamed.runs.contains(&run) {
                streamed.runs.push(run);
            }
        }
        progress(&streamed);
    }
    Ok(streamed)
}

/// One request of records, retried while the stream answers 429: (records, runs, requests, 429s).
async fn send_records(
    api: Gateway,
    namespace: String,
    body: String,
    records: u64,
) -> anyhow::Result<(u64, Vec<String>, u64, u64)> {
    let (mut requests, mut throttled) = (0, 0);
    loop {
        let response = api
            .request(reqwest::Method::POST, &format!("/stream/etl.{namespace}"))
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .await
            .context("cannot reach the gateway")?;
        requests += 1;
        if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            throttled += 1;
            let wait =
                response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(1u64);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        let status = response.status();
        let text = response.text().await?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("streaming into etl.{namespace}: {status} {}", text.trim());
        }
        let accepted: Value = serde_json::from_str(&text)?;
        let runs = accepted["runs"].as_array().into_iter().flatten().filter_map(|r| Some(r.as_str()?.to_string()));
        return Ok((records, runs.collect(), requests, throttled));
    }
}

/// Generated records as lines (JSON, or CSV without the header).
pub fn generate(seed: u64, start_ms: i64, bad_per_mille: u32, csv: bool) -> impl Iterator<Item = String> {
    let mut generator = Generator::new(seed, start_ms, bad_per_mille);
    std::iter::from_fn(move || {
        let trip = generator.trip();
        Some(if csv { trip.csv_line() } else { trip.json_line() })
    })
}

/// `sfaas etl generate`: records to stdout.
pub fn print_generated(seed: u64, records: usize, bad_per_mille: u32, csv: bool, start_ms: Option<i64>) {
    use std::io::Write;
    let start_ms = start_ms.unwrap_or_else(stateful_faas_core::database::now_ms);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if csv {
        let _ = writeln!(out, "{}", etl::CSV_HEADER);
    }
    for line in generate(seed, start_ms, bad_per_mille, csv).take(records) {
        if writeln!(out, "{line}").is_err() {
            return;
        }
    }
}
