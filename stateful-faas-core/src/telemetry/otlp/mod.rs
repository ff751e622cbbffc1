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
//!
//! Here: the processor and the tenant's queue; in `export.rs` the export thread (with the
//! spool); in `wire.rs` the protobuf encoding; in `transport.rs` the gRPC and HTTP clients.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::{Context, InstrumentationScope};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};

mod export;
pub(crate) mod transport;
mod wire;

use export::export_loop;
#[cfg(feature = "bench")]
pub use export::spool_throughput;
use transport::{Signal, Transport};
pub use wire::encode_resource;
use wire::{encode_span, message};
pub(super) use wire::{nanos, span_flags};

use super::TelemetryConfig;
use super::spool::Spool;

/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The exporters' network I/O (gRPC connection tasks, HTTP requests) runs on a thread of its
/// own, so that sending a batch never holds up a request on the gateway's workers. One per
/// process, never dropped (a runtime cannot be dropped from async code).
static EXPORT_IO: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();

pub(crate) fn export_io() -> &'static tokio::runtime::Runtime {
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
pub(crate) fn background_priority() {
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
    pub log_bytes: u64,
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
        let transport = Transport::new(config, endpoint, Signal::Traces)?;
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

#[cfg(test)]
mod tests;
