//! One node of a run on its own task: its retries and timeout, its fan-out over a `foreach`
//! array, and the call of its function or sub-flow, inside its `node` span.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span, SpanContext, SpanKind, Status, TraceContextExt, Tracer};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::Flows;
use super::definition::{Flow, Node, NodeTarget};
use super::executor::{RunRequest, RunStatus, as_json, start};
use crate::function::Invocation;
use crate::semconv;
use crate::telemetry;
use crate::tenant::TenantId;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A failed attempt: retried when `retriable` and attempts remain.
#[derive(Debug)]
struct Failure {
    message: String,
    retriable: bool,
}

/// What a node's task needs (owned: it runs on its own task).
#[derive(Clone)]
pub(super) struct NodeContext {
    pub(super) flows: Arc<Flows>,
    pub(super) tenant: TenantId,
    pub(super) run_id: String,
    pub(super) flow: Arc<Flow>,
    pub(super) index: usize,
    pub(super) depth: usize,
}

impl NodeContext {
    fn node(&self) -> &Node {
        &self.flow.nodes[self.index]
    }
}

/// Runs one node with its retries, inside its `node` span.
pub(super) async fn run_node(
    context: &NodeContext,
    input: Bytes,
    parent: Option<SpanContext>,
) -> (Result<Bytes, String>, u32) {
    let node = context.node();
    let tracer = context.flows.invoker.telemetry.tracer(&context.tenant);
    let mut span = tracer.as_ref().map(|tracer| {
        let parent = parent
            .map_or_else(opentelemetry::Context::new, |p| opentelemetry::Context::new().with_remote_span_context(p));
        tracer
            .span_builder(format!("{}{}", semconv::NODE_SPAN_PREFIX, node.id))
            .with_kind(SpanKind::Internal)
            .with_attributes([
                KeyValue::new(semconv::SFAAS_FLOW_RUN_ID, context.run_id.clone()),
                KeyValue::new(semconv::SFAAS_FLOW_NODE, node.id.clone()),
                // The DAG's edges, so that a trace alone can be drawn as the DAG.
                KeyValue::new(
                    semconv::SFAAS_FLOW_NEEDS,
                    opentelemetry::Value::Array(
                        node.needs
                            .iter()
                            .map(|&i| opentelemetry::StringValue::from(context.flow.nodes[i].id.clone()))
                            .collect::<Vec<_>>()
                            .into(),
                    ),
                ),
            ])
            .start_with_context(tracer, &parent)
    });
    let traceparent = span.as_ref().map(|span| telemetry::traceparent(span.span_context()));
    let (result, attempts) = match &node.foreach {
        Some(_) => fan_out(context, input, traceparent).await,
        None => with_retries(context, input, None, traceparent).await,
    };
    if let Some(span) = &mut span {
        span.set_attribute(KeyValue::new(semconv::SFAAS_FLOW_ATTEMPT, attempts as i64));
        if let Ok(output) = &result {
            // The node's output, held in the run's state job for the nodes that need it.
            span.set_attribute(KeyValue::new(semconv::SFAAS_STATE_VALUE_BYTES, output.len() as i64));
        }
        if let Err(message) = &result {
            span.set_status(Status::error(message.clone()));
        }
        span.end();
    }
    (result, attempts)
}

/// One call with the node's retry policy; `element` numbers a fan-out element.
async fn with_retries(
    context: &NodeContext,
    input: Bytes,
    element: Option<usize>,
    traceparent: Option<String>,
) -> (Result<Bytes, String>, u32) {
    let node = context.node();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let call_id = match element {
            Some(i) => format!("{}.{}.{i}.{attempt}", context.run_id, node.id),
            None => format!("{}.{}.{attempt}", context.run_id, node.id),
        };
        match call(context, input.clone(), call_id, traceparent.clone()).await {
            Ok(output) => return (Ok(output), attempt),
            Err(failure) if failure.retriable && attempt < node.retry.attempts => {
                tokio::time::sleep(node.retry.delay_after(attempt)).await;
            }
            Err(failure) => return (Err(failure.message), attempt),
        }
    }
}

/// Runs a `foreach` node: once per element, `concurrency` at a time; the output is the array of
/// the elements' outputs, in order.
async fn fan_out(context: &NodeContext, input: Bytes, traceparent: Option<String>) -> (Result<Bytes, String>, u32) {
    let node = context.node();
    let path = node.foreach.as_ref().expect("fan_out runs foreach nodes");
    let value: Value = match serde_json::from_slice(&input) {
        Ok(value) => value,
        Err(error) => return (Err(format!("foreach needs a JSON input: {error}")), 1),
    };
    let Some(items) = path.select(&value).and_then(Value::as_array) else {
        let text = &context.flow.definition.nodes[&node.id].foreach;
        return (Err(format!("foreach {}: the input has no array there", text.as_deref().unwrap_or(""))), 1);
    };
    if items.len() > MAX_FOREACH_ITEMS {
        return (Err(format!("foreach over {} elements: at most {MAX_FOREACH_ITEMS}", items.len())), 1);
    }
    // The outputs together become the node's output, an object of the run's job: no larger
    // than the store's largest value, which they are refused past as they come.
    let budget = context.flows.invoker.state.config().max_value_bytes as usize;
    let permits = Arc::new(Semaphore::new(node.concurrency));
    let mut tasks = JoinSet::new();
    let mut outputs = vec![Bytes::new(); items.len()];
    let (mut held, mut max_attempts) = (0, 1);
    let mut take = |joined: Result<(usize, Result<Bytes, String>, u32), _>| {
        let Ok((i, result, attempts)) = joined else { return Ok(()) };
        max_attempts = max_attempts.max(attempts);
        let output = result.map_err(|message| format!("element {i}: {message}"))?;
        held += output.len();
        if held > budget {
            return Err(format!("the elements' outputs are over {budget} bytes, the largest value"));
        }
        outputs[i] = output;
        Ok(())
    };
    let mut next = items.iter().enumerate();
    loop {
        // Outputs are taken as they come, so that finished ones are counted before more start.
        let joined = match next.len() {
            0 => match tasks.join_next().await {
                Some(joined) => joined,
                None => break,
            },
            _ => match tasks.try_join_next() {
                Some(joined) => joined,
                None => {
                    let (i, item) = next.next().expect("items left");
                    let permit = permits.clone().acquire_owned().await.expect("never closed");
                    let (context, traceparent) = (context.clone(), traceparent.clone());
                    let element = Bytes::from(serde_json::to_vec(item).expect("json"));
                    tasks.spawn(async move {
                        let (result, attempts) = with_retries(&context, element, Some(i), traceparent).await;
                        drop(permit);
                        (i, result, attempts)
                    });
                    continue;
                }
            },
        };
        if let Err(message) = take(joined) {
            tasks.abort_all();
            return (Err(message), max_attempts);
        }
    }
    let outputs: Vec<Value> = outputs.iter().map(|output| as_json(output)).collect();
    (Ok(Bytes::from(serde_json::to_vec(&outputs).expect("json"))), max_attempts)
}

/// Most elements a `foreach` runs over (each is a call, and its output is held to the end).
pub const MAX_FOREACH_ITEMS: usize = 10_000;

/// One call of the node's function or sub-flow, within the node's timeout.
fn call(
    context: &NodeContext,
    input: Bytes,
    call_id: String,
    traceparent: Option<String>,
) -> BoxFuture<Result<Bytes, Failure>> {
    let context = context.clone();
    Box::pin(async move {
        let node = context.node();
        let attempt = async {
            match &node.target {
                NodeTarget::Function(function) => {
                    let invocation = Invocation {
                        headers: vec![
                            ("content-type".into(), "application/octet-stream".into()),
                            (semconv::HEADER_CALL_ID.into(), call_id.clone()),
                        ],
                        call_id,
                        method: "POST".into(),
                        path: "/".into(),
                        query: String::new(),
                        body: input,
                        traceparent,
                        job: Some(context.run_id.clone()),
                    };
                    let outcome = context
                        .flows
                        .invoker
                        .dispatch(&context.tenant, function, invocation, semconv::TRIGGER_OTHER)
                        .await;
                    if outcome.status < 400 {
                        return Ok(outcome.body);
                    }
                    let detail =
                        String::from_utf8_lossy(&outcome.body[..outcome.body.len().min(300)]).trim().to_string();
                    Err(Failure {
                        message: format!("function {function} answered {}: {detail}", outcome.status),
                        retriable: outcome.status == 429 || outcome.status >= 500,
                    })
                }
                NodeTarget::Flow(flow) => {
                    let request = RunRequest {
                        tenant: context.tenant.clone(),
                        flow: flow.clone(),
                        input,
                        callback_url: None,
                        traceparent,
                        parent_run: Some(context.run_id.clone()),
                        depth: context.depth + 1,
                    };
                    let (run_id, done) = start(&context.flows, request)
                        .await
                        .map_err(|e| Failure { message: format!("sub-flow {flow}: {e}"), retriable: false })?;
                    let result = done.await.map_err(|_| Failure {
                        message: format!("sub-flow {flow} run {run_id} was lost"),
                        retriable: false,
                    })?;
                    match result.status {
                        RunStatus::Succeeded => Ok(result.output.unwrap_or_default()),
                        status => Err(Failure {
                            message: format!(
                                "sub-flow {flow} run {run_id} {}: {}",
                                status.as_str(),
                                result.error.unwrap_or_default()
                            ),
                            retriable: false,
                        }),
                    }
                }
            }
        };
        match node.timeout {
            None => attempt.await,
            Some(limit) => tokio::time::timeout(limit, attempt).await.unwrap_or_else(|_| {
                Err(Failure { message: format!("node {} timed out after {limit:?}", node.id), retriable: true })
            }),
        }
    })
}
