//! `GET /loki/api/v1/tail` (a WebSocket): Grafana Explore's *Live* view. The query's newest
//! `limit` lines since `start` (an hour ago by default) come first, then every second the lines
//! stored since, as Loki's frames `{"streams": [...], "dropped_entries": []}` (streams with all
//! their labels, as Loki's tail sends them).
//!
//! A line's time is when the gateway (or the tenant's SDK) read it, and it may be stored a
//! moment later than newer ones: each poll reads again the last [`LATE`] before the newest
//! line sent and skips what it already sent. A tenant has at most [`MAX_TAILS`] tails open; one
//! ends after [`MAX_TAIL`], when the client goes, or when a read fails.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use serde_json::json;

use super::logql::{LogExpr, Query};
use super::{Api, LokiError, QUERY_TIMEOUT, eval, limit, now_ns, parse_query, parse_time, streams_json, tenant};
use crate::prometheus::params::Params;

/// Tails a tenant may have open at once.
pub const MAX_TAILS: usize = 4;
/// Longest a tail stays open.
const MAX_TAIL: Duration = Duration::from_secs(3600);
/// How far before the newest line sent a poll reads again, for lines stored late.
const LATE: i64 = 10_000_000_000;
const POLL: Duration = Duration::from_secs(1);

/// A tenant's place among its open tails, given back when dropped.
struct Open {
    api: Api,
    tenant: String,
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut tails = self.api.tails.lock().unwrap();
        if let Some(open) = tails.get_mut(&self.tenant) {
            *open -= 1;
            if *open == 0 {
                tails.remove(&self.tenant);
            }
        }
    }
}

pub(super) async fn tail(
    State(api): State<Api>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: WebSocketUpgrade,
) -> Result<Response, LokiError> {
    let tenant = tenant(&api.state, &headers)?;
    let params = Params::new(&headers, &uri, &[]);
    let Query::Log(expr) = parse_query(&params)? else {
        return Err(LokiError::bad("a tail takes a log query, not a metric query"));
    };
    let limit = limit(&params)?;
    let start_ns = match params.get("start").filter(|v| !v.is_empty()) {
        Some(start) => parse_time(start).map_err(|e| LokiError::bad(format!("invalid start: {e}")))?,
        None => now_ns(&api.state).saturating_sub(3_600_000_000_000),
    };
    {
        let mut tails = api.tails.lock().unwrap();
        let open = tails.entry(tenant.clone()).or_default();
        if *open >= MAX_TAILS {
            return Err(LokiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!("at most {MAX_TAILS} live tails a tenant: close one first"),
            ));
        }
        *open += 1;
    }
    let open = Open { api: api.clone(), tenant };
    Ok(upgrade.on_upgrade(move |socket| follow(socket, open, expr, start_ns, limit)))
}

async fn follow(mut socket: WebSocket, open: Open, expr: LogExpr, start_ns: i64, limit: usize) {
    let (api, tenant) = (&open.api, open.tenant.as_str());
    let until = Instant::now() + MAX_TAIL;
    let mut sent: HashSet<(i64, String)> = HashSet::new();
    let mut newest = start_ns;
    let mut first = true;
    let mut poll = tokio::time::interval(POLL);
    while Instant::now() < until {
        tokio::select! {
            _ = poll.tick() => {}
            message = socket.recv() => match message {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => continue,
            },
        }
        let from = if first { start_ns } else { newest.saturating_sub(LATE).max(start_ns) };
        // The first read: the newest `limit`; later ones: what came since, oldest first.
        let read = limit + if first { 0 } else { sent.len() };
        let deadline = Instant::now() + QUERY_TIMEOUT;
        let work = eval::log_query(&api.state.store, tenant, &expr, (from, i64::MAX), read, first, deadline);
        let Ok((mut entries, _)) = api.placed(tenant, work, deadline).await else { return };
        first = false;
        entries.retain(|e| !sent.contains(&(e.ts_ns, e.hash.clone())));
        entries.sort_by_key(|e| e.ts_ns);
        if entries.is_empty() {
            continue;
        }
        for entry in &entries {
            newest = newest.max(entry.ts_ns);
            sent.insert((entry.ts_ns, entry.hash.clone()));
        }
        sent.retain(|(ts_ns, _)| *ts_ns >= newest.saturating_sub(LATE));
        let frame = json!({"streams": streams_json(entries, false), "dropped_entries": []});
        if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
            return;
        }
    }
}
