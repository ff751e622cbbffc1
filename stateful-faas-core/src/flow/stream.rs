//! Streaming into a flow: `POST /stream/{flow}[.{namespace}]` takes records — JSON lines, or
//! CSV (`Content-Type: text/csv`) whose first line in every request is the header — and cuts
//! them into micro-batches by the flow's `stream:` policy (records, bytes, delay). Each batch
//! runs the flow once, with the batch as the run's input.
//!
//! A request is answered (202, with the run ids) once all its records are in runs committed to
//! the journal, so a crash loses nothing acknowledged: interrupted runs resume at the next start.
//! At most `max_runs` runs of a stream are in flight; further batches wait, and while more than
//! `max_pending_bytes` wait, senders get 429 with `Retry-After` (backpressure, bounded memory).
//! A CSV header heads every batch, so it counts once per batch a request's records may fill,
//! and it is at most [`MAX_CSV_HEADER_BYTES`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::FlowError;
use super::Flows;
use super::definition::{Batching, Flow};
use super::executor::{self, RunRequest};
use crate::tenant::TenantId;

/// Longest CSV header line: it is copied into every batch, so every run's input.
pub const MAX_CSV_HEADER_BYTES: usize = 64 << 10;

/// How a request's records are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    JsonLines,
    /// CSV; the header line heads every batch.
    Csv {
        header: Bytes,
    },
}

/// Why records were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    BadRequest(String),
    #[error(
        "{bytes} bytes (the records, and the CSV header once per batch they may fill) is more than this stream's max_pending_bytes ({limit}); send smaller requests"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error("the stream of flow {0} is behind: more than max_pending_bytes wait for a run; retry later")]
    Busy(String),
    #[error(transparent)]
    Flow(#[from] FlowError),
    #[error("the stream of flow {0} stopped")]
    Stopped(String),
    /// A batch's run could not start (the flow was removed, the journal failed); records of the
    /// request that went into earlier runs are processed, the others are not.
    #[error("a batch's run could not start: {0}")]
    Run(String),
}

/// What an accepted request became.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Accepted {
    pub records: usize,
    /// The runs its records went into, in order (a request may span several batches).
    pub runs: Vec<String>,
}

/// The running streams, one batcher per tenant and flow.
#[derive(Default)]
pub struct Streams {
    batchers: Mutex<HashMap<(TenantId, String), Batcher>>,
}

struct Batcher {
    flow: Arc<Flow>,
    sender: mpsc::UnboundedSender<Chunk>,
    pending: Arc<Semaphore>,
}

/// One request's records, holding their share of the pending bytes until they are in runs.
struct Chunk {
    format: Format,
    records: Vec<Bytes>,
    permit: OwnedSemaphorePermit,
    done: oneshot::Sender<Result<Accepted, String>>,
}

impl Streams {
    /// Accepts a request's records into the flow's stream; resolves once they are in runs.
    pub async fn send(
        &self,
        flows: &Arc<Flows>,
        tenant: &TenantId,
        flow_name: &str,
        format: Format,
        body: Bytes,
    ) -> Result<Accepted, StreamError> {
        let flow = flows
            .store
            .get(tenant, flow_name)
            .ok_or_else(|| FlowError::NotFound { tenant: tenant.to_string(), name: flow_name.to_string() })?;
        // A record costs its handle beside its bytes (blank lines count here too): a body of
        // millions of short lines is refused before it is split into them.
        let limit = flow.batching.max_pending_bytes;
        let handles = (newlines(&body).count() + 1) * RECORD_OVERHEAD;
        if handles > limit {
            return Err(StreamError::TooLarge { bytes: body.len() + handles, limit });
        }
        let (format, records) = split(format, body)?;
        if records.is_empty() {
            return Ok(Accepted { records: 0, runs: vec![] });
        }
        let bytes = pending_bytes(&format, &records, &flow.batching);
        if bytes > limit {
            return Err(StreamError::TooLarge { bytes, limit });
        }
        let (sender, pending) = {
            let mut batchers = self.batchers.lock().unwrap();
            let key = (tenant.clone(), flow_name.to_string());
            let current = batchers.get(&key).filter(|b| Arc::ptr_eq(&b.flow, &flow) && !b.sender.is_closed());
            if current.is_none() {
                // New, or the flow was redeployed (maybe with another policy): a new batcher;
                // the old one cuts what it holds and ends.
                let pending = Arc::new(Semaphore::new(limit));
                let (sender, receiver) = mpsc::unbounded_channel();
                tokio::spawn(batch(Arc::downgrade(flows), tenant.clone(), flow.clone(), receiver));
                batchers.insert(key.clone(), Batcher { flow: flow.clone(), sender, pending });
            }
            let batcher = &batchers[&key];
            (batcher.sender.clone(), batcher.pending.clone())
        };
        let permit =
            pending.try_acquire_many_owned(bytes as u32).map_err(|_| StreamError::Busy(flow_name.to_string()))?;
        let (done, answer) = oneshot::channel();
        sender
            .send(Chunk { format, records, permit, done })
            .map_err(|_| StreamError::Stopped(flow_name.to_string()))?;
        match answer.await {
            Ok(Ok(accepted)) => Ok(accepted),
            Ok(Err(message)) => Err(StreamError::Run(message)),
            Err(_) => Err(StreamError::Stopped(flow_name.to_string())),
        }
    }
}

/// Splits a body into records (non-empty lines), taking the CSV header off.
pub(crate) fn split(format: Format, body: Bytes) -> Result<(Format, Vec<Bytes>), StreamError> {
    if std::str::from_utf8(&body).is_err() {
        return Err(StreamError::BadRequest("records must be UTF-8 text".into()));
    }
    let mut lines = Vec::new();
    let mut start = 0;
    for end in newlines(&body).chain(std::iter::once(body.len())) {
        let mut line = body.slice(start..end);
        if line.ends_with(b"\r") {
            line = line.slice(..line.len() - 1);
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            lines.push(line);
        }
        start = (end + 1).min(body.len());
    }
    match format {
        Format::JsonLines => Ok((Format::JsonLines, lines)),
        Format::Csv { .. } => {
            if lines.is_empty() {
                return Ok((Format::Csv { header: Bytes::new() }, lines));
            }
            let header = lines.remove(0);
            if header.len() > MAX_CSV_HEADER_BYTES {
                return Err(StreamError::BadRequest(format!(
                    "the CSV header is {} bytes; the limit is {MAX_CSV_HEADER_BYTES}",
                    header.len()
                )));
            }
            Ok((Format::Csv { header }, lines))
        }
    }
}

/// What a record held in a batch costs beside its bytes: its handle and its place in the
/// batch's list.
const RECORD_OVERHEAD: usize = 64;

/// The most bytes a request's records can hold in batches: each record, its newline and
/// [`RECORD_OVERHEAD`], and a CSV header (and its newline) for every batch they may fill. Past
/// the first batch (maybe one already open), a batch is cut after `max_records` of them or once
/// the header and records reach `max_bytes`, whichever comes first, and the last may stay open.
fn pending_bytes(format: &Format, records: &[Bytes], policy: &Batching) -> usize {
    let record_bytes: usize = records.iter().map(|r| r.len() + 1).sum();
    let held = record_bytes + records.len() * RECORD_OVERHEAD;
    let header = match format {
        Format::Csv { header } => header.len() + 1,
        Format::JsonLines => return held,
    };
    let cut_by_count = records.len() / policy.max_records;
    let cut_by_bytes = match policy.max_bytes.checked_sub(header) {
        Some(room) if room > 0 => record_bytes / room,
        _ => records.len(),
    };
    let batches = records.len().min(cut_by_count + cut_by_bytes + 2);
    held + header * batches
}

fn newlines(body: &[u8]) -> impl Iterator<Item = usize> + '_ {
    body.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i)
}

/// The batch being filled.
struct Batch {
    format: Format,
    body: BytesMut,
    records: usize,
    /// Requests whose last records are in this batch.
    waiters: Vec<Waiter>,
    deadline: Instant,
}

struct Waiter {
    accepted: Accepted,
    done: oneshot::Sender<Result<Accepted, String>>,
    _permit: OwnedSemaphorePermit,
}

/// The batcher of one stream: fills batches from the chunks, cuts them, runs them.
async fn batch(flows: Weak<Flows>, tenant: TenantId, flow: Arc<Flow>, mut chunks: mpsc::UnboundedReceiver<Chunk>) {
    let policy = flow.batching;
    let runs = Arc::new(Semaphore::new(policy.max_runs));
    let mut open: Option<Batch> = None;
    loop {
        let chunk = match open.as_ref().map(|batch| batch.deadline) {
            None => chunks.recv().await,
            Some(deadline) => tokio::select! {
                chunk = chunks.recv() => chunk,
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = cut(&flows, &tenant, &flow, &runs, open.take()).await;
                    continue;
                }
            },
        };
        let Some(chunk) = chunk else { break };
        let Chunk { format, records, permit, done } = chunk;
        let mut accepted = Accepted { records: records.len(), runs: vec![] };
        let mut failed = None;
        for record in records {
            if open.as_ref().is_some_and(|b| b.format != format)
                && let Err(e) = cut(&flows, &tenant, &flow, &runs, open.take()).await
            {
                failed = Some(e);
            }
            let batch = open.get_or_insert_with(|| new_batch(&format, &policy));
            batch.body.extend_from_slice(&record);
            batch.body.extend_from_slice(b"\n");
            batch.records += 1;
            if batch.records >= policy.max_records || batch.body.len() >= policy.max_bytes {
                match cut(&flows, &tenant, &flow, &runs, open.take()).await {
                    Ok(Some(run)) => accepted.runs.push(run),
                    Ok(None) => {}
                    Err(e) => failed = Some(e),
                }
            }
        }
        let waiter = Waiter { accepted, done, _permit: permit };
        match (failed, &mut open) {
            (Some(error), _) => {
                let _ = waiter.done.send(Err(error));
            }
            (None, Some(batch)) if batch.records > 0 => batch.waiters.push(waiter),
            (None, _) => {
                let _ = waiter.done.send(Ok(waiter.accepted));
            }
        }
    }
    let _ = cut(&flows, &tenant, &flow, &runs, open.take()).await;
}

fn new_batch(format: &Format, policy: &Batching) -> Batch {
    let mut body = BytesMut::new();
    if let Format::Csv { header } = format {
        body.extend_from_slice(header);
        body.extend_from_slice(b"\n");
    }
    Batch { format: format.clone(), body, records: 0, waiters: vec![], deadline: Instant::now() + policy.max_delay }
}

/// Starts a run of the batch once a run slot is free, and answers the requests it completes.
async fn cut(
    flows: &Weak<Flows>,
    tenant: &TenantId,
    flow: &Flow,
    runs: &Arc<Semaphore>,
    batch: Option<Batch>,
) -> Result<Option<String>, String> {
    let Some(batch) = batch else { return Ok(None) };
    let slot = runs.clone().acquire_owned().await.expect("the run semaphore is never closed");
    let started = match flows.upgrade() {
        None => Err("the gateway is shutting down".to_string()),
        Some(flows) => {
            let request = RunRequest {
                tenant: tenant.clone(),
                flow: flow.name().to_string(),
                input: batch.body.freeze(),
                callback_url: None,
                traceparent: None,
                parent_run: None,
                depth: 0,
            };
            executor::start(&flows, request).await.map_err(|e| e.to_string())
        }
    };
    match started {
        Ok((run_id, done)) => {
            tracing::debug!(%tenant, flow = flow.name(), run = %run_id, records = batch.records, "stream batch started");
            tokio::spawn(async move {
                let _ = done.await;
                drop(slot);
            });
            for mut waiter in batch.waiters {
                waiter.accepted.runs.push(run_id.clone());
                let _ = waiter.done.send(Ok(waiter.accepted));
            }
            Ok(Some(run_id))
        }
        Err(error) => {
            tracing::warn!(%tenant, flow = flow.name(), %error, records = batch.records, "stream batch not started");
            for waiter in batch.waiters {
                let _ = waiter.done.send(Err(error.clone()));
            }
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_split_into_records_and_csv_keeps_its_header() {
        let (format, records) = split(Format::JsonLines, Bytes::from_static(b"{\"a\":1}\r\n\n  \n{\"a\":2}")).unwrap();
        assert_eq!(format, Format::JsonLines);
        assert_eq!(records, vec![Bytes::from_static(b"{\"a\":1}"), Bytes::from_static(b"{\"a\":2}")]);
        let (format, records) =
            split(Format::Csv { header: Bytes::new() }, Bytes::from_static(b"id,v\n1,x\n2,y\n")).unwrap();
        assert_eq!(format, Format::Csv { header: Bytes::from_static(b"id,v") });
        assert_eq!(records.len(), 2);
        assert!(split(Format::JsonLines, Bytes::from_static(b"\xff\n")).is_err());
        let long_header = format!("{}\n1\n", "h".repeat(MAX_CSV_HEADER_BYTES + 1));
        let error = split(Format::Csv { header: Bytes::new() }, Bytes::from(long_header)).unwrap_err();
        assert!(error.to_string().contains("the limit is 65536"), "{error}");
    }

    #[test]
    fn the_csv_header_counts_once_per_batch() {
        let records = vec![Bytes::from_static(b"123456789"); 100];
        let csv = Format::Csv { header: Bytes::from(vec![b'h'; 99]) };
        let one_each = Batching { max_records: 1, ..Batching::default() };
        // The records' bytes and newlines, and each one's handle.
        let held = 1000 + 100 * RECORD_OVERHEAD;
        assert_eq!(pending_bytes(&Format::JsonLines, &records, &one_each), held);
        assert_eq!(pending_bytes(&csv, &records, &one_each), held + 100 * 100);
        // 10 records a batch: 10 batches cut, one more that was open, one left open.
        let ten_each = Batching { max_records: 10, ..Batching::default() };
        assert_eq!(pending_bytes(&csv, &records, &ten_each), held + 12 * 100);
        // A batch of 300 bytes holds the header and two records.
        let small = Batching { max_bytes: 300, ..Batching::default() };
        assert_eq!(pending_bytes(&csv, &records, &small), held + (1000 / 200 + 2) * 100);
        let tiny = Batching { max_bytes: 50, ..Batching::default() };
        assert_eq!(pending_bytes(&csv, &records, &tiny), held + 100 * 100);
    }
}
