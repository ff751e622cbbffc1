//! The bounded ingest pipeline: receivers submit batches; one writer commits them in groups
//! (by size and time); each receiver answers its client only after its batch is committed.
//! When the queue holds `capacity` items, new batches are refused at once (the receivers
//! answer 429/503 with `Retry-After`, or UNAVAILABLE): memory stays bounded under overload.
//!
//! Admission puts the bill first and shares the rest: the platform's metered data (the meter
//! token, the platform's own scrapes) may fill the whole queue, tenants' own telemetry only
//! three quarters of it together, and each tenant a quarter. A tenant that floods is refused
//! itself; the meter and the other tenants keep their room.
//!
//! A tenant's own telemetry has quotas besides ([`TenantQuota`]): spans and log records a
//! second, samples a second, and bytes a day. Over one, its batch is refused (429, naming the
//! quota) and nothing of it is stored; the platform's metered data has no quota.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::metrics::CollectorMetrics;
use crate::model::Batch;
use crate::store::{TelemetryStore, Written};

/// Limits of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Items (spans, samples, log records) waiting to be committed, at most.
    pub capacity: usize,
    /// Items per commit, at most.
    pub batch_items: usize,
    /// How long the writer waits to fill a commit once it has something to write.
    pub linger: Duration,
    /// Limits on each tenant's own telemetry.
    pub tenant_quota: TenantQuota,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            capacity: 200_000,
            batch_items: 20_000,
            linger: Duration::from_millis(2),
            tenant_quota: TenantQuota::default(),
        }
    }
}

/// What one tenant may send of its own telemetry. The rates are averages: a tenant may send
/// [`BURST_SECONDS`] of its rate at once after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TenantQuota {
    /// Spans and log records a second (`--tenant-ingest-spans-per-second`).
    pub spans_per_second: u64,
    /// Metric samples a second (`--tenant-ingest-samples-per-second`).
    pub samples_per_second: u64,
    /// Bytes of rows a UTC day ([`Batch::bytes`]; `--tenant-ingest-bytes-per-day`).
    pub bytes_per_day: u64,
}

impl Default for TenantQuota {
    fn default() -> Self {
        Self { spans_per_second: 5_000, samples_per_second: 20_000, bytes_per_day: 4 << 30 }
    }
}

/// Seconds of its rate a tenant may send at once.
pub const BURST_SECONDS: f64 = 10.0;

const NS_PER_DAY: i64 = 86_400_000_000_000;

/// Why a batch was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    #[error("ingest queue is full ({0} items waiting): retry later")]
    Overloaded(usize),
    /// A tenant is over one of its quotas; it may send again in `retry_after_secs`.
    #[error("{message}")]
    Quota { message: String, retry_after_secs: u64 },
    #[error("telemetry store failed: {0}")]
    Store(String),
}

impl SubmitError {
    /// The reason counted in `sfaas_collector_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            SubmitError::Overloaded(_) => "overloaded",
            SubmitError::Quota { .. } => "quota",
            SubmitError::Store(_) => "store",
        }
    }
}

/// Whose data a batch is, for admission.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// The platform's metered data: what bills are made of.
    Meter,
    /// A tenant's own telemetry (its ingest token).
    Tenant(&'a str),
}

struct Job {
    batch: Batch,
    /// The tenant whose own telemetry it is, if it is one's.
    tenant: Option<String>,
    done: oneshot::Sender<Result<Written, SubmitError>>,
}

/// Items queued: in all, of all tenants' own telemetry, and per tenant; and what each tenant
/// has used of its quotas.
#[derive(Default)]
struct Queued {
    all: usize,
    tenants: usize,
    by_tenant: std::collections::HashMap<String, usize>,
    usage: std::collections::HashMap<String, QuotaUsage>,
    /// Tenants' plans' quotas: the default plan's, and each assigned tenant's.
    plans: Option<(TenantQuota, std::collections::HashMap<String, TenantQuota>)>,
}

impl Queued {
    /// A tenant's quota: its plan's, or the platform's `default`.
    fn quota(&self, tenant: &str, default: TenantQuota) -> TenantQuota {
        self.plans.as_ref().map_or(default, |(fallback, tenants)| tenants.get(tenant).copied().unwrap_or(*fallback))
    }
}

/// A tenant's use of its quotas: a token bucket per rate (it may go into debt by one batch, so
/// that no batch is refused forever), and the bytes of the current UTC day.
#[derive(Default)]
struct QuotaUsage {
    spans: Bucket,
    samples: Bucket,
    day: i64,
    bytes: u64,
}

#[derive(Default)]
struct Bucket {
    /// Items that may still be sent; `None` before the first (a full bucket).
    tokens: Option<f64>,
    at_ns: i64,
}

impl Bucket {
    /// Refills to `now_ns`; the seconds until a batch may be sent (0: now).
    fn wait(&mut self, rate: u64, now_ns: i64) -> f64 {
        let full = rate as f64 * BURST_SECONDS;
        let elapsed = (now_ns - self.at_ns).max(0) as f64 / 1e9;
        let tokens = self.tokens.map_or(full, |tokens| (tokens + elapsed * rate as f64).min(full));
        self.tokens = Some(tokens);
        self.at_ns = now_ns;
        if tokens > 0.0 { 0.0 } else { -tokens / rate.max(1) as f64 }
    }

    fn take(&mut self, items: usize) {
        *self.tokens.get_or_insert(0.0) -= items as f64;
    }
}

/// A tenant's batch, as its quotas count it.
pub struct Counted {
    /// Spans and log records.
    pub spans: usize,
    pub samples: usize,
    pub bytes: u64,
}

impl Counted {
    pub fn of(batch: &Batch) -> Self {
        Self { spans: batch.spans.len() + batch.logs.len(), samples: batch.samples.len(), bytes: batch.bytes() }
    }
}

/// The handle receivers submit to.
#[derive(Clone)]
pub struct Pipeline {
    sender: mpsc::UnboundedSender<Job>,
    queued: Arc<std::sync::Mutex<Queued>>,
    depth: Arc<AtomicUsize>,
    capacity: usize,
    quota: TenantQuota,
    clock: crate::clock::Clock,
}

impl Pipeline {
    /// Starts the writer task.
    pub fn start(store: TelemetryStore, config: PipelineConfig, metrics: Arc<CollectorMetrics>) -> Self {
        // Unbounded in jobs but bounded in items by the `queued` admission check below.
        let (sender, receiver) = mpsc::unbounded_channel();
        let pipeline = Self {
            sender,
            queued: Default::default(),
            depth: Arc::new(AtomicUsize::new(0)),
            capacity: config.capacity,
            quota: config.tenant_quota,
            clock: store.clock().clone(),
        };
        // Commits are heavy and no request waits on them at a request's latency.
        crate::background::spawn(write_loop(store, config, receiver, pipeline.clone(), metrics));
        pipeline
    }

    /// Items waiting now.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Queues a batch from `source` and waits until it is committed.
    pub async fn submit(&self, batch: Batch, source: Source<'_>) -> Result<Written, SubmitError> {
        if batch.is_empty() {
            return Ok(Written::default());
        }
        let items = batch.len();
        let counted = matches!(source, Source::Tenant(_)).then(|| Counted::of(&batch));
        let tenant = self.admit(items, source, counted.as_ref())?;
        let (done, wait) = oneshot::channel();
        if let Err(error) = self.sender.send(Job { batch, tenant, done }) {
            self.release(items, error.0.tenant.as_deref());
            return Err(SubmitError::Store("the writer stopped".into()));
        }
        wait.await.unwrap_or_else(|_| Err(SubmitError::Store("the writer stopped".into())))
    }

    /// Counts `items` in, or refuses them (see the module's rules; a batch larger than a share
    /// is admitted when its share is empty, so that no batch is refused forever). A tenant's
    /// batch is `counted` against its quotas.
    fn admit(&self, items: usize, source: Source, counted: Option<&Counted>) -> Result<Option<String>, SubmitError> {
        let mut queued = self.queued.lock().unwrap();
        let tenant = match source {
            Source::Meter => {
                if queued.all + items > self.capacity && queued.all > 0 {
                    return Err(SubmitError::Overloaded(queued.all));
                }
                None
            }
            Source::Tenant(tenant) => {
                let own = queued.by_tenant.get(tenant).copied().unwrap_or(0);
                let (all_tenants, one_tenant) = (self.capacity / 4 * 3, self.capacity / 4);
                let over = (queued.tenants + items > all_tenants && queued.tenants > 0)
                    || (own + items > one_tenant && own > 0)
                    || queued.all + items > self.capacity && queued.all > 0;
                if over {
                    return Err(SubmitError::Overloaded(queued.all));
                }
                if let Some(counted) = counted {
                    let quota = queued.quota(tenant, self.quota);
                    let usage = queued.usage.entry(tenant.to_string()).or_default();
                    charge(usage, &quota, counted, self.clock.now_ns(), tenant)?;
                }
                queued.tenants += items;
                *queued.by_tenant.entry(tenant.to_string()).or_default() += items;
                Some(tenant.to_string())
            }
        };
        queued.all += items;
        self.depth.store(queued.all, Ordering::Relaxed);
        Ok(tenant)
    }

    /// Refuses a tenant's request before it is decoded when the tenant is over a quota now
    /// (`samples`: the request carries metric samples; otherwise spans or log records), so that
    /// a flood over quota costs an authentication, not a decode. Nothing is counted.
    pub fn precheck(&self, source: Source<'_>, samples: bool) -> Result<(), SubmitError> {
        let Source::Tenant(tenant) = source else { return Ok(()) };
        let mut queued = self.queued.lock().unwrap();
        let quota = queued.quota(tenant, self.quota);
        let Some(usage) = queued.usage.get_mut(tenant) else { return Ok(()) };
        check(usage, &quota, self.clock.now_ns(), tenant, !samples, samples)
    }

    /// Sets the quotas of tenants' plans: `fallback` for tenants not in `tenants` (in place of
    /// the configured [`PipelineConfig::tenant_quota`]).
    pub fn set_plan_quotas(&self, fallback: TenantQuota, tenants: std::collections::HashMap<String, TenantQuota>) {
        self.queued.lock().unwrap().plans = Some((fallback, tenants));
    }

    /// The configured quota, which tenants' plans start from.
    pub fn default_quota(&self) -> TenantQuota {
        self.quota
    }

    /// Counts committed (or failed) items out.
    fn release(&self, items: usize, tenant: Option<&str>) {
        let mut queued = self.queued.lock().unwrap();
        queued.all -= items;
        if let Some(tenant) = tenant {
            queued.tenants -= items;
            if let Some(own) = queued.by_tenant.get_mut(tenant) {
                *own -= items;
                if *own == 0 {
                    queued.by_tenant.remove(tenant);
                }
            }
        }
        self.depth.store(queued.all, Ordering::Relaxed);
    }
}

/// Whether a tenant may send now: under its bytes of the day, and with room in the rate of
/// each kind it sends (`spans`: spans and log records; `samples`). Refills the buckets.
fn check(
    usage: &mut QuotaUsage,
    quota: &TenantQuota,
    now_ns: i64,
    tenant: &str,
    spans: bool,
    samples: bool,
) -> Result<(), SubmitError> {
    let day = now_ns.div_euclid(NS_PER_DAY);
    if usage.day != day {
        usage.day = day;
        usage.bytes = 0;
    }
    if usage.bytes >= quota.bytes_per_day {
        let retry_after_secs = ((day + 1) * NS_PER_DAY - now_ns) as u64 / 1_000_000_000 + 1;
        return Err(SubmitError::Quota {
            message: format!(
                "namespace {tenant} has sent its {} bytes of telemetry for today (its plan's ingest_bytes_per_day, \
                 by default --tenant-ingest-bytes-per-day); \
                 it may send again after 00:00 UTC",
                quota.bytes_per_day
            ),
            retry_after_secs,
        });
    }
    let rates = [
        (&mut usage.spans, spans, quota.spans_per_second, "spans and log records", "spans"),
        (&mut usage.samples, samples, quota.samples_per_second, "samples", "samples"),
    ];
    for (bucket, sends, rate, what, kind) in rates {
        let wait = bucket.wait(rate, now_ns);
        if sends && wait > 0.0 {
            return Err(SubmitError::Quota {
                message: format!(
                    "namespace {tenant} is over its rate of {rate} {what} a second (its plan's \
                     ingest_{kind}_per_second, by default --tenant-ingest-{kind}-per-second); retry later"
                ),
                retry_after_secs: wait.ceil() as u64,
            });
        }
    }
    Ok(())
}

/// Counts a tenant's batch against its quotas, or refuses it naming the first one it is over.
fn charge(
    usage: &mut QuotaUsage,
    quota: &TenantQuota,
    counted: &Counted,
    now_ns: i64,
    tenant: &str,
) -> Result<(), SubmitError> {
    check(usage, quota, now_ns, tenant, counted.spans > 0, counted.samples > 0)?;
    usage.spans.take(counted.spans);
    usage.samples.take(counted.samples);
    usage.bytes += counted.bytes;
    Ok(())
}

async fn write_loop(
    store: TelemetryStore,
    config: PipelineConfig,
    mut receiver: mpsc::UnboundedReceiver<Job>,
    pipeline: Pipeline,
    metrics: Arc<CollectorMetrics>,
) {
    while let Some(first) = receiver.recv().await {
        let deadline = tokio::time::Instant::now() + config.linger;
        let mut jobs = vec![first];
        let mut items = jobs[0].batch.len();
        while items < config.batch_items {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(job)) => {
                    items += job.batch.len();
                    jobs.push(job);
                }
                _ => break,
            }
        }
        // Move every job's rows into one batch, remembering where each job's rows are.
        let mut combined = Batch::default();
        let mut ranges = Vec::with_capacity(jobs.len());
        let releases: Vec<(usize, Option<String>)> =
            jobs.iter().map(|job| (job.batch.len(), job.tenant.clone())).collect();
        for job in &mut jobs {
            let start = (combined.spans.len(), combined.samples.len(), combined.logs.len());
            combined.append(std::mem::take(&mut job.batch));
            ranges.push((start, (combined.spans.len(), combined.samples.len(), combined.logs.len())));
        }
        let started = Instant::now();
        let result = store.write(&combined).await.map_err(|e| SubmitError::Store(e.to_string()));
        metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        if result.is_ok() || jobs.len() == 1 {
            if let Err(error) = &result {
                tracing::error!(%error, items, "telemetry commit failed");
            }
            for job in jobs {
                let _ = job.done.send(result.clone());
            }
        } else {
            // One request's bad rows must not fail the others grouped with it: commit each alone.
            for (job, (start, end)) in jobs.into_iter().zip(ranges) {
                let alone = Batch {
                    spans: combined.spans[start.0..end.0].to_vec(),
                    samples: combined.samples[start.1..end.1].to_vec(),
                    logs: combined.logs[start.2..end.2].to_vec(),
                };
                let result = store.write(&alone).await.map_err(|e| SubmitError::Store(e.to_string()));
                if let Err(error) = &result {
                    tracing::error!(%error, items = alone.len(), "telemetry commit failed");
                }
                let _ = job.done.send(result);
            }
        }
        for (items, tenant) in releases {
            pipeline.release(items, tenant.as_deref());
        }
    }
}

#[cfg(test)]
mod admission_tests {
    use super::*;

    fn pipeline(capacity: usize, quota: TenantQuota, clock: &crate::clock::Clock) -> Pipeline {
        let (sender, _receiver) = mpsc::unbounded_channel();
        let depth = Arc::new(AtomicUsize::new(0));
        Pipeline { sender, queued: Default::default(), depth, capacity, quota, clock: clock.clone() }
    }

    #[test]
    fn the_meter_keeps_its_room_and_each_tenant_its_share() {
        let pipeline = pipeline(100, TenantQuota::default(), &crate::clock::Clock::system());
        let admit = |items, source| pipeline.admit(items, source, None).is_ok();
        // A tenant floods: a quarter is its share, then it is refused, alone.
        assert!(admit(25, Source::Tenant("flood")));
        assert!(!admit(1, Source::Tenant("flood")));
        assert!(admit(25, Source::Tenant("b")));
        assert!(admit(25, Source::Tenant("c")));
        // Tenants together hold three quarters; the last quarter is the meter's.
        assert!(!admit(1, Source::Tenant("d")));
        assert!(admit(25, Source::Meter));
        assert!(!admit(1, Source::Meter), "the queue is full");
        // Committed items make room again, per tenant.
        pipeline.release(25, Some("flood"));
        assert!(admit(20, Source::Tenant("flood")));
        assert!(!admit(10, Source::Tenant("flood")));
        pipeline.release(25, None);
        assert!(admit(5, Source::Tenant("d")));
        assert_eq!(pipeline.depth(), 75);
        // A batch larger than a share is admitted when its share is empty.
        let empty = self::pipeline(100, TenantQuota::default(), &crate::clock::Clock::system());
        assert!(empty.admit(500, Source::Tenant("big"), None).is_ok());
    }

    #[test]
    fn a_tenant_over_a_quota_is_refused_naming_it_and_others_go_on() {
        let clock = crate::clock::Clock::starting_at(20_000 * NS_PER_DAY + 3_600_000_000_000);
        let quota = TenantQuota { spans_per_second: 100, samples_per_second: 1000, bytes_per_day: 1_000_000 };
        let pipeline = pipeline(1 << 30, quota, &clock);
        let send = |tenant, spans, samples, bytes| {
            let counted = Counted { spans, samples, bytes };
            let result = pipeline.admit(spans + samples, Source::Tenant(tenant), Some(&counted));
            if result.is_ok() {
                pipeline.release(spans + samples, Some(tenant));
            }
            result.err().map(|e| match e {
                SubmitError::Quota { message, retry_after_secs } => (message, retry_after_secs),
                other => panic!("{other}"),
            })
        };
        // A burst of ten seconds' spans, then into debt by one batch, then refused.
        assert_eq!(send("flood", 999, 0, 10), None);
        assert_eq!(send("flood", 500, 0, 10), None);
        let (message, retry) = send("flood", 1, 0, 10).unwrap();
        assert!(message.contains("--tenant-ingest-spans-per-second") && message.contains("flood"), "{message}");
        assert_eq!(retry, 5, "the debt of 499 spans at 100 a second");
        // Its samples have a rate of their own; another tenant is not touched.
        assert_eq!(send("flood", 0, 5000, 10), None);
        assert_eq!(send("calm", 10, 10, 10), None);
        // Time refills the bucket.
        clock.set(clock.now_ns() + 6_000_000_000);
        assert_eq!(send("flood", 10, 0, 10), None);
        // Bytes a day: the batch that crosses the quota is taken, the next is refused until
        // midnight UTC, when the count starts again.
        assert_eq!(send("calm", 1, 0, 999_990), None);
        let (message, retry) = send("calm", 1, 0, 10).unwrap();
        assert!(message.contains("--tenant-ingest-bytes-per-day"), "{message}");
        assert!((20 * 3600..=23 * 3600 + 1).contains(&retry), "{retry}");
        assert!(send("flood", 1, 0, 10).is_none());
        clock.set(20_001 * NS_PER_DAY);
        assert_eq!(send("calm", 1, 0, 10), None);
    }
}
