//! A tenant's process functions run in cgroups that meter and limit them: what they start is
//! billed and dies with the invocation, and a fork bomb stops at its process limit while other
//! tenants are served (a memory hog: `functions.rs`).

mod common;

use std::time::Duration;

use common::otlp::{export_to, grpc_receiver, int_attr, spans, string_attr};
use common::{python, require_program, running, start};
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
    // The thread burns on; its span is written when it ends.
    tokio::time::sleep(Duration::from_millis(600)).await;
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
