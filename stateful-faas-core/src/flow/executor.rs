//! Runs flows: schedules nodes as their needs finish, passes data through the state store,
//! retries, times out, catches, fans out and in, runs sub-flows, journals every step, and
//! traces the run as `flow` / `node` / `invoke` spans.
//!
//! Data: each node's output is stored in the run's job (`bucket "nodes"`, key = node id), so
//! it is metered as the run's state byte-seconds; dependents get the same buffer (zero-copy).
//! A node with one need receives that output as-is; with several, a JSON object keyed by node
//! id, each value the output parsed as JSON (or a string when it is not JSON). A node without
//! needs receives the run's input. The run's job is deregistered when the run ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span, SpanContext, SpanKind, Status, Tracer};
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use super::FlowError;
use super::Flows;
use super::definition::{Flow, FlowOutput, Node};
use super::journal::{Entry, INLINE_OUTPUT_BYTES, NodeRecord, RunEnd};
use super::node::{NodeContext, run_node};
use super::schedule::Ready;
use crate::function::outbound::Outbound;
use crate::semconv;
use crate::state::metering::ByteSeconds;
use crate::state::{ObjectKey, PutOptions};
use crate::telemetry;
use crate::tenant::TenantId;

/// How deep sub-flows may nest.
pub const MAX_DEPTH: usize = 8;
/// Bucket of node outputs within a run's job.
pub const OUTPUT_BUCKET: &str = "nodes";

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub run_id: String,
    pub status: RunStatus,
    pub output: Option<Bytes>,
    pub error: Option<String>,
    pub state_byte_seconds: ByteSeconds,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub tenant: TenantId,
    pub flow: String,
    pub input: Bytes,
    pub callback_url: Option<String>,
    pub traceparent: Option<String>,
    pub parent_run: Option<String>,
    pub depth: usize,
}

struct Run {
    tenant: TenantId,
    run_id: String,
    flow: Arc<Flow>,
    input: Bytes,
    callback_url: Option<String>,
    traceparent: Option<String>,
    depth: usize,
}

/// Nodes already finished when a run resumes: id → output (`None` = skipped).
pub type Finished = HashMap<String, Option<Bytes>>;

/// Starts a run: it is committed to the journal, then executed in the background. The
/// receiver yields the result when the run ends.
pub async fn start(
    flows: &Arc<Flows>,
    request: RunRequest,
) -> Result<(String, oneshot::Receiver<RunResult>), FlowError> {
    if request.depth > MAX_DEPTH {
        return Err(FlowError::TooDeep(MAX_DEPTH));
    }
    let flow = flows
        .store
        .get(&request.tenant, &request.flow)
        .ok_or_else(|| FlowError::NotFound { tenant: request.tenant.to_string(), name: request.flow.clone() })?;
    // A run's job makes usage records, as its nodes make invocation spans: none while the
    // tenant's are not leaving.
    if flows.invoker.telemetry.behind(&request.tenant) {
        return Err(FlowError::Behind(request.tenant.to_string()));
    }
    let run_id = uuid::Uuid::now_v7().to_string();
    let definition = serde_json::to_string(&flow.definition).expect("flow definitions serialize");
    flows.invoker.state.register(&request.tenant, &run_id)?;
    flows
        .journal
        .create_run(
            &request.tenant,
            &run_id,
            flow.name(),
            &definition,
            &request.input,
            request.callback_url.as_deref(),
            request.parent_run.as_deref(),
            request.traceparent.as_deref(),
        )
        .await?;
    let run = Run {
        tenant: request.tenant,
        run_id: run_id.clone(),
        flow,
        input: request.input,
        callback_url: request.callback_url,
        traceparent: request.traceparent,
        depth: request.depth,
    };
    Ok((run_id, spawn(flows.clone(), run, Finished::new())))
}

/// Resumes the runs a stop interrupted; nodes committed as finished are not run again.
pub async fn resume_interrupted(flows: &Arc<Flows>) -> Result<usize, FlowError> {
    let interrupted = flows.journal.interrupted().await?;
    let count = interrupted.len();
    for run in interrupted {
        let Ok(tenant) = TenantId::new(&run.tenant) else { continue };
        let definition: super::FlowDefinition = match serde_json::from_str(&run.definition) {
            Ok(definition) => definition,
            Err(error) => {
                tracing::error!(run_id = %run.run_id, %error, "cannot resume: stored definition does not parse");
                continue;
            }
        };
        let flow = match definition.validate(|_| true, |_| true) {
            Ok(flow) => Arc::new(flow),
            Err(error) => {
                tracing::error!(run_id = %run.run_id, %error, "cannot resume: stored definition does not validate");
                continue;
            }
        };
        if run.parent_run.is_some() {
            // A sub-flow run: its parent resumes and runs the sub-flow node again.
            finish_abandoned(flows, &tenant, &run.run_id, "interrupted; the parent run runs this sub-flow again").await;
            continue;
        }
        let mut finished = Finished::new();
        for (node, state, output) in run.finished {
            match (state.as_str(), output) {
                ("skipped", _) => {
                    finished.insert(node, None);
                }
                ("succeeded", Some(output)) => {
                    finished.insert(node, Some(Bytes::from(output)));
                }
                // Too large to keep in the journal, and the ephemeral store did not survive.
                _ => tracing::info!(run_id = %run.run_id, %node, "output lost with the restart; the node runs again"),
            }
        }
        if flows.invoker.state.register(&tenant, &run.run_id).is_err() {
            tracing::warn!(run_id = %run.run_id, "state job already registered");
        }
        tracing::info!(run_id = %run.run_id, flow = flow.name(), finished = finished.len(), "resuming flow run");
        let resumed = Run {
            tenant,
            run_id: run.run_id,
            flow,
            input: Bytes::from(run.input),
            callback_url: run.callback_url,
            traceparent: run.traceparent,
            depth: 0,
        };
        drop(spawn(flows.clone(), resumed, finished));
    }
    Ok(count)
}

async fn finish_abandoned(flows: &Arc<Flows>, tenant: &TenantId, run_id: &str, reason: &str) {
    flows
        .journal
        .finish_run(RunEnd {
            tenant: tenant.clone(),
            run_id: run_id.to_string(),
            status: RunStatus::Failed.as_str(),
            output: None,
            error: Some(reason.to_string()),
            state_byte_seconds: ByteSeconds::ZERO.to_decimal_string(),
        })
        .await;
}

fn spawn(flows: Arc<Flows>, run: Run, finished: Finished) -> oneshot::Receiver<RunResult> {
    let (sender, receiver) = oneshot::channel();
    let cancel = flows.store.track(&run.tenant, &run.run_id);
    tokio::spawn(async move {
        let result = execute(&flows, &run, finished, cancel).await;
        flows.store.untrack(&run.tenant, &run.run_id);
        if let Some(url) = &run.callback_url {
            post_callback(&flows.invoker.outbound, url, &result).await;
        }
        let _ = sender.send(result);
    });
    receiver
}

#[derive(Debug, Clone)]
enum NodeState {
    Pending,
    Running,
    Done(Bytes),
    Skipped,
    Failed,
}

pub(super) struct NodeResult {
    index: usize,
    result: Result<Bytes, String>,
    attempts: u32,
}

async fn execute(flows: &Arc<Flows>, run: &Run, finished: Finished, mut cancel: watch::Receiver<bool>) -> RunResult {
    let tracer = flows.invoker.telemetry.tracer(&run.tenant);
    let parent = telemetry::extract_parent(run.traceparent.as_deref());
    let mut flow_span = tracer.as_ref().map(|tracer| {
        tracer
            .span_builder(format!("{}{}", semconv::FLOW_SPAN_PREFIX, run.flow.name()))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new(semconv::SFAAS_FLOW_NAME, run.flow.name().to_string()),
                KeyValue::new(semconv::SFAAS_FLOW_RUN_ID, run.run_id.clone()),
            ])
            .start_with_context(tracer, &parent)
    });
    let flow_context = flow_span.as_ref().map(|span| span.span_context().clone());

    let nodes = &run.flow.nodes;
    let mut states: Vec<NodeState> = vec![NodeState::Pending; nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        match finished.get(&node.id) {
            Some(Some(output)) => {
                store_output(flows, run, node, output.clone()).ok();
                states[i] = NodeState::Done(output.clone());
            }
            Some(None) => states[i] = NodeState::Skipped,
            None => {}
        }
    }
    // Which failed node a running catch node stands in for.
    let mut catching: HashMap<usize, usize> = HashMap::new();
    let mut tasks: JoinSet<NodeResult> = JoinSet::new();
    let mut failure: Option<String> = None;
    let mut cancelled = false;
    let mut ready = Ready::new(nodes, |i| matches!(states[i], NodeState::Done(_) | NodeState::Skipped));

    loop {
        while let Some(i) = ready.pop() {
            let node = &nodes[i];
            if !matches!(states[i], NodeState::Pending) {
                continue;
            }
            let live: Vec<usize> =
                node.needs.iter().copied().filter(|&n| matches!(states[n], NodeState::Done(_))).collect();
            if !node.needs.is_empty() && live.is_empty() {
                skip(flows, run, i, &mut states).await;
                ready.resolve(nodes, i);
                continue;
            }
            let input = node_input(run, node, &live, &states);
            if let Some(condition) = &node.when {
                let value = as_json(&input);
                if !condition.eval(&value) {
                    skip(flows, run, i, &mut states).await;
                    ready.resolve(nodes, i);
                    continue;
                }
            }
            states[i] = NodeState::Running;
            launch(flows, run, i, input, flow_context.clone(), &mut tasks).await;
        }
        if tasks.is_empty() {
            break;
        }
        let joined = tokio::select! {
            joined = tasks.join_next() => joined,
            _ = cancel.wait_for(|stop| *stop) => {
                cancelled = true;
                tasks.abort_all();
                break;
            }
        };
        let Some(Ok(NodeResult { index, result, attempts })) = joined else { continue };
        let node = &nodes[index];
        // Outputs live in the run's job: one its tenant's state quota cannot hold fails its
        // node, rather than staying in memory beside the store, uncounted.
        let result = result.and_then(|output| store_output(flows, run, node, output.clone()).map(|()| output));
        match result {
            Ok(output) => {
                journal_node(flows, run, node, "succeeded", attempts, Some(&output), None).await;
                states[index] = NodeState::Done(output.clone());
                ready.resolve(nodes, index);
                if let Some(caught) = catching.remove(&index) {
                    states[caught] = NodeState::Done(output);
                    ready.resolve(nodes, caught);
                }
            }
            Err(message) => {
                journal_node(flows, run, node, "failed", attempts, None, Some(message.clone())).await;
                states[index] = NodeState::Failed;
                match node.catch {
                    Some(catch) if matches!(states[catch], NodeState::Pending) => {
                        let input = serde_json::json!({
                            "error": message,
                            "node": node.id,
                        });
                        states[catch] = NodeState::Running;
                        catching.insert(catch, index);
                        let input = Bytes::from(serde_json::to_vec(&input).expect("json"));
                        launch(flows, run, catch, input, flow_context.clone(), &mut tasks).await;
                    }
                    _ => {
                        failure = Some(format!("node {}: {message}", node.id));
                        tasks.abort_all();
                        break;
                    }
                }
            }
        }
    }
    if cancelled || failure.is_some() {
        for (i, state) in states.iter().enumerate() {
            if matches!(state, NodeState::Running) {
                let reason = if cancelled { "run cancelled" } else { "run failed elsewhere" };
                journal_node(flows, run, &nodes[i], "cancelled", 0, None, Some(reason.to_string())).await;
            }
        }
    }

    let (status, output, error) = if cancelled {
        (RunStatus::Cancelled, None, Some("cancelled".to_string()))
    } else if let Some(failure) = failure {
        (RunStatus::Failed, None, Some(failure))
    } else {
        (RunStatus::Succeeded, Some(flow_output(&run.flow, &states)), None)
    };
    let state_byte_seconds = flows.invoker.state.deregister(&run.tenant, &run.run_id).unwrap_or_default();
    flows
        .journal
        .finish_run(RunEnd {
            tenant: run.tenant.clone(),
            run_id: run.run_id.clone(),
            status: status.as_str(),
            output: output.clone(),
            error: error.clone(),
            state_byte_seconds: state_byte_seconds.to_decimal_string(),
        })
        .await;
    if let Some(span) = &mut flow_span {
        span.set_attribute(KeyValue::new(semconv::SFAAS_STATE_BYTE_SECONDS, state_byte_seconds.to_decimal_string()));
        span.set_attribute(KeyValue::new(semconv::SFAAS_FLOW_STATUS, status.as_str()));
        if status != RunStatus::Succeeded {
            span.set_status(Status::error(error.clone().unwrap_or_default()));
        }
        span.end();
    }
    RunResult { run_id: run.run_id.clone(), status, output, error, state_byte_seconds }
}

async fn skip(flows: &Arc<Flows>, run: &Run, index: usize, states: &mut [NodeState]) {
    states[index] = NodeState::Skipped;
    journal_node(flows, run, &run.flow.nodes[index], "skipped", 0, None, None).await;
}

async fn launch(
    flows: &Arc<Flows>,
    run: &Run,
    index: usize,
    input: Bytes,
    parent: Option<SpanContext>,
    tasks: &mut JoinSet<NodeResult>,
) {
    let node = &run.flow.nodes[index];
    flows
        .journal
        .record(Entry::NodeStarted { tenant: run.tenant.clone(), run_id: run.run_id.clone(), node: node.id.clone() })
        .await;
    let context = NodeContext {
        flows: flows.clone(),
        tenant: run.tenant.clone(),
        run_id: run.run_id.clone(),
        flow: run.flow.clone(),
        index,
        depth: run.depth,
    };
    tasks.spawn(async move {
        let (result, attempts) = run_node(&context, input, parent).await;
        NodeResult { index, result, attempts }
    });
}

/// The input of a node from its finished needs.
fn node_input(run: &Run, node: &Node, live: &[usize], states: &[NodeState]) -> Bytes {
    let output = |i: usize| match &states[i] {
        NodeState::Done(bytes) => bytes.clone(),
        _ => Bytes::new(),
    };
    match (node.needs.len(), live) {
        (0, _) => run.input.clone(),
        (1, [single]) => output(*single),
        _ => {
            let object: serde_json::Map<String, Value> =
                live.iter().map(|&i| (run.flow.nodes[i].id.clone(), as_json(&output(i)))).collect();
            Bytes::from(serde_json::to_vec(&object).expect("json"))
        }
    }
}

fn flow_output(flow: &Flow, states: &[NodeState]) -> Bytes {
    let output = |i: usize| match &states[i] {
        NodeState::Done(bytes) => Some(bytes.clone()),
        _ => None,
    };
    match &flow.output {
        FlowOutput::Node(i) => output(*i).unwrap_or_else(|| Bytes::from_static(b"null")),
        FlowOutput::Sinks(sinks) => {
            let object: serde_json::Map<String, Value> =
                sinks.iter().filter_map(|&i| Some((flow.nodes[i].id.clone(), as_json(&output(i)?)))).collect();
            Bytes::from(serde_json::to_vec(&object).expect("json"))
        }
    }
}

/// Bytes as JSON: parsed when they are JSON, else a string.
pub fn as_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// Puts a node's output in the run's job, which holds it for its dependents (the run keeps the
/// same bytes): an output over the tenant's state quota or the store's budget is an error.
fn store_output(flows: &Flows, run: &Run, node: &Node, output: Bytes) -> Result<(), String> {
    let key = ObjectKey::new(Some(&run.run_id), OUTPUT_BUCKET, &node.id).map_err(|e| e.to_string())?;
    flows
        .invoker
        .state
        .put(&run.tenant, key, output, PutOptions::default())
        .map_err(|e| format!("output not stored: {e}"))
}

async fn journal_node(
    flows: &Flows,
    run: &Run,
    node: &Node,
    state: &'static str,
    attempts: u32,
    output: Option<&Bytes>,
    error: Option<String>,
) {
    let inline = output.filter(|o| o.len() <= INLINE_OUTPUT_BYTES).cloned();
    flows
        .journal
        .record(Entry::NodeFinished(NodeRecord {
            tenant: run.tenant.clone(),
            run_id: run.run_id.clone(),
            node: node.id.clone(),
            state,
            attempts,
            output: inline,
            output_ref: output.map(|_| format!("{OUTPUT_BUCKET}/{}", node.id)),
            output_bytes: output.map(|o| o.len() as u64),
            error,
        }))
        .await;
}

async fn post_callback(outbound: &Outbound, url: &str, result: &RunResult) {
    let client = match outbound.to(url) {
        Ok(client) => client,
        Err(error) => return tracing::warn!(url, run_id = %result.run_id, %error, "flow callback not sent"),
    };
    let body = result.output.clone().unwrap_or_else(|| Bytes::from(result.error.clone().unwrap_or_default()));
    for attempt in 0..3u32 {
        let request = client
            .post(url)
            .timeout(Duration::from_secs(10))
            .header(semconv::HEADER_RUN_ID, &result.run_id)
            .header(semconv::HEADER_FLOW_STATUS, result.status.as_str())
            .body(body.clone());
        match request.send().await {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => {
                tracing::warn!(url, run_id = %result.run_id, status = %response.status(), "flow callback refused")
            }
            Err(error) => tracing::warn!(url, run_id = %result.run_id, %error, "flow callback failed"),
        }
        tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempt))).await;
    }
}
