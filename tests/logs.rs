//! Function logs end to end through the `sfaas` binary: each line an exec function writes to
//! stderr reaches the collector as a log record of its tenant (exported by the gateway with
//! the meter token), tied to the invocation, and is read back by `sfaas logs` (plain, by
//! invocation, and followed) and OpenFaaS's `GET /system/logs`; another tenant reads none.
//! Grafana's Loki API reads them and the tenant's own SDK logs; the bill counts their bytes.

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

    // A chatty function (a write a line, read from a busy stream at a pace, on a thread of its
    // own): every line within the tenant's burst arrives, in order, and its answer is whole.
    let chatter = "import sys\nfor i in range(8000):\n    sys.stderr.write('line %d\\n' % i)\nprint('done')";
    std::fs::write(functions.join("chatter.py"), chatter).unwrap();
    let spec = serde_json::json!({"service": "chatter", "kind": "exec", "workdir": workdir.to_string(),
                                  "envProcess": "python3 -u chatter.py"});
    let deployed = http.post(format!("{gateway}/system/functions")).bearer_auth(acme_ingest).json(&spec).send();
    deployed.await.unwrap().error_for_status().unwrap();
    let response = http.post(format!("{gateway}/function/chatter")).bearer_auth(acme_ingest).send().await.unwrap();
    assert_eq!((response.status().as_u16(), response.text().await.unwrap().trim()), (200, "done"));
    let lines = logs_until(data, &["logs", "chatter", "--tail", "9000", "--token", acme_read], 8000);
    assert_eq!(lines.len(), 8000);
    for (i, line) in lines.iter().enumerate() {
        assert!(line.ends_with(&format!("WARN: line {i}")), "line {i}: {line}");
    }

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

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Grafana's Loki datasource reads a tenant's function lines and what its own OpenTelemetry
/// SDK (Python's, over OTLP/HTTP) sent, by the same LogQL; the invocation's bill counts the
/// bytes of its lines (`log_bytes`) where the plan prices them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loki_reads_function_and_sdk_logs_and_the_bill_counts_log_bytes() {
    if testkit::require_program("python3").is_none() {
        return;
    }
    let import = "import opentelemetry.exporter.otlp.proto.http._log_exporter, opentelemetry.sdk._logs";
    let packages =
        ["opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http", "opentelemetry-exporter-otlp-proto-grpc"];
    let Some(python) = testkit::python_venv("otlp-python", import, &packages) else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = &dir.path().join("data");
    let functions = dir.path().join("functions");
    std::fs::create_dir_all(&functions).unwrap();
    let (mut up, addresses) = common::up(&[], data);
    let gateway = format!("http://{}", addresses["gateway"].as_str().unwrap());
    let ui = format!("http://{}", addresses["ui"].as_str().unwrap());
    let card = dir.path().join("plans.yml");
    std::fs::write(
        &card,
        "default_plan: chatty\nplans:\n  chatty:\n    currency: EUR\n    prices:\n      \
         invocations: {unit_price: \"0\"}\n      log_bytes: {unit: GB, unit_price: \"500\"}\n",
    )
    .unwrap();
    ok(data, &["plan", "apply", "-f", card.to_str().unwrap()], "");
    let acme: Value = serde_json::from_str(&ok(data, &["tenant", "create", "acme"], "")).unwrap();
    let globex: Value = serde_json::from_str(&ok(data, &["tenant", "create", "globex"], "")).unwrap();
    let (acme_ingest, acme_read) = (acme["ingest_token"].as_str().unwrap(), acme["read_token"].as_str().unwrap());
    let globex_read = globex["read_token"].as_str().unwrap();
    std::fs::write(functions.join("talker.py"), TALKER).unwrap();
    let stack = dir.path().join("stack.yml");
    let yaml = format!(
        "functions:\n  talker:\n    kind: exec\n    fprocess: python3 talker.py\n    workdir: {}\n",
        functions.display()
    );
    std::fs::write(&stack, yaml).unwrap();
    ok(data, &["deploy", "-f", stack.to_str().unwrap(), "--token", acme_ingest], "");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = http
        .post(format!("{gateway}/function/talker"))
        .bearer_auth(acme_ingest)
        .header("X-Call-Id", "call-loki")
        .body("world")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // The tenant's own SDK logs, sent to the collector with its ingest token.
    let endpoint = format!("http://{}/v1/logs", addresses["otlp_http"].as_str().unwrap());
    let output = tokio::task::block_in_place(|| {
        std::process::Command::new(&python)
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/otlp_logs.py"))
            .args([endpoint.as_str(), acme_ingest, "acme"])
            .output()
            .unwrap()
    });
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let sdk_trace = String::from_utf8(output.stdout).unwrap().trim().to_string();

    // Loki's API as Grafana calls it (categorized labels), until the lines are there.
    let loki = |query: &str, token: &str| {
        let url = format!("{ui}/loki/api/v1/query_range?query={}&limit=100&direction=forward&since=1h", encode(query));
        let request = http.get(url).bearer_auth(token).header("X-Loki-Response-Encoding-Flags", "categorize-labels");
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let answer: Value = response.json().await.unwrap();
            let mut entries = Vec::new();
            for stream in answer["data"]["result"].as_array().unwrap() {
                for value in stream["values"].as_array().unwrap() {
                    let ts: i64 = value[0].as_str().unwrap().parse().unwrap();
                    entries.push((
                        ts,
                        stream["stream"].clone(),
                        value[1].as_str().unwrap().to_string(),
                        value[2].clone(),
                    ));
                }
            }
            // Streams come by their labels; their lines in time order across them.
            entries.sort_by_key(|entry| entry.0);
            entries.into_iter().map(|(_, stream, line, metadata)| (stream, line, metadata)).collect::<Vec<_>>()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (function_lines, sdk_lines) = loop {
        let function_lines = loki(r#"{function="talker"}"#, acme_read).await;
        let sdk_lines = loki(r#"{source="otlp", service_name="py-shop"}"#, acme_read).await;
        if (function_lines.len() >= 3 && sdk_lines.len() >= 2) || Instant::now() > deadline {
            break (function_lines, sdk_lines);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(function_lines.len(), 3, "{function_lines:#?}");
    let (stream, line, metadata) = &function_lines[0];
    assert_eq!(
        (stream["function"].as_str(), stream["stream"].as_str(), stream["level"].as_str()),
        (Some("talker"), Some("stderr"), Some("warn"))
    );
    assert_eq!(line, "first line for world");
    assert_eq!(metadata["structuredMetadata"]["call_id"], "call-loki");
    let invocation_id = metadata["structuredMetadata"]["invocation_id"].as_str().unwrap().to_string();
    assert_eq!(
        metadata["structuredMetadata"]["trace_id"].as_str().map(str::len),
        Some(32),
        "for the link to the trace"
    );
    assert_eq!(function_lines[1].0["level"], "error");
    // The SDK's records: their service, level, attributes and trace id.
    assert_eq!(sdk_lines.len(), 2, "{sdk_lines:#?}");
    assert_eq!((sdk_lines[0].1.as_str(), sdk_lines[0].0["level"].as_str()), ("order placed", Some("info")));
    assert_eq!(sdk_lines[0].2["structuredMetadata"]["order_id"], "o-1");
    assert_eq!((sdk_lines[1].1.as_str(), sdk_lines[1].0["level"].as_str()), ("payment failed for o-1", Some("error")));
    assert_eq!(sdk_lines[1].2["structuredMetadata"]["trace_id"], sdk_trace.as_str());
    // The same queries' filters and metrics over both sources.
    assert_eq!(loki(r#"{level="error"} |= "o-1""#, acme_read).await.len(), 1);
    assert_eq!(loki(r#"{source=~"function|otlp"} | order_id="o-1""#, acme_read).await.len(), 1);
    let metric =
        format!("{ui}/loki/api/v1/query?query={}", encode(r#"sum by (source) (count_over_time({source=~".+"}[1h]))"#));
    let answer: Value = http.get(&metric).bearer_auth(acme_read).send().await.unwrap().json().await.unwrap();
    let counts: Vec<(String, String)> = answer["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["metric"]["source"].as_str().unwrap().to_string(), s["value"][1].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(counts, [("function".to_string(), "3".to_string()), ("otlp".to_string(), "2".to_string())]);
    // Another tenant reads none of them.
    assert!(loki(r#"{source=~".+"}"#, globex_read).await.is_empty());
    let answer: Value = http.get(&metric).bearer_auth(globex_read).send().await.unwrap().json().await.unwrap();
    assert_eq!(answer["data"]["result"], serde_json::json!([]));

    // The bill: the invocation's usage record carries the bytes of its three lines (the third
    // cut at 4 096 bytes), and the invoice prices them.
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let record = loop {
        ok(data, &["bill", "run"], "");
        let usage: Value = http
            .get(format!("{ui}/billing/usage/acme?by=invocation"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let records = usage["records"].as_array().cloned().unwrap_or_default();
        if let Some(record) = records.into_iter().find(|r| r["usage_id"] == invocation_id.as_str()) {
            break record;
        }
        assert!(Instant::now() < deadline, "the invocation was never billed: {usage}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(record["log_bytes"], 20 + 28 + 4096, "{record}");
    assert_eq!(record["cost"], "0.002072", "4 144 bytes at 500 EUR a GB: {record}");
    let invoice: Value = serde_json::from_str(&ok(data, &["bill", "show", "--tenant", "acme"], "")).unwrap();
    let line = invoice["lines"].as_array().unwrap().iter().find(|l| l["metric"] == "log_bytes").cloned();
    let line = line.unwrap_or_else(|| panic!("no log_bytes line: {invoice}"));
    assert_eq!((line["quantity"].as_str(), line["unit"].as_str()), (Some("0.000004144"), Some("GB")), "{invoice}");
    assert_eq!(line["amount_exact"], "0.002072", "{invoice}");

    up.kill().unwrap();
    up.wait().unwrap();
}
