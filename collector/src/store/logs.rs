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

/// A scan of a tenant's log records (function logs and its own) over a time range, a batch at
/// a time, for LogQL: what can be decided in SQL is (metered or not, a function, literal
/// texts), the rest is decided by the reader.
#[derive(Debug, Clone, Default)]
pub struct LogScan {
    pub tenant: String,
    /// Records at or after this time (ns).
    pub start_ns: i64,
    /// Records before this time (ns).
    pub end_ns: i64,
    /// Newest first.
    pub backward: bool,
    /// Records past this one in the scan's order (a previous batch's last: time, hash).
    pub after: Option<(i64, String)>,
    /// Only the platform's records of functions (`true`) or only the tenant's own (`false`).
    pub metered: Option<bool>,
    /// Only this function's (`faas.name`).
    pub function: Option<String>,
    /// Only records whose body contains each of these.
    pub contains: Vec<String>,
    pub limit: usize,
}

/// A log record as LogQL reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    pub ts_ns: i64,
    pub severity_number: i64,
    pub severity_text: String,
    pub body: String,
    /// The record's attributes (JSON object).
    pub attributes: String,
    /// Its resource's attributes (JSON object).
    pub resource: String,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
    pub metered: bool,
    pub record_hash: String,
}

impl TelemetryStore {
    /// One batch of [`LogScan`] (at most [`MAX_LOG_READ`] records), in the scan's order.
    pub async fn scan_logs(&self, scan: &LogScan) -> Result<Vec<LogRecord>, StoreError> {
        // After a cursor, the range starts (or ends) at its time, so that each batch is a range
        // of the time index rather than a walk from the range's start.
        let (mut start_ns, mut end_ns) = (scan.start_ns, scan.end_ns);
        match &scan.after {
            Some((ts_ns, _)) if scan.backward => end_ns = end_ns.min(ts_ns.saturating_add(1)),
            Some((ts_ns, _)) => start_ns = start_ns.max(*ts_ns),
            None => {}
        }
        let mut text = String::from(
            "SELECT ts_ns, severity_number, severity_text, body, attributes, resource, trace_id, span_id, metered, \
             record_hash FROM logs WHERE tenant = ? AND ts_ns >= ? AND ts_ns < ?",
        );
        let mut binds = vec![Bind::Str(&scan.tenant), Bind::Int(start_ns), Bind::Int(end_ns)];
        if let Some(metered) = scan.metered {
            text.push_str(if metered { " AND metered = 1" } else { " AND metered = 0" });
        }
        if let Some(function) = &scan.function {
            text.push_str(match &self.pool {
                Pool::Sqlite(_) => " AND json_extract(attributes, '$.\"faas.name\"') = ?",
                Pool::Postgres(_) => " AND (attributes::jsonb ->> 'faas.name') = ?",
            });
            binds.push(Bind::Str(function));
        }
        for contains in scan.contains.iter().filter(|c| !c.is_empty()) {
            text.push_str(match &self.pool {
                Pool::Sqlite(_) => " AND instr(body, ?) > 0",
                Pool::Postgres(_) => " AND strpos(body, ?) > 0",
            });
            binds.push(Bind::Str(contains));
        }
        let (past, order) = if scan.backward {
            (" AND (ts_ns <> ? OR record_hash < ?)", " ORDER BY ts_ns DESC, record_hash DESC LIMIT ?")
        } else {
            (" AND (ts_ns <> ? OR record_hash > ?)", " ORDER BY ts_ns, record_hash LIMIT ?")
        };
        if let Some((ts_ns, hash)) = &scan.after {
            text.push_str(past);
            binds.extend([Bind::Int(*ts_ns), Bind::Str(hash)]);
        }
        text.push_str(order);
        binds.push(Bind::Int(i64::try_from(scan.limit.min(MAX_LOG_READ)).unwrap_or(0)));
        if let Pool::Sqlite(pool) = &self.pool {
            // SQLite's C API: sqlx hands rows over from its worker thread one at a time, which
            // costs more than SQLite's reading them (a query over millions of lines).
            let mut connection = pool.acquire().await?;
            let read = |db: &crate::sqlite::Connection<'_>| {
                let mut statement = db.prepare(&text)?;
                for (i, bind) in binds.iter().enumerate() {
                    let value = match bind {
                        Bind::Str(s) => crate::sqlite::Value::Text(s),
                        Bind::Int(n) => crate::sqlite::Value::Int(*n),
                    };
                    statement.bind(i as i32 + 1, value)?;
                }
                let text = |statement: &crate::sqlite::Statement<'_>, column| {
                    statement.text(column).map(|t| match std::str::from_utf8(t) {
                        Ok(text) => text.to_owned(),
                        Err(_) => String::from_utf8_lossy(t).into_owned(),
                    })
                };
                let mut out = Vec::new();
                while statement.step()? {
                    let text = |column| text(&statement, column);
                    out.push(LogRecord {
                        ts_ns: statement.int(0),
                        severity_number: statement.int(1),
                        severity_text: text(2).unwrap_or_default(),
                        body: text(3).unwrap_or_default(),
                        attributes: text(4).unwrap_or_default(),
                        resource: text(5).unwrap_or_default(),
                        trace_id: text(6),
                        span_id: text(7),
                        metered: statement.int(8) != 0,
                        record_hash: text(9).unwrap_or_default(),
                    });
                }
                Ok(out)
            };
            return crate::sqlite::run(&mut connection, read).await.map_err(StoreError::Sqlite);
        }
        Ok(rows!(&self.pool, &text, &binds, |row| LogRecord {
            ts_ns: row.try_get(0)?,
            severity_number: row.try_get(1)?,
            severity_text: row.try_get(2)?,
            body: row.try_get(3)?,
            attributes: row.try_get(4)?,
            resource: row.try_get(5)?,
            trace_id: row.try_get(6)?,
            span_id: row.try_get(7)?,
            metered: row.try_get::<i64, _>(8)? != 0,
            record_hash: row.try_get(9)?,
        }))
    }
}

/// The most distinct streams [`TelemetryStore::log_streams`] returns.
pub const MAX_LOG_STREAMS: usize = 10_000;
/// The most lines [`TelemetryStore::log_streams`] reads (the newest of its range): what a
/// label query costs is bounded, whatever the range.
pub const MAX_STREAM_LINES: i64 = 1_000_000;

/// What tells a tenant's log records apart as LogQL's streams, with how many lines and bytes
/// each has in a time range.
#[derive(Debug, Clone, PartialEq)]
pub struct LogStream {
    pub metered: bool,
    /// A function record's `faas.name`, `faas.instance` and `log.iostream`.
    pub function: Option<String>,
    pub instance: Option<String>,
    pub iostream: Option<String>,
    pub severity_number: i64,
    pub severity_text: String,
    /// The tenant's own records' resource (JSON object); `{}` for function records.
    pub resource: String,
    pub lines: i64,
    pub bytes: i64,
}

impl TelemetryStore {
    /// A tenant's log records in `[start_ns, end_ns)`, grouped as streams (at most
    /// [`MAX_LOG_STREAMS`]), from the newest [`MAX_STREAM_LINES`] of them.
    pub async fn log_streams(&self, tenant: &str, start_ns: i64, end_ns: i64) -> Result<Vec<LogStream>, StoreError> {
        let attribute = |key: &str| match &self.pool {
            Pool::Sqlite(_) => format!("json_extract(attributes, '$.\"{key}\"')"),
            Pool::Postgres(_) => format!("(attributes::jsonb ->> '{key}')"),
        };
        let (function, instance, iostream) =
            (attribute(semconv::FAAS_NAME), attribute(semconv::FAAS_INSTANCE), attribute(semconv::LOG_IOSTREAM));
        let length = match &self.pool {
            Pool::Sqlite(_) => "length(CAST(body AS BLOB))",
            Pool::Postgres(_) => "octet_length(body)",
        };
        let text = format!(
            "SELECT metered, f, i, s, severity_number, severity_text, r, COUNT(*), SUM(n) FROM (\
               SELECT metered, CASE WHEN metered = 1 THEN {function} END AS f, \
                 CASE WHEN metered = 1 THEN {instance} END AS i, CASE WHEN metered = 1 THEN {iostream} END AS s, \
                 severity_number, severity_text, CASE WHEN metered = 1 THEN '{{}}' ELSE resource END AS r, \
                 {length} AS n FROM logs WHERE tenant = ? AND ts_ns >= ? AND ts_ns < ? \
                 ORDER BY ts_ns DESC LIMIT {MAX_STREAM_LINES}) AS streams \
             GROUP BY metered, f, i, s, severity_number, severity_text, r LIMIT {MAX_LOG_STREAMS}"
        );
        Ok(rows!(&self.pool, &text, &[Bind::Str(tenant), Bind::Int(start_ns), Bind::Int(end_ns)], |row| LogStream {
            metered: row.try_get::<i64, _>(0)? != 0,
            function: row.try_get(1)?,
            instance: row.try_get(2)?,
            iostream: row.try_get(3)?,
            severity_number: row.try_get(4)?,
            severity_text: row.try_get(5)?,
            resource: row.try_get(6)?,
            lines: row.try_get(7)?,
            bytes: row.try_get::<Option<i64>, _>(8)?.unwrap_or(0),
        }))
    }
}
