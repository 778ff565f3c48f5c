//! The few-data mixers, box-aware: mosaic (four images in a 2x2 layout around a random
//! centre), mixup (two images blended, boxes of both kept) and copy-paste (defects cut from
//! another image and pasted onto this one). Each takes the images already decoded and
//! augmented, and returns an image of the first image's size.

use image::{DynamicImage, GenericImage, GenericImageView, imageops::FilterType};
use rand::RngExt;
use rand::rngs::StdRng;

use super::voc::Object;

type Labeled = (DynamicImage, Vec<Object>);

fn clip(o: &Object, x0: f32, y0: f32, x1: f32, y1: f32) -> Option<Object> {
    let b = [
        o.bbox[0].clamp(x0, x1),
        o.bbox[1].clamp(y0, y1),
        o.bbox[2].clamp(x0, x1),
        o.bbox[3].clamp(y0, y1),
    ];
    let before = (o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]);
    let after = (b[2] - b[0]) * (b[3] - b[1]);
    (b[2] - b[0] >= 2.0 && b[3] - b[1] >= 2.0 && after >= 0.25 * before)
        .then_some(Object { bbox: b, ..*o })
}

/// Four images around a random centre; each is resized to its quadrant.
pub fn mosaic(parts: [Labeled; 4], rng: &mut StdRng) -> Labeled {
    let (w, h) = parts[0].0.dimensions();
    let cx = (w as f32 * rng.random_range(0.3..0.7f32)).round() as u32;
    let cy = (h as f32 * rng.random_range(0.3..0.7f32)).round() as u32;
    let mut canvas = blank_like(&parts[0].0, w, h);
    let cells = [
        (0, 0, cx, cy),
        (cx, 0, w - cx, cy),
        (0, cy, cx, h - cy),
        (cx, cy, w - cx, h - cy),
    ];
    let mut objects = Vec::new();
    for ((image, objs), (x0, y0, cw, ch)) in parts.into_iter().zip(cells) {
        if cw < 2 || ch < 2 {
            continue;
        }
        let (iw, ih) = image.dimensions();
        let resized = image.resize_exact(cw, ch, FilterType::Triangle);
        let _ = canvas.copy_from(&resized, x0, y0);
        let (sx, sy) = (cw as f32 / iw as f32, ch as f32 / ih as f32);
        objects.extend(objs.iter().filter_map(|o| {
            let moved = Object {
                bbox: [
                    o.bbox[0] * sx + x0 as f32,
                    o.bbox[1] * sy + y0 as f32,
                    o.bbox[2] * sx + x0 as f32,
                    o.bbox[3] * sy + y0 as f32,
                ],
                ..*o
            };
            clip(
                &moved,
                x0 as f32,
                y0 as f32,
                (x0 + cw) as f32,
                (y0 + ch) as f32,
            )
        }));
    }
    (canvas, objects)
}

/// Blends `other` (resized to `base`) into `base` with a weight in [0.3, 0.7]; boxes of both.
pub fn mixup(base: Labeled, other: Labeled, rng: &mut StdRng) -> Labeled {
    let (w, h) = base.0.dimensions();
    let (ow, oh) = other.0.dimensions();
    let lambda = rng.random_range(0.3..0.7f32);
    let other_img = other.0.resize_exact(w, h, FilterType::Triangle);
    let mut out = base.0;
    blend(&mut out, &other_img, lambda);
    let (sx, sy) = (w as f32 / ow as f32, h as f32 / oh as f32);
    let mut objects = base.1;
    objects.extend(other.1.iter().map(|o| Object {
        bbox: [
            o.bbox[0] * sx,
            o.bbox[1] * sy,
            o.bbox[2] * sx,
            o.bbox[3] * sy,
        ],
        ..*o
    }));
    (out, objects)
}

/// Cuts up to three defects out of `donor` and pastes them at random places on `base`; a base
/// box more than 70% covered by a paste is dropped.
pub fn copy_paste(base: Labeled, donor: &Labeled, rng: &mut StdRng) -> Labeled {
    let (mut image, mut objects) = base;
    let (w, h) = image.dimensions();
    for o in donor.1.iter().take(3) {
        let (x1, y1) = (o.bbox[0].max(0.0) as u32, o.bbox[1].max(0.0) as u32);
        let (x2, y2) = (o.bbox[2].ceil() as u32, o.bbox[3].ceil() as u32);
        let (dw, dh) = donor.0.dimensions();
        let (pw, ph) = (x2.min(dw).saturating_sub(x1), y2.min(dh).saturating_sub(y1));
        if pw < 2 || ph < 2 || pw > w || ph > h {
            continue;
        }
        let patch = donor.0.crop_imm(x1, y1, pw, ph);
        let px = rng.random_range(0..=w - pw);
        let py = rng.random_range(0..=h - ph);
        let _ = image.copy_from(&patch, px, py);
        let pasted = [px as f32, py as f32, (px + pw) as f32, (py + ph) as f32];
        objects.retain(|b| {
            let iw = (b.bbox[2].min(pasted[2]) - b.bbox[0].max(pasted[0])).max(0.0);
            let ih = (b.bbox[3].min(pasted[3]) - b.bbox[1].max(pasted[1])).max(0.0);
            iw * ih < 0.7 * (b.bbox[2] - b.bbox[0]) * (b.bbox[3] - b.bbox[1])
        });
        objects.push(Object { bbox: pasted, ..*o });
    }
    (image, objects)
}

fn blank_like(image: &DynamicImage, w: u32, h: u32) -> DynamicImage {
    match image {
        DynamicImage::ImageLuma8(_) => DynamicImage::ImageLuma8(image::GrayImage::new(w, h)),
        _ => DynamicImage::ImageRgb8(image::RgbImage::new(w, h)),
    }
}

fn blend(base: &mut DynamicImage, other: &DynamicImage, lambda: f32) {
    let mix = |a: &mut [u8], b: &[u8]| {
        for (x, &y) in a.iter_mut().zip(b) {
            *x = ((*x as f32) * lambda + (y as f32) * (1.0 - lambda)).round() as u8;
        }
    };
    match base {
        DynamicImage::ImageLuma8(a) => mix(a.as_mut(), other.to_luma8().as_raw()),
        other_kind => {
            let mut rgb = other_kind.to_rgb8();
            mix(rgb.as_mut(), other.to_rgb8().as_raw());
            *other_kind = DynamicImage::ImageRgb8(rgb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A black image with a white box, and its label.
    fn marked(w: u32, h: u32, b: [f32; 4], class_id: usize) -> Labeled {
        let img = image::GrayImage::from_fn(w, h, |x, y| {
            let inside =
                (x as f32) >= b[0] && (x as f32) < b[2] && (y as f32) >= b[1] && (y as f32) < b[3];
            image::Luma([if inside { 255 } else { 0 }])
        });
        (
            DynamicImage::ImageLuma8(img),
            vec![Object {
                class_id,
                bbox: b,
                difficult: false,
                id: None,
                ignore: false,
            }],
        )
    }

    fn white_fraction(image: &DynamicImage, b: [f32; 4]) -> f32 {
        let g = image.to_luma8();
        let (mut white, mut all) = (0, 0);
        for y in b[1] as u32..b[3] as u32 {
            for x in b[0] as u32..b[2] as u32 {
                all += 1;
                white += (g.get_pixel(x, y).0[0] > 100) as u32;
            }
        }
        white as f32 / all.max(1) as f32
    }

    #[test]
    fn mosaic_boxes_cover_their_marks() {
        for seed in 0..10 {
            let mut rng = StdRng::seed_from_u64(seed);
            let parts = [
                marked(100, 100, [10.0, 10.0, 60.0, 50.0], 0),
                marked(80, 120, [20.0, 30.0, 70.0, 110.0], 1),
                marked(100, 100, [40.0, 40.0, 90.0, 90.0], 2),
                marked(100, 100, [0.0, 0.0, 100.0, 100.0], 3),
            ];
            let (image, objects) = mosaic(parts, &mut rng);
            assert_eq!(image.dimensions(), (100, 100));
            assert_eq!(objects.len(), 4, "seed {seed}");
            for o in &objects {
                assert!(
                    white_fraction(&image, o.bbox) > 0.9,
                    "seed {seed}: box {:?} of class {} not on its mark",
                    o.bbox,
                    o.class_id
                );
            }
        }
    }

    #[test]
    fn copy_paste_adds_the_defect_where_it_is_pasted() {
        let mut rng = StdRng::seed_from_u64(4);
        let base = (
            DynamicImage::ImageLuma8(image::GrayImage::new(100, 100)),
            vec![],
        );
        let donor = marked(100, 100, [10.0, 20.0, 40.0, 35.0], 5);
        let (image, objects) = copy_paste(base, &donor, &mut rng);
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0].class_id, 5);
        let b = objects[0].bbox;
        assert_eq!((b[2] - b[0], b[3] - b[1]), (30.0, 15.0));
        assert_eq!(white_fraction(&image, b), 1.0);
    }

    #[test]
    fn mixup_keeps_both_label_sets_scaled() {
        let mut rng = StdRng::seed_from_u64(1);
        let (image, objects) = mixup(
            marked(100, 100, [0.0, 0.0, 10.0, 10.0], 0),
            marked(50, 50, [10.0, 10.0, 20.0, 20.0], 1),
            &mut rng,
        );
        assert_eq!(image.dimensions(), (100, 100));
        assert_eq!(objects[1].bbox, [20.0, 20.0, 40.0, 40.0]);
        assert_eq!(objects.len(), 2);
    }
}
