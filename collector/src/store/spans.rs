//! Reading spans: everything the Jaeger API, the dashboard's pages and billing ask of them,
//! and nothing else. Every reader takes the tenant (billing's metered spans, read for every
//! tenant at once, carry theirs), so no reader can return another tenant's spans.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::{Bind, Pool, SPAN_COLUMNS, StoreError, TelemetryStore, rows, span_from_row};
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

/// Rows per page of a search's backwards walk: the first page is small, as the rows of one
/// trace come together and the database filters by tags before the limit; later pages double.
const FIRST_PAGE: usize = 100;
const MAX_PAGE: usize = 20_000;
/// Traces read at once by [`TelemetryStore::traces`] (bind parameters per statement stay far
/// below the limits).
const TRACES_PER_STATEMENT: usize = 100;

/// Names of metered spans besides invocations (`invoke …`).
pub(super) const METERED_NAMES: [&str; 2] = ["state.usage", "instance.usage"];

/// The metered spans billing reads: invocations, state usage and instance usage.
const METERED_SPANS: &str = "SELECT tenant, trace_id, span_id, name, start_ns, end_ns, received_ms, attributes \
     FROM spans WHERE metered = 1 AND received_ms > ? AND received_ms <= ? \
     AND (substr(name, 1, 7) = 'invoke ' OR name = 'state.usage' OR name = 'instance.usage')";

impl TelemetryStore {
    /// Every tenant with spans: a skip scan over an index led by `tenant`.
    pub async fn span_tenants(&self) -> Result<Vec<String>, StoreError> {
        let text = "WITH RECURSIVE t(name) AS ( \
                      SELECT (SELECT tenant FROM spans ORDER BY tenant LIMIT 1) \
                      UNION ALL \
                      SELECT (SELECT tenant FROM spans WHERE tenant > t.name ORDER BY tenant LIMIT 1) \
                      FROM t WHERE t.name IS NOT NULL) \
                    SELECT name FROM t WHERE name IS NOT NULL";
        Ok(rows!(self, text, &[], |row| row.try_get::<String, _>(0)?))
    }

    /// A tenant's service names: a skip scan over `spans_by_service`.
    pub async fn services(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let text = "WITH RECURSIVE s(name) AS ( \
                      SELECT (SELECT service_name FROM spans WHERE tenant = ? ORDER BY service_name LIMIT 1) \
                      UNION ALL \
                      SELECT (SELECT service_name FROM spans WHERE tenant = ? AND service_name > s.name \
                              ORDER BY service_name LIMIT 1) \
                      FROM s WHERE s.name IS NOT NULL) \
                    SELECT name FROM s WHERE name IS NOT NULL";
        Ok(rows!(self, text, &[Bind::Str(tenant), Bind::Str(tenant)], |row| row.try_get::<String, _>(0)?))
    }

    /// A tenant's (operation, span kind) pairs of one service (every span of the service is
    /// read: no index has the span name).
    pub async fn operations(&self, tenant: &str, service: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let text = "SELECT name, kind FROM spans WHERE tenant = ? AND service_name = ? GROUP BY name, kind";
        Ok(rows!(self, text, &[Bind::Str(tenant), Bind::Str(service)], |row| (
            row.try_get::<String, _>(0)?,
            row.try_get::<i64, _>(1)?
        )))
    }

    /// The spans of one trace of a tenant, by start time (empty when it has none).
    pub async fn trace(&self, tenant: &str, trace_id: &str) -> Result<Vec<SpanRow>, StoreError> {
        Ok(self.traces(tenant, &[trace_id]).await?.remove(trace_id).unwrap_or_default())
    }

    /// The spans of some traces of one tenant, by trace id, each trace's spans by start time.
    ///
    /// Through the primary key (tenant, trace_id, span_id). The statement has no `ORDER BY` on
    /// purpose: given `ORDER BY start_ns`, SQLite plans `spans_by_time` (tenant, start_ns) for
    /// the order and reads every span of the tenant; sorting one trace's spans here costs
    /// nothing.
    pub async fn traces(&self, tenant: &str, trace_ids: &[&str]) -> Result<HashMap<String, Vec<SpanRow>>, StoreError> {
        let mut traces: HashMap<String, Vec<SpanRow>> = HashMap::new();
        for chunk in trace_ids.chunks(TRACES_PER_STATEMENT) {
            let text = format!(
                "SELECT {SPAN_COLUMNS} FROM spans WHERE tenant = ? AND trace_id IN ({})",
                vec!["?"; chunk.len()].join(", ")
            );
            let mut binds = vec![Bind::Str(tenant)];
            binds.extend(chunk.iter().map(|id| Bind::Str(id)));
            for row in rows!(self, &text, &binds, |row| span_from_row!(row)?) {
                traces.entry(row.trace_id.clone()).or_default().push(row);
            }
        }
        for spans in traces.values_mut() {
            spans.sort_by(|a, b| a.start_ns.cmp(&b.start_ns).then_with(|| a.span_id.cmp(&b.span_id)));
        }
        Ok(traces)
    }

    /// A tenant's spans whose name starts with `prefix`, started in `[since_ns, until_ns)`,
    /// newest first, at most `limit`.
    pub async fn spans_named(
        &self,
        tenant: &str,
        prefix: &str,
        since_ns: i64,
        until_ns: i64,
        limit: i64,
    ) -> Result<Vec<SpanRow>, StoreError> {
        // The times and the limit are integers, written into the statement.
        let text = format!(
            "SELECT {SPAN_COLUMNS} FROM spans WHERE tenant = ? AND start_ns >= {since_ns} AND start_ns < {until_ns} \
             AND substr(name, 1, {}) = ? ORDER BY start_ns DESC LIMIT {}",
            prefix.chars().count(),
            limit.max(0)
        );
        Ok(rows!(self, &text, &[Bind::Str(tenant), Bind::Str(prefix)], |row| span_from_row!(row)?))
    }

    /// Up to `search.limit` traces of `tenant` matching the search, most recently matched first,
    /// with the start of their latest matching span.
    ///
    /// Walks `spans_by_service` (tenant, service, start) backwards in pages, lets the database
    /// drop spans whose JSON lacks a tag's value text, and stops at `limit` traces (a search
    /// that finds fewer reads the service's whole window).
    pub async fn find_traces(&self, tenant: &str, search: &TraceSearch) -> Result<Vec<(String, i64)>, StoreError> {
        let with_tags = !search.tags.is_empty();
        let columns = if with_tags {
            "trace_id, start_ns, kind, status_code, status_message, attributes, resource, events, scope"
        } else {
            "trace_id, start_ns"
        };
        let mut conditions = String::new();
        if search.operation.is_some() {
            conditions.push_str(" AND name = ?");
        }
        if search.min_ns > 0 {
            conditions.push_str(" AND end_ns - start_ns >= ?");
        }
        if search.max_ns > 0 {
            conditions.push_str(" AND end_ns - start_ns <= ?");
        }
        // A cheap necessary condition per tag, checked by the database: the value's JSON text
        // is in the span's attributes, resource or events. The exact match is made afterwards.
        let needles: Vec<String> = search.tags.iter().filter_map(|(key, want)| needle(key, want)).collect();
        let instr = match self.pool {
            Pool::Sqlite(_) => "instr",
            Pool::Postgres(_) => "strpos",
        };
        for _ in &needles {
            conditions.push_str(&format!(
                " AND ({instr}(attributes, ?) > 0 OR {instr}(resource, ?) > 0 OR {instr}(events, ?) > 0)"
            ));
        }
        let page_sql = |page: usize| {
            format!(
                "SELECT {columns} FROM spans WHERE tenant = ? AND service_name = ? AND start_ns >= ? AND start_ns <= ?\
                 {conditions} ORDER BY start_ns DESC LIMIT {page}"
            )
        };
        let ties_sql =
            format!("SELECT {columns} FROM spans WHERE tenant = ? AND service_name = ? AND start_ns = ?{conditions}");
        let extra_binds = {
            let mut binds = Vec::new();
            if let Some(operation) = &search.operation {
                binds.push(Bind::Str(operation));
            }
            if search.min_ns > 0 {
                binds.push(Bind::Int(search.min_ns));
            }
            if search.max_ns > 0 {
                binds.push(Bind::Int(search.max_ns));
            }
            for needle in &needles {
                binds.extend([Bind::Str(needle), Bind::Str(needle), Bind::Str(needle)]);
            }
            binds
        };

        let mut found: Vec<(String, i64)> = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut consider = |candidates: Vec<Candidate>, found: &mut Vec<(String, i64)>| {
            for candidate in candidates {
                if found.len() >= search.limit {
                    return;
                }
                if seen.contains(&candidate.trace_id) {
                    continue;
                }
                if candidate.details.as_ref().is_none_or(|details| details.borrowed().matches(&search.tags)) {
                    seen.insert(candidate.trace_id.clone());
                    found.push((candidate.trace_id, candidate.start_ns));
                }
            }
        };

        let mut high = search.end_ns;
        let mut page = FIRST_PAGE;
        while high >= search.start_ns && found.len() < search.limit {
            let mut binds =
                vec![Bind::Str(tenant), Bind::Str(&search.service), Bind::Int(search.start_ns), Bind::Int(high)];
            binds.extend(extra_binds.iter().copied());
            let candidates = self.candidates(&page_sql(page), &binds, with_tags).await?;
            let full = candidates.len() == page;
            let last = candidates.last().map(|c| c.start_ns);
            consider(candidates, &mut found);
            let (true, Some(last)) = (full, last) else { break };
            if found.len() >= search.limit {
                break;
            }
            // The page ended inside a run of equal start times: take the whole run, then go on
            // below it.
            let mut binds = vec![Bind::Str(tenant), Bind::Str(&search.service), Bind::Int(last)];
            binds.extend(extra_binds.iter().copied());
            let ties = self.candidates(&ties_sql, &binds, with_tags).await?;
            consider(ties, &mut found);
            if last == i64::MIN {
                break;
            }
            high = last - 1;
            page = (page * 2).min(MAX_PAGE);
        }
        Ok(found)
    }

    async fn candidates(&self, text: &str, binds: &[Bind<'_>], with_tags: bool) -> Result<Vec<Candidate>, StoreError> {
        Ok(rows!(self, text, binds, |row| Candidate {
            trace_id: row.try_get(0)?,
            start_ns: row.try_get(1)?,
            details: if with_tags {
                Some(OwnedDetails {
                    kind: row.try_get(2)?,
                    status_code: row.try_get(3)?,
                    status_message: row.try_get(4)?,
                    attributes: row.try_get(5)?,
                    resource: row.try_get(6)?,
                    events: row.try_get(7)?,
                    scope: row.try_get(8)?,
                })
            } else {
                None
            },
        }))
    }

    /// A tenant's (parent service, child service, calls) for spans started in
    /// `start_ns..=end_ns` whose parent is of another service (every span of the window is read).
    pub async fn dependencies(
        &self,
        tenant: &str,
        start_ns: i64,
        end_ns: i64,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        let text = "SELECT p.service_name, c.service_name, COUNT(*) FROM spans c \
                    JOIN spans p ON p.tenant = c.tenant AND p.trace_id = c.trace_id AND p.span_id = c.parent_span_id \
                    WHERE c.tenant = ? AND c.start_ns >= ? AND c.start_ns <= ? AND c.parent_span_id IS NOT NULL \
                    AND p.service_name <> c.service_name \
                    GROUP BY p.service_name, c.service_name";
        Ok(rows!(self, text, &[Bind::Str(tenant), Bind::Int(start_ns), Bind::Int(end_ns)], |row| (
            row.try_get::<String, _>(0)?,
            row.try_get::<String, _>(1)?,
            row.try_get::<i64, _>(2)?
        )))
    }

    /// The metered spans of every tenant that arrived in `(after_ms, upto_ms]` (billing's
    /// extraction). On SQLite through its C API: sqlx hands every row over from its worker
    /// thread, which for a chunk of 100 000 spans is most of the read.
    pub async fn metered_spans(&self, after_ms: i64, upto_ms: i64) -> Result<Vec<MeteredSpan>, StoreError> {
        match &self.pool {
            Pool::Sqlite(pool) => {
                let mut connection = pool.acquire().await?;
                crate::sqlite::run(&mut connection, |db| {
                    use crate::sqlite::Value::Int;
                    let mut statement = db.prepare(METERED_SPANS)?;
                    statement.bind(1, Int(after_ms))?;
                    statement.bind(2, Int(upto_ms))?;
                    let mut spans = Vec::new();
                    while statement.step()? {
                        let text =
                            |column| String::from_utf8_lossy(statement.text(column).unwrap_or_default()).into_owned();
                        spans.push(MeteredSpan {
                            tenant: text(0),
                            trace_id: text(1),
                            span_id: text(2),
                            name: text(3),
                            start_ns: statement.int(4),
                            end_ns: statement.int(5),
                            received_ms: statement.int(6),
                            attributes: text(7),
                        });
                    }
                    Ok(spans)
                })
                .await
                .map_err(StoreError::Sqlite)
            }
            Pool::Postgres(_) => Ok(rows!(self, METERED_SPANS, &[Bind::Int(after_ms), Bind::Int(upto_ms)], |row| {
                MeteredSpan {
                    tenant: row.try_get(0)?,
                    trace_id: row.try_get(1)?,
                    span_id: row.try_get(2)?,
                    name: row.try_get(3)?,
                    start_ns: row.try_get(4)?,
                    end_ns: row.try_get(5)?,
                    received_ms: row.try_get(6)?,
                    attributes: row.try_get(7)?,
                }
            })),
        }
    }

    /// Where a chunk of `spans` metered spans after `watermark_ms` ends (ms of arrival; the rest
    /// of that millisecond is in the chunk too), never past `upto_ms`.
    pub async fn metered_chunk_end(&self, watermark_ms: i64, upto_ms: i64, spans: i64) -> Result<i64, StoreError> {
        let text = "SELECT received_ms FROM spans WHERE metered = 1 AND received_ms > ? AND received_ms <= ? \
                    ORDER BY received_ms LIMIT 1 OFFSET ?";
        let binds = [Bind::Int(watermark_ms), Bind::Int(upto_ms), Bind::Int(spans)];
        let next = rows!(self, text, &binds, |row| row.try_get::<i64, _>(0)?);
        Ok(next.first().copied().unwrap_or(upto_ms))
    }
}

/// One span considered by a search.
struct Candidate {
    trace_id: String,
    start_ns: i64,
    /// Only read when the search has tags.
    details: Option<OwnedDetails>,
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

struct OwnedDetails {
    kind: i64,
    status_code: i64,
    status_message: String,
    attributes: String,
    resource: String,
    events: String,
    scope: String,
}

impl OwnedDetails {
    fn borrowed(&self) -> Details<'_> {
        Details {
            kind: self.kind,
            status_code: self.status_code,
            status_message: &self.status_message,
            attributes: &self.attributes,
            resource: &self.resource,
            events: &self.events,
            scope: &self.scope,
        }
    }
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

/// Text that a span's attributes, resource or events JSON must contain for the tag `key=want`
/// to match (`None` when no such text is certain: tags made from the span's kind, status or
/// scope, and values compared otherwise than as JSON text, such as `500.0` with `500`).
fn needle(key: &str, want: &str) -> Option<String> {
    let synthetic = matches!(
        key,
        "span.kind"
            | "otel.status_code"
            | "error"
            | "otel.status_description"
            | "otel.scope.name"
            | "otel.scope.version"
    );
    let numeric = want.parse::<f64>().is_ok();
    let canonical_integer = want.parse::<i64>().is_ok_and(|i| i.to_string() == want);
    if synthetic || want.is_empty() || want.starts_with(['[', '{']) || (numeric && !canonical_integer) {
        return None;
    }
    let quoted = serde_json::to_string(want).ok()?;
    Some(quoted[1..quoted.len() - 1].to_string())
}
