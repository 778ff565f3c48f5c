//! Grad-CAM heat maps of a frame for the labeling page.

use image::GrayImage;

/// The heat map of where `detector` (with autodiff: [`Detector::with_autodiff`]) looked in
/// `frame`: Grad-CAM per tile, cut as the pipeline cuts frames (`tile`, `overlap`), each tile's
/// map weighted by the score of what it explains (a tile where the model found nothing stays
/// faint; the strongest tile wins in overlaps), drawn as a translucent PNG the size of the frame.
pub fn heatmap_png(
    detector: &edge_detector::Detector,
    frame: &GrayImage,
    tile: usize,
    overlap: usize,
) -> Result<Vec<u8>, edge_detector::DetectorError> {
    let size = if tile > 0 {
        tile
    } else {
        detector.config.preprocess.input_size[1]
    };
    let tiles = crate::pipeline::tiles(frame, size, overlap.min(size / 2));
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let mut heat = vec![0f32; w * h];
    for chunk in tiles.chunks(4) {
        let views: Vec<_> = chunk
            .iter()
            .map(|(_, _, t)| edge_detector::ImageView::grey(t))
            .collect();
        for ((x0, y0, _), map) in chunk.iter().zip(detector.saliency(&views)?) {
            for y in 0..map.height {
                let row = (*y0 as usize + y) * w + *x0 as usize;
                for x in 0..map.width {
                    let v = &mut heat[row + x];
                    *v = v.max(map.score * map.values[y * map.width + x]);
                }
            }
        }
    }
    let max = heat.iter().copied().fold(0f32, f32::max);
    if max > 0.0 {
        heat.iter_mut().for_each(|v| *v /= max);
    }
    // Black -> purple -> orange -> yellow, transparent where the model did not look.
    const STOPS: [[f32; 3]; 4] = [
        [40.0, 0.0, 90.0],
        [180.0, 30.0, 120.0],
        [250.0, 130.0, 20.0],
        [255.0, 240.0, 60.0],
    ];
    let rgba = image::RgbaImage::from_fn(w as u32, h as u32, |x, y| {
        let v = heat[y as usize * w + x as usize].clamp(0.0, 1.0);
        let f = v * (STOPS.len() - 1) as f32;
        let i = (f.floor() as usize).min(STOPS.len() - 2);
        let t = f - i as f32;
        let c = |k: usize| (STOPS[i][k] * (1.0 - t) + STOPS[i + 1][k] * t) as u8;
        let alpha = if v < 0.25 {
            0
        } else {
            (40.0 + 170.0 * v) as u8
        };
        image::Rgba([c(0), c(1), c(2), alpha])
    });
    let mut png = Vec::new();
    image::DynamicImage::ImageRgba8(rgba)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .expect("encoding to memory");
    Ok(png)
}
