//! The background runtime. Work that no caller waits on at a request's latency (telemetry
//! commits, PromQL loads and evaluations, billing runs) runs here, on threads of their own at
//! a lower scheduling priority (nice [`NICE`]), so that on a busy machine the threads that
//! answer requests run first: one tenant's heavy queries or telemetry cannot hold up another
//! tenant's calls, and overload shows as backpressure on the heavy work (a longer ingest queue,
//! slower queries) rather than as latency for everyone.

use std::future::Future;
use std::sync::OnceLock;

/// How much less CPU the background threads get than the request threads when both want it
/// (Linux nice values: at 10, about a tenth).
pub const NICE: i32 = 10;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The runtime, started on first use with a worker per core.
pub fn handle() -> &'static tokio::runtime::Handle {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(std::thread::available_parallelism().map_or(2, usize::from))
                .thread_name("sfaas-background")
                .on_thread_start(|| {
                    // SAFETY: setpriority on the calling thread (Linux keeps a nice value per
                    // thread). Raising it needs no privilege; if it fails, the work runs at the
                    // normal priority, which is only slower for others.
                    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE) };
                })
                .enable_all()
                .build()
                .expect("the background runtime starts")
        })
        .handle()
}

/// Runs `future` in the background; its handle may be awaited from any runtime.
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    handle().spawn(future)
}
