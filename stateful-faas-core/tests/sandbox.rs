//! A tenant's process functions run in cgroups that meter and limit them: what they start is
//! billed and dies with the invocation, and a fork bomb stops at its process limit while other
//! tenants are served (a memory hog: `functions.rs`).

use crate::common;

use std::time::Duration;

use common::otlp::{export_to, grpc_receiver, int_attr, spans, string_attr};
use common::{eventually, python, require_program, running, start};
use serde_json::json;
use stateful_faas_core::function::cgroup::{CgroupConfig, GroupLimits};
use stateful_faas_core::function::sandbox::SandboxConfig;

/// Burns `MS` ms of its own CPU time (as the kernel accounts it), then exits.
const BURNER: &str = "PYTHON -c 'import time\nwhile time.process_time() < MS / 1000: pass'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_processes_are_billed_in_full_and_die_with_their_invocation() {
    if require_program("python3").is_none() {
        return;
    }
    let (endpoint, received) = grpc_receiver().await;
    let mut core = start(|config| export_to(config, endpoint)).await;
    let acme = core.tenant("acme").await;
    let burner = BURNER.replace("PYTHON", &python()).replace("MS", "300");
    // A burner double-forked into a session of its own (no wait of the function's counts it),
    // and a sleeper left behind, holding none of the function's pipes.
    let command = format!("sh -c \"setsid {burner} &\"; setsid sleep 6017 >/dev/null 2>&1 & sleep 1");
    core.deploy(&acme, json!({"service": "detach", "envProcess": command})).await;

    let response = core.invoke(&acme.ingest, "detach", "").await;
    assert_eq!(response.status(), 200);
    let left = running(&["sleep", "6017"]);
    assert!(left.is_empty(), "the detached sleeper outlived its invocation: host pids {left:?}");
    core.stop().await;

    let spans = spans(&received.requests.lock().unwrap());
    let (_, _, span) = spans.iter().find(|(_, _, s)| s.name == "invoke detach").unwrap();
    assert_eq!(string_attr(&span.attributes, "faas.name").as_deref(), Some("detach"));
    let cpu_ms = int_attr(&span.attributes, "sfaas.cpu_ms").unwrap();
    // 300 ms of the burner, plus the shell, python's start and setsid: well under 100 ms.
    assert!((300..400).contains(&cpu_ms), "billed {cpu_ms} ms for a detached 300 ms burner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_stops_at_its_process_limit_while_others_are_served() {
    let core = start(|config| {
        config.sandbox = Some(SandboxConfig {
            limits: CgroupConfig {
                function: GroupLimits { memory_bytes: 256 << 20, pids: 32 },
                tenant: GroupLimits { memory_bytes: 1 << 30, pids: 64 },
            },
            ..Default::default()
        });
    })
    .await;
    let acme = core.tenant("acme").await;
    let globex = core.tenant("globex").await;
    let bomb = "f() { f | f & }; f; sleep 30";
    core.deploy(&acme, json!({"service": "bomb", "envProcess": bomb, "envVars": {"exec_timeout": "2s"}})).await;
    core.deploy(&globex, json!({"service": "hello", "envProcess": "echo hello"})).await;
    core.deploy(&acme, json!({"service": "hello", "envProcess": "echo hello"})).await;

    let bombing = {
        let (http, url, token) = (core.http.clone(), core.url.clone(), acme.ingest.clone());
        tokio::spawn(async move { http.post(format!("{url}/function/bomb")).bearer_auth(token).send().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..10 {
        let response = core.invoke(&globex.ingest, "hello", "").await;
        assert_eq!(response.status(), 200, "another tenant is served while the bomb runs");
        assert_eq!(response.text().await.unwrap(), "hello\n");
    }
    // The bomb runs until its timeout and is killed whole, or its own shell cannot fork its
    // last command and exits, saying why; either way the rest of it is killed then.
    let response = bombing.await.unwrap().unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(status == 504 || (status == 500 && body.contains("limit on processes")), "{status} {body}");
    // Nothing of it is left: the tenant's next call has its whole process allowance.
    let response = core.invoke(&acme.ingest, "hello", "").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builtin_past_its_timeout_is_billed_for_all_it_burned() {
    let (endpoint, received) = grpc_receiver().await;
    let mut core = start(|config| export_to(config, endpoint)).await;
    let acme = core.tenant("acme").await;
    core.deploy(&acme, json!({"service": "burn", "builtin": "cpu-burn", "envVars": {"exec_timeout": "100ms"}})).await;
    let response = core.invoke(&acme.ingest, "burn", "400").await;
    assert_eq!(response.status(), 504);
    // The thread burns on; its span is written when it ends (later than 400 ms of wall time on
    // a loaded machine: waited for, not slept on).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !spans(&received.requests.lock().unwrap()).iter().any(|(_, _, s)| s.name == "invoke burn") {
        assert!(std::time::Instant::now() < deadline, "the timed-out call's span never came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    core.stop().await;
    let spans = spans(&received.requests.lock().unwrap());
    let (_, _, span) = spans.iter().find(|(_, _, s)| s.name == "invoke burn").expect("the span of the timed-out call");
    assert_eq!(int_attr(&span.attributes, "http.response.status_code"), Some(504));
    let cpu_ms = int_attr(&span.attributes, "sfaas.cpu_ms").unwrap();
    assert!((400..450).contains(&cpu_ms), "billed {cpu_ms} ms for a 400 ms burn past a 100 ms timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_fill_the_builtin_threads() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    let globex = core.tenant("globex").await;
    for tenant in [&acme, &globex] {
        core.deploy(tenant, json!({"service": "nap", "builtin": "sleep", "envVars": {"exec_timeout": "100ms"}})).await;
    }
    // Sixteen naps that time out hold their threads to their end (5 s), and so their slots.
    let napping = std::time::Instant::now();
    for _ in 0..16 {
        assert_eq!(core.invoke(&acme.ingest, "nap", "5000").await.status(), 504);
    }
    let response = core.invoke(&acme.ingest, "nap", "10").await;
    assert_eq!(response.status(), 429);
    let body = response.text().await.unwrap();
    assert!(body.contains("namespace acme already runs 16 builtins on threads"), "{body}");
    assert_eq!(core.invoke(&globex.ingest, "nap", "10").await.status(), 200, "other tenants are not limited");
    tokio::time::sleep(Duration::from_millis(5200).saturating_sub(napping.elapsed())).await;
    assert_eq!(core.invoke(&acme.ingest, "nap", "10").await.status(), 200, "slots come back when threads end");
}

/// What a tenant's function tries, each attempt on a line with its outcome (`ok` or the errno).
const ESCAPES: &str = r#"
import ctypes, errno, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
env = os.environ
data, victim = env["DATA"], int(sys.stdin.read())

def report(name, action):
    try:
        result = action()
        print(f"{name}: {'ok' if result is None else result}")
    except OSError as error:
        print(f"{name}: {errno.errorcode.get(error.errno, error.errno)}")

def call(result):
    if result < 0:
        raise OSError(ctypes.get_errno(), "")

def read(path):
    with open(path, "rb") as f:
        f.read()

def write(path):
    with open(path, "wb") as f:
        f.write(b"x")

def connect(port, host="127.0.0.1"):
    socket.create_connection((host, port), timeout=2).close()

def status():
    lines = [line.split(":\t") for line in open("/proc/self/status").read().splitlines()]
    fields = {line[0]: line[1].strip() for line in lines if len(line) == 2}
    return " ".join(f"{k}={fields[k]}" for k in ["CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp"])

def pids():
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]

def secrets():
    found = []
    for pid in pids():
        try:
            if b"globex-secret" in open(f"/proc/{pid}/environ", "rb").read():
                found.append(pid)
        except OSError:
            pass
    return f"in {found}"

def fill_tmp():
    with open("/tmp/fill", "wb") as f:
        for _ in range(64):
            f.write(b"\0" * (1 << 20))
            f.flush()

report("ids", lambda: f"{os.getuid()} {os.getgid()} {os.getgroups()}")
report("status", status)
report("hostname", socket.gethostname)
for name in ["admin.token", "meter.token", "sfaas.db", "telemetry.db"]:
    report(f"read {name}", lambda: read(f"{data}/{name}"))
report("read other tenant's file", lambda: read(env["OTHER_FILE"]))
report("write admin.token", lambda: write(f"{data}/admin.token"))
report("delete sfaas.db", lambda: os.remove(f"{data}/sfaas.db"))
report("write /usr", lambda: write("/usr/escape"))
report("write /", lambda: write("/escape"))
report("write its folder", lambda: write("escape"))
report("write /tmp", lambda: write("/tmp/note"))
for part in ["environ", "cmdline", "maps"]:
    report(f"gateway {part}", lambda: read(f"/proc/{env['GATEWAY_PID']}/{part}"))
report("largest visible pid", lambda: max(pids()))
report("other tenant's secret", secrets)
report("signal other tenant", lambda: os.kill(victim, 9))
report("ptrace other tenant", lambda: call(libc.ptrace(16, victim, None, None)))
report("gateway port", lambda: connect(int(env["GATEWAY_PORT"])))
report("collector port", lambda: connect(int(env["COLLECTOR_PORT"])))
report("other tenant's server", lambda: connect(8080))
report("outside", lambda: connect(53, "192.0.2.1"))
report("fill /tmp", fill_tmp)
report("mount", lambda: call(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
report("unshare", lambda: call(libc.unshare(0x10000000)))
report("keyctl", lambda: call(libc.syscall(int(env["NR_KEYCTL"]), 1, None)))
report("bpf", lambda: call(libc.syscall(int(env["NR_BPF"]), 0, None, 0)))
report("ptrace self", lambda: call(libc.ptrace(0, 0, None, None)))
report("setuid root", lambda: os.setuid(0))
report("chroot", lambda: call(libc.chroot(b"/tmp")))
"#;

/// A tiny managed server, the other tenant's.
const SERVER: &str = r#"
import http.server, os
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"up")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_function_cannot_reach_past_its_sandbox() {
    if require_program("python3").is_none() {
        return;
    }
    let core = start(|config| {
        let sandbox = config.sandbox.as_mut().unwrap();
        sandbox.tmp_bytes = 8 << 20;
    })
    .await;
    let (acme, globex) = (core.tenant("acme").await, core.tenant("globex").await);
    let data_dir = core.dir.path();
    for secret in ["admin.token", "meter.token", "telemetry.db"] {
        std::fs::write(data_dir.join(secret), "a secret of the platform").unwrap();
    }
    // The other tenant's folder, readable by any user on the host.
    let other = tempfile::tempdir().unwrap();
    std::fs::set_permissions(other.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(other.path().join("server.py"), SERVER).unwrap();
    std::fs::write(other.path().join("secret.txt"), "globex's own").unwrap();
    let functions = core.functions_dir();
    std::fs::write(functions.join("escapes.py"), ESCAPES).unwrap();
    let workdir = functions.display().to_string();

    // The other tenant: a server (warm, in its own network) and a call running with a secret.
    let other_dir = other.path().display().to_string();
    core.deploy(
        &globex,
        json!({"service": "srv", "kind": "http", "envProcess": "python3 server.py", "workdir": other_dir}),
    )
    .await;
    assert_eq!(core.invoke(&globex.ingest, "srv", "").await.text().await.unwrap(), "up");
    core.deploy(
        &globex,
        json!({"service": "hold", "envProcess": "exec sleep 4051", "envVars": {"SECRET": "globex-secret", "exec_timeout": "20s"}}),
    )
    .await;
    let holding = {
        let (http, url, token) = (core.http.clone(), core.url.clone(), globex.ingest.clone());
        tokio::spawn(async move { http.post(format!("{url}/function/hold")).bearer_auth(token).send().await })
    };
    let victim = eventually(Duration::from_secs(5), || async { running(&["sleep", "4051"]).pop() })
        .await
        .expect("the other tenant's call runs");

    let gateway_port = core.url.rsplit(':').next().unwrap().to_string();
    // Another of the platform's services on the host's loopback (a collector, a dashboard).
    let collector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let env = json!({
        "DATA": data_dir.display().to_string(),
        "GATEWAY_PID": std::process::id().to_string(),
        "GATEWAY_PORT": gateway_port,
        "NR_KEYCTL": libc::SYS_keyctl.to_string(),
        "NR_BPF": libc::SYS_bpf.to_string(),
        "OTHER_FILE": other.path().join("secret.txt").display().to_string(),
        "COLLECTOR_PORT": collector.local_addr().unwrap().port().to_string(),
    });
    core.deploy(
        &acme,
        json!({"service": "escape", "envProcess": "python3 escapes.py", "workdir": workdir, "envVars": env}),
    )
    .await;
    let response = core.invoke(&acme.ingest, "escape", victim.clone()).await;
    assert_eq!(response.status(), 200);
    let report = response.text().await.unwrap();
    let outcome = |name: &str| {
        report
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
            .unwrap_or_else(|| panic!("no {name:?} in {report}"))
            .to_string()
    };
    // Its own uid and gid (globex, which ran first, has the first of the range), no groups.
    assert_eq!(outcome("ids"), "200001 200001 []");
    let no_caps = "0000000000000000";
    assert_eq!(outcome("status"), format!("CapEff={no_caps} CapPrm={no_caps} CapBnd={no_caps} NoNewPrivs=1 Seccomp=2"));
    assert_eq!(outcome("hostname"), "sfaas");
    let expected = [
        ("read admin.token", "ENOENT"),
        ("read meter.token", "ENOENT"),
        ("read sfaas.db", "ENOENT"),
        ("read telemetry.db", "ENOENT"),
        ("read other tenant's file", "ENOENT"),
        ("write admin.token", "ENOENT"),
        ("delete sfaas.db", "ENOENT"),
        ("write /usr", "EROFS"),
        ("write /", "EROFS"),
        ("write its folder", "EROFS"),
        ("write /tmp", "ok"),
        ("gateway environ", "ENOENT"),
        ("gateway cmdline", "ENOENT"),
        ("gateway maps", "ENOENT"),
        ("other tenant's secret", "in []"),
        ("signal other tenant", "ESRCH"),
        ("ptrace other tenant", "EPERM"),
        ("gateway port", "ECONNREFUSED"),
        ("collector port", "ECONNREFUSED"),
        ("other tenant's server", "ECONNREFUSED"),
        ("outside", "ENETUNREACH"),
        ("fill /tmp", "ENOSPC"),
        ("mount", "EPERM"),
        ("unshare", "EPERM"),
        ("keyctl", "EPERM"),
        ("bpf", "EPERM"),
        ("ptrace self", "EPERM"),
        ("setuid root", "EPERM"),
        ("chroot", "EPERM"),
    ];
    for (attempt, result) in expected {
        assert_eq!(outcome(attempt), result, "{attempt}, in:\n{report}");
    }
    // Only its own processes are there: pid 1 (its shell or python) and what it started.
    let largest: u32 = outcome("largest visible pid").parse().unwrap();
    assert!(largest < 10, "it sees pid {largest}:\n{report}");

    // Nothing was touched, and the other tenant is served as before.
    assert_eq!(std::fs::read_to_string(data_dir.join("admin.token")).unwrap(), "a secret of the platform");
    assert!(data_dir.join("sfaas.db").exists());
    assert_eq!(core.invoke(&globex.ingest, "srv", "").await.text().await.unwrap(), "up");
    holding.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_function_runs_in_the_data_directory() {
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    let data_dir = core.dir.path().canonicalize().unwrap().display().to_string();
    // The data directory, the host's root (whose submounts, such as /dev/shm, a recursive bind
    // kept writable), and the host's /proc (the gateway's command line and flags), /sys, /dev
    // and /run.
    let refused = [
        (data_dir.as_str(), "inside the gateway's data directory"),
        ("/", "the host's root or in one of its folders"),
        ("/proc", "the host's root or in one of its folders"),
        ("/proc/self", "the host's root or in one of its folders"),
        ("/dev", "the host's root or in one of its folders"),
        ("/run", "the host's root or in one of its folders"),
    ];
    for (i, (workdir, why)) in refused.iter().enumerate() {
        let name = format!("snoop{i}");
        core.deploy(&acme, json!({"service": name, "envProcess": "cat admin.token", "workdir": workdir})).await;
        let response = core.invoke(&acme.ingest, &name, "").await;
        assert_eq!(response.status(), 502, "{workdir}");
        let message = response.text().await.unwrap();
        assert!(message.contains(why), "{workdir}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_limit_holds_a_function_to_its_share() {
    if require_program("python3").is_none() {
        return;
    }
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    // Spins for one second of wall time and prints the CPU time it got.
    let spin = format!(
        "{} -c 'import time\nstart = time.time()\nwhile time.time() - start < 1: pass\nprint(time.process_time())'",
        python()
    );
    core.deploy(&acme, json!({"service": "spin", "envProcess": spin, "limits": {"cpu": "100m"}})).await;
    let response = core.invoke(&acme.ingest, "spin", "").await;
    assert_eq!(response.status(), 200);
    let cpu: f64 = response.text().await.unwrap().trim().parse().unwrap();
    // A tenth of a CPU for a second: about 0.1 s (a whole CPU would give about 1 s).
    assert!(cpu < 0.4, "a function limited to 100m used {cpu} s of CPU in a second");

    let response = core
        .send_deployment(
            reqwest::Method::POST,
            &acme,
            json!({"service": "greedy", "envProcess": "true", "limits": {"cpu": "lots"}}),
        )
        .await;
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("limits.cpu"));
}

/// A managed server that burns 200 ms of CPU when it starts and 100 ms after its first
/// response, outside requests (the second request waits until that burn is over).
const BUSY_SERVER: &str = r#"
import http.server, os, threading, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
burn(0.2)
after_first = None
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global after_first
        if after_first:
            after_first.join()
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
        if after_first is None:
            after_first = threading.Thread(target=burn, args=(0.1,))
            after_first.start()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_instance_is_billed_for_its_cpu_between_requests() {
    if require_program("python3").is_none() {
        return;
    }
    let (endpoint, received) = grpc_receiver().await;
    let mut core = start(|config| export_to(config, endpoint)).await;
    let acme = core.tenant("acme").await;
    std::fs::write(core.functions_dir().join("busy.py"), BUSY_SERVER).unwrap();
    let workdir = core.functions_dir().display().to_string();
    core.deploy(&acme, json!({"service": "busy", "kind": "http", "envProcess": "python3 busy.py", "workdir": workdir}))
        .await;
    for _ in 0..2 {
        assert_eq!(core.invoke(&acme.ingest, "busy", "").await.text().await.unwrap(), "ok");
    }
    // Stopping the core stops the instance and reports what it used since its last request.
    core.stop().await;

    let spans = spans(&received.requests.lock().unwrap());
    let instance: Vec<_> = spans.iter().filter(|(_, _, s)| s.name == "instance.usage").map(|(_, _, s)| s).collect();
    let invocations: Vec<_> = spans.iter().filter(|(_, _, s)| s.name == "invoke busy").collect();
    assert_eq!(invocations.len(), 2);
    let mut ids = Vec::new();
    let mut cpu_ms = 0;
    for span in &instance {
        assert_eq!(string_attr(&span.attributes, "faas.name").as_deref(), Some("busy"));
        ids.push(string_attr(&span.attributes, "sfaas.usage_id").unwrap());
        cpu_ms += int_attr(&span.attributes, "sfaas.cpu_ms").unwrap();
    }
    assert!(ids.iter().all(|id| id.starts_with("instance/")), "{ids:?}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), instance.len(), "usage ids are unique");
    // The 200 ms burnt at start (and Python's own start) are outside any request; the 100 ms
    // burnt after the first response are billed too, outside or, for what the second request
    // waited for, inside it: nothing is lost.
    let invoked: i64 = invocations.iter().map(|(_, _, s)| int_attr(&s.attributes, "sfaas.cpu_ms").unwrap()).sum();
    assert!((200..800).contains(&cpu_ms), "instance usage {cpu_ms} ms in {} records", instance.len());
    assert!(cpu_ms + invoked >= 300, "billed {cpu_ms} ms as instance usage and {invoked} ms in requests");
}

/// A managed server answering with where its stdout and stderr go.
const WHERE_OUTPUT_GOES: &str = r#"
import http.server, os
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = (os.readlink("/proc/self/fd/1") + " " + os.readlink("/proc/self/fd/2")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// A managed server's stdout and stderr are pipes the gateway reads, never the gateway's own
/// descriptors (through which it could flood, forge or truncate the gateway's log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_server_writes_to_pipes_not_to_the_gateways_output() {
    if require_program("python3").is_none() {
        return;
    }
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    std::fs::write(core.functions_dir().join("where.py"), WHERE_OUTPUT_GOES).unwrap();
    let workdir = core.functions_dir().display().to_string();
    core.deploy(
        &acme,
        json!({"service": "where", "kind": "http", "envProcess": "python3 where.py", "workdir": workdir}),
    )
    .await;
    let answer = core.invoke(&acme.ingest, "where", "").await.text().await.unwrap();
    let (stdout, stderr) = answer.split_once(' ').expect("two links");
    let own = |fd: u32| std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap().display().to_string();
    for (theirs, ours) in [(stdout, own(1)), (stderr, own(2))] {
        assert!(theirs.starts_with("pipe:["), "{answer}");
        assert_ne!(theirs, ours, "the server writes to the gateway's own output");
    }
    assert_ne!(stdout, stderr);
}

/// A managed server that tells the test its port and never listens on it.
const REPORTS_ITS_PORT: &str = r#"
import os, socket, time
s = socket.create_connection(("127.0.0.1", REPORT_PORT))
s.sendall(os.environ["PORT"].encode())
s.close()
time.sleep(30)
"#;

/// A tenant with egress has its managed server on the host's loopback, on a port that was
/// free when it was given. Another process on the host (another tenant with egress; here the
/// test, as root) that binds that port before the server does is not sent the tenant's
/// requests: the gateway checks whose the server end of each connection is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_taken_by_another_process_is_not_sent_a_tenants_requests() {
    if require_program("python3").is_none() {
        return;
    }
    let core = start(|config| {
        config.sandbox.as_mut().unwrap().egress.insert("acme".into());
    })
    .await;
    let acme = core.tenant("acme").await;
    let reports = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let script = REPORTS_ITS_PORT.replace("REPORT_PORT", &reports.local_addr().unwrap().port().to_string());
    std::fs::write(core.functions_dir().join("reports.py"), script).unwrap();
    let workdir = core.functions_dir().display().to_string();
    core.deploy(
        &acme,
        json!({"service": "srv", "kind": "http", "envProcess": "python3 reports.py", "workdir": workdir}),
    )
    .await;
    let call = {
        let (http, url, token) = (core.http.clone(), core.url.clone(), acme.ingest.clone());
        tokio::spawn(async move {
            let response = http.post(format!("{url}/function/srv")).bearer_auth(token).body("acme's secret").send();
            let response = response.await.unwrap();
            (response.status(), response.text().await.unwrap())
        })
    };
    let (mut report, _) = tokio::time::timeout(Duration::from_secs(20), reports.accept()).await.unwrap().unwrap();
    let mut port = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut report, &mut port).await.unwrap();
    let thief = tokio::net::TcpListener::bind(("127.0.0.1", port.trim().parse::<u16>().unwrap())).await.unwrap();
    let stolen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keeping = stolen.clone();
    tokio::spawn(async move {
        while let Ok((mut connection, _)) = thief.accept().await {
            let keeping = keeping.clone();
            tokio::spawn(async move {
                let mut bytes = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut connection, &mut bytes).await;
                keeping.lock().unwrap().extend(bytes);
            });
        }
    });

    let (status, text) = tokio::time::timeout(Duration::from_secs(60), call).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stolen = String::from_utf8_lossy(&stolen.lock().unwrap()).to_string();
    assert!(stolen.is_empty(), "the other process was sent the tenant's request: {stolen:?}");
    assert!(status.is_server_error(), "{status}: {text}");
    assert!(text.contains("not the function's"), "{text}");
}
