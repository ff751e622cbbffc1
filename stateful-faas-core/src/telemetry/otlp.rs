//! OTLP export of the platform's spans: a span processor that writes the protobuf wire format
//! straight from the SDK's `SpanData` on the thread that ends the span, queues the bytes, and
//! sends batches over gRPC or HTTP from a thread of its own. Invocation spans, one per request,
//! skip even that: the gateway queues their fields ([`EndedInvocation`], a copy of about 150
//! bytes without allocating) and the export thread writes them, a whole batch in one loop.
//!
//! The SDK's batch processor with opentelemetry-otlp's exporter moves every `SpanData` to its
//! batch thread, converts it there into opentelemetry-proto's message structs (an allocation per
//! attribute) and then measures and encodes them on the I/O thread: the span's memory is
//! allocated on one core and freed on another, twice. Here nothing a span allocates crosses
//! threads; only fields and bytes in reused buffers do. `sfaas bench gateway` measures both in
//! the same run (BENCHMARKS.md, issue 2). The tests decode what this writes and compare it with
//! opentelemetry-proto's own conversion of the same spans, so the two cannot drift.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry::trace::{SpanId, SpanKind, Status};
use opentelemetry::{Array, Context, InstrumentationScope, KeyValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use super::spool::Spool;
use super::{OtlpProtocol, TelemetryConfig};

/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
const GRPC_EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The exporters' network I/O (gRPC connection tasks, HTTP requests) runs on a thread of its
/// own, so that sending a batch never holds up a request on the gateway's workers. One per
/// process, never dropped (a runtime cannot be dropped from async code).
static EXPORT_IO: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

fn export_io() -> &'static tokio::runtime::Runtime {
    EXPORT_IO.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sfaas-otlp-io")
            .on_thread_start(background_priority)
            .enable_all()
            .build()
            .expect("the span export runtime starts")
    })
}

/// Lowers the calling thread's scheduling priority (nice 10): span export then takes the CPU
/// when request handling leaves some, instead of preempting a gateway worker in the middle of
/// its requests; under contention it still gets about a tenth of a core, far more than it needs.
fn background_priority() {
    // SAFETY: setpriority on the calling thread's own id (Linux: nice is per thread).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
}

/// Exports every span a tenant's tracer provider ends (one processor per provider).
#[derive(Debug)]
pub struct OtlpProcessor {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// The export thread waits on it for a full batch, a flush or shutdown.
    wake: Condvar,
    /// Flushes wait on it for their batch to be sent.
    sent: Condvar,
    /// Spans queued at most; more are dropped (and counted) until the thread catches up.
    max_queue: usize,
}

#[derive(Debug, Default)]
struct Queue {
    /// `ResourceSpans.resource` (field 1), encoded once (the SDK hands the resource over at start).
    resource: Vec<u8>,
    resource_schema_url: String,
    /// Batches ready to send, and the one filling.
    full: std::collections::VecDeque<Batch>,
    open: Batch,
    /// Spans in `full` and `open`.
    spans: usize,
    dropped: u64,
    /// Flush generations asked for and done.
    flush_asked: u64,
    flush_done: u64,
    shutdown: bool,
    /// The invocation buffers of the last batch sent, emptied, for the next batch: a busy
    /// tenant's batches then fill memory already mapped instead of growing fresh buffers page by
    /// page, each page faulted and zeroed by the kernel on the gateway's worker that ends the
    /// span, with the queue locked. Dropped once a batch delay passes with nothing to send, so
    /// an idle tenant holds none.
    spare: Option<Batch>,
}

/// One export request's worth of spans, in two parts: the invocation spans, as their fields,
/// and the other spans, encoded (`ScopeSpans.spans` fields) per instrumentation scope.
#[derive(Debug, Default)]
struct Batch {
    invocations: Vec<(EndedInvocation, TextLengths)>,
    /// The invocations' texts, one after another, in the order of [`InvocationTexts`].
    texts: Vec<u8>,
    scopes: Vec<(InstrumentationScope, Vec<u8>)>,
    spans: usize,
    /// At least the encoded size of its spans.
    bytes: usize,
}

impl Batch {
    /// The same batch emptied, its invocation buffers kept to be filled again (the other
    /// spans' buffers are let go: those spans are few).
    fn emptied(mut self) -> Self {
        self.invocations.clear();
        self.texts.clear();
        self.scopes.clear();
        self.spans = 0;
        self.bytes = 0;
        self
    }
}

/// An invocation span as the gateway ends it: its fields, encoded into the `Span` message by
/// [`encode_invocation`] when the batch is sent, with its texts ([`InvocationTexts`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct EndedInvocation {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// All zero for a root span.
    pub parent_span_id: [u8; 8],
    /// `Span.flags`.
    pub flags: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub kind: &'static str,
    pub trigger: &'static str,
    /// `faas.invocation_id`, a UUID (written as its hyphenated text).
    pub execution_id: [u8; 16],
    pub cold_start: bool,
    pub cpu_ms: u64,
    pub wall_ms: u64,
    pub memory_peak_bytes: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub status: u16,
}

/// The texts of an [`EndedInvocation`], stored one after the other in [`Batch::texts`].
#[derive(Debug, Clone, Copy)]
pub(super) struct InvocationTexts<'a> {
    pub function: &'a str,
    pub call_id: &'a str,
    pub job: Option<&'a str>,
    /// The W3C `tracestate` header of its parent; empty for none.
    pub trace_state: &'a str,
}

/// Where an invocation's texts end in [`Batch::texts`]: their lengths.
#[derive(Debug, Clone, Copy)]
struct TextLengths {
    function: u32,
    call_id: u32,
    /// `None`: no job attribute.
    job: Option<u32>,
    trace_state: u32,
}

impl InvocationTexts<'_> {
    fn lengths(&self) -> TextLengths {
        let len = |text: &str| text.len() as u32;
        TextLengths {
            function: len(self.function),
            call_id: len(self.call_id),
            job: self.job.map(len),
            trace_state: len(self.trace_state),
        }
    }
}

impl TextLengths {
    /// Bytes the texts take in [`Batch::texts`].
    fn sum(&self) -> usize {
        [self.function, self.call_id, self.job.unwrap_or(0), self.trace_state].map(|len| len as usize).iter().sum()
    }
}

/// Bytes an invocation span's encoding takes at most besides its texts (and its name, which
/// repeats the function's): ids, times, the attributes' keys, numbers and framing.
const INVOCATION_FIXED_BYTES: usize = 704;

/// Spans and bytes per export request at most (receivers refuse gRPC messages over 4 MiB by
/// default), and the longest a span waits for its batch.
const BATCH_SPANS: usize = 2048;
const BATCH_BYTES: usize = 1 << 20;
const BATCH_DELAY: Duration = Duration::from_millis(500);

impl OtlpProcessor {
    /// A processor exporting to `endpoint` (gRPC: `http://host:4317`; HTTP: the base URL,
    /// `/v1/traces` is added) with the configured token as `Authorization: Bearer`, queueing
    /// at most `max_queue` spans.
    /// Requests the receiver cannot take are kept in `spool` (a folder) when one is given, and
    /// sent when it can, before anything newer.
    pub fn new(
        config: &TelemetryConfig,
        endpoint: &str,
        max_queue: usize,
        spool: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let transport = Transport::new(config, endpoint)?;
        let spool = spool
            .map(|dir| Spool::open(dir, config.spool_max_bytes))
            .transpose()
            .map_err(|error| format!("cannot open the span spool: {error}"))?;
        let shared = Arc::new(Shared::new(max_queue.max(1)));
        let thread = std::thread::Builder::new()
            .name("sfaas-span-export".into())
            .spawn({
                let shared = shared.clone();
                move || export_loop(&shared, &transport, spool)
            })
            .map_err(|error| format!("cannot start the span export thread: {error}"))?;
        Ok(Self { shared, thread: Mutex::new(Some(thread)) })
    }

    /// A handle on this processor's queue, for invocation spans, queued as their fields
    /// ([`super::InvocationSpan`]).
    pub fn queue(&self) -> SpanQueue {
        SpanQueue(self.shared.clone())
    }

    /// Asks the export thread to send what is queued and waits until it has (or `timeout`).
    fn flush(&self, timeout: Duration) -> OTelSdkResult {
        let deadline = Instant::now() + timeout;
        let mut queue = self.shared.queue.lock().unwrap();
        queue.flush_asked += 1;
        let generation = queue.flush_asked;
        self.shared.wake.notify_one();
        while queue.flush_done < generation {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(OTelSdkError::Timeout(timeout));
            }
            queue = self.shared.sent.wait_timeout(queue, left).unwrap().0;
        }
        Ok(())
    }
}

impl SpanProcessor for OtlpProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        // State and instance usage records: billed, and already taken from their meters.
        let billed = span.attributes.iter().any(|kv| kv.key.as_str() == crate::semconv::SFAAS_BILLABLE);
        let bound = if billed { Bound::Billing } else { Bound::Droppable };
        with_encoded(|encoded| {
            message(encoded, 2, |buf| encode_span(buf, &span));
            self.shared.push(&span.instrumentation_scope, encoded, bound);
        });
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.flush(EXPORT_TIMEOUT * 2)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let Some(thread) = self.thread.lock().unwrap().take() else {
            return Err(OTelSdkError::AlreadyShutdown);
        };
        let flushed = self.flush(timeout);
        self.shared.queue.lock().unwrap().shutdown = true;
        self.shared.wake.notify_one();
        let _ = thread.join();
        flushed
    }

    fn set_resource(&mut self, resource: &Resource) {
        let mut queue = self.shared.queue.lock().unwrap();
        queue.resource = encode_resource(resource);
        queue.resource_schema_url = resource.schema_url().unwrap_or_default().to_string();
    }
}

/// A processor's queue, taking spans already encoded (`Span` messages as `ScopeSpans.spans`
/// fields); they go out in the processor's batches, under its resource.
#[derive(Debug, Clone)]
pub struct SpanQueue(Arc<Shared>);

impl SpanQueue {
    /// Queues an invocation span, even past the queue's bound (it is what billing meters: the
    /// invoker refuses new invocations of a tenant whose queue is full instead, see
    /// [`SpanQueue::is_full`]); dropped (counted) only once the queue is shut down.
    pub(super) fn push_invocation(&self, invocation: &EndedInvocation, texts: &InvocationTexts) {
        let lengths = texts.lengths();
        self.0.add(INVOCATION_FIXED_BYTES + lengths.sum() + texts.function.len(), Bound::Billing, |batch| {
            batch.invocations.push((*invocation, lengths));
            batch.texts.extend_from_slice(texts.function.as_bytes());
            batch.texts.extend_from_slice(texts.call_id.as_bytes());
            batch.texts.extend_from_slice(texts.job.unwrap_or_default().as_bytes());
            batch.texts.extend_from_slice(texts.trace_state.as_bytes());
        });
    }
}

impl SpanQueue {
    /// Whether the queue holds as many spans as it may: the tenant's spans are not leaving as
    /// fast as they come (its collector is slow or away, and its spool full).
    pub fn is_full(&self) -> bool {
        self.0.queue.lock().unwrap().spans >= self.0.max_queue
    }
}

/// Whether a span may be dropped when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// Dropped (counted) past the queue's bound.
    Droppable,
    /// Billed usage: queued past the bound; what bounds it is that new invocations are
    /// refused while the queue is full, and that usage records come a few a second.
    Billing,
}

impl Shared {
    fn new(max_queue: usize) -> Self {
        Self { queue: Mutex::new(Queue::default()), wake: Condvar::new(), sent: Condvar::new(), max_queue }
    }

    /// Queues one encoded span, or drops it (counted) when the queue is full (unless `bound`
    /// says it is billed usage) or shut down.
    fn push(&self, scope: &InstrumentationScope, encoded: &[u8], bound: Bound) {
        self.add(encoded.len(), bound, |batch| queue_span(&mut batch.scopes, scope, encoded));
    }

    /// Adds one span of at most `bytes` encoded to the open batch with `add`, or drops it
    /// (counted) when the queue is full (a droppable span) or shut down; a batch that fills
    /// goes to the export thread, and the next one starts in the spare buffers.
    fn add(&self, bytes: usize, bound: Bound, add: impl FnOnce(&mut Batch)) {
        let mut queue = self.queue.lock().unwrap();
        if (queue.spans >= self.max_queue && bound == Bound::Droppable) || queue.shutdown {
            queue.dropped += 1;
            return;
        }
        let queue = &mut *queue;
        add(&mut queue.open);
        queue.open.spans += 1;
        queue.open.bytes += bytes;
        queue.spans += 1;
        if queue.open.spans >= BATCH_SPANS || queue.open.bytes >= BATCH_BYTES {
            let next = queue.spare.take().unwrap_or_default();
            queue.full.push_back(std::mem::replace(&mut queue.open, next));
            self.wake.notify_one();
        }
    }
}

/// Runs `f` on this thread's (emptied) encoding buffer, kept from span to span.
fn with_encoded<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    thread_local!(static ENCODED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) });
    ENCODED.with_borrow_mut(|encoded| {
        encoded.clear();
        f(encoded)
    })
}

/// Appends an encoded span to its scope's bytes.
fn queue_span(scopes: &mut Vec<(InstrumentationScope, Vec<u8>)>, scope: &InstrumentationScope, encoded: &[u8]) {
    match scopes.iter_mut().find(|(queued, _)| queued == scope) {
        Some((_, bytes)) => bytes.extend_from_slice(encoded),
        None => scopes.push((scope.clone(), encoded.to_vec())),
    }
}

/// The export thread: sends each full batch, and the filling one when the batch delay is over,
/// on a flush and at shutdown; keeps what the receiver cannot take in the spool and replays it.
fn export_loop(shared: &Shared, transport: &Transport, mut spool: Option<Spool>) {
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
    config: &TelemetryConfig,
    endpoint: &str,
    dir: &std::path::Path,
    requests: usize,
) -> Result<(f64, f64), String> {
    let transport = Transport::new(config, endpoint)?;
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
/// [`super::spool::DROPPED_REQUESTS`]).
fn wait_for_room(shared: &Shared, transport: &Transport, spool: &mut Spool, replay: &mut Replay, request: Vec<Bytes>) {
    tracing::error!(
        "the span spool is full (--span-spool-bytes): the collector has been unreachable too long; this tenant's new calls wait until it is back"
    );
    loop {
        if shared.queue.lock().unwrap().shutdown {
            super::spool::DROPPED_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

/// Why an export request was not taken, and whether sending it again may succeed (a receiver
/// that is down, busy or restarting) or not (it refused the request as invalid).
#[derive(Debug)]
struct ExportError {
    message: String,
    retry: bool,
}

impl From<String> for ExportError {
    fn from(message: String) -> Self {
        Self { message, retry: true }
    }
}

/// Where and how batches go.
#[derive(Debug)]
enum Transport {
    /// gRPC over HTTP/2 without TLS (h2c), with hyper's client: the request's buffers go to the
    /// socket as they are (tonic's client copies a message into a buffer of its own first).
    Grpc {
        client: Box<GrpcClient>,
        uri: http::Uri,
        authorization: Option<http::HeaderValue>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        authorization: Option<String>,
    },
}

type GrpcClient = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Chunks>;

impl Transport {
    fn new(config: &TelemetryConfig, endpoint: &str) -> Result<Self, String> {
        let bearer = config.token.as_ref().map(|token| format!("Bearer {token}"));
        Ok(match config.protocol {
            OtlpProtocol::Grpc => {
                let authorization = bearer
                    .map(|value| value.parse().map_err(|_| "the OTLP token is not visible ASCII".to_string()))
                    .transpose()?;
                let uri: http::Uri = format!("{}{GRPC_EXPORT_PATH}", endpoint.trim_end_matches('/'))
                    .parse()
                    .map_err(|error| format!("invalid OTLP/gRPC endpoint {endpoint:?}: {error}"))?;
                if uri.scheme_str() != Some("http") || uri.host().is_none() {
                    return Err(format!(
                        "invalid OTLP/gRPC endpoint {endpoint:?}: expected http://HOST:PORT (TLS is not supported)"
                    ));
                }
                let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
                connector.set_connect_timeout(Some(EXPORT_TIMEOUT));
                connector.set_nodelay(true);
                let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .http2_only(true)
                    .build(connector);
                Transport::Grpc { client: Box::new(client), uri, authorization }
            }
            OtlpProtocol::Http => {
                let client = reqwest::Client::builder()
                    .timeout(EXPORT_TIMEOUT)
                    .build()
                    .map_err(|error| format!("cannot build the OTLP/HTTP client: {error}"))?;
                let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
                reqwest::Url::parse(&url)
                    .map_err(|error| format!("invalid OTLP/HTTP endpoint {endpoint:?}: {error}"))?;
                Transport::Http { client, url, authorization: bearer }
            }
        })
    }
}

/// Sends one `ExportTraceServiceRequest`, given as the buffers it is made of.
async fn send(transport: &Transport, request: Vec<Bytes>) -> Result<(), ExportError> {
    let response = match transport {
        Transport::Grpc { client, uri, authorization } => {
            tokio::time::timeout(EXPORT_TIMEOUT, send_grpc(client, uri, authorization.as_ref(), request))
                .await
                .map_err(|_| format!("OTLP/gRPC export to {uri} timed out after {EXPORT_TIMEOUT:?}"))??
        }
        Transport::Http { client, url, authorization } => {
            let mut request =
                client.post(url).header(reqwest::header::CONTENT_TYPE, "application/x-protobuf").body(request.concat());
            if let Some(value) = authorization {
                request = request.header(reqwest::header::AUTHORIZATION, value);
            }
            let response =
                request.send().await.map_err(|error| format!("OTLP/HTTP export to {url} failed: {error}"))?;
            let status = response.status();
            let body = response.bytes().await.map_err(|error| format!("OTLP/HTTP export to {url} failed: {error}"))?;
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                let message = format!("OTLP/HTTP export to {url} answered {status}: {text}");
                return Err(ExportError { message, retry: status != reqwest::StatusCode::BAD_REQUEST });
            }
            ExportTraceServiceResponse::decode(body).unwrap_or_default()
        }
    };
    if let Some(partial) = response.partial_success
        && partial.rejected_spans > 0
    {
        tracing::warn!(rejected = partial.rejected_spans, message = %partial.error_message, "the OTLP receiver rejected spans");
    }
    Ok(())
}

/// A unary gRPC call of `TraceService/Export` (gRPC over HTTP/2: the message behind a 5-byte
/// prefix, the outcome in the `grpc-status` trailer, or header when the server answers with
/// headers only).
async fn send_grpc(
    client: &GrpcClient,
    uri: &http::Uri,
    authorization: Option<&http::HeaderValue>,
    mut request: Vec<Bytes>,
) -> Result<ExportTraceServiceResponse, ExportError> {
    use http_body_util::BodyExt;

    let len: usize = request.iter().map(Bytes::len).sum();
    let len = u32::try_from(len).map_err(|_| format!("an export request of {len} bytes is too large for gRPC"))?;
    let mut prefix = [0u8; 5]; // not compressed, then the length (big-endian)
    prefix[1..].copy_from_slice(&len.to_be_bytes());
    request.insert(0, Bytes::copy_from_slice(&prefix));
    let mut builder = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .header(http::header::USER_AGENT, concat!("sfaas/", env!("CARGO_PKG_VERSION")))
        .header("grpc-timeout", format!("{}m", EXPORT_TIMEOUT.as_millis()));
    if let Some(value) = authorization {
        builder = builder.header(http::header::AUTHORIZATION, value);
    }
    let request = builder.body(Chunks(coalesce(request))).map_err(|error| error.to_string())?;
    let response =
        client.request(request).await.map_err(|error| format!("OTLP/gRPC endpoint {uri} unavailable: {error:?}"))?;
    let (head, body) = response.into_parts();
    if head.status != http::StatusCode::OK {
        return Err(format!("OTLP/gRPC export to {uri} answered HTTP {}", head.status).into());
    }
    let body = body.collect().await.map_err(|error| format!("OTLP/gRPC export to {uri} failed: {error}"))?;
    let trailers = body.trailers();
    let field = |name: &str| trailers.and_then(|t| t.get(name)).or_else(|| head.headers.get(name));
    // Not `tonic::Status::from_header_map`: it panics on a malformed `grpc-status-details`.
    match field("grpc-status").map(|code| tonic::Code::from_bytes(code.as_bytes())) {
        Some(tonic::Code::Ok) => {}
        Some(code) => {
            let message = field("grpc-message").map(|m| percent_encoding::percent_decode(m.as_bytes()));
            let message = message.map(|m| m.decode_utf8_lossy().into_owned()).unwrap_or_default();
            let message = format!("OTLP/gRPC export to {uri} failed: {code:?}: {message}");
            return Err(ExportError { message, retry: code != tonic::Code::InvalidArgument });
        }
        None => return Err(format!("OTLP/gRPC export to {uri}: the answer has no grpc-status").into()),
    }
    let body = body.to_bytes();
    // The answer's message, behind its own 5-byte prefix (a compressed one is not decoded: its
    // only content is the partial-success count, which only a warning reads).
    Ok(match body.get(..5) {
        Some([0, ..]) => ExportTraceServiceResponse::decode(&body[5..]).unwrap_or_default(),
        _ => ExportTraceServiceResponse::default(),
    })
}

/// Chunks below this size are joined with their neighbours before they are sent.
const SMALL_CHUNK: usize = 16 << 10;

/// The request's buffers with the small ones joined: each chunk goes out as a DATA frame of its
/// own, and a receiver counts small frames as an attack. The collector's HTTP/2 server (h2)
/// closed the connection with `GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames"` after about 50 s
/// of the demo's exports (5-byte gRPC prefixes and framing pieces, each a frame), and the next
/// export found the connection broken ("broken pipe"). The spans' own buffers, the large part,
/// are still not copied.
fn coalesce(request: Vec<Bytes>) -> std::collections::VecDeque<Bytes> {
    let mut chunks = std::collections::VecDeque::with_capacity(request.len());
    let mut small = bytes::BytesMut::new();
    for chunk in request {
        if chunk.len() < SMALL_CHUNK {
            small.extend_from_slice(&chunk);
            continue;
        }
        if !small.is_empty() {
            chunks.push_back(small.split().freeze());
        }
        chunks.push_back(chunk);
    }
    if !small.is_empty() {
        chunks.push_back(small.freeze());
    }
    chunks
}

/// A request body sent as the buffers it is made of, one frame each, without joining them.
#[derive(Debug)]
struct Chunks(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.get_mut().0.pop_front().map(|chunk| Ok(http_body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.iter().map(|chunk| chunk.len() as u64).sum())
    }
}

// The wire format. Field numbers are those of opentelemetry-proto's `trace.proto`,
// `common.proto` and `resource.proto`. As prost does, scalar fields at their default value are
// left out, while present messages and the members of a `oneof` are always written.

/// The export request for a batch: its invocation spans encoded into `buffer` (emptied first),
/// then [`frame`]d with its other spans, which are taken out of it. The buffer comes back too,
/// shared with the request, to be reused once the transport has let go of it.
fn export_request(
    resource: &[u8],
    resource_schema_url: &str,
    batch: &mut Batch,
    mut buffer: Vec<u8>,
) -> (Vec<Bytes>, Bytes) {
    buffer.clear();
    let mut texts = &batch.texts[..];
    for (invocation, lengths) in &batch.invocations {
        message(&mut buffer, 2, |buf| encode_invocation(buf, invocation, lengths, &mut texts));
    }
    let invocations = Bytes::from(buffer);
    let request = frame(resource, resource_schema_url, std::mem::take(&mut batch.scopes), invocations.clone());
    (request, invocations)
}

/// An `ExportTraceServiceRequest` of one `ResourceSpans` with one `ScopeSpans` per
/// instrumentation scope, around spans already encoded: those of `scopes`, and `invocations`
/// under the platform's scope. It is returned as the buffers to send one after the other: the
/// framing, written with every length known, and between its pieces the spans' buffers, which
/// are not copied.
fn frame(
    resource: &[u8],
    resource_schema_url: &str,
    scopes: Vec<(InstrumentationScope, Vec<u8>)>,
    invocations: Bytes,
) -> Vec<Bytes> {
    let platform = super::invocation_scope();
    let mut scopes: Vec<(InstrumentationScope, Vec<Bytes>)> =
        scopes.into_iter().map(|(scope, spans)| (scope, vec![Bytes::from(spans)])).collect();
    if !invocations.is_empty() {
        match scopes.iter_mut().find(|(scope, _)| scope == platform) {
            Some((_, spans)) => spans.push(invocations),
            None => scopes.push((platform.clone(), vec![invocations])),
        }
    }
    /// A `ScopeSpans`: its scope (field 1) before its spans, its schema URL (field 3) after.
    struct Part {
        head: Vec<u8>,
        spans: Vec<Bytes>,
        tail: Vec<u8>,
        len: usize,
    }
    let scopes: Vec<Part> = scopes
        .into_iter()
        .map(|(scope, spans)| {
            let mut head = Vec::new();
            message(&mut head, 1, |buf| {
                string(buf, 1, scope.name());
                string(buf, 2, scope.version().unwrap_or_default());
                for attribute in scope.attributes() {
                    key_value(buf, 3, attribute);
                }
            });
            let mut tail = Vec::new();
            string(&mut tail, 3, scope.schema_url().unwrap_or_default());
            let len = head.len() + spans.iter().map(Bytes::len).sum::<usize>() + tail.len();
            Part { head, spans, tail, len }
        })
        .collect();
    let mut resource_tail = Vec::new();
    string(&mut resource_tail, 3, resource_schema_url);
    let resource_spans_len = resource.len()
        + scopes.iter().map(|part| 1 + encoded_len_varint(part.len as u64) + part.len).sum::<usize>()
        + resource_tail.len();

    let mut chunks = Vec::new();
    let mut framing = Vec::with_capacity(256 + resource.len());
    encode_key(1, WireType::LengthDelimited, &mut framing);
    encode_varint(resource_spans_len as u64, &mut framing);
    framing.extend_from_slice(resource);
    for Part { head, spans, tail, len } in scopes {
        encode_key(2, WireType::LengthDelimited, &mut framing);
        encode_varint(len as u64, &mut framing);
        framing.extend_from_slice(&head);
        for spans in spans {
            chunks.push(Bytes::from(std::mem::take(&mut framing)));
            chunks.push(spans);
        }
        framing.extend_from_slice(&tail);
    }
    framing.extend_from_slice(&resource_tail);
    chunks.push(Bytes::from(framing));
    chunks
}

/// `ResourceSpans.resource` (field 1) for a resource.
pub fn encode_resource(resource: &Resource) -> Vec<u8> {
    let mut buf = Vec::new();
    message(&mut buf, 1, |buf| {
        for (key, value) in resource.iter() {
            message(buf, 1, |buf| {
                string(buf, 1, key.as_str());
                message(buf, 2, |buf| any_value(buf, value));
            });
        }
    });
    buf
}

fn encode_span(buf: &mut Vec<u8>, span: &SpanData) {
    let context = &span.span_context;
    bytes(buf, 1, &context.trace_id().to_bytes());
    bytes(buf, 2, &context.span_id().to_bytes());
    string(buf, 3, &context.trace_state().header());
    if span.parent_span_id != SpanId::INVALID {
        bytes(buf, 4, &span.parent_span_id.to_bytes());
    }
    fixed32(buf, 16, span_flags(span.parent_span_is_remote, context.trace_flags().to_u8()));
    string(buf, 5, &span.name);
    uint(
        buf,
        6,
        match span.span_kind {
            SpanKind::Internal => 1,
            SpanKind::Server => 2,
            SpanKind::Client => 3,
            SpanKind::Producer => 4,
            SpanKind::Consumer => 5,
        },
    );
    fixed64(buf, 7, nanos(span.start_time));
    fixed64(buf, 8, nanos(span.end_time));
    for attribute in &span.attributes {
        key_value(buf, 9, attribute);
    }
    uint(buf, 10, u64::from(span.dropped_attributes_count));
    for event in span.events.iter() {
        message(buf, 11, |buf| {
            fixed64(buf, 1, nanos(event.timestamp));
            string(buf, 2, &event.name);
            for attribute in &event.attributes {
                key_value(buf, 3, attribute);
            }
            uint(buf, 4, u64::from(event.dropped_attributes_count));
        });
    }
    uint(buf, 12, u64::from(span.events.dropped_count));
    for link in span.links.iter() {
        message(buf, 13, |buf| {
            let context = &link.span_context;
            bytes(buf, 1, &context.trace_id().to_bytes());
            bytes(buf, 2, &context.span_id().to_bytes());
            string(buf, 3, &context.trace_state().header());
            for attribute in &link.attributes {
                key_value(buf, 4, attribute);
            }
            uint(buf, 5, u64::from(link.dropped_attributes_count));
            fixed32(buf, 6, span_flags(context.is_remote(), context.trace_flags().to_u8()));
        });
    }
    uint(buf, 14, u64::from(span.links.dropped_count));
    message(buf, 15, |buf| match &span.status {
        Status::Unset => {}
        Status::Ok => uint(buf, 3, 1),
        Status::Error { description } => {
            string(buf, 2, description);
            uint(buf, 3, 2);
        }
    });
}

/// An invocation's span as [`super::sdk_invocation_span`] has the SDK build it and
/// [`encode_span`] writes it, written from its fields, its texts taken from the front of `texts`
/// (the tests compare the two).
fn encode_invocation(buf: &mut Vec<u8>, i: &EndedInvocation, lengths: &TextLengths, texts: &mut &[u8]) {
    use crate::semconv as c;
    let mut text = |len: u32| {
        let (text, rest) = texts.split_at(len as usize);
        *texts = rest;
        text
    };
    let (function, call_id) = (text(lengths.function), text(lengths.call_id));
    let job = lengths.job.map(&mut text);
    let trace_state = text(lengths.trace_state);
    bytes(buf, 1, &i.trace_id);
    bytes(buf, 2, &i.span_id);
    bytes(buf, 3, trace_state);
    if i.parent_span_id != [0; 8] {
        bytes(buf, 4, &i.parent_span_id);
    }
    fixed32(buf, 16, i.flags);
    message(buf, 5, |buf| {
        // The name, `semconv::invoke_span_name` written in place (a string's bytes, as a message's).
        buf.extend_from_slice(c::INVOKE_SPAN_PREFIX.as_bytes());
        buf.extend_from_slice(function);
    });
    uint(buf, 6, 2); // SERVER
    fixed64(buf, 7, i.start_ns);
    fixed64(buf, 8, i.end_ns);
    // `Span.attributes` (field 9), by kind of value.
    let text =
        |buf: &mut Vec<u8>, key: &str, value: &[u8]| key_value_with(buf, 9, key, |buf| always_bytes(buf, 1, value));
    let int =
        |buf: &mut Vec<u8>, key: &str, value: u64| key_value_with(buf, 9, key, |buf| int_value(buf, value as i64));
    let flag = |buf: &mut Vec<u8>, key: &str, value: bool| key_value_with(buf, 9, key, |buf| bool_value(buf, value));
    text(buf, c::FAAS_NAME, function);
    let mut execution_id = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::from_bytes(i.execution_id).hyphenated().encode_lower(&mut execution_id);
    text(buf, c::FAAS_INVOCATION_ID, &execution_id);
    text(buf, c::SFAAS_CALL_ID, call_id);
    text(buf, c::FAAS_TRIGGER, i.trigger.as_bytes());
    text(buf, c::SFAAS_FUNCTION_KIND, i.kind.as_bytes());
    if let Some(job) = job {
        text(buf, c::SFAAS_STATE_JOB, job);
    }
    flag(buf, c::FAAS_COLDSTART, i.cold_start);
    int(buf, c::SFAAS_CPU_MS, i.cpu_ms);
    int(buf, c::SFAAS_WALL_MS, i.wall_ms);
    int(buf, c::SFAAS_MEMORY_PEAK_BYTES, i.memory_peak_bytes);
    int(buf, c::SFAAS_BYTES_IN, i.bytes_in);
    int(buf, c::SFAAS_BYTES_OUT, i.bytes_out);
    int(buf, c::HTTP_RESPONSE_STATUS_CODE, u64::from(i.status));
    flag(buf, c::SFAAS_BILLABLE, true);
    message(buf, 15, |buf| {
        if let Some(description) = super::error_status(i.status) {
            string(buf, 2, &description);
            uint(buf, 3, 2);
        }
    });
}

/// `SpanFlags`: the W3C trace flags, "has is-remote" (0x100) and "is remote" (0x200).
pub(super) fn span_flags(remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | 0x100 | if remote { 0x200 } else { 0 }
}

pub(super) fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

fn key_value(buf: &mut Vec<u8>, tag: u32, attribute: &KeyValue) {
    key_value_with(buf, tag, attribute.key.as_str(), |buf| any_value(buf, &attribute.value));
}

/// A `KeyValue` message in field `tag`, its value's `AnyValue` members written by `value`.
fn key_value_with(buf: &mut Vec<u8>, tag: u32, key: &str, value: impl FnOnce(&mut Vec<u8>)) {
    message(buf, tag, |buf| {
        string(buf, 1, key);
        message(buf, 2, value);
    });
}

/// The members of `AnyValue`'s `oneof`.
fn any_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(value) => bool_value(buf, *value),
        Value::I64(value) => int_value(buf, *value),
        Value::F64(value) => {
            encode_key(4, WireType::SixtyFourBit, buf);
            buf.extend_from_slice(&value.to_le_bytes());
        }
        Value::Array(array) => message(buf, 5, |buf| match array {
            Array::Bool(values) => values.iter().for_each(|v| message(buf, 1, |buf| any_value(buf, &Value::Bool(*v)))),
            Array::I64(values) => values.iter().for_each(|v| message(buf, 1, |buf| any_value(buf, &Value::I64(*v)))),
            Array::F64(values) => values.iter().for_each(|v| message(buf, 1, |buf| any_value(buf, &Value::F64(*v)))),
            Array::String(values) => {
                values.iter().for_each(|v| message(buf, 1, |buf| always_string(buf, 1, v.as_str())))
            }
            other => message(buf, 1, |buf| always_string(buf, 1, &other.to_string())),
        }),
        // Strings, and any kind a later SDK adds, as their text.
        other => always_string(buf, 1, &other.as_str()),
    }
}

/// `AnyValue.bool_value`.
fn bool_value(buf: &mut Vec<u8>, value: bool) {
    encode_key(2, WireType::Varint, buf);
    encode_varint(u64::from(value), buf);
}

/// `AnyValue.int_value`.
fn int_value(buf: &mut Vec<u8>, value: i64) {
    encode_key(3, WireType::Varint, buf);
    encode_varint(value as u64, buf);
}

/// A length-delimited field holding a message, written even when empty. Its length is known
/// only once the body is written: one byte is reserved for it and the body moved in the case
/// that the length needs more (a span, a batch).
fn message(buf: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) {
    encode_key(tag, WireType::LengthDelimited, buf);
    let at = buf.len();
    buf.push(0);
    body(buf);
    let len = buf.len() - at - 1;
    if len < 0x80 {
        buf[at] = len as u8;
    } else {
        let more = encoded_len_varint(len as u64) - 1;
        buf.resize(buf.len() + more, 0);
        buf.copy_within(at + 1..at + 1 + len, at + 1 + more);
        encode_varint(len as u64, &mut &mut buf[at..at + 1 + more]);
    }
}

fn string(buf: &mut Vec<u8>, tag: u32, value: &str) {
    bytes(buf, tag, value.as_bytes());
}

fn always_string(buf: &mut Vec<u8>, tag: u32, value: &str) {
    always_bytes(buf, tag, value.as_bytes());
}

fn always_bytes(buf: &mut Vec<u8>, tag: u32, value: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value);
}

fn bytes(buf: &mut Vec<u8>, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.extend_from_slice(value);
    }
}

fn uint(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

fn fixed64(buf: &mut Vec<u8>, tag: u32, value: u64) {
    if value != 0 {
        encode_key(tag, WireType::SixtyFourBit, buf);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

fn fixed32(buf: &mut Vec<u8>, tag: u32, value: u32) {
    if value != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, buf);
        buf.extend_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {

    use super::{SMALL_CHUNK, coalesce};
    use bytes::Bytes;

    #[test]
    fn small_chunks_go_out_joined_and_large_ones_as_they_are() {
        let large = Bytes::from(vec![7u8; SMALL_CHUNK]);
        let chunks: Vec<Bytes> = [&b"\0\0\0\0\x05"[..], b"ab", &large, b"c", b"de", &large]
            .iter()
            .map(|chunk| Bytes::copy_from_slice(chunk))
            .collect();
        let joined: Vec<Bytes> = coalesce(chunks.clone()).into();
        let lengths: Vec<usize> = joined.iter().map(Bytes::len).collect();
        assert_eq!(lengths, [7, SMALL_CHUNK, 3, SMALL_CHUNK]);
        assert_eq!(joined.concat(), chunks.concat());
    }
    use std::borrow::Cow;
    use std::time::Duration;

    use opentelemetry::trace::{Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
    use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use prost::Message;

    use super::{Batch, encode_resource, encode_span, export_request, message, queue_span};

    /// The request the export thread sends for `batch`, its buffers joined.
    fn request(resource: &[u8], schema_url: &str, batch: &mut Batch) -> Vec<u8> {
        export_request(resource, schema_url, batch, Vec::new()).0.concat()
    }

    /// A batch of `spans`, each encoded as `on_end` does.
    fn sdk_batch(spans: &[SpanData]) -> Batch {
        let mut batch = Batch::default();
        for span in spans {
            let mut encoded = Vec::new();
            message(&mut encoded, 2, |buf| encode_span(buf, span));
            queue_span(&mut batch.scopes, &span.instrumentation_scope, &encoded);
        }
        batch
    }

    /// What the processor sends for `spans`.
    fn encode_request(resource: &[u8], schema_url: &str, spans: &[SpanData]) -> Vec<u8> {
        request(resource, schema_url, &mut sdk_batch(spans))
    }

    fn span(index: u64, scope: &InstrumentationScope) -> SpanData {
        let at = |ns: u64| std::time::UNIX_EPOCH + Duration::from_nanos(ns);
        let context = SpanContext::new(
            TraceId::from(0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10 + u128::from(index)),
            SpanId::from(0x1112_1314_1516_1718 + index),
            if index.is_multiple_of(2) { TraceFlags::SAMPLED } else { TraceFlags::default() },
            false,
            if index.is_multiple_of(3) {
                TraceState::from_key_value([("vendor", "x1")]).unwrap()
            } else {
                TraceState::NONE
            },
        );
        let long = "é".repeat(200);
        let mut events = SpanEvents::default();
        events.events.push(Event::new("retry", at(1_700_000_000_000_000_500), vec![KeyValue::new("attempt", 2)], 1));
        events.dropped_count = u32::from(index == 2);
        let mut links = SpanLinks::default();
        if index % 2 == 1 {
            links.links.push(Link::new(
                SpanContext::new(TraceId::from(7), SpanId::from(8), TraceFlags::SAMPLED, true, TraceState::NONE),
                vec![KeyValue::new("link.kind", "follows")],
                3,
            ));
        }
        SpanData {
            span_context: context,
            parent_span_id: if index == 0 { SpanId::INVALID } else { SpanId::from(0x2122_2324_2526_2728) },
            parent_span_is_remote: index == 1,
            span_kind: [SpanKind::Internal, SpanKind::Server, SpanKind::Client, SpanKind::Producer, SpanKind::Consumer]
                [index as usize % 5]
                .clone(),
            name: Cow::Owned(format!("invoke f{index}")),
            start_time: at(1_700_000_000_000_000_000 + index),
            end_time: at(1_700_000_000_123_456_789 + index),
            attributes: vec![
                KeyValue::new("faas.name", "f"),
                KeyValue::new("faas.invocation_id", format!("call-{index}")),
                KeyValue::new("sfaas.cpu_ms", 12i64),
                KeyValue::new("negative", -3i64),
                KeyValue::new("ratio", 0.25),
                KeyValue::new("zero", 0i64),
                KeyValue::new("flag", false),
                KeyValue::new("empty", ""),
                KeyValue::new("long", long),
                KeyValue::new(
                    "nodes",
                    Value::Array(Array::String(vec![StringValue::from("a"), StringValue::from("b")])),
                ),
                KeyValue::new("codes", Value::Array(Array::I64(vec![1, -1]))),
                KeyValue::new("bits", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("weights", Value::Array(Array::F64(vec![]))),
            ],
            dropped_attributes_count: u32::from(index == 3),
            events,
            links,
            status: match index % 3 {
                0 => Status::Unset,
                1 => Status::Ok,
                _ => Status::error("function answered 500"),
            },
            instrumentation_scope: scope.clone(),
        }
    }

    /// What this module writes decodes to exactly the request opentelemetry-proto's own
    /// conversion (the one opentelemetry-otlp sends) builds from the same spans.
    #[test]
    fn the_encoding_equals_opentelemetry_protos_conversion() {
        let platform = InstrumentationScope::builder("stateful-faas").build();
        let other = InstrumentationScope::builder("flows")
            .with_version("1.2.3")
            .with_schema_url("https://opentelemetry.io/schemas/1.30.0")
            .with_attributes([KeyValue::new("scope.attr", true)])
            .build();
        let batch: Vec<SpanData> = (0..7).map(|i| span(i, if i == 4 { &other } else { &platform })).collect();
        let resource = Resource::builder_empty()
            .with_schema_url(
                [KeyValue::new("service.name", "stateful-faas"), KeyValue::new("service.namespace", "acme")],
                "https://opentelemetry.io/schemas/1.29.0",
            )
            .build();

        let ours = ExportTraceServiceRequest::decode(
            &encode_request(&encode_resource(&resource), resource.schema_url().unwrap(), &batch)[..],
        )
        .expect("a valid ExportTraceServiceRequest");
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &ResourceAttributesWithSchema::from(&resource)),
        };
        assert_eq!(ours, theirs);
        assert_eq!(ours.resource_spans[0].scope_spans.len(), 2);
        assert_eq!(ours.resource_spans[0].scope_spans[0].spans.len(), 6);
    }

    /// Keeps the spans the SDK ends.
    #[derive(Debug, Clone, Default)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<SpanData>>>);

    impl opentelemetry_sdk::trace::SpanProcessor for Capture {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().unwrap().push(span);
        }
        fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
            Ok(())
        }
    }

    /// The gateway's invocation span, written straight to a processor's queue, is the span the
    /// SDK builds for the same invocation (with the platform's always-on sampler), as
    /// opentelemetry-proto converts it: all but its own span id and clock readings, for a root
    /// span and for a child of an unsampled remote parent with a trace state, a job and a 5xx.
    #[test]
    fn an_invocation_span_written_directly_equals_the_sdks() {
        use opentelemetry::trace::{TraceContextExt, TracerProvider};
        use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;

        use super::super::{InvocationSpan, Invoked, sdk_invocation_span};
        use super::{Shared, SpanQueue};
        use crate::function::Usage;

        let capture = Capture::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
            .with_span_processor(capture.clone())
            .build();
        let tracer = provider.tracer(crate::semconv::SERVICE_NAME);
        let remote = SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            SpanId::from(0x00f0_67aa_0ba9_02b7),
            TraceFlags::default(),
            true,
            TraceState::from_key_value([("vendor", "x1")]).unwrap(),
        );
        let parents = [opentelemetry::Context::new(), opentelemetry::Context::new().with_remote_span_context(remote)];
        let usages = [Usage::default(), Usage { cpu_ns: 12_300_000, peak_memory_bytes: 3 << 20, cold_start: true }];
        let invocations = [
            Invoked {
                function: "noop",
                kind: "builtin",
                execution_id: uuid::Uuid::now_v7(),
                call_id: "call-1",
                trigger: "http",
                job: None,
                usage: &usages[0],
                wall: Duration::from_micros(300),
                bytes_in: 0,
                bytes_out: 4,
                status: 200,
            },
            Invoked {
                function: "resize-ünïcode-".repeat(12).leak(),
                kind: "exec",
                execution_id: uuid::Uuid::from_u128(0x0190b4e2_7c3a_7d2e_9f00_aabbccddeeff),
                call_id: "0190b4e2-7c3a-7d2e-9f00-aabbccddeeff",
                trigger: "pubsub",
                job: Some("run-42"),
                usage: &usages[1],
                wall: Duration::from_millis(1500),
                bytes_in: 1 << 20,
                bytes_out: 17,
                status: 503,
            },
        ];
        for (parent, invoked) in parents.iter().zip(&invocations) {
            let shared = std::sync::Arc::new(Shared::new(10));
            let span = InvocationSpan::start(SpanQueue(shared.clone()), parent);
            span.end(invoked);
            let mut queue = shared.queue.lock().unwrap();
            assert_eq!((queue.open.invocations.len(), queue.open.scopes.len()), (1, 0));
            let request = ExportTraceServiceRequest::decode(&request(&[], "", &mut queue.open)[..]).unwrap();
            let scope_spans = &request.resource_spans[0].scope_spans;
            assert_eq!(scope_spans.len(), 1);
            assert_eq!(scope_spans[0].scope.as_ref().unwrap().name, crate::semconv::SERVICE_NAME);
            let mut ours: ProtoSpan = scope_spans[0].spans[0].clone();

            sdk_invocation_span(&tracer, parent, invoked);
            let sdk = capture.0.lock().unwrap().pop().expect("the SDK recorded the span");
            let theirs = ProtoSpan::from(sdk);
            assert!(ours.start_time_unix_nano > 0 && ours.end_time_unix_nano >= ours.start_time_unix_nano);
            assert_ne!(ours.span_id, theirs.span_id, "a span id of its own");
            ours.span_id = theirs.span_id.clone();
            if !parent.has_active_span() {
                assert_ne!(ours.trace_id, theirs.trace_id, "a root starts a trace of its own");
                ours.trace_id = theirs.trace_id.clone();
            }
            ours.start_time_unix_nano = theirs.start_time_unix_nano;
            ours.end_time_unix_nano = theirs.end_time_unix_nano;
            assert_eq!(ours, theirs);
        }
    }

    /// A batch's invocation spans go out under the platform's scope, after the SDK's spans of
    /// that scope when it has some, or in a scope entry of their own; a batch's size counts at
    /// least what each of them encodes to; and a request of several hundred kilobytes (lengths
    /// of three bytes) decodes.
    #[test]
    fn invocation_spans_join_the_platforms_scope_and_their_size_is_bounded() {
        use opentelemetry::trace::TraceContextExt;

        use super::super::{InvocationSpan, Invoked};
        use super::{INVOCATION_FIXED_BYTES, Shared, SpanQueue};
        use crate::function::Usage;

        let usage = Usage { cpu_ns: u64::MAX, peak_memory_bytes: u64::MAX, cold_start: true };
        let parent = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(1),
            SpanId::from(2),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x".repeat(200))]).unwrap(),
        ));
        let long = "f".repeat(200);
        let platform = InstrumentationScope::builder(crate::semconv::SERVICE_NAME).build();
        let other = InstrumentationScope::builder("flows").build();
        for sdk_scopes in [vec![], vec![&other], vec![&other, &platform]] {
            let shared = std::sync::Arc::new(Shared::new(10_000));
            for (i, scope) in sdk_scopes.iter().enumerate() {
                let mut encoded = Vec::new();
                message(&mut encoded, 2, |buf| encode_span(buf, &span(i as u64, scope)));
                shared.push(scope, &encoded, super::Bound::Droppable);
            }
            for i in 0..500 {
                InvocationSpan::start(SpanQueue(shared.clone()), &parent).end(&Invoked {
                    function: &long,
                    kind: "exec",
                    execution_id: uuid::Uuid::now_v7(),
                    call_id: &"c".repeat(128),
                    trigger: "http",
                    job: Some(&long),
                    usage: &usage,
                    wall: Duration::MAX,
                    bytes_in: usize::MAX,
                    bytes_out: i,
                    status: 599,
                });
            }
            let mut queue = shared.queue.lock().unwrap();
            assert!(queue.full.is_empty());
            let counted = queue.open.bytes;
            let body = request(&[], "", &mut queue.open);
            let request = ExportTraceServiceRequest::decode(&body[..]).unwrap();
            let scope_spans = &request.resource_spans[0].scope_spans;
            let names: Vec<&str> = scope_spans.iter().map(|s| s.scope.as_ref().unwrap().name.as_str()).collect();
            let counts: Vec<usize> = scope_spans.iter().map(|s| s.spans.len()).collect();
            match sdk_scopes.len() {
                0 => assert_eq!((names, counts), (vec![crate::semconv::SERVICE_NAME], vec![500])),
                1 => assert_eq!((names, counts), (vec!["flows", crate::semconv::SERVICE_NAME], vec![1, 500])),
                _ => {
                    assert_eq!((names, counts), (vec!["flows", crate::semconv::SERVICE_NAME], vec![1, 501]));
                    assert_eq!(scope_spans[1].spans[0].name, "invoke f1", "the SDK's span first");
                }
            }
            assert!(body.len() > 1 << 14 && body.len() <= counted, "{} bytes, counted {counted}", body.len());
            let invocation = scope_spans.last().unwrap().spans.last().unwrap();
            assert_eq!(invocation.name, format!("invoke {long}"));
            // What `push_invocation` counts for it: the fixed part, its texts and its name.
            let bound = INVOCATION_FIXED_BYTES + (200 + 128 + 200 + "vendor=".len() + 200) + 200;
            let encoded = invocation.encoded_len() + 3; // with its field key and length
            assert!(encoded <= bound, "{encoded} bytes encoded, {bound} counted");
        }
    }

    /// The gRPC client, against tonic's server with the generated `TraceService`: a request sent
    /// as several buffers arrives whole, with the token; the receiver's partial success is read;
    /// an error status comes back with its code and its (percent-decoded) message; a receiver
    /// that is not there and an endpoint it cannot use are clear errors.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_grpc_client_is_understood_by_tonics_server() {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
            TraceService, TraceServiceServer,
        };
        use opentelemetry_proto::tonic::collector::trace::v1::{ExportTracePartialSuccess, ExportTraceServiceResponse};

        use super::super::{OtlpProtocol, TelemetryConfig};
        use super::{Transport, send};

        #[derive(Clone, Default)]
        struct Receiver(std::sync::Arc<std::sync::Mutex<Vec<ExportTraceServiceRequest>>>);

        #[tonic::async_trait]
        impl TraceService for Receiver {
            async fn export(
                &self,
                request: tonic::Request<ExportTraceServiceRequest>,
            ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
                if request.metadata().get("authorization").is_none_or(|token| token != "Bearer right") {
                    return Err(tonic::Status::unauthenticated("no such token: «wrong»"));
                }
                self.0.lock().unwrap().push(request.into_inner());
                let partial = ExportTracePartialSuccess { rejected_spans: 1, error_message: "one too old".into() };
                Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: Some(partial) }))
            }
        }

        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let transport = |endpoint: &str, token: &str| {
            let config = TelemetryConfig {
                endpoint: Some(endpoint.to_string()),
                protocol: OtlpProtocol::Grpc,
                token: Some(token.to_string()),
                max_queue_size: 10,
                ..Default::default()
            };
            Transport::new(&config, endpoint)
        };
        let platform = InstrumentationScope::builder("stateful-faas").build();
        let spans: Vec<SpanData> = (0..3).map(|i| span(i, &platform)).collect();
        let resource = encode_resource(&Resource::builder_empty().build());
        let request = || export_request(&resource, "", &mut sdk_batch(&spans), Vec::new()).0;
        assert!(request().len() > 1, "several buffers");

        send(&transport(&endpoint, "right").unwrap(), request()).await.unwrap();
        let received = receiver.0.lock().unwrap().clone();
        assert_eq!(received, vec![ExportTraceServiceRequest::decode(&request().concat()[..]).unwrap()]);
        assert_eq!(received[0].resource_spans[0].scope_spans[0].spans.len(), 3);

        // Worth sending again (a token the collector may learn, a collector that is down)…
        let error = send(&transport(&endpoint, "wrong").unwrap(), request()).await.unwrap_err();
        assert!(error.message.contains("Unauthenticated: no such token: «wrong»") && error.retry, "{error:?}");

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let error = send(&transport(&format!("http://{closed}"), "right").unwrap(), request()).await.unwrap_err();
        assert!(error.message.contains("unavailable") && error.retry, "{error:?}");

        let error = transport("https://collector.example:4317", "right").unwrap_err();
        assert!(error.contains("TLS is not supported"), "{error}");
    }

    #[test]
    fn an_empty_resource_and_batch_encode_as_protos_conversion_does() {
        let resource = Resource::builder_empty().build();
        let ours =
            ExportTraceServiceRequest::decode(&encode_request(&encode_resource(&resource), "", &[])[..]).unwrap();
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                Vec::new(),
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(ours, theirs);
    }
}
