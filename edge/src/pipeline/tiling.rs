//! Frames cut into overlapping tiles of the model's input size, and detections merged back
//! across the tile seams.

use edge_detector::Detection;
use image::GrayImage;

/// Tile origins along one axis: `size`-wide windows with at least `overlap` shared pixels,
/// the last one flush with the end.
pub fn tile_starts(length: usize, size: usize, overlap: usize) -> Vec<usize> {
    if length <= size {
        return vec![0];
    }
    let stride = size.saturating_sub(overlap).max(1);
    let mut starts: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|&s| s + size < length)
        .collect();
    starts.push(length - size);
    starts
}

/// Cuts a frame into tiles; returns (x, y, tile).
pub fn tiles(image: &GrayImage, size: usize, overlap: usize) -> Vec<(u32, u32, GrayImage)> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut out = Vec::new();
    for &y in &tile_starts(h, size, overlap) {
        for &x in &tile_starts(w, size, overlap) {
            let tw = size.min(w) as u32;
            let th = size.min(h) as u32;
            let tile = image::imageops::crop_imm(image, x as u32, y as u32, tw, th).to_image();
            out.push((x as u32, y as u32, tile));
        }
    }
    out
}

/// Merges detections from overlapping tiles: same-class boxes where one mostly covers the other
/// (intersection over the smaller area >= `threshold`) become their union with the higher score;
/// this removes the duplicates in overlaps and joins defects cut by a seam.
pub fn merge_across_seams(mut dets: Vec<Detection>, threshold: f32) -> Vec<Detection> {
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::with_capacity(dets.len());
    for d in dets {
        let area = |b: &Detection| (b.x2 - b.x1).max(0.0) * (b.y2 - b.y1).max(0.0);
        let hit = kept.iter_mut().find(|k| {
            if k.class_id != d.class_id {
                return false;
            }
            let iw = (k.x2.min(d.x2) - k.x1.max(d.x1)).max(0.0);
            let ih = (k.y2.min(d.y2) - k.y1.max(d.y1)).max(0.0);
            let smaller = area(k).min(area(&d));
            smaller > 0.0 && iw * ih / smaller >= threshold
        });
        match hit {
            Some(k) => {
                k.x1 = k.x1.min(d.x1);
                k.y1 = k.y1.min(d.y1);
                k.x2 = k.x2.max(d.x2);
                k.y2 = k.y2.max(d.y2);
            }
            None => kept.push(d),
        }
    }
    kept
}
