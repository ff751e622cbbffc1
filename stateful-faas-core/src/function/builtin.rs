//! `builtin` functions: Rust functions compiled into the binary (examples and benchmarks),
//! registered by name in [`Builtins`].
//!
//! Quick builtins with small inputs run on the calling task; the others on a blocking thread.
//! Either way, CPU time is the running thread's CPU clock. A builtin that overruns its timeout
//! is answered 504 but cannot be killed: its thread finishes on its own (builtins must be
//! bounded; all of these are), and its CPU time is billed when it does.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;

use super::process;
use super::{FunctionError, FunctionSpec, Invocation, Outcome, RunContext, Usage};
use crate::room::{Buffers, RoomError};
use crate::state::StateStore;
use crate::tenant::TenantId;

/// What a builtin sees: the request, and its tenant's state store in process (zero-copy).
pub struct BuiltinContext<'a> {
    pub invocation: &'a Invocation,
    pub tenant: &'a TenantId,
    pub state: &'a StateStore,
    /// The deployment's environment (`envVars`).
    pub env: &'a std::collections::BTreeMap<String, String>,
    buffers: &'a Buffers,
}

impl BuiltinContext<'_> {
    /// Takes room in the invocation's buffers for an answer of `bytes`, before making it: a
    /// builtin whose answer is large asks first, so that its memory is counted before it is
    /// used. Without room the invocation ends 429, as any answer the room cannot hold.
    pub fn room_for(&self, bytes: u64) -> Result<(), RoomError> {
        self.buffers.response(bytes)
    }
}

/// Why a builtin gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum BuiltinError {
    /// It failed: answered 500 with the message.
    #[error("{0}")]
    Failed(String),
    /// No room for the answer it would make ([`BuiltinContext::room_for`]): answered 429.
    #[error(transparent)]
    NoRoom(#[from] RoomError),
}

impl From<String> for BuiltinError {
    fn from(message: String) -> Self {
        Self::Failed(message)
    }
}

/// A builtin's code: request body in, response body out, or why not.
pub type BuiltinFn = Arc<dyn Fn(&BuiltinContext<'_>) -> Result<Bytes, BuiltinError> + Send + Sync>;

/// A builtin without state of its own, as the platform's are.
type Plain = fn(&BuiltinContext<'_>) -> Result<Bytes, BuiltinError>;

/// How long a builtin may run: `Quick` ones do bounded work proportional to their input and run
/// on the calling task when the input is small; the others always get a blocking thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    Quick,
    Blocking,
}

/// One builtin, as registered.
#[derive(Clone)]
struct Builtin {
    run: BuiltinFn,
    cost: Cost,
    /// Environment variables a deployment may not set, with the operator's flag that does.
    operator_settings: &'static [(&'static str, &'static str)],
}

/// The builtins a core offers: the platform's own ([`Builtins::standard`]) and those
/// registered beside them (the ETL example's, say), by name.
#[derive(Clone)]
pub struct Builtins {
    by_name: std::collections::BTreeMap<&'static str, Builtin>,
}

impl std::fmt::Debug for Builtins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.keys()).finish()
    }
}

impl Default for Builtins {
    fn default() -> Self {
        Self::standard()
    }
}

impl Builtins {
    /// The platform's own builtins: examples and benchmarks.
    pub fn standard() -> Self {
        let mut builtins = Self { by_name: Default::default() };
        let standard: [(&'static str, Plain, Cost); 11] = [
            ("noop", noop, Cost::Quick),
            ("echo", echo, Cost::Quick),
            ("uppercase", uppercase, Cost::Quick),
            ("wordcount", wordcount, Cost::Quick),
            ("cpu-burn", cpu_burn, Cost::Blocking),
            ("sleep", sleep, Cost::Blocking),
            ("fail", fail, Cost::Quick),
            ("blob-make", blob_make, Cost::Blocking),
            ("blob-sum", blob_sum, Cost::Quick),
            ("spill-make", spill_make, Cost::Blocking),
            ("spill-sum", spill_sum, Cost::Blocking),
        ];
        for (name, run, cost) in standard {
            builtins.register(name, cost, &[], Arc::new(run));
        }
        builtins
    }

    /// Adds (or replaces) a builtin. `operator_settings` names the environment variables only
    /// the operator sets, each with the flag that does: a deployment setting one is refused.
    pub fn register(
        &mut self,
        name: &'static str,
        cost: Cost,
        operator_settings: &'static [(&'static str, &'static str)],
        run: BuiltinFn,
    ) {
        self.by_name.insert(name, Builtin { run, cost, operator_settings });
    }

    /// Names of all builtins.
    pub fn names(&self) -> Vec<&'static str> {
        self.by_name.keys().copied().collect()
    }

    /// Whether a deployment of builtin `name` with `env` may run here.
    pub fn check(&self, name: &str, env: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
        let builtin = self
            .by_name
            .get(name)
            .ok_or_else(|| format!("no builtin named {name:?}; known: {}", self.names().join(", ")))?;
        match builtin.operator_settings.iter().find(|(var, _)| env.contains_key(*var)) {
            Some((var, flag)) => Err(format!(
                "envVars.{var}: builtin {name} takes it from the operator (sfaas up {flag}), not from a deployment"
            )),
            None => Ok(()),
        }
    }
}

/// Inputs up to this size let a `Quick` builtin run inline (a thread hand-off costs more).
const INLINE_INPUT_BYTES: usize = 64 << 10;

/// Largest blob `blob-make` and `spill-make` produce.
const MAX_BLOB_BYTES: u64 = 256 << 20;

/// Builtin threads one tenant may have at once (a timed-out builtin keeps its thread to its
/// end), so that no tenant fills the blocking pool that every tenant's builtins share.
pub const THREADS_PER_TENANT: usize = 16;

/// Runs one invocation of a builtin function; one that needs a thread takes one of its
/// tenant's `threads` until the thread ends.
pub async fn run(
    builtins: &Builtins,
    spec: &FunctionSpec,
    name: &str,
    context: &RunContext<'_>,
    invocation: &Invocation,
    threads: &Arc<Semaphore>,
) -> Result<Outcome, FunctionError> {
    let Builtin { run: function, cost, .. } = builtins
        .by_name
        .get(name)
        .cloned()
        .ok_or_else(|| FunctionError::Start { name: spec.name.clone(), message: format!("no builtin {name}") })?;
    if cost == Cost::Quick && invocation.body.len() <= INLINE_INPUT_BYTES {
        let before = process::thread_cpu_ns();
        let result = function(&BuiltinContext {
            invocation,
            tenant: context.tenant,
            state: context.state,
            env: &spec.env,
            buffers: context.buffers,
        });
        let usage = Usage { cpu_ns: process::thread_cpu_ns() - before, peak_memory_bytes: 0, cold_start: false };
        return outcome(spec, context, result, usage);
    }
    let thread = threads.clone().try_acquire_owned().map_err(|_| FunctionError::Busy {
        name: spec.name.clone(),
        reason: format!("namespace {} already runs {THREADS_PER_TENANT} builtins on threads", context.tenant),
    })?;
    let invocation = invocation.clone();
    let tenant = context.tenant.clone();
    let state = context.state.clone();
    let env = spec.env.clone();
    let buffers = context.buffers.clone();
    // The thread answers its result here and returns its CPU time, so that a caller that stops
    // waiting (a timeout, or going away) can leave the CPU time to be billed when it ends.
    let (answer, result) = tokio::sync::oneshot::channel();
    let task = tokio::task::spawn_blocking(move || {
        let _thread = thread;
        let before = process::thread_cpu_ns();
        let context =
            BuiltinContext { invocation: &invocation, tenant: &tenant, state: &state, env: &env, buffers: &buffers };
        let result = function(&context);
        let _ = answer.send(result);
        process::thread_cpu_ns() - before
    });
    let mut running = Running(Some(task));
    let task = running.0.as_mut().expect("just set");
    let cpu_ns = match tokio::time::timeout(spec.limits.timeout, task).await {
        Ok(Ok(cpu_ns)) => cpu_ns,
        Ok(Err(join)) => {
            running.0 = None;
            return outcome(spec, context, Err(format!("builtin panicked: {join}").into()), Usage::default());
        }
        Err(_) => {
            // The thread cannot be stopped: the caller gets its 504 now, and the CPU time the
            // builtin takes to its end is billed when it ends.
            return Err(FunctionError::Timeout {
                name: spec.name.clone(),
                timeout: spec.limits.timeout,
                usage: Usage::default(),
                still_running: running.0.take(),
            });
        }
    };
    running.0 = None;
    let result = result.await.unwrap_or_else(|_| Err(String::from("builtin ended without an answer").into()));
    outcome(spec, context, result, Usage { cpu_ns, peak_memory_bytes: 0, cold_start: false })
}

/// A builtin's thread while its caller waits for it. A thread cannot be stopped: if the
/// caller goes away first (an HTTP client that disconnects, a flow run cancelled), the CPU
/// time the thread takes to its end is reported to be billed when it ends.
struct Running(Option<tokio::task::JoinHandle<u64>>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            super::Abandoned::report(Usage::default(), Some(task));
        }
    }
}

/// A builtin's answer, once the invocation's buffers have room for it.
fn outcome(
    spec: &FunctionSpec,
    context: &RunContext<'_>,
    result: Result<Bytes, BuiltinError>,
    usage: Usage,
) -> Result<Outcome, FunctionError> {
    let no_room = |error| Err(FunctionError::NoRoom { name: spec.name.clone(), error }.after_running(usage));
    match result {
        Ok(body) => {
            if let Err(error) = context.buffers.response(body.len() as u64) {
                return no_room(error);
            }
            Ok(Outcome {
                status: 200,
                headers: vec![("content-type".into(), "application/octet-stream".into())],
                body,
                usage,
            })
        }
        Err(BuiltinError::NoRoom(error)) => no_room(error),
        Err(BuiltinError::Failed(message)) => Ok(Outcome::text(500, message + "\n", usage)),
    }
}

fn noop(_: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
    Ok(Bytes::new())
}

fn echo(context: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
    Ok(context.invocation.body.clone())
}

fn uppercase(context: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
    Ok(Bytes::from(context.invocation.body.to_ascii_uppercase()))
}

fn wordcount(context: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
    let text = String::from_utf8_lossy(&context.invocation.body);
    let words = text.split_whitespace().count();
    Ok(Bytes::from(format!("{{\"words\":{words},\"bytes\":{}}}", context.invocation.body.len())))
}

/// Burns the thread's CPU for the number of milliseconds in the body (at most 60000).
fn cpu_burn(context: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
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
fn sleep(context: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
    let millis = parse_millis(context.invocation)?;
    std::thread::sleep(std::time::Duration::from_millis(millis));
    Ok(Bytes::from(format!("{{\"slept_ms\":{millis}}}")))
}

fn fail(context: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
    Err(format!("failing on purpose ({} bytes in)", context.invocation.body.len()).into())
}

/// Answers as many bytes as the body asks for (the producer of data-passing benchmarks).
fn blob_make(context: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
    let size = parse_size(context.invocation)?;
    context.room_for(size)?;
    Ok(Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>()))
}

/// Answers the size and a checksum of the body (the consumer of data-passing benchmarks).
fn blob_sum(context: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
    Ok(Bytes::from(checksum_json(&context.invocation.body)))
}

/// Bytes one tenant's spool folder may hold; files older than [`SPOOL_TTL`] are removed.
const SPOOL_MAX_BYTES: u64 = 1 << 30;
const SPOOL_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// The block-storage baseline of `blob-make`: writes the blob to a file (fsync) in the
/// tenant's spool folder and answers the file's name. Files no `spill-sum` read are removed
/// after ten minutes, and a tenant's folder holds at most [`SPOOL_MAX_BYTES`].
fn spill_make(context: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
    use std::io::Write;
    static SPOOLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let blob = blob_make(context)?;
    let name = uuid::Uuid::new_v4().to_string();
    let dir = spool_dir(context)?;
    let _spooling = SPOOLING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut held = 0;
    for entry in std::fs::read_dir(&dir).map_err(|e| format!("spool: {e}"))?.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age > SPOOL_TTL) {
            let _ = std::fs::remove_file(entry.path());
        } else {
            held += meta.len();
        }
    }
    if held + blob.len() as u64 > SPOOL_MAX_BYTES {
        return Err(format!(
            "spool: namespace {} holds {held} bytes of spill files unread, and may hold {SPOOL_MAX_BYTES}",
            context.tenant
        )
        .into());
    }
    let mut file = std::fs::File::create(dir.join(&name)).map_err(|e| format!("spool: {e}"))?;
    file.write_all(&blob).and_then(|_| file.sync_all()).map_err(|e| format!("spool: {e}"))?;
    Ok(Bytes::from(name))
}

/// The block-storage baseline of `blob-sum`: reads (and removes) a file `spill-make` wrote.
fn spill_sum(context: &BuiltinContext<'_>) -> Result<Bytes, BuiltinError> {
    let text = String::from_utf8_lossy(&context.invocation.body);
    let name = uuid::Uuid::parse_str(text.trim()).map_err(|_| format!("{:?} is not a spool file name", text.trim()))?;
    let path = spool_dir(context)?.join(name.to_string());
    let size = std::fs::metadata(&path).map_err(|e| format!("spool: {e}"))?.len();
    context.room_for(size)?;
    let blob = std::fs::read(&path).map_err(|e| format!("spool: {e}"))?;
    let _ = std::fs::remove_file(&path);
    Ok(Bytes::from(checksum_json(&blob)))
}

fn spool_dir(context: &BuiltinContext<'_>) -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join("sfaas-spool").join(context.tenant.as_str());
    std::fs::create_dir_all(&dir).map_err(|e| format!("spool: {e}"))?;
    Ok(dir)
}

fn checksum_json(data: &[u8]) -> String {
    let sum = data.iter().fold(0u64, |sum, &b| sum.wrapping_mul(31).wrapping_add(b as u64));
    format!("{{\"bytes\":{},\"checksum\":{sum}}}", data.len())
}

fn parse_size(invocation: &Invocation) -> Result<u64, String> {
    let text = String::from_utf8_lossy(&invocation.body);
    let size: u64 = text.trim().parse().map_err(|_| format!("body {:?} is not a number of bytes", text.trim()))?;
    if size > MAX_BLOB_BYTES {
        return Err(format!("{size} bytes is more than the {MAX_BLOB_BYTES} this builtin makes"));
    }
    Ok(size)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::Room;
    use crate::state::StateConfig;
    use crate::state::metering::SystemClock;

    fn call(function: Plain, tenant: &str, body: &str) -> Result<Bytes, String> {
        call_in(&Arc::new(Room::new(1 << 30, 256 << 20, "test buffers")), function, tenant, body)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    /// Calls a builtin whose invocation's buffers are in `room`.
    fn call_in(room: &Arc<Room>, function: Plain, tenant: &str, body: &str) -> Result<Bytes, String> {
        let invocation = Invocation {
            call_id: "t".into(),
            method: "POST".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![],
            body: Bytes::from(body.to_string()),
            traceparent: None,
            job: None,
        };
        let state = StateStore::new(StateConfig::default(), std::sync::Arc::new(SystemClock), Default::default());
        let tenant = TenantId::new(tenant).unwrap();
        let buffers = Buffers::new(room.clone(), runtime().block_on(room.hold(&tenant, 0)).unwrap(), 0);
        let context = BuiltinContext {
            invocation: &invocation,
            tenant: &tenant,
            state: &state,
            env: &Default::default(),
            buffers: &buffers,
        };
        function(&context).map_err(|error| error.to_string())
    }

    #[test]
    fn deployments_name_a_registered_builtin_and_leave_the_operators_settings_alone() {
        let mut builtins = Builtins::standard();
        let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(builtins.check("echo", &env(&[])).is_ok());
        let unknown = builtins.check("nope", &env(&[])).unwrap_err();
        assert!(unknown.contains("no builtin named \"nope\"") && unknown.contains("echo"), "{unknown}");
        builtins.register("loader", Cost::Blocking, &[("LOAD_URL", "--load-url")], Arc::new(noop));
        assert!(builtins.check("loader", &env(&[("OTHER", "1")])).is_ok());
        let refused = builtins.check("loader", &env(&[("LOAD_URL", "sqlite:///etc/passwd")])).unwrap_err();
        assert!(refused.contains("envVars.LOAD_URL") && refused.contains("--load-url"), "{refused}");
    }

    #[test]
    fn large_answers_take_room_before_they_are_made() {
        // A tenant's share of this room is 2 MiB, of which its other invocations hold 1.5: a
        // blob-make of 1 MiB asks for the room first and is refused, having made nothing (it
        // used to make the whole answer, and only then be refused).
        let room = Arc::new(Room::new(4 << 20, 1 << 20, "test buffers"));
        let _others = runtime().block_on(room.hold(&TenantId::new("roomy").unwrap(), 1536 << 10)).unwrap();
        for function in [blob_make as Plain, spill_make] {
            let refused = call_in(&room, function, "roomy", &(1 << 20).to_string()).unwrap_err();
            assert!(refused.contains("no room"), "{refused}");
        }
        assert_eq!(call_in(&room, blob_make, "roomy", "1000").unwrap().len(), 1000);
    }

    #[test]
    fn blobs_pass_through_memory_or_the_spool_with_the_same_checksum() {
        let in_memory = call(blob_make, "spool-test", "5000").unwrap();
        let expected = checksum_json(&in_memory);
        let name = call(spill_make, "spool-test", "5000").unwrap();
        let from_file = call(spill_sum, "spool-test", std::str::from_utf8(&name).unwrap()).unwrap();
        assert_eq!(std::str::from_utf8(&from_file).unwrap(), expected);
        assert!(expected.starts_with("{\"bytes\":5000,"));
    }

    #[test]
    fn the_spool_reads_only_its_own_file_names_of_its_own_tenant() {
        assert!(call(spill_sum, "spool-test", "../../etc/passwd").unwrap_err().contains("not a spool file name"));
        let name = call(spill_make, "spool-a", "10").unwrap();
        let other = call(spill_sum, "spool-b", std::str::from_utf8(&name).unwrap());
        assert!(other.unwrap_err().contains("spool"), "another tenant's spool file was read");
        assert!(call(blob_make, "spool-test", &(MAX_BLOB_BYTES + 1).to_string()).is_err());
    }

    #[test]
    fn a_tenants_unread_spill_files_are_bounded_and_expire() {
        let tenant = format!("spool-full-{}", std::process::id());
        let dir = std::env::temp_dir().join("sfaas-spool").join(&tenant);
        call(spill_make, &tenant, "1").unwrap();
        // An unread file of the whole allowance (sparse: nothing is written), made now by the
        // process's clock (which CI shifts a year ahead of the file system's).
        let big = std::fs::File::create(dir.join("unread")).unwrap();
        big.set_len(SPOOL_MAX_BYTES).unwrap();
        big.set_modified(std::time::SystemTime::now()).unwrap();
        let refused = call(spill_make, &tenant, "1").unwrap_err();
        assert!(refused.contains("may hold 1073741824"), "{refused}");
        // Ten minutes later it is gone, and there is room again.
        big.set_modified(std::time::SystemTime::now() - SPOOL_TTL - std::time::Duration::from_secs(1)).unwrap();
        call(spill_make, &tenant, "1").expect("the old file was removed");
        assert!(!dir.join("unread").exists());
        let _ = std::fs::remove_dir_all(dir);
    }
}
