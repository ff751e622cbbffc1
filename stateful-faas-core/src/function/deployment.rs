//! The OpenFaaS `FunctionDeployment` JSON and its resolution into a validated [`FunctionSpec`].
//!
//! OpenFaaS fields keep their meaning: `envProcess` is the watchdog's `fprocess` (the command of
//! an `exec` function, or the server command of a managed `http` function), `envVars` are the
//! function's environment, `limits.memory` is its memory limit, `exec_timeout` / `max_inflight`
//! in `envVars` and the `com.openfaas.scale.*` labels are honoured as the watchdog and the
//! OpenFaaS autoscaler read them. stateful-faas adds `kind`, `builtin`, `upstream` and `workdir`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tenant::{NameError, validate_name};

/// The deploy request body of `POST/PUT /system/functions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionDeployment {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_process: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<FunctionResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<FunctionResources>,
    /// `exec` (default when `envProcess` is set), `http` or `builtin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<FunctionKind>,
    /// Name of the Rust function of a `builtin` function.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    /// URL of an external upstream of an `http` function (for example behind OpenFaaS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Working directory of process functions (default: the gateway's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

/// Resource limits or requests, as strings in Kubernetes quantity notation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionResources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
}

/// The three kinds of function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FunctionKind {
    Exec,
    Http,
    Builtin,
}

impl FunctionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FunctionKind::Exec => "exec",
            FunctionKind::Http => "http",
            FunctionKind::Builtin => "builtin",
        }
    }
}

/// What a function runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// One process per request: `sh -c COMMAND`.
    Exec { command: String },
    /// A long-running server the core starts, with its port in `PORT`.
    Managed { command: String },
    /// An HTTP server the core does not manage.
    Upstream { url: String },
    /// A Rust function compiled into the binary.
    Builtin { name: String },
}

/// A validated function definition.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSpec {
    pub name: String,
    pub kind: FunctionKind,
    pub target: Target,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub limits: Limits,
}

/// Limits enforced on every invocation of a function.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub timeout: Duration,
    pub max_inflight: usize,
    /// Memory limit of process functions (their cgroup's; RLIMIT_AS with the sandbox off), in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit of process functions, in thousandths of a CPU (`limits.cpu`: `500m`, `2`).
    pub cpu_millis: Option<u64>,
    pub min_instances: usize,
    pub max_instances: usize,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_inflight: 64,
            memory_bytes: None,
            cpu_millis: None,
            min_instances: 0,
            max_instances: 4,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

pub const LABEL_SCALE_MIN: &str = "com.openfaas.scale.min";
pub const LABEL_SCALE_MAX: &str = "com.openfaas.scale.max";
pub const LABEL_SCALE_ZERO_DURATION: &str = "com.openfaas.scale.zero-duration";
pub const ENV_EXEC_TIMEOUT: &str = "exec_timeout";
pub const ENV_MAX_INFLIGHT: &str = "max_inflight";

/// Why a deployment was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DeploymentError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("function {0:?}: {1}")]
    Invalid(String, String),
}

impl FunctionDeployment {
    /// Validates the deployment and resolves it into a spec.
    pub fn resolve(&self) -> Result<FunctionSpec, DeploymentError> {
        validate_name("function", &self.service)?;
        let invalid = |message: String| DeploymentError::Invalid(self.service.clone(), message);
        let kind = match self.kind {
            Some(kind) => kind,
            None if self.builtin.is_some() => FunctionKind::Builtin,
            None if self.upstream.is_some() => FunctionKind::Http,
            None if self.env_process.is_some() => FunctionKind::Exec,
            None => return Err(invalid("set `kind` (exec, http or builtin), or `envProcess`".into())),
        };
        fn non_empty(value: &Option<String>) -> Option<&str> {
            value.as_deref().filter(|v| !v.trim().is_empty())
        }
        let target = match kind {
            FunctionKind::Exec => Target::Exec {
                command: non_empty(&self.env_process)
                    .ok_or_else(|| invalid("an exec function needs `envProcess` (the command)".into()))?
                    .to_string(),
            },
            FunctionKind::Http => match (non_empty(&self.upstream), non_empty(&self.env_process)) {
                (Some(url), None) => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(invalid(format!("upstream {url:?} is not an http:// URL")));
                    }
                    Target::Upstream { url: url.trim_end_matches('/').to_string() }
                }
                (None, Some(command)) => Target::Managed { command: command.to_string() },
                _ => {
                    return Err(invalid(
                        "an http function needs exactly one of `upstream` (URL) or `envProcess` (server command)"
                            .into(),
                    ));
                }
            },
            FunctionKind::Builtin => {
                let name = non_empty(&self.builtin)
                    .ok_or_else(|| invalid("a builtin function needs `builtin` (its name)".into()))?;
                Target::Builtin { name: name.to_string() }
            }
        };
        let mut limits = Limits::default();
        if let Some(value) = self.env_vars.get(ENV_EXEC_TIMEOUT) {
            limits.timeout = parse_duration(value).map_err(|e| invalid(format!("{ENV_EXEC_TIMEOUT}: {e}")))?;
            in_bounds(ENV_EXEC_TIMEOUT, limits.timeout, Duration::from_millis(1), MAX_TIMEOUT).map_err(invalid)?;
        }
        if let Some(value) = self.env_vars.get(ENV_MAX_INFLIGHT) {
            limits.max_inflight = parse_count(ENV_MAX_INFLIGHT, value).map_err(invalid)?;
            in_bounds(ENV_MAX_INFLIGHT, limits.max_inflight, 1, MAX_INFLIGHT).map_err(invalid)?;
        }
        if let Some(memory) = self.limits.as_ref().and_then(|l| l.memory.as_deref()) {
            let bytes = parse_memory(memory).map_err(|e| invalid(format!("limits.memory: {e}")))?;
            in_bounds("limits.memory", bytes, MIN_MEMORY_BYTES, MAX_MEMORY_BYTES).map_err(invalid)?;
            limits.memory_bytes = Some(bytes);
        }
        if let Some(cpu) = self.limits.as_ref().and_then(|l| l.cpu.as_deref()) {
            let millis = parse_cpu(cpu).map_err(|e| invalid(format!("limits.cpu: {e}")))?;
            in_bounds("limits.cpu", millis, MIN_CPU_MILLIS, MAX_CPU_MILLIS).map_err(invalid)?;
            limits.cpu_millis = Some(millis);
        }
        if let Some(value) = self.labels.get(LABEL_SCALE_MIN) {
            limits.min_instances = parse_count(LABEL_SCALE_MIN, value).map_err(invalid)?;
        }
        if let Some(value) = self.labels.get(LABEL_SCALE_MAX) {
            limits.max_instances = parse_count(LABEL_SCALE_MAX, value).map_err(invalid)?;
            in_bounds(LABEL_SCALE_MAX, limits.max_instances, 1, MAX_INSTANCES).map_err(invalid)?;
        }
        if let Some(value) = self.labels.get(LABEL_SCALE_ZERO_DURATION) {
            limits.idle_timeout =
                parse_duration(value).map_err(|e| invalid(format!("{LABEL_SCALE_ZERO_DURATION}: {e}")))?;
            in_bounds(LABEL_SCALE_ZERO_DURATION, limits.idle_timeout, Duration::ZERO, MAX_IDLE).map_err(invalid)?;
        }
        if limits.max_instances == 0 || limits.min_instances > limits.max_instances {
            return Err(invalid(format!(
                "scale limits min={} max={} are inconsistent (need 1 <= max and min <= max)",
                limits.min_instances, limits.max_instances
            )));
        }
        Ok(FunctionSpec {
            name: self.service.clone(),
            kind,
            target,
            env: self.env_vars.clone(),
            workdir: self.workdir.as_ref().map(PathBuf::from),
            limits,
        })
    }
}

/// Bounds of the limits a deployment may set (checked at deploy, and again when a stored
/// deployment loads).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
pub const MAX_INFLIGHT: usize = 10_000;
pub const MAX_INSTANCES: usize = 100;
pub const MAX_IDLE: Duration = Duration::from_secs(30 * 24 * 3600);
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// `limits.cpu` bounds: a hundredth of a CPU to 256 CPUs.
pub const MIN_CPU_MILLIS: u64 = 10;
pub const MAX_CPU_MILLIS: u64 = 256_000;

fn in_bounds<T: PartialOrd + std::fmt::Debug>(what: &str, value: T, min: T, max: T) -> Result<(), String> {
    if value < min || value > max {
        return Err(format!("{what} is {value:?}; it must be between {min:?} and {max:?}"));
    }
    Ok(())
}

fn parse_count(what: &str, value: &str) -> Result<usize, String> {
    value.trim().parse().map_err(|_| format!("{what} {value:?} is not a whole number"))
}

/// Parses Go-style durations as OpenFaaS writes them: `500ms`, `10s`, `1m30s`, `2h`; a bare
/// number is seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let text = value.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().map_err(|_| format!("bad duration {value:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit_seconds = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("bad duration unit {other:?} in {value:?} (use ms, s, m or h)")),
        };
        rest = &rest[unit_len..];
        let part = Duration::try_from_secs_f64(number * unit_seconds)
            .map_err(|_| format!("duration {value:?} is too long"))?;
        total = total.checked_add(part).ok_or_else(|| format!("duration {value:?} is too long"))?;
    }
    Ok(total)
}

/// Parses a Kubernetes memory quantity (`128Mi`, `1Gi`, `500M`, `1048576`) into bytes.
/// A CPU quantity as Kubernetes writes it (`250m`, `1`, `1.5`), in thousandths of a CPU.
pub fn parse_cpu(value: &str) -> Result<u64, String> {
    let bad = || format!("bad CPU quantity {value:?} (use 250m, 1 or 1.5)");
    let text = value.trim();
    if let Some(millis) = text.strip_suffix('m') {
        return millis.parse().map_err(|_| bad());
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let fraction: u64 = format!("{fraction:0<3}").parse().map_err(|_| bad())?;
    whole.checked_mul(1000).and_then(|w| w.checked_add(fraction)).ok_or_else(bad)
}

pub fn parse_memory(value: &str) -> Result<u64, String> {
    let text = value.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let number: u64 = text[..split].parse().map_err(|_| format!("bad memory quantity {value:?}"))?;
    let multiplier: u64 = match &text[split..] {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000 * 1000,
        "G" => 1000 * 1000 * 1000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => return Err(format!("bad memory unit {other:?} in {value:?} (use Ki, Mi, Gi, k, M or G)")),
    };
    number.checked_mul(multiplier).ok_or_else(|| format!("memory quantity {value:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_parse_like_kubernetes() {
        assert_eq!(parse_cpu("250m"), Ok(250));
        assert_eq!(parse_cpu("1"), Ok(1000));
        assert_eq!(parse_cpu("1.5"), Ok(1500));
        assert_eq!(parse_cpu("0.05"), Ok(50));
        for bad in ["", "m", "1.2345", "-1", "1e3", "two", "18446744073709551615"] {
            assert!(parse_cpu(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn memory_parses_kubernetes_quantities() {
        assert_eq!(parse_memory("128Mi").unwrap(), 128 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_memory("4096").unwrap(), 4096);
        assert!(parse_memory("12Q").is_err());
    }

    #[test]
    fn resolve_infers_kind_and_reads_openfaas_conventions() {
        let deployment: FunctionDeployment = serde_json::from_value(serde_json::json!({
            "service": "wc",
            "envProcess": "wc -c",
            "envVars": {"exec_timeout": "2s", "max_inflight": "3"},
            "limits": {"memory": "64Mi"},
        }))
        .unwrap();
        let spec = deployment.resolve().unwrap();
        assert_eq!(spec.kind, FunctionKind::Exec);
        assert_eq!(spec.target, Target::Exec { command: "wc -c".into() });
        assert_eq!(spec.limits.timeout, Duration::from_secs(2));
        assert_eq!(spec.limits.max_inflight, 3);
        assert_eq!(spec.limits.memory_bytes, Some(64 << 20));
    }

    #[test]
    fn resolve_rejects_incomplete_deployments_with_reasons() {
        let missing = FunctionDeployment { service: "x".into(), ..Default::default() };
        assert!(missing.resolve().unwrap_err().to_string().contains("set `kind`"));
        let bad_name = FunctionDeployment { service: "Bad_Name".into(), ..Default::default() };
        assert!(matches!(bad_name.resolve(), Err(DeploymentError::Name(_))));
        let both = FunctionDeployment {
            service: "x".into(),
            kind: Some(FunctionKind::Http),
            upstream: Some("http://a".into()),
            env_process: Some("srv".into()),
            ..Default::default()
        };
        assert!(both.resolve().unwrap_err().to_string().contains("exactly one"));
    }
}
