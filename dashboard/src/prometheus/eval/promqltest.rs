//! A runner for PromQL test files in Prometheus's `promqltest` format, over the files in
//! `testdata/` (written for this project; Prometheus's own `promql/promqltest/testdata`
//! taught the cases). Each file is a script:
//!
//! ```text
//! # a comment
//! load 5m
//!     http_requests{job="api", instance="0"}  0+10x10      # 0 10 20 ... 100, every 5m
//!     gauge{job="api"}                        1 _ 3 NaN Inf _x2 4-1x2
//! clear
//!
//! eval instant at 50m sum by (job) (http_requests)
//!     {job="api"} 100
//!
//! eval range from 0 to 10m step 5m rate(http_requests[10m])
//!     {job="api", instance="0"} _ 0.0333333 0.0333333
//!
//! eval_ordered instant at 50m sort_desc(http_requests)
//!     ...
//! eval_fail instant at 50m a + on(job) b
//! ```
//!
//! Values: `a+bxn` / `a-bxn` are n+1 samples from a stepping by b; `axn` repeats a n+1
//! times; `_` is no sample, `_xn` n of them; `NaN`, `Inf`, `-Inf`; `stale` a staleness marker. An instant `eval`
//! lists the expected samples (`{labels} value`, the name inside or before the braces, a bare
//! number for a scalar); any sample more or less fails. A `range` eval lists each series'
//! values at every step (`_` where it has none). Values agree within 1e-6 relative (as
//! Prometheus's runner), NaN with NaN. Times are durations from 0 (Unix time 0).

use std::sync::Arc;

use super::super::params::parse_duration;
use super::super::parse::parse_query;
use super::{Evaluator, Labels, METRIC_NAME, STALE, Series, SeriesData, Value, plan};

/// One loaded series.
type Loaded = (Labels, Vec<(i64, f64)>);
/// Sorted labels, the name as `__name__`.
type LabelList = Vec<(String, String)>;
/// A result: its labels (`None`: a scalar) and its value at each step (`None`: no value).
type Row = (Option<LabelList>, Vec<Option<f64>>);

fn fail(file: &str, line: usize, message: impl std::fmt::Display) -> String {
    format!("{file}:{line}: {message}")
}

/// `name{a="b", c="d"}` (either part may be missing) as sorted labels.
fn parse_labels(text: &str) -> Result<(LabelList, &str), String> {
    let text = text.trim_start();
    let name_len = text.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(text.len());
    let mut labels = Vec::new();
    if name_len > 0 {
        labels.push((METRIC_NAME.to_string(), text[..name_len].to_string()));
    }
    let mut rest = &text[name_len..];
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start().trim_start_matches(',').trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').ok_or_else(|| format!("expected `=` in {text:?}"))?;
            let name = rest[..eq].trim().to_string();
            rest = rest[eq + 1..].trim_start();
            let body = rest.strip_prefix('"').ok_or_else(|| format!("expected a quoted value in {text:?}"))?;
            let mut value = String::new();
            let mut chars = body.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err(format!("unterminated value in {text:?}")),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("unterminated value in {text:?}")),
                }
            };
            rest = &body[end + 1..];
            if !value.is_empty() {
                labels.push((name, value));
            }
        }
    }
    labels.sort();
    Ok((labels, rest))
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "NaN" => Ok(f64::NAN),
        "Inf" | "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => text.parse().map_err(|_| format!("not a value: {text:?}")),
    }
}

/// A series' values in the load notation, `None` for `_`.
fn expand_values(text: &str) -> Result<Vec<Option<f64>>, String> {
    let mut out = Vec::new();
    for item in text.split_whitespace() {
        if item == "_" {
            out.push(None);
        } else if item == "stale" {
            out.push(Some(STALE));
        } else if let Some(times) = item.strip_prefix("_x") {
            let n: usize = times.parse().map_err(|_| format!("bad repetition {item:?}"))?;
            out.extend(std::iter::repeat_n(None, n));
        } else if let Some((head, times)) = item.rsplit_once('x')
            && let Ok(n) = times.parse::<usize>()
        {
            // `a+bxn`, `a-bxn` (the sign after the first character) or `axn`.
            let split = head.char_indices().skip(1).find(|(_, c)| *c == '+' || *c == '-').map(|(i, _)| i);
            let (start, step) = match split {
                Some(i) => (parse_value(&head[..i])?, parse_value(&head[i..])?),
                None => (parse_value(head)?, 0.0),
            };
            out.extend((0..=n).map(|k| Some(start + step * k as f64)));
        } else {
            out.push(Some(parse_value(item)?));
        }
    }
    Ok(out)
}

fn close(actual: f64, expected: f64) -> bool {
    if actual.is_nan() || expected.is_nan() {
        return actual.is_nan() && expected.is_nan();
    }
    if actual == expected {
        return true;
    }
    let diff = (actual - expected).abs();
    diff <= 1e-6 * expected.abs().max(actual.abs()) || diff < 1e-12
}

fn show(labels: &[(String, String)]) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(", "))
}

struct Eval {
    line: usize,
    query: String,
    /// Instant (`start == end`, `step == 0`) or range.
    start: i64,
    end: i64,
    step: i64,
    ordered: bool,
    fails: bool,
    expected: Vec<Row>,
}

/// Evaluates one `eval` over the loaded series, as the API evaluates a query.
fn evaluate(loaded: &[Loaded], e: &Eval) -> Result<Value, String> {
    let expr = parse_query(Some(&e.query)).map_err(|error| error.message)?;
    let plan = plan(&expr).map_err(|error| error.to_string())?;
    let data: Vec<Vec<Series>> = plan
        .selectors
        .iter()
        .map(|selector| {
            loaded
                .iter()
                .filter(|(labels, _)| selector.matches(labels))
                .map(|(labels, samples)| Series {
                    labels: labels.clone(),
                    data: SeriesData::stored(Arc::new(samples.clone())),
                })
                .collect()
        })
        .collect();
    let evaluator = Evaluator::new(&plan, &data, e.start, e.end, None);
    if e.step == 0 {
        let value = evaluator.eval(&plan.root, e.start).map_err(|error| error.to_string())?;
        return Ok(match value {
            Value::Vector(mut samples) if !plan.keeps_order() => {
                samples.sort_by(|a, b| a.labels.cmp(&b.labels));
                Value::Vector(samples)
            }
            other => other,
        });
    }
    let times = (0..).map(|k| e.start + k * e.step).take_while(|t| *t <= e.end);
    evaluator.range(times).map(Value::Matrix).map_err(|error| error.to_string())
}

/// Compares an answer with what the eval expects; `Err` says how they differ.
fn check(e: &Eval, value: Value) -> Result<(), String> {
    let steps: Vec<i64> = if e.step == 0 {
        vec![e.start]
    } else {
        (0..).map(|k| e.start + k * e.step).take_while(|t| *t <= e.end).collect()
    };
    // The answer as (labels, value at each step), scalars without labels.
    let got: Vec<Row> = match value {
        Value::Scalar(v) => vec![(None, vec![Some(v)])],
        Value::Vector(samples) => samples.into_iter().map(|s| (Some(s.labels.to_vec()), vec![Some(s.value)])).collect(),
        Value::Matrix(series) => series
            .into_iter()
            .map(|(labels, points)| {
                let values = steps.iter().map(|t| points.iter().find(|p| p.0 == *t).map(|p| p.1)).collect();
                (Some(labels.to_vec()), values)
            })
            .collect(),
        Value::Str(s) => return Err(format!("got the string {s:?}")),
    };
    let name = |labels: &Option<LabelList>| labels.as_ref().map_or("scalar".into(), |l| show(l));
    if got.len() != e.expected.len() {
        let got_names: Vec<String> = got.iter().map(|(l, v)| format!("{} {v:?}", name(l))).collect();
        return Err(format!("expected {} results, got {}:\n  {}", e.expected.len(), got.len(), got_names.join("\n  ")));
    }
    for (i, (labels, values)) in e.expected.iter().enumerate() {
        let found =
            if e.ordered { Some(&got[i]).filter(|g| g.0 == *labels) } else { got.iter().find(|g| g.0 == *labels) };
        let Some((_, actual)) = found else {
            let got_names: Vec<String> = got.iter().map(|(l, _)| name(l)).collect();
            return Err(format!("expected {} (result {i}), got {}", name(labels), got_names.join(", ")));
        };
        let expected = values;
        if expected.len() != actual.len()
            || !expected.iter().zip(actual).all(|(x, a)| match (x, a) {
                (Some(x), Some(a)) => close(*a, *x),
                (None, None) => true,
                _ => false,
            })
        {
            return Err(format!("{}: expected {expected:?}, got {actual:?}", name(labels)));
        }
    }
    Ok(())
}

/// Runs one test file; `Err` lists every failed eval.
fn run(file: &str, text: &str) -> Result<usize, String> {
    let mut loaded: Vec<Loaded> = Vec::new();
    let mut failures = Vec::new();
    let mut evals = 0;
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    let body = |i: &mut usize| -> Vec<(usize, &str)> {
        let mut out = Vec::new();
        while *i < lines.len() && (lines[*i].starts_with(' ') || lines[*i].starts_with('\t')) {
            let line = lines[*i].split(" #").next().unwrap_or("").trim();
            if !line.is_empty() && !line.starts_with('#') {
                out.push((*i + 1, line));
            }
            *i += 1;
        }
        out
    };
    while i < lines.len() {
        let (number, line) = (i + 1, lines[i].trim());
        i += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line == "clear" {
            loaded.clear();
        } else if let Some(step) = line.strip_prefix("load ") {
            let step = parse_duration(step.trim()).map_err(|e| fail(file, number, e))?;
            for (number, series) in body(&mut i) {
                let (labels, values) = parse_labels(series).map_err(|e| fail(file, number, e))?;
                let values = expand_values(values).map_err(|e| fail(file, number, e))?;
                let samples: Vec<(i64, f64)> =
                    values.iter().enumerate().filter_map(|(k, v)| v.map(|v| (k as i64 * step, v))).collect();
                let labels = Arc::new(labels);
                match loaded.iter_mut().find(|(l, _)| *l == labels) {
                    Some((_, existing)) => existing.extend(samples),
                    None => loaded.push((labels, samples)),
                }
            }
        } else if let Some(rest) = line.strip_prefix("eval") {
            let (kind, rest) = rest.split_once(' ').ok_or_else(|| fail(file, number, "eval what?"))?;
            let (ordered, fails) = match kind {
                "" => (false, false),
                "_ordered" => (true, false),
                "_fail" => (false, true),
                other => return Err(fail(file, number, format!("unknown eval{other}"))),
            };
            let words: Vec<&str> = rest.splitn(7, ' ').collect();
            let duration = |text: &str| parse_duration(text).map_err(|e| fail(file, number, e));
            let (start, end, step, query) = match words.as_slice() {
                ["instant", "at", at, query @ ..] => {
                    let at = duration(at)?;
                    (at, at, 0, query.join(" "))
                }
                ["range", "from", start, "to", end, "step", rest] => {
                    let (step, query) =
                        rest.split_once(' ').ok_or_else(|| fail(file, number, "range eval needs a query"))?;
                    (duration(start)?, duration(end)?, duration(step)?, query.to_string())
                }
                _ => {
                    return Err(fail(
                        file,
                        number,
                        "expected `eval instant at T Q` or `eval range from A to B step S Q`",
                    ));
                }
            };
            let mut expected = Vec::new();
            for (number, item) in body(&mut i) {
                // A line of values only is a scalar; otherwise labels come first.
                if let Ok(values) = expand_values(item) {
                    expected.push((None, values));
                } else {
                    let (labels, values) = parse_labels(item).map_err(|e| fail(file, number, e))?;
                    expected.push((Some(labels), expand_values(values).map_err(|e| fail(file, number, e))?));
                }
            }
            let eval = Eval { line: number, query, start, end, step, ordered, fails, expected };
            evals += 1;
            let outcome = match (evaluate(&loaded, &eval), eval.fails) {
                (Ok(_), true) => Err("expected an error, got an answer".to_string()),
                (Err(_), true) => Ok(()),
                (Err(error), false) => Err(format!("failed: {error}")),
                (Ok(value), false) => check(&eval, value),
            };
            if let Err(why) = outcome {
                failures.push(fail(file, eval.line, format!("{}\n    {why}", eval.query)));
            }
        } else {
            return Err(fail(file, number, format!("unknown command {line:?}")));
        }
    }
    if failures.is_empty() { Ok(evals) } else { Err(failures.join("\n")) }
}

#[test]
fn promql_test_files_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/prometheus/eval/testdata");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut failures = Vec::new();
    let mut evals = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        match run(&name, &std::fs::read_to_string(path).unwrap()) {
            Ok(n) => evals += n,
            Err(why) => failures.push(why),
        }
    }
    assert!(failures.is_empty(), "{} files, {evals} evals passed; failures:\n{}", files.len(), failures.join("\n"));
    assert!(files.len() >= 6 && evals >= 200, "{} files, {evals} evals in {}", files.len(), dir.display());
}

#[test]
fn the_runner_fails_on_a_wrong_expectation() {
    let script = "load 1m\n    m{a=\"x\"} 1 2 3\n\neval instant at 2m m\n    m{a=\"x\"} 4\n";
    assert!(run("t", script).is_err());
    let script = "load 1m\n    m{a=\"x\"} 1 2 3\n\neval instant at 2m m\n    m{a=\"x\"} 3\n";
    assert_eq!(run("t", script), Ok(1));
}
