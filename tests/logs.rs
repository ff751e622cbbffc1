//! Function logs end to end through the `sfaas` binary: each line an exec function writes to
//! stderr reaches the collector as a log record of its tenant (exported by the gateway with
//! the meter token), tied to the invocation, and is read back by `sfaas logs` (plain, by
//! invocation, and followed) and OpenFaaS's `GET /system/logs`; another tenant reads none.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;

use common::{cli as sfaas, cli_ok as ok};

/// Prints its request and writes three lines to stderr: a plain one, one with a level word,
/// and one longer than the line limit.
const TALKER: &str = r#"import sys
body = sys.stdin.read()
print("hello " + body)
sys.stderr.write("first line for %s\n" % body)
sys.stderr.write("ERROR: second line for %s\n" % body)
sys.stderr.write("x" * 5000 + "\n")
sys.stderr.flush()
"#;

/// A managed http server that writes a line to stdout and one to stderr while it serves a
/// request (and lets `http.server` write nothing of its own).
const SERVER: &str = r#"import http.server, os, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        name = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        print("serving %s" % name, flush=True)
        sys.stderr.write("ERROR: nothing wrong with %s\n" % name)
        sys.stderr.flush()
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// `sfaas logs …` until its output has `lines` lines (the export takes a moment).
fn logs_until(data: &std::path::Path, args: &[&str], lines: usize) -> Vec<String> {
    let started = Instant::now();
    loop {
        let out = ok(data, args, "");
        let got: Vec<String> = out.lines().map(str::to_string).collect();
        if got.len() >= lines || started.elapsed() > Duration::from_secs(30) {
            return got;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_functions_stderr_lines_are_its_tenants_logs() {
    if testkit::require_program("python3").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = &dir.path().join("data");
    let functions = dir.path().join("functions");
    std::fs::create_dir_all(&functions).unwrap();
    let (mut up, addresses) = common::up(&[], data);
    let gateway = format!("http://{}", addresses["gateway"].as_str().unwrap());
    let acme: Value = serde_json::from_str(&ok(data, &["tenant", "create", "acme"], "")).unwrap();
    let globex: Value = serde_json::from_str(&ok(data, &["tenant", "create", "globex"], "")).unwrap();
    let (acme_ingest, acme_read) = (acme["ingest_token"].as_str().unwrap(), acme["read_token"].as_str().unwrap());
    let globex_read = globex["read_token"].as_str().unwrap();
    std::fs::write(functions.join("talker.py"), TALKER).unwrap();
    std::fs::write(functions.join("server.py"), SERVER).unwrap();
    let stack = dir.path().join("stack.yml");
    let workdir = functions.display();
    let functions_yaml = format!(
        "functions:\n  talker:\n    kind: exec\n    fprocess: python3 talker.py\n    workdir: {workdir}\n  \
         server:\n    kind: http\n    fprocess: python3 server.py\n    workdir: {workdir}\n"
    );
    std::fs::write(&stack, functions_yaml).unwrap();
    ok(data, &["deploy", "-f", stack.to_str().unwrap(), "--token", acme_ingest], "");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = http
        .post(format!("{gateway}/function/talker"))
        .bearer_auth(acme_ingest)
        .header("X-Call-Id", "call-42")
        .body("world")
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert_eq!((status.as_u16(), text.trim()), (200, "hello world"), "stderr never reaches the caller");

    // The read token reads its namespace's logs; each line with its invocation and severity.
    let lines = logs_until(data, &["logs", "talker", "--token", acme_read], 3);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(lines[0].contains("WARN: first line for world"), "{lines:#?}");
    assert!(lines[1].contains("ERROR: ERROR: second line for world"), "{lines:#?}");
    assert!(
        lines[2].ends_with(&"x".repeat(100)) && lines[2].len() < 4096 + 200,
        "cut at 4096 bytes: {}",
        lines[2].len()
    );
    assert!(lines.iter().all(|l| l.contains(" talker (exec ")), "{lines:#?}");
    // By the caller's X-Call-Id, and by the invocation's own id.
    let by_call = ok(data, &["logs", "talker", "--invocation", "call-42", "--token", acme_read], "");
    assert_eq!(by_call.lines().count(), 3, "{by_call}");
    let invocation_id = lines[0].split(" (exec ").nth(1).unwrap().split(')').next().unwrap().to_string();
    let by_id = ok(data, &["logs", "talker", "--invocation", &invocation_id, "--token", acme_read], "");
    assert_eq!(by_id.lines().count(), 3, "{by_id}");
    assert_eq!(ok(data, &["logs", "talker", "--invocation", "nope", "--token", acme_read], ""), "");
    assert_eq!(ok(data, &["logs", "talker", "--tail", "1", "--token", acme_read], "").lines().count(), 1);

    // OpenFaaS's API: NDJSON in faas-provider's shape.
    let body =
        http.get(format!("{gateway}/system/logs?name=talker&tail=2")).bearer_auth(acme_read).send().await.unwrap();
    assert_eq!(body.headers()["content-type"], "application/x-ndjson");
    let messages: Vec<Value> =
        body.text().await.unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(messages.len(), 2);
    for field in ["name", "namespace", "instance", "timestamp", "text"] {
        assert!(messages[0][field].is_string(), "{field}: {}", messages[0]);
    }
    assert_eq!((messages[0]["name"].as_str(), messages[0]["namespace"].as_str()), (Some("talker"), Some("acme")));

    // Another tenant: its own namespace has none of them, and acme's is refused.
    assert_eq!(ok(data, &["logs", "talker", "--token", globex_read], ""), "");
    let (success, _, stderr) = sfaas(data, &["logs", "talker", "--namespace", "acme", "--token", globex_read], "");
    assert!(!success && stderr.contains("403"), "{stderr}");
    let response =
        http.get(format!("{gateway}/system/logs?name=talker.acme")).bearer_auth(globex_read).send().await.unwrap();
    assert_eq!(response.status(), 403);
    let response = http.get(format!("{gateway}/system/logs")).bearer_auth(acme_read).send().await.unwrap();
    assert_eq!(response.status(), 400, "name is required");

    // A managed server's stdout and stderr while it serves a request: that invocation's lines,
    // of its instance.
    let response = http
        .post(format!("{gateway}/function/server"))
        .bearer_auth(acme_ingest)
        .header("X-Call-Id", "call-7")
        .body("ada")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let lines = logs_until(data, &["logs", "server", "--invocation", "call-7", "--token", acme_read], 2);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("INFO: serving ada")), "stdout: {lines:#?}");
    assert!(lines.iter().any(|l| l.contains("ERROR: ERROR: nothing wrong with ada")), "stderr: {lines:#?}");
    assert!(lines.iter().all(|l| !l.contains(" server (exec ")), "an instance's id, not exec: {lines:#?}");

    // A builtin's failure is a line of its logs too.
    http.post(format!("{gateway}/system/functions"))
        .bearer_auth(acme_ingest)
        .json(&serde_json::json!({"service": "failing", "builtin": "fail"}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let response = http.post(format!("{gateway}/function/failing")).bearer_auth(acme_ingest).send().await.unwrap();
    assert_eq!(response.status(), 500);
    let lines = logs_until(data, &["logs", "failing", "--token", acme_read], 1);
    assert!(
        lines.len() == 1 && lines[0].contains(" failing (builtin ") && lines[0].contains(": ERROR: "),
        "{lines:#?}"
    );

    // Followed: lines of a new call arrive while the command runs.
    let mut follow = common::sfaas()
        .args(["logs", "talker", "--follow", "--since", "1h", "--token", acme_read, "--data-dir"])
        .arg(data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let response =
        http.post(format!("{gateway}/function/talker")).bearer_auth(acme_ingest).body("again").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("first line for again")) && Instant::now() < deadline {
        if let Ok(line) = receiver.recv_timeout(Duration::from_millis(500)) {
            seen.push(line);
        }
    }
    follow.kill().unwrap();
    follow.wait().unwrap();
    assert!(seen.iter().any(|l| l.contains("first line for again")), "followed: {seen:#?}");
    assert!(seen.iter().any(|l| l.contains("first line for world")), "the lines before, first: {seen:#?}");

    // The dashboard's trace page shows the lines of the trace's invocations, escaped.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = http
        .post(format!("{gateway}/function/talker"))
        .bearer_auth(acme_ingest)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .body("<script>alert(1)</script>")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let ui = format!("http://{}", addresses["ui"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let page = http.get(format!("{ui}/ui/traces/acme/{trace_id}")).bearer_auth(acme_read).send().await.unwrap();
        let (status, page) = (page.status(), page.text().await.unwrap());
        if (status == 200 && page.contains("second line for")) || Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(page.contains("first line for &lt;script&gt;alert(1)&lt;/script&gt;"), "{page}");
    assert!(!page.contains("<script>alert"), "escaped");
    assert!(page.contains("invoke talker"), "each line names its span: {page}");
    let other = http.get(format!("{ui}/ui/traces/acme/{trace_id}")).bearer_auth(globex_read).send().await.unwrap();
    assert_eq!(other.status(), 403, "another tenant's trace page");
    // The logs page searches by function, text and severity.
    let search = format!("{ui}/ui/logs?function=talker&text=second+line&severity=ERROR");
    let page = http.get(&search).bearer_auth(acme_read).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("ERROR: second line for world") && page.contains("ERROR: second line for again"), "{page}");
    assert!(!page.contains("first line for"), "only what matches: {page}");
    let page = http.get(format!("{search}&tenant=acme")).bearer_auth(globex_read).send().await.unwrap();
    assert_eq!(page.status(), 403, "another tenant's logs page");
    let page = http.get(format!("{ui}/ui/logs")).bearer_auth(globex_read).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("No log lines match.") && !page.contains("second line"), "its own, none: {page}");

    // A namespace follows in at most 8 responses at once; a closed one gives its place back.
    let follow_url = format!("{gateway}/system/logs?name=talker&follow=true");
    let mut open = Vec::new();
    for _ in 0..8 {
        let response = http.get(&follow_url).bearer_auth(acme_read).send().await.unwrap();
        assert_eq!(response.status(), 200);
        open.push(response);
    }
    let refused = http.get(&follow_url).bearer_auth(acme_read).send().await.unwrap();
    assert_eq!(refused.status(), 429, "{}", refused.text().await.unwrap());
    let other = http.get(format!("{gateway}/system/logs?name=talker&follow=true")).bearer_auth(globex_read);
    assert_eq!(other.send().await.unwrap().status(), 200, "another namespace has places of its own");
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = http.get(&follow_url).bearer_auth(acme_read).send().await.unwrap();
        if response.status() == 200 || Instant::now() > deadline {
            assert_eq!(response.status(), 200, "a place comes back when a response closes");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    up.kill().unwrap();
    up.wait().unwrap();
}
