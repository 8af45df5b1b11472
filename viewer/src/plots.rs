//! The plots, drawn with egui's painter: heatmaps, line charts with policy
//! markers, the tokens × K bin grid, and per-layer bars. Each takes plain
//! data from `aggregate` and draws it in the space it is given.

use eframe::egui::{self, Align2, Color32, FontId, Pos2, Rect, Sense, Stroke, StrokeKind, Ui, Vec2, pos2, vec2};

use crate::aggregate::Heatmap;

pub const EXACT_COLOR: Color32 = Color32::from_rgb(150, 150, 160);
pub const SELECTED_COLOR: Color32 = Color32::from_rgb(80, 200, 120);
pub const RATE_COLOR: Color32 = Color32::from_rgb(90, 170, 250);
pub const MARK_COLOR: Color32 = Color32::from_rgb(240, 180, 60);
const AXIS_COLOR: Color32 = Color32::from_gray(110);
const GRID_COLOR: Color32 = Color32::from_gray(55);
const LABEL_COLOR: Color32 = Color32::from_gray(185);

fn tooltips_id() -> egui::Id {
    egui::Id::unique("lynx-viewer-plot-tooltips-off")
}

/// Turns the plots' hover tooltips off or on, e.g. for scripted screenshots,
/// where the pointer rests in the middle of the window.
pub fn set_tooltips(ctx: &egui::Context, on: bool) {
    ctx.data_mut(|d| d.insert_temp(tooltips_id(), !on));
}

fn tooltips(ui: &Ui) -> bool {
    !ui.ctx().data(|d| d.get_temp::<bool>(tooltips_id())).unwrap_or(false)
}

fn small() -> FontId {
    FontId::proportional(10.5)
}

/// A perceptual colour scale (viridis, by five stops) for t in [0, 1].
pub fn colormap(t: f64) -> Color32 {
    const STOPS: [(f32, f32, f32); 5] = [
        (68.0, 1.0, 84.0),
        (59.0, 82.0, 139.0),
        (33.0, 145.0, 140.0),
        (94.0, 201.0, 98.0),
        (253.0, 231.0, 37.0),
    ];
    let t = if t.is_finite() { t.clamp(0.0, 1.0) as f32 } else { 0.0 };
    let x = t * (STOPS.len() - 1) as f32;
    let i = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - i as f32;
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let mix = |p: f32, q: f32| (p + (q - p) * f).round() as u8;
    Color32::from_rgb(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// The colour of an AffinityBinning bin: 0 (highest affinity) is green,
/// the lowest bin `-beta` is red, the bins between shade from one to the other.
pub fn bin_color(bin: i32, beta: u32) -> Color32 {
    let t = if beta == 0 {
        0.0
    } else {
        (-bin).clamp(0, beta as i32) as f32 / beta as f32
    };
    let green = Color32::from_rgb(60, 190, 90);
    let red = Color32::from_rgb(215, 60, 60);
    let mid = Color32::from_rgb(230, 200, 60);
    if t < 0.5 {
        green.lerp_to_gamma(mid, t * 2.0)
    } else {
        mid.lerp_to_gamma(red, (t - 0.5) * 2.0)
    }
}

/// A layers × experts heatmap filling `size`, with expert numbers along the
/// top and layer numbers down the left; hovering shows a cell's value.
pub fn heatmap(ui: &mut Ui, h: &Heatmap, size: Vec2, scale_max: f64) {
    let (resp, painter) = ui.allocate_painter(size, Sense::hover());
    let full = resp.rect;
    let (rows, cols) = (h.rows.len(), h.experts());
    if rows == 0 || cols == 0 {
        return;
    }
    let grid = Rect::from_min_max(full.min + vec2(22.0, 12.0), full.max - vec2(2.0, 2.0));
    let cw = grid.width() / cols as f32;
    let ch = grid.height() / rows as f32;
    let max = scale_max.max(1e-9);
    for (r, row) in h.rows.iter().enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let cell = Rect::from_min_size(grid.min + vec2(c as f32 * cw, r as f32 * ch), vec2(cw, ch));
            let color = if v <= 0.0 {
                Color32::from_gray(30)
            } else {
                colormap(v / max)
            };
            // A hairline between columns keeps experts apart; rows stay joined so
            // that a layer reads as one band.
            painter.rect_filled(cell.shrink2(vec2(if cw > 6.0 { 0.5 } else { 0.0 }, 0.0)), 0.0, color);
        }
    }
    let step = if cols > 32 {
        8
    } else if cols > 16 {
        4
    } else {
        2
    };
    for c in (0..cols).step_by(step) {
        let x = grid.min.x + (c as f32 + 0.5) * cw;
        painter.text(pos2(x, full.min.y), Align2::CENTER_TOP, c, small(), LABEL_COLOR);
    }
    let rstep = if rows > 40 { 10 } else { 5 };
    for r in (0..rows).step_by(rstep) {
        let y = grid.min.y + (r as f32 + 0.5) * ch;
        painter.text(
            pos2(grid.min.x - 3.0, y),
            Align2::RIGHT_CENTER,
            h.layers[r],
            small(),
            LABEL_COLOR,
        );
    }
    if let Some(p) = resp.hover_pos().filter(|_| tooltips(ui))
        && grid.contains(p)
    {
        let c = (((p.x - grid.min.x) / cw) as usize).min(cols - 1);
        let r = (((p.y - grid.min.y) / ch) as usize).min(rows - 1);
        let v = h.rows[r][c];
        resp.on_hover_text_at_pointer(format!("layer {}, expert {c}: {v:.2} tokens", h.layers[r]));
    }
}

/// A horizontal colour bar for the heatmap scale, from 0 to `max` tokens.
pub fn colorbar(ui: &mut Ui, width: f32, max: f64) {
    let (resp, painter) = ui.allocate_painter(vec2(width, 14.0), Sense::hover());
    let r = resp.rect;
    let bar = Rect::from_min_max(
        pos2(r.min.x + 22.0, r.min.y + 2.0),
        pos2(r.min.x + 22.0 + (width - 90.0).max(20.0), r.max.y - 2.0),
    );
    let n = 24;
    for i in 0..n {
        let x0 = bar.min.x + bar.width() * i as f32 / n as f32;
        let x1 = bar.min.x + bar.width() * (i + 1) as f32 / n as f32;
        painter.rect_filled(
            Rect::from_min_max(pos2(x0, bar.min.y), pos2(x1, bar.max.y)),
            0.0,
            colormap(i as f64 / (n - 1) as f64),
        );
    }
    painter.text(
        pos2(bar.min.x - 3.0, bar.center().y),
        Align2::RIGHT_CENTER,
        "0",
        small(),
        LABEL_COLOR,
    );
    painter.text(
        pos2(bar.max.x + 4.0, bar.center().y),
        Align2::LEFT_CENTER,
        format!("{max:.1} tokens"),
        small(),
        LABEL_COLOR,
    );
}

/// One line of a line chart.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: Color32,
    pub points: &'a [[f64; 2]],
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) for about `n` ticks.
pub fn nice_step(range: f64, n: usize) -> f64 {
    if !(range.is_finite() && range > 0.0) {
        return 1.0;
    }
    let raw = range / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// A line chart of `series` over a shared x axis (decode steps), y from 0,
/// with vertical markers (`marks`: x and a label) where the policy changed.
pub fn line_chart(ui: &mut Ui, size: Vec2, series: &[Series<'_>], marks: &[(f64, String)], y_min_max: Option<f64>) {
    let (resp, painter) = ui.allocate_painter(size, Sense::hover());
    let full = resp.rect;
    let plot = Rect::from_min_max(full.min + vec2(34.0, 14.0), full.max - vec2(6.0, 14.0));
    painter.rect_stroke(plot, 0.0, Stroke::new(1.0, AXIS_COLOR), StrokeKind::Inside);
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for p in all {
        x0 = x0.min(p[0]);
        x1 = x1.max(p[0]);
        y1 = y1.max(p[1]);
    }
    // Legend, top left, above the plot.
    let mut lx = plot.min.x;
    for s in series {
        painter.line_segment(
            [pos2(lx, full.min.y + 6.0), pos2(lx + 12.0, full.min.y + 6.0)],
            Stroke::new(2.0, s.color),
        );
        let r = painter.text(
            pos2(lx + 15.0, full.min.y + 6.0),
            Align2::LEFT_CENTER,
            s.name,
            small(),
            LABEL_COLOR,
        );
        lx = r.max.x + 12.0;
    }
    if !x0.is_finite() {
        painter.text(
            plot.center(),
            Align2::CENTER_CENTER,
            "no decode steps yet",
            small(),
            LABEL_COLOR,
        );
        return;
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let y1 = y_min_max.map_or(y1, |m| y1.max(m)) * 1.1;
    let y1 = if y1 > 0.0 { y1 } else { 1.0 };
    let to_screen = |x: f64, y: f64| -> Pos2 {
        pos2(
            plot.min.x + ((x - x0) / (x1 - x0)) as f32 * plot.width(),
            plot.max.y - (y / y1) as f32 * plot.height(),
        )
    };
    // Horizontal grid with y labels.
    let ys = nice_step(y1, 4);
    let mut y = 0.0;
    while y <= y1 + 1e-9 {
        let p = to_screen(x0, y);
        painter.line_segment(
            [pos2(plot.min.x, p.y), pos2(plot.max.x, p.y)],
            Stroke::new(1.0, GRID_COLOR),
        );
        painter.text(
            pos2(plot.min.x - 3.0, p.y),
            Align2::RIGHT_CENTER,
            format_tick(y),
            small(),
            LABEL_COLOR,
        );
        y += ys;
    }
    // X labels: decode step numbers.
    let xs = nice_step(x1 - x0, 6).max(1.0);
    let mut x = (x0 / xs).ceil() * xs;
    while x <= x1 + 1e-9 {
        let p = to_screen(x, 0.0);
        painter.text(
            pos2(p.x, plot.max.y + 1.0),
            Align2::CENTER_TOP,
            format_tick(x),
            small(),
            LABEL_COLOR,
        );
        x += xs;
    }
    for (mx, label) in marks {
        let p = to_screen(*mx, 0.0);
        if p.x < plot.min.x - 0.5 || p.x > plot.max.x + 0.5 {
            continue;
        }
        painter.line_segment(
            [pos2(p.x, plot.min.y), pos2(p.x, plot.max.y)],
            Stroke::new(1.0, MARK_COLOR),
        );
        painter.text(
            pos2(p.x + 2.0, plot.min.y + 1.0),
            Align2::LEFT_TOP,
            label,
            small(),
            MARK_COLOR,
        );
    }
    for s in series {
        let pts: Vec<Pos2> = s.points.iter().map(|p| to_screen(p[0], p[1])).collect();
        if pts.len() == 1 {
            painter.circle_filled(pts[0], 2.5, s.color);
        } else {
            painter.line(pts, Stroke::new(1.5, s.color));
        }
    }
    if let Some(h) = resp.hover_pos().filter(|_| tooltips(ui))
        && plot.contains(h)
    {
        let x = x0 + ((h.x - plot.min.x) / plot.width()) as f64 * (x1 - x0);
        let mut text = format!("decode step {x:.0}");
        for s in series {
            if let Some(p) = s
                .points
                .iter()
                .min_by(|a, b| (a[0] - x).abs().total_cmp(&(b[0] - x).abs()))
            {
                text.push_str(&format!("\n{}: {:.2}", s.name, p[1]));
            }
        }
        resp.on_hover_text_at_pointer(text);
    }
}

fn format_tick(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The tokens × K slot grid of one layer: each cell is a token's slot,
/// coloured by its AffinityBinning bin (grey when the policy has no bins),
/// and crossed out when selection replaced the slot's expert.
pub fn bin_grid(ui: &mut Ui, size: Vec2, tokens: usize, k: usize, bins: &[i32], remapped: &[bool], beta: u32) {
    let (resp, painter) = ui.allocate_painter(size, Sense::hover());
    let full = resp.rect;
    if tokens == 0 || k == 0 {
        return;
    }
    let grid = Rect::from_min_max(full.min + vec2(40.0, 12.0), full.max - vec2(2.0, 2.0));
    let cw = (grid.width() / k as f32).min(36.0);
    let ch = (grid.height() / tokens as f32).min(20.0);
    for s in 0..k {
        let x = grid.min.x + (s as f32 + 0.5) * cw;
        painter.text(
            pos2(x, full.min.y),
            Align2::CENTER_TOP,
            format!("k{s}"),
            small(),
            LABEL_COLOR,
        );
    }
    let label_every = ((10.0 / ch).ceil() as usize).max(1);
    for t in 0..tokens {
        let y = grid.min.y + t as f32 * ch;
        if t % label_every == 0 {
            painter.text(
                pos2(grid.min.x - 3.0, y + ch / 2.0),
                Align2::RIGHT_CENTER,
                format!("seq {t}"),
                small(),
                LABEL_COLOR,
            );
        }
        for s in 0..k {
            let i = t * k + s;
            let cell = Rect::from_min_size(pos2(grid.min.x + s as f32 * cw, y), vec2(cw, ch)).shrink(1.0);
            let color = bins.get(i).map_or(Color32::from_gray(80), |&b| bin_color(b, beta));
            painter.rect_filled(cell, 2.0, color);
            if remapped.get(i).copied().unwrap_or(false) {
                let st = Stroke::new(2.0, Color32::from_gray(20));
                painter.rect_stroke(cell, 2.0, Stroke::new(1.5, Color32::WHITE), StrokeKind::Inside);
                let c = cell.shrink((cell.height().min(cell.width()) * 0.2).max(1.0));
                painter.line_segment([c.left_top(), c.right_bottom()], st);
                painter.line_segment([c.right_top(), c.left_bottom()], st);
            }
        }
    }
    if let Some(p) = resp.hover_pos().filter(|_| tooltips(ui))
        && grid.contains(p)
    {
        let s = ((p.x - grid.min.x) / cw) as usize;
        let t = ((p.y - grid.min.y) / ch) as usize;
        if s < k && t < tokens {
            let i = t * k + s;
            let bin = bins.get(i).map_or("none".to_string(), |b| b.to_string());
            let moved = if remapped.get(i).copied().unwrap_or(false) {
                "replaced"
            } else {
                "kept"
            };
            resp.on_hover_text_at_pointer(format!("sequence {t}, slot {s}: bin {bin}, expert {moved}"));
        }
    }
}

/// A legend strip for the bin colours (0 … -beta) and the remapped mark.
pub fn bin_legend(ui: &mut Ui, beta: u32) {
    ui.horizontal(|ui| {
        ui.spacing_mut().item_spacing.x = 3.0;
        for b in 0..=beta as i32 {
            let (r, _) = ui.allocate_exact_size(vec2(12.0, 12.0), Sense::hover());
            ui.painter().rect_filled(r, 2.0, bin_color(-b, beta));
        }
        ui.label(egui::RichText::new(format!("bin 0 … -{beta}")).small());
        let (r, _) = ui.allocate_exact_size(vec2(12.0, 12.0), Sense::hover());
        ui.painter().rect_filled(r, 2.0, Color32::from_gray(80));
        ui.painter()
            .rect_stroke(r, 2.0, Stroke::new(1.5, Color32::WHITE), StrokeKind::Inside);
        let c = r.shrink(3.0);
        ui.painter().line_segment(
            [c.left_top(), c.right_bottom()],
            Stroke::new(2.0, Color32::from_gray(20)),
        );
        ui.painter().line_segment(
            [c.right_top(), c.left_bottom()],
            Stroke::new(2.0, Color32::from_gray(20)),
        );
        ui.label(egui::RichText::new("replaced").small());
    });
}

/// Paired bars per layer: `back` drawn as an outline (e.g. exact distinct
/// experts) and `front` filled (after selection), on a 0..`max` scale.
pub fn layer_bars(
    ui: &mut Ui,
    size: Vec2,
    layers: &[usize],
    back: &[f64],
    front: &[f64],
    max: f64,
    colors: (Color32, Color32),
) {
    let (resp, painter) = ui.allocate_painter(size, Sense::hover());
    let full = resp.rect;
    let plot = Rect::from_min_max(full.min + vec2(24.0, 4.0), full.max - vec2(2.0, 13.0));
    painter.rect_stroke(plot, 0.0, Stroke::new(1.0, AXIS_COLOR), StrokeKind::Inside);
    let n = layers.len();
    if n == 0 {
        return;
    }
    let max = if max > 0.0 { max } else { 1.0 };
    let w = plot.width() / n as f32;
    let y = |v: f64| plot.max.y - (v / max).clamp(0.0, 1.0) as f32 * plot.height();
    for half in [0.5, 1.0] {
        let gy = y(max * half);
        painter.line_segment(
            [pos2(plot.min.x, gy), pos2(plot.max.x, gy)],
            Stroke::new(1.0, GRID_COLOR),
        );
        painter.text(
            pos2(plot.min.x - 3.0, gy),
            Align2::RIGHT_CENTER,
            format_tick(max * half),
            small(),
            LABEL_COLOR,
        );
    }
    for i in 0..n {
        let x0 = plot.min.x + i as f32 * w + w * 0.12;
        let x1 = plot.min.x + (i + 1) as f32 * w - w * 0.12;
        if let Some(&b) = back.get(i) {
            painter.rect_stroke(
                Rect::from_min_max(pos2(x0, y(b)), pos2(x1, plot.max.y)),
                0.0,
                Stroke::new(1.0, colors.0),
                StrokeKind::Inside,
            );
        }
        if let Some(&f) = front.get(i) {
            painter.rect_filled(
                Rect::from_min_max(pos2(x0 + 1.0, y(f)), pos2(x1 - 1.0, plot.max.y)),
                0.0,
                colors.1,
            );
        }
        if i % 5 == 0 {
            painter.text(
                pos2((x0 + x1) / 2.0, plot.max.y + 1.0),
                Align2::CENTER_TOP,
                layers[i],
                small(),
                LABEL_COLOR,
            );
        }
    }
    if let Some(p) = resp.hover_pos().filter(|_| tooltips(ui))
        && plot.contains(p)
    {
        let i = (((p.x - plot.min.x) / w) as usize).min(n - 1);
        let b = back.get(i).copied().unwrap_or(0.0);
        let f = front.get(i).copied().unwrap_or(0.0);
        resp.on_hover_text_at_pointer(format!("layer {}: {b:.2} / {f:.2}", layers[i]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(10.0, 5), 2.0);
        assert_eq!(nice_step(100.0, 4), 50.0);
        assert_eq!(nice_step(0.7, 4), 0.2);
        assert_eq!(nice_step(0.0, 4), 1.0);
        assert_eq!(nice_step(f64::NAN, 4), 1.0);
    }

    #[test]
    fn colour_scales_span_their_ends() {
        assert_eq!(colormap(0.0), Color32::from_rgb(68, 1, 84));
        assert_eq!(colormap(1.0), Color32::from_rgb(253, 231, 37));
        assert_eq!(colormap(f64::NAN), colormap(0.0));
        assert_eq!(bin_color(0, 7), Color32::from_rgb(60, 190, 90));
        assert_eq!(bin_color(-7, 7), Color32::from_rgb(215, 60, 60));
        // Out-of-range bins clamp, and beta 0 (no bins) is bin 0's colour.
        assert_eq!(bin_color(-9, 7), bin_color(-7, 7));
        assert_eq!(bin_color(-3, 0), bin_color(0, 7));
        assert_ne!(bin_color(-3, 7), bin_color(-4, 7));
    }
}
