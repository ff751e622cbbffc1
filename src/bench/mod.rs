//! `sfaas bench`: each component's benchmark (figures in BENCHMARKS.md). Built with the
//! `bench` feature (on by default): `cargo build --release --no-default-features` leaves the
//! benchmarks, and the libraries' bench code, out of the binary.

mod etl;
mod logs;
mod soak;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Gateway overhead per invocation and throughput, instrumentation on vs off.
    Gateway {
        /// Invocations per scenario.
        #[arg(long, default_value_t = 4000)]
        requests: usize,
        /// Concurrent callers.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Rounds of spans off and on (alternately first); the ratio reported is the median of the
        /// rounds' ratios.
        #[arg(long, default_value_t = 16)]
        rounds: usize,
        /// Only the `noop`, `exec` (spans on and off) or `sandbox` (exec and managed http, sandbox on and off) scenarios.
        #[arg(long)]
        only: Option<String>,
    },
    /// State store put/get, in process and over HTTP, beside Redis (redis-benchmark).
    State {
        /// Operations per series (1 MiB series use a twentieth).
        #[arg(long, default_value_t = 20000)]
        operations: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Collector ingest (OTLP/HTTP, 512-span batches) vs raw inserts, SQLite and PostgreSQL.
    Ingest {
        /// Requests of 512 spans.
        #[arg(long, default_value_t = 400)]
        requests: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// The span store's readers (trace by id, search) over stored spans.
    Spans {
        #[arg(long, default_value_t = 2_000_000)]
        spans: usize,
        /// Blocks on an S3 store (s3rver, from npm, started here), read by another host.
        #[arg(long)]
        s3rver: bool,
    },
    /// Billing: a month of usage billed from its spans, re-rated from its records, then an incremental run.
    Billing {
        /// Invocations of the month (metered spans written through the collector's store first).
        #[arg(long, default_value_t = 10_000_000)]
        invocations: usize,
        /// New invocations for the incremental run.
        #[arg(long, default_value_t = 100_000)]
        new: usize,
        /// Database (default: SQLite in a temp dir), e.g. postgres://...
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Dashboard: server time of pages and query APIs over a large store.
    Dashboard {
        /// Spans stored.
        #[arg(long, default_value_t = 1_000_000)]
        spans: usize,
        /// Of which billed invocations.
        #[arg(long, default_value_t = 100_000)]
        invocations: usize,
    },
    /// The ETL flow with data passed through the state store, an S3 store (s3rver) or inline.
    Etl {
        /// Batches of about 1 KiB per transport.
        #[arg(long, default_value_t = 300)]
        small_batches: usize,
        /// Batches of about 1 MiB per transport.
        #[arg(long, default_value_t = 12)]
        large_batches: usize,
        /// Write plotters SVG charts of the results into this folder (e.g. docs).
        #[arg(long)]
        charts_dir: Option<PathBuf>,
    },
    /// One tenant storms (ingest at twice the sustainable rate, PromQL, calls) while another
    /// works: its latency, the refusals, memory, and recovery.
    Soak(soak::Options),
    /// Function log lines from the function's stderr to the collector's store, beside the
    /// store's own insert rate.
    Logs(logs::Options),
    /// Engine overhead per node, and data passing through the state store vs files.
    Flow {
        /// Runs per measurement (the median is reported).
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
}

/// Creates a tenant on a running gateway with the admin token: its (ingest, read) tokens.
async fn create_tenant(
    http: &reqwest::Client,
    gateway: &str,
    admin: &str,
    tenant: &str,
) -> anyhow::Result<(String, String)> {
    let created: serde_json::Value = http
        .post(format!("{gateway}/system/tenants"))
        .bearer_auth(admin)
        .json(&serde_json::json!({"name": tenant}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = |kind: &str| created[kind].as_str().map(str::to_string).with_context(|| format!("no {kind}"));
    Ok((token("ingest_token")?, token("read_token")?))
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Gateway { requests, concurrency, rounds, only } => {
            let report = stateful_faas_core::bench::gateway(requests, concurrency, rounds, only.as_deref()).await?;
            println!("{report}");
            Ok(())
        }
        BenchCommand::State { operations, concurrency } => {
            println!("{}", stateful_faas_core::bench::state::run(operations, concurrency).await?);
            Ok(())
        }
        BenchCommand::Ingest { requests, concurrency } => {
            println!("{}", collector::bench::run(requests, concurrency).await?);
            Ok(())
        }
        BenchCommand::Spans { spans, s3rver } => {
            let dir = tempfile::tempdir()?;
            let (_s3, remote) = match s3rver {
                true => {
                    let (s3, bucket) = etl::s3rver(&dir.path().join("s3"), "blocks").await?;
                    let (endpoint, _) = bucket.rsplit_once('/').context("a bucket URL")?;
                    let remote = collector::store::blocks::remote::Remote::s3(
                        "s3://blocks/bench",
                        Some(endpoint),
                        Some(("S3RVER", "S3RVER")),
                    )?;
                    (Some(s3), Some(remote))
                }
                false => (None, None),
            };
            println!("{}", collector::bench::readers(spans, remote).await?);
            Ok(())
        }
        BenchCommand::Billing { invocations, new, database_url } => {
            println!("{}", billing::bench::run(invocations, new, database_url).await?);
            Ok(())
        }
        BenchCommand::Dashboard { spans, invocations } => {
            println!("{}", dashboard::bench::run(spans, invocations).await.map_err(|e| anyhow::anyhow!("{e}"))?);
            Ok(())
        }
        BenchCommand::Etl { small_batches, large_batches, charts_dir } => {
            println!("{}", etl::run(small_batches.max(1), large_batches.max(1), charts_dir).await?);
            Ok(())
        }
        BenchCommand::Soak(options) => {
            println!("{}", soak::run(options).await?);
            Ok(())
        }
        BenchCommand::Logs(options) => {
            println!("{}", logs::run(options).await?);
            Ok(())
        }
        BenchCommand::Flow { runs } => {
            println!("{}", stateful_faas_core::bench::flow::run(runs).await?);
            Ok(())
        }
    }
}
