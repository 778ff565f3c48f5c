//! Hand-written CPU kernels for the inference path where burn's CPU backend leaves time on the
//! table. Each applies only on the Flex backend without autodiff, falls back to burn's ops
//! everywhere else (GPUs, training), and is tested against them.
//!
//! Window attention: burn's path splits q, k, v into heads (three permute copies), runs the
//! attention op, and merges the heads back (another copy). `window_attention` reads q, k, v
//! straight out of the qkv projection and writes the merged heads, one window per task, with
//! scores, softmax (vectorised exp) and the weighted sum in L1-sized scratch.
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

/// Windowed multi-head attention straight from the qkv projection.
///
/// `qkv`: `[windows, n, 3 * dim]` (q, k, v, each `heads x head_dim`, as timm's `qkv` Linear
/// lays them out); `bias`: `[bias_windows, heads, n, n]` added to the scores, window `w` using
/// `bias[w % bias_windows]` (relative-position bias, plus the shift mask when there is one).
/// Returns `[windows, n, dim]` with the heads merged, or `None` where the kernel does not apply
/// (autodiff, a device other than Flex, a dtype other than f32).
pub fn window_attention(
    qkv: &Tensor<3>,
    bias: &Tensor<4>,
    heads: usize,
    scale: f32,
) -> Option<Tensor<3>> {
    let device = qkv.device();
    if device.is_autodiff()
        || device != Device::flex()
        || qkv.dtype() != DType::F32
        || bias.dtype() != DType::F32
    {
        return None;
    }
    let [windows, n, three_dim] = qkv.dims();
    let [bias_windows, bias_heads, bn, bm] = bias.dims();
    let dim = three_dim / 3;
    if three_dim % 3 != 0
        || heads == 0
        || dim % heads != 0
        || bias_heads != heads
        || bn != n
        || bm != n
        || bias_windows == 0
    {
        return None;
    }
    let qkv_data = qkv.clone().into_data();
    let bias_data = bias.clone().into_data();
    let (Ok(qkv_values), Ok(bias_values)) =
        (qkv_data.as_slice::<f32>(), bias_data.as_slice::<f32>())
    else {
        return None;
    };
    let mut out = vec![0f32; windows * n * dim];
    let shape = AttentionShape {
        n,
        dim,
        heads,
        head_dim: dim / heads,
        bias_windows,
        scale,
    };
    out.par_chunks_mut(n * dim)
        .enumerate()
        .for_each(|(w, out_window)| {
            let qkv_window = &qkv_values[w * n * three_dim..(w + 1) * n * three_dim];
            let bias_window = &bias_values
                [(w % bias_windows) * heads * n * n..(w % bias_windows + 1) * heads * n * n];
            attend_window(&shape, qkv_window, bias_window, out_window);
        });
    Some(Tensor::from_data(
        TensorData::new(out, [windows, n, dim]),
        &device,
    ))
}

struct AttentionShape {
    n: usize,
    dim: usize,
    heads: usize,
    head_dim: usize,
    bias_windows: usize,
    scale: f32,
}

fn attend_window(shape: &AttentionShape, qkv: &[f32], bias: &[f32], out: &mut [f32]) {
    debug_assert!(shape.bias_windows > 0);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports the features the function is compiled for.
            unsafe { attend_window_avx2(shape, qkv, bias, out) };
            return;
        }
    }
    attend_window_portable(shape, qkv, bias, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_window_avx2(shape: &AttentionShape, qkv: &[f32], bias: &[f32], out: &mut [f32]) {
    attend_window_portable(shape, qkv, bias, out)
}

#[inline(always)]
fn attend_window_portable(shape: &AttentionShape, qkv: &[f32], bias: &[f32], out: &mut [f32]) {
    let AttentionShape {
        n,
        dim,
        heads,
        head_dim,
        scale,
        ..
    } = *shape;
    let stride = 3 * dim;
    let mut kt = vec![0f32; head_dim * n];
    let mut scores = vec![0f32; n];
    let mut acc = vec![0f32; head_dim];
    for h in 0..heads {
        let (q_off, k_off, v_off) = (h * head_dim, dim + h * head_dim, 2 * dim + h * head_dim);
        // K transposed, so each score row is a run of contiguous multiply-adds.
        for j in 0..n {
            for c in 0..head_dim {
                kt[c * n + j] = qkv[j * stride + k_off + c];
            }
        }
        let bias_head = &bias[h * n * n..(h + 1) * n * n];
        for i in 0..n {
            scores.copy_from_slice(&bias_head[i * n..(i + 1) * n]);
            let q_row = &qkv[i * stride + q_off..i * stride + q_off + head_dim];
            for (c, &qc) in q_row.iter().enumerate() {
                let a = qc * scale;
                for (s, &k) in scores.iter_mut().zip(&kt[c * n..(c + 1) * n]) {
                    *s += a * k;
                }
            }
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = exp(*s - max);
                sum += *s;
            }
            let inv = 1.0 / sum;
            acc.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let p = p * inv;
                let v_row = &qkv[j * stride + v_off..j * stride + v_off + head_dim];
                for (a, &v) in acc.iter_mut().zip(v_row) {
                    *a += p * v;
                }
            }
            out[i * dim + h * head_dim..i * dim + (h + 1) * head_dim].copy_from_slice(&acc);
        }
    }
}

/// exp(x) for x <= 0 as softmax needs it (Cephes' single-precision polynomial, ~1 ulp),
/// branch-free so that it vectorises; inputs below -87 give ~1e-38 instead of less.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let r2 = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r2 + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
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
    fn exp_matches_std() {
        let mut worst = 0f32;
        for i in 0..20000 {
            let x = -87.0 + i as f32 * (87.0 + 10.0) / 20000.0;
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 4e-7, "max relative error {worst}");
    }

    #[test]
    fn window_attention_matches_burn_attention() {
        use burn::tensor::module::attention;
        use burn::tensor::ops::AttentionModuleOptions;
        let device = Device::flex();
        let (windows, n, heads, head_dim, bias_windows) = (6, 49, 3, 8, 3);
        let dim = heads * head_dim;
        let qkv = Tensor::<3>::random(
            [windows, n, 3 * dim],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let mut bias = Tensor::<4>::random(
            [bias_windows, heads, n, n],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        // A shift-mask-like -100 on some pairs.
        bias = bias.clone() + bias.greater_elem(1.5).float() * -100.0;
        let scale = (head_dim as f32).powf(-0.5);
        let ours = window_attention(&qkv, &bias, heads, scale).expect("applies on Flex");
        let split = qkv
            .reshape([windows, n, 3, heads, head_dim])
            .permute([2, 0, 3, 1, 4]);
        let part = |i: usize| {
            split
                .clone()
                .narrow(0, i, 1)
                .reshape([windows, heads, n, head_dim])
        };
        let bias_full = bias
            .unsqueeze_dim::<5>(0)
            .expand([windows / bias_windows, bias_windows, heads, n, n])
            .reshape([windows, heads, n, n]);
        let options = AttentionModuleOptions {
            scale: Some(scale as f64),
            softcap: None,
            is_causal: false,
        };
        let reference = attention(part(0), part(1), part(2), None, Some(bias_full), options);
        let reference = reference.swap_dims(1, 2).reshape([windows, n, dim]);
        let diff = (ours - reference).abs().max().into_scalar::<f32>();
        assert!(diff < 2e-5, "max |ours - burn| = {diff}");
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
