//! Span blocks on an S3 object store (s3rver) with PostgreSQL as the catalog: two hosts (two
//! data folders, nothing shared on disk) serve one store. What one host seals, the other reads,
//! merges and removes; no tenant reads another's spans on either; a crash between an upload and
//! its listing leaves nothing behind. Log blocks go the same way.

use crate::common;

use std::time::{Duration, Instant};

use collector::model::{Batch, LogRow, SpanRow};
use collector::store::blocks::remote::Remote;
use collector::store::{LogScan, TelemetryStore, TraceSearch};
use common::PgServer;
use testkit::required;

const T0: i64 = 1_700_000_000_000_000_000;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// s3rver (npm) on a free port with its files in `dir`: its endpoint.
async fn s3rver(dir: &std::path::Path) -> Option<(Child, String)> {
    let program = testkit::s3rver()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Child(
        std::process::Command::new(program)
            .args(["-d", &dir.to_string_lossy(), "-p", &port.to_string(), "--silent"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("starting s3rver"),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http.put(format!("{endpoint}/blocks")).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "s3rver did not answer on port {port}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Some((child, endpoint))
}

fn span(tenant: &str, trace: usize, i: usize) -> SpanRow {
    SpanRow {
        tenant: tenant.into(),
        trace_id: format!("{trace:032x}"),
        span_id: format!("{:016x}", trace * 100 + i + 1),
        parent_span_id: (i > 0).then(|| format!("{:016x}", trace * 100 + 1)),
        name: format!("op{i}"),
        kind: 2,
        start_ns: T0 + (trace * 100 + i) as i64 * 1_000_000,
        end_ns: T0 + (trace * 100 + i) as i64 * 1_000_000 + 500_000,
        status_code: 0,
        status_message: String::new(),
        service_name: "shop".into(),
        attributes: format!(r#"{{"owner":"{tenant}"}}"#),
        events: "[]".into(),
        links: "[]".into(),
        resource: "{}".into(),
        scope: "{}".into(),
        metered: false,
    }
}

/// A tenant's traces `traces`, three spans each.
fn batch(tenant: &str, traces: std::ops::Range<usize>) -> Batch {
    Batch { spans: traces.flat_map(|t| (0..3).map(move |i| span(tenant, t, i))).collect(), ..Batch::default() }
}

/// The block objects under the bucket's prefix, as files s3rver keeps.
fn objects(s3: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![s3.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned())
                && name.ends_with(".parquet._S3rver_object")
            {
                found.push(name.trim_end_matches("._S3rver_object").to_string());
            }
        }
    }
    found.sort();
    found
}

async fn spans_of(store: &TelemetryStore, tenant: &str, traces: std::ops::Range<usize>) -> Vec<SpanRow> {
    let mut all = Vec::new();
    for t in traces {
        all.extend(store.trace(tenant, &format!("{t:032x}")).await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_blocks_on_s3_through_a_postgres_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let s3_dir = dir.path().join("s3");
    std::fs::create_dir_all(&s3_dir).unwrap();
    let Some((_s3, endpoint)) = s3rver(&s3_dir).await else { return };
    let Some(postgres) = PgServer::start().or_else(|| required("PostgreSQL server binaries")) else { return };
    let remote = || Remote::s3("s3://blocks/cluster-a", Some(&endpoint), Some(("S3RVER", "S3RVER"))).unwrap();
    let host = |name: &str| dir.path().join(name).join("blocks");
    let a = TelemetryStore::open_with_remote_blocks(&postgres.url(), &host("a"), Some(remote())).await.unwrap();
    let b = TelemetryStore::open_with_remote_blocks(&postgres.url(), &host("b"), Some(remote())).await.unwrap();

    // Host a acknowledges; host b reads it once it is sealed, from the object store.
    a.write(&batch("acme", 0..10)).await.unwrap();
    a.write(&batch("globex", 0..10)).await.unwrap();
    assert!(spans_of(&b, "acme", 0..10).await.is_empty(), "not sealed: in host a's log only");
    a.seal_spans().await.unwrap();
    assert_eq!(objects(&s3_dir).len(), 2, "a block per tenant, uploaded");
    let acme = spans_of(&b, "acme", 0..10).await;
    assert_eq!(acme, batch("acme", 0..10).spans);
    assert!(acme.iter().all(|s| s.attributes.contains("acme")));
    assert!(spans_of(&b, "globex", 0..10).await.iter().all(|s| s.attributes.contains("globex")));
    let search = TraceSearch {
        service: "shop".into(),
        operation: None,
        tags: Vec::new(),
        start_ns: T0,
        end_ns: T0 + 3_600_000_000_000,
        min_ns: 0,
        max_ns: 0,
        limit: 20,
    };
    assert_eq!(b.find_traces("acme", &search).await.unwrap().len(), 10);
    assert!(b.find_traces("nobody", &search).await.unwrap().is_empty());
    assert!(std::fs::read_dir(host("b").join("spans")).unwrap().count() >= 1, "host b cached what it read");

    // Three more seals of acme's on host a; host b merges the four (downloading the ones it has
    // not read), uploads the merged block, and removes the old ones once their grace is over.
    for seal in 1..4 {
        a.write(&batch("acme", seal * 10..seal * 10 + 10)).await.unwrap();
        a.seal_spans().await.unwrap();
    }
    assert_eq!(objects(&s3_dir).len(), 5);
    assert_eq!(b.merge_span_blocks().await.unwrap(), 4);
    assert_eq!(b.remove_merged_span_blocks(Duration::ZERO).await.unwrap(), 4);
    assert_eq!(objects(&s3_dir).len(), 2, "acme's merged block and globex's");
    assert_eq!(spans_of(&a, "acme", 0..40).await, batch("acme", 0..40).spans, "host a reads the merged block");

    // A host whose cache may hold nothing but the block it reads: every read is right, and its
    // folder keeps one block.
    let tiny = remote().with_cache_limit(1);
    let c = TelemetryStore::open_with_remote_blocks(&postgres.url(), &host("c"), Some(tiny)).await.unwrap();
    for _ in 0..2 {
        assert_eq!(spans_of(&c, "globex", 0..10).await, batch("globex", 0..10).spans);
        assert_eq!(spans_of(&c, "acme", 0..40).await, batch("acme", 0..40).spans);
        assert_eq!(std::fs::read_dir(host("c").join("spans")).unwrap().count(), 1, "one block cached");
    }
    drop(c);

    // Retention removes the objects too.
    assert_eq!(a.delete_before("globex", i64::MAX).await.unwrap(), 30);
    assert_eq!(objects(&s3_dir).len(), 1);
    assert!(spans_of(&b, "globex", 0..10).await.is_empty());

    // A crash after an upload, before its listing: the writer removes the object when it opens.
    let id = std::fs::read_dir(host("b").join("wal")).unwrap().next().unwrap().unwrap().file_name();
    let orphan = format!("{}-crashed.parquet", id.to_string_lossy());
    std::fs::write(host("b").join("spans").join(&orphan), b"half a block").unwrap();
    remote().upload(&host("b").join("spans").join(&orphan), &format!("spans/{orphan}")).await.unwrap();
    assert_eq!(objects(&s3_dir).len(), 2);
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = TelemetryStore::open_with_remote_blocks(&postgres.url(), &host("b"), Some(remote())).await.unwrap();
    assert_eq!(objects(&s3_dir).len(), 1, "the unlisted upload is gone");
    assert_eq!(spans_of(&b, "acme", 0..40).await.len(), 120);

    // Log records: sealed on host a into a block uploaded to the store, read on host b (which
    // downloads it); another tenant's read finds nothing; retention removes the object.
    let line = |tenant: &str, i: i64| LogRow {
        tenant: tenant.into(),
        record_hash: format!("{tenant}-{i}"),
        ts_ns: T0 + i,
        severity_number: 9,
        severity_text: "INFO".into(),
        body: format!("{tenant} line {i}"),
        attributes: "{}".into(),
        resource: "{}".into(),
        trace_id: None,
        span_id: None,
        metered: false,
    };
    a.write(&Batch { logs: (0..5).map(|i| line("acme", i)).collect(), ..Batch::default() }).await.unwrap();
    assert_eq!(a.seal_logs(true).await.unwrap(), 5);
    assert_eq!(objects(&s3_dir).len(), 2, "the log block, uploaded");
    let scan = |tenant: &str| LogScan {
        tenant: tenant.into(),
        start_ns: T0,
        end_ns: T0 + 100,
        limit: 100,
        ..LogScan::default()
    };
    let bodies: Vec<String> = b.scan_logs(&scan("acme")).await.unwrap().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies, (0..5).map(|i| format!("acme line {i}")).collect::<Vec<_>>());
    assert!(b.scan_logs(&scan("globex")).await.unwrap().is_empty());
    assert_eq!(b.delete_before("acme", T0 + 100).await.unwrap(), 5);
    assert_eq!(objects(&s3_dir).len(), 1);
    assert!(b.scan_logs(&scan("acme")).await.unwrap().is_empty());
}
