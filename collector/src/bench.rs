//! `sfaas bench ingest`: OTLP/HTTP ingest throughput end to end (HTTP → decode → attribute →
//! commit → acknowledge) beside the raw insert rate of the same rows into the same database,
//! on SQLite and on PostgreSQL; and memory under overload.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;

use testkit::PgServer;

use crate::auth::{Credential, Sender, TokenResolver};
use crate::store::TelemetryStore;
use crate::{Collector, CollectorConfig};

/// Spans per request, as the issue and the OpenTelemetry SDKs' default batch size have it.
pub const SPANS_PER_REQUEST: usize = 512;

struct BenchTokens;

impl TokenResolver for BenchTokens {
    fn resolve(&self, token: &str) -> Option<Credential> {
        (token == "bench").then(|| Credential::Ingest { tenant: "bench".into() })
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
        ..Default::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(any_value::Value::IntValue(value)) }),
        ..Default::default()
    }
}

/// The first `spans` spans of [`realistic_request`] as an OTLP/HTTP protobuf body.
pub fn realistic_body(seed: u64, spans: usize) -> Vec<u8> {
    let mut request = realistic_request(seed);
    request.resource_spans[0].scope_spans[0].spans.truncate(spans);
    request.encode_to_vec()
}

/// SplitMix64's finalizer: a fixed, well-spread 64-bit value for each input.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One request of 512 spans of a web service, with attributes as HTTP instrumentation sets them.
pub fn realistic_request(seed: u64) -> ExportTraceServiceRequest {
    let seed = seed + 1; // all-zero ids are invalid
    let start = 1_764_000_000_000_000_000u64 + seed * 1_000_000;
    let spans = (0..SPANS_PER_REQUEST as u64)
        .map(|i| {
            // Ids as SDKs make them: random (a fixed mix of seed and index, so runs repeat).
            let trace = mix((seed << 32) | (i / 8));
            let mut trace_id = [0u8; 16];
            trace_id[..8].copy_from_slice(&trace.to_be_bytes());
            trace_id[8..].copy_from_slice(&mix(trace).to_be_bytes());
            let span_id = mix((seed << 32) | i | (1 << 31)).to_be_bytes();
            // Every eighth span is a server span; the seven after it are its children.
            let parent = if i % 8 != 0 {
                mix((seed << 32) | (i - i % 8) | (1 << 31)).to_be_bytes().to_vec()
            } else {
                Vec::new()
            };
            Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_vec(),
                parent_span_id: parent,
                name: if i % 8 == 0 { "GET /api/orders/{id}".into() } else { "SELECT orders".into() },
                kind: if i % 8 == 0 { 2 } else { 3 },
                start_time_unix_nano: start + i * 1000,
                end_time_unix_nano: start + i * 1000 + 250_000,
                attributes: vec![
                    string("http.request.method", "GET"),
                    string("http.route", "/api/orders/{id}"),
                    int("http.response.status_code", 200),
                    string("url.path", &format!("/api/orders/{}", i * 7919 % 100_000)),
                    string("server.address", "shop.example.internal"),
                    string("client.address", &format!("10.0.{}.{}", i % 255, seed % 255)),
                    string("user_agent.original", "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0"),
                    string("db.system", "postgresql"),
                    string("db.statement", "SELECT * FROM orders WHERE id = $1"),
                    int("enduser.id", (i * 31 % 5000) as i64),
                ],
                status: Some(Status { code: 1, message: String::new() }),
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    string("service.name", "shop-api"),
                    string("service.version", "1.4.2"),
                    string("host.name", "node-7"),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
            ..Default::default()
        }],
    }
}

/// One backend's figures: spans per second of wall time, and per second of CPU time.
struct Figures {
    backend: &'static str,
    raw: f64,
    raw_cpu: f64,
    ingest: f64,
    ingest_cpu: f64,
}

/// CPU time (user + system) of this process so far, in seconds.
pub fn process_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Runs the benchmark on SQLite and, when its binaries are here, PostgreSQL.
pub async fn run(requests: usize, concurrency: usize) -> anyhow::Result<String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let bodies: Arc<Vec<Vec<u8>>> =
        Arc::new((0..requests as u64).map(|seed| realistic_request(seed).encode_to_vec()).collect());
    let dir = std::env::temp_dir().join(format!("sfaas-bench-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut figures = Vec::new();
    let mut urls = vec![("SQLite", format!("sqlite://{}", dir.join("ingest.db").display()))];
    let postgres = PgServer::start();
    match &postgres {
        Some(server) => urls.push(("PostgreSQL", server.url())),
        None => eprintln!("bench ingest: PostgreSQL skipped (no server binaries: pg_config --bindir)"),
    }
    let mut memory = String::new();
    let mut bytes_per_span = None;
    for (backend, url) in urls {
        // Raw: the same rows, converted beforehand, written by the store's own write path (the
        // span log), without HTTP, decoding or the pipeline.
        let raw_store = match &postgres {
            Some(server) if backend == "PostgreSQL" => {
                TelemetryStore::open_with_blocks(&url, &server.blocks_dir()).await?
            }
            _ => TelemetryStore::open(&format!("{url}-raw")).await?,
        };
        let sender = Sender { credential: Credential::Ingest { tenant: "raw".into() }, org_id: None };
        let batches: Vec<_> = (0..requests as u64)
            .map(|seed| {
                crate::receivers::otlp::traces(realistic_request(seed + 1_000_000), &sender).expect("realistic").batch
            })
            .collect();
        eprintln!("bench ingest: {backend}, the store's write path, {requests} × {SPANS_PER_REQUEST} spans");
        let (started, cpu) = (Instant::now(), process_cpu());
        for batch in &batches {
            raw_store.write(batch).await?;
        }
        let spans = (requests * SPANS_PER_REQUEST) as f64;
        let raw = spans / started.elapsed().as_secs_f64();
        let raw_cpu = spans / (process_cpu() - cpu);
        if backend == "SQLite" {
            raw_store.seal_spans().await?;
            let blocks = dir.join("ingest.db-raw.blocks/spans");
            let mut bytes = 0;
            for entry in std::fs::read_dir(&blocks)? {
                bytes += entry?.metadata()?.len();
            }
            bytes_per_span = Some(bytes as f64 / spans);
        }

        let mut config = CollectorConfig::new(url.clone());
        config.blocks_dir = postgres.as_ref().filter(|_| backend == "PostgreSQL").map(PgServer::blocks_dir);
        config.otlp_grpc_addr = "127.0.0.1:0".parse()?;
        config.otlp_http_addr = "127.0.0.1:0".parse()?;
        config.jaeger_addr = "127.0.0.1:0".parse()?;
        // The generated spans have fixed timestamps: keep them from the retention pass.
        config.retention = Duration::from_secs(100 * 365 * 24 * 3600);
        // What is measured is the collector, not one tenant's quota.
        config.pipeline.tenant_quota = crate::pipeline::TenantQuota {
            spans_per_second: 1 << 40,
            samples_per_second: 1 << 40,
            bytes_per_day: u64::MAX,
        };
        let running = Collector::start(config, Arc::new(BenchTokens)).await?;
        let endpoint = format!("http://{}/v1/traces", running.otlp_http_addr);
        eprintln!(
            "bench ingest: {backend}, OTLP/HTTP, {requests} requests of {SPANS_PER_REQUEST} spans, {concurrency} clients"
        );
        let cpu = process_cpu();
        let (elapsed, refused) = drive(&endpoint, bodies.clone(), concurrency).await?;
        anyhow::ensure!(refused == 0, "{refused} requests were refused at the sustainable load");
        let ingest = spans / elapsed.as_secs_f64();
        let ingest_cpu = spans / (process_cpu() - cpu);
        let stored = running.collector.store.counts("bench").await?.spans;
        anyhow::ensure!(stored == (requests * SPANS_PER_REQUEST) as u64, "stored {stored} spans");
        if backend == "SQLite" {
            // Overload: 4× the clients over fresh ids; memory must stay bounded (503s, not buffering).
            let overload: Arc<Vec<Vec<u8>>> = Arc::new(
                (0..requests as u64).map(|seed| realistic_request(seed + 2_000_000).encode_to_vec()).collect(),
            );
            let peak = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let sampler = {
                let (peak, stop) = (peak.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            };
            let before = rss_bytes();
            eprintln!("bench ingest: overload, {} clients", concurrency * 4);
            let (_, refused) = drive(&endpoint, overload, concurrency * 4).await?;
            stop.store(true, Ordering::Relaxed);
            sampler.await?;
            let _ = writeln!(
                memory,
                "Overload (SQLite, {} clients, {requests} requests): {refused} answered 503 + Retry-After; resident memory {} MiB before, {} MiB at peak (queue bound: {} spans).",
                concurrency * 4,
                before >> 20,
                peak.load(Ordering::Relaxed) >> 20,
                running.collector.config.pipeline.capacity
            );
        }
        running.shutdown().await;
        figures.push(Figures { backend, raw, raw_cpu, ingest, ingest_cpu });
    }
    drop(postgres);
    let _ = std::fs::remove_dir_all(&dir);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "| catalog | store's write path, spans/s | OTLP/HTTP ingest, spans/s | ingest / write path | ingest per core \
         ({cores} cores) | write path per CPU-second | ingest per CPU-second |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for f in &figures {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} % | {:.0} | {:.0} | {:.0} |",
            f.backend,
            f.raw,
            f.ingest,
            f.ingest / f.raw * 100.0,
            f.ingest / cores,
            f.raw_cpu,
            f.ingest_cpu
        );
    }
    let _ = writeln!(
        out,
        "\nPer CPU-second: spans divided by the CPU time this process used meanwhile (the HTTP clients, in \
         this process, included; PostgreSQL's own processes not)."
    );
    let _ = writeln!(out, "\n{memory}");
    if let Some(bytes) = bytes_per_span {
        let _ = writeln!(out, "Spans on disk (SQLite run, sealed into blocks): {bytes:.0} bytes a span.");
    }
    let _ = writeln!(out, "\n{}", decoding());
    Ok(out)
}

/// Decoding and converting a 512-span protobuf request, one core: through prost's structs, and
/// straight from the bytes (what the HTTP receiver does).
fn decoding() -> String {
    use prost::Message;
    let sender = Sender { credential: Credential::Ingest { tenant: "bench".into() }, org_id: None };
    let bodies: Vec<Vec<u8>> = (0..200).map(|seed| realistic_request(seed).encode_to_vec()).collect();
    let spans = (bodies.len() * SPANS_PER_REQUEST) as f64;
    let time = |decode: &dyn Fn(&[u8]) -> usize| {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let started = Instant::now();
            let rows: usize = bodies.iter().map(|body| decode(body)).sum();
            assert_eq!(rows as f64, spans);
            best = best.min(started.elapsed().as_secs_f64());
        }
        best / spans * 1e9
    };
    let prost = time(&|body| {
        let request = ExportTraceServiceRequest::decode(body).expect("valid");
        crate::receivers::otlp::traces(request, &sender).expect("realistic").batch.spans.len()
    });
    let wire =
        time(&|body| crate::receivers::otlp::traces_from_protobuf(body, &sender).expect("valid").batch.spans.len());
    format!(
        "Decoding and converting 512-span protobuf requests (best of 5 over 102 400 spans, one core): \
         through prost's structs {prost:.0} ns a span, straight from the bytes {wire:.0} ns ({:.2}×).",
        prost / wire
    )
}

/// Posts every body once from `concurrency` clients; returns the time taken and the refusals.
async fn drive(endpoint: &str, bodies: Arc<Vec<Vec<u8>>>, concurrency: usize) -> anyhow::Result<(Duration, u64)> {
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(concurrency).build()?;
    let next = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, bodies, next, refused, endpoint) =
            (client.clone(), bodies.clone(), next.clone(), refused.clone(), endpoint.to_string());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(body) = bodies.get(i) else { return Ok::<_, anyhow::Error>(()) };
                loop {
                    let response = client
                        .post(&endpoint)
                        .bearer_auth("bench")
                        .header("content-type", "application/x-protobuf")
                        .body(body.clone())
                        .send()
                        .await?;
                    match response.status().as_u16() {
                        200 => break,
                        503 => {
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        status => anyhow::bail!("ingest answered {status}"),
                    }
                }
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok((started.elapsed(), refused.load(Ordering::Relaxed)))
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(|v| v.trim().trim_end_matches("kB").trim().to_string())
        })
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// `sfaas bench spans`: the span store's readers over `spans` stored spans: trace by id and
/// a Jaeger search, through the store's queries.
pub async fn readers(spans: usize, remote: Option<crate::store::blocks::remote::Remote>) -> anyhow::Result<String> {
    use crate::store::TraceSearch;
    let requests = spans.div_ceil(SPANS_PER_REQUEST);
    let dir = tempfile_dir("readers")?;
    let url = format!("sqlite://{}", dir.join("telemetry.db").display());
    let store = TelemetryStore::open_with_remote_blocks(&url, &dir.join("telemetry.db.blocks"), remote.clone()).await?;
    let sender = Sender { credential: Credential::Ingest { tenant: "bench".into() }, org_id: None };
    // Requests 200 ms apart: the spans cover an hour per 18 000 requests (9.2 M spans).
    let batch = |seed: u64| {
        let mut batch = crate::receivers::otlp::traces(realistic_request(seed), &sender).expect("realistic").batch;
        for span in &mut batch.spans {
            span.start_ns += seed as i64 * 199_000_000;
            span.end_ns += seed as i64 * 199_000_000;
        }
        batch
    };
    let (started, cpu) = (Instant::now(), process_cpu());
    for seed in 0..requests as u64 {
        store.write(&batch(seed)).await?;
        if seed % 2000 == 0 {
            eprintln!(
                "bench spans: {} of {} spans stored",
                seed as usize * SPANS_PER_REQUEST,
                requests * SPANS_PER_REQUEST
            );
        }
    }
    store.seal_spans().await?;
    let mut out = format!(
        "{} spans stored in {:.0} s ({:.0} s of CPU, generating them included){}.\n",
        requests * SPANS_PER_REQUEST,
        started.elapsed().as_secs_f64(),
        process_cpu() - cpu,
        if remote.is_some() { ", blocks uploaded to s3rver as they were sealed" } else { "" }
    );
    // Traces spread over the whole range, and the search of the last hour.
    let ids: Vec<String> = (0..50u64)
        .map(|k| batch(k * requests as u64 / 50).spans[(k as usize * 37) % SPANS_PER_REQUEST].trace_id.clone())
        .collect();
    let last = batch(requests as u64 - 1).spans[0].start_ns;
    let search = TraceSearch {
        service: "shop-api".into(),
        operation: Some("SELECT orders".into()),
        tags: Vec::new(),
        min_ns: 0,
        max_ns: 0,
        limit: 20,
        start_ns: last - 3_600_000_000_000,
        end_ns: last,
    };
    let tagged = TraceSearch { tags: vec![("http.response.status_code".into(), "200".into())], ..search.clone() };
    let queries = async |store: &TelemetryStore, out: &mut String| -> anyhow::Result<()> {
        let _ = writeln!(out, "\n| query | p50 ms | p99 ms |\n|---|---:|---:|");
        let p = |mut times: Vec<f64>, q: f64| {
            times.sort_by(f64::total_cmp);
            times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1]
        };
        let mut by_id = Vec::new();
        for id in &ids {
            let t = Instant::now();
            let found = store.trace("bench", id).await?;
            by_id.push(t.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(found.len() == 8, "trace {id}: {} spans", found.len());
        }
        let _ = writeln!(out, "| trace by id (50 traces) | {:.1} | {:.1} |", p(by_id.clone(), 0.5), p(by_id, 0.99));
        for (what, search) in
            [("search: service, operation, last hour, limit 20", &search), ("the same with a tag", &tagged)]
        {
            let mut times = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                let found = store.find_traces("bench", search).await?;
                times.push(t.elapsed().as_secs_f64() * 1000.0);
                anyhow::ensure!(found.len() == 20, "{what}: {} traces", found.len());
            }
            let _ = writeln!(out, "| {what} (5 times) | {:.1} | {:.1} |", p(times.clone(), 0.5), p(times, 0.99));
        }
        Ok(())
    };
    match remote {
        None => queries(&store, &mut out).await?,
        Some(remote) => {
            // Another host: the same catalog, an empty cache; each block it reads is downloaded
            // once.
            let other = TelemetryStore::open_with_remote_blocks(&url, &dir.join("other-host"), Some(remote)).await?;
            let _ = write!(out, "\nAnother host, its cache empty (a block is downloaded when first read):\n");
            queries(&other, &mut out).await?;
            let _ = write!(out, "\nThe same host again, the blocks it read cached:\n");
            queries(&other, &mut out).await?;
        }
    }
    let mut block_bytes = 0;
    for entry in std::fs::read_dir(dir.join("telemetry.db.blocks/spans"))? {
        block_bytes += entry?.metadata()?.len();
    }
    let _ = writeln!(out, "\nBlocks: {:.1} MiB.", block_bytes as f64 / (1 << 20) as f64);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

fn tempfile_dir(what: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("sfaas-bench-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
