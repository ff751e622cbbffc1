//! `exec` functions: the classic watchdog model, one process per request.
//!
//! The request body goes to stdin, the response comes from stdout, the method, path, query and
//! headers are environment variables (`Http_Method`, `Http_X_Call_Id`, ...). The process runs in
//! its own process group, which is killed whole when `exec_timeout` passes. Its CPU time and
//! peak RSS come from the kernel (`wait4`). stderr goes to the gateway's log, never to the
//! caller.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::process::{self, Reaped};
use super::{FunctionError, FunctionSpec, Invocation, MAX_RESPONSE_BYTES, Outcome, Usage};

/// Most stderr kept for the log, per invocation.
const MAX_STDERR_LOG_BYTES: usize = 8 << 10;

/// Runs one invocation of an exec function.
pub async fn run(
    spec: &FunctionSpec,
    command: &str,
    invocation: &Invocation,
    extra_env: &[(String, String)],
) -> Result<Outcome, FunctionError> {
    let env = invocation_env(invocation, extra_env);
    let mut cmd = process::command(command, &spec.env, &env, spec.workdir.as_deref(), spec.limits.memory_bytes);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child =
        cmd.spawn().map_err(|error| FunctionError::Start { name: spec.name.clone(), message: error.to_string() })?;
    let pid = child.id() as i32;
    let start_error =
        |error: std::io::Error| FunctionError::Start { name: spec.name.clone(), message: error.to_string() };
    let stdin = tokio::process::ChildStdin::from_std(child.stdin.take().expect("piped stdin")).map_err(start_error)?;
    let stdout =
        tokio::process::ChildStdout::from_std(child.stdout.take().expect("piped stdout")).map_err(start_error)?;
    let stderr =
        tokio::process::ChildStderr::from_std(child.stderr.take().expect("piped stderr")).map_err(start_error)?;
    // `child` is reaped by wait4 below, never by std; dropping it does not wait.
    drop(child);
    // If this call is abandoned (a cancelled flow run), the process group dies with it.
    let kill_guard = KillOnDrop(pid);
    let mut reaper = tokio::task::spawn_blocking(move || process::wait4(pid));

    let body = invocation.body.clone();
    let io = async move {
        let write = async move {
            let mut stdin = stdin;
            // A function that does not read its input closes the pipe early: not an error.
            let _ = stdin.write_all(&body).await;
            let _ = stdin.shutdown().await;
        };
        let (_, stdout, stderr) = tokio::join!(
            write,
            read_limited(stdout, MAX_RESPONSE_BYTES + 1),
            read_limited(stderr, MAX_STDERR_LOG_BYTES)
        );
        (stdout, stderr)
    };

    let finished = tokio::time::timeout(spec.limits.timeout, async {
        let output = io.await;
        let reaped = (&mut reaper).await;
        (output, reaped)
    })
    .await;

    let ((stdout, stderr), reaped) = match finished {
        Ok(done) => done,
        Err(_elapsed) => {
            process::kill_group(pid);
            let usage = match reaper.await {
                Ok(Ok(reaped)) => usage_of(&reaped),
                _ => Usage::default(),
            };
            std::mem::forget(kill_guard);
            return Err(FunctionError::Timeout { name: spec.name.clone(), timeout: spec.limits.timeout, usage });
        }
    };
    std::mem::forget(kill_guard);
    let reaped = match reaped {
        Ok(Ok(reaped)) => reaped,
        Ok(Err(error)) => return Err(start_error(error)),
        Err(join) => return Err(FunctionError::Start { name: spec.name.clone(), message: join.to_string() }),
    };
    let usage = usage_of(&reaped);
    if !stderr.is_empty() {
        tracing::info!(function = %spec.name, call_id = %invocation.call_id, stderr = %String::from_utf8_lossy(&stderr), "function stderr");
    }
    if stdout.len() > MAX_RESPONSE_BYTES {
        return Err(FunctionError::ResponseTooLarge { name: spec.name.clone(), limit: MAX_RESPONSE_BYTES });
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
            Ok(Outcome::text(500, format!("function {} exited with status {code}\n", spec.name), usage))
        }
        (None, signal) => {
            let signal = signal.unwrap_or_default();
            tracing::warn!(function = %spec.name, call_id = %invocation.call_id, signal, "function was killed");
            Ok(Outcome::text(500, format!("function {} was killed by signal {signal}\n", spec.name), usage))
        }
    }
}

/// Kills a process group when dropped; forgotten once the process is reaped.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        process::kill_group(self.0);
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

/// Reads a stream to its end, keeping at most `limit` bytes (the rest is drained so the
/// writer never blocks).
async fn read_limited(mut reader: impl AsyncRead + Unpin, limit: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
}
