//! Function logs: each line a function writes (an exec function's stderr) becomes an OTLP log
//! record of its tenant, with the function, the invocation and its span, and goes to the same
//! receiver as the platform's spans, with the same token (the meter's: the records are the
//! platform's, stored as metered). Lines have a queue of their own that drops when full (a
//! flood of lines never holds up a call or its billed spans), of which a tenant holds at most a
//! quarter (its burst leaves room for the others' lines), a rate per tenant
//! ([`crate::function::output`]'s budget) and bytes a day per tenant: past any, lines are
//! counted and dropped and the function runs on.
//!
//! A line's severity is WARN (what a function writes to stderr is for its developer to read),
//! unless the line starts with a level word: `ERROR`, `FATAL`, `CRITICAL`, `WARN`, `WARNING`,
//! `INFO`, `DEBUG`, `TRACE` (any case, alone or in brackets, or as `level=…`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::TelemetryConfig;
use super::otlp::transport::{Signal, Transport, send};
use super::otlp::{background_priority, export_io};
use crate::semconv;
use crate::tenant::TenantId;

/// Lines waiting for export, all tenants together; past it, new lines are dropped (counted).
pub const QUEUE_LINES: usize = 65_536;
/// Lines of one tenant waiting for export at most (a quarter of the queue): one tenant's burst
/// leaves room for the others'.
pub const TENANT_QUEUE_LINES: usize = QUEUE_LINES / 4;
/// Bytes of lines a tenant may log a UTC day, by default (`--tenant-log-bytes-per-day`).
pub const DEFAULT_BYTES_PER_DAY: u64 = 256 << 20;
/// Lines sent together at most, and how long a line waits for others.
const BATCH_LINES: usize = 1024;
const BATCH_DELAY: Duration = Duration::from_millis(500);

/// What a line belongs to.
#[derive(Debug, Clone)]
pub struct LogContext {
    pub function: String,
    /// The instance that wrote it: `exec` for an exec function's process.
    pub instance: String,
    /// The invocation's own id (`faas.invocation_id`) and its caller's `X-Call-Id`.
    pub invocation_id: Option<String>,
    pub call_id: Option<String>,
    /// The invocation span's ids.
    pub trace_id: Option<[u8; 16]>,
    pub span_id: Option<[u8; 8]>,
}

/// Where one invocation's lines go: the tenant's pipeline, with what they belong to.
#[derive(Clone)]
pub struct Sink {
    pub logs: Arc<FunctionLogs>,
    pub tenant: TenantId,
    pub context: LogContext,
    /// Bytes of the lines queued for export as the invocation's (its usage, `sfaas.log_bytes`):
    /// shared with the sinks of the instances serving it, not with those between invocations.
    pub exported: Arc<AtomicU64>,
}

impl crate::function::output::LogSink for Sink {
    fn line(&self, stream: &'static str, line: &str, cut: bool) -> bool {
        let queued = self.logs.line(&self.tenant, &self.context, stream, line, cut);
        if queued {
            self.exported.fetch_add(line.len() as u64, Ordering::Relaxed);
        }
        queued
    }

    fn of_instance(&self, instance: &str) -> Arc<dyn crate::function::output::LogSink> {
        let context = LogContext { instance: instance.to_string(), ..self.context.clone() };
        Arc::new(Sink { context, ..self.clone() })
    }

    fn between_invocations(&self) -> Arc<dyn crate::function::output::LogSink> {
        let context =
            LogContext { invocation_id: None, call_id: None, trace_id: None, span_id: None, ..self.context.clone() };
        Arc::new(Sink { context, exported: Arc::default(), ..self.clone() })
    }
}

/// One line on its way.
struct Line {
    tenant: TenantId,
    record: LogRecord,
}

/// A tenant's bytes logged on a UTC day.
#[derive(Default)]
struct Day {
    day: u64,
    bytes: u64,
    dropped: u64,
}

/// Lines waiting for export, per tenant.
type Queued = Arc<Mutex<HashMap<TenantId, usize>>>;

/// The function-log pipeline of a gateway.
pub struct FunctionLogs {
    queue: SyncSender<Line>,
    queued: Queued,
    bytes_per_day: u64,
    days: Mutex<HashMap<TenantId, Day>>,
    sequence: AtomicU64,
    /// Lines dropped because the queue was full (all tenants).
    pub dropped_full: AtomicU64,
}

/// The severity (OTLP number and text) a line's leading level word gives, else WARN for
/// stderr and INFO for stdout.
pub fn severity(line: &str, stream: &str) -> (i32, &'static str) {
    let start = line.trim_start().trim_start_matches(['[', '<']);
    let start = start.strip_prefix("level=").unwrap_or(start).trim_start_matches('"');
    let word: String = start.chars().take_while(char::is_ascii_alphabetic).take(8).collect();
    match word.to_ascii_uppercase().as_str() {
        "FATAL" | "CRITICAL" => (21, "FATAL"),
        "ERROR" => (17, "ERROR"),
        "INFO" => (9, "INFO"),
        "DEBUG" => (5, "DEBUG"),
        "TRACE" => (1, "TRACE"),
        "WARN" | "WARNING" => (13, "WARN"),
        _ if stream == "stdout" => (9, "INFO"),
        _ => (13, "WARN"),
    }
}

fn attribute(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), ..KeyValue::default() }
}

fn text(key: &str, value: impl Into<String>) -> KeyValue {
    attribute(key, any_value::Value::StringValue(value.into()))
}

impl FunctionLogs {
    /// The pipeline exporting to `endpoint` as `config` says (its protocol and token).
    pub fn start(config: &TelemetryConfig, endpoint: &str) -> Result<Arc<Self>, String> {
        let transport = Transport::new(config, endpoint, Signal::Logs)?;
        let (queue, lines) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let queued = Queued::default();
        std::thread::Builder::new()
            .name("sfaas-log-export".into())
            .spawn({
                let queued = queued.clone();
                move || {
                    background_priority();
                    export_loop(&lines, &queued, &transport);
                }
            })
            .map_err(|error| format!("cannot start the log export thread: {error}"))?;
        Ok(Arc::new(Self {
            queue,
            queued,
            bytes_per_day: config.log_bytes_per_day.unwrap_or(DEFAULT_BYTES_PER_DAY),
            days: Mutex::default(),
            sequence: AtomicU64::new(0),
            dropped_full: AtomicU64::new(0),
        }))
    }

    /// Queues one line of `stream` (`stdout`/`stderr`) that `context`'s function wrote, cut at
    /// the line limit when `cut`; `false` when it was dropped (the tenant's day is spent, or
    /// the queue is full).
    pub fn line(&self, tenant: &TenantId, context: &LogContext, stream: &'static str, line: &str, cut: bool) -> bool {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let bytes = (line.len() + context.function.len() + 64) as u64;
        if !self.charge(tenant, now.as_secs() / 86_400, bytes) {
            return false;
        }
        let (severity_number, severity_text) = severity(line, stream);
        let mut attributes = vec![
            text(semconv::FAAS_NAME, context.function.as_str()),
            text(semconv::FAAS_INSTANCE, context.instance.as_str()),
            text(semconv::LOG_IOSTREAM, stream),
        ];
        if let Some(id) = &context.invocation_id {
            attributes.push(text(semconv::FAAS_INVOCATION_ID, id.as_str()));
        }
        if let Some(id) = &context.call_id {
            attributes.push(text(semconv::SFAAS_CALL_ID, id.as_str()));
        }
        if cut {
            attributes.push(attribute(semconv::SFAAS_LOG_CUT, any_value::Value::BoolValue(true)));
        }
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        attributes.push(attribute(semconv::SFAAS_LOG_SEQUENCE, any_value::Value::IntValue(sequence as i64)));
        let ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let record = LogRecord {
            time_unix_nano: ns,
            observed_time_unix_nano: ns,
            severity_number,
            severity_text: severity_text.into(),
            body: Some(AnyValue { value: Some(any_value::Value::StringValue(line.to_string())) }),
            attributes,
            trace_id: context.trace_id.map(|id| id.to_vec()).unwrap_or_default(),
            span_id: context.span_id.map(|id| id.to_vec()).unwrap_or_default(),
            ..LogRecord::default()
        };
        {
            let mut queued = self.queued.lock().unwrap();
            let mine = queued.entry(tenant.clone()).or_default();
            if *mine >= TENANT_QUEUE_LINES {
                self.dropped_full.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            *mine += 1;
        }
        match self.queue.try_send(Line { tenant: tenant.clone(), record }) {
            Ok(()) => true,
            Err(TrySendError::Full(line) | TrySendError::Disconnected(line)) => {
                unqueue(&self.queued, &line.tenant, 1);
                self.dropped_full.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Counts `bytes` against the tenant's day; `false` (and counted dropped) past its limit.
    fn charge(&self, tenant: &TenantId, day: u64, bytes: u64) -> bool {
        let mut days = self.days.lock().unwrap();
        let spent = days.entry(tenant.clone()).or_default();
        if spent.day != day {
            if spent.dropped > 0 {
                tracing::warn!(%tenant, dropped = spent.dropped, "function log lines were dropped: the day's log bytes were spent");
            }
            *spent = Day { day, ..Day::default() };
        }
        if spent.bytes + bytes > self.bytes_per_day {
            if spent.dropped == 0 {
                tracing::warn!(%tenant, limit = self.bytes_per_day, "a namespace's function logs reached their bytes for the day: lines are dropped until midnight UTC");
            }
            spent.dropped += 1;
            return false;
        }
        spent.bytes += bytes;
        true
    }

    /// Lines of a tenant dropped today for its daily bytes.
    pub fn dropped_today(&self, tenant: &TenantId) -> u64 {
        self.days.lock().unwrap().get(tenant).map_or(0, |day| day.dropped)
    }
}

/// Gives back `n` of a tenant's places in the queue.
fn unqueue(queued: &Queued, tenant: &TenantId, n: usize) {
    let mut queued = queued.lock().unwrap();
    if let Some(count) = queued.get_mut(tenant) {
        *count = count.saturating_sub(n);
        if *count == 0 {
            queued.remove(tenant);
        }
    }
}

/// Sends batches of lines, one resource per tenant, until the pipeline is dropped. A batch the
/// receiver does not take is tried twice more and then dropped: logs are not billed usage.
fn export_loop(lines: &Receiver<Line>, queued: &Queued, transport: &Transport) {
    loop {
        let Ok(first) = lines.recv() else { return };
        let mut batch = vec![first];
        let until = Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH_LINES {
            let wait = until.saturating_duration_since(Instant::now());
            match lines.recv_timeout(wait) {
                Ok(line) => batch.push(line),
                Err(_) => break,
            }
        }
        let count = batch.len();
        let mut by_tenant: HashMap<TenantId, Vec<LogRecord>> = HashMap::new();
        for line in batch {
            by_tenant.entry(line.tenant).or_default().push(line.record);
        }
        for (tenant, records) in &by_tenant {
            unqueue(queued, tenant, records.len());
        }
        let request = ExportLogsServiceRequest {
            resource_logs: by_tenant
                .into_iter()
                .map(|(tenant, log_records)| ResourceLogs {
                    resource: Some(Resource {
                        attributes: vec![
                            text(semconv::ATTR_SERVICE_NAME, semconv::SERVICE_NAME),
                            text(semconv::ATTR_SERVICE_NAMESPACE, tenant.as_str()),
                        ],
                        ..Resource::default()
                    }),
                    scope_logs: vec![ScopeLogs { log_records, ..ScopeLogs::default() }],
                    ..ResourceLogs::default()
                })
                .collect(),
        };
        let body = bytes::Bytes::from(request.encode_to_vec());
        for pause in [Duration::from_millis(200), Duration::from_secs(1), Duration::ZERO] {
            match export_io().block_on(send(transport, vec![body.clone()])) {
                Ok(()) => break,
                Err(error) if !error.retry || pause.is_zero() => {
                    tracing::warn!(error = %error.message, lines = count, "function log lines could not be exported; they are lost");
                    break;
                }
                Err(_) => std::thread::sleep(pause),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> LogContext {
        LogContext {
            function: "f".into(),
            instance: "exec".into(),
            invocation_id: None,
            call_id: None,
            trace_id: None,
            span_id: None,
        }
    }

    #[test]
    fn a_tenants_bytes_a_day_hold_and_leave_the_others_theirs() {
        // Nothing listens there: the export fails quietly, the counting is what is tested.
        let config = TelemetryConfig { log_bytes_per_day: Some(10_000), ..TelemetryConfig::default() };
        let logs = FunctionLogs::start(&config, "http://127.0.0.1:9").unwrap();
        let context = context();
        let (flooder, other) = (TenantId::new("flooder").unwrap(), TenantId::new("other").unwrap());
        let line = "y".repeat(100);
        let kept = (0..1000).filter(|_| logs.line(&flooder, &context, "stderr", &line, false)).count();
        // 165 bytes a line counted (the line, the function's name, 64 for the rest): 60 fit.
        assert_eq!(kept, 60);
        assert_eq!(logs.dropped_today(&flooder), 940);
        assert!(logs.line(&other, &context, "stderr", &line, false), "another tenant's day is its own");
        assert_eq!(logs.dropped_today(&other), 0);
    }

    #[test]
    fn one_tenants_burst_leaves_room_in_the_queue_for_the_others() {
        // Nothing listens there: lines leave the queue slowly (a batch, then retries).
        let config = TelemetryConfig { log_bytes_per_day: Some(u64::MAX), ..TelemetryConfig::default() };
        let logs = FunctionLogs::start(&config, "http://127.0.0.1:9").unwrap();
        let context = context();
        let (flooder, other) = (TenantId::new("flooder").unwrap(), TenantId::new("other").unwrap());
        let kept = (0..QUEUE_LINES).filter(|_| logs.line(&flooder, &context, "stderr", "flood", false)).count();
        assert!(kept < QUEUE_LINES / 2, "the flooder holds about a quarter: {kept}");
        let others = (0..1000).filter(|_| logs.line(&other, &context, "stderr", "mine", false)).count();
        assert_eq!(others, 1000, "another tenant's lines still have room");
    }

    #[test]
    fn a_leading_level_word_sets_the_severity() {
        assert_eq!(severity("something broke", "stderr").1, "WARN");
        assert_eq!(severity("something said", "stdout").1, "INFO");
        assert_eq!(severity("warning: low disk", "stdout").1, "WARN");
        assert_eq!(severity("ERROR: no such key", "stderr").1, "ERROR");
        assert_eq!(severity("[info] started", "stderr").1, "INFO");
        assert_eq!(severity("level=debug msg=x", "stderr").1, "DEBUG");
        assert_eq!(severity("  Critical failure", "stderr").1, "FATAL");
        assert_eq!(severity("informative", "stderr").1, "WARN");
        assert_eq!(severity("", "stderr").1, "WARN");
    }
}
