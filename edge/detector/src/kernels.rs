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
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { gelu_avx2(src, dst) };
        return;
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

/// Whether [`window_attention`] can run these tensors: the Flex backend without autodiff,
/// f32, a head size it is compiled for, and a bias of shape `[bias_windows, heads, n, n]`.
pub fn window_attention_applies(qkv: &Tensor<3>, bias: &Tensor<4>, heads: usize) -> bool {
    let device = qkv.device();
    let [_, n, three_dim] = qkv.dims();
    let [bias_windows, bias_heads, bn, bm] = bias.dims();
    let dim = three_dim / 3;
    !device.is_autodiff()
        && device == Device::flex()
        && qkv.dtype() == DType::F32
        && bias.dtype() == DType::F32
        && three_dim.is_multiple_of(3)
        && heads > 0
        && dim.is_multiple_of(heads)
        && HEAD_DIMS.contains(&(dim / heads))
        && bias_windows > 0
        && bias_heads == heads
        && bn == n
        && bm == n
}

/// Windowed multi-head attention straight from the qkv projection.
///
/// `qkv`: `[windows, n, 3 * dim]` (q, k, v, each `heads x head_dim`, as timm's `qkv` Linear
/// lays them out); `bias`: `[bias_windows, heads, n, n]` added to the scores, window `w` using
/// `bias[w % bias_windows]` (relative-position bias, plus the shift mask when there is one).
/// Returns `[windows, n, dim]` with the heads merged. Call it where
/// [`window_attention_applies`]; both tensors are taken by value because burn reads a tensor
/// that nothing else holds in place, and copies a shared one element by element.
pub fn window_attention(qkv: Tensor<3>, bias: Tensor<4>, heads: usize, scale: f32) -> Tensor<3> {
    assert!(
        window_attention_applies(&qkv, &bias, heads),
        "window_attention called on tensors it does not apply to"
    );
    let device = qkv.device();
    let [windows, n, three_dim] = qkv.dims();
    let [bias_windows, _, _, _] = bias.dims();
    let dim = three_dim / 3;
    let qkv_data = qkv.into_data();
    let bias_data = bias.into_data();
    let qkv_values = qkv_data.as_slice::<f32>().expect("checked f32");
    let bias_values = bias_data.as_slice::<f32>().expect("checked f32");
    let mut out = vec![0f32; windows * n * dim];
    let shape = AttentionShape {
        n,
        dim,
        heads,
        head_dim: dim / heads,
        scale,
    };
    out.par_chunks_mut(n * dim)
        .enumerate()
        .for_each(|(w, out_window)| {
            let qkv_window = &qkv_values[w * n * three_dim..(w + 1) * n * three_dim];
            let b = w % bias_windows;
            let bias_window = &bias_values[b * heads * n * n..(b + 1) * heads * n * n];
            attend_window(&shape, qkv_window, bias_window, out_window);
        });
    Tensor::from_data(TensorData::new(out, [windows, n, dim]), &device)
}

/// AVX2 with FMA: the kernels then run a copy of their loops compiled for 8-wide vectors.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

struct AttentionShape {
    n: usize,
    dim: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
}

/// Head sizes the kernel is compiled for (the edge model uses 24, swin_tiny 32).
const HEAD_DIMS: [usize; 5] = [16, 24, 32, 48, 64];

fn attend_window(shape: &AttentionShape, qkv: &[f32], bias: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { attend_window_avx2(shape, qkv, bias, out) };
        return;
    }
    attend_window_any(shape, qkv, bias, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_window_avx2(shape: &AttentionShape, qkv: &[f32], bias: &[f32], out: &mut [f32]) {
    attend_window_any(shape, qkv, bias, out)
}

#[inline(always)]
fn attend_window_any(shape: &AttentionShape, qkv: &[f32], bias: &[f32], out: &mut [f32]) {
    match shape.head_dim {
        16 => attend_window_hd::<16>(shape, qkv, bias, out),
        24 => attend_window_hd::<24>(shape, qkv, bias, out),
        32 => attend_window_hd::<32>(shape, qkv, bias, out),
        48 => attend_window_hd::<48>(shape, qkv, bias, out),
        64 => attend_window_hd::<64>(shape, qkv, bias, out),
        other => unreachable!("head dim {other} is filtered out before the kernel"),
    }
}

/// One window, every head. Scores are computed eight keys at a time (K transposed and padded
/// to a multiple of 8, so the eight sums stay in one register), the weighted sum of values in
/// a `HD`-float accumulator that also stays in registers.
#[inline(always)]
fn attend_window_hd<const HD: usize>(
    shape: &AttentionShape,
    qkv: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    let AttentionShape {
        n,
        dim,
        heads,
        scale,
        ..
    } = *shape;
    let np = n.div_ceil(8) * 8;
    let stride = 3 * dim;
    let mut kt = vec![0f32; HD * np];
    let mut scores = vec![0f32; np];
    for h in 0..heads {
        let (q_off, k_off, v_off) = (h * HD, dim + h * HD, 2 * dim + h * HD);
        for j in 0..n {
            for c in 0..HD {
                kt[c * np + j] = qkv[j * stride + k_off + c];
            }
        }
        let bias_head = &bias[h * n * n..(h + 1) * n * n];
        for i in 0..n {
            let mut q = [0f32; HD];
            for (qc, &x) in q
                .iter_mut()
                .zip(&qkv[i * stride + q_off..i * stride + q_off + HD])
            {
                *qc = x * scale;
            }
            // Up to 8 blocks of 8 keys at once: independent accumulators keep the FMA units
            // busy (one block at a time was a chain of HD dependent FMAs).
            for group in (0..np).step_by(64) {
                let blocks = ((np - group) / 8).min(8);
                let mut acc = [[0f32; 8]; 8];
                for (c, &qc) in q.iter().enumerate() {
                    let row = &kt[c * np + group..c * np + group + blocks * 8];
                    for (a, k8) in acc.iter_mut().zip(row.chunks_exact(8)) {
                        for l in 0..8 {
                            a[l] += qc * k8[l];
                        }
                    }
                }
                for (b, a) in acc.iter().enumerate().take(blocks) {
                    scores[group + b * 8..group + b * 8 + 8].copy_from_slice(a);
                }
            }
            let bias_row = &bias_head[i * n..(i + 1) * n];
            for (s, &b) in scores[..n].iter_mut().zip(bias_row) {
                *s += b;
            }
            let max = lanes_max(&scores[..n]);
            for s in scores[..n].iter_mut() {
                *s = exp(*s - max);
            }
            let inv = 1.0 / lanes_sum(&scores[..n]);
            // Two interleaved accumulators over the keys: twice the independent FMA chains.
            let (mut even, mut odd) = ([0f32; HD], [0f32; HD]);
            let pairs = scores[..n].chunks_exact(2);
            let last = pairs.remainder().first().copied();
            for (jp, p) in pairs.enumerate() {
                let j = 2 * jp;
                let v0 = &qkv[j * stride + v_off..j * stride + v_off + HD];
                let v1 = &qkv[(j + 1) * stride + v_off..(j + 1) * stride + v_off + HD];
                for c in 0..HD {
                    even[c] += p[0] * v0[c];
                    odd[c] += p[1] * v1[c];
                }
            }
            if let Some(p) = last {
                let j = n - 1;
                let v = &qkv[j * stride + v_off..j * stride + v_off + HD];
                for c in 0..HD {
                    even[c] += p * v[c];
                }
            }
            for ((o, a), b) in out[i * dim + h * HD..i * dim + (h + 1) * HD]
                .iter_mut()
                .zip(even)
                .zip(odd)
            {
                *o = (a + b) * inv;
            }
        }
    }
}

// Reductions over eight independent lanes: a plain float fold is sequential by IEEE rules and
// stops the compiler from vectorising the loop around it.
#[inline(always)]
fn lanes_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = l.max(v);
        }
    }
    rest.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

#[inline(always)]
fn lanes_sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += v;
        }
    }
    rest.iter().chain(&lanes).sum()
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
        // 7x7 windows (odd n), 12x12 (keys in more than one group of 64), even n.
        for (windows, n, heads, head_dim, bias_windows) in
            [(6, 49, 3, 16, 3), (2, 144, 2, 24, 1), (3, 50, 2, 32, 3)]
        {
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
            assert!(
                window_attention_applies(&qkv, &bias, heads),
                "applies on Flex"
            );
            let ours = window_attention(qkv.clone(), bias.clone(), heads, scale);
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
            assert!(
                diff < 2e-5,
                "n {n}, head dim {head_dim}: max |ours - burn| = {diff}"
            );
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
