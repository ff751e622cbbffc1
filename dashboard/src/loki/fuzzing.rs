//! Entry point for the LogQL fuzz target in `fuzz/` (built by `cargo fuzz`, which sets
//! `--cfg fuzzing`; nothing here is in a normal build).

use collector::store::LogRecord;

use super::logql::{self, Query};
use super::pipeline::Pipeline;

/// A query parsed as the API parses it, and its log queries' pipelines run over a few lines
/// of either source (JSON, nested and not; logfmt; plain; empty): an `Err` is fine, a panic or
/// a stack overflow is a bug.
pub fn query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(query) = logql::parse(text) else { return };
    let logs = match &query {
        Query::Log(expr) => vec![expr],
        Query::Metric(expr) => expr.logs(),
    };
    let bodies = [
        r#"{"level":"error","status":503,"http":{"path":"/a","ms":1.5},"tags":[1,2],"n":null}"#,
        r#"level=info msg="a \"quoted\" value" bytes=2KiB dur=1.5s flag ="#,
        "plain line with <html> & ünïcode",
        "",
    ];
    for expr in logs {
        let pipeline = Pipeline::new(expr);
        for (i, body) in bodies.iter().enumerate() {
            let record = LogRecord {
                ts_ns: i as i64,
                severity_number: [0, 9, 13, 17][i],
                severity_text: ["", "INFO", "WARN", "ERROR"][i].into(),
                body: (*body).into(),
                attributes: r#"{"faas.name":"f","faas.instance":"exec","log.iostream":"stderr","faas.invocation_id":"i","order.id":"o"}"#.into(),
                resource: r#"{"service.name":"s","service.namespace":"t"}"#.into(),
                trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
                span_id: None,
                metered: i % 2 == 0,
                record_hash: i.to_string(),
            };
            let _ = pipeline.run(record);
        }
    }
}
