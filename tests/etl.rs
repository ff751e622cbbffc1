//! The streaming ETL pipeline (examples/etl/) through the `sfaas` binary: seeded trips with a
//! known share of bad records are streamed over HTTP (JSON lines and CSV) into the `etl` flow,
//! micro-batched, extracted, cleaned and enriched by the Python function, aggregated per minute
//! and borough, and loaded into the tenant's SQLite database. The loaded table equals the aggregates computed from the
//! generator's own truth, for each way of handing data between stages (state store, inline, and
//! an S3 object store when s3rver is installed), and in PostgreSQL as in SQLite; bad records land in the reject bucket with their
//! reason; the summary object adds up. And a stream that falls behind answers 429, losing
//! nothing it acknowledged.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etl_example::{self as etl, Generator, Totals};
use serde_json::Value;

use crate::common;

use common::cli_ok as ok;

const START_MS: i64 = 1_764_151_200_000; // 2025-11-26T10:00:00Z

use testkit::require_all;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts s3rver on a free port with an `etl` bucket; its bucket URL. The caller stops it.
#[allow(clippy::zombie_processes)]
async fn start_s3(dir: &std::path::Path, http: &reqwest::Client) -> Option<(std::process::Child, String)> {
    let program = testkit::s3rver()?.display().to_string();
    let port = free_port();
    let mut child = common::sfaas_like(&program)
        .args(["-d", &dir.to_string_lossy(), "-p", &port.to_string(), "--silent"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    let bucket = format!("http://127.0.0.1:{port}/etl");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.put(&bucket).send().await
            && response.status().is_success()
        {
            return Some((child, bucket));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("s3rver did not start on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stream(http: &reqwest::Client, gateway: &str, token: &str, target: &str, csv: bool, body: String) -> Value {
    let response = http
        .post(format!("{gateway}/stream/{target}"))
        .bearer_auth(token)
        .header("content-type", if csv { "text/csv" } else { "application/x-ndjson" })
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    assert_eq!(status, 202, "streaming into {target}: {text}");
    serde_json::from_str(&text).unwrap()
}

type Windows = BTreeMap<(i64, String), Totals>;

/// The load target: the tables `etl-load` writes, in SQLite or PostgreSQL.
enum Target {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

const RECEIVED: &str = "SELECT CAST(SUM(received) AS BIGINT) FROM etl_batches WHERE tenant = $1";
const WINDOWS: &str =
    "SELECT window_start_ms, borough, trips, fare_cents, distance_m, passengers FROM etl_windows WHERE tenant = $1";

macro_rules! read_target {
    ($pool:expr, $tenant:expr) => {{
        let received: Option<i64> = sqlx::query_scalar(RECEIVED).bind($tenant).fetch_one($pool).await.unwrap_or(None);
        let rows: Vec<(i64, String, i64, i64, i64, i64)> =
            sqlx::query_as(WINDOWS).bind($tenant).fetch_all($pool).await.unwrap_or_default();
        (received, rows)
    }};
}

async fn loaded(target: &Target, tenant: &str) -> (i64, Windows) {
    let (received, rows) = match target {
        Target::Sqlite(pool) => read_target!(pool, tenant),
        Target::Postgres(pool) => read_target!(pool, tenant),
    };
    let windows = rows
        .into_iter()
        .map(|(w, b, trips, fare_cents, distance_m, passengers)| {
            ((w, b), Totals { trips, fare_cents, distance_m, passengers })
        })
        .collect();
    (received.unwrap_or(0), windows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_records_load_exactly_the_generators_aggregates() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let s3_dir = data.join("s3");
    std::fs::create_dir_all(&s3_dir).unwrap();
    let s3 = start_s3(&s3_dir, &http).await;
    // One more tenant loads into PostgreSQL (a server of the test's own); the others into their
    // own SQLite databases, the default.
    let postgres = testkit::PgServer::start();
    if postgres.is_none() {
        assert!(!require_all(), "PostgreSQL's server binaries are not installed");
        eprintln!("skipping the PostgreSQL load target: PostgreSQL's server binaries are not installed");
    }
    let mut tenants = vec![("via-state", "state"), ("via-inline", "inline")];
    // The S3 transport's Python stage reaches the object store: its tenant has egress.
    let mut args = vec!["--gateway-addr".to_string(), "127.0.0.1:0".into(), "--sandbox-egress".into(), "via-s3".into()];
    if let Some((_, bucket)) = &s3 {
        tenants.push(("via-s3", "s3"));
        args.extend(["--etl-s3-url".into(), bucket.clone()]);
    }
    if let Some(server) = &postgres {
        tenants.push(("into-postgres", "state"));
        args.extend(["--etl-database-url".into(), format!("into-postgres={}", server.url())]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut core, addresses) = common::serve("core", &args, data);
    let gateway = format!("http://{}", addresses["gateway"].as_str().unwrap());
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    for (tenant, transport) in &tenants {
        ok(data, &["tenant", "create", tenant], "");
        ok(data, &["etl", "setup", "--namespace", tenant, "--transport", transport], "");
    }

    // 6000 trips, 5% bad: 3000 as JSON lines in 6 requests, 3000 as CSV in 3, 3 at a time.
    let trips = Generator::new(42, START_MS, 50).trips(6000);
    let expected = etl::expected(&trips);
    assert!(expected.rejected.len() == 5 && expected.windows.len() > 5, "the data exercises every rule");
    for (tenant, _) in &tenants {
        let mut requests = Vec::new();
        for (i, part) in trips.chunks(500).take(6).enumerate() {
            requests.push((i, false, etl::body(part, false)));
        }
        for (i, part) in trips[3000..].chunks(1000).enumerate() {
            requests.push((6 + i, true, etl::body(part, true)));
        }
        for group in requests.chunks(3) {
            let mut sent = tokio::task::JoinSet::new();
            for (_, csv, body) in group {
                let (http, gateway, admin, target) =
                    (http.clone(), gateway.clone(), admin.clone(), format!("etl.{tenant}"));
                let (csv, body) = (*csv, body.clone());
                sent.spawn(async move { stream(&http, &gateway, &admin, &target, csv, body).await });
            }
            for accepted in sent.join_all().await {
                assert!(!accepted["runs"].as_array().unwrap().is_empty(), "{accepted}");
            }
        }
    }

    for (tenant, transport) in &tenants {
        let pool = match &postgres {
            Some(server) if *tenant == "into-postgres" => {
                Target::Postgres(sqlx::PgPool::connect(&server.url()).await.unwrap())
            }
            _ => {
                let db = data.join("etl").join(format!("{tenant}.db"));
                let deadline = Instant::now() + Duration::from_secs(120);
                while !db.exists() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Target::Sqlite(sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap())
            }
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let (received, windows) = loop {
            let (received, windows) = loaded(&pool, tenant).await;
            if received >= 6000 || Instant::now() > deadline {
                break (received, windows);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert_eq!(
            received,
            6000,
            "{tenant}: every record reached the load stage once; {}",
            common::log_tail("core", data, 40)
        );
        assert_eq!(windows, expected.windows, "{tenant} ({transport}): the loaded aggregates");
    }

    // The summary object and the reject bucket of one tenant.
    let get = |path: String| {
        let request = http.get(format!("{gateway}{path}")).bearer_auth(&admin).header("x-scope-orgid", "via-state");
        async move {
            let response = request.send().await.unwrap();
            assert!(response.status().is_success(), "{path}: {}", response.status());
            response.text().await.unwrap()
        }
    };
    let summary: Value = serde_json::from_str(&get("/state/buckets/etl-summary/objects/summary".into()).await).unwrap();
    assert_eq!(summary["received"], 6000);
    assert_eq!(summary["loaded"], expected.loaded);
    assert_eq!(serde_json::to_value(&expected.rejected).unwrap(), summary["rejected"], "{summary}");
    let objects: Value = serde_json::from_str(&get("/state/buckets/etl-rejects".into()).await).unwrap();
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for object in objects.as_array().unwrap() {
        let text = get(format!("/state/buckets/etl-rejects/objects/{}", object["key"].as_str().unwrap())).await;
        for line in text.lines() {
            let reject: Value = serde_json::from_str(line).unwrap();
            assert!(!reject["record"].as_str().unwrap().is_empty());
            *reasons.entry(reject["reason"].as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    assert_eq!(reasons, expected.rejected, "every bad record is in the reject bucket with its reason");

    if let Some((mut child, _)) = s3 {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = core.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_falls_behind_answers_429_and_loses_nothing_it_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mut core, addresses) = common::serve("core", &["--gateway-addr", "127.0.0.1:0"], data);
    let gateway = format!("http://{}", addresses["gateway"].as_str().unwrap());
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    ok(data, &["tenant", "create", "slowpoke"], "");
    // A slow sink (0.3 s a batch, one run at a time) that answers how many records it got.
    let function =
        serde_json::json!({"service": "count", "namespace": "slowpoke", "envProcess": "sleep 0.3; grep -c ."});
    let response = http.post(format!("{gateway}/system/functions")).bearer_auth(&admin).json(&function).send().await;
    assert!(response.unwrap().status().is_success());
    let flow = "name: slow\nnodes:\n  count: {function: count}\n\
                stream: {max_records: 10, max_bytes: 200, max_delay: 50ms, max_runs: 1, max_pending_bytes: 800}\n";
    let response = http.post(format!("{gateway}/system/flows")).bearer_auth(&admin).header("x-scope-orgid", "slowpoke");
    let response = response.body(flow).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.text().await.unwrap());

    let send = |body: String| {
        let request = http.post(format!("{gateway}/stream/slow.slowpoke")).bearer_auth(&admin).body(body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (status, retry_after, response.text().await.unwrap())
        }
    };
    // 12 senders of 5 records at once (each request 360 bytes pending: 5 × 8 bytes and 64 a
    // record), against 800 pending bytes.
    let body = (0..5).map(|i| format!("{{\"n\":{i}}}\n")).collect::<String>();
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..12 {
        senders.spawn(send(body.clone()));
    }
    let answers = senders.join_all().await;
    let mut accepted_runs = Vec::new();
    let mut accepted_records = 0;
    let mut throttled = 0;
    for (status, retry_after, text) in &answers {
        match status {
            202 => {
                let accepted: Value = serde_json::from_str(text).unwrap();
                accepted_records += accepted["records"].as_u64().unwrap();
                for run in accepted["runs"].as_array().unwrap() {
                    let run = run.as_str().unwrap().to_string();
                    if !accepted_runs.contains(&run) {
                        accepted_runs.push(run);
                    }
                }
            }
            429 => {
                throttled += 1;
                assert_eq!(retry_after.as_deref(), Some("1"), "a 429 says when to retry");
                assert!(text.contains("behind"), "{text}");
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert!(throttled > 0, "the pending limit pushed back: {answers:?}");
    assert!(accepted_records > 0);
    // Every accepted record was counted by exactly one run.
    let mut counted = 0;
    for run in &accepted_runs {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let response = http.get(format!("{gateway}/flow-runs/{run}")).bearer_auth(&admin);
            let status: Value = serde_json::from_str(
                &response.header("x-scope-orgid", "slowpoke").send().await.unwrap().text().await.unwrap(),
            )
            .unwrap();
            if status["status"] == "succeeded" {
                counted += status["output"].as_u64().expect("the count is the run's output");
                break;
            }
            assert!(Instant::now() < deadline, "run {run} did not finish: {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(counted, accepted_records, "runs {accepted_runs:?}");

    // Bad requests: too large for the stream at all, not UTF-8, an unknown flow.
    let (status, _, text) = send("x".repeat(900)).await;
    assert_eq!(status, 413, "{text}");
    let response = http.post(format!("{gateway}/stream/nope.slowpoke")).bearer_auth(&admin).body("{}\n");
    assert_eq!(response.send().await.unwrap().status().as_u16(), 404);
    let response = http.post(format!("{gateway}/stream/slow.slowpoke")).bearer_auth(&admin).body(vec![0xff, b'\n']);
    assert_eq!(response.send().await.unwrap().status().as_u16(), 400);
    let _ = core.kill();
}

/// The ETL builtins' database and S3 bucket are the operator's settings: a tenant's
/// `ETL_DATABASE_URL` made the gateway open any SQLite path, and an S3 reference in a request
/// body made it GET and DELETE any URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etl_builtins_load_and_stage_only_where_the_operator_says() {
    // A listener that counts the requests the gateway would make on a tenant's behalf.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((_, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let bucket = format!("http://127.0.0.1:{port}/etl");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mut core, addresses) =
        common::serve("core", &["--gateway-addr", "127.0.0.1:0", "--etl-s3-url", &bucket], data);
    let gateway = format!("http://{}", addresses["gateway"].as_str().unwrap());
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    ok(data, &["tenant", "create", "acme"], "");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let deploy = |deployment: Value| {
        let (http, gateway, admin) = (http.clone(), gateway.clone(), admin.clone());
        async move {
            let response =
                http.post(format!("{gateway}/system/functions")).bearer_auth(&admin).json(&deployment).send().await;
            let response = response.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let invoke = |function: &str, body: String| {
        let (http, url, admin) = (http.clone(), format!("{gateway}/function/{function}.acme"), admin.clone());
        async move {
            let response = http.post(url).bearer_auth(&admin).body(body).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let elsewhere = data.join("elsewhere.db");

    let (status, text) = deploy(serde_json::json!({"service": "load", "namespace": "acme", "builtin": "etl-load",
        "envVars": {"ETL_DATABASE_URL": format!("sqlite://{}", elsewhere.display())}}))
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("ETL_DATABASE_URL") && text.contains("--etl-database-url"), "{text}");
    let (status, text) = deploy(serde_json::json!({"service": "agg", "namespace": "acme", "builtin": "etl-aggregate",
        "envVars": {"ETL_TRANSPORT": "s3", "ETL_S3_URL": "http://169.254.169.254/latest"}}))
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("--etl-s3-url"), "{text}");

    // A reference outside the tenant's folder of the bucket is refused before any request:
    // another host, another tenant's folder, a way out of the folder.
    let (status, text) =
        deploy(serde_json::json!({"service": "agg", "namespace": "acme", "builtin": "etl-aggregate"})).await;
    assert_eq!(status, 202, "{text}");
    for url in [
        "http://127.0.0.1:1/metrics".to_string(),
        format!("{bucket}/globex/run/clean"),
        format!("{bucket}/acme/../globex/run/clean"),
        format!("{bucket}/acme/run/clean?x=1"),
        format!("{bucket}/acme"),
    ] {
        let (status, text) = invoke("agg", serde_json::json!({"ref": "s3", "url": url}).to_string()).await;
        assert_eq!(status, 500, "{url}");
        assert!(text.contains("not an object of this namespace's folder"), "{url}: {text}");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "no request left the gateway");
    // One in its folder is fetched (the listener answers nothing, so it fails after the request,
    // tried three times as S3 clients do).
    let url = format!("{bucket}/acme/run-1/clean");
    let (status, _) = invoke("agg", serde_json::json!({"ref": "s3", "url": url}).to_string()).await;
    assert_eq!(status, 500);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 3, "one request, tried three times");

    // etl-load loads into the tenant's own database under the data directory.
    let (status, text) =
        deploy(serde_json::json!({"service": "load", "namespace": "acme", "builtin": "etl-load"})).await;
    assert_eq!(status, 202, "{text}");
    let batch = serde_json::json!({"batch": "b1", "received": 1, "records": [
        {"window_start_ms": 60000, "borough": "Queens", "trips": 1, "fare_cents": 1250, "distance_m": 3200, "passengers": 2}]});
    let (status, text) = invoke("load", batch.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let db = data.join("etl").join("acme.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    let trips: i64 =
        sqlx::query_scalar("SELECT SUM(trips) FROM etl_windows WHERE tenant = 'acme'").fetch_one(&pool).await.unwrap();
    assert_eq!(trips, 1);
    assert!(!elsewhere.exists());
    let _ = core.kill();
    let _ = core.wait();
}
