//! Loki's HTTP API at the dashboard address as Grafana's Loki datasource uses it, on SQLite and
//! on a real PostgreSQL the test starts itself:
//! - Grafana's requests, replayed from `fixtures/grafana-loki-requests.txt` (derived from
//!   Grafana's source; see the file), under both URLs an operator may give the datasource, with
//!   the answer shapes Grafana's decoder requires;
//! - a LogQL table (selectors, line filters, parsers, label filters, `line_format`, metric
//!   queries) over a known set of lines, with the answers worked out by hand;
//! - limits and errors; tenant isolation in every endpoint.

use std::sync::Arc;

use billing::Billing;
use collector::model::{Batch, LogRow};
use collector::store::TelemetryStore;
use dashboard::DashboardState;
use serde_json::Value;
use testkit::backends;

use crate::jaeger::Tokens;
use crate::prometheus::encode;

const ACME: &str = "acme-read";
const GLOBEX: &str = "globex-read";

fn ns(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_nanos_opt().unwrap()
}

/// `12:01:30` on 2026-10-10, in ns.
fn at(clock: &str) -> i64 {
    ns(&format!("2026-10-10T{clock}Z"))
}

struct Line {
    tenant: &'static str,
    at: &'static str,
    /// A function's (metered) line: the function, its stream; else the tenant's SDK record.
    function: Option<(&'static str, &'static str)>,
    severity: (i64, &'static str),
    body: &'static str,
    /// An SDK record's attributes (JSON).
    attributes: &'static str,
}

/// The known set of lines. Numbers in comments are the lines' numbers in the table below.
const LINES: &[Line] = &[
    // 1
    Line {
        tenant: "acme",
        at: "12:00:10",
        function: Some(("resize", "stderr")),
        severity: (13, "WARN"),
        body: r#"{"level":"error","status":503,"path":"/api/resize","latency":"250ms"}"#,
        attributes: "",
    },
    // 2
    Line {
        tenant: "acme",
        at: "12:00:20",
        function: Some(("resize", "stdout")),
        severity: (9, "INFO"),
        body: r#"level=info msg="resized image" bytes=2048 dur=1.5s"#,
        attributes: "",
    },
    // 3
    Line {
        tenant: "acme",
        at: "12:01:00",
        function: Some(("resize", "stderr")),
        severity: (17, "ERROR"),
        body: "ERROR: timeout talking to s3",
        attributes: "",
    },
    // 4
    Line {
        tenant: "acme",
        at: "12:01:30",
        function: Some(("resize", "stderr")),
        severity: (13, "WARN"),
        body: r#"{"level":"warn","status":200,"path":"/api/thumb","latency":"12ms"}"#,
        attributes: "",
    },
    // 5
    Line {
        tenant: "acme",
        at: "12:02:00",
        function: Some(("resize", "stderr")),
        severity: (13, "WARN"),
        body: "plain line with <html> & stuff",
        attributes: "",
    },
    // 6
    Line {
        tenant: "acme",
        at: "12:00:30",
        function: Some(("thumb", "stdout")),
        severity: (9, "INFO"),
        body: r#"level=debug msg="cache hit" bytes=10"#,
        attributes: "",
    },
    // 7
    Line {
        tenant: "acme",
        at: "12:03:00",
        function: Some(("thumb", "stdout")),
        severity: (9, "INFO"),
        body: r#"level=error msg="cache miss" bytes=0"#,
        attributes: "",
    },
    // 8
    Line {
        tenant: "acme",
        at: "12:00:45",
        function: None,
        severity: (9, "INFO"),
        body: "order placed",
        attributes: r#"{"order.id":"o-1"}"#,
    },
    // 9
    Line {
        tenant: "acme",
        at: "12:02:30",
        function: None,
        severity: (17, "ERROR"),
        body: "payment failed",
        attributes: r#"{"order.id":"o-2"}"#,
    },
    // 10: the tenant's own record claiming to be a function's line
    Line {
        tenant: "acme",
        at: "12:01:10",
        function: None,
        severity: (13, "WARN"),
        body: "forged line",
        attributes: r#"{"faas.name":"resize","faas.instance":"exec"}"#,
    },
    // 11: another tenant's
    Line {
        tenant: "globex",
        at: "12:01:00",
        function: Some(("resize", "stderr")),
        severity: (13, "WARN"),
        body: "globex secret",
        attributes: "",
    },
];

fn rows() -> Vec<LogRow> {
    LINES
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let (attributes, resource) = match line.function {
                Some((function, stream)) => (
                    serde_json::json!({
                        "faas.name": function,
                        "faas.instance": "exec",
                        "log.iostream": stream,
                        "faas.invocation_id": format!("inv-{}", i + 1),
                    })
                    .to_string(),
                    r#"{"service.name":"sfaas-core"}"#.to_string(),
                ),
                None => {
                    (line.attributes.to_string(), r#"{"service.name":"shop","service.namespace":"acme"}"#.to_string())
                }
            };
            LogRow {
                tenant: line.tenant.into(),
                record_hash: format!("hash-{i:02}"),
                ts_ns: at(line.at),
                severity_number: line.severity.0,
                severity_text: line.severity.1.into(),
                body: line.body.into(),
                attributes,
                resource,
                trace_id: Some(format!("{:032x}", i + 1)),
                span_id: Some(format!("{:016x}", i + 1)),
                metered: line.function.is_some(),
            }
        })
        .collect()
}

struct Server {
    base: String,
    client: reqwest::Client,
    store: TelemetryStore,
}

async fn start(backend: &testkit::Backend) -> Server {
    let store = TelemetryStore::open_with_blocks(&backend.url(), &backend.blocks()).await.unwrap();
    store.write(&Batch { logs: rows(), ..Batch::default() }).await.unwrap();
    // A tenant with 501 invocations of one function, each line its own series.
    let flood: Vec<LogRow> = (0..501)
        .map(|i| LogRow {
            tenant: "flood".into(),
            record_hash: format!("flood-{i}"),
            ts_ns: at("12:30:00") + i,
            severity_number: 13,
            severity_text: "WARN".into(),
            body: "x".into(),
            attributes: serde_json::json!({"faas.name": "f", "faas.invocation_id": format!("f-{i}")}).to_string(),
            resource: "{}".into(),
            trace_id: None,
            span_id: None,
            metered: true,
        })
        .collect();
    store.write(&Batch { logs: flood, ..Batch::default() }).await.unwrap();
    let billing = Arc::new(Billing::open(&store).await.unwrap());
    let state = DashboardState { store: store.clone(), billing, resolver: Arc::new(Tokens), settle: None };
    let app = dashboard::loki::router(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server { base: format!("http://{addr}"), client: reqwest::Client::new(), store }
}

impl Server {
    /// GET `path` with `headers` (name, value); the status and the body's text.
    async fn get(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> (u16, String) {
        let mut request = self.client.get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn json(&self, path: &str, token: &str) -> Value {
        let (status, body) = self.get(path, Some(token), &[]).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// A log query's lines, in the answer's order across streams (by time in the direction).
    async fn lines(&self, query: &str, extra: &str) -> Vec<String> {
        let path = format!(
            "/loki/api/v1/query_range?query={}&start={}&end={}{extra}",
            encode(query),
            at("12:00:00"),
            at("13:00:00")
        );
        let answer = self.json(&path, ACME).await;
        assert_eq!(answer["data"]["resultType"], "streams", "{query}: {answer}");
        let mut entries: Vec<(i64, String)> = Vec::new();
        for stream in answer["data"]["result"].as_array().unwrap() {
            for value in stream["values"].as_array().unwrap() {
                entries.push((value[0].as_str().unwrap().parse().unwrap(), value[1].as_str().unwrap().to_string()));
            }
        }
        entries.sort_by_key(|(t, _)| *t);
        if !extra.contains("direction=forward") {
            entries.reverse();
        }
        entries.into_iter().map(|(_, line)| line).collect()
    }

    /// An instant metric query's samples: (labels as `k=v,…`, value).
    async fn instant(&self, query: &str, time: &str, token: &str) -> Vec<(String, f64)> {
        let path = format!("/loki/api/v1/query?query={}&time={}", encode(query), at(time));
        let answer = self.json(&path, token).await;
        assert_eq!(answer["data"]["resultType"], "vector", "{query}: {answer}");
        answer["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|sample| {
                let labels: Vec<String> = sample["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                    .collect();
                (labels.join(","), sample["value"][1].as_str().unwrap().parse().unwrap())
            })
            .collect()
    }

    async fn error(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> (u16, String) {
        let (status, body) = self.get(path, token, headers).await;
        assert_ne!(status, 200, "{path}: {body}");
        (status, body)
    }
}

/// An instant query's expected samples: (labels as `k=v,…`, value).
type Samples<'a> = &'a [(&'a str, f64)];

/// The body of line `n` of [`LINES`].
fn line(n: usize) -> String {
    LINES[n - 1].body.to_string()
}

fn lines(numbers: &[usize]) -> Vec<String> {
    numbers.iter().map(|n| line(*n)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logql_table_over_known_lines() {
    for backend in backends() {
        let server = start(&backend).await;
        // The same answers from the table the lines are written to, and from the blocks they
        // are sealed into.
        logql_table(&server, &format!("{}, in the table", backend.name())).await;
        assert!(server.store.seal_logs(true).await.unwrap() > 0);
        logql_table(&server, &format!("{}, in blocks", backend.name())).await;
    }
}

async fn logql_table(server: &Server, name: &str) {
    // Log queries: (query, extra parameters, the lines by number, newest first unless forward).
    let table: &[(&str, &str, &[usize])] = &[
        (r#"{function="resize"}"#, "", &[5, 4, 3, 2, 1]),
        (r#"{function="resize"}"#, "&limit=2", &[5, 4]),
        (r#"{function="thumb"}"#, "&direction=forward", &[6, 7]),
        (r#"{function=~"resize|thumb", stream="stdout"}"#, "", &[7, 6, 2]),
        (r#"{source="function", function!="resize"}"#, "", &[7, 6]),
        (r#"{function="resize"} |= "timeout""#, "", &[3]),
        (r#"{function="resize"} != "level""#, "", &[5, 3]),
        (r#"{function="resize"} |~ "(?i)API/(resize|thumb)""#, "", &[4, 1]),
        (r#"{function="resize"} !~ "^[{]""#, "", &[5, 3, 2]),
        (r#"{function="resize"} |= "timeout" or "html""#, "", &[5, 3]),
        (r#"{function="resize"} | json | __error__="" | status >= 500"#, "", &[1]),
        (r#"{function="resize"} | json | __error__="" | latency > 100ms"#, "", &[1]),
        (r#"{function="resize"} | json | __error__="" | level_extracted="warn" or status == 503"#, "", &[4, 1]),
        // After a parser's error only text filters decide (Loki's rule).
        (r#"{function="resize"} | json | status == 503"#, "", &[5, 3, 2, 1]),
        (r#"{source="function"} | logfmt | level_extracted="error""#, "", &[7]),
        (r#"{function="thumb"} | logfmt | bytes > 5"#, "", &[6]),
        (r#"{function="resize"} | logfmt | dur >= 1s and msg=~"resized.*""#, "", &[2]),
        (r#"{level="error"}"#, "", &[9, 3]),
        (r#"{service_name="shop"}"#, "", &[9, 10, 8]),
        (r#"{source="otlp"} | order_id="o-2""#, "", &[9]),
        (r#"{function="resize"} | invocation_id="inv-3""#, "", &[3]),
        (r#"{source="function"} | trace_id="00000000000000000000000000000006""#, "", &[6]),
    ];
    for (query, extra, want) in table {
        assert_eq!(server.lines(query, extra).await, lines(want), "{name}: {query} {extra}");
    }
    // The forged record is the tenant's own, not a function's line.
    assert!(!server.lines(r#"{function="resize"} |= "forged""#, "").await.contains(&line(10)));
    // line_format, drop and keep.
    assert_eq!(
        server.lines(r#"{function="resize"} | json | __error__="" | line_format "{{.status}} {{ .path }}""#, "").await,
        ["200 /api/thumb", "503 /api/resize"],
        "{name}"
    );
    assert_eq!(
        server.lines(r#"{function="thumb"} | logfmt | line_format "{{.msg}}: {{__line__}}" |= "hit""#, "").await,
        [format!("cache hit: {}", line(6))],
        "{name}: line filters after line_format see the new line"
    );
    let kept = server
        .json(
            &format!(
                "/loki/api/v1/query_range?query={}&start={}&end={}",
                encode(r#"{function="thumb"} | logfmt | keep function, msg"#),
                at("12:00:00"),
                at("13:00:00")
            ),
            ACME,
        )
        .await;
    let streams: Vec<&Value> = kept["data"]["result"].as_array().unwrap().iter().map(|s| &s["stream"]).collect();
    assert_eq!(
        streams,
        [
            &serde_json::json!({"function": "thumb", "msg": "cache hit"}),
            &serde_json::json!({"function": "thumb", "msg": "cache miss"})
        ],
        "{name}"
    );

    // Metric queries, instant: windows (t - range, t].
    let table: &[(&str, &str, Samples)] = &[
        (r#"sum(count_over_time({function="resize"}[1m]))"#, "12:01:00", &[("", 3.0)]),
        (r#"sum(count_over_time({function="resize"}[1m]))"#, "12:01:30", &[("", 2.0)]),
        (r#"sum(rate({function="resize"}[1m]))"#, "12:01:00", &[("", 0.05)]),
        (
            r#"sum by (level) (count_over_time({source="function"}[1h]))"#,
            "13:00:00",
            &[("level=error", 1.0), ("level=info", 3.0), ("level=warn", 3.0)],
        ),
        (
            r#"count by (function) (count_over_time({source="function"}[1h]))"#,
            "13:00:00",
            &[("function=resize", 5.0), ("function=thumb", 2.0)],
        ),
        (r#"max(sum by (function) (count_over_time({source="function"}[1h])))"#, "13:00:00", &[("", 5.0)]),
        (
            r#"sum(count_over_time({function="resize"} | json | drop __error__, __error_details__ [1h]))"#,
            "13:00:00",
            &[("", 5.0)],
        ),
        (
            r#"sum by (level_extracted) (count_over_time({function="resize"} | json | __error__="" [1h]))"#,
            "13:00:00",
            &[("level_extracted=error", 1.0), ("level_extracted=warn", 1.0)],
        ),
        (r#"sum(count_over_time({function="resize"}[1h])) * 2 + 1"#, "13:00:00", &[("", 11.0)]),
        ("vector(1)+vector(1)", "13:00:00", &[("", 2.0)]),
    ];
    for (query, time, want) in table {
        let want: Vec<(String, f64)> = want.iter().map(|(l, v)| (l.to_string(), *v)).collect();
        assert_eq!(server.instant(query, time, ACME).await, want, "{name}: {query} at {time}");
    }
    // Counted by stream (a `sum` by stream labels over lines no parser touched: no record is
    // built) and counted line by line (a filter that keeps every line, which only the latter
    // runs): the same answers.
    for query in [
        r#"sum by (level) (count_over_time({source="function"}[1h]))"#,
        r#"sum by (service_name, level) (count_over_time({source=~".+"} |= "e" [1h]))"#,
        r#"sum by (level) (count_over_time({source="function"} | drop __error__ [1h]))"#,
        r#"sum by (function, stream) (bytes_over_time({source="function"} |= "a" [1h]))"#,
        r#"sum(count_over_time({level="error"}[1h]))"#,
        r#"sum by (service_namespace) (rate({source="otlp"}[1h]))"#,
        r#"sum by (function) (count_over_time({source=~".+"}[1h]))"#,
        r#"sum by (source) (sum by (source, level) (count_over_time({service_name=~"s.*|r.*"}[1h])))"#,
    ] {
        let by_streams = server.instant(query, "13:00:00", ACME).await;
        assert!(!by_streams.is_empty(), "{name}: {query}");
        let line_by_line = query.replacen('}', r#"} != "in no line""#, 1);
        assert_eq!(server.instant(&line_by_line, "13:00:00", ACME).await, by_streams, "{name}: {query}");
    }
    let bytes = |numbers: &[usize]| numbers.iter().map(|n| line(*n).len() as f64).sum::<f64>();
    assert_eq!(
        server.instant(r#"sum by (function) (bytes_over_time({source="function"}[1h]))"#, "13:00:00", ACME).await,
        [("function=resize".to_string(), bytes(&[1, 2, 3, 4, 5])), ("function=thumb".to_string(), bytes(&[6, 7]))],
        "{name}"
    );
    assert_eq!(
        server.instant(r#"sum(bytes_rate({function="thumb"}[1h]))"#, "13:00:00", ACME).await,
        [(String::new(), bytes(&[6, 7]) / 3600.0)],
        "{name}"
    );

    // A range query: steps at 12:00 … 12:03; steps with no lines have no point.
    let path = format!(
        "/loki/api/v1/query_range?query={}&start={}&end={}&step=60",
        encode(r#"sum(count_over_time({function="resize"}[1m]))"#),
        at("12:00:00"),
        at("12:03:00")
    );
    let answer = server.json(&path, ACME).await;
    assert_eq!(answer["data"]["resultType"], "matrix");
    let values = &answer["data"]["result"][0]["values"];
    let t = |clock: &str| serde_json::json!(at(clock) / 1_000_000_000);
    assert_eq!(values, &serde_json::json!([[t("12:01:00"), "3"], [t("12:02:00"), "2"]]), "{name}");

    // A metric query over lines that a parser could not read fails, as Loki's.
    let (status, body) = server
        .error(
            &format!(
                "/loki/api/v1/query?query={}&time={}",
                encode(r#"sum(count_over_time({function="resize"} | json [1h]))"#),
                at("13:00:00")
            ),
            Some(ACME),
            &[],
        )
        .await;
    assert_eq!(status, 400, "{name}");
    assert!(body.contains("pipeline error: 'JSONParserErr'"), "{name}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_errors_are_loki_s() {
    for backend in backends() {
        let server = start(&backend).await;
        let name = backend.name();
        let range = format!("&start={}&end={}", at("12:00:00"), at("13:00:00"));
        for (query, extra, status, want) in [
            (r#"{function=~".*"}"#, "", 400, "empty-compatible value"),
            (
                r#"{function="resize"} |= "x"#,
                "",
                400,
                "parse error at line 1, col 24: syntax error: unterminated string",
            ),
            (r#"{function="resize"} | regexp "(?P<a>.)""#, "", 400, "unsupported LogQL: regexp"),
            (r#"{function="resize"}"#, "&limit=5001", 400, "max entries limit per query exceeded"),
            (r#"{function="resize"}"#, "&direction=sideways", 400, "invalid direction"),
            (r#"sum(rate({function="resize"}[1m]))"#, "&step=0.1", 400, "exceeded maximum resolution of 11000 points"),
            (r#"sum(rate({function="resize"}[1m]))"#, "&step=-5", 400, "zero or negative query resolution step"),
        ] {
            let path = format!("/loki/api/v1/query_range?query={}{range}{extra}", encode(query));
            let (got, body) = server.error(&path, Some(ACME), &[]).await;
            assert_eq!(got, status, "{name}: {query} {extra}: {body}");
            assert!(body.contains(want), "{name}: {query} {extra}: {body}");
        }
        // Times at i64's ends: their distance does not fit an i64, and is refused, not wrapped.
        let path = format!(
            "/loki/api/v1/query_range?query={}&start={}&end={}",
            encode(r#"sum(rate({function="resize"}[1m]))"#),
            i64::MIN + 1,
            i64::MAX
        );
        let (status, body) = server.error(&format!("{path}&step=1"), Some(ACME), &[]).await;
        assert!(status == 400 && body.contains("exceeded maximum resolution"), "{name}: {body}");
        let (status, body) = server.get(&path, Some(ACME), &[]).await;
        assert!(status == 200 && body.contains(r#""resultType":"matrix""#), "{name}: the default step: {body}");
        let huge = format!(
            "/loki/api/v1/query?query={}&time={}",
            encode(r#"sum(count_over_time({function="resize"}[15000w]))"#),
            i64::MAX
        );
        let (status, body) = server.get(&huge, Some(ACME), &[]).await;
        assert!(status == 200 && body.contains(r#""5""#), "{name}: a range of 288 years: {body}");
        // 501 series before the outer sum: refused; summed as the lines come in: answered.
        let flood = Some("admin");
        let scope = [("X-Scope-OrgID", "flood")];
        let path = |query: &str| format!("/loki/api/v1/query?query={}&time={}", encode(query), at("13:00:00"));
        let (status, body) = server.error(&path(r#"count_over_time({function="f"}[1h])"#), flood, &scope).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert!(body.contains("maximum number of series (500)"), "{name}: {body}");
        let (status, body) = server.get(&path(r#"sum(count_over_time({function="f"}[1h]))"#), flood, &scope).await;
        assert_eq!(status, 200, "{name}: {body}");
        assert!(body.contains(r#""501""#), "{name}: {body}");
        let (status, body) = server.get(&path(r#"max(count_over_time({function="f"}[1h]))"#), flood, &scope).await;
        assert_eq!(status, 400, "{name}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_reads_its_own_logs_only() {
    for backend in backends() {
        let server = start(&backend).await;
        own_logs_only(&server, &format!("{}, in the table", backend.name())).await;
        assert!(server.store.seal_logs(true).await.unwrap() > 0);
        own_logs_only(&server, &format!("{}, in blocks", backend.name())).await;
    }
}

async fn own_logs_only(server: &Server, name: &str) {
    let range = format!("start={}&end={}", at("12:00:00"), at("13:00:00"));
    let query = format!("/loki/api/v1/query_range?query={}&{range}", encode(r#"{function="resize"}"#));
    let globex = server.json(&query, GLOBEX).await;
    let text = globex.to_string();
    assert!(text.contains("globex secret") && !text.contains("timeout"), "{name}: {text}");
    let acme = server.json(&query, ACME).await.to_string();
    assert!(!acme.contains("globex secret"), "{name}");
    // Every endpoint: globex's answers name nothing of acme's.
    for path in [
        format!("/loki/api/v1/labels?{range}"),
        format!("/loki/api/v1/label/service_name/values?{range}"),
        format!("/loki/api/v1/series?match[]={}&{range}", encode(r#"{source=~".+"}"#)),
        format!("/loki/api/v1/index/stats?query={}&{range}", encode(r#"{source=~".+"}"#)),
        format!(
            "/loki/api/v1/query?query={}&time={}",
            encode(r#"sum by (function) (count_over_time({source=~".+"}[1h]))"#),
            at("13:00:00")
        ),
    ] {
        let text = server.json(&path, GLOBEX).await.to_string();
        for acme_only in ["thumb", "shop", "order"] {
            assert!(!text.contains(acme_only), "{name}: {path}: {text}");
        }
    }
    let stats =
        server.json(&format!("/loki/api/v1/index/stats?query={}&{range}", encode(r#"{source=~".+"}"#)), GLOBEX).await;
    assert_eq!(stats["entries"], 1, "{name}: {stats}");
    let values = server.json(&format!("/loki/api/v1/label/service_name/values?{range}"), ACME).await;
    assert_eq!(values["data"], serde_json::json!(["resize", "shop", "thumb"]), "{name}");
    // Another tenant's name in X-Scope-OrgID: refused; no token: refused; the admin names one.
    let (status, _) = server.error(&query, Some(ACME), &[("X-Scope-OrgID", "globex")]).await;
    assert_eq!(status, 403, "{name}");
    let (status, _) = server.error(&query, None, &[]).await;
    assert_eq!(status, 401, "{name}");
    let (status, body) = server.error(&query, Some("admin"), &[]).await;
    assert_eq!((status, body.contains("X-Scope-OrgID")), (400, true), "{name}: {body}");
    let (status, body) = server.get(&query, Some("admin"), &[("X-Scope-OrgID", "globex")]).await;
    assert!(status == 200 && body.contains("globex secret") && !body.contains("timeout"), "{name}: {body}");
}

// ---------------------------------------------------------------------------------------------
// Grafana

struct FixtureRequest {
    name: String,
    path: String,
    headers: Vec<(String, String)>,
}

fn grafana_requests() -> Vec<FixtureRequest> {
    let text = include_str!("fixtures/grafana-loki-requests.txt");
    text.split("\n### ")
        .skip(1)
        .map(|block| {
            let mut lines = block.lines();
            let name = lines.next().unwrap().trim().to_string();
            let (method, path) = lines.next().unwrap().split_once(' ').unwrap();
            assert_eq!(method, "GET", "{name}");
            let headers = lines
                .take_while(|line| !line.is_empty())
                .filter_map(|line| line.split_once(": "))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            FixtureRequest { name, path: path.to_string(), headers }
        })
        .collect()
}

/// Checks an answer as Grafana's decoder reads it (`pkg/promlib/converter/prom.go`):
/// `resultType` and `encodingFlags` before `result`; a stream object holds `stream` and
/// `values` only; categorized, every entry has a third element with only `structuredMetadata`
/// and `parsed`.
fn assert_decodable(name: &str, text: &str, categorized: bool) -> Value {
    let answer: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}: {text}"));
    assert_eq!(answer["status"], "success", "{name}: {text}");
    let result_at = text.find(r#""result":"#).unwrap_or_else(|| panic!("{name}: no result: {text}"));
    assert!(text.find(r#""resultType":"#).unwrap() < result_at, "{name}: resultType after result");
    let data = &answer["data"];
    if data["resultType"] == "streams" {
        if categorized {
            let flags = text.find(r#""encodingFlags":["categorize-labels"]"#);
            assert!(flags.is_some_and(|at| at < result_at), "{name}: encodingFlags not before result: {text}");
        }
        for stream in data["result"].as_array().unwrap() {
            let keys: Vec<&String> = stream.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["stream", "values"], "{name}");
            assert!(stream["stream"].as_object().unwrap().values().all(Value::is_string), "{name}");
            for value in stream["values"].as_array().unwrap() {
                let value = value.as_array().unwrap();
                assert_eq!(value.len(), if categorized { 3 } else { 2 }, "{name}: {value:?}");
                assert!(value[0].as_str().unwrap().parse::<i64>().is_ok() && value[1].is_string(), "{name}");
                if categorized {
                    let extra = value[2].as_object().unwrap();
                    assert!(extra.keys().all(|k| k == "structuredMetadata" || k == "parsed"), "{name}: {extra:?}");
                    assert!(extra.values().all(|m| m.as_object().unwrap().values().all(Value::is_string)), "{name}");
                }
            }
        }
    } else {
        for sample in data["result"].as_array().unwrap() {
            assert!(sample["metric"].as_object().unwrap().values().all(Value::is_string), "{name}");
            let points = match data["resultType"].as_str().unwrap() {
                "vector" => vec![sample["value"].clone()],
                "matrix" => sample["values"].as_array().unwrap().clone(),
                other => panic!("{name}: resultType {other}"),
            };
            for point in points {
                assert!(point[0].is_number() && point[1].is_string(), "{name}: {point}");
            }
        }
    }
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_requests_get_what_grafana_decodes() {
    let requests = grafana_requests();
    assert_eq!(requests.len(), 13, "fixture requests");
    for backend in backends() {
        let server = start(&backend).await;
        let name = backend.name();
        // The datasource's URL is the dashboard's address or that address + `/loki`.
        for prefix in ["", "/loki"] {
            for request in &requests {
                let label = format!("{name} {prefix} {}", request.name);
                let mut headers: Vec<(&str, &str)> =
                    request.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                headers.retain(|(k, _)| *k != "User-Agent");
                let (status, text) = server.get(&format!("{prefix}{}", request.path), Some(ACME), &headers).await;
                assert_eq!(status, 200, "{label}: {text}");
                let categorized =
                    headers.iter().any(|(k, v)| *k == "X-Loki-Response-Encoding-Flags" && v.contains("categorize"));
                let answer: Value = if request.path.contains("/query") {
                    assert_decodable(&label, &text, categorized)
                } else {
                    serde_json::from_str(&text).unwrap()
                };
                match request.name.as_str() {
                    "health-check" => {
                        assert_eq!(answer["data"]["result"].as_array().unwrap().len(), 1, "{label}");
                        assert_eq!(answer["data"]["result"][0]["value"][1], "2", "{label}");
                    }
                    "label-names" => {
                        let names = answer["data"].as_array().unwrap();
                        for label_name in ["function", "instance", "level", "service_name", "source", "stream"] {
                            assert!(names.contains(&Value::from(label_name)), "{label}: {answer}");
                        }
                    }
                    "label-names-with-selector" => {
                        assert!(
                            !answer["data"].as_array().unwrap().contains(&Value::from("service_namespace")),
                            "{label}"
                        );
                    }
                    "label-values" => assert_eq!(answer["data"], serde_json::json!(["resize", "thumb"]), "{label}"),
                    "label-values-with-selector" => {
                        assert_eq!(answer["data"], serde_json::json!(["error", "info", "warn"]), "{label}")
                    }
                    "series" => assert_eq!(answer["data"].as_array().unwrap().len(), 3, "{label}: {answer}"),
                    "index-stats" => {
                        assert_eq!(
                            (answer["streams"].as_i64(), answer["entries"].as_i64()),
                            (Some(3), Some(5)),
                            "{label}"
                        )
                    }
                    "explore-logs" => {
                        // `|= "error"`: line 1 (its JSON says error); the stream labels and the
                        // invocation's metadata beside the line, for Grafana's derived fields.
                        let stream = &answer["data"]["result"][0];
                        assert_eq!(stream["stream"]["function"], "resize", "{label}");
                        assert_eq!(stream["values"][0][1], line(1), "{label}");
                        assert_eq!(
                            stream["values"][0][2]["structuredMetadata"]["trace_id"],
                            format!("{:032x}", 1),
                            "{label}"
                        );
                    }
                    "explore-logs-volume" => {
                        assert_eq!(
                            answer["data"]["result"][0]["metric"],
                            serde_json::json!({"level": "warn"}),
                            "{label}"
                        );
                    }
                    "panel-metric-range" => {
                        let functions: Vec<&Value> = answer["data"]["result"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|s| &s["metric"]["function"])
                            .collect();
                        assert_eq!(functions, ["resize", "thumb"], "{label}");
                    }
                    "panel-instant" => assert_eq!(answer["data"]["result"][0]["value"][1], "5", "{label}: {answer}"),
                    "panel-instant-logs" => {
                        // `level` is the stream's (the JSON's is `level_extracted`): line 3, whose
                        // severity is ERROR (and which is no JSON: it carries `__error__`).
                        let result = answer["data"]["result"].as_array().unwrap();
                        assert_eq!(result.len(), 1, "{label}: {answer}");
                        assert_eq!(result[0]["values"][0][1], line(3), "{label}");
                        assert_eq!(result[0]["values"][0][2]["parsed"]["__error__"], "JSONParserErr", "{label}");
                    }
                    _ => {}
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Live tail (Grafana Explore's *Live*: a WebSocket)

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Server {
    async fn tail(&self, query: &str, token: &str) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!(
            "{}/loki/api/v1/tail?query={}&start={}",
            self.base.replace("http://", "ws://"),
            encode(query),
            at("12:00:00")
        );
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert("Authorization", format!("Bearer {token}").parse().unwrap());
        tokio_tungstenite::connect_async(request).await.map(|(socket, _)| socket)
    }
}

/// The lines of the next frame of a tail (within 10 s).
async fn frame(socket: &mut Socket) -> Vec<String> {
    use futures_util::StreamExt;
    let message = tokio::time::timeout(std::time::Duration::from_secs(10), socket.next())
        .await
        .expect("a frame within 10 s")
        .unwrap()
        .unwrap();
    let frame: Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
    assert!(frame["dropped_entries"].is_array(), "{frame}");
    let mut lines: Vec<(String, String)> = Vec::new();
    for stream in frame["streams"].as_array().unwrap() {
        for value in stream["values"].as_array().unwrap() {
            lines.push((value[0].as_str().unwrap().to_string(), value[1].as_str().unwrap().to_string()));
        }
    }
    lines.sort();
    lines.into_iter().map(|(_, line)| line).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_tail_sends_the_lines_then_each_new_one_of_its_tenant() {
    let backend = testkit::Backend::Sqlite(tempfile::tempdir().unwrap());
    let server = start(&backend).await;
    let mut acme = server.tail(r#"{function="resize"}"#, ACME).await.unwrap();
    assert_eq!(frame(&mut acme).await, lines(&[1, 2, 3, 4, 5]), "the lines so far, oldest first");
    let mut globex = server.tail(r#"{function="resize"}"#, GLOBEX).await.unwrap();
    assert_eq!(frame(&mut globex).await, ["globex secret"], "another tenant's tail: its own lines");
    // A new line (stored late: dated before the newest one sent) comes in the next frame, once.
    let mut row = rows().remove(0);
    row.record_hash = "late".into();
    row.ts_ns = at("12:01:59");
    row.body = "a new line".into();
    server.store.write(&Batch { logs: vec![row], ..Batch::default() }).await.unwrap();
    assert_eq!(frame(&mut acme).await, ["a new line"]);
    // At most 4 tails a tenant.
    let _more = [
        server.tail(r#"{function="thumb"}"#, ACME).await.unwrap(),
        server.tail(r#"{function="thumb"}"#, ACME).await.unwrap(),
        server.tail(r#"{function="thumb"}"#, ACME).await.unwrap(),
    ];
    match server.tail(r#"{function="thumb"}"#, ACME).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("a fifth tail: {:?}", other.map(|_| ())),
    }
    // A metric query or no token: refused before the upgrade.
    assert!(server.tail(r#"count_over_time({function="resize"}[1m])"#, ACME).await.is_err());
    assert!(server.tail(r#"{function="resize"}"#, "nobody").await.is_err());
}
