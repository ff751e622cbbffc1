//! `sfaas up --demo`: two demo tenants on different plans, the demo functions and flow
//! deployed for both, and a steady workload through the gateway (as a client would send it),
//! so that the dashboard shows traces, usage and draft invoices within a minute.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::sync::watch;

/// The demo tenants and their plans (from the default rate card).
const TENANTS: [(&str, &str); 2] = [("demo-shop", "pro"), ("demo-lab", "free")];

/// Built-in functions only, so that the demo runs wherever the binary does.
const FUNCTIONS: [(&str, &str); 3] = [("shout", "uppercase"), ("count", "wordcount"), ("echo", "echo")];

const FLOW: &str = "\
name: text-report
description: counts words, shouts long texts, and joins both (the demo's flow)
nodes:
  measure: {function: count}
  loud:
    function: shout
    needs: [measure]
    when: \"$.words >= 5\"
  report:
    function: echo
    needs: [measure, loud]
output: report
";

const WORDS: [&str; 16] = [
    "stateful",
    "functions",
    "compose",
    "into",
    "flows",
    "that",
    "pass",
    "data",
    "through",
    "an",
    "ephemeral",
    "store",
    "and",
    "are",
    "billed",
    "exactly",
];

struct Client {
    http: reqwest::Client,
    gateway: String,
    ui: String,
    admin: String,
}

impl Client {
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(u16, String)> {
        let response = request.bearer_auth(&self.admin).send().await?;
        Ok((response.status().as_u16(), response.text().await?))
    }
}

/// Sets the demo up, then drives the workload until `stop`.
pub async fn run(
    gateway: String,
    ui: String,
    admin: String,
    data_dir: &Path,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let client = Client { http: reqwest::Client::builder().no_proxy().build()?, gateway, ui, admin };
    let tokens_file = data_dir.join("demo-tokens.json");
    let mut tokens: serde_json::Map<String, Value> =
        std::fs::read_to_string(&tokens_file).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    for (tenant, plan) in TENANTS {
        let (status, body) = client
            .send(
                client
                    .http
                    .post(format!("{}/system/tenants", client.gateway))
                    .json(&json!({"name": tenant, "plan": plan})),
            )
            .await?;
        if status == 201 {
            tokens.insert(tenant.to_string(), serde_json::from_str(&body)?);
            let path = format!("{}/billing/tenants/{tenant}/plan", client.ui);
            let (status, body) = client.send(client.http.put(path).json(&json!({ "plan": plan }))).await?;
            anyhow::ensure!(status == 200, "putting {tenant} on plan {plan}: {status} {body}");
        }
        for (name, builtin) in FUNCTIONS {
            let deployment = json!({"service": name, "namespace": tenant, "kind": "builtin", "builtin": builtin});
            let (status, body) =
                client.send(client.http.post(format!("{}/system/functions", client.gateway)).json(&deployment)).await?;
            anyhow::ensure!(
                status == 202 || status == 200 || status == 201 || status == 409,
                "deploying {name}: {status} {body}"
            );
        }
        let (status, body) = client
            .send(
                client.http.post(format!("{}/system/flows", client.gateway)).header("x-scope-orgid", tenant).body(FLOW),
            )
            .await?;
        anyhow::ensure!(status < 300, "deploying the demo flow for {tenant}: {status} {body}");
    }
    write_private(&tokens_file, &serde_json::to_string_pretty(&tokens)?)
        .with_context(|| format!("writing {}", tokens_file.display()))?;
    eprintln!(
        "sfaas demo: tenants {} (plan pro) and {} (plan free), each with functions shout, count, echo and flow text-report",
        TENANTS[0].0, TENANTS[1].0
    );
    for (tenant, _) in TENANTS {
        if let Some(read) = tokens.get(tenant).and_then(|t| t["read_token"].as_str()) {
            eprintln!("sfaas demo: {tenant}'s read token (sign in to the dashboard as {tenant}): {read}");
        }
    }
    eprintln!(
        "sfaas demo: dashboard {} — sign in with the admin token in {} (tenants' tokens in {})",
        client.ui,
        stateful_faas_core::config::admin_token_path(data_dir).display(),
        tokens_file.display()
    );

    let (mut runs, mut calls, mut errors) = (0u64, 0u64, 0u64);
    let mut seed = 0x5eed_u64;
    let mut last_status = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    for step in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
        let (tenant, _) = TENANTS[(step % 2) as usize];
        let text = sentence(&mut seed);
        let result = if step % 4 < 2 {
            runs += 1;
            client.send(client.http.post(format!("{}/flow/text-report.{tenant}", client.gateway)).body(text)).await
        } else {
            calls += 1;
            client.send(client.http.post(format!("{}/function/shout.{tenant}", client.gateway)).body(text)).await
        };
        if !matches!(result, Ok((200, _))) {
            errors += 1;
        }
        if last_status.elapsed() >= Duration::from_secs(15) {
            eprintln!(
                "sfaas demo: {runs} flow runs and {calls} calls so far ({errors} failed); dashboard {}",
                client.ui
            );
            last_status = Instant::now();
        }
    }
    eprintln!("sfaas demo: stopped after {runs} flow runs and {calls} calls");
    Ok(())
}

/// 3 to 10 words, from a small deterministic generator.
fn sentence(seed: &mut u64) -> String {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let length = 3 + next() % 8;
    (0..length).map(|_| WORDS[(next() % WORDS.len() as u64) as usize]).collect::<Vec<_>>().join(" ")
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())
}
