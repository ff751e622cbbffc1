//! `builtin` functions: Rust functions compiled into the binary (examples and benchmarks).
//!
//! Each runs on a blocking thread; its CPU time is that thread's CPU clock. A builtin that
//! overruns its timeout is answered 504 but cannot be killed: its thread finishes on its own,
//! so builtins must be bounded (all of these are).

use bytes::Bytes;

use super::process;
use super::{FunctionError, FunctionSpec, Invocation, Outcome, RunContext, Usage};
use crate::state::StateStore;
use crate::tenant::TenantId;

/// What a builtin sees: the request, and its tenant's state store in process (zero-copy).
pub struct BuiltinContext<'a> {
    pub invocation: &'a Invocation,
    pub tenant: &'a TenantId,
    pub state: &'a StateStore,
}

/// A builtin: request body in, response body out, or an error message (500).
type BuiltinFn = fn(&BuiltinContext<'_>) -> Result<Bytes, String>;

const BUILTINS: &[(&str, BuiltinFn)] = &[
    ("noop", noop),
    ("echo", echo),
    ("uppercase", uppercase),
    ("wordcount", wordcount),
    ("cpu-burn", cpu_burn),
    ("sleep", sleep),
    ("fail", fail),
];

/// Whether a builtin of this name exists.
pub fn exists(name: &str) -> bool {
    lookup(name).is_some()
}

/// Names of all builtins.
pub fn names() -> Vec<&'static str> {
    BUILTINS.iter().map(|(name, _)| *name).collect()
}

fn lookup(name: &str) -> Option<BuiltinFn> {
    BUILTINS.iter().find(|(known, _)| *known == name).map(|(_, function)| *function)
}

/// Runs one invocation of a builtin function.
pub async fn run(
    spec: &FunctionSpec,
    name: &str,
    context: &RunContext<'_>,
    invocation: &Invocation,
) -> Result<Outcome, FunctionError> {
    let function = lookup(name)
        .ok_or_else(|| FunctionError::Start { name: spec.name.clone(), message: format!("no builtin {name}") })?;
    let invocation = invocation.clone();
    let tenant = context.tenant.clone();
    let state = context.state.clone();
    let task = tokio::task::spawn_blocking(move || {
        let before = process::thread_cpu_ns();
        let result = function(&BuiltinContext { invocation: &invocation, tenant: &tenant, state: &state });
        (result, process::thread_cpu_ns() - before)
    });
    let (result, cpu_ns) = match tokio::time::timeout(spec.limits.timeout, task).await {
        Ok(Ok(done)) => done,
        Ok(Err(join)) => (Err(format!("builtin panicked: {join}")), 0),
        Err(_) => {
            return Err(FunctionError::Timeout {
                name: spec.name.clone(),
                timeout: spec.limits.timeout,
                usage: Usage::default(),
            });
        }
    };
    let usage = Usage { cpu_ns, peak_memory_bytes: 0, cold_start: false };
    Ok(match result {
        Ok(body) => Outcome {
            status: 200,
            headers: vec![("content-type".into(), "application/octet-stream".into())],
            body,
            usage,
        },
        Err(message) => Outcome::text(500, message + "\n", usage),
    })
}

fn noop(_: &BuiltinContext<'_>) -> Result<Bytes, String> {
    Ok(Bytes::new())
}

fn echo(context: &BuiltinContext<'_>) -> Result<Bytes, String> {
    Ok(context.invocation.body.clone())
}

fn uppercase(context: &BuiltinContext<'_>) -> Result<Bytes, String> {
    Ok(Bytes::from(context.invocation.body.to_ascii_uppercase()))
}

fn wordcount(context: &BuiltinContext<'_>) -> Result<Bytes, String> {
    let text = String::from_utf8_lossy(&context.invocation.body);
    let words = text.split_whitespace().count();
    Ok(Bytes::from(format!("{{\"words\":{words},\"bytes\":{}}}", context.invocation.body.len())))
}

/// Burns the thread's CPU for the number of milliseconds in the body (at most 60000).
fn cpu_burn(context: &BuiltinContext<'_>) -> Result<Bytes, String> {
    let millis = parse_millis(context.invocation)?;
    let target = millis * 1_000_000;
    let start = process::thread_cpu_ns();
    let mut spins = 0u64;
    while process::thread_cpu_ns() - start < target {
        for i in 0..10_000u64 {
            spins = spins.wrapping_add(std::hint::black_box(i));
        }
    }
    std::hint::black_box(spins);
    Ok(Bytes::from(format!("{{\"burned_ms\":{millis}}}")))
}

/// Sleeps for the number of milliseconds in the body (at most 60000), using no CPU.
fn sleep(context: &BuiltinContext<'_>) -> Result<Bytes, String> {
    let millis = parse_millis(context.invocation)?;
    std::thread::sleep(std::time::Duration::from_millis(millis));
    Ok(Bytes::from(format!("{{\"slept_ms\":{millis}}}")))
}

fn fail(context: &BuiltinContext<'_>) -> Result<Bytes, String> {
    Err(format!("failing on purpose ({} bytes in)", context.invocation.body.len()))
}

fn parse_millis(invocation: &Invocation) -> Result<u64, String> {
    let text = String::from_utf8_lossy(&invocation.body);
    let millis: u64 =
        text.trim().parse().map_err(|_| format!("body {:?} is not a number of milliseconds", text.trim()))?;
    if millis > 60_000 {
        return Err(format!("{millis} ms is more than the 60000 ms this builtin allows"));
    }
    Ok(millis)
}
