//! `exec` functions: the classic watchdog model, one process per request.
//!
//! The request body goes to stdin, the response comes from stdout, the method, path, query and
//! headers are environment variables (`Http_Method`, `Http_X_Call_Id`, ...). The process runs in
//! its own process group and cgroup, both killed whole when it exits, when `exec_timeout` passes
//! or when its caller goes away (billed up to then all the same). Its CPU time and peak memory come from the kernel: the cgroup's accounting (every
//! descendant), or `wait4` with the sandbox off. Each line of stderr is a log record of the
//! tenant's, tied to the invocation (`crate::telemetry::logs`), or a line of the gateway's log
//! while export is off; never the caller's.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::cgroup::Group;
use super::output::{EXPORTED_LINES_PER_SECOND, LINES_PER_SECOND, Lines, LogSink, budget_of};
use super::process::{self, Reaped};
use super::sandbox::{Io, Sandbox};
use super::{Abandoned, FunctionError, FunctionSpec, Invocation, MAX_RESPONSE_BYTES, Outcome, RunContext, Usage};
use crate::room::{Buffers, RoomError};
use crate::tenant::TenantId;

/// Runs one invocation of an exec function, in a jail of its own when `sandbox` is given: the
/// invocation ends when its process exits (or at the timeout, or when this call is dropped), and
/// then everything left in its cgroup is killed; its CPU and peak memory are the group's.
pub async fn run(
    spec: &FunctionSpec,
    command: &str,
    invocation: &Invocation,
    extra_env: &[(String, String)],
    tenant: &TenantId,
    sandbox: Option<&Sandbox>,
    context: &RunContext<'_>,
) -> Result<Outcome, FunctionError> {
    let start_error = |message: String| FunctionError::Start { name: spec.name.clone(), message };
    let jail =
        sandbox.map(|sandbox| sandbox.jail(tenant, spec, false)).transpose().map_err(|e| start_error(e.to_string()))?;
    let group = jail.as_ref().map(|jail| &jail.group);
    let env = invocation_env(invocation, extra_env);
    let workdir = spec.workdir.as_deref();
    let spawned = process::spawn(command, &spec.env, &env, workdir, spec.limits.memory_bytes, jail.as_ref(), Io::Piped)
        .map_err(|e| start_error(e.to_string()))?;
    let pid = spawned.pid;
    let (cpu_sender, reaped_cpu) = oneshot::channel();
    // From here on, if this call is dropped the invocation is stopped and what it used reported.
    let stop = StopOnDrop { pid, group, reaped_cpu: Some(reaped_cpu), armed: true };
    let (Some(stdin), Some(stdout), Some(stderr)) = (spawned.stdin, spawned.stdout, spawned.stderr) else {
        unreachable!("piped")
    };
    let pipe_error = |e: std::io::Error| start_error(e.to_string());
    let stdin = pipe::Sender::from_owned_fd(stdin).map_err(pipe_error)?;
    let stdout = pipe::Receiver::from_owned_fd(stdout).map_err(pipe_error)?;
    let stderr = pipe::Receiver::from_owned_fd(stderr).map_err(pipe_error)?;
    let reaper = tokio::task::spawn_blocking(move || {
        let reaped = process::wait4(pid);
        if let Ok(reaped) = &reaped {
            let _ = cpu_sender.send(reaped.cpu_ns);
        }
        reaped
    });
    let body = invocation.body.clone();
    let buffers = context.buffers.clone();
    let stderr_lines = StderrLines { tenant: tenant.clone(), function: spec.name.clone(), logs: context.logs.clone() };
    // Output is read while the process runs (it would block on a full pipe otherwise) and to
    // its end, which comes once the group is killed: a detached process cannot hold it open.
    let io = tokio::spawn(async move {
        let write = async move {
            let mut stdin = stdin;
            // A function that does not read its input closes the pipe early: not an error.
            let _ = stdin.write_all(&body).await;
            let _ = stdin.shutdown().await;
        };
        let (_, stdout, ()) = tokio::join!(
            write,
            read_limited(stdout, MAX_RESPONSE_BYTES + 1, Some(&buffers)),
            stderr_lines.read(stderr)
        );
        stdout
    });
    let result = wait(spec, invocation, pid, group, reaper, io).await;
    stop.disarm();
    result
}

/// Waits for an exec invocation's process to end (or for its timeout), kills what is left of
/// it, and makes its outcome from its output and what it used.
async fn wait(
    spec: &FunctionSpec,
    invocation: &Invocation,
    pid: i32,
    group: Option<&Group>,
    mut reaper: JoinHandle<std::io::Result<Reaped>>,
    mut io: JoinHandle<Output>,
) -> Result<Outcome, FunctionError> {
    let start_error = |message: String| FunctionError::Start { name: spec.name.clone(), message };
    let deadline = tokio::time::Instant::now() + spec.limits.timeout;
    let finished = tokio::time::timeout_at(deadline, &mut reaper).await;
    // The invocation is over: nothing it started may run on.
    process::kill_group(pid);
    if let Some(group) = group {
        group.kill();
    }
    let usage = |reaped: Option<&Reaped>| match group {
        Some(group) => {
            Usage { cpu_ns: group.cpu_ns(), peak_memory_bytes: group.peak_memory_bytes(), cold_start: false }
        }
        None => reaped.map(usage_of).unwrap_or_default(),
    };
    let timed_out = |reaped: Option<&Reaped>| FunctionError::Timeout {
        name: spec.name.clone(),
        timeout: spec.limits.timeout,
        usage: usage(reaped),
        still_running: None,
    };
    let reaped = match finished {
        Ok(Ok(Ok(reaped))) => reaped,
        Ok(Ok(Err(error))) => return Err(start_error(error.to_string())),
        Ok(Err(join)) => return Err(start_error(join.to_string())),
        Err(_elapsed) => return Err(timed_out(reaper.await.ok().and_then(Result::ok).as_ref())),
    };
    // With the sandbox off, a process that left the group (setsid) may still hold the output
    // open: the timeout bounds the wait for it too.
    let Ok(output) = tokio::time::timeout_at(deadline, &mut io).await else {
        io.abort();
        return Err(timed_out(Some(&reaped)));
    };
    let stdout = output.unwrap_or_else(|_| Ok(Vec::new()));
    let usage = usage(Some(&reaped));
    let name = || spec.name.clone();
    let stdout = stdout.map_err(|error| FunctionError::NoRoom { name: name(), error }.after_running(usage))?;
    if stdout.len() > MAX_RESPONSE_BYTES {
        return Err(FunctionError::ResponseTooLarge { name: name(), limit: MAX_RESPONSE_BYTES }.after_running(usage));
    }
    if let Some(group) = group.filter(|g| g.oom_killed()) {
        let limit = group.memory_limit_bytes();
        tracing::warn!(function = %spec.name, call_id = %invocation.call_id, limit, "function ran out of memory");
        let message = format!("function {} ran out of memory: its limit is {limit} bytes (limits.memory)\n", spec.name);
        return Ok(Outcome::text(500, message, usage));
    }
    match (reaped.exit_code(), reaped.signal()) {
        (Some(0), _) => {
            let content_type =
                spec.env.get("content_type").cloned().unwrap_or_else(|| "text/plain; charset=utf-8".to_string());
            Ok(Outcome {
                status: 200,
                headers: vec![("content-type".into(), content_type)],
                body: Bytes::from(stdout),
                usage,
            })
        }
        (Some(code), _) => {
            tracing::warn!(function = %spec.name, call_id = %invocation.call_id, code, "function exited with an error");
            let mut message = format!("function {} exited with status {code}\n", spec.name);
            if group.is_some_and(Group::pids_exhausted) {
                message.push_str("(it reached its limit on processes)\n");
            }
            Ok(Outcome::text(500, message, usage))
        }
        (None, signal) => {
            let signal = signal.unwrap_or_default();
            tracing::warn!(function = %spec.name, call_id = %invocation.call_id, signal, "function was killed");
            Ok(Outcome::text(500, format!("function {} was killed by signal {signal}\n", spec.name), usage))
        }
    }
}

/// Stops an exec invocation whose call is dropped before it ends (a client that went away, a
/// flow run cancelled or failed elsewhere): kills its process group and cgroup, then reports
/// what it used ([`Abandoned`]), so that it is billed all the same. Disarmed once the
/// invocation has ended on its own.
struct StopOnDrop<'a> {
    pid: i32,
    group: Option<&'a Group>,
    /// The shell's CPU time once it is reaped: what is measured with the sandbox off.
    reaped_cpu: Option<oneshot::Receiver<u64>>,
    armed: bool,
}

impl StopOnDrop<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        process::kill_group(self.pid);
        match self.group {
            // Killed first, then read: the group's CPU time is final.
            Some(group) => {
                group.kill();
                let usage =
                    Usage { cpu_ns: group.cpu_ns(), peak_memory_bytes: group.peak_memory_bytes(), cold_start: false };
                Abandoned::report(usage, None);
            }
            // The shell dies with its group; its CPU time comes when the reaper has it.
            None => {
                let reaped_cpu = self.reaped_cpu.take();
                let still_running = reaped_cpu
                    .zip(tokio::runtime::Handle::try_current().ok())
                    .map(|(cpu, runtime)| runtime.spawn(async move { cpu.await.unwrap_or(0) }));
                Abandoned::report(Usage::default(), still_running);
            }
        }
    }
}

fn usage_of(reaped: &Reaped) -> Usage {
    Usage { cpu_ns: reaped.cpu_ns, peak_memory_bytes: reaped.max_rss_bytes, cold_start: false }
}

/// The watchdog's environment for one request.
fn invocation_env(invocation: &Invocation, extra_env: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("Http_Method".to_string(), invocation.method.clone()),
        ("Http_Path".to_string(), invocation.path.clone()),
        ("Http_Query".to_string(), invocation.query.clone()),
    ];
    for (name, value) in &invocation.headers {
        env.push((process::header_env_name(name), value.clone()));
    }
    if let Some(traceparent) = &invocation.traceparent {
        env.push(("TRACEPARENT".to_string(), traceparent.clone()));
    }
    env.extend(extra_env.iter().cloned());
    env
}

/// What a process wrote to stdout (unless there was no room to keep it).
type Output = Result<Vec<u8>, RoomError>;

/// An exec process's stderr, read line by line: each line (cut at [`super::output::MAX_LINE`])
/// a log record of the invocation, within the tenant's line rate; or, with export off, a line
/// of the gateway's log at its lower rate.
struct StderrLines {
    tenant: TenantId,
    function: String,
    logs: Option<std::sync::Arc<dyn LogSink>>,
}

impl StderrLines {
    async fn read(self, mut stderr: pipe::Receiver) {
        let rate = if self.logs.is_some() { EXPORTED_LINES_PER_SECOND } else { LINES_PER_SECOND };
        let StderrLines { tenant, function, logs } = self;
        let budget = budget_of(tenant.as_str(), rate);
        let mut lines = Lines::new(budget, move |text: &str, cut: bool, dropped: u64| {
            if dropped > 0 {
                tracing::debug!(%tenant, function, dropped, "function log lines were dropped (over the line rate)");
            }
            match &logs {
                Some(sink) => {
                    sink.line("stderr", text, cut);
                }
                None => {
                    let cut = if cut { " [cut]" } else { "" };
                    tracing::info!(%tenant, function, stream = "stderr", "{text}{cut}");
                }
            }
        });
        let mut chunk = vec![0u8; 64 << 10];
        let mut pace = crate::function::output::Pace::default();
        while let Ok(n) = stderr.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            let now = std::time::Instant::now();
            lines.feed(&chunk[..n], now);
            if let Some(pause) = pace.after_read(now) {
                // A busy stream is read on a blocking thread from here on, a pipe's worth a
                // pause: while it waits, the writer's lines wake nothing (registered with the
                // runtime's reactor, each `write` of a line woke it).
                let Ok(fd) = stderr.into_blocking_fd() else { return };
                let reading = tokio::task::spawn_blocking(move || {
                    use std::io::Read as _;
                    let mut stderr = std::fs::File::from(fd);
                    std::thread::sleep(pause);
                    loop {
                        match stderr.read(&mut chunk) {
                            Ok(0) => break,
                            Ok(n) => {
                                let now = std::time::Instant::now();
                                lines.feed(&chunk[..n], now);
                                if let Some(pause) = pace.after_read(now) {
                                    std::thread::sleep(pause);
                                }
                            }
                            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    lines.finish(std::time::Instant::now());
                });
                let _ = reading.await;
                return;
            }
        }
        lines.finish(std::time::Instant::now());
    }
}

/// Reads a stream to its end, keeping at most `limit` bytes (the rest is drained so the
/// writer never blocks).
async fn read_limited(
    mut reader: impl AsyncRead + Unpin,
    limit: usize,
    buffers: Option<&Buffers>,
) -> Result<Vec<u8>, RoomError> {
    let mut kept = Vec::new();
    let mut refused = None;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return refused.map_or(Ok(kept), Err),
            Ok(n) => {
                let n = n.min(limit.saturating_sub(kept.len()));
                if n == 0 || refused.is_some() {
                    continue;
                }
                if let Some(Err(error)) = buffers.map(|b| b.response((kept.len() + n) as u64)) {
                    // No room to keep it: read on to the end (the process would block on a
                    // full pipe), keeping nothing.
                    (refused, kept) = (Some(error), Vec::new());
                    continue;
                }
                kept.extend_from_slice(&chunk[..n]);
            }
        }
    }
}
