//! SVG charts drawn by plotters, readable in light and dark: every stroke and text that
//! plotters draws in black is turned into `currentColor`, so the page's CSS colour applies.

use maud::html;
use plotters::prelude::*;

const WIDTH: u32 = 640;
const HEIGHT: u32 = 240;
const ACCENT: RGBColor = RGBColor(0x2f, 0x7e, 0xd8);

/// A line over time: `points` are (seconds since the epoch, value), at least one.
pub fn line(title: &str, unit: &str, points: &[(i64, f64)]) -> String {
    let mut svg = String::new();
    if points.is_empty() {
        return empty(title);
    }
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        // At least the last day, so that a few points do not fill the whole width.
        let last = points.last().expect("not empty").0;
        let (x0, x1) = (points[0].0.min(last - 86_400), last.max(points[0].0 + 3_600));
        let top = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(f64::MIN_POSITIVE) * 1.1;
        let from = chrono::DateTime::from_timestamp(x0, 0).unwrap_or_default();
        let to = chrono::DateTime::from_timestamp(x1, 0).unwrap_or_default();
        let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(64)
                .build_cartesian_2d(from..to, 0.0..top)?;
            chart
                .configure_mesh()
                .light_line_style(TRANSPARENT)
                .bold_line_style(BLACK.mix(0.12))
                .y_desc(unit)
                .y_label_formatter(&|v| label(*v))
                .x_labels(6)
                .x_label_formatter(&|t| t.format("%m-%d %H:%M").to_string())
                .draw()?;
            let series = points.iter().map(|(t, v)| (chrono::DateTime::from_timestamp(*t, 0).unwrap_or_default(), *v));
            chart.draw_series(LineSeries::new(series.clone(), ACCENT.stroke_width(2)))?;
            chart.draw_series(series.map(|p| Circle::new(p, 2, ACCENT.filled())))?;
            root.present()?;
            Ok(())
        })();
        if let Err(error) = drawn {
            tracing::warn!(%error, title, "chart not drawn");
        }
    }
    themed(svg)
}

/// A histogram of `values` (for example latencies in ms) in `buckets` equal bins.
pub fn histogram(title: &str, unit: &str, values: &[f64], buckets: usize) -> String {
    if values.is_empty() {
        return empty(title);
    }
    let max = values.iter().copied().fold(0.0f64, f64::max).max(1.0);
    let width = max / buckets as f64;
    let mut counts = vec![0u32; buckets];
    for v in values {
        counts[((v / width) as usize).min(buckets - 1)] += 1;
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        let top = counts.iter().copied().max().unwrap_or(1).max(1);
        let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(48)
                .build_cartesian_2d(0.0..max, 0u32..top + top / 10 + 1)?;
            chart
                .configure_mesh()
                .light_line_style(TRANSPARENT)
                .bold_line_style(BLACK.mix(0.12))
                .x_desc(unit)
                .x_label_formatter(&|v| label(*v))
                .y_desc("count")
                .draw()?;
            chart.draw_series(counts.iter().enumerate().map(|(i, &c)| {
                let x = i as f64 * width;
                Rectangle::new([(x, 0), (x + width * 0.9, c)], ACCENT.filled())
            }))?;
            root.present()?;
            Ok(())
        })();
        if let Err(error) = drawn {
            tracing::warn!(%error, title, "chart not drawn");
        }
    }
    themed(svg)
}

/// Bars in groups: `groups` are (group label, values, one per series); `series` names them.
/// Drawn for documents (BENCHMARKS.md): a standalone SVG with a legend.
pub fn grouped_bars(title: &str, unit: &str, series: &[&str], groups: &[(String, Vec<f64>)]) -> String {
    const COLOURS: [RGBColor; 4] =
        [ACCENT, RGBColor(0xe0, 0x7b, 0x20), RGBColor(0x4c, 0xa3, 0x5a), RGBColor(0x99, 0x66, 0xcc)];
    if groups.is_empty() || series.is_empty() {
        return empty(title);
    }
    let top = groups.iter().flat_map(|(_, values)| values.iter().copied()).fold(0.0f64, f64::max).max(1e-9) * 1.4;
    let slots = series.len() as f64 + 1.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT + 40)).into_drawing_area();
        let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 15))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(64)
                .build_cartesian_2d(0.0..groups.len() as f64, 0.0..top)?;
            chart
                .configure_mesh()
                .light_line_style(TRANSPARENT)
                .bold_line_style(BLACK.mix(0.12))
                .disable_x_mesh()
                .y_desc(unit)
                .y_label_formatter(&|v| label(*v))
                .x_labels(groups.len() * 2 + 1)
                .x_label_formatter(&|x| {
                    let i = x.floor() as usize;
                    if (x - x.floor() - 0.5).abs() < 1e-6 && i < groups.len() {
                        groups[i].0.clone()
                    } else {
                        String::new()
                    }
                })
                .draw()?;
            for (s, name) in series.iter().enumerate() {
                let colour = COLOURS[s % COLOURS.len()];
                let bars = groups.iter().enumerate().map(move |(g, (_, values))| {
                    let x = g as f64 + (s as f64 + 0.5) / slots;
                    let value = values.get(s).copied().unwrap_or(0.0);
                    Rectangle::new([(x, 0.0), (x + 0.9 / slots, value)], colour.filled())
                });
                chart
                    .draw_series(bars)?
                    .label(*name)
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.0))
                .border_style(BLACK.mix(0.3))
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
            root.present()?;
            Ok(())
        })();
        if let Err(error) = drawn {
            tracing::warn!(%error, title, "chart not drawn");
        }
    }
    themed(svg)
}

/// An axis label with the digits that matter at its scale.
fn label(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude == 0.0 {
        "0".into()
    } else if magnitude >= 100.0 {
        format!("{value:.0}")
    } else if magnitude >= 0.01 {
        format!("{value:.2}")
    } else {
        format!("{value:.1e}")
    }
}

fn empty(title: &str) -> String {
    let markup = html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height="60" role="img" {
            text x="8" y="34" font-family="sans-serif" font-size="14" fill="currentColor" { (title) ": no data yet" }
        }
    };
    markup.into_string()
}

/// Black strokes and text follow the page's colour; the white background goes.
fn themed(svg: String) -> String {
    svg.replace("fill=\"#000000\"", "fill=\"currentColor\"")
        .replace("stroke=\"#000000\"", "stroke=\"currentColor\"")
        .replace("fill=\"#FFFFFF\"", "fill=\"none\"")
        .replacen("<svg ", "<svg role=\"img\" class=\"chart\" ", 1)
}
