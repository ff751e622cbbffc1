//! The bounded ingest pipeline: receivers submit batches; one writer commits them in groups
//! (by size and time); each receiver answers its client only after its batch is committed.
//! When the queue holds `capacity` items, new batches are refused at once (the receivers
//! answer 429/503 with `Retry-After`, or UNAVAILABLE): memory stays bounded under overload.

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

struct Job {
    batch: Batch,
    done: oneshot::Sender<Result<Written, SubmitError>>,
}

/// The handle receivers submit to.
#[derive(Clone)]
pub struct Pipeline {
    sender: mpsc::UnboundedSender<Job>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

impl Pipeline {
    /// Starts the writer task.
    pub fn start(store: TelemetryStore, config: PipelineConfig, metrics: Arc<CollectorMetrics>) -> Self {
        // Unbounded in jobs but bounded in items by the `queued` admission check below.
        let (sender, receiver) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(write_loop(store, config.clone(), receiver, queued.clone(), metrics));
        Self { sender, queued, capacity: config.capacity }
    }

    /// Items waiting now.
    pub fn depth(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues a batch and waits until it is committed.
    pub async fn submit(&self, batch: Batch) -> Result<Written, SubmitError> {
        if batch.is_empty() {
            return Ok(Written::default());
        }
        let items = batch.len();
        let admitted = self.queued.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |queued| {
            (queued + items <= self.capacity || queued == 0).then_some(queued + items)
        });
        if let Err(queued) = admitted {
            return Err(SubmitError::Overloaded(queued));
        }
        let (done, wait) = oneshot::channel();
        if self.sender.send(Job { batch, done }).is_err() {
            self.queued.fetch_sub(items, Ordering::SeqCst);
            return Err(SubmitError::Store("the writer stopped".into()));
        }
        wait.await.unwrap_or_else(|_| Err(SubmitError::Store("the writer stopped".into())))
    }
}

async fn write_loop(
    store: TelemetryStore,
    config: PipelineConfig,
    mut receiver: mpsc::UnboundedReceiver<Job>,
    queued: Arc<AtomicUsize>,
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
        queued.fetch_sub(items, Ordering::SeqCst);
    }
}
