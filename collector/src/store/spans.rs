//! Reading spans: everything the Jaeger API, the dashboard's pages and billing ask of them,
//! and nothing else, answered from the blocks (`blocks/queries.rs`). Every reader takes the
//! tenant (billing's metered spans, read for every tenant at once, carry theirs), so no reader
//! can return another tenant's spans.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::{StoreError, TelemetryStore};
use crate::model::{SpanRow, span_kind_name, status_name};

/// A trace search, with jaeger-query's semantics: a trace is found when one of its spans is of
/// `service` and matches every condition (operation; start within `start_ns..=end_ns`; duration
/// within `min_ns..=max_ns`, 0 for no bound; every tag, which may be a span attribute, a
/// synthetic tag (`span.kind`, `otel.status_code`, `error`, `otel.status_description`,
/// `otel.scope.name`, `otel.scope.version`), a resource attribute or an event's field, compared
/// as text).
#[derive(Debug, Clone)]
pub struct TraceSearch {
    pub service: String,
    pub operation: Option<String>,
    pub tags: Vec<(String, String)>,
    pub min_ns: i64,
    pub max_ns: i64,
    pub limit: usize,
    pub start_ns: i64,
    pub end_ns: i64,
}

/// A span that claims to be metered, as billing reads it.
#[derive(Debug, Clone)]
pub struct MeteredSpan {
    pub tenant: String,
    pub trace_id: String,
    pub span_id: String,
    pub name: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub received_ms: i64,
    /// JSON object.
    pub attributes: String,
}

/// Names of metered spans besides invocations (`invoke …`).
pub(super) const METERED_NAMES: [&str; 2] =
    [contract::semconv::SPAN_STATE_USAGE, contract::semconv::SPAN_INSTANCE_USAGE];

impl TelemetryStore {
    /// Every tenant with spans.
    pub async fn span_tenants(&self) -> Result<Vec<String>, StoreError> {
        self.spans.span_tenants().await
    }

    /// A tenant's service names.
    pub async fn services(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        self.spans.services(tenant).await
    }

    /// A tenant's (operation, span kind) pairs of one service.
    pub async fn operations(&self, tenant: &str, service: &str) -> Result<Vec<(String, i64)>, StoreError> {
        self.spans.operations(tenant, service).await
    }

    /// The spans of one trace of a tenant, by start time (empty when it has none): at most
    /// [`MAX_TRACE_SPANS`](super::MAX_TRACE_SPANS), the earliest.
    pub async fn trace(&self, tenant: &str, trace_id: &str) -> Result<Vec<SpanRow>, StoreError> {
        Ok(self.traces(tenant, &[trace_id]).await?.remove(trace_id).unwrap_or_default())
    }

    /// The spans of some traces of one tenant, by trace id, each trace's spans by start time:
    /// at most [`MAX_TRACE_SPANS`](super::MAX_TRACE_SPANS) of each, the earliest.
    pub async fn traces(&self, tenant: &str, trace_ids: &[&str]) -> Result<HashMap<String, Vec<SpanRow>>, StoreError> {
        self.spans.traces(tenant, trace_ids).await
    }

    /// A tenant's spans whose name starts with `prefix`, started in `[since_ns, until_ns)`, that
    /// pass `keep`: the newest `limit`, newest first. What is held while reading is bounded by
    /// `limit`, not by how many spans the tenant has.
    pub async fn spans_named(
        &self,
        tenant: &str,
        prefix: &str,
        window_ns: (i64, i64),
        limit: usize,
        keep: &(dyn Fn(&SpanRow) -> bool + Sync),
    ) -> Result<Vec<SpanRow>, StoreError> {
        self.spans.spans_named(tenant, prefix, window_ns, limit, keep).await
    }

    /// Up to `search.limit` traces of `tenant` matching the search, most recently matched first,
    /// with the start of their latest matching span.
    pub async fn find_traces(&self, tenant: &str, search: &TraceSearch) -> Result<Vec<(String, i64)>, StoreError> {
        let found = self.spans.find_traces(Some(tenant), search).await?;
        Ok(found.into_iter().map(|(start, trace, _)| (trace, start)).collect())
    }

    /// Up to `search.limit` traces of any tenant matching the search (the administrator's
    /// search), most recently matched first: (tenant, trace id, start of its latest matching
    /// span). One pass over every tenant's blocks, newest first.
    pub async fn find_traces_of_every_tenant(
        &self,
        search: &TraceSearch,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        let found = self.spans.find_traces(None, search).await?;
        Ok(found.into_iter().map(|(start, trace, tenant)| (tenant, trace, start)).collect())
    }

    /// A tenant's (parent service, child service, calls) for spans started in
    /// `start_ns..=end_ns` whose parent is of another service.
    pub async fn dependencies(
        &self,
        tenant: &str,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        self.spans.dependencies(tenant, start_ns, end_ns).await
    }

    /// The metered spans of every tenant that arrived in `(after_ms, upto_ms]` (billing's
    /// extraction). A span delivered again after its first delivery was sealed comes again,
    /// with its later arrival: billing keys usage by id.
    pub async fn metered_spans(&self, after_ms: i64, upto_ms: i64) -> Result<Vec<MeteredSpan>, StoreError> {
        self.spans.metered_spans(after_ms, upto_ms).await
    }

    /// Where a chunk of `spans` metered spans after `watermark_ms` ends (ms of arrival; the rest
    /// of that millisecond is in the chunk too), never past `upto_ms`.
    pub async fn metered_chunk_end(&self, watermark_ms: i64, upto_ms: i64, spans: i64) -> Result<i64, StoreError> {
        self.spans.metered_chunk_end(watermark_ms, upto_ms, spans).await
    }
}

/// What a tag condition may look at in a span.
pub(super) struct Details<'a> {
    kind: i64,
    status_code: i64,
    status_message: &'a str,
    attributes: &'a str,
    resource: &'a str,
    events: &'a str,
    scope: &'a str,
}

/// The text a tag value is compared as (jaeger-query compares `AsString()`).
fn value_matches(value: &Value, want: &str) -> bool {
    match value {
        Value::String(s) => s == want,
        Value::Bool(b) => want == if *b { "true" } else { "false" },
        Value::Number(n) => n.to_string() == want || (want.parse::<f64>().ok().is_some_and(|w| n.as_f64() == Some(w))),
        Value::Null => want.is_empty(),
        // Arrays and maps, as their JSON text.
        other => serde_json::to_string(other).is_ok_and(|text| text == want),
    }
}

fn parse_map(text: &str) -> Map<String, Value> {
    serde_json::from_str(text).unwrap_or_default()
}

impl<'a> Details<'a> {
    pub(super) fn of(span: &'a SpanRow) -> Self {
        Details {
            kind: span.kind,
            status_code: span.status_code,
            status_message: &span.status_message,
            attributes: &span.attributes,
            resource: &span.resource,
            events: &span.events,
            scope: &span.scope,
        }
    }

    /// Whether every tag matches a tag, process tag or log field of this span.
    pub(super) fn matches(&self, tags: &[(String, String)]) -> bool {
        let attributes = parse_map(self.attributes);
        let mut resource: Option<Map<String, Value>> = None;
        let mut events: Option<Vec<Value>> = None;
        let mut scope: Option<Map<String, Value>> = None;
        tags.iter().all(|(key, want)| {
            if let Some(value) = attributes.get(key) {
                if value_matches(value, want) {
                    return true;
                }
            } else {
                let synthetic = match key.as_str() {
                    "span.kind" => span_kind_name(self.kind) == Some(want.as_str()),
                    "otel.status_code" => status_name(self.status_code) == Some(want.as_str()),
                    "error" => self.status_code == 2 && want == "true",
                    "otel.status_description" => !self.status_message.is_empty() && self.status_message == want,
                    "otel.scope.name" | "otel.scope.version" => {
                        let scope = scope.get_or_insert_with(|| parse_map(self.scope));
                        let field = if key == "otel.scope.name" { "name" } else { "version" };
                        scope.get(field).and_then(Value::as_str).is_some_and(|v| !v.is_empty() && v == want)
                    }
                    _ => false,
                };
                if synthetic {
                    return true;
                }
            }
            if key != "service.name" {
                let resource = resource.get_or_insert_with(|| parse_map(self.resource));
                if resource.get(key).is_some_and(|v| value_matches(v, want)) {
                    return true;
                }
            }
            let events = events.get_or_insert_with(|| serde_json::from_str(self.events).unwrap_or_default());
            events.iter().any(|event| {
                (key == "event" && event.get("name").and_then(Value::as_str) == Some(want.as_str()))
                    || event.get("attributes").and_then(|a| a.get(key)).is_some_and(|v| value_matches(v, want))
            })
        })
    }
}
