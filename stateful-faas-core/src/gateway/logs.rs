//! `GET /system/logs`: a namespace's function logs, as OpenFaaS's logs API serves them
//! (faas-provider's `logs` handler): `name` (the function, or `name.namespace`), `namespace`,
//! `since` (RFC 3339), `tail` (the last N lines), `follow` (keep the response open and send
//! lines as they arrive); newline-delimited JSON, one
//! `{"name","namespace","instance","timestamp","text"}` a line, with `invocation_id` and
//! `severity` besides. `invocation=ID` keeps one invocation's lines. A read token may read
//! its own namespace's logs; a namespace follows in at most [`MAX_FOLLOWING`] responses at
//! once (429 beyond).
//!
//! The lines are where the collector stored them (the binary gives the gateway a
//! [`LogReader`] on its store); without one, 503.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::Core;
use super::auth::Caller;
use super::error::ApiError;

/// Lines one response may hold before following (`tail` is capped to it).
pub const MAX_LINES: usize = 10_000;
/// How often a followed response looks for new lines, and how long it stays open at most.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
const FOLLOW_AT_MOST: Duration = Duration::from_secs(3600);
/// Followed responses a namespace may hold open at once (each reads the store twice a second).
pub const MAX_FOLLOWING: usize = 8;

/// A namespace's place among those following logs, given back when its response ends.
struct Following(String);

impl Following {
    fn take(tenant: &str) -> Option<Self> {
        let mut following = FOLLOWING.lock().unwrap();
        let count = following.entry(tenant.to_string()).or_default();
        if *count >= MAX_FOLLOWING {
            return None;
        }
        *count += 1;
        Some(Following(tenant.to_string()))
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut following = FOLLOWING.lock().unwrap();
        if let Some(count) = following.get_mut(&self.0) {
            *count -= 1;
            if *count == 0 {
                following.remove(&self.0);
            }
        }
    }
}

static FOLLOWING: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, usize>>> =
    std::sync::LazyLock::new(Default::default);

/// What to read of a namespace's function logs.
#[derive(Debug, Clone)]
pub struct LogRead {
    pub tenant: String,
    pub function: Option<String>,
    pub invocation: Option<String>,
    pub since_ns: i64,
    /// Lines that arrived after this cursor (a previous read's), oldest first; else the newest
    /// `limit`, in time order.
    pub after: Option<LogCursor>,
    pub limit: usize,
}

/// Where a read stopped: (arrival ms, record id).
pub type LogCursor = (i64, String);

/// One stored line.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub ts_ns: i64,
    pub function: String,
    pub instance: String,
    pub invocation_id: Option<String>,
    pub severity: String,
    pub text: String,
    pub cursor: LogCursor,
}

/// Reads function logs back from where they are stored.
pub trait LogReader: Send + Sync {
    fn read(&self, query: LogRead) -> Pin<Box<dyn Future<Output = Result<Vec<LogLine>, String>> + Send + '_>>;
}

#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    name: Option<String>,
    namespace: Option<String>,
    since: Option<String>,
    tail: Option<i64>,
    follow: Option<bool>,
    invocation: Option<String>,
}

/// One line as faas-provider's `logs.Message`, and ours besides.
#[derive(Serialize)]
struct Message<'a> {
    name: &'a str,
    namespace: &'a str,
    instance: &'a str,
    timestamp: String,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    invocation_id: Option<&'a str>,
    severity: &'a str,
}

fn ndjson(line: &LogLine, namespace: &str) -> String {
    let timestamp =
        chrono::DateTime::from_timestamp_nanos(line.ts_ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let message = Message {
        name: &line.function,
        namespace,
        instance: &line.instance,
        timestamp,
        text: &line.text,
        invocation_id: line.invocation_id.as_deref(),
        severity: &line.severity,
    };
    let mut text = serde_json::to_string(&message).unwrap_or_default();
    text.push('\n');
    text
}

pub async fn logs(
    State(core): State<Arc<Core>>,
    caller: Caller,
    Query(query): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let name = query.name.as_deref().filter(|n| !n.is_empty()).ok_or_else(|| {
        ApiError::BadRequest("name is required: the function whose logs to read (name or name.namespace)".into())
    })?;
    let (function, namespace) = match name.rsplit_once('.') {
        Some((function, namespace)) if query.namespace.is_none() => (function, Some(namespace)),
        _ => (name, query.namespace.as_deref()),
    };
    let tenant = caller.namespace(namespace)?;
    let since_ns = match query.since.as_deref().filter(|s| !s.is_empty()) {
        None => 0,
        Some(text) => chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .and_then(|t| t.timestamp_nanos_opt())
            .ok_or_else(|| ApiError::BadRequest(format!("since {text:?} is not an RFC 3339 time")))?,
    };
    let limit = match query.tail {
        Some(n) if n >= 0 => (n as usize).min(MAX_LINES),
        _ => MAX_LINES,
    };
    let reader = core
        .log_reader
        .get()
        .cloned()
        .ok_or_else(|| ApiError::Unavailable("this gateway has no telemetry store to read logs from".into()))?;
    let read = LogRead {
        tenant: tenant.to_string(),
        function: Some(function.to_string()),
        invocation: query.invocation.clone().filter(|i| !i.is_empty()),
        since_ns,
        after: None,
        limit,
    };
    // A followed response takes its place first: one refused reads nothing.
    let follow = query.follow.unwrap_or(false);
    let place = match follow {
        true => Some(Following::take(tenant.as_str()).ok_or_else(|| {
            ApiError::TooManyRequests(format!(
                "namespace {tenant} already follows logs in {MAX_FOLLOWING} responses: close one first"
            ))
        })?),
        false => None,
    };
    let first = reader.read(read.clone()).await.map_err(ApiError::Internal)?;
    let namespace = tenant.to_string();
    let response = Response::builder().header(header::CONTENT_TYPE, "application/x-ndjson");
    if !follow {
        let body: String = first.iter().map(|line| ndjson(line, &namespace)).collect();
        return response.body(Body::from(body)).map_err(|e| ApiError::Internal(e.to_string()));
    }
    // Followed: the lines so far, then those arriving, until the client goes, the gateway
    // stops or an hour passes.
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(16);
    let mut stop = core.stop.subscribe();
    tokio::spawn(async move {
        let _place = place;
        let mut cursor = first.iter().map(|line| line.cursor.clone()).max();
        let body: String = first.iter().map(|line| ndjson(line, &namespace)).collect();
        if !body.is_empty() && sender.send(Ok(body)).await.is_err() {
            return;
        }
        let until = tokio::time::Instant::now() + FOLLOW_AT_MOST;
        while tokio::time::Instant::now() < until {
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = stop.wait_for(|stop| *stop) => return,
                _ = sender.closed() => return,
            }
            let after = cursor.clone().unwrap_or((0, String::new()));
            let read = LogRead { after: Some(after), limit: MAX_LINES, ..read.clone() };
            let lines = match reader.read(read).await {
                Ok(lines) => lines,
                Err(error) => {
                    tracing::warn!(%error, "following logs: the read failed");
                    return;
                }
            };
            cursor = lines.iter().map(|line| line.cursor.clone()).max().or(cursor);
            let body: String = lines.iter().map(|line| ndjson(line, &namespace)).collect();
            if !body.is_empty() && sender.send(Ok(body)).await.is_err() {
                return;
            }
        }
    });
    response
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver)))
        .map_err(|e| ApiError::Internal(e.to_string()))
}
