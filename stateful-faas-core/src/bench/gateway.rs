//! `sfaas bench gateway`: the gateway's overhead per invocation and its throughput, with span
//! export on and off. Each function is served by two cores on loopback in this process, one
//! exporting spans and one not, each kept running through all the rounds.

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
    /// The whole process's CPU time (user + system) per invocation while the requests ran and
    /// their spans were flushed: gateway, clients, span export and receiver.
    pub cpu: Duration,
    /// Of `cpu`, the span export threads' (encoding, framing, sending) and the receiver's, per
    /// invocation, while the requests ran and their spans were flushed.
    pub export_cpu: Duration,
    pub receiver_cpu: Duration,
}

/// CPU per span of exporting invocation spans to the same sink with this project's processor
/// and with the SDK's batch processor and opentelemetry-otlp's exporter.
pub struct ExportCost {
    pub spans: usize,
    pub ours: Duration,
    pub opentelemetry_otlp: Duration,
}

/// All scenarios of a run.
pub struct Report {
    pub export: ExportCost,
    pub scenarios: Vec<Scenario>,
    /// Per comparison (spans, or the sandbox, of a function): throughput on / off, the median
    /// over the rounds of the ratio within each round (off and on run back to back, under the
    /// same machine conditions).
    pub ratios: Vec<(String, f64)>,
    pub rounds: usize,
    pub spans_received: u64,
    pub concurrency: usize,
    /// Invocation spans per second written to the span spool (synced per request) and
    /// replayed from it, while the collector is down and once it is back.
    pub spool: (f64, f64),
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| scenario | requests | errors | invocations/s | p50 | p99 | CPU per invocation | of it, span export | of it, receiver |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for s in &self.scenarios {
            writeln!(
                f,
                "| {} | {} | {} | {:.0} | {:.3} ms | {:.3} ms | {:.1} µs | {:.2} µs | {:.2} µs |",
                s.name,
                s.requests,
                s.errors,
                s.throughput,
                s.p50.as_secs_f64() * 1e3,
                s.p99.as_secs_f64() * 1e3,
                s.cpu.as_secs_f64() * 1e6,
                s.export_cpu.as_secs_f64() * 1e6,
                s.receiver_cpu.as_secs_f64() * 1e6
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "concurrency {}; {} rounds of off and on (alternately first), the median round shown; spans received by the OTLP/gRPC sink: {}",
            self.concurrency, self.rounds, self.spans_received
        )?;
        let ratios: Vec<String> =
            self.ratios.iter().map(|(function, ratio)| format!("{function} {:.1}%", ratio * 100.0)).collect();
        writeln!(f, "throughput on / off (median of the rounds' ratios): {}", ratios.join(", "))?;
        let e = &self.export;
        writeln!(
            f,
            "span export, {} invocation spans over OTLP/gRPC, CPU per span (creating, ending, encoding, sending): \
             sfaas processor {:.2} µs, SDK batch processor + opentelemetry-otlp {:.2} µs ({:.1}×)",
            e.spans,
            e.ours.as_secs_f64() * 1e6,
            e.opentelemetry_otlp.as_secs_f64() * 1e6,
            e.opentelemetry_otlp.as_secs_f64() / e.ours.as_secs_f64()
        )?;
        writeln!(
            f,
            "span spool (collector unreachable), requests of {} invocation spans: {:.0} spans/s written (synced per \
             request), {:.0} spans/s replayed to the OTLP/gRPC sink",
            SPOOL_BATCH, self.spool.0, self.spool.1
        )
    }
}

/// Runs every scenario: builtin no-op and exec of `/bin/true`, each with span export off and
/// on, and exec of `/bin/true` and a managed http function (a Python server) with the sandbox
/// off and on, `rounds` times, alternately first, so that drift on a shared machine hits both
/// alike. `only` limits the run to the scenarios named `noop`, `exec` or `sandbox`.
pub async fn gateway(requests: usize, concurrency: usize, rounds: usize, only: Option<&str>) -> anyhow::Result<Report> {
    let rounds = rounds.max(1);
    let sink_spans = Arc::new(AtomicU64::new(0));
    let sink = start_otlp_sink(sink_spans.clone())?;
    let mut scenarios = Vec::new();
    let mut ratios = Vec::new();
    let functions = [
        ("builtin noop", "noop", "spans"),
        ("exec /bin/true", "true", "spans"),
        ("exec /bin/true", "true", "sandbox"),
        ("managed http (Python)", "http", "sandbox"),
    ];
    for (function, body, compared) in functions.into_iter().filter(|(_, body, compared)| match only {
        Some("noop") => *body == "noop",
        Some("exec") => *body == "true" && *compared == "spans",
        Some("sandbox") => *compared == "sandbox",
        _ => true,
    }) {
        // One core with it off and one with it on, each kept for all rounds, as a gateway runs.
        let targets = if compared == "spans" {
            [
                Target::start(body, None, true, concurrency).await?,
                Target::start(body, Some(sink), true, concurrency).await?,
            ]
        } else {
            [Target::start(body, None, false, concurrency).await?, Target::start(body, None, true, concurrency).await?]
        };
        let mut runs: [Vec<Scenario>; 2] = [Vec::new(), Vec::new()];
        let mut round_ratios = Vec::new();
        for round in 1..=rounds {
            // Which goes first alternates, so that drift during a pair favours neither.
            let order = if round % 2 == 1 { [false, true] } else { [true, false] };
            for spans in order {
                let name = format!("{function}, {compared} {}", if spans { "on" } else { "off" });
                let scenario = targets[usize::from(spans)].round(&name, requests, concurrency).await?;
                eprintln!(
                    "bench: {name}, round {round} of {rounds}: {:.0} invocations/s, p99 {}, {:.1} µs CPU each \
                     (span export {:.2} µs, receiver {:.2} µs)",
                    scenario.throughput,
                    super::ms(scenario.p99),
                    scenario.cpu.as_secs_f64() * 1e6,
                    scenario.export_cpu.as_secs_f64() * 1e6,
                    scenario.receiver_cpu.as_secs_f64() * 1e6
                );
                runs[usize::from(spans)].push(scenario);
            }
            round_ratios.push(runs[1][round - 1].throughput / runs[0][round - 1].throughput);
        }
        for target in targets {
            target.core.stop().await;
        }
        round_ratios.sort_by(f64::total_cmp);
        ratios.push((format!("{function}, {compared}"), round_ratios[round_ratios.len() / 2]));
        for mut runs in runs {
            runs.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
            scenarios.push(runs.swap_remove(runs.len() / 2));
        }
    }
    let export = export_cost(sink, &sink_spans).await?;
    let spans_received = sink_spans.load(Ordering::Relaxed);
    let spool = spool_throughput(sink).await?;
    Ok(Report { scenarios, ratios, rounds, export, spans_received, concurrency, spool })
}

/// A core on loopback serving one function, with its client, warmed up.
struct Target {
    core: BenchCore,
    client: reqwest::Client,
    url: String,
}

impl Target {
    /// A fresh core serving `function` (`noop`, `/bin/true` or `http`: the examples' Python
    /// server), exporting spans to `sink` if any, with its processes sandboxed or not.
    async fn start(
        function: &str,
        sink: Option<std::net::SocketAddr>,
        sandbox: bool,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let core = BenchCore::start(|config| {
            config.telemetry.endpoint = sink.map(|sink| format!("http://{sink}"));
            config.telemetry.protocol = OtlpProtocol::Grpc;
            if !sandbox {
                config.sandbox = None;
            }
        })
        .await?;
        core.deploy(match function {
            "noop" => serde_json::json!({"service": "f", "builtin": "noop", "envVars": {"max_inflight": "1024"}}),
            "http" => {
                // Beside the data directory, which no sandboxed function may see.
                let dir = core.data_dir.with_extension("functions");
                std::fs::create_dir_all(&dir)?;
                std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
                std::fs::write(dir.join("server.py"), include_str!("../../../examples/functions/greeter_server.py"))?;
                serde_json::json!({
                    "service": "f", "kind": "http", "envProcess": "python3 server.py", "workdir": dir,
                    "envVars": {"max_inflight": "1024"},
                    "labels": {"com.openfaas.scale.min": concurrency.to_string(), "com.openfaas.scale.max": concurrency.to_string()},
                })
            }
            _ => serde_json::json!({"service": "f", "envProcess": "/bin/true", "envVars": {"max_inflight": "1024"}}),
        })
        .await?;
        let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(concurrency).build()?;
        let url = format!("{}/function/f", core.url);
        // Warm up connections and code paths.
        for _ in 0..concurrency {
            client.post(&url).bearer_auth(&core.credentials.ingest_token).send().await?;
        }
        Ok(Self { core, client, url })
    }

    /// `requests` calls from `concurrency` clients, measured until their spans have reached the
    /// receiver: in a gateway that keeps running, sending them is part of every request's cost,
    /// so the round's last batch counts too.
    async fn round(&self, name: &str, requests: usize, concurrency: usize) -> anyhow::Result<Scenario> {
        let cpu_before = process_cpu();
        let (export_before, receiver_before) = (threads_cpu(EXPORT_THREADS), threads_cpu(&[SINK_THREAD]));
        let started = Instant::now();
        let mut workers = Vec::new();
        for worker in 0..concurrency {
            let (client, url) = (self.client.clone(), self.url.clone());
            let token = self.core.credentials.ingest_token.clone();
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
        let core = self.core.running.core.clone();
        tokio::task::spawn_blocking(move || core.invoker.telemetry.flush()).await?;
        let elapsed = started.elapsed();
        let per_request = |cpu: Duration| cpu / requests as u32;
        let (p50, p99) = percentiles(&mut latencies);
        Ok(Scenario {
            name: name.to_string(),
            requests,
            errors,
            throughput: requests as f64 / elapsed.as_secs_f64(),
            p50,
            p99,
            cpu: per_request(process_cpu().saturating_sub(cpu_before)),
            export_cpu: per_request(threads_cpu(EXPORT_THREADS).saturating_sub(export_before)),
            receiver_cpu: per_request(threads_cpu(&[SINK_THREAD]).saturating_sub(receiver_before)),
        })
    }
}

/// Spans per export request the gateway sends (a full batch).
const SPOOL_BATCH: usize = 2048;

/// The span spool's write and replay rates (see [`crate::telemetry::spool_throughput`]): 50
/// requests of a full batch each, in a folder of the system's temporary directory.
async fn spool_throughput(sink: std::net::SocketAddr) -> anyhow::Result<(f64, f64)> {
    eprintln!("bench: span spool, 50 requests of {SPOOL_BATCH} spans written, then replayed");
    let dir = std::env::temp_dir().join(format!("sfaas-bench-spool-{}", uuid::Uuid::new_v4()));
    let endpoint = format!("http://{sink}");
    let config = crate::telemetry::TelemetryConfig {
        endpoint: Some(endpoint.clone()),
        protocol: OtlpProtocol::Grpc,
        ..Default::default()
    };
    let measured = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || crate::telemetry::spool_throughput(&config, &endpoint, &dir, 50)).await?
    };
    let _ = std::fs::remove_dir_all(&dir);
    measured.map_err(anyhow::Error::msg)
}

/// Spans per exporter in [`export_cost`].
const EXPORT_SPANS: usize = 200_000;

/// Exports [`EXPORT_SPANS`] invocation spans, made by the gateway's own functions, to the sink, once through this
/// project's processor and once through the SDK's batch processor with opentelemetry-otlp's
/// exporter, and returns the process's CPU per span, flush included.
async fn export_cost(sink: std::net::SocketAddr, received: &AtomicU64) -> anyhow::Result<ExportCost> {
    use opentelemetry::trace::TracerProvider;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanProcessor};

    /// The process's CPU per span for `EXPORT_SPANS` spans, made by `span` and exported by
    /// `processor`, the provider's shutdown (its final flush) included.
    async fn run(
        processor: impl SpanProcessor + 'static,
        span: impl Fn(&opentelemetry_sdk::trace::SdkTracer, &crate::telemetry::Invoked),
        received: &AtomicU64,
    ) -> anyhow::Result<Duration> {
        let provider = SdkTracerProvider::builder().with_span_processor(processor).build();
        let tracer = provider.tracer(crate::semconv::SERVICE_NAME);
        let before_received = received.load(Ordering::Relaxed);
        let cpu_before = process_cpu();
        let usage = crate::function::Usage::default();
        for i in 0..EXPORT_SPANS {
            let call_id = format!("call-{i}");
            let invoked = crate::telemetry::Invoked {
                function: "f",
                kind: "builtin",
                execution_id: uuid::Uuid::now_v7(),
                call_id: &call_id,
                trigger: crate::semconv::TRIGGER_HTTP,
                job: None,
                usage: &usage,
                wall: Duration::ZERO,
                bytes_in: 0,
                bytes_out: 4,
                log_bytes: 0,
                status: 200,
            };
            span(&tracer, &invoked);
            if i % 4096 == 0 {
                // Let the sink (on this runtime) read.
                tokio::task::yield_now().await;
            }
        }
        tokio::task::spawn_blocking(move || provider.shutdown()).await??;
        let cpu = process_cpu().saturating_sub(cpu_before);
        let arrived = received.load(Ordering::Relaxed) - before_received;
        anyhow::ensure!(arrived == EXPORT_SPANS as u64, "the sink received {arrived} of {EXPORT_SPANS} spans");
        Ok(cpu / EXPORT_SPANS as u32)
    }

    let endpoint = format!("http://{sink}");
    eprintln!("bench: span export, {EXPORT_SPANS} spans with each exporter");
    let config = crate::telemetry::TelemetryConfig {
        endpoint: Some(endpoint.clone()),
        protocol: OtlpProtocol::Grpc,
        token: None,
        max_queue_size: EXPORT_SPANS,
        ..Default::default()
    };
    // The gateway's path: the span written straight to the processor's queue, and the
    // `traceparent` it hands to the function.
    let processor =
        crate::telemetry::OtlpProcessor::new(&config, &endpoint, EXPORT_SPANS, None).map_err(anyhow::Error::msg)?;
    let queue = processor.queue();
    let parent = opentelemetry::Context::new();
    let direct = |_: &opentelemetry_sdk::trace::SdkTracer, invoked: &crate::telemetry::Invoked| {
        let span = crate::telemetry::InvocationSpan::start(queue.clone(), &parent);
        std::hint::black_box(crate::telemetry::traceparent(span.span_context()));
        span.end(invoked);
    };
    let ours = run(processor, direct, received).await?;
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(&endpoint).build()?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(EXPORT_SPANS)
        .with_max_export_batch_size(2048)
        .with_scheduled_delay(Duration::from_millis(500))
        .build();
    let sdk = |tracer: &opentelemetry_sdk::trace::SdkTracer, invoked: &crate::telemetry::Invoked| {
        crate::telemetry::sdk_invocation_span(tracer, &parent, invoked);
    };
    let opentelemetry_otlp =
        run(BatchSpanProcessor::builder(exporter).with_batch_config(batch).build(), sdk, received).await?;
    Ok(ExportCost { spans: EXPORT_SPANS, ours, opentelemetry_otlp })
}

/// The names of the span export threads (`telemetry::otlp`; a thread's name is cut to 15
/// bytes), and of the receiver's.
const EXPORT_THREADS: &[&str] = &["sfaas-span-expo", "sfaas-otlp-io"];
const SINK_THREAD: &str = "otlp-sink";

/// Run time of this process's threads named `names`, by the scheduler's account (threads that
/// have ended are not counted).
fn threads_cpu(names: &[&str]) -> Duration {
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten();
    let nanos = tasks
        .filter(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            names.contains(&comm.trim_end())
        })
        .filter_map(|task| {
            let schedstat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            schedstat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum();
    Duration::from_nanos(nanos)
}

/// CPU time (user + system) this process has used so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// A minimal OTLP/gRPC `TraceService` on loopback that accepts export requests over the protocol
/// `sfaas up` uses and counts their spans. It stands in for a collector on another machine: it
/// walks each request down to its spans' encoded bytes (zero-copy) instead of building every
/// attribute, so the receiver's own decoding (measured by `sfaas bench ingest`) is not charged
/// to the gateway under test; everything on the exporting side runs in full. It runs on a
/// thread of its own, as a collector would not run on the gateway's workers, which also lets
/// the report give its CPU apart.
fn start_otlp_sink(spans: Arc<AtomicU64>) -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name(SINK_THREAD.into()).spawn(move || {
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            // HTTP/2 settings as the collector's OTLP/gRPC receiver has them (collector/src/lib.rs).
            let _ = tonic::transport::Server::builder()
                .max_frame_size(1 << 20)
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(4 << 20)
                .add_service(sink::CountingTraceService(spans))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        })
    })?;
    Ok(addr)
}

mod sink {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
    use tonic::codegen::{BoxFuture, Context, Poll, Service, StdError, http};

    /// `ExportTraceServiceRequest` read only as deep as its spans (same field numbers).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Export {
        #[prost(message, repeated, tag = "1")]
        resource_spans: Vec<ResourceSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct ResourceSpans {
        #[prost(message, repeated, tag = "2")]
        scope_spans: Vec<ScopeSpans>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct ScopeSpans {
        #[prost(bytes = "bytes", repeated, tag = "2")]
        spans: Vec<bytes::Bytes>,
    }

    #[derive(Clone)]
    pub struct CountingTraceService(pub Arc<AtomicU64>);

    impl tonic::server::NamedService for CountingTraceService {
        const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
    }

    impl tonic::server::UnaryService<Export> for CountingTraceService {
        type Response = ExportTraceServiceResponse;
        type Future = BoxFuture<tonic::Response<Self::Response>, tonic::Status>;
        fn call(&mut self, request: tonic::Request<Export>) -> Self::Future {
            let spans: usize =
                request.get_ref().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
            self.0.fetch_add(spans as u64, Ordering::Relaxed);
            Box::pin(async { Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None })) })
        }
    }

    impl<B> Service<http::Request<B>> for CountingTraceService
    where
        B: tonic::codegen::Body + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: http::Request<B>) -> Self::Future {
            let service = self.clone();
            Box::pin(async move {
                if request.uri().path() != "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
                    return Ok(tonic::Status::unimplemented("only TraceService/Export").into_http());
                }
                let codec = tonic_prost::ProstCodec::<ExportTraceServiceResponse, Export>::default();
                Ok(tonic::server::Grpc::new(codec).unary(service, request).await)
            })
        }
    }
}
