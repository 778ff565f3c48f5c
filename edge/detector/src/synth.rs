//! Synthetic NEU-DET-style surfaces: steel-like grey texture (low-frequency shading, rolling
//! streaks, grain) with the six NEU defect classes drawn procedurally. The trainer writes them as
//! a VOC dataset (`trainer synth`); the daemon's synthetic strip source tiles them into a moving
//! strip with defects at known positions.

use image::GrayImage;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

pub const SIZE: u32 = 200;

/// A defect drawn into an image: class and box (x1, y1, x2, y2) in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawnDefect {
    pub class_id: usize,
    pub bbox: [f32; 4],
}

/// A grey canvas with the extent of what was drawn since the last `take_extent`.
struct Canvas {
    pixels: Vec<f32>,
    extent: Option<[i32; 4]>,
}

impl Canvas {
    fn add(&mut self, x: i32, y: i32, delta: f32) {
        if x < 0 || y < 0 || x >= SIZE as i32 || y >= SIZE as i32 {
            return;
        }
        self.pixels[(y as u32 * SIZE + x as u32) as usize] += delta;
        let e = self.extent.get_or_insert([x, y, x, y]);
        *e = [e[0].min(x), e[1].min(y), e[2].max(x), e[3].max(y)];
    }

    fn disc(&mut self, cx: f32, cy: f32, r: f32, delta: f32) {
        let r2 = r * r;
        for y in (cy - r).floor() as i32..=(cy + r).ceil() as i32 {
            for x in (cx - r).floor() as i32..=(cx + r).ceil() as i32 {
                let d2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
                if d2 <= r2 {
                    // Soft edge: full strength inside, fading over the last pixel.
                    let fade = (r - d2.sqrt()).clamp(0.0, 1.0);
                    self.add(x, y, delta * fade.max(0.35));
                }
            }
        }
    }

    fn line(&mut self, x0: f32, y0: f32, x1: f32, y1: f32, width: f32, delta: f32) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()) * 1.5).max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f32 / steps as f32;
            self.disc(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, width / 2.0, delta);
        }
    }

    fn take_extent(&mut self) -> Option<[f32; 4]> {
        self.extent
            .take()
            .map(|[x1, y1, x2, y2]| [x1 as f32, y1 as f32, (x2 + 1) as f32, (y2 + 1) as f32])
    }
}

fn steel_background(rng: &mut StdRng) -> Vec<f32> {
    let base = rng.random_range(95.0..150.0f32);
    // Low-frequency shading from a coarse random grid, bilinearly interpolated.
    let g = 6usize;
    let grid: Vec<f32> = (0..g * g)
        .map(|_| rng.random_range(-12.0..12.0f32))
        .collect();
    // Rolling direction: streaks along x, one offset per row, smoothed.
    let mut rows: Vec<f32> = (0..SIZE).map(|_| rng.random_range(-6.0..6.0f32)).collect();
    for _ in 0..2 {
        rows = (0..SIZE as usize)
            .map(|i| {
                (rows[i.saturating_sub(1)] + rows[i] + rows[(i + 1).min(SIZE as usize - 1)]) / 3.0
            })
            .collect();
    }
    let grain = rng.random_range(3.0..8.0f32);
    let mut pixels = Vec::with_capacity((SIZE * SIZE) as usize);
    for y in 0..SIZE {
        for x in 0..SIZE {
            let gx = x as f32 / SIZE as f32 * (g - 1) as f32;
            let gy = y as f32 / SIZE as f32 * (g - 1) as f32;
            let (ix, iy) = (gx as usize, gy as usize);
            let (fx, fy) = (gx - ix as f32, gy - iy as f32);
            let at = |i: usize, j: usize| grid[j.min(g - 1) * g + i.min(g - 1)];
            let shade = at(ix, iy) * (1.0 - fx) * (1.0 - fy)
                + at(ix + 1, iy) * fx * (1.0 - fy)
                + at(ix, iy + 1) * (1.0 - fx) * fy
                + at(ix + 1, iy + 1) * fx * fy;
            let noise = (rng.random::<f32>() + rng.random::<f32>() - 1.0) * grain;
            pixels.push(base + shade + rows[y as usize] + noise);
        }
    }
    pixels
}

fn region(rng: &mut StdRng, min: f32, max: f32) -> (f32, f32, f32, f32) {
    let w = rng.random_range(min..max);
    let h = rng.random_range(min..max);
    let x = rng.random_range(0.0..(SIZE as f32 - w).max(1.0));
    let y = rng.random_range(0.0..(SIZE as f32 - h).max(1.0));
    (x, y, w, h)
}

fn sign(rng: &mut StdRng, dark_probability: f64) -> f32 {
    if rng.random_bool(dark_probability) {
        -1.0
    } else {
        1.0
    }
}

/// Draws one defect instance of `class_id` (NEU order) and returns its box.
fn draw_defect(canvas: &mut Canvas, class_id: usize, rng: &mut StdRng) -> Option<[f32; 4]> {
    match class_id {
        // crazing: a network of short fine dark cracks over a wide area.
        0 => {
            let (x, y, w, h) = region(rng, 50.0, 190.0);
            let cracks = (w * h / 500.0) as usize + 20;
            for _ in 0..cracks {
                let (mut px, mut py) = (x + rng.random_range(0.0..w), y + rng.random_range(0.0..h));
                for _ in 0..rng.random_range(2..5) {
                    let (nx, ny) = (
                        px + rng.random_range(-8.0..8.0f32),
                        py + rng.random_range(-8.0..8.0f32),
                    );
                    let (nx, ny) = (nx.clamp(x, x + w), ny.clamp(y, y + h));
                    canvas.line(px, py, nx, ny, 1.0, -rng.random_range(18.0..32.0f32));
                    (px, py) = (nx, ny);
                }
            }
        }
        // inclusion: elongated dark spots along the rolling direction.
        1 => {
            let (cx, cy) = (
                rng.random_range(15.0..185.0f32),
                rng.random_range(15.0..185.0f32),
            );
            let len = rng.random_range(10.0..60.0f32);
            let vertical = rng.random_bool(0.5);
            let width = rng.random_range(3.0..8.0f32);
            let delta = -rng.random_range(35.0..70.0f32);
            let (dx, dy) = if vertical {
                (0.0, len / 2.0)
            } else {
                (len / 2.0, 0.0)
            };
            canvas.line(cx - dx, cy - dy, cx + dx, cy + dy, width, delta);
        }
        // patches: large irregular blotches.
        2 => {
            let (cx, cy) = (
                rng.random_range(30.0..170.0f32),
                rng.random_range(30.0..170.0f32),
            );
            let delta = sign(rng, 0.75) * rng.random_range(25.0..55.0f32);
            for _ in 0..rng.random_range(3..7) {
                let r = rng.random_range(8.0..30.0f32);
                canvas.disc(
                    cx + rng.random_range(-25.0..25.0f32),
                    cy + rng.random_range(-25.0..25.0f32),
                    r,
                    delta / 2.0,
                );
            }
        }
        // pitted_surface: clusters of small dark pits.
        3 => {
            let (x, y, w, h) = region(rng, 25.0, 110.0);
            for _ in 0..rng.random_range(15..60) {
                let r = rng.random_range(1.0..3.5f32);
                canvas.disc(
                    x + rng.random_range(0.0..w),
                    y + rng.random_range(0.0..h),
                    r,
                    -rng.random_range(35.0..65.0f32),
                );
            }
        }
        // rolled-in_scale: scattered flakes pressed into the surface, elongated along rolling.
        4 => {
            let (x, y, w, h) = region(rng, 40.0, 150.0);
            for _ in 0..rng.random_range(12..40) {
                let (px, py) = (x + rng.random_range(0.0..w), y + rng.random_range(0.0..h));
                let len = rng.random_range(4.0..14.0f32);
                canvas.line(
                    px,
                    py,
                    px + len,
                    py + rng.random_range(-2.0..2.0f32),
                    rng.random_range(1.5..4.0f32),
                    sign(rng, 0.6) * rng.random_range(25.0..45.0f32),
                );
            }
        }
        // scratches: long thin, nearly straight lines.
        5 => {
            let len = rng.random_range(60.0..190.0f32);
            let angle = if rng.random_bool(0.7) {
                rng.random_range(-0.3..0.3f32)
                    + std::f32::consts::FRAC_PI_2 * if rng.random_bool(0.5) { 1.0 } else { 0.0 }
            } else {
                rng.random_range(0.0..std::f32::consts::PI)
            };
            let (cx, cy) = (
                rng.random_range(30.0..170.0f32),
                rng.random_range(30.0..170.0f32),
            );
            let (dx, dy) = (angle.cos() * len / 2.0, angle.sin() * len / 2.0);
            let delta = sign(rng, 0.4) * rng.random_range(35.0..70.0f32);
            canvas.line(
                cx - dx,
                cy - dy,
                cx + dx,
                cy + dy,
                rng.random_range(1.0..3.0f32),
                delta,
            );
        }
        _ => return None,
    }
    canvas.take_extent()
}

/// One synthetic image of `class_id` with 1 to 3 instances (like NEU: one class per image); a
/// `class_id` past the six classes gives clean steel.
pub fn generate(class_id: usize, rng: &mut StdRng) -> (GrayImage, Vec<DrawnDefect>) {
    let mut canvas = Canvas {
        pixels: steel_background(rng),
        extent: None,
    };
    let count = if class_id == 2 || class_id == 0 {
        rng.random_range(1..3)
    } else {
        rng.random_range(1..4)
    };
    let mut defects = Vec::new();
    for _ in 0..count {
        if let Some(bbox) = draw_defect(&mut canvas, class_id, rng)
            && bbox[2] - bbox[0] >= 2.0
            && bbox[3] - bbox[1] >= 2.0
        {
            defects.push(DrawnDefect { class_id, bbox });
        }
    }
    let raw: Vec<u8> = canvas
        .pixels
        .iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect();
    let image = GrayImage::from_raw(SIZE, SIZE, raw).expect("buffer matches size");
    (image, defects)
}

/// An endless synthetic steel strip, `tiles` NEU-size tiles (200 px) wide, drawn band by band
/// (200 lines each): every tile of a band is clean steel or, with probability `defect_rate`,
/// carries NEU-style defects of one class. The same seed draws the same strip, so a test or the
/// demo can redraw the ground truth of what a daemon inspected.
pub struct Strip {
    tiles: usize,
    defect_rate: f64,
    rng: StdRng,
    /// Lines drawn so far.
    drawn: u64,
}

/// One band of a [`Strip`]: `SIZE` rows of `width` grey pixels starting at strip line `top`, and
/// its defects in strip coordinates (x in pixels, y in lines from the start of the strip).
pub struct Band {
    pub top: u64,
    pub width: usize,
    pub pixels: Vec<u8>,
    pub defects: Vec<DrawnDefect>,
}

impl Strip {
    pub fn new(tiles: usize, defect_rate: f64, seed: u64) -> Self {
        Self {
            tiles: tiles.max(1),
            defect_rate: defect_rate.clamp(0.0, 1.0),
            rng: StdRng::seed_from_u64(seed),
            drawn: 0,
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.tiles * SIZE as usize
    }

    pub fn next_band(&mut self) -> Band {
        let size = SIZE as usize;
        let width = self.width();
        let mut pixels = vec![0u8; width * size];
        let mut defects = Vec::new();
        for t in 0..self.tiles {
            let class = if self.rng.random_bool(self.defect_rate) {
                self.rng.random_range(0..6)
            } else {
                usize::MAX
            };
            let (tile, drawn) = generate(class, &mut self.rng);
            for y in 0..size {
                let src = &tile.as_raw()[y * size..(y + 1) * size];
                pixels[y * width + t * size..y * width + (t + 1) * size].copy_from_slice(src);
            }
            let (ox, oy) = ((t * size) as f32, self.drawn as f32);
            defects.extend(drawn.into_iter().map(|d| {
                let [x1, y1, x2, y2] = d.bbox;
                DrawnDefect {
                    class_id: d.class_id,
                    bbox: [x1 + ox, y1 + oy, x2 + ox, y2 + oy],
                }
            }));
        }
        let top = self.drawn;
        self.drawn += size as u64;
        Band {
            top,
            width,
            pixels,
            defects,
        }
    }
}

impl DrawnDefect {
    /// Whether the defect reaches into strip lines `[top, bottom)`.
    pub fn within_lines(&self, top: f32, bottom: f32) -> bool {
        self.bbox[1] < bottom && self.bbox[3] > top
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn generation_is_deterministic_and_marks_pixels_inside_boxes() {
        let (a, da) = generate(5, &mut StdRng::seed_from_u64(3));
        let (b, db) = generate(5, &mut StdRng::seed_from_u64(3));
        assert_eq!(a, b);
        assert_eq!(da, db);
        let clean = GrayImage::from_raw(SIZE, SIZE, {
            let mut rng = StdRng::seed_from_u64(3);
            steel_background(&mut rng)
                .iter()
                .map(|v| v.round().clamp(0.0, 255.0) as u8)
                .collect()
        })
        .unwrap();
        // Every changed pixel lies inside some box.
        for (x, y, p) in a.enumerate_pixels() {
            if p != clean.get_pixel(x, y) {
                let inside = da.iter().any(|d| {
                    (x as f32) >= d.bbox[0]
                        && (x as f32) < d.bbox[2]
                        && (y as f32) >= d.bbox[1]
                        && (y as f32) < d.bbox[3]
                });
                assert!(inside, "pixel {x},{y} changed outside every box");
            }
        }
    }
}
