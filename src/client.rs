//! Client commands: find a running instance and talk to its gateway.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use stateful_faas_core::config::admin_token_path;

/// How a client command finds the gateway and its credentials.
#[derive(Args, Clone)]
pub struct ClientArgs {
    /// Data directory of a local instance (its addresses.json and admin.token).
    #[arg(long, env = "SFAAS_DATA_DIR", default_value = "./sfaas-data")]
    data_dir: PathBuf,
    /// Gateway URL (default: from DATA_DIR/addresses.json, else http://127.0.0.1:8080).
    #[arg(long, env = "SFAAS_GATEWAY_URL")]
    gateway_url: Option<String>,
    /// Dashboard URL, for billing (default: from DATA_DIR/addresses.json, else http://127.0.0.1:16686).
    #[arg(long, env = "SFAAS_UI_URL")]
    ui_url: Option<String>,
    /// Token (default: SFAAS_ADMIN_TOKEN, else DATA_DIR/admin.token).
    #[arg(long, env = "SFAAS_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// A server a client command talks to (the gateway, or the dashboard for billing).
#[derive(Clone)]
pub struct Gateway {
    pub url: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl ClientArgs {
    fn gateway(&self) -> anyhow::Result<Gateway> {
        self.server(&self.gateway_url, "gateway", "127.0.0.1:8080")
    }

    fn dashboard(&self) -> anyhow::Result<Gateway> {
        self.server(&self.ui_url, "ui", "127.0.0.1:16686")
    }

    fn server(&self, explicit: &Option<String>, key: &str, default: &str) -> anyhow::Result<Gateway> {
        let url = match explicit {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("http://{}", read_address(&self.data_dir, key).unwrap_or_else(|| default.to_string())),
        };
        let token = match (&self.token, std::env::var("SFAAS_ADMIN_TOKEN")) {
            (Some(token), _) => token.clone(),
            (None, Ok(token)) if !token.is_empty() => token,
            _ => {
                let path = admin_token_path(&self.data_dir);
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!("no token: pass --token or SFAAS_TOKEN, or run next to {}", path.display())
                    })?
                    .trim()
                    .to_string()
            }
        };
        Gateway::new(&url, &token)
    }
}

fn read_address(data_dir: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("addresses.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(value.get(key)?.as_str()?.to_string())
}

impl Gateway {
    pub fn new(url: &str, token: &str) -> anyhow::Result<Self> {
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http: reqwest::Client::builder().no_proxy().build()?,
        })
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.token)
    }

    /// Sends; the answer's body, or the server's own message on an error status.
    pub async fn text(&self, request: reqwest::RequestBuilder) -> anyhow::Result<String> {
        Ok(send(request).await?.text().await?)
    }

    /// Deploys a function (`FunctionDeployment` JSON), replacing one of the same name.
    pub async fn deploy(&self, function: &impl serde::Serialize) -> anyhow::Result<()> {
        let created = self.request(reqwest::Method::POST, "/system/functions").json(function).send().await?;
        if created.status() == reqwest::StatusCode::CONFLICT {
            send(self.request(reqwest::Method::PUT, "/system/functions").json(function)).await?;
            return Ok(());
        }
        if !created.status().is_success() {
            bail!("gateway answered {}: {}", created.status(), created.text().await.unwrap_or_default().trim());
        }
        Ok(())
    }
}

/// Sends a request and fails with the gateway's own message on an error status.
pub async fn send(request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
    let response = request.send().await.context("cannot reach the server (is `sfaas up` running?)")?;
    if response.status().is_client_error() || response.status().is_server_error() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        bail!("server answered {status}: {}", body.trim());
    }
    Ok(response)
}

fn qualified(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{name}.{ns}"),
        None => name.to_string(),
    }
}

pub async fn tenant_create(args: &ClientArgs, name: &str, plan: Option<String>) -> anyhow::Result<()> {
    let gateway = args.gateway()?;
    let body = serde_json::json!({ "name": name, "plan": &plan });
    let response = send(gateway.request(reqwest::Method::POST, "/system/tenants").json(&body)).await?;
    let credentials: serde_json::Value = response.json().await?;
    if let Some(plan) = plan {
        plan_assign(args, name, &plan, None).await.context("the tenant exists, but its billing plan is not set")?;
    }
    println!("{credentials}");
    Ok(())
}

pub async fn tenant_list(args: &ClientArgs) -> anyhow::Result<()> {
    let gateway = args.gateway()?;
    let tenants: Vec<serde_json::Value> =
        send(gateway.request(reqwest::Method::GET, "/system/tenants")).await?.json().await?;
    for tenant in tenants {
        println!("{}\t{}", tenant["name"].as_str().unwrap_or(""), tenant["plan"].as_str().unwrap_or("-"));
    }
    Ok(())
}

pub async fn deploy(args: &ClientArgs, file: &Path, namespace: Option<String>) -> anyhow::Result<()> {
    let stack = stateful_faas_core::stack::load(file)?;
    let mut args = args.clone();
    if args.gateway_url.is_none() && !args.data_dir.join("addresses.json").exists() {
        args.gateway_url = stack.gateway.clone();
    }
    let gateway = args.gateway()?;
    for mut function in stack.functions {
        if function.namespace.is_none() {
            function.namespace = namespace.clone();
        }
        gateway.deploy(&function).await.with_context(|| format!("deploying {}", function.service))?;
        eprintln!("deployed {}", qualified(&function.service, function.namespace.as_deref()));
    }
    Ok(())
}

pub async fn invoke(
    args: &ClientArgs,
    name: &str,
    namespace: Option<String>,
    is_async: bool,
    callback_url: Option<String>,
    data: Option<String>,
) -> anyhow::Result<()> {
    let gateway = args.gateway()?;
    let body = match data {
        Some(data) => data.into_bytes(),
        None => {
            let mut body = Vec::new();
            std::io::stdin().read_to_end(&mut body).context("reading the request body from stdin")?;
            body
        }
    };
    let route = if is_async { "async-function" } else { "function" };
    let mut request = gateway
        .request(reqwest::Method::POST, &format!("/{route}/{}", qualified(name, namespace.as_deref())))
        .body(body);
    if let Some(url) = callback_url {
        request = request.header("X-Callback-Url", url);
    }
    let response = send(request).await?;
    if is_async {
        let call_id = response.headers().get("x-call-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
        println!("{}", serde_json::json!({ "call_id": call_id, "status": response.status().as_u16() }));
    } else {
        use std::io::Write;
        std::io::stdout().write_all(&response.bytes().await?)?;
    }
    Ok(())
}

/// `since` as the RFC 3339 time `/system/logs` takes: a duration back from now (`10m`, `2h`,
/// `1d`, `30s`) or a time as it is.
fn since_time(since: &str) -> anyhow::Result<String> {
    if chrono::DateTime::parse_from_rfc3339(since).is_ok() {
        return Ok(since.to_string());
    }
    let (number, unit) = since.split_at(since.find(|c: char| !c.is_ascii_digit()).unwrap_or(since.len()));
    let number: i64 =
        number.parse().with_context(|| format!("--since {since:?}: expected 10m, 2h, 1d or an RFC 3339 time"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        _ => bail!("--since {since:?}: expected 10m, 2h, 1d or an RFC 3339 time"),
    };
    let at = chrono::Utc::now() - chrono::Duration::seconds(seconds);
    Ok(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// Prints a function's log lines (`/system/logs`): time, instance, severity, text.
pub async fn logs(
    args: &ClientArgs,
    name: &str,
    namespace: Option<String>,
    since: Option<String>,
    tail: Option<u64>,
    invocation: Option<String>,
    follow: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let gateway = args.gateway()?;
    let mut query = vec![("name", name.to_string())];
    if let Some(namespace) = namespace {
        query.push(("namespace", namespace));
    }
    if let Some(since) = since {
        query.push(("since", since_time(&since)?));
    }
    if let Some(tail) = tail {
        query.push(("tail", tail.to_string()));
    }
    if let Some(invocation) = invocation {
        query.push(("invocation", invocation));
    }
    if follow {
        query.push(("follow", "true".into()));
    }
    let encoded = reqwest::Url::parse_with_params("http://gateway/system/logs", &query)?;
    let path = format!("/system/logs?{}", encoded.query().unwrap_or(""));
    let mut response = send(gateway.request(reqwest::Method::GET, &path)).await?;
    let mut pending = Vec::new();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = response.chunk().await? {
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Ok(message) = serde_json::from_slice::<serde_json::Value>(&line) else { continue };
            let field = |key: &str| message[key].as_str().unwrap_or("").to_string();
            let invocation = message["invocation_id"].as_str().map(|id| format!(" {id}")).unwrap_or_default();
            writeln!(
                stdout,
                "{} {} ({}{invocation}) {}: {}",
                field("timestamp"),
                field("name"),
                field("instance"),
                field("severity"),
                field("text")
            )?;
        }
        stdout.flush()?;
    }
    Ok(())
}

pub async fn list(args: &ClientArgs, namespace: Option<String>) -> anyhow::Result<()> {
    let gateway = args.gateway()?;
    let path = match namespace {
        Some(ns) => format!("/system/functions?namespace={ns}"),
        None => "/system/functions".to_string(),
    };
    let functions: Vec<serde_json::Value> = send(gateway.request(reqwest::Method::GET, &path)).await?.json().await?;
    println!("{:<24} {:<20} {:<8} {:>12} {:>9}", "Function", "Namespace", "Kind", "Invocations", "Replicas");
    for f in functions {
        println!(
            "{:<24} {:<20} {:<8} {:>12} {:>9}",
            f["name"].as_str().unwrap_or(""),
            f["namespace"].as_str().unwrap_or(""),
            f["kind"].as_str().unwrap_or(""),
            f["invocationCount"].as_u64().unwrap_or(0),
            f["replicas"].as_u64().unwrap_or(0)
        );
    }
    Ok(())
}

pub async fn remove(args: &ClientArgs, name: &str, namespace: Option<String>) -> anyhow::Result<()> {
    let gateway = args.gateway()?;
    let body = serde_json::json!({ "functionName": name, "namespace": namespace });
    send(gateway.request(reqwest::Method::DELETE, "/system/functions").json(&body)).await?;
    eprintln!("removed {}", qualified(name, namespace.as_deref()));
    Ok(())
}

pub async fn flow_deploy(args: &ClientArgs, file: &Path) -> anyhow::Result<()> {
    let gateway = args.gateway()?;
    let definition = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let response = send(gateway.request(reqwest::Method::POST, "/system/flows").body(definition)).await?;
    let created = response.status() == reqwest::StatusCode::CREATED;
    let body: serde_json::Value = response.json().await?;
    let name = body["name"].as_str().unwrap_or_default();
    eprintln!("{} flow {name} ({} nodes)", if created { "deployed" } else { "updated" }, body["nodes"]);
    Ok(())
}

pub async fn flow_run(args: &ClientArgs, name: &str, input: Option<PathBuf>, is_async: bool) -> anyhow::Result<()> {
    let gateway = args.gateway()?;
    let body = match input.as_deref() {
        Some(path) if path != Path::new("-") => {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
        }
        _ => {
            let mut body = Vec::new();
            std::io::stdin().read_to_end(&mut body).context("reading the input from stdin")?;
            body
        }
    };
    let route = if is_async { "async-flow" } else { "flow" };
    let response = gateway.request(reqwest::Method::POST, &format!("/{route}/{name}")).body(body).send().await;
    let response = response.context("cannot reach the gateway (is `sfaas up` running?)")?;
    let status = response.status();
    let run_id = response.headers().get("x-run-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = response.bytes().await?;
    if is_async && status.is_success() {
        println!("{}", serde_json::json!({ "run_id": run_id }));
        return Ok(());
    }
    if !status.is_success() {
        bail!("run {run_id} answered {status}: {}", String::from_utf8_lossy(&body).trim());
    }
    use std::io::Write;
    std::io::stdout().write_all(&body)?;
    eprintln!("\nrun {run_id} succeeded");
    Ok(())
}

pub async fn flow_status(args: &ClientArgs, run_id: &str) -> anyhow::Result<()> {
    let gateway = args.gateway()?;
    let run: serde_json::Value =
        send(gateway.request(reqwest::Method::GET, &format!("/flow-runs/{run_id}"))).await?.json().await?;
    println!("{}", serde_json::to_string_pretty(&run)?);
    Ok(())
}

pub async fn flow_cancel(args: &ClientArgs, run_id: &str) -> anyhow::Result<()> {
    let gateway = args.gateway()?;
    send(gateway.request(reqwest::Method::DELETE, &format!("/flow-runs/{run_id}"))).await?;
    eprintln!("cancelling run {run_id}");
    Ok(())
}

pub async fn flow_graph(args: &ClientArgs, name: &str, format: &str) -> anyhow::Result<()> {
    let gateway = args.gateway()?;
    let text = send(gateway.request(reqwest::Method::GET, &format!("/system/flows/{name}?format={format}")))
        .await?
        .text()
        .await?;
    print!("{text}");
    Ok(())
}

pub async fn bill_run(args: &ClientArgs, until: Option<String>) -> anyhow::Result<()> {
    let dashboard = args.dashboard()?;
    let body = serde_json::json!({ "until": until });
    let report: serde_json::Value =
        send(dashboard.request(reqwest::Method::POST, "/billing/run").json(&body)).await?.json().await?;
    println!("{report}");
    Ok(())
}

/// Prints the reconciliation as a table (settled first with `settle`); fails when a function
/// was served but not metered, or metered more than served.
pub async fn bill_reconcile(
    args: &ClientArgs,
    tenant: Option<String>,
    period: Option<String>,
    settle: bool,
) -> anyhow::Result<()> {
    let dashboard = args.dashboard()?;
    // Tenant names are DNS labels and periods digits and dashes: nothing to escape.
    let query: Vec<String> = [("tenant", &tenant), ("period", &period)]
        .iter()
        .filter_map(|(key, value)| Some(format!("{key}={}", value.as_ref()?)))
        .collect();
    let query = query.join("&");
    let rows: Vec<serde_json::Value> = if settle {
        eprintln!("bill reconcile: settling (spans sent, counters stored, billing run in about 5 s)");
        let path = format!("/billing/reconciliation/settle?{query}");
        let settled: serde_json::Value = send(dashboard.request(reqwest::Method::POST, &path)).await?.json().await?;
        serde_json::from_value(settled["reconciliation"].clone())?
    } else {
        let path = format!("/billing/reconciliation?{query}");
        send(dashboard.request(reqwest::Method::GET, &path)).await?.json().await?
    };
    println!(
        "{:<20} {:<24} {:<10} {:>10} {:>10} {:>10}",
        "Tenant", "Function", "Period", "Metered", "Counted", "Difference"
    );
    let mut off = 0;
    for row in &rows {
        let number = |key: &str| row[key].as_i64().unwrap_or(0);
        off += i64::from(number("difference") != 0);
        println!(
            "{:<20} {:<24} {:<10} {:>10} {:>10} {:>10}",
            row["tenant"].as_str().unwrap_or(""),
            row["function"].as_str().unwrap_or(""),
            row["period"].as_str().unwrap_or(""),
            number("metered"),
            number("counted"),
            number("difference")
        );
    }
    if off > 0 {
        bail!("{off} of {} functions differ (positive: served but not metered)", rows.len());
    }
    Ok(())
}

pub async fn bill_show(args: &ClientArgs, tenant: &str, period: Option<String>, format: &str) -> anyhow::Result<()> {
    let dashboard = args.dashboard()?;
    let period = match period {
        Some(period) => period,
        None => {
            // The tenant's latest invoice.
            let path = format!("/billing/invoices?tenant={tenant}");
            let list: Vec<serde_json::Value> =
                send(dashboard.request(reqwest::Method::GET, &path)).await?.json().await?;
            let Some(latest) = list.first() else { bail!("tenant {tenant:?} has no invoice yet") };
            latest["period"].as_str().unwrap_or_default().to_string()
        }
    };
    let path = format!("/billing/invoices/{tenant}/{period}?format={format}");
    print!("{}", send(dashboard.request(reqwest::Method::GET, &path)).await?.text().await?);
    Ok(())
}

pub async fn bill_list(args: &ClientArgs, tenant: Option<String>) -> anyhow::Result<()> {
    let dashboard = args.dashboard()?;
    let path = match tenant {
        Some(tenant) => format!("/billing/invoices?tenant={tenant}"),
        None => "/billing/invoices".to_string(),
    };
    let list: Vec<serde_json::Value> = send(dashboard.request(reqwest::Method::GET, &path)).await?.json().await?;
    for invoice in list {
        let field = |key: &str| invoice[key].as_str().unwrap_or_default().to_string();
        println!(
            "{}\t{}\t{}\t{} {}",
            field("tenant"),
            field("period"),
            field("status"),
            field("total"),
            field("currency")
        );
    }
    Ok(())
}

pub async fn bill_finalize(args: &ClientArgs, period: &str) -> anyhow::Result<()> {
    let dashboard = args.dashboard()?;
    let body = serde_json::json!({ "period": period });
    let result: serde_json::Value =
        send(dashboard.request(reqwest::Method::POST, "/billing/finalize").json(&body)).await?.json().await?;
    println!("{result}");
    Ok(())
}

pub async fn plan_apply(args: &ClientArgs, file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let dashboard = args.dashboard()?;
    let card: serde_json::Value =
        send(dashboard.request(reqwest::Method::PUT, "/billing/plans").body(text)).await?.json().await?;
    let plans: Vec<&str> =
        card["plans"].as_object().map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
    println!("rate card applied: plans {plans:?}, default {}", card["default_plan"]);
    Ok(())
}

pub async fn plan_assign(args: &ClientArgs, tenant: &str, plan: &str, from: Option<String>) -> anyhow::Result<()> {
    let dashboard = args.dashboard()?;
    let body = serde_json::json!({ "plan": plan, "from": from });
    let path = format!("/billing/tenants/{tenant}/plan");
    let result: serde_json::Value =
        send(dashboard.request(reqwest::Method::PUT, &path).json(&body)).await?.json().await?;
    eprintln!("tenant {tenant} is on plan {plan} from {}", result["from"].as_str().unwrap_or("now"));
    Ok(())
}

pub async fn plan_show(args: &ClientArgs) -> anyhow::Result<()> {
    let dashboard = args.dashboard()?;
    let card: serde_json::Value = send(dashboard.request(reqwest::Method::GET, "/billing/plans")).await?.json().await?;
    println!("{}", serde_json::to_string_pretty(&card)?);
    Ok(())
}

pub async fn etl_setup(args: &ClientArgs, namespace: &str, transport: &str) -> anyhow::Result<()> {
    let script_dir = crate::etl::script_dir(&args.data_dir)?;
    crate::etl::setup(&args.gateway()?, namespace, &crate::etl::Setup { transport, script_dir: &script_dir }).await?;
    eprintln!(
        "etl: functions etl-extract, etl-clean, etl-aggregate, etl-load and flow etl deployed in {namespace} \
         (transport {transport}; etl-load loads where the platform's --etl-database-url says, by default \
         DATA_DIR/etl/{namespace}.db); stream records to POST /stream/etl.{namespace}"
    );
    Ok(())
}

pub async fn etl_stream(
    args: &ClientArgs,
    namespace: &str,
    records: usize,
    rate: u64,
    seed: u64,
    bad_per_mille: u32,
) -> anyhow::Result<()> {
    let api = args.gateway()?;
    let lines = crate::etl::generate(seed, stateful_faas_core::database::now_ms(), bad_per_mille, false).take(records);
    let mut last = std::time::Instant::now();
    let streamed = crate::etl::stream(&api, namespace, lines, 200, 8, rate, |s| {
        if last.elapsed() >= std::time::Duration::from_secs(5) {
            eprintln!("etl: {} records sent in {} runs ({} requests throttled)", s.records, s.runs.len(), s.throttled);
            last = std::time::Instant::now();
        }
    })
    .await?;
    eprintln!(
        "etl: {} records streamed into etl.{namespace}: {} runs, {} requests throttled (429)",
        streamed.records,
        streamed.runs.len(),
        streamed.throttled
    );
    Ok(())
}
