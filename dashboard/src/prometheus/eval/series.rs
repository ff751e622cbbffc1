//! The loaded series: stored samples, or counters synthesized from usage records, read at an
//! instant or over a window as the evaluator and the functions need them.

use std::borrow::Cow;
use std::sync::Arc;

use super::plan::Selector;
use super::{LOOKBACK_MS, Labels, QueryError};

/// The resolution of the synthesized counters: a sample every minute, at whole minutes.
pub const RESOLUTION_MS: i64 = 60_000;

/// A counter synthesized from usage records, sampled every [`RESOLUTION_MS`] from `first` to
/// `last`; its value at a sample time is the cumulative sum of what started before it.
/// `points` are (time, cumulative) at every time where it may be read (see `usage.rs`).
#[derive(Debug, Clone)]
pub struct Counter {
    pub first: i64,
    pub last: i64,
    pub points: Vec<(i64, f64)>,
}

impl Counter {
    /// The value at sample time `t` (0 before anything happened).
    pub fn at(&self, t: i64) -> f64 {
        let i = self.points.partition_point(|p| p.0 <= t);
        if i == 0 { 0.0 } else { self.points[i - 1].1 }
    }

    /// The last sample time at or before `t`.
    fn last_sample(&self, t: i64) -> Option<i64> {
        let l = t.div_euclid(RESOLUTION_MS).saturating_mul(RESOLUTION_MS).min(self.last);
        (l >= self.first).then_some(l)
    }

    /// The first sample time after `t`.
    fn first_sample_after(&self, t: i64) -> i64 {
        (t.div_euclid(RESOLUTION_MS) * RESOLUTION_MS + RESOLUTION_MS).max(self.first)
    }
}

/// The value that marks a series stale from its time on (Prometheus's staleness marker, a
/// NaN of its own): instant selectors do not read past it, windows leave it out.
pub const STALE: f64 = f64::from_bits(0x7ff0_0000_0000_0002);

pub fn is_stale(value: f64) -> bool {
    value.to_bits() == STALE.to_bits()
}

/// The samples without staleness markers (borrowed when there are none).
fn without_markers(slice: &[(i64, f64)]) -> Cow<'_, [(i64, f64)]> {
    if slice.iter().any(|s| is_stale(s.1)) {
        Cow::Owned(slice.iter().filter(|s| !is_stale(s.1)).copied().collect())
    } else {
        Cow::Borrowed(slice)
    }
}

#[derive(Debug, Clone)]
pub enum SeriesData {
    /// Stored samples, in time order; staleness markers among them are [`STALE`], and
    /// `marked` says whether there are any (most series have none: their windows are read as
    /// they are).
    Samples {
        points: Arc<Vec<(i64, f64)>>,
        marked: bool,
    },
    Counter(Arc<Counter>),
}

#[derive(Debug, Clone)]
pub struct Series {
    pub labels: Labels,
    pub data: SeriesData,
}

/// The samples of one series in a window `(e - range, e]`, as rate-like functions read them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Window {
    pub(super) first: (i64, f64),
    pub(super) last: (i64, f64),
    pub(super) previous: Option<(i64, f64)>,
    pub(super) count: usize,
    /// What counter resets add back (Prometheus: every drop adds the value before it).
    pub(super) correction: f64,
}

impl Window {
    /// The window of these samples (in time order, no staleness markers), `None` when there
    /// are none.
    pub(super) fn of(slice: &[(i64, f64)]) -> Option<Window> {
        let (first, last) = (*slice.first()?, *slice.last()?);
        let mut correction = 0.0;
        let mut last_value = 0.0;
        for s in slice.iter() {
            if s.1 < last_value {
                correction += last_value;
            }
            last_value = s.1;
        }
        Some(Window {
            first,
            last,
            previous: (slice.len() >= 2).then(|| slice[slice.len() - 2]),
            count: slice.len(),
            correction,
        })
    }
}

impl SeriesData {
    /// Stored samples (in time order).
    pub fn stored(points: Arc<Vec<(i64, f64)>>) -> Self {
        let marked = points.iter().any(|p| is_stale(p.1));
        SeriesData::Samples { points, marked }
    }

    /// The sample an instant selector reads at `e`: the last within the lookback.
    pub(super) fn instant(&self, e: i64) -> Option<(i64, f64)> {
        match self {
            SeriesData::Samples { points: samples, .. } => {
                let i = samples.partition_point(|s| s.0 <= e);
                let (t, v) = *samples.get(i.checked_sub(1)?)?;
                (t > e - LOOKBACK_MS && !is_stale(v)).then_some((t, v))
            }
            SeriesData::Counter(c) => {
                let l = c.last_sample(e)?;
                (l > e - LOOKBACK_MS).then(|| (l, c.at(l)))
            }
        }
    }

    pub(super) fn window(&self, e: i64, range: i64) -> Option<Window> {
        match self {
            SeriesData::Samples { points: samples, marked } => {
                let lo = samples.partition_point(|s| s.0 <= e - range);
                let hi = samples.partition_point(|s| s.0 <= e);
                let slice = samples.get(lo..hi)?;
                if *marked { Window::of(&without_markers(slice)) } else { Window::of(slice) }
            }
            SeriesData::Counter(c) => {
                let l = c.last_sample(e)?;
                let f = c.first_sample_after(e - range);
                if l < f {
                    return None;
                }
                let count = ((l - f) / RESOLUTION_MS + 1) as usize;
                Some(Window {
                    first: (f, c.at(f)),
                    last: (l, c.at(l)),
                    previous: (count >= 2).then(|| (l - RESOLUTION_MS, c.at(l - RESOLUTION_MS))),
                    count,
                    correction: 0.0,
                })
            }
        }
    }

    /// Every sample in the window `(e - range, e]`.
    pub(super) fn samples(&self, e: i64, range: i64) -> Cow<'_, [(i64, f64)]> {
        match self {
            SeriesData::Samples { points: samples, marked } => {
                let lo = samples.partition_point(|s| s.0 <= e - range);
                let hi = samples.partition_point(|s| s.0 <= e);
                if *marked { without_markers(&samples[lo..hi]) } else { Cow::Borrowed(&samples[lo..hi]) }
            }
            SeriesData::Counter(c) => {
                let Some(l) = c.last_sample(e) else { return Cow::Borrowed(&[]) };
                let mut t = c.first_sample_after(e - range);
                let mut out = Vec::new();
                while t <= l {
                    out.push((t, c.at(t)));
                    t += RESOLUTION_MS;
                }
                Cow::Owned(out)
            }
        }
    }
}

/// Most sample times of the synthesized counters one query may read: a year of minutes and
/// more. A range over every minute of `[1000000y]` would otherwise be pushed one by one.
pub const MAX_COUNTER_READS: usize = 1 << 20;

/// Which sample times of the synthesized counters a selector reads at evaluation time `e`
/// (the same arithmetic as [`SeriesData::instant`] and [`SeriesData::window`]), with `last`
/// the counters' last sample time; refused beyond [`MAX_COUNTER_READS`] in all.
pub fn counter_read_times(selector: &Selector, e: i64, last: i64, out: &mut Vec<i64>) -> Result<(), QueryError> {
    let l = e.div_euclid(RESOLUTION_MS).saturating_mul(RESOLUTION_MS).min(last);
    out.push(l);
    if let Some(range) = selector.range_ms {
        let f = e
            .saturating_sub(range)
            .div_euclid(RESOLUTION_MS)
            .saturating_mul(RESOLUTION_MS)
            .saturating_add(RESOLUTION_MS);
        if f <= l {
            out.push(f);
            if selector.needs_previous {
                out.push(l - RESOLUTION_MS);
            }
            if selector.all_samples {
                // Counted before any is pushed: the range may hold billions of minutes.
                let minutes = usize::try_from((l - f) / RESOLUTION_MS).unwrap_or(usize::MAX);
                if minutes > MAX_COUNTER_READS.saturating_sub(out.len()) {
                    return Err(too_many_counter_reads());
                }
                out.extend((0..minutes as i64).map(|i| f + i * RESOLUTION_MS));
            }
        }
    }
    if out.len() > MAX_COUNTER_READS {
        return Err(too_many_counter_reads());
    }
    Ok(())
}

fn too_many_counter_reads() -> QueryError {
    QueryError::Execution(format!(
        "the query reads the usage counters at more than {MAX_COUNTER_READS} minutes: use fewer steps or a shorter range"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staleness_marker_ends_a_series_until_its_next_sample() {
        let data = SeriesData::stored(Arc::new(vec![(0, 1.0), (60_000, 2.0), (120_000, STALE), (240_000, 4.0)]));
        assert_eq!(data.instant(119_999), Some((60_000, 2.0)));
        assert_eq!(data.instant(120_000), None);
        assert_eq!(data.instant(200_000), None);
        assert_eq!(data.instant(240_000), Some((240_000, 4.0)));
        assert_eq!(data.samples(300_000, 300_000).as_ref(), &[(60_000, 2.0), (240_000, 4.0)]);
        let w = data.window(240_000, 240_000).unwrap();
        assert_eq!((w.first, w.last, w.count), ((60_000, 2.0), (240_000, 4.0), 2));
    }

    #[test]
    fn counter_windows_follow_the_minute_grid() {
        let c = Counter { first: 60_000, last: 600_000, points: vec![(120_000, 1.0), (300_000, 3.0)] };
        let data = SeriesData::Counter(Arc::new(c));
        assert_eq!(data.instant(59_999), None);
        assert_eq!(data.instant(150_000), Some((120_000, 1.0)));
        assert_eq!(data.instant(10_000_000), None, "past the last sample + lookback");
        let w = data.window(300_000, 300_000).unwrap();
        assert_eq!((w.first, w.last, w.count), ((60_000, 0.0), (300_000, 3.0), 5));
    }
}
