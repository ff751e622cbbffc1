//! End to end through the `sfaas` binary: flows and calls run → their spans reach the
//! collector with the meter token → billing → the CLI and the billing API show the same
//! invocation counts, state and charges; invoice totals are the sum of their lines, and the
//! lines the sum of the per-invocation costs; a tenant's read token sees only its own bills.

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::Value;

use crate::common;

use common::{cli as sfaas, cli_ok as ok};

fn decimal(value: &Value) -> Decimal {
    value.as_str().unwrap_or_else(|| panic!("{value} is a decimal string")).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reaches_invoices_and_every_view_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mut up, addresses) = common::up(
        &["--billing-interval-secs", "0", "--state-usage-interval-secs", "1", "--platform-scrape-secs", "1"],
        data,
    );
    let ui = format!("http://{}", addresses["ui"].as_str().expect("up serves the dashboard"));
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();

    let acme: Value = serde_json::from_str(&ok(data, &["tenant", "create", "acme", "--plan", "pro"], "")).unwrap();
    let globex: Value = serde_json::from_str(&ok(data, &["tenant", "create", "globex"], "")).unwrap();
    let acme_ingest = acme["ingest_token"].as_str().unwrap();
    let globex_read = globex["read_token"].as_str().unwrap();
    let stack = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/flows/stack.yml");
    let flow = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/flows/text-report.yml");
    ok(data, &["deploy", "-f", stack, "--token", acme_ingest], "");
    ok(data, &["flow", "deploy", "-f", flow, "--token", acme_ingest], "");
    ok(data, &["deploy", "-f", stack, "--namespace", "globex"], "");
    // 3 runs × 4 nodes (the `loud` branch runs: 9 words ≥ 5) = 12 invocations for acme,
    // each run's intermediate data held in its state job; 9 direct calls for globex.
    for _ in 0..3 {
        ok(
            data,
            &["flow", "run", "text-report", "--token", acme_ingest],
            "the quick brown fox jumps over the lazy dog",
        );
    }
    for i in 0..5 {
        ok(data, &["invoke", "shout", "--namespace", "globex", "-d", &format!("call {i}")], "");
    }
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // A caller's `X-Call-Id` is not the billing key: three calls reusing one, and one shaped
    // like a state record's id, are four executions, each billed, nothing overwritten.
    let gateway = format!("http://{}", addresses["gateway"].as_str().unwrap());
    let globex_ingest = globex["ingest_token"].as_str().unwrap();
    for call_id in ["dup-1", "dup-1", "dup-1", "state/standing/1796000000000000000"] {
        let response = http
            .post(format!("{gateway}/function/shout"))
            .bearer_auth(globex_ingest)
            .header("X-Call-Id", call_id)
            .body("again")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    let get = |path: String, token: String| {
        let http = http.clone();
        let url = format!("{ui}{path}");
        async move {
            let response = http.get(url).bearer_auth(token).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    // Billing runs on demand here; spans, state intervals and scrapes arrive within seconds.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (acme_usage, globex_usage, reconciliation) = loop {
        ok(data, &["bill", "run"], "");
        let acme_usage: Value =
            serde_json::from_str(&get("/billing/usage/acme?by=function".into(), admin.clone()).await.1).unwrap();
        let globex_usage: Value =
            serde_json::from_str(&get("/billing/usage/globex?by=function".into(), admin.clone()).await.1).unwrap();
        let reconciliation: Value =
            serde_json::from_str(&get("/billing/reconciliation".into(), admin.clone()).await.1).unwrap();
        let invocations = |usage: &Value| -> i64 {
            usage["rows"].as_object().map_or(0, |rows| rows.values().map(|r| r["invocations"].as_i64().unwrap()).sum())
        };
        let state = acme_usage["rows"]["(state)"]["state_byte_seconds"].as_str().map(|s| s.parse::<Decimal>().unwrap());
        let agreed = reconciliation.as_array().is_some_and(|rows| {
            rows.len() == 5 && rows.iter().all(|r| r["difference"] == 0 && r["metered"].as_i64() > Some(0))
        });
        if invocations(&acme_usage) == 12 && invocations(&globex_usage) == 9 && state > Some(Decimal::ZERO) && agreed {
            break (acme_usage, globex_usage, reconciliation);
        }
        assert!(
            Instant::now() < deadline,
            "usage did not arrive: acme {acme_usage}\nglobex {globex_usage}\nreconciliation {reconciliation}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Reconciliation: per function, metered invocations = the gateway counter's increase.
    let functions: Vec<_> =
        reconciliation.as_array().unwrap().iter().map(|r| r["function"].as_str().unwrap()).collect();
    assert_eq!(functions, ["count", "echo", "shout", "word-stats", "shout"]);
    assert_eq!(globex_usage["rows"]["shout"]["invocations"], 9);

    for (tenant, usage) in [("acme", &acme_usage), ("globex", &globex_usage)] {
        let invoice: Value = serde_json::from_str(&ok(data, &["bill", "show", "--tenant", tenant], "")).unwrap();
        assert_eq!(invoice["status"], "draft");
        let lines = invoice["lines"].as_array().unwrap();
        let total: Decimal = lines.iter().map(|l| decimal(&l["amount"])).sum();
        assert_eq!(decimal(&invoice["total"]), total, "{tenant}: the total is the sum of the lines");
        let exact: Decimal = lines.iter().filter(|l| l["kind"] != "minimum").map(|l| decimal(&l["amount_exact"])).sum();
        let per_function: Decimal = usage["rows"].as_object().unwrap().values().map(|r| decimal(&r["cost"])).sum();
        assert_eq!(exact, per_function, "{tenant}: lines = the sum of per-invocation costs");
        let records: Value = serde_json::from_str(
            &get(
                format!("/billing/usage/{tenant}?by=invocation&period={}", invoice["period"].as_str().unwrap()),
                admin.clone(),
            )
            .await
            .1,
        )
        .unwrap();
        let records = records["records"].as_array().unwrap();
        let per_record: Decimal = records.iter().map(|r| decimal(&r["cost"])).sum();
        assert_eq!(per_record, exact, "{tenant}");
        let invocations = records.iter().filter(|r| r["kind"] == "invocation").count();
        let quantity = lines.iter().find(|l| l["metric"] == "invocations").map(|l| decimal(&l["quantity"]));
        assert_eq!(quantity, Some(Decimal::from(invocations as i64) / Decimal::from(1_000_000)), "{tenant}");
        if tenant == "acme" {
            assert_eq!(invoice["lines"][0]["plan"], "pro");
            assert!(
                records.iter().filter(|r| r["kind"] == "invocation").all(|r| r["flow_run"].is_string()),
                "flow nodes' invocations name their run"
            );
            let csv = ok(data, &["bill", "show", "--tenant", tenant, "--format", "csv"], "");
            assert!(csv.starts_with("tenant,period,status,kind,"), "{csv}");
            assert_eq!(csv.lines().count(), lines.len() + 2, "{csv}");
            let (status, events) = get(format!("/billing/usage/{tenant}/events"), admin.clone()).await;
            let events: Vec<Value> = serde_json::from_str(&events).unwrap();
            assert_eq!((status, events.len()), (200, records.len()));
            assert!(events.iter().all(|e| e["specversion"] == "1.0" && e["subject"] == "acme"));
        } else {
            assert_eq!(invoice["lines"][0]["plan"], "free", "no plan given: the rate card's default");
            // The three calls sent with one call id: three records, each its own execution,
            // showing the caller's id they share.
            let reused: Vec<_> = records.iter().filter(|r| r["call_id"] == "dup-1").collect();
            assert_eq!(reused.len(), 3, "{records:?}");
            let ids: std::collections::BTreeSet<_> = reused.iter().map(|r| r["usage_id"].as_str().unwrap()).collect();
            assert_eq!(ids.len(), 3);
        }
    }

    // A tenant's read token sees its own bills only; billing work needs the admin token.
    let period = acme_usage["period"].as_str().unwrap().to_string();
    let (status, _) = get(format!("/billing/invoices/acme/{period}"), globex_read.to_string()).await;
    assert_eq!(status, 403);
    let (status, list) = get("/billing/invoices".into(), globex_read.to_string()).await;
    let list: Vec<Value> = serde_json::from_str(&list).unwrap();
    assert_eq!(status, 200);
    assert!(list.iter().all(|i| i["tenant"] == "globex") && !list.is_empty(), "{list:?}");
    let (status, _) = get("/billing/usage/acme".into(), acme_ingest.to_string()).await;
    assert_eq!(status, 401, "an ingest token is not a read token");
    let (success, _, stderr) = sfaas(data, &["bill", "run", "--token", globex_read], "");
    assert!(!success && stderr.contains("admin"), "{stderr}");
    // Usage already rated is never re-rated: a plan change cannot reach back before it.
    let (success, _, stderr) =
        sfaas(data, &["plan", "assign", "--tenant", "acme", "--plan", "free", "--from", "2020-01-01T00:00:00Z"], "");
    assert!(!success && stderr.contains("takes effect after it"), "{stderr}");

    up.kill().unwrap();
    up.wait().unwrap();
}

/// `sfaas up --demo`: within a minute, both demo tenants have usage, a draft invoice on their
/// own plans, and traces of their ETL runs; SIGTERM stops everything cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_shows_usage_and_draft_invoices() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, addresses) =
        common::up(&["--demo", "--billing-interval-secs", "2", "--state-usage-interval-secs", "2"], dir.path());
    let ui = format!("http://{}", addresses["ui"].as_str().unwrap());
    let admin = std::fs::read_to_string(dir.path().join("admin.token")).unwrap().trim().to_string();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let invoices: Value =
            http.get(format!("{ui}/billing/invoices")).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
        let mut plans = Vec::new();
        for tenant in ["demo-lab", "demo-shop"] {
            let invoice = invoices.as_array().unwrap().iter().find(|i| i["tenant"] == tenant);
            if let Some(invoice) = invoice {
                let period = invoice["period"].as_str().unwrap();
                let document: Value = http
                    .get(format!("{ui}/billing/invoices/{tenant}/{period}"))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let invocations = document["lines"].as_array().unwrap().iter().any(|l| l["metric"] == "invocations");
                if document["status"] == "draft" && invocations {
                    plans.push(document["lines"][0]["plan"].as_str().unwrap().to_string());
                }
            }
        }
        if plans == ["free", "pro"] {
            break;
        }
        assert!(Instant::now() < deadline, "no draft invoices with usage for both demo tenants: {invoices}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let tokens: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("demo-tokens.json")).unwrap()).unwrap();
    assert!(tokens["demo-shop"]["read_token"].is_string(), "{tokens}");
    // … and traces of the ETL flow's runs, for each tenant with its own read token.
    for tenant in ["demo-shop", "demo-lab"] {
        let read = tokens[tenant]["read_token"].as_str().unwrap();
        let url = format!("{ui}/api/traces?service=sfaas-core&operation=flow%20etl&limit=5");
        let traces: Value = http.get(url).bearer_auth(read).send().await.unwrap().json().await.unwrap();
        let spans = traces["data"][0]["spans"].as_array().map_or(0, Vec::len);
        assert!(spans >= 9, "{tenant}: a flow run's trace (flow, 4 nodes, 4 invocations): {traces}");
    }
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    let status = up.wait().unwrap();
    assert!(status.success(), "a clean shutdown: {status}");
}

/// Reconciliation can reach zero: the gateway's last counts are stored when `sfaas up` stops
/// (here the periodic scrape never comes again after the first), and `sfaas bill reconcile
/// --settle` brings both sides up to now, so after a restart every function's metered
/// invocations equal its counted ones exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_last_counts_are_kept_at_shutdown_and_reconciliation_reaches_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let args = ["--billing-interval-secs", "0", "--platform-scrape-secs", "3600"];
    let (mut up, _) = common::up(&args, data);
    ok(data, &["tenant", "create", "acme"], "");
    let stack = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/flows/stack.yml");
    ok(data, &["deploy", "-f", stack, "--namespace", "acme"], "");
    for i in 0..7 {
        ok(data, &["invoke", "shout", "--namespace", "acme", "-d", &format!("call {i}")], "");
    }
    for i in 0..3 {
        ok(data, &["invoke", "count", "--namespace", "acme", "-d", &format!("a b {i}")], "");
    }
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    assert!(up.wait().unwrap().success());

    let (mut up, _) = common::up(&args, data);
    for i in 0..4 {
        ok(data, &["invoke", "shout", "--namespace", "acme", "-d", &format!("again {i}")], "");
    }
    // Settled: the core's spans sent, its counters stored, billing run; exactly 0 everywhere.
    let table = ok(data, &["bill", "reconcile", "--settle"], "");
    let rows: Vec<Vec<&str>> = table.lines().skip(1).map(|line| line.split_whitespace().collect()).collect();
    let seen: Vec<_> = rows.iter().map(|row| (row[1], row[3], row[4], row[5])).collect();
    assert_eq!(seen, [("count", "3", "3", "0"), ("shout", "11", "11", "0")], "{table}");
    up.kill().unwrap();
    up.wait().unwrap();
}

/// A plan's `limits` are its tenants' quotas, in the core (functions, state bytes) and in the
/// collector (spans a second), from the moment the rate card or a tenant's plan changes; a
/// tenant on a plan without limits keeps the platform's flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plans_limits_are_its_tenants_quotas() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mut up, addresses) = common::up(&["--billing-interval-secs", "0", "--tenant-max-functions", "3"], data);
    let gateway = format!("http://{}", addresses["gateway"].as_str().unwrap());
    let otlp = format!("http://{}", addresses["otlp_http"].as_str().unwrap());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut tokens = std::collections::BTreeMap::new();
    for tenant in ["small", "roomy"] {
        let created: Value = serde_json::from_str(&ok(data, &["tenant", "create", tenant], "")).unwrap();
        tokens.insert(tenant, created["ingest_token"].as_str().unwrap().to_string());
    }
    let card = data.join("plans.yml");
    std::fs::write(
        &card,
        "default_plan: free\nplans:\n  free:\n    currency: EUR\n    prices: {invocations: {unit_price: \"0\"}}\n  \
         tiny:\n    currency: EUR\n    prices: {invocations: {unit_price: \"0\"}}\n    \
         limits: {functions: 1, state_bytes: 2000, ingest_spans_per_second: 1}\n",
    )
    .unwrap();
    ok(data, &["plan", "apply", "-f", card.to_str().unwrap()], "");
    ok(data, &["plan", "assign", "--tenant", "small", "--plan", "tiny"], "");

    let deploy = |tenant: &'static str, name: &str| {
        http.post(format!("{gateway}/system/functions"))
            .bearer_auth(&tokens[tenant])
            .json(&serde_json::json!({"service": name, "builtin": "echo"}))
            .send()
    };
    // The plan's limit holds within a refresh (two seconds).
    assert_eq!(deploy("small", "one").await.unwrap().status(), 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let answer = deploy("small", "two").await.unwrap();
        if answer.status() == 429 {
            break answer.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "the plan's functions: 1 never applied ({})", answer.status());
        assert_eq!(answer.status(), 202);
        http.delete(format!("{gateway}/system/functions"))
            .bearer_auth(&tokens["small"])
            .json(&serde_json::json!({"functionName": "two"}))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refused.contains("1 functions") && refused.contains("functions"), "{refused}");
    // Another tenant keeps the flag's 3.
    for name in ["a", "b", "c"] {
        assert_eq!(deploy("roomy", name).await.unwrap().status(), 202);
    }
    let over = deploy("roomy", "d").await.unwrap();
    assert_eq!(over.status(), 429);
    assert!(over.text().await.unwrap().contains("3 functions"));

    // State: 2 000 bytes, the object's key and overhead counted.
    let put = |tenant: &'static str, bytes: usize| {
        http.put(format!("{gateway}/state/buckets/b/objects/k"))
            .bearer_auth(&tokens[tenant])
            .body(vec![7u8; bytes])
            .send()
    };
    let over = put("small", 4000).await.unwrap();
    assert_eq!(over.status(), 507);
    assert!(over.text().await.unwrap().contains("state_bytes"));
    assert!(put("small", 1000).await.unwrap().status().is_success());
    assert!(put("roomy", 4000).await.unwrap().status().is_success());

    // Spans: one a second, ten seconds of burst: a batch of 20 overdraws, the next is refused.
    let send = |tenant: &'static str, seed: u64| {
        http.post(format!("{otlp}/v1/traces"))
            .bearer_auth(&tokens[tenant])
            .header("content-type", "application/x-protobuf")
            .body(collector::bench::realistic_body(seed, 20))
            .send()
    };
    assert_eq!(send("small", 1).await.unwrap().status(), 200);
    let over = send("small", 2).await.unwrap();
    assert_eq!(over.status(), 429);
    assert!(over.text().await.unwrap().contains("ingest_spans_per_second"));
    assert_eq!(send("roomy", 3).await.unwrap().status(), 200);
    assert_eq!(send("roomy", 4).await.unwrap().status(), 200);

    // Back on the free plan, the flag's 3 functions apply to it again.
    ok(data, &["plan", "assign", "--tenant", "small", "--plan", "free"], "");
    let deadline = Instant::now() + Duration::from_secs(10);
    while deploy("small", "two").await.unwrap().status() != 202 {
        assert!(Instant::now() < deadline, "the free plan's default never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    up.kill().unwrap();
}

/// An attack on one's own bill: a function is handed its invocation span's ids (its
/// `TRACEPARENT`), and its tenant sends a span with those ids to the collector under its own
/// ingest token, within milliseconds, before the platform's metered span goes out (it is
/// batched for up to 500 ms). Every invocation is billed all the same, and the forged spans stay
/// the tenant's own telemetry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_unbill_an_invocation_by_sending_its_span_ids_first() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mut up, addresses) = common::up(&["--billing-interval-secs", "0"], data);
    let (gateway, otlp, ui) = (
        format!("http://{}", addresses["gateway"].as_str().unwrap()),
        format!("http://{}/v1/traces", addresses["otlp_http"].as_str().unwrap()),
        format!("http://{}", addresses["ui"].as_str().unwrap()),
    );
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let acme: Value = serde_json::from_str(&ok(data, &["tenant", "create", "acme"], "")).unwrap();
    let ingest = acme["ingest_token"].as_str().unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let deployed = http
        .post(format!("{gateway}/system/functions"))
        .bearer_auth(ingest)
        .json(&serde_json::json!({"service": "leak", "envProcess": "echo $TRACEPARENT"}))
        .send()
        .await
        .unwrap();
    assert!(deployed.status().is_success(), "{}", deployed.status());

    const CALLS: i64 = 5;
    for _ in 0..CALLS {
        let response = http.post(format!("{gateway}/function/leak")).bearer_auth(ingest).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let traceparent = response.text().await.unwrap();
        let ids: Vec<&str> = traceparent.trim().split('-').collect();
        let (trace_id, span_id) = (ids[1], ids[2]);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let attribute = |key: &str, value: Value| serde_json::json!({"key": key, "value": value});
        let forged = serde_json::json!({"resourceSpans": [{
            "resource": {"attributes": [
                attribute("service.name", serde_json::json!({"stringValue": "sfaas-core"})),
                attribute("service.namespace", serde_json::json!({"stringValue": "acme"})),
            ]},
            "scopeSpans": [{"spans": [{
                "traceId": trace_id, "spanId": span_id, "name": "invoke leak", "kind": 2,
                "startTimeUnixNano": (now - 1_000_000).to_string(), "endTimeUnixNano": now.to_string(),
                "attributes": [
                    attribute("sfaas.billable", serde_json::json!({"boolValue": false})),
                    attribute("faas.invocation_id", serde_json::json!({"stringValue": "0193a000-0000-7000-8000-000000000001"})),
                ],
            }]}],
        }]});
        let sent = http.post(&otlp).bearer_auth(ingest).json(&forged).send().await.unwrap();
        assert_eq!(sent.status(), 200, "the tenant's own span is accepted as its own");
    }

    // Bills what arrived, then reads acme's invocations of `leak`.
    let billed = || async {
        ok(data, &["bill", "run"], "");
        let request = http.get(format!("{ui}/billing/usage/acme?by=function")).bearer_auth(&admin);
        let usage: Value = request.send().await.unwrap().json().await.unwrap();
        (usage["rows"]["leak"]["invocations"].as_i64().unwrap_or(0), usage)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (billed, usage) = billed().await;
        if billed == CALLS {
            break;
        }
        assert!(Instant::now() < deadline, "{billed} of {CALLS} invocations billed: {usage}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Settled: nothing more arrives, and the forged spans never count.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, usage) = billed().await;
    assert_eq!(usage["rows"]["leak"]["invocations"], CALLS, "{usage}");
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    assert!(up.wait().unwrap().success());
}
