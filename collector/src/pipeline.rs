//! The bounded ingest pipeline: receivers submit batches; one writer commits them in groups
//! (by size and time); each receiver answers its client only after its batch is committed.
//! When the queue holds `capacity` items, new batches are refused at once (the receivers
//! answer 429/503 with `Retry-After`, or UNAVAILABLE): memory stays bounded under overload.
//!
//! Admission puts the bill first and shares the rest: the platform's metered data (the meter
//! token, the platform's own scrapes) may fill the whole queue, tenants' own telemetry only
//! three quarters of it together, and each tenant a quarter. A tenant that floods is refused
//! itself; the meter and the other tenants keep their room.

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
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self { capacity: 200_000, batch_items: 20_000, linger: Duration::from_millis(2) }
    }
}

/// Why a batch was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    #[error("ingest queue is full ({0} items waiting): retry later")]
    Overloaded(usize),
    #[error("telemetry store failed: {0}")]
    Store(String),
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

/// Items queued: in all, of all tenants' own telemetry, and per tenant.
#[derive(Default)]
struct Queued {
    all: usize,
    tenants: usize,
    by_tenant: std::collections::HashMap<String, usize>,
}

/// The handle receivers submit to.
#[derive(Clone)]
pub struct Pipeline {
    sender: mpsc::UnboundedSender<Job>,
    queued: Arc<std::sync::Mutex<Queued>>,
    depth: Arc<AtomicUsize>,
    capacity: usize,
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
        };
        tokio::spawn(write_loop(store, config, receiver, pipeline.clone(), metrics));
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
        let tenant = self.admit(items, source)?;
        let (done, wait) = oneshot::channel();
        if let Err(error) = self.sender.send(Job { batch, tenant, done }) {
            self.release(items, error.0.tenant.as_deref());
            return Err(SubmitError::Store("the writer stopped".into()));
        }
        wait.await.unwrap_or_else(|_| Err(SubmitError::Store("the writer stopped".into())))
    }

    /// Counts `items` in, or refuses them (see the module's rules; a batch larger than a share
    /// is admitted when its share is empty, so that no batch is refused forever).
    fn admit(&self, items: usize, source: Source) -> Result<Option<String>, SubmitError> {
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
                queued.tenants += items;
                *queued.by_tenant.entry(tenant.to_string()).or_default() += items;
                Some(tenant.to_string())
            }
        };
        queued.all += items;
        self.depth.store(queued.all, Ordering::Relaxed);
        Ok(tenant)
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

    #[test]
    fn the_meter_keeps_its_room_and_each_tenant_its_share() {
        let (sender, _receiver) = mpsc::unbounded_channel();
        let pipeline =
            Pipeline { sender, queued: Default::default(), depth: Arc::new(AtomicUsize::new(0)), capacity: 100 };
        let admit = |items, source| pipeline.admit(items, source).is_ok();
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
        let (sender, _receiver) = mpsc::unbounded_channel();
        let empty =
            Pipeline { sender, queued: Default::default(), depth: Arc::new(AtomicUsize::new(0)), capacity: 100 };
        assert!(empty.admit(500, Source::Tenant("big")).is_ok());
    }
}
