//! Reading the log records of functions: what the platform produced from a function's output
//! (metered records, attributed by the gateway), newest or after a cursor, for the gateway's
//! `/system/logs` and `sfaas logs`.

use super::{Bind, Pool, StoreError, TelemetryStore, rows};
use contract::semconv;

/// Most records one read returns.
pub const MAX_LOG_READ: usize = 10_000;

/// Which of a tenant's function log records to read.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub tenant: String,
    /// The function's name (`faas.name`); `None`: every function's.
    pub function: Option<String>,
    /// One invocation's: its own id (`faas.invocation_id`) or its caller's `X-Call-Id`
    /// (`sfaas.call_id`).
    pub invocation: Option<String>,
    /// One trace's (its invocations' lines).
    pub trace_id: Option<String>,
    /// Lines that contain this text.
    pub contains: Option<String>,
    /// Lines of this severity (`ERROR`, `WARN`, …).
    pub severity: Option<String>,
    /// Records at or after this time (ns).
    pub since_ns: i64,
    /// Records that arrived after this cursor (a previous read's last), oldest first; without
    /// it the newest `limit`, in time order.
    pub after: Option<LogCursor>,
    pub limit: usize,
}

/// Where a read of arriving records stopped: (arrival ms, record hash) of its last record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogCursor {
    pub received_ms: i64,
    pub record_hash: String,
}

/// A function's log record as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionLog {
    pub ts_ns: i64,
    pub severity_text: String,
    pub body: String,
    /// The record's attributes (JSON object).
    pub attributes: String,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    pub cursor: LogCursor,
}

impl TelemetryStore {
    /// A tenant's function log records as `query` asks (at most [`MAX_LOG_READ`]).
    pub async fn function_logs(&self, query: &LogQuery) -> Result<Vec<FunctionLog>, StoreError> {
        let attribute = |key: &str| match &self.pool {
            Pool::Sqlite(_) => format!("json_extract(attributes, '$.\"{key}\"')"),
            Pool::Postgres(_) => format!("(attributes::jsonb ->> '{key}')"),
        };
        let mut text = String::from(
            "SELECT ts_ns, severity_text, body, attributes, trace_id, span_id, received_ms, record_hash FROM logs \
             WHERE tenant = ? AND metered = 1 AND ts_ns >= ?",
        );
        let mut binds = vec![Bind::Str(&query.tenant), Bind::Int(query.since_ns)];
        if let Some(function) = &query.function {
            text.push_str(&format!(" AND {} = ?", attribute(semconv::FAAS_NAME)));
            binds.push(Bind::Str(function));
        }
        if let Some(invocation) = &query.invocation {
            let (own, call) = (attribute(semconv::FAAS_INVOCATION_ID), attribute(semconv::SFAAS_CALL_ID));
            text.push_str(&format!(" AND ({own} = ? OR {call} = ?)"));
            binds.extend([Bind::Str(invocation), Bind::Str(invocation)]);
        }
        if let Some(trace_id) = &query.trace_id {
            text.push_str(" AND trace_id = ?");
            binds.push(Bind::Str(trace_id));
        }
        if let Some(contains) = query.contains.as_deref().filter(|c| !c.is_empty()) {
            text.push_str(match &self.pool {
                Pool::Sqlite(_) => " AND instr(body, ?) > 0",
                Pool::Postgres(_) => " AND strpos(body, ?) > 0",
            });
            binds.push(Bind::Str(contains));
        }
        if let Some(severity) = &query.severity {
            text.push_str(" AND severity_text = ?");
            binds.push(Bind::Str(severity));
        }
        let limit = i64::try_from(query.limit.min(MAX_LOG_READ)).unwrap_or(0);
        match &query.after {
            Some(after) => {
                text.push_str(
                    " AND (received_ms > ? OR (received_ms = ? AND record_hash > ?)) \
                     ORDER BY received_ms, record_hash LIMIT ?",
                );
                binds.extend([
                    Bind::Int(after.received_ms),
                    Bind::Int(after.received_ms),
                    Bind::Str(&after.record_hash),
                    Bind::Int(limit),
                ]);
            }
            None => {
                text.push_str(" ORDER BY ts_ns DESC, received_ms DESC, record_hash DESC LIMIT ?");
                binds.push(Bind::Int(limit));
            }
        }
        let mut logs = rows!(&self.pool, &text, &binds, |row| FunctionLog {
            ts_ns: row.try_get(0)?,
            severity_text: row.try_get(1)?,
            body: row.try_get(2)?,
            attributes: row.try_get(3)?,
            trace_id: row.try_get(4)?,
            span_id: row.try_get(5)?,
            cursor: LogCursor { received_ms: row.try_get(6)?, record_hash: row.try_get(7)? },
        });
        logs.sort_by(|a, b| (a.ts_ns, &a.cursor).cmp(&(b.ts_ns, &b.cursor)));
        Ok(logs)
    }
}
