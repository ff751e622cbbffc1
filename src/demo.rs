//! `sfaas up --demo`: two demo tenants on different plans, the ETL pipeline (examples/etl/)
//! deployed for both, and a steady stream of trips into it through the gateway (as a client
//! would send them), so that the dashboard shows traces, usage and draft invoices within a
//! minute.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::client::Gateway;
use crate::etl;

/// The demo tenants, their plans (from the default rate card) and records streamed per second.
const TENANTS: [(&str, &str, usize); 2] = [("demo-shop", "pro", 160), ("demo-lab", "free", 40)];

/// What the demo streamed into one tenant.
#[derive(Clone, Default)]
struct Totals {
    records: u64,
    runs: u64,
    throttled: u64,
    failed: u64,
}

/// Sets the demo up, then streams trips into both tenants' ETL flows until `stop`.
pub async fn run(
    gateway: String,
    ui: String,
    admin: String,
    data_dir: &Path,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let api = Gateway::new(&gateway, &admin)?;
    let billing = Gateway::new(&ui, &admin)?;
    let tokens_file = data_dir.join("demo-tokens.json");
    let mut tokens: serde_json::Map<String, Value> =
        std::fs::read_to_string(&tokens_file).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    for (tenant, plan, _) in TENANTS {
        let created = api
            .request(reqwest::Method::POST, "/system/tenants")
            .json(&json!({"name": tenant, "plan": plan}))
            .send()
            .await?;
        if created.status() == reqwest::StatusCode::CREATED {
            tokens.insert(tenant.to_string(), created.json().await?);
            let path = format!("/billing/tenants/{tenant}/plan");
            billing
                .text(billing.request(reqwest::Method::PUT, &path).json(&json!({ "plan": plan })))
                .await
                .with_context(|| format!("putting {tenant} on plan {plan}"))?;
        }
        let setup = etl::Setup { transport: "state", script_dir: &etl::script_dir(data_dir)? };
        etl::setup(&api, tenant, &setup).await.with_context(|| format!("setting up the ETL pipeline for {tenant}"))?;
    }
    write_private(&tokens_file, &serde_json::to_string_pretty(&tokens)?)
        .with_context(|| format!("writing {}", tokens_file.display()))?;
    eprintln!(
        "sfaas demo: tenants {} (plan pro) and {} (plan free), each with the ETL pipeline (functions etl-extract, \
         etl-clean in Python, etl-aggregate, etl-load; flow etl), streaming {} and {} trips a second into it",
        TENANTS[0].0, TENANTS[1].0, TENANTS[0].2, TENANTS[1].2
    );
    for (tenant, _, _) in TENANTS {
        if let Some(read) = tokens.get(tenant).and_then(|t| t["read_token"].as_str()) {
            eprintln!("sfaas demo: {tenant}'s read token (sign in to the dashboard as {tenant}): {read}");
        }
    }
    eprintln!(
        "sfaas demo: dashboard {ui} — sign in with the admin token in {} (tenants' tokens in {}); loaded aggregates \
         in the platform's ETL databases (by default {})",
        stateful_faas_core::config::admin_token_path(data_dir).display(),
        tokens_file.display(),
        data_dir.join("etl").join("TENANT.db").display()
    );

    let now = stateful_faas_core::database::now_ms();
    let mut sources: Vec<_> = TENANTS
        .iter()
        .enumerate()
        .map(|(i, (tenant, _, per_second))| (*tenant, *per_second / 2, etl::generate(i as u64 + 1, now, 50, false)))
        .collect();
    let mut totals = vec![Totals::default(); TENANTS.len()];
    let mut last_status = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
        // Half a second of records for each tenant, sent together.
        let mut sends = tokio::task::JoinSet::new();
        for (i, (tenant, per_tick, source)) in sources.iter_mut().enumerate() {
            let lines: Vec<String> = source.by_ref().take(*per_tick).collect();
            let (api, tenant, per_tick) = (api.clone(), tenant.to_string(), *per_tick);
            sends.spawn(async move { (i, etl::stream(&api, &tenant, lines, per_tick, 1, 0, |_| {}).await) });
        }
        for (i, sent) in sends.join_all().await {
            match sent {
                Ok(sent) => {
                    totals[i].records += sent.records;
                    totals[i].throttled += sent.throttled;
                    totals[i].runs += sent.runs.len() as u64;
                }
                Err(error) => {
                    totals[i].failed += 1;
                    tracing::warn!(%error, "demo stream");
                }
            }
        }
        if last_status.elapsed() >= Duration::from_secs(15) {
            for ((tenant, _, _), total) in TENANTS.iter().zip(&totals) {
                eprintln!(
                    "sfaas demo: {tenant}: {} trips streamed in {} flow runs ({} throttled, {} failed requests)",
                    total.records, total.runs, total.throttled, total.failed
                );
            }
            eprintln!("sfaas demo: dashboard {ui}");
            last_status = Instant::now();
        }
    }
    let records: u64 = totals.iter().map(|t| t.records).sum();
    eprintln!("sfaas demo: stopped after streaming {records} trips");
    Ok(())
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())
}
