//! The flow journal's disk use: a finished run keeps only what its status page shows, and a
//! tenant's finished runs are kept within a retention; running runs are never touched.

use std::time::Duration;

use bytes::Bytes;
use sqlx::SqlitePool;
use stateful_faas_core::database;
use stateful_faas_core::flow::journal::{Entry, Journal, NodeRecord, Retention, RunEnd};
use stateful_faas_core::tenant::TenantId;

async fn open() -> (tempfile::TempDir, SqlitePool) {
    let dir = tempfile::tempdir().unwrap();
    let pool = database::open(&database::default_url(dir.path())).await.unwrap();
    (dir, pool)
}

const DEFINITION: &str = r#"{"name":"f","nodes":{"a":{"function":"echo"}}}"#;

/// Starts a run with a 10 KiB input and journals its node `a` with an inline output.
async fn create(journal: &Journal, tenant: &TenantId, run_id: &str) {
    let input = vec![b'i'; 10 << 10];
    journal.create_run(tenant, run_id, "f", DEFINITION, &input, None, None, None).await.unwrap();
    journal
        .record(Entry::NodeFinished(NodeRecord {
            tenant: tenant.clone(),
            run_id: run_id.to_string(),
            node: "a".into(),
            state: "succeeded",
            attempts: 1,
            output: Some(Bytes::from(vec![b'o'; 1000])),
            output_ref: Some("nodes/a".into()),
            output_bytes: Some(1000),
            error: None,
        }))
        .await;
}

async fn finish(journal: &Journal, tenant: &TenantId, run_id: &str, output_bytes: usize) {
    journal
        .finish_run(RunEnd {
            tenant: tenant.clone(),
            run_id: run_id.to_string(),
            status: "succeeded",
            output: Some(Bytes::from(vec![b'x'; output_bytes])),
            error: None,
            state_byte_seconds: "0".into(),
        })
        .await;
}

async fn run_ids(journal: &Journal, tenant: &TenantId) -> Vec<String> {
    let mut runs: Vec<String> =
        journal.runs(tenant, None, None, 1000).await.unwrap().into_iter().map(|run| run.run_id).collect();
    runs.sort();
    runs
}

/// Polls until `tenant` has `expected` runs (retention runs just after a batch's commit).
async fn settle(journal: &Journal, tenant: &TenantId, expected: &[String]) {
    for _ in 0..100 {
        if run_ids(journal, tenant).await == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(run_ids(journal, tenant).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_run_keeps_only_what_its_status_shows() {
    let (_dir, pool) = open().await;
    let journal = Journal::start(pool.clone());
    let acme = TenantId::new("acme").unwrap();
    create(&journal, &acme, "run-1").await;
    create(&journal, &acme, "run-2").await;
    finish(&journal, &acme, "run-1", 10).await;

    // The input and definition copies were the bulk of every run (one run per streamed batch).
    let sizes: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT run_id, length(input), length(definition) FROM flow_runs ORDER BY run_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(sizes, vec![("run-1".into(), 0, 0), ("run-2".into(), 10 << 10, DEFINITION.len() as i64)]);
    let outputs: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT run_id, length(output) FROM flow_nodes ORDER BY run_id").fetch_all(&pool).await.unwrap();
    assert_eq!(outputs, vec![("run-1".into(), None), ("run-2".into(), Some(1000))]);

    // What the API shows is all there; the running run still resumes with all it needs.
    let run = journal.run(&acme, "run-1").await.unwrap().unwrap();
    assert_eq!((run.status.as_str(), run.output.as_deref()), ("succeeded", Some(&b"xxxxxxxxxx"[..])));
    let nodes = journal.nodes(&acme, "run-1").await.unwrap();
    assert_eq!((nodes[0].state.as_str(), nodes[0].output_bytes), ("succeeded", Some(1000)));
    let interrupted = journal.interrupted().await.unwrap();
    assert_eq!(interrupted.len(), 1);
    assert_eq!((interrupted[0].run_id.as_str(), interrupted[0].input.len()), ("run-2", 10 << 10));
    assert_eq!(interrupted[0].definition, DEFINITION);
    assert_eq!(interrupted[0].finished, vec![("a".into(), "succeeded".into(), Some(vec![b'o'; 1000]))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_runs_beyond_the_retention_are_deleted_oldest_first() {
    let (_dir, pool) = open().await;
    let journal = Journal::with_retention(pool.clone(), Retention { max_runs: 5, max_bytes: 1 << 20 });
    let (acme, globex) = (TenantId::new("acme").unwrap(), TenantId::new("globex").unwrap());
    let id = |i: usize| format!("run-{i:02}");
    // The oldest run of all is still running: it stays, whatever the retention.
    create(&journal, &acme, &id(0)).await;
    for i in 1..=12 {
        create(&journal, &acme, &id(i)).await;
        finish(&journal, &acme, &id(i), 10).await;
        tokio::time::sleep(Duration::from_millis(2)).await; // distinct finish times
    }
    create(&journal, &globex, "other").await;
    finish(&journal, &globex, "other", 10).await;
    let mut kept = vec![id(0)];
    kept.extend((8..=12).map(id));
    settle(&journal, &acme, &kept).await;
    assert_eq!(run_ids(&journal, &globex).await, vec!["other"], "other tenants keep theirs");
    let orphans: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM flow_nodes WHERE run_id NOT IN (SELECT run_id FROM flow_runs)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(orphans, 0, "a deleted run's nodes go with it");
    assert_eq!(journal.interrupted().await.unwrap()[0].run_id, id(0));

    // The bytes of outputs count too: 300 KiB each, 1 MiB kept is the newest three.
    for i in 13..=16 {
        create(&journal, &acme, &id(i)).await;
        finish(&journal, &acme, &id(i), 300 << 10).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    settle(&journal, &acme, &[id(0), id(14), id(15), id(16)]).await;

    // The newest finished run stays even when it alone is over the bytes.
    create(&journal, &acme, &id(17)).await;
    finish(&journal, &acme, &id(17), 2 << 20).await;
    settle(&journal, &acme, &[id(0), id(17)]).await;
}
