//! Entry point for the PromQL fuzz target in `fuzz/` (built by `cargo fuzz`, which sets
//! `--cfg fuzzing`; nothing here is in a normal build).

use std::sync::Arc;

use super::eval::{self, Evaluator, Series, SeriesData};
use super::parse::parse_query;

/// A query checked, parsed, planned and evaluated as `/api/v1/query_range` would, over two
/// small series per selector (one with a counter reset), at a few steps: an `Err` is fine, a
/// panic or a stack overflow is a bug.
pub fn query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(expr) = parse_query(Some(text)) else { return };
    let Ok(plan) = eval::plan(&expr) else { return };
    let samples: Arc<Vec<(i64, f64)>> = Arc::new(
        [1.0, 4.0, 9.0, 2.0, 5.0, f64::NAN, 7.0, 0.0]
            .iter()
            .enumerate()
            .map(|(i, v)| (i as i64 * 15_000, *v))
            .collect(),
    );
    let data: Vec<Vec<Series>> = plan
        .selectors
        .iter()
        .map(|selector| {
            let name = selector.name.clone().unwrap_or_else(|| "m".into());
            ["a", "b"]
                .iter()
                .map(|job| Series {
                    labels: Arc::new(vec![("__name__".into(), name.clone()), ("job".into(), (*job).into())]),
                    data: SeriesData::stored(samples.clone()),
                })
                .collect()
        })
        .collect();
    let evaluator = Evaluator::new(&plan, &data, 0, 120_000, None);
    for t in (0..=120_000).step_by(30_000) {
        let _ = evaluator.eval(&plan.root, t);
    }
}
