//! Hand-written CPU kernels for the inference path where burn's CPU backend leaves time on the
//! table. Each has a portable implementation (any device, autodiff included) that it must match.
//!
//! GELU: burn's Flex backend evaluates `erf` with a scalar libm call per element, which made
//! GELU 30% of the edge backbone's time (`cargo bench -p edge --bench swin_ops`). Here `erf`
//! is a rational approximation (Eigen's `generic_fast_erf_float`, max abs error ~1e-7 in f32)
//! that the compiler vectorises, with AVX2/FMA chosen at run time where the CPU has them.

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::gelu as reference_gelu;
use rayon::prelude::*;

/// Exact (erf) GELU as timm's `nn.GELU()`; fast path for inference on the Flex CPU backend.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    if device.is_autodiff() || device != Device::flex() || x.dtype() != DType::F32 {
        return reference_gelu(x);
    }
    let shape = x.shape();
    let data = x.into_data();
    let Ok(src) = data.as_slice::<f32>() else {
        return reference_gelu(Tensor::from_data(data, &device));
    };
    let mut out = vec![0f32; src.len()];
    gelu_into(src, &mut out);
    Tensor::from_data(TensorData::new(out, shape), &device)
}

/// `dst[i] = gelu(src[i])`, split over the rayon pool in cache-sized chunks.
pub fn gelu_into(src: &[f32], dst: &mut [f32]) {
    const CHUNK: usize = 16 * 1024;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| gelu_chunk(s, d));
}

fn gelu_chunk(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { gelu_avx2(src, dst) };
            return;
        }
    }
    gelu_portable(src, dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_avx2(src: &[f32], dst: &mut [f32]) {
    gelu_portable(src, dst)
}

#[inline(always)]
fn gelu_portable(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// Rational approximation of erf on [-4, 4] (erf is +-1 in f32 beyond), branch-free.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_600_1e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn fast_gelu_matches_burn_gelu() {
        let device = Device::flex();
        let x = Tensor::<2>::random([64, 513], Distribution::Normal(0.0, 3.0), &device);
        let edge_values = Tensor::<2>::from_data(
            TensorData::new(
                vec![-10.0f32, -4.0, -0.5, 0.0, 1e-8, 0.5, 4.0, 10.0, 1e4, -1e4],
                [1, 10],
            ),
            &device,
        );
        for x in [x, edge_values] {
            let fast = gelu(x.clone());
            let reference = reference_gelu(x.clone());
            // Absolute 2e-6 near zero, relative 2e-7 (about 2 ulp) for large values.
            let scale = x.abs().clamp_min(1.0);
            let diff = ((fast - reference).abs() / scale)
                .max()
                .into_scalar::<f32>();
            assert!(diff < 2e-6, "max scaled |fast - reference| = {diff}");
        }
    }

    #[test]
    fn erf_known_values() {
        // erf(0.5) = 0.5204998778, erf(1) = 0.8427007929, erf(2) = 0.9953222650.
        for (x, want) in [
            (0.5f32, 0.520_499_9f32),
            (1.0, 0.842_700_8),
            (2.0, 0.995_322_3),
            (-1.0, -0.842_700_8),
        ] {
            assert!(
                (erf(x) - want).abs() < 3e-7,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
    }
}
