//! The report's latency-over-time chart: one dot per request at the time it left and the time it
//! took, over the windows in which a fault was in force, so what an outage costs is seen.

use std::fmt::Write as _;

use crate::{FaultMark, ModeRun};

/// Where the plot sits in the SVG: left edge and width, in px.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plot {
    pub x0: f64,
    pub width: f64,
}

/// A fault window drawn on the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Band {
    pub x: f64,
    pub width: f64,
    pub label: String,
}

impl Band {
    /// The narrowest band drawn, so an instant fault still shows.
    pub const MIN_WIDTH: f64 = 2.0;
}

/// The fault windows of a load that lasted `span_ms`, placed on `plot`: clipped to it, and at
/// least [`Band::MIN_WIDTH`] wide.
pub fn bands(marks: &[FaultMark], span_ms: u64, plot: Plot) -> Vec<Band> {
    let span = span_ms.max(1) as f64;
    let x = |ms: u64| plot.x0 + plot.width * (ms as f64 / span).min(1.0);
    marks
        .iter()
        .map(|m| {
            let from = x(m.from_ms).min(plot.x0 + plot.width - Band::MIN_WIDTH);
            let to = x(m.to_ms.max(m.from_ms));
            Band { x: from, width: (to - from).max(Band::MIN_WIDTH), label: m.kind.clone() }
        })
        .collect()
}

const W: f64 = 900.0;
const H: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 40.0;

/// Latency on a log scale from 1 ms to `y_max_ms`, as a height above the axis.
fn y(ms: f64, y_max_ms: f64) -> f64 {
    let (lo, hi) = (0.0, y_max_ms.max(10.0).log10());
    let v = ms.max(1.0).log10();
    H - BOTTOM - (H - TOP - BOTTOM) * (v - lo) / (hi - lo)
}

/// The chart of one mode, with latencies up to `y_max_ms` (the same for every mode).
pub fn chart(r: &ModeRun, y_max_ms: f64, color: &str) -> String {
    let span_ms = r
        .sent_us
        .iter()
        .zip(&r.latencies_us)
        .map(|(s, l)| (s + l) / 1000)
        .chain(r.faults.iter().map(|f| f.to_ms))
        .max()
        .unwrap_or(1)
        .max(1);
    let plot = Plot { x0: LEFT, width: W - LEFT - RIGHT };
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="100%" style="max-width:{W}px;height:auto" role="img">"#
    );
    for b in bands(&r.faults, span_ms, plot) {
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{TOP}" width="{:.1}" height="{}" fill="#e53e3e" fill-opacity="0.18"><title>{}</title></rect>"##,
            b.x,
            b.width,
            H - TOP - BOTTOM,
            crate::esc(&b.label)
        );
    }
    let base = H - BOTTOM;
    let _ = write!(svg, r##"<line x1="{LEFT}" y1="{base}" x2="{}" y2="{base}" stroke="#999"/>"##, W - RIGHT);
    let _ = write!(svg, r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base}" stroke="#999"/>"##);
    let mut tick = 1.0;
    while tick <= y_max_ms.max(10.0) {
        let ty = y(tick, y_max_ms);
        let label = if tick >= 1000.0 { format!("{} s", tick / 1000.0) } else { format!("{tick} ms") };
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{}" y2="{ty:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end" fill="#333">{label}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            ty + 4.0
        );
        tick *= 10.0;
    }
    let step_s = ((span_ms as f64 / 1000.0) / 8.0).ceil().max(1.0);
    let mut t = 0.0;
    while t * 1000.0 <= span_ms as f64 {
        let tx = LEFT + plot.width * t * 1000.0 / span_ms as f64;
        let _ = write!(
            svg,
            r##"<text x="{tx:.1}" y="{}" font-size="11" text-anchor="middle" fill="#333">{t} s</text>"##,
            base + 16.0
        );
        t += step_s;
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="11" text-anchor="middle" fill="#555">time the request was sent (since the load started)</text>"##,
        LEFT + plot.width / 2.0,
        H - 6.0
    );
    for ((sent, lat), status) in r.sent_us.iter().zip(&r.latencies_us).zip(&r.statuses) {
        let cx = LEFT + plot.width * (*sent as f64 / 1000.0) / span_ms as f64;
        let fill = match status {
            200 => color,
            400..=499 => "#a0aec0",
            _ => "#c53030",
        };
        let _ = write!(
            svg,
            r#"<circle cx="{cx:.1}" cy="{:.1}" r="2" fill="{fill}" fill-opacity="0.7"/>"#,
            y(*lat as f64 / 1000.0, y_max_ms)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(kind: &str, from_ms: u64, to_ms: u64) -> FaultMark {
        FaultMark { kind: kind.into(), from_ms, to_ms }
    }

    #[test]
    fn a_crash_window_covers_its_share_of_the_run() {
        let plot = Plot { x0: 50.0, width: 600.0 };
        let b = bands(&[mark("crash routing", 2_000, 3_000)], 10_000, plot);
        assert_eq!(b, vec![Band { x: 170.0, width: 60.0, label: "crash routing".into() }]);
    }

    #[test]
    fn an_instant_fault_still_shows_and_nothing_leaves_the_plot() {
        let plot = Plot { x0: 0.0, width: 100.0 };
        let b = bands(
            &[mark("connections dropped", 5_000, 5_000), mark("disk full", 9_000, 20_000)],
            10_000,
            plot,
        );
        assert_eq!((b[0].x, b[0].width), (50.0, Band::MIN_WIDTH));
        assert_eq!((b[1].x, b[1].width), (90.0, 10.0), "clipped at the end of the run");
        let late = bands(&[mark("crash gateway", 12_000, 13_000)], 10_000, plot);
        assert_eq!(late[0].x + late[0].width, 100.0);
    }
}
