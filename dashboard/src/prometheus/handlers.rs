//! The routes' handlers: queries, series, labels and metadata, and the rest of what Grafana
//! calls.

use std::collections::BTreeSet;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use promql_parser::parser::Expr;
use serde::Serialize;

use super::data::{self, Times};
use super::eval::{self, Evaluator, Labels, Selector, Value};
use super::params::{Params, parse_duration};
use super::parse::{parse_bounded, parse_query};
use super::response::{ApiError, ApiResult, LabelSet, Point, QueryData, VectorItem, matrix, success, timed};
use super::{Api, VERSION, scope};
use crate::DashboardState;

/// The most steps a range query may have (Prometheus's limit).
const MAX_POINTS: i64 = 11_000;

// ---------------------------------------------------------------------------------------------
// Queries

pub(super) async fn query(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    let started = Instant::now();
    let tenant = scope(state, &headers)?;
    let params = Params::new(&headers, &uri, &body);
    let now = state.store.clock().now_ms();
    let time = params.time("time")?.unwrap_or(now);
    let expr = parse_query(params.get("query"))?;
    let plan = eval::plan(&expr)?;
    let times = Times { start: time, end: time, step: 0 };
    let (value, load) = api
        .execute(tenant, started, plan, times, move |plan, loaded, deadline| {
            let evaluator = Evaluator::new(plan, loaded, time, time, Some(deadline));
            Ok((evaluator.eval(&plan.root, time)?, plan.keeps_order()))
        })
        .await?;
    let (value, keeps_order) = value;
    let response = match value {
        Value::Scalar(v) => success(QueryData::Scalar(Point::Number(time, v)), &[]),
        Value::Str(s) => success(QueryData::String(Point::Text(time, &s)), &[]),
        Value::Vector(mut samples) => {
            if !keeps_order {
                samples.sort_by(|a, b| a.labels.cmp(&b.labels));
            }
            let items = samples
                .iter()
                .map(|s| VectorItem { metric: LabelSet(&s.labels), value: Point::Number(time, s.value) })
                .collect();
            success(QueryData::Vector(items), &[])
        }
        Value::Matrix(mut series) => {
            series.sort_by(|a, b| a.0.cmp(&b.0));
            success(matrix(&series), &[])
        }
    };
    Ok(timed(response, load, started))
}

pub(super) async fn query_range(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    let started = Instant::now();
    let tenant = scope(state, &headers)?;
    let params = Params::new(&headers, &uri, &body);
    let start =
        params.time("start")?.ok_or_else(|| ApiError::param("start", "cannot parse \"\" to a valid timestamp"))?;
    let end = params.time("end")?.ok_or_else(|| ApiError::param("end", "cannot parse \"\" to a valid timestamp"))?;
    if end < start {
        return Err(ApiError::param("end", "end timestamp must not be before start time"));
    }
    let step = parse_duration(params.get("step").unwrap_or("")).map_err(|e| ApiError::param("step", e))?;
    if step <= 0 {
        return Err(ApiError::param(
            "step",
            "zero or negative query resolution step widths are not accepted. Try a positive integer",
        ));
    }
    if end.saturating_sub(start) / step >= MAX_POINTS {
        return Err(ApiError::bad_data(
            "exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query resolution (?step=XX)",
        ));
    }
    let expr = parse_query(params.get("query"))?;
    let plan = eval::plan(&expr)?;
    if plan.returns_matrix() || plan.returns_string() {
        let kind = if plan.returns_matrix() { "range vector" } else { "string" };
        return Err(ApiError::bad_data(format!(
            "invalid expression type {kind:?} for range query, must be Scalar or instant Vector"
        )));
    }
    let times = Times { start, end, step };
    let (series, load) = api
        .execute(tenant, started, plan, times, move |plan, loaded, deadline| {
            let evaluator = Evaluator::new(plan, loaded, start, end, Some(deadline));
            Ok(evaluator.range(times.iter())?)
        })
        .await?;
    Ok(timed(success(matrix(&series), &[]), load, started))
}

// ---------------------------------------------------------------------------------------------
// Series, labels, metadata

/// `match[]` selectors (each must be a vector selector).
fn selectors(params: &Params) -> Result<Vec<Selector>, ApiError> {
    let mut out = Vec::new();
    for text in params.all("match[]") {
        let expr = parse_bounded("match[]", text)?;
        let Expr::VectorSelector(vs) = expr else {
            return Err(ApiError::param("match[]", format!("{text:?} is not a series selector")));
        };
        out.push(Selector {
            name: vs.name.clone(),
            matchers: vs.matchers.clone(),
            offset_ms: 0,
            at: None,
            range_ms: None,
            needs_previous: false,
            all_samples: false,
        });
    }
    Ok(out)
}

/// The caller's series with data in the request's `start..end` that any `match[]` selects
/// (every series when there is none).
async fn matching_series(
    state: &DashboardState,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Vec<Labels>, ApiError> {
    let tenant = scope(state, headers)?;
    let selectors = selectors(params)?;
    let now = state.store.clock().now_ms();
    let lo = params.time("start")?.unwrap_or(eval::MIN_TIME_MS);
    let hi = params.time("end")?.unwrap_or(eval::MAX_TIME_MS);
    let names: Option<BTreeSet<String>> = if !selectors.is_empty() && selectors.iter().all(|s| s.exact_name().is_some())
    {
        Some(selectors.iter().filter_map(|s| s.exact_name().map(str::to_string)).collect())
    } else {
        None
    };
    let all = data::catalogue(state, tenant.as_deref(), lo, hi, names.as_ref(), now).await?;
    Ok(all.into_iter().filter(|labels| selectors.is_empty() || selectors.iter().any(|s| s.matches(labels))).collect())
}

fn truncate<T>(list: &mut Vec<T>, limit: Option<usize>) -> Vec<String> {
    match limit {
        Some(limit) if list.len() > limit => {
            list.truncate(limit);
            vec!["results truncated due to limit".to_string()]
        }
        _ => Vec::new(),
    }
}

pub(super) async fn series(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    let params = Params::new(&headers, &uri, &body);
    scope(state, &headers)?;
    if params.all("match[]").is_empty() {
        return Err(ApiError::bad_data("no match[] parameter provided"));
    }
    let limit = params.limit()?;
    let mut list = matching_series(state, &headers, &params).await?;
    let warnings = truncate(&mut list, limit);
    let items: Vec<LabelSet> = list.iter().map(|l| LabelSet(l)).collect();
    Ok(success(items, &warnings))
}

pub(super) async fn labels(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    let params = Params::new(&headers, &uri, &body);
    let limit = params.limit()?;
    let list = matching_series(state, &headers, &params).await?;
    let mut names: Vec<String> =
        list.iter().flat_map(|l| l.iter().map(|(k, _)| k.clone())).collect::<BTreeSet<_>>().into_iter().collect();
    let warnings = truncate(&mut names, limit);
    Ok(success(names, &warnings))
}

pub(super) async fn label_values(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> ApiResult {
    let state = &api.state;
    let params = Params::new(&headers, &uri, &body);
    let limit = params.limit()?;
    let list = matching_series(state, &headers, &params).await?;
    let mut values: Vec<String> = list
        .iter()
        .map(|l| eval::label(l, &name).to_string())
        .filter(|v| !v.is_empty())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let warnings = truncate(&mut values, limit);
    Ok(success(values, &warnings))
}

pub(super) async fn metadata(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    let tenant = scope(state, &headers)?;
    let params = Params::new(&headers, &uri, &body);
    let limit = params.limit()?;
    let metric = params.get("metric").filter(|m| !m.is_empty());
    let mut list = data::metadata(state, tenant.as_deref()).await?;
    list.retain(|(name, _, _)| metric.is_none_or(|m| m == name));
    let warnings = truncate(&mut list, limit);
    // `{"<metric>":[{"type":…,"help":…,"unit":""}],…}`, in the store's order.
    #[derive(Serialize)]
    struct Metadata<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        help: &'a str,
        unit: &'static str,
    }
    struct ByMetric<'a>(&'a [(String, String, String)]);
    impl Serialize for ByMetric<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map(self.0.iter().map(|(name, kind, help)| (name, [Metadata { kind, help, unit: "" }])))
        }
    }
    Ok(success(ByMetric(&list), &warnings))
}

// ---------------------------------------------------------------------------------------------
// The rest of what Grafana calls

pub(super) async fn buildinfo() -> Response {
    let data = serde_json::json!({
        "version": VERSION,
        "revision": "sfaas",
        "branch": "sfaas",
        "buildUser": "sfaas",
        "buildDate": "",
        "goVersion": "none (stateful-faas dashboard)",
        "features": {},
    });
    success(data, &[])
}

pub(super) async fn format_query(State(api): State<Api>, headers: HeaderMap, uri: Uri, body: Bytes) -> ApiResult {
    let state = &api.state;
    scope(state, &headers)?;
    let params = Params::new(&headers, &uri, &body);
    let expr = parse_query(params.get("query"))?;
    Ok(success(expr.prettify(), &[]))
}

pub(super) async fn exemplars(State(api): State<Api>, headers: HeaderMap) -> ApiResult {
    let state = &api.state;
    scope(state, &headers)?;
    Ok(success(serde_json::json!([]), &[]))
}

pub(super) async fn rules(State(api): State<Api>, headers: HeaderMap) -> ApiResult {
    let state = &api.state;
    scope(state, &headers)?;
    Ok(success(serde_json::json!({ "groups": [] }), &[]))
}

pub(super) async fn alerts(State(api): State<Api>, headers: HeaderMap) -> ApiResult {
    let state = &api.state;
    scope(state, &headers)?;
    Ok(success(serde_json::json!({ "alerts": [] }), &[]))
}

pub(super) async fn not_found(uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "not_found",
        message: format!("unknown API endpoint {}", uri.path()),
    }
}
