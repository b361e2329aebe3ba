//! `--plot FILE.svg`: line charts written as plain SVG (no fonts, no native dependencies), so a
//! report can be looked at instead of read. Distortion against bits is drawn on a log axis with
//! the paper's bounds; recall curves on a linear one.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, ensure};

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points, drawn in order.
    pub points: Vec<(f64, f64)>,
    /// Dashed (bounds, theory) or solid (measurements).
    pub dashed: bool,
}

/// One chart panel.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Title above the panel.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic y axis (base 10); non-positive values are skipped.
    pub log_y: bool,
    /// Logarithmic x axis (base 2), for k = 1, 2, 4, ...
    pub log_x: bool,
    /// The lines.
    pub series: Vec<Series>,
}

const W: f64 = 560.0;
const H: f64 = 400.0;
const PAD_L: f64 = 70.0;
const PAD_R: f64 = 20.0;
const PAD_T: f64 = 40.0;
const PAD_B: f64 = 110.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    fn tx(&self, x: f64) -> f64 {
        if self.log_x { x.log2() } else { x }
    }

    fn ty(&self, y: f64) -> f64 {
        if self.log_y { y.log10() } else { y }
    }

    fn visible(&self, &(x, y): &(f64, f64)) -> bool {
        x.is_finite() && y.is_finite() && (!self.log_y || y > 0.0) && (!self.log_x || x > 0.0)
    }

    /// Draws the panel at horizontal offset `ox` into `out`.
    fn draw(&self, out: &mut String, ox: f64) {
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter(|p| self.visible(p)))
            .map(|&(x, y)| (self.tx(x), self.ty(y)))
            .collect();
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in &pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if pts.is_empty() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if self.log_y {
            (y0, y1) = (y0.floor(), y1.ceil());
        } else {
            y0 = y0.min(0.0);
            y1 = if y1 <= 1.0 { 1.0 } else { y1 * 1.05 };
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        if y1 - y0 < 1e-12 {
            y1 = y0 + 1.0;
        }
        let (pw, ph) = (W - PAD_L - PAD_R, H - PAD_T - PAD_B);
        let sx = |x: f64| ox + PAD_L + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| PAD_T + (1.0 - (y - y0) / (y1 - y0)) * ph;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="24" font-size="15" text-anchor="middle" font-weight="bold">{}</text>"#,
            ox + PAD_L + pw / 2.0,
            esc(&self.title)
        );
        let _ = writeln!(
            out,
            r##"<rect x="{:.1}" y="{PAD_T}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#444"/>"##,
            ox + PAD_L
        );
        // Y ticks: decades on a log axis, 5 steps otherwise.
        let yt: Vec<f64> = if self.log_y {
            (y0 as i32..=y1 as i32).map(f64::from).collect()
        } else {
            (0..=5).map(|i| y0 + (y1 - y0) * i as f64 / 5.0).collect()
        };
        for t in yt {
            let label = if self.log_y {
                format!("1e{}", t as i32)
            } else {
                format!("{t:.2}")
            };
            let _ = writeln!(
                out,
                r##"<line x1="{:.1}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{label}</text>"##,
                ox + PAD_L,
                ox + PAD_L + pw,
                ox + PAD_L - 6.0,
                sy(t) + 4.0,
                y = sy(t)
            );
        }
        // X ticks at every distinct x of the data.
        let mut xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().filter(|p| self.visible(p)).map(|p| p.0))
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        for x in xs {
            let _ = writeln!(
                out,
                r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
                sx(self.tx(x)),
                PAD_T + ph + 16.0,
                x
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
            ox + PAD_L + pw / 2.0,
            PAD_T + ph + 34.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            out,
            r#"<text transform="translate({:.1},{:.1}) rotate(-90)" font-size="12" text-anchor="middle">{}</text>"#,
            ox + 16.0,
            PAD_T + ph / 2.0,
            esc(&self.y_label)
        );
        for (i, s) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let path: Vec<String> = s
                .points
                .iter()
                .filter(|p| self.visible(p))
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(self.tx(x)), sy(self.ty(y))))
                .collect();
            let dash = if s.dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            };
            let _ = writeln!(
                out,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
            if !s.dashed {
                for p in &path {
                    let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                    let _ = writeln!(out, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
                }
            }
            // Legend below the plot, two columns.
            let (lx, ly) = (
                ox + PAD_L + (i % 2) as f64 * pw / 2.0,
                PAD_T + ph + 54.0 + (i / 2) as f64 * 16.0,
            );
            let _ = writeln!(
                out,
                r#"<line x1="{lx:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
                lx + 22.0,
                lx + 28.0,
                ly + 4.0,
                esc(&s.name)
            );
        }
    }
}

/// Renders `charts` side by side as one SVG document.
pub fn render(charts: &[Chart]) -> String {
    let width = W * charts.len().max(1) as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{H}" viewBox="0 0 {width} {H}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, c) in charts.iter().enumerate() {
        c.draw(&mut out, i as f64 * W);
    }
    out.push_str("</svg>\n");
    out
}

/// The `--plot` value parser: the charts are SVG, so the path must end in `.svg` (checked before
/// any work starts, instead of writing SVG into a file named `.png`).
///
/// # Errors
/// A path with another extension, naming it.
pub fn svg_path(s: &str) -> std::result::Result<std::path::PathBuf, String> {
    let p = std::path::PathBuf::from(s);
    match p.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("svg") => Ok(p),
        _ => Err(format!(
            "'{s}': plots are written as SVG, so the file name must end in .svg"
        )),
    }
}

/// Writes `charts` to `path` (an `.svg` file).
pub fn write(path: &Path, charts: &[Chart]) -> Result<()> {
    ensure!(!charts.is_empty(), "nothing to plot");
    std::fs::write(path, render(charts)).with_context(|| format!("cannot write {}", path.display()))
}

/// The paper's bounds on `D_mse` for unit vectors at `b` bits: the information-theoretic lower
/// bound `4^-b` and TurboQuant's upper bound `(sqrt(3) π / 2) · 4^-b` (Theorem 1).
pub fn paper_bounds(bits: &[u32]) -> (Series, Series) {
    let pts = |c: f64| -> Vec<(f64, f64)> {
        bits.iter()
            .map(|&b| (b as f64, c * 4f64.powi(-(b as i32))))
            .collect()
    };
    (
        Series {
            name: "lower bound 4^-b".into(),
            points: pts(1.0),
            dashed: true,
        },
        Series {
            name: "upper bound (√3π/2)·4^-b".into(),
            points: pts(3f64.sqrt() * std::f64::consts::PI / 2.0),
            dashed: true,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_one_polyline_per_series_and_escapes_text() {
        let (lo, hi) = paper_bounds(&[1, 2, 3, 4]);
        let chart = Chart {
            title: "D_mse <vs> bits".into(),
            x_label: "bits".into(),
            y_label: "D_mse".into(),
            log_y: true,
            log_x: false,
            series: vec![lo, hi],
        };
        let svg = render(&[chart.clone(), chart]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains("D_mse &lt;vs&gt; bits"));
        assert!(!svg.contains("NaN"));
        // 4^-1 .. 4^-4 spans decades 1e-3 .. 1e0 on the log axis.
        assert!(svg.contains(">1e-3<") && svg.contains(">1e0<"));
    }

    #[test]
    fn empty_and_degenerate_series_do_not_break_the_axes() {
        let chart = Chart {
            title: "t".into(),
            x_label: "k".into(),
            y_label: "recall".into(),
            log_y: false,
            log_x: true,
            series: vec![
                Series {
                    name: "flat".into(),
                    points: vec![(1.0, 1.0), (2.0, 1.0)],
                    dashed: false,
                },
                Series {
                    name: "empty".into(),
                    points: vec![],
                    dashed: false,
                },
            ],
        };
        let svg = render(&[chart]);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}
