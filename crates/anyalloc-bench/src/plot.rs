//! SVG plots with `plotters` (SVG backend only: text is written as SVG
//! `<text>` elements, so no font files or system libraries are needed).
//!
//! Two kinds: grouped bars with error bars (the spread), and lines over a
//! size sweep (log-log, error bars at each point).

use std::path::Path;

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;

/// A linear f64 axis whose ticks are exactly `keys` (group centres, or the
/// sizes of a sweep), labelled by the chart's formatter.
#[derive(Clone)]
struct KeyedAxis {
    lo: f64,
    hi: f64,
    keys: Vec<f64>,
}

impl Ranged for KeyedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let f = (v - self.lo) / (self.hi - self.lo);
        limit.0 + (f * (limit.1 - limit.0) as f64).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, _hint: H) -> Vec<f64> {
        self.keys.clone()
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

/// One plotted value with its spread (`lo..=hi`, e.g. p25..=p75).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    /// The value (median).
    pub value: f64,
    /// Lower end of the error bar.
    pub lo: f64,
    /// Upper end of the error bar.
    pub hi: f64,
}

impl Bar {
    /// A value without spread.
    pub fn exact(v: f64) -> Bar {
        Bar {
            value: v,
            lo: v,
            hi: v,
        }
    }
}

/// A named series: one optional bar per group (or per x point).
pub type Series = (String, Vec<Option<Bar>>);

const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// A y tick label: no trailing `.0` noise.
fn tick(v: f64) -> String {
    if v.abs() >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Grouped bars: `groups` along x, one bar per series in each group, with
/// error bars. `log_y` for values spanning decades.
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[Series],
    log_y: bool,
) -> Result<(), String> {
    let n = groups.len().max(1);
    let k = series.len().max(1);
    let values = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .flat_map(|b| [b.value, b.hi]);
    let ymax = values.clone().fold(0f64, f64::max).max(1e-9);
    let ymin_pos = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .map(|b| b.lo.min(b.value))
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let longest = groups.iter().map(|g| g.chars().count()).max().unwrap_or(4);
    let group_px = (40 + 22 * k).max(8 * longest + 16);
    let width = (160 + n * group_px).clamp(700, 1600) as u32;
    let root = SVGBackend::new(path, (width, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let key: Vec<f64> = (0..n).map(|g| g as f64).collect();
    let x = KeyedAxis {
        lo: -0.5,
        hi: n as f64 - 0.5,
        keys: key,
    };
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80);
    let bar_w = 0.8 / k as f64;
    let legend_pos = SeriesLabelPosition::UpperRight;
    macro_rules! draw {
        ($chart:expr, $base:expr) => {{
            let mut chart = $chart;
            let names = groups.to_vec();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_label_formatter(&|v: &f64| {
                    let g = v.round();
                    if (v - g).abs() < 1e-6 && g >= 0.0 && (g as usize) < names.len() {
                        names[g as usize].clone()
                    } else {
                        String::new()
                    }
                })
                .y_desc(y_label)
                .y_label_formatter(&|v: &f64| tick(*v))
                .y_labels(12)
                .max_light_lines(0)
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(err)?;
            for (i, (name, bars)) in series.iter().enumerate() {
                let c = color(i);
                let x0 = |g: usize| g as f64 - 0.4 + i as f64 * bar_w;
                let rects = bars.iter().enumerate().filter_map(|(g, b)| {
                    b.map(|b| {
                        Rectangle::new(
                            [
                                (x0(g) + bar_w * 0.05, $base),
                                (x0(g) + bar_w * 0.95, b.value),
                            ],
                            c.filled(),
                        )
                    })
                });
                chart
                    .draw_series(rects)
                    .map_err(err)?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled())
                    });
                let errs = bars.iter().enumerate().filter_map(|(g, b)| {
                    b.filter(|b| b.hi > b.lo).map(|b| {
                        ErrorBar::new_vertical(
                            x0(g) + bar_w / 2.0,
                            b.lo.max($base),
                            b.value,
                            b.hi,
                            BLACK.stroke_width(1),
                            6,
                        )
                    })
                });
                chart.draw_series(errs).map_err(err)?;
            }
            chart
                .configure_series_labels()
                .position(legend_pos)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(err)?;
        }};
    }
    if log_y && ymin_pos.is_finite() {
        let lo = ymin_pos / 2.0;
        let chart = builder
            .build_cartesian_2d(x, (lo..ymax * 8.0).log_scale())
            .map_err(err)?;
        draw!(chart, lo);
    } else {
        let chart = builder
            .build_cartesian_2d(x, 0f64..ymax * (1.15 + 0.09 * k as f64))
            .map_err(err)?;
        draw!(chart, 0.0);
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Lines over `xs` (plotted on a log2 axis, labelled with `x_names`), one
/// per series, log y, with error bars at each point.
pub fn lines(
    path: &Path,
    title: &str,
    y_label: &str,
    xs: &[f64],
    x_names: &[String],
    series: &[Series],
) -> Result<(), String> {
    let lx: Vec<f64> = xs.iter().map(|x| x.log2()).collect();
    let (x0, x1) = (
        lx.first().copied().unwrap_or(0.0),
        lx.last().copied().unwrap_or(1.0),
    );
    let all = series.iter().flat_map(|(_, v)| v.iter().flatten());
    let ymax = all.clone().map(|b| b.hi).fold(0f64, f64::max).max(1e-9);
    let ymin = all
        .map(|b| b.lo)
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let ymin = if ymin.is_finite() { ymin } else { ymax / 100.0 };
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(
            KeyedAxis {
                lo: x0 - 0.3,
                hi: x1 + 0.3,
                keys: lx.clone(),
            },
            (ymin / 1.5..ymax * 1.5).log_scale(),
        )
        .map_err(err)?;
    let names = x_names.to_vec();
    let lxs = lx.clone();
    chart
        .configure_mesh()
        .x_label_formatter(&|v: &f64| {
            lxs.iter()
                .position(|x| (x - v).abs() < 1e-6)
                .map_or_else(String::new, |i| names[i].clone())
        })
        .y_desc(y_label)
        .y_label_formatter(&|v: &f64| tick(*v))
        .y_labels(16)
        .max_light_lines(0)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = color(i);
        let xy: Vec<(f64, f64)> = lx
            .iter()
            .zip(pts)
            .filter_map(|(&x, b)| b.map(|b| (x, b.value)))
            .collect();
        chart
            .draw_series(LineSeries::new(xy.clone(), c.stroke_width(2)))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
        chart
            .draw_series(xy.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(err)?;
        let errs = lx.iter().zip(pts).filter_map(|(&x, b)| {
            b.filter(|b| b.hi > b.lo)
                .map(|b| ErrorBar::new_vertical(x, b.lo, b.value, b.hi, c.stroke_width(1), 6))
        });
        chart.draw_series(errs).map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_render_text_as_svg() {
        let dir = std::env::temp_dir().join(format!("anyalloc-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let series = vec![
            (
                "alpha".to_string(),
                vec![
                    Some(Bar {
                        value: 3.0,
                        lo: 2.5,
                        hi: 3.5,
                    }),
                    None,
                ],
            ),
            (
                "beta".to_string(),
                vec![Some(Bar::exact(5.0)), Some(Bar::exact(1.0))],
            ),
        ];
        let groups = vec!["first group".to_string(), "second".to_string()];
        let p = dir.join("bars.svg");
        grouped_bars(&p, "Bars", "ns", &groups, &series, false).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("<text") && svg.contains("first group") && svg.contains("beta"));
        grouped_bars(&p, "Bars", "ns", &groups, &series, true).unwrap();
        let p = dir.join("lines.svg");
        lines(
            &p,
            "Lines",
            "ns",
            &[16.0, 64.0],
            &["16 B".into(), "64 B".into()],
            &series,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("16 B") && svg.contains("alpha"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
