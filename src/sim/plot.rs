//! SVG figures of `vmt sim` sweeps (plotters' SVG backend, no fonts needed): makespan ratio and
//! guest-stall p99 against N per strategy (log scales), and the per-node completion CDF of one
//! storm. Pure output: the reports are drawn as they are, nothing is computed here but axes.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use thiserror::Error;

use super::report::{Report, StrategyReport};

#[derive(Debug, Error)]
pub enum PlotError {
    #[error("drawing {path}: {reason}")]
    Draw { path: String, reason: String },
    #[error("nothing to draw: no strategy ran at any N")]
    Empty,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One line per strategy: (N, value) for every report in which the strategy ran.
fn series(reports: &[Report], value: impl Fn(&StrategyReport) -> f64) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in reports {
        for s in r.strategies.iter().filter(|s| s.skipped.is_none()) {
            let name = s.strategy.name().to_string();
            let point = (f64::from(s.nodes), value(s));
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push(point),
                None => out.push((name, vec![point])),
            }
        }
    }
    for (_, pts) in &mut out {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

fn draw_err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |reason| PlotError::Draw { path: path.display().to_string(), reason }
}

/// Values below this are drawn at it (a log axis has no 0: a stall p99 of 0 ms, say).
const FLOOR: f64 = 0.01;

/// A log-log line chart of `lines` into `path`.
fn against_n(path: &Path, title: &str, y_desc: &str, lines: &[(String, Vec<(f64, f64)>)]) -> Result<(), PlotError> {
    let err = draw_err(path);
    let max_n = lines.iter().flat_map(|(_, p)| p.iter().map(|x| x.0)).fold(1.0f64, f64::max);
    // Both axes logarithmic: direct reads grow a thousandfold where the relays stay near 1.
    let lines: Vec<(String, Vec<(f64, f64)>)> =
        lines.iter().map(|(n, p)| (n.clone(), p.iter().map(|&(x, y)| (x, y.max(FLOOR))).collect())).collect();
    let max_y = lines.iter().flat_map(|(_, p)| p.iter().map(|x| x.1)).fold(FLOOR, f64::max);
    let min_y = lines.iter().flat_map(|(_, p)| p.iter().map(|x| x.1)).fold(max_y, f64::min);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..max_n * 1.5).log_scale(), (min_y * 0.8..max_y * 1.5).log_scale())
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .x_desc("nodes booting at once (N)")
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (k, (name, pts)) in lines.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(|e| err(e.to_string()))?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft).map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// The series' legend, boxed, at `pos`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
}

/// The share of nodes done by each time, per strategy, for one report.
fn cdf(path: &Path, r: &Report) -> Result<(), PlotError> {
    let err = draw_err(path);
    let ran: Vec<&StrategyReport> = r.strategies.iter().filter(|s| !s.node_times_s.is_empty()).collect();
    let max_t = ran.iter().flat_map(|s| s.node_times_s.iter().copied()).fold(0.0f64, f64::max);
    let n = ran.first().map_or(0, |s| s.nodes);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Guests done over time, one storm of N = {n}"), ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(max_t * 1.05).max(1e-3), 0f64..1.0)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .x_desc("seconds since the guest's start")
        .y_desc("share of nodes whose boot is done")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (k, s) in ran.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let total = s.node_times_s.len() as f64;
        let pts = s.node_times_s.iter().enumerate().map(|(i, &t)| (t, (i + 1) as f64 / total));
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(s.strategy.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight).map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Writes `ratio.svg`, `stall-p99.svg` and `cdf.svg` (the largest N's storm) into `dir`.
pub fn write(reports: &[Report], dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let ratio = series(reports, |s| s.ratio);
    if ratio.is_empty() {
        return Err(PlotError::Empty);
    }
    let stall = series(reports, |s| s.stall_p99_ms);
    let paths = [dir.join("ratio.svg"), dir.join("stall-p99.svg"), dir.join("cdf.svg")];
    against_n(&paths[0], "Makespan ÷ makespan at N = 1 (vmt sim)", "makespan ratio", &ratio)?;
    against_n(&paths[1], "Guest read stall, 99th percentile (vmt sim)", "stall p99 (ms)", &stall)?;
    let largest = reports.iter().max_by_key(|r| r.params.nodes).ok_or(PlotError::Empty)?;
    cdf(&paths[2], largest)?;
    Ok(paths.to_vec())
}
