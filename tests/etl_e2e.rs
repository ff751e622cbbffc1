//! The whole product, end to end through the `sfaas` binary: up → a tenant → the ETL pipeline
//! deployed (`sfaas etl setup`) → trips streamed over HTTP → flow runs → spans and metrics reach
//! the collector with the meter token → billing. Then every view agrees on the same numbers:
//! the billing API, the dashboard's functions and runs pages, the Prometheus API and the Jaeger
//! API (queried with the tenant's read token, as Grafana does) show the same invocations per
//! function and CPU-ms, and the same charges where they show charges; the invoice total is the
//! sum of its lines, and its lines the sum of the per-invocation costs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etl_example::{self as etl, Generator};
use rust_decimal::Decimal;
use serde_json::Value;

use crate::common;

use common::cli_ok as ok;

const FUNCTIONS: [&str; 4] = ["etl-aggregate", "etl-clean", "etl-extract", "etl-load"];

fn decimal(value: &Value) -> Decimal {
    value.as_str().unwrap_or_else(|| panic!("{value} is a decimal string")).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_records_show_the_same_numbers_in_every_view() {
    let started_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mut up, addresses) = common::up(&["--billing-interval-secs", "0", "--state-usage-interval-secs", "1"], data);
    let gateway = format!("http://{}", addresses["gateway"].as_str().unwrap());
    let ui = format!("http://{}", addresses["ui"].as_str().unwrap());
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let fleet: Value = serde_json::from_str(&ok(data, &["tenant", "create", "fleet", "--plan", "pro"], "")).unwrap();
    let read = fleet["read_token"].as_str().unwrap().to_string();
    ok(data, &["etl", "setup", "--namespace", "fleet"], "");

    // 2000 trips in 4 requests, 2 at a time; each request's batch becomes a run.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let trips = Generator::new(3, stateful_faas_core::database::now_ms(), 50).trips(2000);
    let mut runs = Vec::new();
    for pair in trips.chunks(500).collect::<Vec<_>>().chunks(2) {
        let mut sends = tokio::task::JoinSet::new();
        for part in pair {
            let request = http
                .post(format!("{gateway}/stream/etl.fleet"))
                .bearer_auth(&admin)
                .header("content-type", "application/x-ndjson")
                .body(etl::body(part, false));
            sends.spawn(async move { request.send().await.unwrap().json::<Value>().await.unwrap() });
        }
        for accepted in sends.join_all().await {
            for run in accepted["runs"].as_array().unwrap() {
                let run = run.as_str().unwrap().to_string();
                if !runs.contains(&run) {
                    runs.push(run);
                }
            }
        }
    }
    assert!(!runs.is_empty());
    let invocations = 4 * runs.len() as i64;

    let get = |path: String, token: String| {
        let request = http.get(format!("{ui}{path}")).bearer_auth(token);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let text = response.text().await.unwrap();
            assert!(status.is_success(), "{path}: {status} {text}");
            text
        }
    };

    // Billing: every invocation of every run rated, and the state the runs held.
    let deadline = Instant::now() + Duration::from_secs(90);
    let usage = loop {
        ok(data, &["bill", "run"], "");
        let usage: Value =
            serde_json::from_str(&get("/billing/usage/fleet?by=function".into(), read.clone()).await).unwrap();
        let rows = usage["rows"].as_object().cloned().unwrap_or_default();
        let billed: i64 = rows.values().map(|r| r["invocations"].as_i64().unwrap()).sum();
        if billed == invocations && rows.contains_key("(state)") {
            break usage;
        }
        assert!(Instant::now() < deadline, "usage did not arrive ({invocations} invocations expected): {usage}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rows = usage["rows"].as_object().unwrap();
    let mut billed: BTreeMap<&str, (i64, i64, Decimal)> = BTreeMap::new();
    for function in FUNCTIONS {
        let row = &rows[function];
        assert_eq!(row["invocations"].as_i64(), Some(runs.len() as i64), "{function}: one invocation per run");
        billed.insert(
            function,
            (row["invocations"].as_i64().unwrap(), row["cpu_ms"].as_i64().unwrap(), decimal(&row["cost"])),
        );
    }

    // The invoice: total = lines; lines (before rounding) = the per-invocation costs.
    let invoice: Value = serde_json::from_str(&ok(data, &["bill", "show", "--tenant", "fleet"], "")).unwrap();
    let lines = invoice["lines"].as_array().unwrap();
    let total: Decimal = lines.iter().map(|l| decimal(&l["amount"])).sum();
    assert_eq!(decimal(&invoice["total"]), total);
    let exact: Decimal = lines.iter().filter(|l| l["kind"] != "minimum").map(|l| decimal(&l["amount_exact"])).sum();
    let per_function: Decimal = rows.values().map(|r| decimal(&r["cost"])).sum();
    assert_eq!(exact, per_function, "the invoice's lines are the sum of the per-invocation costs");

    // The dashboard's functions page: the same invocations, CPU-ms and cost per function.
    let page = get("/ui/functions?tenant=fleet".into(), read.clone()).await;
    for (function, (count, cpu_ms, cost)) in &billed {
        let row_start = page.find(&format!(">{function}</a>")).unwrap_or_else(|| panic!("{function} on the page"));
        let row = &page[row_start..row_start + page[row_start..].find("</tr>").unwrap()];
        let cells: Vec<&str> = row.split("<td class=\"n\">").skip(1).map(|c| c.split('<').next().unwrap()).collect();
        assert_eq!(cells[0], count.to_string(), "{function}: invocations on the page");
        assert_eq!(cells[5], cpu_ms.to_string(), "{function}: CPU-ms on the page");
        assert_eq!(cells[6].parse::<Decimal>().unwrap(), cost.round_dp(8), "{function}: cost on the page");
    }
    // … and its runs page lists every run.
    let page = get("/ui/runs?tenant=fleet".into(), read.clone()).await;
    for run in &runs {
        assert!(page.contains(run.as_str()), "run {run} on the runs page");
    }

    // The Prometheus API, as Grafana queries it with the tenant's read token. Its usage
    // counters are sampled at whole minutes: wait for the minute after the last invocation.
    let now_ms = stateful_faas_core::database::now_ms();
    let next_minute = (now_ms / 60_000 + 1) * 60_000;
    tokio::time::sleep(Duration::from_millis((next_minute - now_ms + 500) as u64)).await;
    let prometheus = |query: &str| {
        let url = reqwest::Url::parse_with_params(&format!("{ui}/prometheus/api/v1/query"), [("query", query)]);
        let request = http.get(url.unwrap()).bearer_auth(&read);
        async move {
            let answer: Value = request.send().await.unwrap().json().await.unwrap();
            assert_eq!(answer["status"], "success", "{answer}");
            answer["data"]["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let function = s["metric"]["function"].as_str().unwrap_or_default().to_string();
                    (function, s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
                })
                .collect::<BTreeMap<String, f64>>()
        }
    };
    let counts = prometheus("sum by (function) (sfaas_usage_invocations_total)").await;
    let cpu = prometheus("sum by (function) (sfaas_usage_cpu_ms_total)").await;
    let costs = prometheus("sum by (function) (sfaas_billing_cost_total)").await;
    for (function, (count, cpu_ms, cost)) in &billed {
        assert_eq!(counts.get(*function).copied(), Some(*count as f64), "{function}: invocations in Prometheus");
        assert_eq!(cpu.get(*function).copied(), Some(*cpu_ms as f64), "{function}: CPU-ms in Prometheus");
        let from_prometheus = costs.get(*function).copied().unwrap_or(-1.0);
        let exact: f64 = cost.to_string().parse().unwrap();
        assert!((from_prometheus - exact).abs() <= exact * 1e-9, "{function}: cost {from_prometheus} vs {exact}");
    }

    // The Jaeger API: one trace per run, with each function's invoke span and its CPU-ms.
    let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() + 1_000_000;
    let url = reqwest::Url::parse_with_params(
        &format!("{ui}/api/traces"),
        [
            ("service", "sfaas-core"),
            ("operation", "flow etl"),
            ("limit", "100"),
            ("start", &started_us.to_string()),
            ("end", &now_us.to_string()),
        ],
    )
    .unwrap();
    let traces: Value = http.get(url).bearer_auth(&read).send().await.unwrap().json().await.unwrap();
    let traces = traces["data"].as_array().unwrap_or_else(|| panic!("{traces}"));
    assert_eq!(traces.len(), runs.len(), "one trace per run");
    let mut traced: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for trace in traces {
        for span in trace["spans"].as_array().unwrap() {
            let Some(function) = span["operationName"].as_str().unwrap().strip_prefix("invoke ") else { continue };
            let tag = |key: &str| {
                span["tags"].as_array().unwrap().iter().find(|t| t["key"] == key).map(|t| t["value"].clone())
            };
            let entry = traced.entry(function.to_string()).or_default();
            entry.0 += 1;
            entry.1 += tag("sfaas.cpu_ms").and_then(|v| v.as_i64()).expect("invoke spans carry sfaas.cpu_ms");
        }
    }
    for (function, (count, cpu_ms, _)) in &billed {
        assert_eq!(traced.get(*function).copied(), Some((*count, *cpu_ms)), "{function}: spans and CPU-ms in Jaeger");
    }

    // The pipeline itself did its job.
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .connect(&format!("sqlite://{}", data.join("etl").join("fleet.db").display()))
        .await
        .unwrap();
    let (received, loaded): (i64, i64) =
        sqlx::query_as("SELECT SUM(received), SUM(loaded) FROM etl_batches WHERE tenant = 'fleet'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let expected = etl::expected(&trips);
    assert_eq!((received as u64, loaded as u64), (expected.received, expected.loaded));

    up.kill().unwrap();
    up.wait().unwrap();
}
