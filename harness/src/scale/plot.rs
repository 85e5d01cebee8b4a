//! One SVG with two panels, total time and data sent against guest size
//! (both axes logarithmic: idle costs milliseconds and kilobytes where a
//! sweep costs seconds and gigabytes), one line per workload.

use std::path::Path;

use plotters::prelude::*;

use super::ScalePoint;

const COLORS: [RGBColor; 4] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
];

/// Draws `points` into `path`.
///
/// # Errors
/// What plotters said, as text.
pub fn write_plot(path: &Path, points: &[ScalePoint]) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let root = root
        .titled(
            "vmigrate: cost against guest size (loopback)",
            ("sans-serif", 18),
        )
        .map_err(|x| e(&x))?;
    let panels = root.split_evenly((1, 2));
    let mut workloads: Vec<&str> = Vec::new();
    for p in points {
        if !workloads.contains(&p.workload.as_str()) {
            workloads.push(&p.workload);
        }
    }
    let gib = |p: &ScalePoint| p.mem_bytes as f64 / f64::from(1u32 << 30);
    let xmin = points.iter().map(gib).fold(f64::INFINITY, f64::min);
    let xmax = points.iter().map(gib).fold(0.0, f64::max);
    if !(xmin.is_finite() && xmax > 0.0) {
        return Err("no points".into());
    }
    type Value = fn(&ScalePoint) -> Option<f64>;
    let metrics: [(&str, &str, Value); 2] = [
        ("total migration time", "seconds", |p| p.total_s),
        ("data sent", "GiB on the wire", |p| p.wire_gib),
    ];
    for (panel, (title, axis, value)) in panels.iter().zip(metrics) {
        let ys: Vec<f64> = points
            .iter()
            .filter_map(value)
            .filter(|v| *v > 0.0)
            .collect();
        let ymin = ys.iter().copied().fold(f64::INFINITY, f64::min);
        let ymax = ys.iter().copied().fold(0.0, f64::max);
        if !(ymin.is_finite() && ymax > 0.0) {
            continue;
        }
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (xmin / 1.3..xmax * 1.3).log_scale(),
                (ymin / 2.0..ymax * 2.0).log_scale(),
            )
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("guest RAM (GiB)")
            .y_desc(axis)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(|x| e(&x))?;
        for (i, w) in workloads.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let line: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.workload == *w)
                .filter_map(|p| value(p).filter(|v| *v > 0.0).map(|v| (gib(p), v)))
                .collect();
            let policy = points
                .iter()
                .find(|p| p.workload == *w)
                .map_or("", |p| p.policy.as_str());
            chart
                .draw_series(std::iter::once(PathElement::new(
                    line.clone(),
                    color.stroke_width(2),
                )))
                .map_err(|x| e(&x))?
                .label(format!("{w} ({policy})    "))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
                });
            chart
                .draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}
