//! `sfaas bench billing` on a small month: its own checks hold (the first run bills every span
//! written, the incremental run every new invocation) and it reports each run.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_bills_what_it_wrote() {
    let report = billing::bench::run(2000, 300, None).await.unwrap();
    for line in
        ["first run (the month from its spans)", "re-rating", "incremental run: 300 new invocations", "idle run"]
    {
        assert!(report.contains(line), "{line:?} missing from:\n{report}");
    }
}
