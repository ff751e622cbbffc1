//! `sfaas bench gateway`: the gateway's overhead per invocation and its throughput, with span
//! export on and off. Each scenario runs a fresh core on loopback in this process.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{BenchCore, percentiles};
use crate::telemetry::OtlpProtocol;

/// Figures of one scenario.
pub struct Scenario {
    pub name: String,
    pub requests: usize,
    pub errors: usize,
    pub throughput: f64,
    pub p50: Duration,
    pub p99: Duration,
}

/// All scenarios of a run.
pub struct Report {
    pub scenarios: Vec<Scenario>,
    pub spans_received: u64,
    pub concurrency: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| scenario | requests | errors | invocations/s | p50 | p99 |")?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|")?;
        for s in &self.scenarios {
            writeln!(
                f,
                "| {} | {} | {} | {:.0} | {:.3} ms | {:.3} ms |",
                s.name,
                s.requests,
                s.errors,
                s.throughput,
                s.p50.as_secs_f64() * 1e3,
                s.p99.as_secs_f64() * 1e3
            )?;
        }
        let ratio = |function: &str| {
            let find = |suffix: &str| self.scenarios.iter().find(|s| s.name == format!("{function}, spans {suffix}"));
            match (find("on"), find("off")) {
                (Some(on), Some(off)) => on.throughput / off.throughput * 100.0,
                _ => f64::NAN,
            }
        };
        writeln!(f)?;
        writeln!(
            f,
            "concurrency {}; median of {ROUNDS} alternating rounds; spans received by the OTLP/gRPC sink: {}",
            self.concurrency, self.spans_received
        )?;
        writeln!(
            f,
            "throughput with spans on / off: builtin noop {:.1}%, exec /bin/true {:.1}%",
            ratio("builtin noop"),
            ratio("exec /bin/true")
        )
    }
}

/// Rounds per scenario; spans off and on alternate so that drift on a shared machine hits
/// both alike, and the round with the median throughput is reported.
const ROUNDS: usize = 3;

/// Runs every scenario: builtin no-op and exec of `/bin/true`, each with span export on and off.
/// `only` limits the run to the scenarios whose function is `noop` or `exec`.
pub async fn gateway(requests: usize, concurrency: usize, only: Option<&str>) -> anyhow::Result<Report> {
    let sink_bytes = Arc::new(AtomicU64::new(0));
    let sink = start_otlp_sink(sink_bytes.clone()).await?;
    let mut scenarios = Vec::new();
    let functions = [("builtin noop", "noop"), ("exec /bin/true", "true")];
    for (function, body) in functions.into_iter().filter(|(_, body)| match only {
        Some("noop") => *body == "noop",
        Some("exec") => *body == "true",
        _ => true,
    }) {
        let mut rounds: [Vec<Scenario>; 2] = [Vec::new(), Vec::new()];
        for round in 0..ROUNDS {
            for spans in [false, true] {
                let name = format!("{function}, spans {}", if spans { "on" } else { "off" });
                eprintln!(
                    "bench: {name}, round {} of {ROUNDS} ({requests} requests, concurrency {concurrency})",
                    round + 1
                );
                let endpoint = spans.then(|| format!("http://{sink}"));
                rounds[usize::from(spans)].push(run_scenario(&name, body, endpoint, requests, concurrency).await?);
            }
        }
        for mut runs in rounds {
            runs.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
            scenarios.push(runs.swap_remove(runs.len() / 2));
        }
    }
    Ok(Report { scenarios, spans_received: sink_bytes.load(Ordering::Relaxed), concurrency })
}

async fn run_scenario(
    name: &str,
    function: &str,
    otlp_endpoint: Option<String>,
    requests: usize,
    concurrency: usize,
) -> anyhow::Result<Scenario> {
    let core = BenchCore::start(|config| {
        config.telemetry.endpoint = otlp_endpoint;
        config.telemetry.protocol = OtlpProtocol::Grpc;
    })
    .await?;
    let credentials = core.credentials.clone();
    core.deploy(match function {
        "noop" => serde_json::json!({"service": "f", "builtin": "noop", "envVars": {"max_inflight": "1024"}}),
        _ => serde_json::json!({"service": "f", "envProcess": "/bin/true", "envVars": {"max_inflight": "1024"}}),
    })
    .await?;

    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(concurrency).build()?;
    let url = format!("{}/function/f", core.url);
    // Warm up connections and code paths.
    for _ in 0..concurrency.min(requests) {
        client.post(&url).bearer_auth(&credentials.ingest_token).send().await?;
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let (client, url, token) = (client.clone(), url.clone(), credentials.ingest_token.clone());
        let count = requests / concurrency + usize::from(worker < requests % concurrency);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            let mut errors = 0;
            for _ in 0..count {
                let start = Instant::now();
                match client.post(&url).bearer_auth(&token).send().await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                    }
                    _ => errors += 1,
                }
                latencies.push(start.elapsed());
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    let mut errors = 0;
    for worker in workers {
        let (mut worker_latencies, worker_errors) = worker.await?;
        latencies.append(&mut worker_latencies);
        errors += worker_errors;
    }
    let elapsed = started.elapsed();
    core.stop().await;
    let (p50, p99) = percentiles(&mut latencies);
    Ok(Scenario {
        name: name.to_string(),
        requests,
        errors,
        throughput: requests as f64 / elapsed.as_secs_f64(),
        p50,
        p99,
    })
}

/// A minimal OTLP/gRPC receiver (the generated TraceService) that accepts and counts export
/// requests, so that span export costs what it costs against a real receiver on loopback,
/// over the protocol `sfaas up` uses.
async fn start_otlp_sink(bytes: Arc<AtomicU64>) -> anyhow::Result<std::net::SocketAddr> {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};

    struct Sink(Arc<AtomicU64>);

    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let spans: usize =
                request.get_ref().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
            self.0.fetch_add(spans as u64, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink(bytes)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    Ok(addr)
}
