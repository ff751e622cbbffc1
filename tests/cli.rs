//! End-to-end tests of the `sfaas` binary: the CLI, the JSON contracts of docs/contracts.md ("Addresses
//! and the command line"), and async durability across a crash (kill -9) and restart.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common;

use common::sfaas as sfaas_command;

/// Starts `sfaas core` and returns it with the gateway address from its first stdout line.
fn start_core(data_dir: &Path) -> (Child, String) {
    let (child, addresses) = common::serve(
        "core",
        // The callback receiver below is on loopback, which tenants may not reach by default.
        &["--gateway-addr", "127.0.0.1:0", "--async-workers", "1", "--allow-outbound", "127.0.0.1/32"],
        data_dir,
    );
    let keys: Vec<_> = addresses.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, vec!["gateway", "state_redis"], "only running components are listed");
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir.join("addresses.json")).unwrap()).unwrap();
    assert_eq!(written, addresses);
    (child, addresses["gateway"].as_str().unwrap().to_string())
}

fn sfaas(data_dir: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = sfaas_command()
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("SFAAS_ADMIN_TOKEN")
        .env_remove("SFAAS_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    (output.status.success(), String::from_utf8(output.stdout).unwrap(), String::from_utf8(output.stderr).unwrap())
}

async fn callback_server() -> (String, Arc<Mutex<Vec<(String, String, String)>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/done",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let get = |name: &str| headers[name].to_str().unwrap().to_string();
                sink.lock().unwrap().push((get("x-call-id"), get("x-function-status"), body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/done", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_round_trip_and_async_calls_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (mut core, gateway) = start_core(&data_dir);

    // The admin token file is created once, private to its owner.
    let mode = std::fs::metadata(data_dir.join("admin.token")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let (ok, stdout, stderr) = sfaas(&data_dir, &["tenant", "create", "acme"], None);
    assert!(ok, "{stderr}");
    let credentials: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let mut keys: Vec<_> = credentials.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, vec!["ingest_token", "read_token", "tenant"]);
    assert_eq!(credentials["tenant"], "acme");
    let ingest = credentials["ingest_token"].as_str().unwrap().to_string();
    let (ok, _, stderr) = sfaas(&data_dir, &["tenant", "create", "acme"], None);
    assert!(!ok && stderr.contains("already exists"), "{stderr}");

    let stack = dir.path().join("stack.yml");
    std::fs::write(
        &stack,
        "functions:\n  slow:\n    kind: exec\n    fprocess: sleep 0.2; cat\n  shout:\n    kind: builtin\n    handler: uppercase\n",
    )
    .unwrap();
    let (ok, _, stderr) = sfaas(&data_dir, &["deploy", "-f", stack.to_str().unwrap(), "--token", &ingest], None);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = sfaas(&data_dir, &["invoke", "shout", "--token", &ingest], Some("hello"));
    assert!(ok, "{stderr}");
    assert_eq!(stdout, "HELLO");
    let (ok, stdout, _) = sfaas(&data_dir, &["list", "--token", &ingest], None);
    assert!(ok && stdout.contains("shout") && stdout.contains("slow"), "{stdout}");
    let (ok, _, stderr) = sfaas(&data_dir, &["invoke", "ghost", "--token", &ingest, "-d", "x"], None);
    assert!(!ok && stderr.contains("404") && stderr.contains("ghost"), "{stderr}");

    // Accept async calls, then crash before they can all run.
    let (callback, received) = callback_server().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let ids: Vec<String> = (0..6).map(|i| format!("crash-{i}")).collect();
    for id in &ids {
        let response = http
            .post(format!("http://{gateway}/async-function/slow"))
            .bearer_auth(&ingest)
            .header("X-Call-Id", id)
            .header("X-Callback-Url", &callback)
            .body(format!("payload of {id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
    }
    core.kill().unwrap(); // SIGKILL: no shutdown code runs
    core.wait().unwrap();
    let delivered_before_crash = received.lock().unwrap().len();
    assert!(delivered_before_crash < ids.len(), "the crash came too late to test anything");

    let (mut core, _) = start_core(&data_dir);
    let mut all_delivered = false;
    for _ in 0..200 {
        let got = received.lock().unwrap().clone();
        let delivered: std::collections::BTreeSet<_> = got.iter().map(|(id, _, _)| id.clone()).collect();
        if delivered.len() == ids.len() {
            all_delivered = true;
            for (id, status, body) in got {
                assert_eq!(status, "200");
                assert_eq!(body, format!("payload of {id}"));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(all_delivered, "accepted async calls were lost in the crash: {:?}", received.lock().unwrap());

    // A clean stop on SIGTERM.
    unsafe {
        libc::kill(core.id() as i32, libc::SIGTERM);
    }
    assert!(core.wait().unwrap().success());
}

/// Where the sandbox cannot work (here: not root), the gateway refuses to start and says why
/// and what to do, instead of running tenants' code unconfined.
#[test]
fn without_root_the_sandbox_refuses_to_start_and_says_why() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut command = sfaas_command();
    command.args(["core", "--gateway-addr", "127.0.0.1:0", "--data-dir"]).arg(dir.path().join("data"));
    command.env_remove("SFAAS_ADMIN_TOKEN").stdin(Stdio::null());
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } == 0 {
        command.uid(65534).gid(65534);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it started: {stderr}");
    assert!(stderr.contains("the sandbox cannot run here: the gateway does not run as root"), "{stderr}");
    assert!(stderr.contains("--sandbox off"), "{stderr}");
}

/// Each server command takes its own components' flags only: a flag of another component is
/// refused before anything starts, naming the flag.
#[test]
fn each_component_takes_its_own_flags_only() {
    let dir = tempfile::tempdir().unwrap();
    let refused = [
        ("collector", "--gateway-addr"),
        ("collector", "--ui-addr"),
        ("dashboard", "--otlp-grpc-addr"),
        ("dashboard", "--state-max-value-bytes"),
        ("core", "--ui-addr"),
        ("core", "--jaeger-addr"),
        ("core", "--demo"),
    ];
    for (component, flag) in refused {
        let value = if flag == "--demo" { None } else { Some("127.0.0.1:0") };
        let mut args = vec![component, flag];
        args.extend(value);
        let (ok, _, stderr) = sfaas(dir.path(), &args, None);
        assert!(!ok && stderr.contains(&format!("unexpected argument '{flag}'")), "{component} {flag}: {stderr}");
    }
    for (component, own) in [("core", "--gateway-addr"), ("collector", "--jaeger-addr"), ("dashboard", "--ui-addr")] {
        let help = sfaas_command().args([component, "--help"]).output().unwrap();
        let help = String::from_utf8(help.stdout).unwrap();
        assert!(help.contains(own) && help.contains("--data-dir"), "{component} --help: {help}");
    }
    let up = String::from_utf8(sfaas_command().args(["up", "--help"]).output().unwrap().stdout).unwrap();
    for flag in ["--gateway-addr", "--jaeger-addr", "--ui-addr", "--demo", "--platform-scrape-secs"] {
        assert!(up.contains(flag), "up --help lacks {flag}");
    }
}
