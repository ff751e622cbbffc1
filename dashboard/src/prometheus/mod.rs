//! The Prometheus HTTP API under `/prometheus`, for Grafana's Prometheus datasource with no
//! plugin (issue 6): point the datasource at `http://DASHBOARD/prometheus` with
//! `Authorization: Bearer <read token>` (or Basic auth with the token as password).
//!
//! # Endpoints
//!
//! Every route accepts `GET` and `POST`; parameters come from the query string and, for
//! `POST`, from an `application/x-www-form-urlencoded` body (body values first, as Go's
//! `ParseForm` orders them), so a `POST` with the parameters in the URL and an empty body works.
//!
//! | route | answer |
//! |---|---|
//! | `/api/v1/query` (`query`, `time`) | instant query: `vector`, `scalar`, `string`, or `matrix` for a range selector |
//! | `/api/v1/query_range` (`query`, `start`, `end`, `step`) | `matrix` (at most 11 000 steps) |
//! | `/api/v1/series` (`match[]`…, `start`, `end`, `limit`) | label sets |
//! | `/api/v1/labels` (`match[]`, `start`, `end`, `limit`) | label names |
//! | `/api/v1/label/{name}/values` (same) | label values (`__name__`: metric names); `/api/v1/labels/{name}/values` too |
//! | `/api/v1/metadata` (`metric`, `limit`, `limit_per_metric`) | `{metric: [{type, help, unit}]}` |
//! | `/api/v1/status/buildinfo` | version 3.0.0-sfaas and an empty `features` object (Grafana decodes a `map[string]string` and takes "no features" for Prometheus rather than Mimir); no token needed |
//! | `/api/v1/format_query` (`query`) | the query pretty-printed |
//! | `/api/v1/query_exemplars`, `/api/v1/rules`, `/api/v1/alerts` | empty (`[]`, `{groups: []}`, `{alerts: []}`): Grafana probes them |
//! | anything else under `/prometheus` | 404 `{status: "error", errorType: "not_found", error}` |
//!
//! Query answers carry `Server-Timing: load;dur=…, total;dur=…` (milliseconds spent reading
//! the data, and in all).
//!
//! Answers are Prometheus's JSON (`{status: "success", data, warnings?}`; values as strings,
//! `NaN` and `±Inf` included; timestamps as float seconds). Errors are
//! `{status: "error", errorType, error}`: `bad_data` (400) for an unparsable query or
//! parameter, `execution` (422) for a query that cannot run, and 422 `execution` naming the
//! construct for PromQL outside the supported subset (`unsupported PromQL: aggregation
//! limitk`), `internal` (500) when the store fails, `unauthorized` (401) /
//! `forbidden` (403) for tokens, `timeout` (503) for a query past its 2 minutes (waiting for
//! one of the two evaluation places, which run on blocking threads, off the request runtime,
//! and evaluating: a range query checks its deadline at each step).
//!
//! # PromQL
//!
//! Parsed by promql-parser and evaluated here as Prometheus 3 evaluates float samples
//! (native histograms aside): every function of Prometheus's function list and every
//! aggregation of Prometheus 2 and 3 (not its experimental ones), with
//! - vector selectors with `=`, `!=`, `=~`, `!~` (regexes fully anchored) and `or` groups,
//!   range selectors `[d]` (left-open windows `(t - d, t]`), `offset` (also negative), `@`
//!   (time, `start()`, `end()`); instant selectors look back 5 minutes, and stop at a
//!   staleness marker (stored from remote_write, and written by the collector's scraper for a
//!   series gone from its target); windows leave markers out;
//! - range functions: `rate`, `increase`, `delta` with Prometheus's extrapolation (to the
//!   window's edges when the samples reach within 110 % of their average interval of them,
//!   else by half an interval; counters not below zero; counter resets added back), `irate`,
//!   `idelta`, `deriv`, `predict_linear`, `changes`, `resets`, `holt_winters` (Prometheus 2's
//!   name) and `double_exponential_smoothing`, `avg`/`min`/`max`/`sum`/`count`/`quantile`/
//!   `stddev`/`stdvar`/`mad`/`last`/`present`/`absent_over_time`, over matrix selectors or
//!   subqueries;
//! - subqueries `expr[range:step]` (times at multiples of the step in `(t - range, t]`; no
//!   step: 1 minute, Prometheus's default evaluation interval) with `offset` and `@`;
//! - instant functions: `abs`, `ceil`, `floor`, `round`, `sqrt`, `exp`, `ln`, `log2`, `log10`,
//!   `sgn`, `clamp`, `clamp_min`, `clamp_max`, the trigonometric functions, `deg`, `rad`,
//!   `pi`, the date functions (`year` ... `days_in_month`, of the evaluation time without an
//!   argument), `timestamp` (a selector's own sample times), `absent` (labelled by the
//!   selector's equality matchers), `label_replace`, `label_join`, `sort`, `sort_desc`,
//!   `sort_by_label` (natural order), `histogram_quantile` over classic `_bucket` series, the
//!   native-histogram functions (nothing: float samples hold no native histogram), `time`,
//!   `vector`, `scalar`;
//! - aggregations `sum`, `avg`, `min`, `max`, `count`, `group`, `stddev`, `stdvar`, `topk`,
//!   `bottomk`, `quantile`, `count_values`, with `by`/`without`;
//! - `+ - * / % ^ atan2`, `== != > < >= <=` (with `bool`), `and or unless` between scalars and
//!   vectors, vector matching with `on`/`ignoring`, `group_left`/`group_right` with labels
//!   copied from the "one" side;
//! - the metric name dropped as Prometheus drops it (arithmetic, `bool`, functions but
//!   `last_over_time`, `sort*`, `label_*`; kept by filtering comparisons and `topk`/`bottomk`).
//!
//! Instant answers come sorted by labels, except those of `sort*`, `topk` and `bottomk`, which
//! keep their order. Refused with 422 naming it: Prometheus 3's experimental `limitk`,
//! `limit_ratio`, `info`, `first_over_time`, `ts_of_*_over_time`, and the `fill` modifier.
//!
//! `dashboard/src/prometheus/eval/testdata/*.test` are PromQL tests in Prometheus's promqltest
//! format, run by `eval/promqltest.rs`; `dashboard/tests/differential.rs` sends 462 queries to
//! Debian's Prometheus and to this API over the same remote-written samples and compares.
//!
//! Limits: a subquery's times are counted before it is evaluated (at most 2^20 in a query);
//! its evaluations are remembered while later steps read them, at most 5 million samples in
//! all (422 `execution`, Prometheus's words); the deadline is checked at every step and every
//! few thousand subquery times.

//! # Series
//!
//! **Stored samples** (`metric_samples`, what the collector received by OTLP, remote_write or
//! scraping): the metric name is the `metric` column and the labels are the sample's label
//! object. Histograms stored whole (OTLP: `{"count","sum","buckets":[[le, cumulative], ...]}`)
//! are exposed as Prometheus exposes classic histograms: `<name>_bucket{le="..."}` (cumulative
//! counts; `le` written as Go's `%g`, `+Inf` last), `<name>_count` and `<name>_sum`; summaries
//! (`quantiles`) as `<name>{quantile="..."}`, `_count` and `_sum`. A `NULL` value is `NaN`.
//!
//! **Usage and billing counters**, synthesized from billing's usage records (every metered
//! invocation and state interval that billing has recorded; `sfaas bill run` or the dashboard's
//! periodic run brings them up to date):
//!
//! | metric | labels | value |
//! |---|---|---|
//! | `sfaas_usage_invocations_total` | `tenant`, `function`, `plan` | invocations |
//! | `sfaas_usage_cpu_ms_total` | `tenant`, `function`, `plan` | CPU milliseconds |
//! | `sfaas_usage_bytes_out_total` | `tenant`, `function`, `plan` | bytes sent |
//! | `sfaas_usage_log_bytes_total` | `tenant`, `function`, `plan` | bytes of log lines exported for invocations |
//! | `sfaas_usage_state_byte_seconds_total` | `tenant`, `plan` | state byte-seconds |
//! | `sfaas_billing_cost_total` | `tenant`, `function`, `currency` | cost in the rate card's currency |
//!
//! Each is a counter that behaves as if scraped every minute, at whole minutes (UTC), from
//! the minute of its first record to the last whole minute up to now: its sample at minute
//! `g` counts what *started* before `g`. So `increase(x[1d])` and `rate(x[5m])` work as on any
//! scraped counter (with Prometheus's extrapolation: a window that begins inside the series'
//! history is extrapolated to its start), and `x - (x offset 30d or x * 0)` at a whole minute
//! is the exact usage of those 30 days (`or x * 0` for series that did not exist yet). `plan` is the tenant's plan when the usage happened (a plan change
//! starts new series). State usage has no function: its series (and the cost of state) carry no
//! `function` label, where the billing API shows the row `(state)`. The cost is the running sum
//! of the per-record costs that `Billing::invocation_costs` gives (full precision, records
//! priced in time order within each invoice, usage period and plan: free allowances and cheaper
//! tiers go to a period's first usage; late usage is priced after what earlier invoices billed):
//! invoice-level rounding and minimum charges are not in it. Records are placed at their start
//! time, late ones too. Computation is exact decimal; the sample value is a float. On SQLite,
//! state byte-seconds are summed in double precision (SQLite has no decimal type); on
//! PostgreSQL exactly.
//!
//! # Tenancy
//!
//! A read token sees only its tenant's series, in every endpoint, with their own labels only
//! (as from Prometheus; a multi-tenant backend such as Mimir scopes by header without adding a
//! label): the tenant is a condition of every SQL read, whatever the query's matchers say. A
//! stored series' own `tenant` label stays its own. The admin reading every tenant's series
//! sees a `tenant` label on each (and a series' own `tenant` label as `exported_tenant`). `X-Scope-OrgID`, when sent with a read token,
//! must name its tenant (403 otherwise). The admin token sees every tenant, or only the one
//! `X-Scope-OrgID` names (so that an operator can point one Grafana datasource per tenant at the
//! dashboard).
//!
//! # Speed
//!
//! A query's selectors are loaded once for all its steps, and each step is evaluated from
//! them in memory. Stored samples are read through the primary key and `samples_by_time`
//! (the admin's tenants are listed by a skip scan and read with `tenant IN (...)`).
//!
//! The synthesized counters are read only at the sample times the query needs (for a range
//! query those repeat with its step), from the usage records summed per (invoice, usage
//! period, plan, function) and interval between those times (`usage.rs`):
//! - from memory: a scope's records (up to [`Options::cache_max_records`], default 500 000)
//!   are kept summed per minute and brought up to date on each query with what billing
//!   recorded since the watermark the sums are at (one small statement when nothing changed;
//!   only the new records otherwise; everything again, in the background, if the record count
//!   disagrees with `usage_totals`). A scope's first query loads them in the background and is
//!   answered the second way. At most 4 scopes are kept (a function's minute takes 64 bytes:
//!   at most some 130 MB with 500 000 records each, every one in a minute of its own);
//! - or by one aggregation per query over billing's usage segments, which groups the records
//!   from the query's first read time on into the intervals (what came before is
//!   `usage_totals` minus that, read in the same snapshot); segments whose records all started
//!   before that time are not read.
//!
//! Costs are then computed per (interval, function), record by record only around the end of a
//! free allowance or a tier. `/series`, `/labels` and label values list the synthesized series
//! from `usage_totals` (small); the stored ones from the samples in the requested time range.
//!
//! # Other decisions
//!
//! - `holt_winters` (Prometheus 2's name, unknown to promql-parser) is registered with the
//!   parser and evaluated as `double_exponential_smoothing`.
//! - Results of instant queries are sorted by labels; range results (matrices) too.
//! - A series without a staleness marker ends 5 minutes after its last sample (the lookback).
//!   OTLP metrics carry no markers.
//! - Times (`time`, `start`, `end`, `@`) lie within what a timestamp in nanoseconds holds,
//!   1677-09-21 to 2262-04-11 (Prometheus clients' "min time" and "max time" are its ends), and
//!   ranges and offsets are at most 10^12 s (about 31 700 years); beyond either, 400
//!   `bad_data` naming the value. Prometheus takes any time and wraps; inside these bounds no
//!   sum of a time, an offset and a range overflows.
//!
//! # Code
//!
//! `handlers.rs` answers the routes, from the request's parameters (`params.rs`) and PromQL
//! (`parse.rs`), in Prometheus's JSON (`response.rs`); queries wait for a place
//! (`places.rs`), load their series (`data.rs`, `usage.rs`) and are evaluated (`eval/`).

mod data;
mod eval;
#[cfg(fuzzing)]
pub mod fuzzing;
mod handlers;
pub(crate) mod params;
mod parse;
pub(crate) mod places;
pub(crate) mod response;
mod usage;

use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{any, get};
use contract::Viewer;

use crate::DashboardState;
use data::Times;
use eval::{Plan, Series};
use handlers::{
    alerts, buildinfo, exemplars, format_query, label_values, labels, metadata, not_found, query, query_range, rules,
    series,
};
use places::Places;
use response::ApiError;

pub use data::{EXPORTED_TENANT_LABEL, TENANT_LABEL};
pub use usage::{BYTES_OUT, COST, CPU_MS, INVOCATIONS, LOG_BYTES, STATE};

/// The version reported by `/api/v1/status/buildinfo` (the Prometheus API level implemented).
pub const VERSION: &str = "3.0.0-sfaas";

/// What the handlers read: the dashboard's state, and the usage cache (`usage.rs`).
#[derive(Clone)]
struct Api {
    state: DashboardState,
    usage: std::sync::Arc<usage::Cache>,
    /// Places of queries loading or evaluating (evaluation runs on blocking threads, off the
    /// request runtime).
    places: std::sync::Arc<Places>,
    query_timeout: Duration,
    max_samples: usize,
}

impl Api {
    /// Loads what `plan` selects at `times` for `scope` and runs `evaluate` on it with the
    /// query's deadline (it checks the deadline between evaluation steps), once the query has
    /// a place: at the request threads' priority while its scope is within its budget, else on
    /// the background runtime. Returns what `evaluate` made and how long loading took.
    async fn execute<T: Send + 'static>(
        &self,
        scope: Option<String>,
        started: Instant,
        plan: Plan,
        times: Times,
        evaluate: impl FnOnce(&Plan, &[Vec<Series>], Instant) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<(T, Duration), ApiError> {
        let deadline = started + self.query_timeout;
        let place = self.places.take(scope.as_deref(), deadline).await?;
        let (api, placed) = (self.clone(), Instant::now());
        let work = async move {
            let now = api.state.store.clock().now_ms();
            let loaded =
                data::load(&api.state, &api.usage, scope.as_deref(), &plan, &times, now, api.max_samples).await;
            let load = started.elapsed();
            let value = match loaded {
                Ok(loaded) => tokio::task::spawn_blocking(move || evaluate(&plan, &loaded, deadline))
                    .await
                    .map_err(panicked)
                    .and_then(|value| value),
                Err(error) => Err(error.into()),
            };
            api.places.spend(scope.as_deref(), placed.elapsed());
            Ok::<_, ApiError>((value?, load))
        };
        if place.foreground {
            // A panic here is caught by the router's layer, as in any handler.
            work.await
        } else {
            collector::background::spawn(work).await.map_err(panicked)?
        }
    }
}

/// A panic in loading or evaluation is a bug: this query fails, the server goes on.
fn panicked(error: tokio::task::JoinError) -> ApiError {
    tracing::error!(%error, "PromQL evaluation panicked");
    ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "internal", message: "query evaluation failed".into() }
}

/// How the API is served.
#[derive(Debug, Clone)]
pub struct Options {
    /// The usage of a scope (a tenant, or every tenant for the admin) is kept summed per minute
    /// in memory when it has at most this many usage records (0: never; read per query).
    pub cache_max_records: i64,
    /// A query that finds a scope's sums not loaded waits for them (else they load in the
    /// background while queries read per query: the default).
    pub cache_wait: bool,
    /// Longest a query may take, waiting for a place and evaluating (Prometheus's
    /// `--query.timeout`, 2 minutes by default).
    pub query_timeout: Duration,
    /// Most stored samples one query may load (422 `execution` beyond, as Prometheus's
    /// `--query.max-samples`): [`data::MAX_SAMPLES`] by default.
    pub max_samples: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cache_max_records: usage::MAX_CACHED_RECORDS,
            cache_wait: false,
            query_timeout: Duration::from_secs(120),
            max_samples: data::MAX_SAMPLES,
        }
    }
}

pub fn router(state: DashboardState) -> Router {
    router_with(state, Options::default())
}

pub fn router_with(state: DashboardState, options: Options) -> Router {
    routes(state, options, Places::per_core())
}

/// The routes, their queries in `places` (the dashboard's, shared with LogQL's).
pub(crate) fn routes(state: DashboardState, options: Options, places: std::sync::Arc<Places>) -> Router {
    let api = Api {
        state,
        usage: std::sync::Arc::new(usage::Cache::new(options.cache_max_records, options.cache_wait)),
        places,
        query_timeout: options.query_timeout,
        max_samples: options.max_samples,
    };
    // Warm the operator's scope (every tenant) now, so that the first dashboards do not read
    // usage per query while its sums load (a few seconds for 100 000 records).
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let (cache, state) = (api.usage.clone(), api.state.clone());
        runtime.spawn(async move { cache.warm(&state, None).await });
    }
    Router::new()
        .route("/prometheus/api/v1/query", get(query).post(query))
        .route("/prometheus/api/v1/query_range", get(query_range).post(query_range))
        .route("/prometheus/api/v1/series", get(series).post(series))
        .route("/prometheus/api/v1/labels", get(labels).post(labels))
        .route("/prometheus/api/v1/label/{name}/values", get(label_values).post(label_values))
        .route("/prometheus/api/v1/labels/{name}/values", get(label_values).post(label_values))
        .route("/prometheus/api/v1/metadata", get(metadata).post(metadata))
        .route("/prometheus/api/v1/status/buildinfo", get(buildinfo).post(buildinfo))
        .route("/prometheus/api/v1/format_query", get(format_query).post(format_query))
        .route("/prometheus/api/v1/query_exemplars", get(exemplars).post(exemplars))
        .route("/prometheus/api/v1/rules", get(rules).post(rules))
        .route("/prometheus/api/v1/alerts", get(alerts).post(alerts))
        .route("/prometheus", any(not_found))
        .route("/prometheus/", any(not_found))
        .route("/prometheus/{*rest}", any(not_found))
        .with_state(api)
}

/// The tenant the caller reads (`None`: the admin, every tenant).
fn scope(state: &DashboardState, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match state.viewer(headers) {
        Ok(Viewer::Tenant(tenant)) => Ok(Some(tenant)),
        Ok(Viewer::Admin) => Ok(crate::scope_org_id(headers)),
        Err(error) => Err(ApiError {
            status: error.0,
            kind: if error.0 == StatusCode::FORBIDDEN { "forbidden" } else { "unauthorized" },
            message: error.1,
        }),
    }
}
