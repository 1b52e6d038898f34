//! PNG charts drawn with plotters: IOPS and latency per job per target, and the scaling curve.
//! Text needs a TrueType font; plotters' pure-Rust `ab_glyph` renderer is given the first
//! installed one of a few common fonts (or `$URINGBLK_BENCH_FONT`).

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::matrix::Phase;
use crate::report::{PointSummary, Summary};
use crate::stats::Spread;
use crate::targets::{Backend, Target};
use crate::BenchError;

const FONT: &str = "sans-serif";
const FONT_CANDIDATES: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];

fn chart_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Chart(e.to_string())
}

/// Registers a font for chart text; an error names the package that provides one.
pub fn load_font() -> Result<PathBuf, BenchError> {
    let from_env = std::env::var_os("URINGBLK_BENCH_FONT").map(PathBuf::from);
    let path = from_env
        .into_iter()
        .chain(FONT_CANDIDATES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BenchError::Chart(
                "no TrueType font found for chart text: install fonts-dejavu-core \
                 (or set URINGBLK_BENCH_FONT to a .ttf file)"
                    .into(),
            )
        })?;
    let bytes = std::fs::read(&path).map_err(|e| BenchError::io(&path, e))?;
    // plotters keeps fonts for the life of the process; they are loaded once per run.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT, FontStyle::Normal, bytes)
        .map_err(|_| BenchError::Chart(format!("{} is not a usable font", path.display())))?;
    Ok(path)
}

fn color(target: Target) -> RGBColor {
    match target {
        Target::UringblkFile => RGBColor(31, 90, 170),
        Target::UringblkNull => RGBColor(120, 170, 230),
        Target::QsdFile => RGBColor(215, 110, 20),
        Target::QsdNull => RGBColor(245, 180, 110),
        Target::Host => RGBColor(110, 110, 110),
        Target::UringblkRbd => RGBColor(40, 150, 80),
        Target::QsdRbd => RGBColor(200, 60, 60),
    }
}

/// Writes every chart the summary has data for; returns the files written.
pub fn draw_all(summary: &Summary, dir: &Path) -> Result<Vec<PathBuf>, BenchError> {
    let mut written = Vec::new();
    let iops = dir.join("iops.png");
    draw_matrix(summary, &iops, MatrixMetric::Iops)?;
    written.push(iops);
    let latency = dir.join("latency.png");
    draw_matrix(summary, &latency, MatrixMetric::Latency)?;
    written.push(latency);
    if summary.points.iter().any(|p| p.phase == Phase::Scaling) {
        let scaling = dir.join("scaling.png");
        draw_scaling(summary, &scaling)?;
        written.push(scaling);
    }
    Ok(written)
}

#[derive(Clone, Copy, PartialEq)]
enum MatrixMetric {
    Iops,
    Latency,
}

/// One panel per (job, queues), one bar per target: the median, with a min–max whisker over the
/// runs. Latency bars are p99, with the p50 median as a black tick.
fn draw_matrix(summary: &Summary, path: &Path, metric: MatrixMetric) -> Result<(), BenchError> {
    let rows = summary.matrix_rows();
    let targets: Vec<Target> = Target::ALL
        .iter()
        .copied()
        .filter(|t| summary.settings.targets.contains(t))
        .collect();
    let cols = 3usize;
    let panel_rows = rows.len().div_ceil(cols).max(1);
    let size = (1800u32, 90 + 330 * panel_rows as u32);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let title = match metric {
        MatrixMetric::Iops => "IOPS per job and target (bar: median; whisker: min–max of runs)",
        MatrixMetric::Latency => {
            "Latency µs per job and target (bar: p99 median, whisker: p99 min–max; tick: p50)"
        }
    };
    let subtitle = format!(
        "{} · {} mode · {} · server CPU {}, client CPU {}",
        summary.run_id,
        summary.settings.mode,
        summary.machine.cpu_model,
        crate::targets::cpu_list(&summary.settings.server_cpus),
        crate::targets::cpu_list(&summary.settings.client_cpus)
    );
    let (header, body) = root.split_vertically(70);
    header
        .draw(&Text::new(title, (20, 10), (FONT, 26).into_font()))
        .map_err(chart_err)?;
    header
        .draw(&Text::new(
            subtitle,
            (20, 42),
            (FONT, 17).into_font().color(&RGBColor(80, 80, 80)),
        ))
        .map_err(chart_err)?;
    let panels = body.split_evenly((panel_rows, cols));
    for ((job, queues), panel) in rows.iter().zip(panels.iter()) {
        let bar = |t: Target| {
            let p = summary.point(Phase::Matrix, t, job, *queues);
            match metric {
                MatrixMetric::Iops => (t, p.and_then(|p| p.iops), None),
                MatrixMetric::Latency => (
                    t,
                    p.and_then(|p| p.lat_p99_us),
                    p.and_then(|p| p.lat_p50_us),
                ),
            }
        };
        // The null backends run an order of magnitude faster than any disk: they get their own
        // scale, on the right of each panel.
        let file_bars: Vec<_> = targets
            .iter()
            .copied()
            .filter(|t| t.backend() == Backend::File)
            .map(bar)
            .collect();
        let null_bars: Vec<_> = targets
            .iter()
            .copied()
            .filter(|t| t.backend() == Backend::Null)
            .map(bar)
            .collect();
        let (title, rest) = panel.split_vertically(30);
        title
            .draw(&Text::new(
                format!("{job}, {queues} queue(s)"),
                (12, 6),
                (FONT, 19).into_font(),
            ))
            .map_err(chart_err)?;
        let width = rest.dim_in_pixel().0;
        let split = if null_bars.is_empty() {
            width
        } else if file_bars.is_empty() {
            0
        } else {
            width * 3 / 5
        };
        let (left, right) = rest.split_horizontally(split);
        if !file_bars.is_empty() {
            draw_bar_panel(&left, "file backend, host", &file_bars, metric)?;
        }
        if !null_bars.is_empty() {
            draw_bar_panel(&right, "null backend", &null_bars, metric)?;
        }
    }
    root.present().map_err(chart_err)?;
    Ok(())
}

fn draw_bar_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    caption: &str,
    bars: &[(Target, Option<Spread>, Option<Spread>)],
    metric: MatrixMetric,
) -> Result<(), BenchError> {
    let y_max = bars
        .iter()
        .filter_map(|(_, s, _)| s.map(|s| s.max))
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.15;
    // An integer range's segments include both ends: 0..n-1 gives n bars.
    let last = bars.len().max(1) as i32 - 1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 15))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d((0..last).into_segmented(), 0f64..y_max)
        .map_err(chart_err)?;
    let labels: Vec<&'static str> = bars.iter().map(|(t, _, _)| t.name()).collect();
    let y_desc = match metric {
        MatrixMetric::Iops => "IOPS",
        MatrixMetric::Latency => "µs",
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels
                .get(usize::try_from(*i).unwrap_or(usize::MAX))
                .map_or_else(String::new, |s| s.to_string()),
            SegmentValue::Last => String::new(),
        })
        .y_label_formatter(&|y| match metric {
            MatrixMetric::Iops => crate::report::fmt_count(*y),
            MatrixMetric::Latency => crate::report::fmt_us(*y),
        })
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .draw()
        .map_err(chart_err)?;
    for (i, (target, main, tick)) in bars.iter().enumerate() {
        let i = i as i32;
        let Some(main) = main else {
            chart
                .draw_series(std::iter::once(Text::new(
                    "n/a",
                    (SegmentValue::CenterOf(i), y_max * 0.05),
                    (FONT, 14).into_font(),
                )))
                .map_err(chart_err)?;
            continue;
        };
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), main.median),
            ],
            color(*target).filled(),
        );
        bar.set_margin(0, 0, 10, 10);
        chart.draw_series(std::iter::once(bar)).map_err(chart_err)?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![
                    (SegmentValue::CenterOf(i), main.min),
                    (SegmentValue::CenterOf(i), main.max),
                ],
                BLACK.stroke_width(2),
            )))
            .map_err(chart_err)?;
        if let Some(tick) = tick {
            let mut mark = Rectangle::new(
                [
                    (SegmentValue::Exact(i), tick.median),
                    (SegmentValue::Exact(i + 1), tick.median),
                ],
                BLACK.stroke_width(3),
            );
            mark.set_margin(0, 0, 22, 22);
            chart
                .draw_series(std::iter::once(mark))
                .map_err(chart_err)?;
        }
    }
    Ok(())
}

/// IOPS (top) and p99 latency (bottom) against iothreads, per backend, one line per target.
fn draw_scaling(summary: &Summary, path: &Path) -> Result<(), BenchError> {
    let points: Vec<&PointSummary> = summary
        .points
        .iter()
        .filter(|p| p.phase == Phase::Scaling)
        .collect();
    let max_threads = points.iter().map(|p| p.iothreads).max().unwrap_or(1);
    let root = BitMapBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_err)?;
    let (header, body) = root.split_vertically(50);
    header
        .draw(&Text::new(
            format!(
                "Per-core scaling: randread 4k QD32 per queue, iothreads = queues \
                 (qemu-storage-daemon: 1 iothread) · {}",
                summary.run_id
            ),
            (20, 12),
            (FONT, 24).into_font(),
        ))
        .map_err(chart_err)?;
    let panels = body.split_evenly((2, 2));
    for (column, backend) in [Backend::Null, Backend::File].into_iter().enumerate() {
        for (row, latency) in [false, true].into_iter().enumerate() {
            let area = &panels[row * 2 + column];
            let series: Vec<(Target, Vec<(u32, Spread)>)> = Target::ALL
                .iter()
                .copied()
                .filter(|t| t.backend() == backend && t.server().is_some())
                .map(|t| {
                    let mut line: Vec<(u32, Spread)> = points
                        .iter()
                        .filter(|p| p.target == t)
                        .filter_map(|p| {
                            let s = if latency { p.lat_p99_us } else { p.iops };
                            s.map(|s| (p.iothreads, s))
                        })
                        .collect();
                    line.sort_by_key(|(k, _)| *k);
                    (t, line)
                })
                .filter(|(_, line)| !line.is_empty())
                .collect();
            let y_max = series
                .iter()
                .flat_map(|(_, l)| l.iter().map(|(_, s)| s.max))
                .fold(0.0f64, f64::max)
                .max(1.0)
                * 1.15;
            let caption = format!(
                "{} backend: {}",
                backend.name(),
                if latency { "p99 latency (µs)" } else { "IOPS" }
            );
            let mut chart = ChartBuilder::on(area)
                .caption(caption, (FONT, 19))
                .margin(14)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0u32..max_threads + 1, 0f64..y_max)
                .map_err(chart_err)?;
            chart
                .configure_mesh()
                .x_labels(max_threads as usize + 2)
                .x_label_formatter(&|k| {
                    if *k == 0 || *k > max_threads {
                        String::new()
                    } else {
                        k.to_string()
                    }
                })
                .x_desc("iothreads (= queues = server CPUs)")
                .y_label_formatter(&|y| {
                    if latency {
                        crate::report::fmt_us(*y)
                    } else {
                        crate::report::fmt_count(*y)
                    }
                })
                .label_style((FONT, 14))
                .draw()
                .map_err(chart_err)?;
            for (target, line) in &series {
                let c = color(*target);
                chart
                    .draw_series(LineSeries::new(
                        line.iter().map(|(k, s)| (*k, s.median)),
                        c.stroke_width(3),
                    ))
                    .map_err(chart_err)?
                    .label(target.name())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(3))
                    });
                chart
                    .draw_series(
                        line.iter()
                            .map(|(k, s)| Circle::new((*k, s.median), 5, c.filled())),
                    )
                    .map_err(chart_err)?;
                chart
                    .draw_series(line.iter().map(|(k, s)| {
                        PathElement::new(vec![(*k, s.min), (*k, s.max)], BLACK.stroke_width(2))
                    }))
                    .map_err(chart_err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT, 15))
                .draw()
                .map_err(chart_err)?;
        }
    }
    root.present().map_err(chart_err)?;
    Ok(())
}
