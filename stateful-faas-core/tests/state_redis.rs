//! The state store over the Redis protocol, with real clients: redis-py (RESP2 and RESP3,
//! pipelines) and Debian's redis-cli; tenancy, read tokens, functions' tokens, quotas, TTLs and
//! exact metering, and the protocol's limits under hostile input.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Tenant, TestCore, require_program, start};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// redis-py in a virtualenv (from PyPI).
fn redis_py() -> Option<PathBuf> {
    testkit::python_venv("redis-py", "import redis", &["redis"])
}

fn client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/redis_commands.py")
}

fn address(core: &TestCore) -> std::net::SocketAddr {
    core.running.as_ref().unwrap().state_redis_addr.expect("the Redis protocol is served")
}

fn url(core: &TestCore, user: &str, token: &str) -> String {
    format!("redis://{user}:{token}@{}", address(core))
}

/// `redis-cli` against the core as `user` with `token` (no AUTH when `None`); its stdout and
/// stderr together.
fn cli(core: &TestCore, auth: Option<(&str, &str)>, args: &[&str], stdin: &[u8]) -> String {
    let addr = address(core);
    let mut command = Command::new("redis-cli");
    command.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string(), "--no-auth-warning"]);
    if let Some((user, token)) = auth {
        command.args(["--user", user, "--pass", token]);
    }
    let mut child =
        command.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let output = child.wait_with_output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// A connection to the Redis listener at `addr`, signed in as `tenant`.
async fn signed_in(addr: std::net::SocketAddr, tenant: &str, token: String) -> tokio::net::TcpStream {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let login = format!("*3\r\n$4\r\nAUTH\r\n${}\r\n{tenant}\r\n${}\r\n{token}\r\n", tenant.len(), token.len());
    socket.write_all(login.as_bytes()).await.unwrap();
    let mut ok = [0u8; 5];
    socket.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"+OK\r\n");
    socket
}

async fn usage(core: &TestCore, tenant: &Tenant) -> serde_json::Value {
    let (status, usage) = core.get_json(&tenant.read, "/state/usage").await;
    assert_eq!(status, 200, "{usage}");
    usage
}

/// Byte·nanoseconds of an exact decimal ("12.500000000").
fn byte_nanos(decimal: &str) -> u128 {
    let (whole, fraction) = decimal.split_once('.').unwrap();
    whole.parse::<u128>().unwrap() * 1_000_000_000 + format!("{fraction:0<9}").parse::<u128>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_runs_every_command_over_resp2_and_resp3() {
    let Some(python) = redis_py() else { return };
    let core = start(|_| {}).await;
    for protocol in ["2", "3"] {
        let tenant = core.tenant(&format!("resp{protocol}")).await;
        let output = tokio::task::block_in_place(|| {
            Command::new(&python)
                .arg(client_script())
                .args(["commands", &url(&core, &tenant.name, &tenant.ingest), protocol])
                .output()
                .unwrap()
        });
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "RESP{protocol}: {stdout}{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(stdout.trim(), "ok");
        // The same objects over HTTP: one store, two protocols.
        let plain = core.http.get(format!("{}/state/buckets/_/objects/plain", core.url)).bearer_auth(&tenant.read);
        assert_eq!(plain.send().await.unwrap().text().await.unwrap(), "wxyz");
        let (_, scanned) = core.get_json(&tenant.read, "/state/buckets/scan").await;
        assert_eq!(scanned.as_array().unwrap().len(), 25);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_authenticates_pipelines_and_is_refused_as_redis_refuses() {
    let Some(_) = require_program("redis-cli") else { return };
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    let ingest = Some(("acme", acme.ingest.as_str()));
    tokio::task::block_in_place(|| {
        // Before AUTH only AUTH, HELLO, PING and QUIT answer.
        assert_eq!(cli(&core, None, &["PING"], b"").trim(), "PONG");
        assert_eq!(cli(&core, None, &["GET", "k"], b"").trim(), "NOAUTH Authentication required.");
        assert_eq!(cli(&core, None, &["NOSUCH"], b"").trim(), "NOAUTH Authentication required.");
        assert!(cli(&core, None, &["HELLO", "3"], b"").contains("NOAUTH HELLO must be called"));
        let wrong = cli(&core, Some(("acme", "not-a-token")), &["PING"], b"");
        assert!(wrong.contains("WRONGPASS invalid username-password pair"), "{wrong}");

        // Mass insertion over one pipelined connection (`--pipe` sends raw RESP).
        let mut pipe = Vec::new();
        for i in 0..2000 {
            let (key, value) = (format!("bulk/{i}"), format!("value-{i}"));
            pipe.extend_from_slice(
                format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n", key.len(), value.len()).as_bytes(),
            );
        }
        let piped = cli(&core, ingest, &["--pipe"], &pipe);
        assert!(piped.contains("errors: 0, replies: 2000"), "{piped}");
        assert_eq!(cli(&core, ingest, &["GET", "bulk/1999"], b"").trim(), "value-1999");
        assert_eq!(cli(&core, ingest, &["DBSIZE"], b"").trim(), "2000");
        assert_eq!(cli(&core, ingest, &["--scan", "--pattern", "bulk/1*"], b"").lines().count(), 1111);

        // The read token reads; writes get Redis's NOPERM.
        let read = Some(("acme", acme.read.as_str()));
        assert_eq!(cli(&core, read, &["GET", "bulk/7"], b"").trim(), "value-7");
        let refused = cli(&core, read, &["SET", "bulk/7", "x"], b"");
        assert!(refused.contains("NOPERM this user has no permissions to run the 'set' command"), "{refused}");
        assert!(cli(&core, read, &["DEL", "bulk/7"], b"").contains("NOPERM"));
        assert!(cli(&core, read, &["SFAAS.REGISTER", "j"], b"").contains("NOPERM"));

        // The admin's token acts for the tenant it names, and only when it names one.
        let admin = Some(("acme", common::ADMIN));
        assert_eq!(cli(&core, admin, &["GET", "bulk/8"], b"").trim(), "value-8");
        let unnamed = cli(&core, Some(("default", common::ADMIN)), &["PING"], b"");
        assert!(unnamed.contains("WRONGPASS the admin token acts for a tenant"), "{unnamed}");

        // Unknown commands and bad arguments get Redis's own texts.
        let unknown = cli(&core, ingest, &["LPUSH", "l", "a"], b"");
        assert_eq!(unknown.trim(), "ERR unknown command 'LPUSH', with args beginning with: 'l' 'a'");
        let arity = cli(&core, ingest, &["GET"], b"");
        assert_eq!(arity.trim(), "ERR wrong number of arguments for 'get' command");
        assert_eq!(cli(&core, ingest, &["SET", "k", "v", "NX", "XX"], b"").trim(), "ERR syntax error");
        assert_eq!(
            cli(&core, ingest, &["SET", "k", "v", "EX", "0"], b"").trim(),
            "ERR invalid expire time in 'set' command"
        );
        assert_eq!(
            cli(&core, ingest, &["INCRBY", "k", "x"], b"").trim(),
            "ERR value is not an integer or out of range"
        );
        assert_eq!(cli(&core, ingest, &["SELECT", "1"], b"").trim(), "ERR DB index is out of range");
        assert_eq!(cli(&core, None, &["HELLO", "4"], b"").trim(), "NOPROTO unsupported protocol version");
        let hello = cli(&core, None, &["HELLO", "3", "AUTH", "acme", &acme.ingest], b"");
        assert!(hello.lines().any(|line| line == "proto 3"), "{hello}");
        assert!(cli(&core, ingest, &["COMMAND", "DOCS", "getdel"], b"").contains("delete after read"));
        assert_eq!(
            cli(&core, ingest, &["CONFIG", "GET", "maxmemory-policy"], b"").trim(),
            "maxmemory-policy\nnoeviction"
        );
        assert!(cli(&core, ingest, &["CONFIG", "SET", "maxmemory", "1"], b"").contains("only CONFIG GET"));
        // The shell function example's -x: a binary-safe value from stdin.
        assert_eq!(cli(&core, ingest, &["-x", "SET", "bin"], b"a\r\nb\x00c").trim(), "OK");
        assert_eq!(cli(&core, ingest, &["STRLEN", "bin"], b"").trim(), "6");
    });
}

/// Hostile bytes: broken framing and oversized requests close the connection with an error,
/// and a client that never finishes a command is cut off; nothing it sent is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_and_oversized_requests_are_refused_and_cost_nothing() {
    let core = start(|config| config.state.max_value_bytes = 1 << 20).await;
    let acme = core.tenant("acme").await;
    let addr = address(&core);
    let exchange = |auth: bool, request: Vec<u8>| {
        let token = acme.ingest.clone();
        async move {
            let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
            if auth {
                let login = format!("*3\r\n$4\r\nAUTH\r\n$4\r\nacme\r\n${}\r\n{token}\r\n", token.len());
                socket.write_all(login.as_bytes()).await.unwrap();
                let mut ok = [0u8; 5];
                socket.read_exact(&mut ok).await.unwrap();
                assert_eq!(&ok, b"+OK\r\n");
            }
            socket.write_all(&request).await.unwrap();
            let mut answer = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer)).await;
            assert!(read.is_ok(), "the connection was closed after the error");
            String::from_utf8_lossy(&answer).to_string()
        }
    };
    // Unauthenticated: Redis's small limits.
    let answer = exchange(false, b"*1\r\n$100000\r\n".to_vec()).await;
    assert!(answer.starts_with("-ERR Protocol error: invalid bulk length"), "{answer}");
    let answer = exchange(false, b"*11\r\n".to_vec()).await;
    assert!(answer.starts_with("-ERR Protocol error: invalid multibulk length"), "{answer}");
    // Authenticated: a value over the largest is refused from its header, before its bytes.
    let answer = exchange(true, format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n", (1 << 20) + 1).into_bytes()).await;
    assert!(answer.starts_with("-ERR Protocol error: invalid bulk length"), "{answer}");
    let answer = exchange(true, b"*2\r\n+GET\r\n".to_vec()).await;
    assert!(answer.starts_with("-ERR Protocol error: expected '$'"), "{answer}");
    let answer = exchange(true, b"*1\r\n$3\r\nGETX\r\n".to_vec()).await;
    assert!(answer.starts_with("-ERR Protocol error: expected '\\r\\n'"), "{answer}");
    // RESET forgets the login; QUIT answers and closes.
    let answer =
        exchange(true, b"*1\r\n$5\r\nRESET\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nQUIT\r\n".to_vec()).await;
    assert_eq!(answer, "+RESET\r\n-NOAUTH Authentication required.\r\n+OK\r\n");
    // Commands before the broken one were run.
    let answer = exchange(true, b"*3\r\n$3\r\nSET\r\n$2\r\nok\r\n$1\r\n1\r\n*x\r\n".to_vec()).await;
    assert!(answer.starts_with("+OK\r\n-ERR Protocol error"), "{answer}");
    assert_eq!(usage(&core, &acme).await["bytes"], 1, "only the whole command was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_own_keys() {
    let Some(_) = require_program("redis-cli") else { return };
    let core = start(|_| {}).await;
    let (acme, globex) = (core.tenant("acme").await, core.tenant("globex").await);
    tokio::task::block_in_place(|| {
        let a = Some(("acme", acme.ingest.as_str()));
        let g = Some(("globex", globex.ingest.as_str()));
        assert_eq!(cli(&core, a, &["MSET", "shared", "acme's", "only/acme", "1"], b"").trim(), "OK");
        assert_eq!(cli(&core, g, &["SET", "shared", "globex's"], b"").trim(), "OK");
        assert_eq!(cli(&core, a, &["GET", "shared"], b"").trim(), "acme's");
        assert_eq!(cli(&core, g, &["GET", "shared"], b"").trim(), "globex's");
        assert_eq!(cli(&core, g, &["EXISTS", "only/acme"], b"").trim(), "0");
        assert_eq!(cli(&core, g, &["DEL", "only/acme"], b"").trim(), "0");
        assert_eq!(cli(&core, g, &["DBSIZE"], b"").trim(), "1");
        assert_eq!(cli(&core, a, &["DBSIZE"], b"").trim(), "2");
        assert_eq!(cli(&core, g, &["--scan"], b"").trim(), "shared");
        assert_eq!(cli(&core, g, &["KEYS", "*"], b"").trim(), "shared");
        assert!(cli(&core, g, &["INFO", "keyspace"], b"").contains("db0:keys=1,"));
        // A tenant's token names its tenant: it cannot be used as another's.
        let posing = cli(&core, Some(("acme", globex.ingest.as_str())), &["GET", "shared"], b"");
        assert!(posing.contains("WRONGPASS"), "{posing}");
    });
    assert_eq!(usage(&core, &globex).await["bytes"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_answer_oom_and_evict_nothing() {
    let Some(_) = require_program("redis-cli") else { return };
    let core = start(|config| {
        config.state.tenant_quota_bytes = 1000;
        config.state.max_value_bytes = 600;
    })
    .await;
    let acme = core.tenant("acme").await;
    let a = Some(("acme", acme.ingest.as_str()));
    let value = |n: usize| "x".repeat(n);
    tokio::task::block_in_place(|| {
        assert_eq!(cli(&core, a, &["SET", "b/a", &value(600)], b"").trim(), "OK");
        let over = cli(&core, a, &["SET", "b/b", &value(500)], b"");
        assert!(over.starts_with("OOM tenant acme state quota exceeded"), "{over}");
        assert!(over.contains("--state-tenant-quota-bytes"), "{over}");
        let large = cli(&core, a, &["APPEND", "b/a", "y"], b"");
        assert!(large.contains("larger than the 600 bytes allowed"), "{large}");
        // MSET is all or none: one of these fits, both do not.
        let both = cli(&core, a, &["MSET", "b/c", &value(100), "b/d", &value(100)], b"");
        assert!(both.starts_with("OOM"), "{both}");
        assert_eq!(cli(&core, a, &["EXISTS", "b/c", "b/d"], b"").trim(), "0");
        // Shrinking always fits, and frees room.
        assert_eq!(cli(&core, a, &["SET", "b/a", "small"], b"").trim(), "OK");
        assert_eq!(cli(&core, a, &["MSET", "b/c", &value(100), "b/d", &value(100)], b"").trim(), "OK");
    });
    let usage = usage(&core, &acme).await;
    assert_eq!(usage["bytes"], 205, "the refused writes evicted and stored nothing: {usage}");
}

/// Byte-seconds are the store's integral whichever protocol changed the bytes: objects with a
/// TTL are counted to their expiry instant exactly, and a job's byte-seconds as deregistered
/// over RESP are those of what it held (value, address and 128 B) over the time it was held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metering_through_resp_is_exact() {
    let Some(_) = require_program("redis-cli") else { return };
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    let a = Some(("acme", acme.ingest.as_str()));
    let (set, deregistered) = tokio::task::block_in_place(|| {
        // Each holds its value, its address (bucket `ttl` and key: 4 B) and 128 B: 137 B for
        // 300 ms and 142 B for 500 ms, 112.1 byte-seconds, whenever they were set.
        assert_eq!(cli(&core, a, &["SET", "ttl/a", "12345", "PX", "300"], b"").trim(), "OK");
        assert_eq!(cli(&core, a, &["SET", "ttl/b", "1234567890", "PX", "500"], b"").trim(), "OK");
        assert_eq!(cli(&core, a, &["SFAAS.REGISTER", "run-1"], b"").trim(), "OK");
        let before = Instant::now();
        assert_eq!(cli(&core, a, &["SET", "{job:run-1}b/k", &"z".repeat(1000)], b"").trim(), "OK");
        let set = (before, Instant::now());
        std::thread::sleep(Duration::from_millis(700));
        let before = Instant::now();
        let byte_seconds = cli(&core, a, &["SFAAS.DEREGISTER", "run-1"], b"").trim().to_string();
        (set, (before, Instant::now(), byte_seconds))
    });
    assert_eq!(cli(&core, a, &["EXISTS", "ttl/a", "ttl/b"], b"").trim(), "0", "expired");
    let usage = usage(&core, &acme).await;
    assert_eq!(usage["standing"], "112.100000000", "{usage}");
    let (before, after, byte_seconds) = deregistered;
    assert_eq!(usage["ended_jobs"], byte_seconds.as_str(), "{usage}");
    let held = byte_nanos(&byte_seconds);
    // 1000 B of value, 7 of address (run-1, b, k), 128.
    let (least, most) = ((before - set.1).as_nanos() * 1135, (after - set.0).as_nanos() * 1135);
    assert!(least <= held && held <= most, "{least} <= {held} <= {most}");
    assert_eq!(byte_nanos(usage["total"].as_str().unwrap()), 112_100_000_000 + held);
}

/// Functions reach the store with redis-py and redis-cli (the examples), inside their sandbox,
/// with their invocation's token: their tenant's job-less keys and their own job's only, never
/// job management, and nothing once the invocation has ended, not even on a connection that
/// authenticated before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_use_redis_clients_with_their_invocations_token() {
    let (Some(python), Some(_)) = (redis_py(), require_program("redis-cli")) else { return };
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    // The Python example with redis-py beside it, as a function's own dependencies are.
    let dir = core.functions_dir().join("state");
    std::fs::create_dir_all(&dir).unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/state");
    for file in ["counter_redis.py", "stash_redis.sh"] {
        std::fs::copy(examples.join(file), dir.join(file)).unwrap();
    }
    // (async-timeout: redis-py needs it on Python before 3.11.3, which the host's may be.)
    let pip = python.with_file_name("pip");
    let installed =
        Command::new(pip).args(["install", "--quiet", "--target"]).arg(&dir).args(["redis", "async-timeout"]).status();
    assert!(installed.unwrap().success(), "pip install --target");
    let status = Command::new("chmod").args(["-R", "a+rX"]).arg(&dir).status().unwrap();
    assert!(status.success());
    let workdir = dir.display().to_string();
    core.deploy(&acme, json!({"service": "counter", "envProcess": "python3 counter_redis.py", "workdir": workdir}))
        .await;
    core.deploy(&acme, json!({"service": "stash", "envProcess": "sh stash_redis.sh", "workdir": workdir})).await;
    for expected in 1..=3 {
        let response = core.invoke(&acme.ingest, "counter", "visits").await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "{text}");
        let body: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["count"], expected, "{body}");
    }
    let a = Some(("acme", acme.ingest.as_str()));
    assert_eq!(cli(&core, a, &["GET", "counters/visits"], b"").trim(), "3");
    let response = core
        .http
        .post(format!("{}/function/stash", core.url))
        .bearer_auth(&acme.ingest)
        .header("X-Call-Id", "stash-1")
        .body(vec![b'z'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, json!({"key": "stash/stash-1", "stored_bytes": 4096}));
    let ttl: i64 = cli(&core, a, &["TTL", "stash/stash-1"], b"").trim().parse().unwrap();
    assert!((590..=600).contains(&ttl), "{ttl}");

    // While it runs, a function's token reaches no other job and manages none.
    let probe = r#"for c in 'SET {job:other}b/k 1' 'SFAAS.REGISTER mine' 'SET own 1'; do
        redis-cli --no-auth-warning -u "$SFAAS_STATE_REDIS_URL" $c | cut -c1-6; done"#;
    core.deploy(&acme, json!({"service": "probe", "envProcess": probe})).await;
    let answers = core.invoke(&acme.ingest, "probe", "").await.text().await.unwrap();
    assert_eq!(answers.split_whitespace().collect::<Vec<_>>(), ["NOPERM", "NOPERM", "OK"], "{answers}");

    // In a flow run, the run's job is the function's own: it reads and writes it by key prefix.
    let jobber = r#"cli() { redis-cli --no-auth-warning -u "$SFAAS_STATE_REDIS_URL" "$@"; }
        cli SET "{job:$SFAAS_JOB}scratch/x" from-the-run >/dev/null; cli GET "{job:$SFAAS_JOB}scratch/x""#;
    core.deploy(&acme, json!({"service": "jobber", "envProcess": jobber})).await;
    let flow = "name: uses-its-job\nnodes:\n  only: {function: jobber}\n";
    let deployed = core.http.post(format!("{}/system/flows", core.url)).bearer_auth(&acme.ingest).body(flow).send();
    assert!(deployed.await.unwrap().status().is_success());
    let run = core.http.post(format!("{}/flow/uses-its-job", core.url)).bearer_auth(&acme.ingest).body("").send();
    let run = run.await.unwrap();
    assert_eq!(run.status(), 200);
    assert_eq!(run.text().await.unwrap().trim(), "from-the-run");

    // Afterwards its token is worth nothing.
    core.deploy(&acme, json!({"service": "leak", "envProcess": "printf %s \"$SFAAS_STATE_REDIS_URL\""})).await;
    let leaked = core.invoke(&acme.ingest, "leak", "").await.text().await.unwrap();
    let token = leaked.strip_prefix("redis://acme:").and_then(|rest| rest.split('@').next()).unwrap().to_string();
    assert_eq!(token.len(), 64, "{leaked}");
    let refused = cli(&core, Some(("acme", &token)), &["GET", "own"], b"");
    assert!(refused.contains("WRONGPASS"), "the token outlived its invocation: {refused}");

    // A connection that authenticated while the token was valid loses it at its next command.
    let tenant = stateful_faas_core::tenant::TenantId::new("acme").unwrap();
    let issued = core.running.as_ref().unwrap().core.invoker.tenants.issue_function_token(&tenant, None);
    let mut holder = Command::new(&python)
        .arg(client_script())
        .args(["hold", &url(&core, "acme", &issued.token)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::{BufRead, Write};
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    drop(issued);
    holder.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("token was revoked"), "{line}");
    holder.wait().unwrap();
}

/// The event loop is shared by every tenant: a costly glob pattern (long, with classes,
/// against long key names) cannot hold it. A pattern over 256 bytes is refused, `KEYS` stops
/// with an error past its budget of matching, and `SCAN` returns early, so that a walk still
/// ends and still finds every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costly_patterns_are_bounded_not_run_on_the_shared_loop() {
    let Some(_) = require_program("redis-cli") else { return };
    let core = start(|_| {}).await;
    let acme = core.tenant("acme").await;
    tokio::task::block_in_place(|| {
        let a = Some(("acme", acme.ingest.as_str()));
        let name = |i: usize| format!("{}{i:04}", "b".repeat(246));
        let sets: String = (0..2000).map(|i| format!("SET {} v\n", name(i))).collect();
        let loaded = cli(&core, a, &[], sets.as_bytes());
        assert_eq!(loaded.lines().filter(|l| *l == "OK").count(), 2000, "{}", &loaded[..loaded.len().min(300)]);
        let long = "*".repeat(257);
        assert!(cli(&core, a, &["KEYS", &long], b"").contains("ERR pattern longer than 256 bytes"));
        // Each key costs about its length times the class's: far past the budget over all.
        let costly = format!("*[{}]z", "a".repeat(250));
        let keys = cli(&core, a, &["KEYS", &costly], b"");
        assert!(keys.contains("ERR KEYS stopped"), "{keys}");
        let (mut cursor, mut calls, mut found) = ("0".to_string(), 0, 0);
        loop {
            let answer = cli(&core, a, &["SCAN", &cursor, "MATCH", &costly, "COUNT", "100000"], b"");
            let mut lines = answer.lines();
            cursor = lines.next().unwrap().to_string();
            found += lines.filter(|line| !line.is_empty()).count();
            calls += 1;
            if cursor == "0" {
                break;
            }
            assert!(calls < 100, "SCAN moves on");
        }
        assert!(calls > 1, "SCAN returned early at least once");
        assert_eq!(found, 0, "no key ends in z");
        let all = cli(&core, a, &["--scan", "--pattern", "b*"], b"");
        assert_eq!(all.lines().count(), 2000, "{}", &all[..all.len().min(500)]);
    });
}

/// Room for large commands being received is shared by every tenant, and one tenant's
/// connections hold at most half of it: a tenant announcing large values on many connections
/// and sending nothing more does not make another tenant's large command wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_stalled_large_commands_leave_room_for_others() {
    // Values up to 4 MiB (commands up to 5 MiB); 20 MiB of room, 10 MiB of it for one tenant.
    let core = start(|config| {
        config.state.max_value_bytes = 4 << 20;
        config.state.total_budget_bytes = 40 << 20;
    })
    .await;
    let (acme, globex) = (core.tenant("acme").await, core.tenant("globex").await);
    let addr = address(&core);
    let value = 3_500_000;
    let header = format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${value}\r\n");
    // Six connections of acme's, each announcing a 3.5 MB value and then stalling.
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let mut socket = signed_in(addr, "acme", acme.ingest.clone()).await;
        socket.write_all(header.as_bytes()).await.unwrap();
        stalled.push(socket);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // globex's own 3.5 MB value goes through (it waited for acme's stall timeout, 60 s).
    let mut socket = signed_in(addr, "globex", globex.ingest.clone()).await;
    let mut command = header.into_bytes();
    command.extend(vec![b'v'; value]);
    command.extend(b"\r\n");
    socket.write_all(&command).await.unwrap();
    let mut ok = [0u8; 5];
    let answered = tokio::time::timeout(Duration::from_secs(20), socket.read_exact(&mut ok)).await;
    assert!(answered.is_ok(), "globex's command waited on acme's stalled ones");
    assert_eq!(&ok, b"+OK\r\n");
    drop(stalled);
}

/// One small value named many times in one `MGET` would be copied into the reply each time:
/// a 7 MiB command could make a reply of gigabytes. A reply larger than the largest command
/// is refused instead of built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_larger_than_the_largest_command_is_refused() {
    let Some(_) = require_program("redis-cli") else { return };
    // Values up to 1 MiB: commands, and replies, up to 2 MiB.
    let core = start(|config| config.state.max_value_bytes = 1 << 20).await;
    let acme = core.tenant("acme").await;
    tokio::task::block_in_place(|| {
        let a = Some(("acme", acme.ingest.as_str()));
        let value = "v".repeat(16_000);
        assert_eq!(cli(&core, a, &["SET", "a", &value], b"").trim(), "OK");
        let many = |n: usize| std::iter::once("MGET").chain(std::iter::repeat_n("a", n)).collect::<Vec<_>>();
        let answer = cli(&core, a, &many(100), b"");
        assert_eq!(answer.lines().filter(|line| *line == value).count(), 100);
        let answer = cli(&core, a, &many(200), b"");
        assert!(answer.contains("ERR MGET would answer 3200000 bytes; a reply holds at most"), "{}", &answer[..200]);
        assert_eq!(cli(&core, a, &["PING"], b"").trim(), "PONG");
    });
}

/// Connections share an event loop: one tenant's pipeline of costly commands (KEYS over 50 000
/// keys, each walking all of them) does not hold the loop until it is done; another tenant's
/// PING on the same loop is answered before that pipeline ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_costly_commands_takes_turns_with_other_connections() {
    let core = start(|_| {}).await;
    let (acme, globex) = (core.tenant("acme").await, core.tenant("globex").await);
    let addr = address(&core);
    let mut heavy = signed_in(addr, "acme", acme.ingest.clone()).await;
    let mut light = signed_in(addr, "globex", globex.ingest.clone()).await;
    for batch in 0..10 {
        let mut mset = format!("*{}\r\n$4\r\nMSET\r\n", 1 + 2 * 5000);
        for i in 0..5000 {
            let key = format!("k{batch}-{i}");
            mset.push_str(&format!("${}\r\n{key}\r\n$1\r\nv\r\n", key.len()));
        }
        heavy.write_all(mset.as_bytes()).await.unwrap();
        let mut ok = [0u8; 5];
        heavy.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"+OK\r\n");
    }
    // 300 KEYS that match nothing, sent at once: each walks the 50 000 keys.
    let keys = "*2\r\n$4\r\nKEYS\r\n$8\r\nnomatch*\r\n".repeat(300);
    heavy.write_all(keys.as_bytes()).await.unwrap();
    let pipeline = tokio::spawn(async move {
        let mut replies = Vec::new();
        while replies.iter().filter(|b| **b == b'\n').count() < 300 {
            let mut chunk = [0u8; 4096];
            let n = heavy.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            replies.extend_from_slice(&chunk[..n]);
        }
        std::time::Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    light.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
    let mut pong = [0u8; 7];
    light.read_exact(&mut pong).await.unwrap();
    let answered = std::time::Instant::now();
    assert_eq!(&pong, b"+PONG\r\n");
    let finished = pipeline.await.unwrap();
    assert!(answered < finished, "globex's PING waited for acme's whole pipeline");
}
