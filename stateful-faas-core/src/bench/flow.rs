//! `sfaas bench flow`: the engine's overhead per node (a chain and a 100-wide fan-out of
//! builtin no-ops, in process), and a two-function chain passing 1 KiB, 1 MiB and 64 MiB
//! through the state store vs through files on disk with fsync (the block-storage baseline).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{BenchCore, ms, us};
use crate::flow::definition;
use crate::flow::executor::{self, RunRequest, RunStatus};

async fn deploy_flow(core: &BenchCore, yaml: &str) -> anyhow::Result<()> {
    let definition = definition::parse(yaml)?;
    let engine = &core.running.core;
    engine.flows.store.deploy(&core.tenant, definition, &engine.invoker.functions).await?;
    Ok(())
}

/// Runs a flow in process and returns its wall time.
async fn run_once(core: &BenchCore, flow: &str, input: Bytes) -> anyhow::Result<(Duration, Bytes)> {
    let request = RunRequest {
        tenant: core.tenant.clone(),
        flow: flow.to_string(),
        input,
        callback_url: None,
        traceparent: None,
        parent_run: None,
        depth: 0,
    };
    let started = Instant::now();
    let (run_id, done) = executor::start(&core.running.core.flows, request).await?;
    let result = done.await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        result.status == RunStatus::Succeeded,
        "run {run_id} {}: {:?}",
        result.status.as_str(),
        result.error
    );
    Ok((elapsed, result.output.unwrap_or_default()))
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A chain `n0 -> n1 -> ...`, or a fan-out `root -> w0..wN -> join`, of the `noop` function.
fn shape_yaml(name: &str, shape: &str, size: usize) -> String {
    let mut yaml = format!("name: {name}\nnodes:\n");
    if shape == "chain" {
        let _ = writeln!(yaml, "  n0: {{function: noop}}");
        for i in 1..size {
            let _ = writeln!(yaml, "  n{i}: {{function: noop, needs: [n{}]}}", i - 1);
        }
    } else {
        let _ = writeln!(yaml, "  root: {{function: noop}}");
        for i in 0..size {
            let _ = writeln!(yaml, "  w{i}: {{function: noop, needs: [root]}}");
        }
        let all: Vec<String> = (0..size).map(|i| format!("w{i}")).collect();
        let _ = writeln!(yaml, "  join: {{function: noop, needs: [{}]}}", all.join(", "));
    }
    yaml
}

pub async fn run(runs: usize) -> anyhow::Result<String> {
    let core = BenchCore::start(|config| {
        config.state.max_value_bytes = 256 << 20;
        config.state.tenant_quota_bytes = 2 << 30;
    })
    .await?;
    core.deploy(serde_json::json!({"service": "noop", "builtin": "noop", "envVars": {"max_inflight": "1024"}})).await?;
    for (name, builtin) in
        [("make", "blob-make"), ("sum", "blob-sum"), ("spill-make", "spill-make"), ("spill-sum", "spill-sum")]
    {
        core.deploy(serde_json::json!({"service": name, "builtin": builtin})).await?;
    }
    let mut out = String::new();

    // (b) Engine overhead per node: the slope between a small and a large flow of the same
    // shape, so that the per-run costs (two journal commits with fsync, job registration) cancel.
    let _ = writeln!(out, "| shape | nodes | median run | per-run cost | per node |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for shape in ["chain", "fan-out"] {
        let (small, large) = (10usize, 100usize);
        let mut medians = Vec::new();
        for size in [small, large] {
            let name = format!("{shape}-{size}");
            deploy_flow(&core, &shape_yaml(&name, shape, size)).await?;
            eprintln!("bench flow: {name} of builtin no-ops, {runs} runs");
            run_once(&core, &name, Bytes::new()).await?; // warm up
            let mut samples = Vec::new();
            for _ in 0..runs {
                samples.push(run_once(&core, &name, Bytes::new()).await?.0);
            }
            medians.push(median(samples));
        }
        let nodes = |size: usize| if shape == "chain" { size } else { size + 2 };
        let per_node = medians[1].saturating_sub(medians[0]) / (nodes(large) - nodes(small)) as u32;
        let fixed = medians[0].saturating_sub(per_node * nodes(small) as u32);
        for (size, median) in [small, large].into_iter().zip(&medians) {
            let _ = writeln!(out, "| {shape} | {} | {} | {} | {} |", nodes(size), ms(*median), ms(fixed), us(per_node));
        }
    }

    // (c) Data passing: the state store vs files with fsync.
    deploy_flow(&core, "name: via-state\nnodes:\n  make: {function: make}\n  sum: {function: sum, needs: [make]}\n")
        .await?;
    deploy_flow(
        &core,
        "name: via-files\nnodes:\n  make: {function: spill-make}\n  sum: {function: spill-sum, needs: [make]}\n",
    )
    .await?;
    let _ = writeln!(out, "\n| payload | via the state store (median) | via files + fsync (median) | files / state |");
    let _ = writeln!(out, "|---:|---:|---:|---:|");
    for (label, size, repeats) in
        [("1 KiB", 1usize << 10, runs), ("1 MiB", 1 << 20, runs), ("64 MiB", 64 << 20, (runs / 4).max(3))]
    {
        eprintln!("bench flow: two-function chain passing {label}, {repeats} runs each");
        let mut medians = Vec::new();
        for flow in ["via-state", "via-files"] {
            let input = Bytes::from(size.to_string());
            let (_, output) = run_once(&core, flow, input.clone()).await?;
            let answer: serde_json::Value = serde_json::from_slice(&output)?;
            anyhow::ensure!(answer["bytes"] == size, "{flow} passed {} bytes, not {size}", answer["bytes"]);
            let mut samples = Vec::new();
            for _ in 0..repeats {
                samples.push(run_once(&core, flow, input.clone()).await?.0);
            }
            medians.push(median(samples));
        }
        let ratio = medians[1].as_secs_f64() / medians[0].as_secs_f64();
        let _ = writeln!(out, "| {label} | {} | {} | {ratio:.2} |", ms(medians[0]), ms(medians[1]));
    }
    core.stop().await;
    Ok(out)
}
