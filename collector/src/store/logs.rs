//! Reading the log records of functions: what the platform produced from a function's output
//! (metered records, attributed by the gateway), newest or after a cursor, for the gateway's
//! `/system/logs` and `sfaas logs`.

use super::blocks::blocking;
use super::blocks::log_format::{FunctionAttributes, LogFilter, StoredLog, StreamKey, StreamLines};
use super::blocks::{LOG_COLUMNS, read_rows};
use super::{Bind, Pool, StoreError, TelemetryStore};
use crate::model::LogRow;
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
    /// Records before this time (ns), if given.
    pub until_ns: Option<i64>,
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

fn function_log((row, received_ms): (LogRow, i64)) -> FunctionLog {
    FunctionLog {
        ts_ns: row.ts_ns,
        severity_text: row.severity_text,
        body: row.body,
        attributes: row.attributes,
        trace_id: row.trace_id,
        span_id: row.span_id,
        cursor: LogCursor { received_ms, record_hash: row.record_hash },
    }
}

impl TelemetryStore {
    /// A tenant's function log records as `query` asks (at most [`MAX_LOG_READ`]).
    pub async fn function_logs(&self, query: &LogQuery) -> Result<Vec<FunctionLog>, StoreError> {
        let attribute = |key: &str| match &self.pool {
            Pool::Sqlite(_) => format!("json_extract(attributes, '$.\"{key}\"')"),
            Pool::Postgres(_) => format!("(attributes::jsonb ->> '{key}')"),
        };
        let mut text = format!("SELECT {LOG_COLUMNS} FROM logs WHERE tenant = ? AND metered = 1 AND ts_ns >= ?");
        let until_ns = query.until_ns.unwrap_or(i64::MAX);
        let mut binds = vec![Bind::Str(&query.tenant), Bind::Int(query.since_ns)];
        if until_ns < i64::MAX {
            text.push_str(" AND ts_ns < ?");
            binds.push(Bind::Int(until_ns));
        }
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
        let mut logs: Vec<FunctionLog> =
            read_rows(&self.pool, &text, &binds).await?.into_iter().map(function_log).collect();
        // Then the blocks (after the table: a seal between the two makes a record come twice,
        // never not at all).
        let limit = limit as usize;
        let contains: Vec<String> = query.contains.iter().filter(|c| !c.is_empty()).cloned().collect();
        let filter = LogFilter {
            ts_ns: (query.since_ns, until_ns),
            metered: Some(true),
            function: query.function.as_deref(),
            contains: &contains,
            received_from_ms: query.after.as_ref().map(|after| after.received_ms),
            trace_id: query.trace_id.as_deref(),
        };
        let keeps = |s: &StoredLog| {
            query.severity.as_ref().is_none_or(|v| &s.row.severity_text == v)
                && query.after.as_ref().is_none_or(|after| {
                    (s.received_ms, s.row.record_hash.as_str()) > (after.received_ms, after.record_hash.as_str())
                })
                && query.invocation.as_ref().is_none_or(|id| {
                    let ids = FunctionAttributes::of(&s.row.attributes);
                    ids.invocation_id.as_ref() == Some(id) || ids.call_id.as_ref() == Some(id)
                })
        };
        let newest_first = |a: &FunctionLog, b: &FunctionLog| (b.ts_ns, &b.cursor).cmp(&(a.ts_ns, &a.cursor));
        if query.after.is_none() {
            logs.sort_by(newest_first);
        }
        for group in self.spans.log_groups(&query.tenant, &filter, true).await? {
            if query.after.is_none() && logs.len() >= limit && group.group.max_ts_ns < logs[limit - 1].ts_ns {
                break; // every later group is older than the newest `limit` found
            }
            let found = group.read(&filter)?;
            logs.extend(found.into_iter().filter(|s| keeps(s)).map(|s| function_log((s.row, s.received_ms))));
            match query.after {
                Some(_) => logs.sort_by(|a, b| a.cursor.cmp(&b.cursor)),
                None => logs.sort_by(newest_first),
            }
            let mut seen = std::collections::HashSet::new();
            logs.retain(|log| seen.insert(log.cursor.record_hash.clone()));
            logs.truncate(limit);
        }
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
        let limit = scan.limit.min(MAX_LOG_READ);
        let mut out = self.table_batch(scan).await?;
        // Then the blocks' row groups, in the scan's order, until the next one can only hold
        // records past the batch's last.
        let contains: Vec<String> = scan.contains.iter().filter(|c| !c.is_empty()).cloned().collect();
        let filter = LogFilter {
            ts_ns: scan.cursor_range(),
            metered: scan.metered,
            function: scan.function.as_deref(),
            contains: &contains,
            ..LogFilter::default()
        };
        let order = |a: &LogRow, b: &LogRow| {
            let order = (a.ts_ns, &a.record_hash).cmp(&(b.ts_ns, &b.record_hash));
            if scan.backward { order.reverse() } else { order }
        };
        let past = |r: &LogRow| match &scan.after {
            Some((ts_ns, hash)) if scan.backward => (r.ts_ns, &r.record_hash) < (*ts_ns, hash),
            Some((ts_ns, hash)) => (r.ts_ns, &r.record_hash) > (*ts_ns, hash),
            None => true,
        };
        for group in self.spans.log_groups(&scan.tenant, &filter, scan.backward).await? {
            if let Some(last) = out.get(limit.wrapping_sub(1)) {
                let beyond = match scan.backward {
                    true => group.group.max_ts_ns < last.ts_ns,
                    false => group.group.min_ts_ns > last.ts_ns,
                };
                if beyond {
                    break;
                }
            }
            let mut found: Vec<LogRow> = group.read(&filter)?.into_iter().map(|s| s.row).filter(past).collect();
            if scan.backward {
                found.reverse(); // blocks are in time order: a run the sort merges
            }
            out.extend(found);
            out.sort_by(order);
            out.dedup_by(|a, b| a.ts_ns == b.ts_ns && a.record_hash == b.record_hash);
            out.truncate(limit);
        }
        Ok(out
            .into_iter()
            .map(|row| LogRecord {
                ts_ns: row.ts_ns,
                severity_number: row.severity_number,
                severity_text: row.severity_text,
                body: row.body,
                attributes: row.attributes,
                resource: row.resource,
                trace_id: row.trace_id,
                span_id: row.span_id,
                metered: row.metered,
                record_hash: row.record_hash,
            })
            .collect())
    }

    /// One batch of [`LogScan`] from the table alone.
    async fn table_batch(&self, scan: &LogScan) -> Result<Vec<LogRow>, StoreError> {
        let (start_ns, end_ns) = scan.cursor_range();
        let mut text = format!("SELECT {LOG_COLUMNS} FROM logs WHERE tenant = ? AND ts_ns >= ? AND ts_ns < ?");
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
        Ok(read_rows(&self.pool, &text, &binds).await?.into_iter().map(|(row, _)| row).collect())
    }
}

impl LogScan {
    /// The scan's range, after its cursor: the range starts (or ends) at the cursor's time, so
    /// that each batch is a range of the time index rather than a walk from the range's start.
    fn cursor_range(&self) -> (i64, i64) {
        match &self.after {
            Some((ts_ns, _)) if self.backward => (self.start_ns, self.end_ns.min(ts_ns.saturating_add(1))),
            Some((ts_ns, _)) => (self.start_ns.max(*ts_ns), self.end_ns),
            None => (self.start_ns, self.end_ns),
        }
    }
}

/// The most distinct streams [`TelemetryStore::log_streams`] returns.
pub const MAX_LOG_STREAMS: usize = 10_000;
/// The most lines [`TelemetryStore::log_streams`] reads (the newest of its range): what a
/// label query costs is bounded, whatever the range.
pub const MAX_STREAM_LINES: i64 = 1_000_000;

/// A tenant's stream, with how many lines and bytes it has in a time range.
#[derive(Debug, Clone, PartialEq)]
pub struct LogStream {
    pub stream: StreamKey,
    pub lines: i64,
    pub bytes: i64,
}

impl TelemetryStore {
    /// A tenant's log records in `[start_ns, end_ns)`, grouped as streams (at most
    /// [`MAX_LOG_STREAMS`]), from about the newest [`MAX_STREAM_LINES`] of them.
    pub async fn log_streams(&self, tenant: &str, start_ns: i64, end_ns: i64) -> Result<Vec<LogStream>, StoreError> {
        let scan = LogScan { tenant: tenant.to_string(), start_ns, end_ns, backward: true, ..LogScan::default() };
        let mut streams: std::collections::HashMap<StreamKey, (i64, i64)> = std::collections::HashMap::new();
        let mut read: i64 = 0;
        self.scan_log_lines(&scan, &mut |batch| {
            let mut counts = vec![(0, 0); batch.streams.len()];
            for (_, stream, bytes) in &batch.lines {
                counts[*stream as usize].0 += 1;
                counts[*stream as usize].1 += i64::from(*bytes);
            }
            read += batch.lines.len() as i64;
            for (key, (lines, bytes)) in batch.streams.into_iter().zip(counts) {
                let counted = streams.entry(key).or_default();
                counted.0 += lines;
                counted.1 += bytes;
            }
            read < MAX_STREAM_LINES && streams.len() < MAX_LOG_STREAMS
        })
        .await?;
        Ok(streams
            .into_iter()
            .take(MAX_LOG_STREAMS)
            .map(|(stream, (lines, bytes))| LogStream { stream, lines, bytes })
            .collect())
    }

    /// Every record of `scan` (its `after` and `limit` aside) as its time, stream and body
    /// bytes, a batch at a time, until `each` returns `false`: the table's first, then the
    /// blocks' row groups (newest first when `backward`), each record once. What a label query
    /// and a metric query that needs nothing else read, without building records.
    pub async fn scan_log_lines(
        &self,
        scan: &LogScan,
        each: &mut (dyn FnMut(StreamLines) -> bool + Send),
    ) -> Result<(), StoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut table = LogScan { after: None, limit: MAX_LOG_READ, ..scan.clone() };
        loop {
            let rows = self.table_batch(&table).await?;
            let Some(last) = rows.last() else { break };
            table.after = Some((last.ts_ns, last.record_hash.clone()));
            let full = rows.len() >= MAX_LOG_READ;
            let mut batch = StreamLines::default();
            let mut index = std::collections::HashMap::new();
            for row in rows {
                let bytes = row.body.len() as u32;
                let key = (row.ts_ns, row.record_hash.clone());
                let stored = StoredLog::new(row, 0);
                let stream = *index.entry(StreamKey::of(&stored)).or_insert_with_key(|key| {
                    batch.streams.push(key.clone());
                    batch.streams.len() as u32 - 1
                });
                batch.lines.push((key.0, stream, bytes));
                seen.insert(key);
            }
            if !each(batch) {
                return Ok(());
            }
            if !full {
                break;
            }
        }
        let contains: Vec<String> = scan.contains.iter().filter(|c| !c.is_empty()).cloned().collect();
        let filter = LogFilter {
            ts_ns: (scan.start_ns, scan.end_ns),
            metered: scan.metered,
            function: scan.function.as_deref(),
            contains: &contains,
            ..LogFilter::default()
        };
        for group in self.spans.log_groups(&scan.tenant, &filter, scan.backward).await? {
            let lines = group.lines(&filter, &seen)?;
            // The caller's work on the batch too, off the runtime's queue.
            if !blocking(|| each(lines)) {
                break;
            }
        }
        Ok(())
    }
}
