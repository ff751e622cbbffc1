//! The export thread: batches leave for the collector, are retried, kept in the spool when the
//! collector cannot take them, and replayed from it in order when it can again.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::transport::{Transport, send};
use super::wire::export_request;
use super::{BATCH_DELAY, Shared, background_priority, export_io};
use crate::telemetry::spool::Spool;

/// The export thread: sends each full batch, and the filling one when the batch delay is over,
/// on a flush and at shutdown; keeps what the receiver cannot take in the spool and replays it.
pub(super) fn export_loop(shared: &Shared, transport: &Transport, mut spool: Option<Spool>) {
    background_priority();
    let mut replay = Replay::default();
    let mut due = Instant::now() + BATCH_DELAY;
    // The invocation spans' encoding buffer, reused from batch to batch.
    let mut encoded = Vec::new();
    loop {
        let (mut batch, resource, schema_url, finished, stop, dropped) = {
            let mut queue = shared.queue.lock().unwrap();
            loop {
                let now = Instant::now();
                if !queue.full.is_empty() || queue.shutdown || queue.flush_asked > queue.flush_done || now >= due {
                    break;
                }
                queue = shared.wake.wait_timeout(queue, due - now).unwrap().0;
            }
            let draining = queue.shutdown || queue.flush_asked > queue.flush_done || Instant::now() >= due;
            let batch = match queue.full.pop_front() {
                Some(batch) => batch,
                None => {
                    due = Instant::now() + BATCH_DELAY;
                    if queue.open.spans == 0 {
                        // Nothing for a whole delay: the tenant lets go of its buffers.
                        queue.spare = None;
                    }
                    let next = queue.spare.take().unwrap_or_default();
                    std::mem::replace(&mut queue.open, next)
                }
            };
            queue.spans -= batch.spans;
            // A flush (or shutdown) is done once nothing queued before it is left.
            let finished = (draining && queue.full.is_empty() && queue.open.spans == 0).then_some(queue.flush_asked);
            let dropped = std::mem::take(&mut queue.dropped);
            (batch, queue.resource.clone(), queue.resource_schema_url.clone(), finished, queue.shutdown, dropped)
        };
        if dropped > 0 {
            tracing::warn!(dropped, "the span export queue was full: spans dropped");
        }
        if batch.spans > 0 {
            let (request, invocations) =
                export_request(&resource, &schema_url, &mut batch, std::mem::take(&mut encoded));
            let spans = batch.spans;
            shared.queue.lock().unwrap().spare = Some(batch.emptied());
            if let Some(request) = deliver(transport, spool.as_mut(), request, spans) {
                wait_for_room(shared, transport, spool.as_mut().expect("only a spool is full"), &mut replay, request);
            }
            // The buffer back, once the transport has let go of it.
            encoded = invocations
                .try_into_mut()
                .map(|mut buffer| {
                    buffer.clear();
                    Vec::from(buffer)
                })
                .unwrap_or_default();
        } else {
            // Nothing to send: idle, the thread lets go of its buffer too.
            encoded = Vec::new();
        }
        if let Some(spool) = spool.as_mut() {
            replay.run(transport, spool);
        }
        if let Some(generation) = finished {
            shared.queue.lock().unwrap().flush_done = generation;
            shared.sent.notify_all();
            if stop {
                return;
            }
        }
    }
}

/// The spool's throughput, for `sfaas bench gateway`: `requests` export requests of
/// [`BATCH_SPANS`] invocation spans each, as the gateway encodes them, written to a spool in
/// `dir` (each synced, as an outage writes them), then replayed to `endpoint` oldest first.
/// Invocation spans per second written, and replayed.
#[cfg(feature = "bench")]
pub fn spool_throughput(
    config: &crate::telemetry::TelemetryConfig,
    endpoint: &str,
    dir: &std::path::Path,
    requests: usize,
) -> Result<(f64, f64), String> {
    use super::{BATCH_SPANS, Batch, EndedInvocation, InvocationTexts, encode_resource, span_flags};
    use opentelemetry_sdk::Resource;

    let transport = Transport::new(config, endpoint, super::transport::Signal::Traces)?;
    let mut spool = Spool::open(dir, u64::MAX).map_err(|e| e.to_string())?;
    let texts = InvocationTexts {
        function: "resize",
        call_id: "0190b4e2-7c3a-7d2e-9f00-aabbccddeeff",
        job: None,
        trace_state: "",
    };
    let lengths = texts.lengths();
    let mut batch = Batch::default();
    for i in 0..BATCH_SPANS {
        let ended = EndedInvocation {
            trace_id: (i as u128 + 1).to_be_bytes(),
            span_id: (i as u64 + 1).to_be_bytes(),
            parent_span_id: [0; 8],
            flags: span_flags(false, 1),
            start_ns: 1_796_000_000_000_000_000 + i as u64,
            end_ns: 1_796_000_000_001_000_000 + i as u64,
            kind: "exec",
            trigger: "http",
            execution_id: uuid::Uuid::from_u128(i as u128).into_bytes(),
            cold_start: false,
            cpu_ms: 3,
            wall_ms: 4,
            memory_peak_bytes: 1 << 20,
            bytes_in: 100,
            bytes_out: 200,
            log_bytes: 0,
            status: 200,
        };
        batch.invocations.push((ended, lengths));
        batch.texts.extend_from_slice(texts.function.as_bytes());
        batch.texts.extend_from_slice(texts.call_id.as_bytes());
        batch.spans += 1;
    }
    let resource = encode_resource(&Resource::builder_empty().build());
    let (request, _) = export_request(&resource, "", &mut batch, Vec::new());
    let spans = (requests * BATCH_SPANS) as f64;
    let started = Instant::now();
    for _ in 0..requests {
        spool.push(&request).map_err(|e| e.to_string())?;
    }
    let written = spans / started.elapsed().as_secs_f64();
    let started = Instant::now();
    Replay::default().run(&transport, &mut spool);
    if !spool.is_empty() {
        return Err("the sink did not take every spooled request".into());
    }
    Ok((written, spans / started.elapsed().as_secs_f64()))
}

/// Quick attempts at a request before it goes to the spool, and the pauses between them.
const RETRY_PAUSES: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(400)];

/// Sends a request, retrying briefly (a broken connection is replaced on the next attempt); if
/// the receiver still cannot take it, or older requests wait in the spool, it goes there. A
/// request the spool has no room for is handed back.
fn deliver(transport: &Transport, spool: Option<&mut Spool>, request: Vec<Bytes>, spans: usize) -> Option<Vec<Bytes>> {
    let waiting = spool.as_ref().is_some_and(|spool| !spool.is_empty());
    if !waiting {
        let mut pauses = RETRY_PAUSES.iter();
        let error = loop {
            match export_io().block_on(send(transport, request.clone())) {
                Ok(()) => return None,
                Err(error) if !error.retry => {
                    tracing::error!(%error.message, spans, "the OTLP receiver refused these spans; they are lost");
                    return None;
                }
                Err(error) => match pauses.next() {
                    Some(pause) => {
                        tracing::debug!(error = %error.message, spans, "span export failed; trying again");
                        std::thread::sleep(*pause)
                    }
                    None => break error,
                },
            }
        };
        if spool.is_none() {
            tracing::warn!(error = %error.message, spans, "span export failed; these spans are lost");
            return None;
        }
        tracing::warn!(error = %error.message, spans, "span export failed; keeping the spans in the spool");
    }
    let spool = spool?;
    match spool.push(&request) {
        Ok(true) => None,
        Ok(false) => Some(request),
        Err(error) => {
            tracing::error!(%error, spans, "cannot write the span spool: these spans are lost");
            None
        }
    }
}

/// Holds a request the spool has no room for until the receiver takes older ones and it fits:
/// meanwhile the tenant's queue fills and its new calls are refused (`SpanQueue::is_full`), so
/// that nothing billed is dropped while it goes on. Only at shutdown is it given up (counted in
/// [`crate::telemetry::spool::DROPPED_REQUESTS`]).
fn wait_for_room(shared: &Shared, transport: &Transport, spool: &mut Spool, replay: &mut Replay, request: Vec<Bytes>) {
    tracing::error!(
        "the span spool is full (--span-spool-bytes): the collector has been unreachable too long; this tenant's new calls wait until it is back"
    );
    loop {
        if shared.queue.lock().unwrap().shutdown {
            crate::telemetry::spool::DROPPED_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return tracing::error!("shutting down with the span spool full: these spans are lost");
        }
        std::thread::sleep(Duration::from_millis(200));
        replay.run(transport, spool);
        if spool.is_empty() {
            // (A request larger than the whole spool goes only this way.)
            match export_io().block_on(send(transport, request.clone())) {
                Ok(()) => return,
                Err(error) if !error.retry => {
                    return tracing::error!(%error.message, "the OTLP receiver refused these spans; they are lost");
                }
                Err(_) => continue,
            }
        }
        match spool.push(&request) {
            Ok(true) => return,
            Ok(false) => {}
            Err(error) => return tracing::error!(%error, "cannot write the span spool: these spans are lost"),
        }
    }
}

/// When to try the spool's oldest request again: at once after a success, with a growing pause
/// (0.5 s doubling to 5 s) while the receiver refuses.
struct Replay {
    next_try: Instant,
    pause: Duration,
}

impl Default for Replay {
    fn default() -> Self {
        Self { next_try: Instant::now(), pause: Duration::from_millis(500) }
    }
}

impl Replay {
    /// Sends the spooled requests, oldest first, until one fails.
    fn run(&mut self, transport: &Transport, spool: &mut Spool) {
        if spool.is_empty() || Instant::now() < self.next_try {
            return;
        }
        let mut sent = 0;
        while let Some(request) = spool.oldest() {
            let request = match request {
                Ok(request) => request,
                Err(error) => {
                    tracing::error!(%error, "a spooled span export request cannot be read; it is lost");
                    spool.pop();
                    continue;
                }
            };
            match export_io().block_on(send(transport, vec![request])) {
                Ok(()) => sent += 1,
                Err(error) if !error.retry => {
                    tracing::error!(%error.message, "the OTLP receiver refused a spooled request; it is lost");
                }
                Err(_) => {
                    self.next_try = Instant::now() + self.pause;
                    self.pause = (self.pause * 2).min(Duration::from_secs(5));
                    break;
                }
            }
            spool.pop();
        }
        if sent > 0 {
            tracing::info!(requests = sent, left = !spool.is_empty(), "replayed spooled span export requests");
        }
        if spool.is_empty() {
            *self = Self::default();
        }
    }
}
