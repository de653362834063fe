//! The overview's flow charts: a line of rates over the last minutes, drawn
//! as SVG on the server (no script draws them; they work without JS).

use std::fmt::Write;

/// The drawing's size, in SVG units.
const WIDTH: f64 = 300.0;
const HEIGHT: f64 = 60.0;

/// A line chart of `points` (ms, value) over the `window_ms` before
/// `now_ms`, scaled to the largest value; a flat line for none.
pub fn line(points: &[(i64, f64)], now_ms: i64, window_ms: i64, label: &str) -> String {
    let top = points
        .iter()
        .map(|(_, value)| *value)
        .fold(0.0_f64, f64::max)
        .max(1.0);
    let start = now_ms - window_ms;
    let mut path = String::new();
    for (at, value) in points.iter().filter(|(at, _)| *at >= start) {
        let x = (at - start) as f64 / window_ms as f64 * WIDTH;
        let y = HEIGHT - value / top * (HEIGHT - 4.0);
        let _ = write!(
            path,
            "{}{x:.1},{y:.1}",
            if path.is_empty() { "" } else { " " }
        );
    }
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{label}"><rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" class="frame"/>"#
    );
    if !path.is_empty() {
        let _ = write!(svg, r#"<polyline points="{path}" class="line"/>"#);
    }
    let _ = write!(
        svg,
        r#"<text x="4" y="12" class="scale">{}</text></svg>"#,
        format_rate(top)
    );
    svg
}

/// A rate as the charts label it: whole numbers from 10 up.
pub fn format_rate(rate: f64) -> String {
    if rate >= 10.0 {
        format!("{rate:.0}/s")
    } else {
        format!("{rate:.1}/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_placed_in_the_window_and_scaled_to_the_top() {
        let svg = line(
            &[(0, 0.0), (500, 5.0), (1_000, 10.0)],
            1_000,
            1_000,
            "orders",
        );
        assert!(
            svg.contains(r#"points="0.0,60.0 150.0,32.0 300.0,4.0""#),
            "{svg}"
        );
        assert!(svg.contains("10/s"));
    }

    #[test]
    fn no_points_draw_no_line() {
        let svg = line(&[], 1_000, 1_000, "orders");
        assert!(!svg.contains("polyline"));
    }
}
