//! Shared helpers of the core's integration tests: a real core on loopback in a temp dir.
#![allow(dead_code, unused_imports)]

pub mod otlp;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use stateful_faas_core::telemetry::TelemetryConfig;
use stateful_faas_core::{Core, CoreConfig, RunningCore};

pub const ADMIN: &str = "test-admin-token";

pub struct TestCore {
    pub running: Option<RunningCore>,
    pub url: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    /// Functions' files: see [`TestCore::functions_dir`].
    functions: tempfile::TempDir,
}

pub struct Tenant {
    pub name: String,
    pub ingest: String,
    pub read: String,
}

/// The Python interpreter's real path: a version manager's shim (pyenv) would add CPU time of
/// its own that a function cannot see. The system's own interpreter when there is one: a
/// sandboxed function sees the host's system folders only (not `/root`, where pyenv lives).
pub fn python() -> String {
    if std::path::Path::new("/usr/bin/python3").exists() {
        return "/usr/bin/python3".to_string();
    }
    let output = std::process::Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output();
    String::from_utf8(output.unwrap().stdout).unwrap().trim().to_string()
}

/// Lets tenants' upstreams and callbacks reach loopback, where the tests' receivers listen.
pub fn allow_loopback(config: &mut CoreConfig) {
    config.allow_outbound = vec!["127.0.0.1/32".into()];
}

/// Starts a core on a free port; `configure` may adjust the configuration.
pub async fn start(configure: impl FnOnce(&mut CoreConfig)) -> TestCore {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CoreConfig::new(dir.path());
    config.gateway_addr = "127.0.0.1:0".parse().unwrap();
    config.state_redis_addr = Some("127.0.0.1:0".parse().unwrap());
    config.admin_token = Some(ADMIN.to_string());
    config.telemetry = TelemetryConfig { max_queue_size: 1024, ..Default::default() };
    config.async_queue.initial_backoff = Duration::from_millis(50);
    configure(&mut config);
    let running = Core::open(config).await.unwrap().start().await.unwrap();
    let url = format!("http://{}", running.gateway_addr);
    let functions = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(functions.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    TestCore { running: Some(running), url, http, dir, functions }
}

impl TestCore {
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    pub async fn tenant(&self, name: &str) -> Tenant {
        let response = self
            .http
            .post(format!("{}/system/tenants", self.url))
            .bearer_auth(ADMIN)
            .json(&json!({"name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "creating tenant {name}");
        let body: Value = response.json().await.unwrap();
        Tenant {
            name: name.to_string(),
            ingest: body["ingest_token"].as_str().unwrap().to_string(),
            read: body["read_token"].as_str().unwrap().to_string(),
        }
    }

    /// Sends a deployment with the tenant's ingest token (`POST`: create, `PUT`: update).
    pub async fn send_deployment(
        &self,
        method: reqwest::Method,
        tenant: &Tenant,
        deployment: Value,
    ) -> reqwest::Response {
        let url = format!("{}/system/functions", self.url);
        self.http.request(method, url).bearer_auth(&tenant.ingest).json(&deployment).send().await.unwrap()
    }

    /// Deploys a function with the tenant's ingest token and asserts it was accepted.
    pub async fn deploy(&self, tenant: &Tenant, deployment: Value) {
        let response = self.send_deployment(reqwest::Method::POST, tenant, deployment).await;
        let status = response.status();
        assert_eq!(status, 202, "deploy answered {status}: {}", response.text().await.unwrap());
    }

    pub async fn invoke(&self, token: &str, function: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http.post(format!("{}/function/{function}", self.url)).bearer_auth(token).body(body).send().await.unwrap()
    }

    /// A folder for functions' files (their `workdir`) outside the data directory, which no
    /// sandboxed function may see, and readable by the tenants' uids.
    pub fn functions_dir(&self) -> PathBuf {
        self.functions.path().to_path_buf()
    }

    /// Runs a function recorded with [`RECORD_RUN`] so far.
    pub async fn runs(&self, tenant: &Tenant) -> usize {
        // A listing is paged: follow its cursor to the end.
        let (mut runs, mut cursor) = (0, String::new());
        loop {
            let query = if cursor.is_empty() { String::new() } else { format!("?cursor={cursor}") };
            let url = format!("{}/state/buckets/runs{query}", self.url);
            let response = self.http.get(url).bearer_auth(&tenant.read).send().await.unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
            let next = response.headers().get("x-sfaas-next-cursor").map(|v| v.to_str().unwrap().to_string());
            runs += response.json::<Value>().await.unwrap().as_array().unwrap().len();
            match next {
                Some(next) => cursor = next,
                None => return runs,
            }
        }
    }

    pub async fn get_json(&self, token: &str, path: &str) -> (u16, Value) {
        let response = self.http.get(format!("{}{path}", self.url)).bearer_auth(token).send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// Shell that records one run of a function in its tenant's state store (bucket `runs`, a
/// fresh key each time), storing its stdin: a sandboxed function writes nothing on the host, so
/// tests count runs there ([`TestCore::runs`]).
pub const RECORD_RUN: &str = r#"curl -sf -X PUT -H "Authorization: Bearer $SFAAS_STATE_TOKEN" --data-binary @- "$SFAAS_STATE_URL/buckets/runs/objects/$(cat /proc/sys/kernel/random/uuid)" >/dev/null"#;

/// Shell that prints how many runs [`RECORD_RUN`] recorded before.
pub const COUNT_RUNS: &str = r#"curl -sf -H "Authorization: Bearer $SFAAS_STATE_TOKEN" "$SFAAS_STATE_URL/buckets/runs" | grep -o '"key"' | wc -l"#;

/// Host pids of live processes whose command line is exactly `args` (a sandboxed function's
/// own pids are its namespace's, which the host does not know).
pub fn running(args: &[&str]) -> Vec<String> {
    let wanted: Vec<u8> = args.iter().flat_map(|arg| arg.bytes().chain([0])).collect();
    let entries = std::fs::read_dir("/proc").unwrap().flatten();
    entries
        .filter(|entry| std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| cmdline == wanted))
        .filter(|entry| {
            // A zombie waiting for init to reap it is gone too.
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            stat.split_whitespace().nth(2) != Some("Z")
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

pub use testkit::require_program;

/// Polls `check` until it returns Some, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
