//! Plots with `plotters`: a figure is a grid of panels sharing a categorical x axis (queue
//! depths, block sizes) with one line per series (target), each point with a bar from the
//! smallest to the largest run. Written as SVG and PNG; text in the PNG is drawn by ab_glyph
//! with DejaVu Sans from the `dejavu` crate, so no system font library is involved.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

/// One line: (x index, median, min, max) per point.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Points: x index into the figure's labels, median, min, max.
    pub points: Vec<(usize, f64, f64, f64)>,
}

/// One panel of a figure.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Caption.
    pub title: String,
    /// Lines.
    pub series: Vec<Series>,
}

/// A figure: panels sharing axes' meaning.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Title above the panels.
    pub title: String,
    /// What x is.
    pub x_desc: String,
    /// Labels of the x positions.
    pub x_labels: Vec<String>,
    /// What y is.
    pub y_desc: String,
    /// The panels, laid out three to a row.
    pub panels: Vec<Panel>,
    /// A horizontal reference line (1.0 for ratios).
    pub hline: Option<f64>,
}

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bundled font is valid TrueType; a failure would only lose the text.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// `1.23M`, `350k`, `45.0k`, `12.5`, `0.50`.
pub fn si(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e5 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Line colours, distinct on white (Okabe-Ito, without its yellow).
const PALETTE: [RGBColor; 7] = [
    RGBColor(213, 94, 0),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(0, 0, 0),
];

const COLS: usize = 3;
const PANEL_W: u32 = 420;
const PANEL_H: u32 = 300;

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, f: &Figure) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(&f.title, (FONT, 20)).map_err(e)?;
    let cols = f.panels.len().clamp(1, COLS);
    let rows = f.panels.len().div_ceil(COLS).max(1);
    let areas = root.split_evenly((rows, cols));
    let n = f.x_labels.len().max(1);
    for (area, p) in areas.iter().zip(&f.panels) {
        let ys = p
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|q| q.3.max(q.1)));
        let mut ymax = ys.fold(0.0f64, f64::max);
        if let Some(h) = f.hline {
            ymax = ymax.max(h);
        }
        if !(ymax > 0.0 && ymax.is_finite()) {
            ymax = 1.0;
        }
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, (FONT, 15))
            .margin(8)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax * 1.12)
            .map_err(e)?;
        let labels = f.x_labels.clone();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * n + 1)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| si(*y))
            .x_desc(f.x_desc.as_str())
            .y_desc(f.y_desc.as_str())
            .label_style((FONT, 12))
            .axis_desc_style((FONT, 13))
            .draw()
            .map_err(e)?;
        if let Some(h) = f.hline {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(-0.5, h), (n as f64 - 0.5, h)],
                    BLACK.mix(0.5).stroke_width(1),
                )))
                .map_err(e)?;
        }
        // A series without points (a target that does not run these cells) has no line and
        // no legend entry; colours stay tied to the series' place.
        for (si, s) in p
            .series
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.points.is_empty())
        {
            let color = PALETTE[si % PALETTE.len()].to_rgba();
            let pts: Vec<(f64, f64)> = s.points.iter().map(|q| (q.0 as f64, q.1)).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(e)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    pts.iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )
                .map_err(e)?;
            chart
                .draw_series(s.points.iter().map(|q| {
                    PathElement::new(
                        vec![(q.0 as f64, q.2), (q.0 as f64, q.3)],
                        color.stroke_width(1),
                    )
                }))
                .map_err(e)?;
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

/// Writes `f` as `STEM.svg` and `STEM.png`.
pub fn render(f: &Figure, stem: &Path) -> anyhow::Result<()> {
    register_font();
    let cols = f.panels.len().clamp(1, COLS) as u32;
    let rows = f.panels.len().div_ceil(COLS).max(1) as u32;
    let size = (cols * PANEL_W, rows * PANEL_H + 30);
    let svg = stem.with_extension("svg");
    draw(SVGBackend::new(&svg, size).into_drawing_area(), f)
        .map_err(|e| anyhow::anyhow!("{}: {e}", svg.display()))?;
    let png = stem.with_extension("png");
    draw(BitMapBackend::new(&png, size).into_drawing_area(), f)
        .map_err(|e| anyhow::anyhow!("{}: {e}", png.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_svg_and_png_with_text() {
        let d = tempfile::tempdir().unwrap();
        let f = Figure {
            title: "IOPS".into(),
            x_desc: "queue depth".into(),
            x_labels: vec!["1".into(), "8".into(), "32".into()],
            y_desc: "IOPS".into(),
            panels: vec![Panel {
                title: "bs 4K".into(),
                series: vec![Series {
                    name: "ferroblk".into(),
                    points: vec![
                        (0, 10.0, 9.0, 11.0),
                        (1, 50.0, 48.0, 52.0),
                        (2, 90.0, 80.0, 95.0),
                    ],
                }],
            }],
            hline: None,
        };
        render(&f, &d.path().join("x")).unwrap();
        let svg = std::fs::read_to_string(d.path().join("x.svg")).unwrap();
        assert!(
            svg.contains("ferroblk") && svg.contains("queue depth"),
            "{svg}"
        );
        let png = std::fs::read(d.path().join("x.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert_eq!(si(1_234_567.0), "1.23M");
        assert_eq!(si(45_000.0), "45.0k");
        assert_eq!(si(345_000.0), "345k");
        assert_eq!(si(0.5), "0.50");
    }
}
