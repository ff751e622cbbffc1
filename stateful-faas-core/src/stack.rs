//! `stack.yml`: a set of functions deployed together, in the spirit of faas-cli's stack file.
//!
//! ```yaml
//! version: 1.0
//! provider: {name: sfaas, gateway: http://127.0.0.1:8080}
//! functions:
//!   wc:
//!     kind: exec            # or `lang:`; exec | http | builtin
//!     fprocess: wc -c       # exec: the command; http: the server command
//!     namespace: acme
//!     environment: {content_type: text/plain}
//!     labels: {com.openfaas.scale.max: "2"}
//!     limits: {memory: 64Mi, timeout: 5s, max_inflight: 4}
//!   hello:
//!     kind: builtin
//!     handler: echo         # builtin: its name; http: an upstream URL or the server command
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::function::deployment::{ENV_EXEC_TIMEOUT, ENV_MAX_INFLIGHT, FunctionResources};
use crate::function::{FunctionDeployment, FunctionKind};

/// Why a stack file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0}: {1}")]
    Parse(String, String),
    #[error("{file}: function {function}: {message}")]
    Function { file: String, function: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StackFile {
    #[serde(default)]
    #[allow(dead_code)]
    version: Option<serde_norway::Value>,
    #[serde(default)]
    provider: Option<Provider>,
    functions: BTreeMap<String, StackFunction>,
}

#[derive(Debug, Deserialize)]
struct Provider {
    #[serde(default)]
    gateway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StackFunction {
    #[serde(default)]
    kind: Option<FunctionKind>,
    #[serde(default)]
    lang: Option<FunctionKind>,
    #[serde(default)]
    handler: Option<String>,
    #[serde(default)]
    fprocess: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    environment: BTreeMap<String, serde_norway::Value>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    limits: Option<StackLimits>,
    #[serde(default)]
    workdir: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StackLimits {
    #[serde(default)]
    memory: Option<String>,
    #[serde(default)]
    cpu: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    max_inflight: Option<u64>,
    #[serde(default)]
    min_instances: Option<u64>,
    #[serde(default)]
    max_instances: Option<u64>,
    #[serde(default)]
    idle_timeout: Option<String>,
}

/// A parsed stack: the deployments, and the gateway it names, if any.
#[derive(Debug)]
pub struct Stack {
    pub gateway: Option<String>,
    pub functions: Vec<FunctionDeployment>,
}

/// Reads a stack file; relative working directories resolve against the file's folder.
pub fn load(path: &Path) -> Result<Stack, StackError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| StackError::Read(file.clone(), e))?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let base = std::path::absolute(parent).ok();
    parse(&file, &text, base.as_deref())
}

/// Parses stack YAML; `base` is the folder process functions run in unless they say otherwise.
pub fn parse(file: &str, text: &str, base: Option<&Path>) -> Result<Stack, StackError> {
    let stack: StackFile =
        serde_norway::from_str(text).map_err(|e| StackError::Parse(file.to_string(), e.to_string()))?;
    let mut functions = Vec::new();
    for (name, function) in stack.functions {
        let fail = |message: String| StackError::Function { file: file.to_string(), function: name.clone(), message };
        let kind = function.kind.or(function.lang).unwrap_or(FunctionKind::Exec);
        let mut env_vars: BTreeMap<String, String> = function
            .environment
            .into_iter()
            .map(|(key, value)| {
                let text = match value {
                    serde_norway::Value::String(text) => text,
                    other => serde_norway::to_string(&other).unwrap_or_default().trim().to_string(),
                };
                (key, text)
            })
            .collect();
        let mut labels = function.labels;
        let limits = function.limits.unwrap_or_default();
        if let Some(timeout) = limits.timeout {
            env_vars.insert(ENV_EXEC_TIMEOUT.into(), timeout);
        }
        if let Some(max) = limits.max_inflight {
            env_vars.insert(ENV_MAX_INFLIGHT.into(), max.to_string());
        }
        use crate::function::deployment::{LABEL_SCALE_MAX, LABEL_SCALE_MIN, LABEL_SCALE_ZERO_DURATION};
        if let Some(min) = limits.min_instances {
            labels.insert(LABEL_SCALE_MIN.into(), min.to_string());
        }
        if let Some(max) = limits.max_instances {
            labels.insert(LABEL_SCALE_MAX.into(), max.to_string());
        }
        if let Some(idle) = limits.idle_timeout {
            labels.insert(LABEL_SCALE_ZERO_DURATION.into(), idle);
        }
        let command = function.fprocess.or(function.handler.clone().filter(|_| kind != FunctionKind::Builtin));
        let mut deployment = FunctionDeployment {
            service: name.clone(),
            image: function.image,
            namespace: function.namespace,
            env_vars,
            labels,
            annotations: function.annotations,
            limits: (limits.memory.is_some() || limits.cpu.is_some())
                .then_some(FunctionResources { memory: limits.memory, cpu: limits.cpu }),
            kind: Some(kind),
            workdir: function
                .workdir
                .map(|dir| base.map_or_else(|| dir.clone(), |b| b.join(&dir).display().to_string()))
                .or_else(|| base.map(|b| b.display().to_string())),
            ..Default::default()
        };
        match kind {
            FunctionKind::Builtin => deployment.builtin = function.handler,
            FunctionKind::Http => match command {
                Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                    deployment.upstream = Some(url)
                }
                other => deployment.env_process = other,
            },
            FunctionKind::Exec => deployment.env_process = command,
        }
        deployment.resolve().map_err(|e| fail(e.to_string()))?;
        functions.push(deployment);
    }
    Ok(Stack { gateway: stack.provider.and_then(|p| p.gateway), functions })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_files_become_deployments() {
        let text = r#"
version: 1.0
provider: {name: sfaas, gateway: http://127.0.0.1:8080}
functions:
  wc:
    lang: exec
    fprocess: wc -c
    namespace: acme
    environment: {content_type: text/plain, retries: 3}
    limits: {memory: 64Mi, timeout: 5s, max_inflight: 4}
  hello:
    kind: builtin
    handler: echo
  api:
    kind: http
    handler: http://127.0.0.1:9000
    limits: {max_instances: 2}
"#;
        let stack = parse("stack.yml", text, Some(Path::new("/srv"))).unwrap();
        assert_eq!(stack.gateway.as_deref(), Some("http://127.0.0.1:8080"));
        let by_name = |n: &str| stack.functions.iter().find(|f| f.service == n).unwrap();
        let wc = by_name("wc");
        assert_eq!(wc.env_process.as_deref(), Some("wc -c"));
        assert_eq!(wc.env_vars["retries"], "3");
        assert_eq!(wc.env_vars["exec_timeout"], "5s");
        assert_eq!(wc.workdir.as_deref(), Some("/srv"));
        assert_eq!(wc.resolve().unwrap().limits.memory_bytes, Some(64 << 20));
        assert_eq!(by_name("hello").builtin.as_deref(), Some("echo"));
        assert_eq!(by_name("api").upstream.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(by_name("api").resolve().unwrap().limits.max_instances, 2);
    }

    #[test]
    fn stack_errors_name_the_function() {
        let text = "functions:\n  bad:\n    kind: exec\n";
        let error = parse("s.yml", text, None).unwrap_err().to_string();
        assert!(error.contains("s.yml: function bad"), "{error}");
        let unknown = parse("s.yml", "functions:\n  x:\n    kynd: exec\n", None).unwrap_err().to_string();
        assert!(unknown.contains("kynd"), "{unknown}");
    }
}
