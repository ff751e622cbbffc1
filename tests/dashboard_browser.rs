//! The dashboard in a real browser: headless Chromium (Debian's `chromium`), driven over
//! WebDriver by `chromedriver`, against `sfaas up` with real usage. Signs in, opens the tenants
//! overview, a tenant, an invoice and a flow run's DAG trace, checks what a user sees against
//! the billing API, that the console stays clean, and that another tenant's pages are refused.
//! Screenshots go to `target/tmp/dashboard-*.png`.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common;

use common::cli_ok as sfaas;

/// A WebDriver session on headless Chromium.
struct Browser {
    http: reqwest::Client,
    base: String,
    driver: std::process::Child,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start() -> Option<Browser> {
        // Debian's packages chromium and chromium-driver.
        let chromium = testkit::require_program("chromium")?.display().to_string();
        let chromedriver = testkit::require_program("chromedriver")?.display().to_string();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // In a process group of its own, with the browsers it starts: killed whole at the end.
        let driver = common::sfaas_like(&chromedriver)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let root = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{root}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1100"],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let session: Value =
            http.post(format!("{root}/session")).json(&capabilities).send().await.unwrap().json().await.unwrap();
        let id = session["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {session}"));
        Some(Browser { http, base: format!("{root}/session/{id}"), driver })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let reply: Value = request.send().await.unwrap().json().await.unwrap();
        assert!(reply["value"].get("error").is_none(), "WebDriver {path}: {reply}");
        reply["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    async fn find(&self, css: &str) -> String {
        let element =
            self.call(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css}))).await;
        element[ELEMENT].as_str().unwrap().to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{element}/value"), Some(json!({ "text": text }))).await;
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{element}/click"), Some(json!({}))).await;
    }

    /// Runs JavaScript in the page (the test's probe; the dashboard itself has none).
    async fn eval(&self, script: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({"script": script, "args": []}))).await
    }

    async fn text(&self, css: &str) -> String {
        let script = format!("const e = document.querySelector({css:?}); return e ? e.textContent.trim() : null;");
        let text = self.eval(&script).await;
        text.as_str().unwrap_or_else(|| panic!("no element {css} on the page")).to_string()
    }

    /// The text of `css` once it is `expected` (a navigation may still be under way), else
    /// what it was after 10 s.
    async fn text_becomes(&self, css: &str, expected: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let script = format!("const e = document.querySelector({css:?}); return e ? e.textContent.trim() : null;");
            let text = self.eval(&script).await.as_str().unwrap_or_default().to_string();
            if text == expected || Instant::now() > deadline {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        use base64::Engine;
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dashboard-{name}.png"));
        std::fs::write(&path, bytes).unwrap();
    }

    /// Console messages at SEVERE level since the last call.
    async fn console_errors(&self) -> Vec<String> {
        let logs = self.call(reqwest::Method::POST, "/se/log", Some(json!({"type": "browser"}))).await;
        logs.as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter(|e| e["level"] == "SEVERE")
                    .map(|e| e["message"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: plain syscall on the group the driver leads.
        unsafe {
            libc::killpg(self.driver.id() as i32, libc::SIGKILL);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_reads_bills_and_dag_traces_in_a_browser() {
    let Some(browser) = Browser::start().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let (mut up, addresses) = common::up(&["--billing-interval-secs", "0", "--state-usage-interval-secs", "1"], data);
    let ui = format!("http://{}", addresses["ui"].as_str().unwrap());
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let acme: Value = serde_json::from_str(&sfaas(data, &["tenant", "create", "acme", "--plan", "pro"], "")).unwrap();
    let globex: Value = serde_json::from_str(&sfaas(data, &["tenant", "create", "globex"], "")).unwrap();
    let ingest = acme["ingest_token"].as_str().unwrap();
    let stack = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/flows/stack.yml");
    let flow = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/flows/text-report.yml");
    sfaas(data, &["deploy", "-f", stack, "--token", ingest], "");
    sfaas(data, &["flow", "deploy", "-f", flow, "--token", ingest], "");
    for _ in 0..2 {
        sfaas(data, &["flow", "run", "text-report", "--token", ingest], "the quick brown fox jumps over the lazy dog");
    }
    // Wait until billing has all 8 invocations (2 runs × 4 nodes).
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let api = |path: &str| {
        let request = http.get(format!("{ui}{path}")).bearer_auth(&admin);
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let usage = loop {
        sfaas(data, &["bill", "run"], "");
        let usage = api("/billing/usage/acme?by=function").await;
        let invocations: i64 = usage["rows"]
            .as_object()
            .map_or(0, |rows| rows.values().map(|r| r["invocations"].as_i64().unwrap_or(0)).sum());
        if invocations == 8 {
            break usage;
        }
        assert!(Instant::now() < deadline, "usage did not arrive: {usage}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let period = usage["period"].as_str().unwrap().to_string();
    let invoice = api(&format!("/billing/invoices/acme/{period}")).await;

    // Sign in as the operator.
    browser.go(&format!("{ui}/ui/tenants")).await;
    assert_eq!(browser.text("h1").await, "Sign in", "pages need a sign-in");
    browser.type_into("input[name=token]", &admin).await;
    browser.click("button[type=submit]").await;
    assert_eq!(browser.text_becomes("h1", "Tenants").await, "Tenants");
    let row = browser.text("#tenants tbody tr:first-child").await;
    assert!(row.contains("acme") && row.contains("pro"), "{row}");
    let charge = browser.text("#tenants tbody tr:first-child td:last-child").await;
    assert_eq!(charge, format!("{} EUR", invoice["total"].as_str().unwrap()), "the overview shows the invoice total");
    browser.screenshot("tenants").await;

    browser.click("#tenants a[href='/ui/tenants/acme']").await;
    assert_eq!(browser.text_becomes("h1", "Tenant acme").await, "Tenant acme");
    assert_eq!(browser.text("#invocations").await, "8");
    let charts = browser
        .eval("return [...document.querySelectorAll('svg.chart')].map(s => s.querySelectorAll('circle').length)")
        .await;
    assert_eq!(charts.as_array().map(Vec::len), Some(2), "usage and cost charts: {charts}");
    assert!(charts.as_array().unwrap().iter().all(|n| n.as_i64() > Some(0)), "charts with data: {charts}");
    browser.screenshot("tenant").await;

    browser.click(&format!("#invoices a[href='/ui/invoices/acme/{period}']")).await;
    assert_eq!(browser.text_becomes("h1", &format!("Invoice acme {period}")).await, format!("Invoice acme {period}"));
    assert_eq!(browser.text("#total").await, format!("{} EUR", invoice["total"].as_str().unwrap()));
    let lines = browser.eval("return document.querySelectorAll('#lines tbody tr').length").await;
    assert_eq!(lines.as_u64(), invoice["lines"].as_array().map(|l| l.len() as u64));
    browser.screenshot("invoice").await;

    browser.go(&format!("{ui}/ui/runs?tenant=acme")).await;
    let runs = browser.eval("return document.querySelectorAll('#runs tbody tr').length").await;
    assert_eq!(runs, 2, "both runs are listed");
    browser.click("#runs tbody tr:first-child a").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while browser.eval("return document.querySelector('svg.dag') !== null").await != true {
        assert!(Instant::now() < deadline, "the run page did not open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes =
        browser.eval("return [...document.querySelectorAll('svg.dag g.node')].map(g => g.dataset.node).sort()").await;
    assert_eq!(nodes, json!(["loud", "measure", "report", "stats"]), "a box per DAG node");
    let critical = browser.eval("return document.querySelectorAll('svg.dag g.node.critical').length").await;
    assert!(critical.as_u64() >= Some(2), "the critical path is highlighted: {critical}");
    let waterfall = browser.eval("return document.querySelectorAll('#waterfall tbody tr').length").await;
    assert!(waterfall.as_u64() >= Some(9), "flow + 4 nodes + 4 invocations in the waterfall: {waterfall}");
    browser.screenshot("run").await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new(), "the console has no errors");

    // A tenant's read token: its own pages only.
    browser.click("header form button").await;
    assert_eq!(browser.text_becomes("h1", "Sign in").await, "Sign in", "signed out");
    browser.go(&format!("{ui}/login")).await;
    browser.type_into("input[name=token]", globex["read_token"].as_str().unwrap()).await;
    browser.click("button[type=submit]").await;
    assert_eq!(browser.text_becomes("h1", "Tenant globex").await, "Tenant globex");
    browser.go(&format!("{ui}/ui/tenants/acme")).await;
    assert_eq!(browser.text("h1").await, "Forbidden");
    browser.go(&format!("{ui}/ui/invoices/acme/{period}")).await;
    assert_eq!(browser.text("h1").await, "Forbidden");
    browser.go(&format!("{ui}/ui/runs?tenant=acme")).await;
    assert_eq!(browser.text("h1").await, "Forbidden");

    up.kill().unwrap();
    up.wait().unwrap();
}
