//! Batches for training and evaluation: decode, augment and preprocess in parallel (rayon),
//! a few batches ahead of the training step (a bounded channel), deterministic per seed and
//! epoch whatever the thread timing.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use edge_detector::loss::GtBox;
use edge_detector::{ImageView, InverseTransform, Preprocess};
use image::DynamicImage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

use super::augment::{AugmentConfig, augment};
use super::mixers;
use super::voc::{DataError, Object, Sample};

/// A preprocessed batch on the host.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[count, 3, H, W]` normalised pixels, row-major.
    pub pixels: Vec<f32>,
    pub count: usize,
    /// Boxes in network-input pixels, per image.
    pub boxes: Vec<Vec<GtBox>>,
    /// Which samples (indices into the list given) are in the batch.
    pub indices: Vec<usize>,
    pub inverses: Vec<InverseTransform>,
}

/// Decodes an image file as the preprocessing wants it (grey or RGB).
pub fn decode(sample: &Sample, grey: bool) -> Result<DynamicImage, DataError> {
    let image =
        edge_detector::image_io::open(&sample.image_path).map_err(|e| DataError::Invalid {
            path: sample.image_path.display().to_string(),
            reason: format!("cannot decode image: {e}"),
        })?;
    Ok(if grey {
        DynamicImage::ImageLuma8(image.into_luma8())
    } else {
        DynamicImage::ImageRgb8(image.into_rgb8())
    })
}

/// One sample, augmented (when `augmentation` is given), mixed with others of `samples`
/// when the mixers are on, and preprocessed.
pub fn prepare(
    samples: &[Sample],
    index: usize,
    preprocess: &Preprocess,
    augmentation: Option<&AugmentConfig>,
    rng: &mut StdRng,
) -> Result<(Vec<f32>, Vec<GtBox>, InverseTransform), DataError> {
    let sample = &samples[index];
    let (image, objects) = match augmentation {
        Some(config) => {
            let load =
                |i: usize, rng: &mut StdRng| -> Result<(DynamicImage, Vec<Object>), DataError> {
                    Ok(augment(
                        decode(&samples[i], preprocess.grey)?,
                        samples[i].objects.clone(),
                        config,
                        rng,
                    ))
                };
            let mut labeled = load(index, rng)?;
            let other = |rng: &mut StdRng| rng.random_range(0..samples.len());
            if rng.random_bool(config.mosaic.clamp(0.0, 1.0)) {
                let (a, b, c) = (other(rng), other(rng), other(rng));
                labeled =
                    mixers::mosaic([labeled, load(a, rng)?, load(b, rng)?, load(c, rng)?], rng);
            }
            if rng.random_bool(config.mixup.clamp(0.0, 1.0)) {
                let j = other(rng);
                labeled = mixers::mixup(labeled, load(j, rng)?, rng);
            }
            if rng.random_bool(config.copy_paste.clamp(0.0, 1.0)) {
                let j = other(rng);
                let donor = load(j, rng)?;
                labeled = mixers::copy_paste(labeled, &donor, rng);
            }
            labeled
        }
        None => (decode(sample, preprocess.grey)?, sample.objects.clone()),
    };
    let (pixels, channels) = match &image {
        DynamicImage::ImageLuma8(b) => (b.as_raw().as_slice(), 1),
        DynamicImage::ImageRgb8(b) => (b.as_raw().as_slice(), 3),
        _ => unreachable!("decode gives Luma8 or Rgb8 and augmentations keep the kind"),
    };
    let view = ImageView {
        width: image.width() as usize,
        height: image.height() as usize,
        channels,
        pixels,
    };
    let (data, inverse) = preprocess
        .prepare(&view, 0)
        .map_err(|e| DataError::Invalid {
            path: sample.image_path.display().to_string(),
            reason: e.to_string(),
        })?;
    let boxes = objects
        .iter()
        .map(|o: &Object| to_input(o, &inverse))
        .collect();
    Ok((data, boxes, inverse))
}

fn to_input(o: &Object, inverse: &InverseTransform) -> GtBox {
    GtBox {
        x1: o.bbox[0] * inverse.scale_x,
        y1: o.bbox[1] * inverse.scale_y,
        x2: o.bbox[2] * inverse.scale_x,
        y2: o.bbox[3] * inverse.scale_y,
        class_id: o.class_id,
        id: o.id,
        weight: if o.ignore { 0.0 } else { 1.0 },
    }
}

/// A batch of the given samples, prepared in parallel; `seeds[i]` drives sample i's augmentation.
pub fn make_batch(
    samples: &[Sample],
    indices: &[usize],
    preprocess: &Preprocess,
    augmentation: Option<&AugmentConfig>,
    seeds: &[u64],
) -> Result<Batch, DataError> {
    let prepared: Vec<_> = indices
        .par_iter()
        .zip(seeds.par_iter())
        .map(|(&i, &seed)| {
            prepare(
                samples,
                i,
                preprocess,
                augmentation,
                &mut StdRng::seed_from_u64(seed),
            )
        })
        .collect::<Result<_, _>>()?;
    let mut pixels = Vec::with_capacity(prepared.iter().map(|p| p.0.len()).sum());
    let mut boxes = Vec::with_capacity(prepared.len());
    let mut inverses = Vec::with_capacity(prepared.len());
    for (data, b, inverse) in prepared {
        pixels.extend_from_slice(&data);
        boxes.push(b);
        inverses.push(inverse);
    }
    Ok(Batch {
        pixels,
        count: indices.len(),
        boxes,
        indices: indices.to_vec(),
        inverses,
    })
}

/// The order of one training epoch: a shuffle fixed by (seed, epoch).
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64,
    ));
    order
}

/// Streams the batches of one epoch, `prefetch` ahead, from a background thread. Batches
/// before `skip` are not built (resuming mid-epoch). Incomplete last batches are dropped when
/// `drop_last` (training), kept otherwise.
pub struct EpochBatches {
    pub receiver: Receiver<Result<Batch, DataError>>,
    pub batches: usize,
}

#[allow(clippy::too_many_arguments)]
pub fn stream_epoch(
    samples: Arc<Vec<Sample>>,
    order: Vec<usize>,
    preprocess: Preprocess,
    augmentation: Option<AugmentConfig>,
    batch_size: usize,
    drop_last: bool,
    seed: u64,
    skip: usize,
    prefetch: usize,
) -> EpochBatches {
    let batch_size = batch_size.max(1);
    let chunks: Vec<Vec<usize>> = order
        .chunks(batch_size)
        .filter(|c| !drop_last || c.len() == batch_size)
        .map(|c| c.to_vec())
        .collect();
    let batches = chunks.len();
    let (sender, receiver) = sync_channel(prefetch.max(1));
    std::thread::spawn(move || {
        for (b, chunk) in chunks.into_iter().enumerate().skip(skip) {
            let seeds: Vec<u64> = chunk
                .iter()
                .map(|&i| seed ^ ((b as u64) << 40) ^ ((i as u64) << 1) ^ 0xA5A5)
                .collect();
            let batch = make_batch(&samples, &chunk, &preprocess, augmentation.as_ref(), &seeds);
            if sender.send(batch).is_err() {
                return;
            }
        }
    });
    EpochBatches { receiver, batches }
}
