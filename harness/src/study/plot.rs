//! SVG charts of the summary: for each link and metric, one grouped bar
//! chart with a group per workload and a bar per policy.
//!
//! One file per link × metric (`plot-<link>-<metric>.svg`) keeps every
//! chart readable at any study size and lets a reader compare all policies
//! on all workloads at a glance, which is the question the study asks.
//! Policies that never completed are drawn as hollow bars at what they
//! reached when the cap stopped them (time run, bytes sent so far) and
//! marked ✗; partly successful ones carry their `completed/runs` count.
//! SVG only: text is written as `<text>` elements, so no font library is
//! needed to draw (a viewer renders the text).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use thiserror::Error;

use super::summary::SummaryRow;

/// A chart could not be drawn or written.
#[derive(Debug, Error)]
#[error("cannot draw {path}: {message}")]
pub struct PlotError {
    /// The SVG file.
    pub path: PathBuf,
    /// What plotters said.
    pub message: String,
}

/// Okabe–Ito colours (distinguishable with colour-blindness), then greys.
const COLORS: [RGBColor; 10] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
    RGBColor(120, 120, 120),
    RGBColor(180, 180, 180),
];

/// A metric to chart: title, axis label, file stem, and how to read the
/// value of a completed group and (for hollow bars) of a failed one.
struct Metric {
    stem: &'static str,
    title: &'static str,
    axis: &'static str,
    done: fn(&SummaryRow) -> Option<f64>,
    failed: fn(&SummaryRow) -> Option<f64>,
}

const METRICS: [Metric; 4] = [
    Metric {
        stem: "total-time",
        title: "total migration time",
        axis: "seconds (median of completed runs)",
        done: |r| r.total_time_s,
        failed: |r| r.failed_time_s,
    },
    Metric {
        stem: "downtime",
        title: "downtime",
        axis: "milliseconds (median of completed runs)",
        done: |r| r.downtime_ms,
        failed: |_| None,
    },
    Metric {
        stem: "bytes",
        title: "data sent",
        axis: "GiB on the wire (median of completed runs)",
        done: |r| r.sent_mib.map(|m| m / 1024.0),
        failed: |r| r.failed_sent_mib.map(|m| m / 1024.0),
    },
    Metric {
        stem: "guest-speed",
        title: "guest speed during migration",
        axis: "passes/s during ÷ before (1 = no slowdown)",
        done: |r| r.degradation.filter(|_| r.completed > 0),
        failed: |r| r.degradation,
    },
];

/// Draws every link × metric chart into `dir`; returns the files written.
///
/// # Errors
/// [`PlotError`] for the first chart that cannot be written.
pub fn write_plots(
    dir: &Path,
    study: &str,
    rows: &[SummaryRow],
) -> Result<Vec<PathBuf>, PlotError> {
    let mut links: Vec<&str> = Vec::new();
    for r in rows {
        if !links.contains(&r.link.as_str()) {
            links.push(&r.link);
        }
    }
    let mut files = Vec::new();
    for link in links {
        let of_link: Vec<&SummaryRow> = rows.iter().filter(|r| r.link == link).collect();
        for m in &METRICS {
            let path = dir.join(format!("plot-{link}-{}.svg", m.stem));
            let title = format!("{study}: {} on link {link}", m.title);
            if draw(&path, &title, m, &of_link).map_err(|message| PlotError {
                path: path.clone(),
                message,
            })? {
                files.push(path);
            }
        }
    }
    Ok(files)
}

/// Draws one chart; false when there is nothing to draw.
fn draw(path: &Path, title: &str, m: &Metric, rows: &[&SummaryRow]) -> Result<bool, String> {
    let mut workloads: Vec<&str> = Vec::new();
    let mut policies: Vec<&str> = Vec::new();
    for r in rows {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
        if !policies.contains(&r.policy.as_str()) {
            policies.push(&r.policy);
        }
    }
    let value = |r: &SummaryRow| {
        if r.completed > 0 {
            (m.done)(r)
        } else {
            (m.failed)(r)
        }
    };
    let ymax = rows.iter().filter_map(|r| value(r)).fold(0.0_f64, f64::max);
    if ymax <= 0.0 {
        return Ok(false);
    }
    let bar_w = 22_u32;
    let group_w = (bar_w * u32::try_from(policies.len()).unwrap_or(u32::MAX / 64) + 40).max(130);
    let width = (110 + group_w * u32::try_from(workloads.len()).unwrap_or(64)).clamp(640, 4000);
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| e.to_string();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let n = workloads.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n, 0.0..ymax * 1.18)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(m.axis)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|x| e(&x))?;
    let slot = 0.8 / policies.len() as f64;
    for (pi, policy) in policies.iter().enumerate() {
        let color = COLORS[pi % COLORS.len()];
        let mut bars = Vec::new();
        let mut marks = Vec::new();
        for (wi, workload) in workloads.iter().enumerate() {
            let Some(r) = rows
                .iter()
                .find(|r| r.workload == *workload && r.policy == *policy)
            else {
                continue;
            };
            let x0 = wi as f64 + 0.1 + pi as f64 * slot;
            let x1 = x0 + slot * 0.9;
            let label_pos = (x0 + slot * 0.45, 0.0);
            match value(r) {
                Some(v) if r.completed > 0 => {
                    bars.push(Rectangle::new([(x0, 0.0), (x1, v)], color.filled()));
                    let mut text = if v < ymax / 1000.0 {
                        "≈0".to_owned()
                    } else {
                        short(v)
                    };
                    if r.completed < r.runs {
                        text = format!("{text} ({})", r.success);
                    }
                    marks.push((text, (label_pos.0, v)));
                }
                Some(v) => {
                    bars.push(Rectangle::new([(x0, 0.0), (x1, v)], color.stroke_width(2)));
                    marks.push((format!("✗ {} at cap", short(v)), (label_pos.0, v)));
                }
                None if r.completed == 0 => marks.push((
                    if r.errors == r.runs { "err" } else { "✗" }.to_owned(),
                    label_pos,
                )),
                None => {}
            }
        }
        chart
            .draw_series(bars)
            .map_err(|x| e(&x))?
            // Padded: the built-in text measure underestimates real fonts.
            .label(format!("{policy}    "))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        let style = TextStyle::from(("sans-serif", 10).into_font())
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart
            .draw_series(
                marks
                    .into_iter()
                    .map(|(t, p)| Text::new(t, p, style.clone())),
            )
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|x| e(&x))?;
    let style =
        TextStyle::from(("sans-serif", 12).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (wi, w) in workloads.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(wi as f64 + 0.5, 0.0));
        root.draw(&Text::new(w.to_string(), (px, py + 8), style.clone()))
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(true)
}

/// A bar's value in 3 significant digits (`1.81`, `68.1`, `0.00412`).
fn short(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let mut digits = 2_usize;
    let mut x = v.abs();
    while x < 1.0 && digits < 6 {
        x *= 10.0;
        digits += 1;
    }
    if x >= 100.0 {
        digits = 0;
    } else if x >= 10.0 {
        digits = 1;
    }
    format!("{v:.digits$}")
}

#[cfg(test)]
mod tests {
    use super::short;

    #[test]
    fn three_significant_digits() {
        assert_eq!(short(1.8102), "1.81");
        assert_eq!(short(68.137), "68.1");
        assert_eq!(short(1234.6), "1235");
        assert_eq!(short(0.004123), "0.00412");
        assert_eq!(short(0.0), "0");
    }
}
