//! Flow definitions (YAML or JSON) and their validation into a runnable graph.
//!
//! ```yaml
//! name: etl
//! nodes:
//!   extract:   {function: parse}
//!   clean:     {function: validate, needs: [extract], when: "$.count > 0"}
//!   enrich:    {foreach: "$.records", function: enrich, concurrency: 4, needs: [clean]}
//!   load:      {function: load, needs: [enrich], retry: {attempts: 3, initial_interval: 200ms}}
//!   report:    {flow: summary, needs: [load], timeout: 30s, catch: fallback}
//!   fallback:  {function: report-error}
//! output: report            # default: the only sink, or an object keyed by all sinks
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::expr::{Condition, Path};
use crate::function::deployment::{parse_duration, parse_memory};
use crate::tenant::{MAX_NAME_LEN, validate_name};

mod graph;

use graph::{find_cycle, unreachable};
pub use graph::{render_dot, render_text, topological_order};

/// A flow as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowDefinition {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub nodes: BTreeMap<String, NodeDefinition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// How `POST /stream/{flow}` cuts arriving records into micro-batches, one run each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamDefinition>,
}

/// Micro-batching of a streamed flow, as written (sizes as memory quantities: `1Mi`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDefinition {
    /// A batch is cut at this many records …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_records: Option<usize>,
    /// … or this many bytes …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<String>,
    /// … or this long after its first record arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<String>,
    /// Runs of the flow in flight at once; further batches wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runs: Option<usize>,
    /// Bytes accepted but not yet in a run; beyond it, senders get 429 (backpressure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_bytes: Option<String>,
}

/// Micro-batching of a streamed flow, resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batching {
    pub max_records: usize,
    pub max_bytes: usize,
    pub max_delay: Duration,
    pub max_runs: usize,
    pub max_pending_bytes: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_records: 1000,
            max_bytes: 1 << 20,
            max_delay: Duration::from_secs(1),
            max_runs: 2,
            max_pending_bytes: 16 << 20,
        }
    }
}

impl StreamDefinition {
    fn resolve(&self, errors: &mut Vec<String>) -> Batching {
        let mut batching = Batching::default();
        let mut fail = |message: String| errors.push(format!("stream: {message}"));
        let size = |text: &Option<String>, default: usize, fail: &mut dyn FnMut(String)| match text {
            None => default,
            Some(text) => match parse_memory(text) {
                Ok(bytes) if (1..=1 << 30).contains(&bytes) => bytes as usize,
                Ok(_) => {
                    fail(format!("{text:?} must be between 1 byte and 1Gi"));
                    default
                }
                Err(e) => {
                    fail(e);
                    default
                }
            },
        };
        batching.max_bytes = size(&self.max_bytes, batching.max_bytes, &mut fail);
        batching.max_pending_bytes = size(&self.max_pending_bytes, batching.max_pending_bytes, &mut fail);
        if batching.max_pending_bytes < batching.max_bytes {
            fail("max_pending_bytes must be at least max_bytes".into());
        }
        if let Some(records) = self.max_records {
            if records == 0 {
                fail("max_records must be at least 1".into());
            }
            batching.max_records = records.max(1);
        }
        if let Some(runs) = self.max_runs {
            if runs == 0 || runs > MAX_CONCURRENCY {
                fail(format!("max_runs must be 1 to {MAX_CONCURRENCY}"));
            }
            batching.max_runs = runs.clamp(1, MAX_CONCURRENCY);
        }
        if let Some(text) = &self.max_delay {
            match parse_duration(text) {
                Ok(delay) if delay > Duration::ZERO && delay <= Duration::from_secs(3600) => batching.max_delay = delay,
                Ok(_) => fail("max_delay must be more than 0 and at most 1h".into()),
                Err(e) => fail(format!("max_delay: {e}")),
            }
        }
        batching
    }
}

/// One node as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeDefinition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// Runs another flow of the tenant as this node (a sub-flow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// A path to an array in the input: the node runs once per element (fan-out), and its output
    /// is the array of their outputs (fan-in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreach: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryDefinition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// A node that runs instead when this one fails; its output stands in for this node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch: Option<String>,
}

/// Retry policy as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryDefinition {
    /// Attempts in all, the first included.
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<String>,
}

/// What a node runs.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeTarget {
    Function(String),
    Flow(String),
}

/// Retry policy, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub attempts: u32,
    pub initial_interval: Duration,
    pub backoff_rate: f64,
    pub max_delay: Duration,
}

impl Retry {
    /// The pause before attempt `attempt + 1` (attempts count from 1).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let factor = self.backoff_rate.powi(attempt.saturating_sub(1) as i32);
        self.initial_interval.mul_f64(factor).min(self.max_delay)
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 1,
            initial_interval: Duration::from_millis(100),
            backoff_rate: 2.0,
            max_delay: Duration::from_secs(10),
        }
    }
}

/// A validated node.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub target: NodeTarget,
    pub needs: Vec<usize>,
    pub when: Option<Condition>,
    pub foreach: Option<Path>,
    pub concurrency: usize,
    pub retry: Retry,
    pub timeout: Option<Duration>,
    pub catch: Option<usize>,
    /// Named by another node's `catch`: runs only when that node fails.
    pub is_catch: bool,
}

/// What the flow answers.
#[derive(Debug, Clone, PartialEq)]
pub enum FlowOutput {
    Node(usize),
    /// Several sinks: a JSON object keyed by their ids.
    Sinks(Vec<usize>),
}

/// A validated flow, ready to run.
#[derive(Debug, Clone)]
pub struct Flow {
    pub definition: FlowDefinition,
    pub nodes: Vec<Node>,
    pub output: FlowOutput,
    pub batching: Batching,
}

impl Flow {
    pub fn name(&self) -> &str {
        &self.definition.name
    }

    pub fn index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|node| node.id == id)
    }
}

/// Why a flow was refused: every problem found, each located.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct FlowErrors(pub Vec<String>);

impl fmt::Display for FlowErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid flow: {}", self.0.join("; "))
    }
}

/// Most fan-out concurrency a node may ask for.
pub const MAX_CONCURRENCY: usize = 256;
/// Most nodes in one flow: checked before any graph algorithm runs, so that a hostile
/// definition's size bounds the work of validating, drawing and running it.
pub const MAX_NODES: usize = 1000;
/// Most `needs` of one node.
pub const MAX_NEEDS: usize = 256;
/// Longest `description`, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 4096;
/// Longest `when` or `foreach` expression, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 1024;
/// Longest name, node id, duration or size, in bytes (a DNS label's length).
pub const MAX_FIELD_BYTES: usize = MAX_NAME_LEN;

/// Longest parse error answered: the parser quotes what it did not expect, however long.
const MAX_PARSE_ERROR_BYTES: usize = 512;

/// Parses YAML (JSON is YAML too).
pub fn parse(text: &str) -> Result<FlowDefinition, FlowErrors> {
    serde_norway::from_str(text).map_err(|e| {
        let mut message = e.to_string();
        if message.len() > MAX_PARSE_ERROR_BYTES {
            let end = (0..=MAX_PARSE_ERROR_BYTES).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
            message.truncate(end);
            message.push('…');
        }
        FlowErrors(vec![message])
    })
}

impl FlowDefinition {
    /// Validates the flow; `function_exists` and `flow_exists` answer for the tenant.
    pub fn validate(
        &self,
        function_exists: impl Fn(&str) -> bool,
        flow_exists: impl Fn(&str) -> bool,
    ) -> Result<Flow, FlowErrors> {
        self.check_size()?;
        let mut errors = Vec::new();
        if let Err(e) = validate_name("flow", &self.name) {
            errors.push(e.to_string());
        }
        if self.nodes.is_empty() {
            errors.push("a flow needs at least one node".into());
        }
        let ids: Vec<&String> = self.nodes.keys().collect();
        let index_of: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
        let catch_targets: BTreeSet<&str> = self.nodes.values().filter_map(|n| n.catch.as_deref()).collect();
        let mut nodes = Vec::new();
        for (id, node) in &self.nodes {
            let mut fail = |message: String| errors.push(format!("node {id}: {message}"));
            if id.is_empty() || id.len() > 63 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                fail("ids use letters, digits, '-' and '_' (at most 63)".into());
            }
            let target = match (&node.function, &node.flow) {
                (Some(function), None) => {
                    if !function_exists(function) {
                        fail(format!("function {function:?} is not deployed"));
                    }
                    NodeTarget::Function(function.clone())
                }
                (None, Some(flow)) => {
                    if flow == &self.name {
                        fail("a flow cannot run itself as a sub-flow".into());
                    } else if !flow_exists(flow) {
                        fail(format!("sub-flow {flow:?} is not deployed"));
                    }
                    NodeTarget::Flow(flow.clone())
                }
                _ => {
                    fail("set exactly one of `function` or `flow`".into());
                    NodeTarget::Function(String::new())
                }
            };
            let mut needs = Vec::new();
            for need in &node.needs {
                match index_of.get(need.as_str()) {
                    Some(_) if need == id => fail("needs itself".into()),
                    Some(&i) => needs.push(i),
                    None => fail(format!("needs unknown node {need:?}")),
                }
            }
            let when = node
                .when
                .as_deref()
                .and_then(|text| Condition::parse(text).map_err(|e| fail(format!("when {text:?}: {e}"))).ok());
            let foreach = node
                .foreach
                .as_deref()
                .and_then(|text| Path::parse(text).map_err(|e| fail(format!("foreach {text:?}: {e}"))).ok());
            let concurrency = node.concurrency.unwrap_or(8);
            if node.concurrency.is_some() && node.foreach.is_none() {
                fail("`concurrency` applies to `foreach` nodes only".into());
            }
            if concurrency == 0 || concurrency > MAX_CONCURRENCY {
                fail(format!("concurrency must be 1 to {MAX_CONCURRENCY}"));
            }
            let retry = match &node.retry {
                None => Retry::default(),
                Some(spec) => {
                    let mut retry = Retry { attempts: spec.attempts, ..Retry::default() };
                    if spec.attempts == 0 || spec.attempts > 100 {
                        fail("retry.attempts must be 1 to 100".into());
                    }
                    if let Some(text) = &spec.initial_interval {
                        match parse_duration(text) {
                            Ok(d) => retry.initial_interval = d,
                            Err(e) => fail(format!("retry.initial_interval: {e}")),
                        }
                    }
                    if let Some(text) = &spec.max_delay {
                        match parse_duration(text) {
                            Ok(d) => retry.max_delay = d,
                            Err(e) => fail(format!("retry.max_delay: {e}")),
                        }
                    }
                    if let Some(rate) = spec.backoff_rate {
                        if !(1.0..=10.0).contains(&rate) {
                            fail("retry.backoff_rate must be between 1 and 10".into());
                        }
                        retry.backoff_rate = rate;
                    }
                    retry
                }
            };
            let timeout = node
                .timeout
                .as_deref()
                .and_then(|text| parse_duration(text).map_err(|e| fail(format!("timeout: {e}"))).ok());
            let catch = node.catch.as_deref().and_then(|target| match index_of.get(target) {
                Some(_) if target == id => {
                    fail("cannot catch into itself".into());
                    None
                }
                Some(&i) => Some(i),
                None => {
                    fail(format!("catch names unknown node {target:?}"));
                    None
                }
            });
            let is_catch = catch_targets.contains(id.as_str());
            if is_catch && !node.needs.is_empty() {
                fail("a catch node receives the failure as its input and cannot have `needs`".into());
            }
            nodes.push(Node {
                id: id.clone(),
                target,
                needs,
                when,
                foreach,
                concurrency,
                retry,
                timeout,
                catch,
                is_catch,
            });
        }
        if let Some(cycle) = find_cycle(&nodes) {
            errors.push(format!("cycle: {}", cycle.join(" -> ")));
        }
        let output = match &self.output {
            Some(id) => match index_of.get(id.as_str()) {
                Some(&i) => FlowOutput::Node(i),
                None => {
                    errors.push(format!("output names unknown node {id:?}"));
                    FlowOutput::Sinks(vec![])
                }
            },
            None => {
                let mut needed = vec![false; nodes.len()];
                for &need in nodes.iter().flat_map(|n| &n.needs) {
                    needed[need] = true;
                }
                // A catch node that nothing needs is no sink: it runs only instead of another.
                let sinks: Vec<usize> = (0..nodes.len()).filter(|&i| !needed[i] && !nodes[i].is_catch).collect();
                match sinks.as_slice() {
                    [single] => FlowOutput::Node(*single),
                    _ => FlowOutput::Sinks(sinks),
                }
            }
        };
        if errors.is_empty() {
            for unreachable in unreachable(&nodes, &output) {
                errors.push(format!(
                    "node {} is unreachable: it feeds neither the output nor a catch",
                    nodes[unreachable].id
                ));
            }
        }
        let batching = self.stream.as_ref().map(|stream| stream.resolve(&mut errors)).unwrap_or_default();
        if !errors.is_empty() {
            return Err(FlowErrors(errors));
        }
        Ok(Flow { definition: self.clone(), nodes, output, batching })
    }

    /// Refuses a definition larger than the limits, before anything walks its graph or
    /// echoes its text in an error.
    fn check_size(&self) -> Result<(), FlowErrors> {
        if self.nodes.len() > MAX_NODES {
            return Err(FlowErrors(vec![format!(
                "a flow has at most {MAX_NODES} nodes; this one has {}",
                self.nodes.len()
            )]));
        }
        let mut fields: Vec<(String, Option<&str>, usize)> = vec![
            ("the flow's name".into(), Some(&self.name), MAX_FIELD_BYTES),
            ("description".into(), self.description.as_deref(), MAX_DESCRIPTION_BYTES),
            ("output".into(), self.output.as_deref(), MAX_FIELD_BYTES),
        ];
        if let Some(stream) = &self.stream {
            for (key, text) in [
                ("max_bytes", &stream.max_bytes),
                ("max_delay", &stream.max_delay),
                ("max_pending_bytes", &stream.max_pending_bytes),
            ] {
                fields.push((format!("stream: {key}"), text.as_deref(), MAX_FIELD_BYTES));
            }
        }
        let mut errors = Vec::new();
        for (id, node) in &self.nodes {
            if id.len() > MAX_FIELD_BYTES {
                fields.push((format!("node id {:?}…", preview(id)), Some(id), MAX_FIELD_BYTES));
                continue;
            }
            let retry = node.retry.as_ref();
            for (key, text, limit) in [
                ("function", node.function.as_deref(), MAX_FIELD_BYTES),
                ("flow", node.flow.as_deref(), MAX_FIELD_BYTES),
                ("when", node.when.as_deref(), MAX_EXPRESSION_BYTES),
                ("foreach", node.foreach.as_deref(), MAX_EXPRESSION_BYTES),
                ("timeout", node.timeout.as_deref(), MAX_FIELD_BYTES),
                ("catch", node.catch.as_deref(), MAX_FIELD_BYTES),
                ("retry.initial_interval", retry.and_then(|r| r.initial_interval.as_deref()), MAX_FIELD_BYTES),
                ("retry.max_delay", retry.and_then(|r| r.max_delay.as_deref()), MAX_FIELD_BYTES),
            ] {
                fields.push((format!("node {id}: {key}"), text, limit));
            }
            if node.needs.len() > MAX_NEEDS {
                errors.push(format!("node {id}: at most {MAX_NEEDS} needs; it has {}", node.needs.len()));
            } else if let Some(need) = node.needs.iter().find(|need| need.len() > MAX_FIELD_BYTES) {
                fields.push((format!("node {id}: needs {:?}…", preview(need)), Some(need), MAX_FIELD_BYTES));
            }
        }
        for (place, text, limit) in fields {
            if let Some(text) = text.filter(|text| text.len() > limit) {
                errors.push(format!("{place} is {} bytes; the limit is {limit}", text.len()));
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(FlowErrors(errors)) }
    }
}

/// The start of an over-long text, for an error message.
fn preview(text: &str) -> &str {
    let end = (0..=32.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    &text[..end]
}

#[cfg(test)]
mod tests;
