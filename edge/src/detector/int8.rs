//! INT8 compute for quantized models on the CPU: a GEMM with 32-bit integer accumulation.
//!
//! burn 0.22's quantized matmul on its CPU backend dequantizes and multiplies in float, so
//! INT8 weights alone save bytes but not time. Here a Linear layer of a quantized model file
//! keeps its weights as INT8 (symmetric, one scale per output channel, exactly the values of the
//! file), and each call quantizes its input per row (dynamic, symmetric: scale = max|x| / 127),
//! multiplies in integers, and scales the `i32` sums back: `y = (qx . qw) * sx * sw + b`.
//!
//! The kernel is for x86-64 with AVX2, which has no dot-product instruction for bytes (VNNI):
//! weights and inputs are widened to `i16` and `vpmaddwd` multiplies 16 pairs and adds
//! neighbours into 8 `i32` lanes, 16 multiply-adds per instruction against 8 for an f32 FMA, with
//! no overflow (|q| <= 127: a pair sums to at most 32,258, and K <= 66,000 products fit an
//! `i32`). Weights are packed once at load, in panels of 16 output channels with input pairs
//! interleaved; a 6-row by 16-column block of accumulators lives in registers. Elsewhere (no
//! AVX2, autodiff, GPUs) the layer runs as the float Linear it also is.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

/// Rows per register block.
const MR: usize = 6;
/// Output channels per packed panel (two 8-lane vectors).
const NR: usize = 16;
/// Rows per parallel task.
const ROWS_PER_TASK: usize = MR * 8;

/// A Linear layer's weights packed for the INT8 kernel.
#[derive(Debug)]
pub struct Int8Linear {
    k: usize,
    n: usize,
    /// `k` rounded up to even: inputs are consumed in pairs.
    k_pad: usize,
    panels: usize,
    /// `[panel][pair][16 columns x (even, odd input)]` as i16.
    packed: Vec<i16>,
    /// Per output channel, padded to whole panels with zeros.
    scales: Vec<f32>,
    bias: Vec<f32>,
}

/// Shared handle stored in the model (cloned with it, never trained).
pub type Int8Weights = Option<Arc<Int8Linear>>;

impl Int8Linear {
    /// From INT8 weights in burn's Linear layout `[k (in), n (out)]`, row-major, with one scale
    /// per output column.
    pub fn new(q: &[i8], scales: &[f32], k: usize, n: usize, bias: Option<&[f32]>) -> Self {
        assert_eq!(q.len(), k * n, "weights are not [k, n]");
        assert_eq!(scales.len(), n, "one scale per output channel");
        let k_pad = k.next_multiple_of(2);
        let pairs = k_pad / 2;
        let panels = n.div_ceil(NR);
        let mut packed = vec![0i16; panels * pairs * 2 * NR];
        for panel in 0..panels {
            for p in 0..pairs {
                let base = (panel * pairs + p) * 2 * NR;
                for j in 0..NR {
                    let col = panel * NR + j;
                    if col >= n {
                        continue;
                    }
                    for t in 0..2 {
                        let row = 2 * p + t;
                        if row < k {
                            packed[base + 2 * j + t] = q[row * n + col] as i16;
                        }
                    }
                }
            }
        }
        let mut padded_scales = vec![0f32; panels * NR];
        padded_scales[..n].copy_from_slice(scales);
        let mut padded_bias = vec![0f32; panels * NR];
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "one bias per output channel");
            padded_bias[..n].copy_from_slice(b);
        }
        Self {
            k,
            n,
            k_pad,
            panels,
            packed,
            scales: padded_scales,
            bias: padded_bias,
        }
    }

    /// Quantizes float weights `[k, n]` per output column (scale = max|w| / 127): for weights
    /// that were loaded from an INT8 file this recovers the file's integers exactly.
    pub fn quantize(weights: &[f32], k: usize, n: usize, bias: Option<&[f32]>) -> Self {
        let (q, scales) = super::quant::quantize_weights(weights, &[k, n], 1);
        Self::new(&q, &scales, k, n, bias)
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Whether this CPU can run the kernel.
    pub fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Whether [`Int8Linear::forward`] can take this tensor: f32 on the Flex backend without
    /// autodiff, last axis = in_features, on a CPU with AVX2.
    pub fn applies<const D: usize>(&self, x: &Tensor<D>) -> bool {
        let device = x.device();
        !device.is_autodiff()
            && device == Device::flex()
            && x.dtype() == DType::F32
            && x.dims()[D - 1] == self.k
            && Self::supported()
    }

    /// `x`: `[..., k]` -> `[..., n]`. Call it where [`Int8Linear::applies`].
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let device = x.device();
        let mut dims = x.dims();
        let data = x.into_data();
        let values = data.as_slice::<f32>().expect("applies() checked f32");
        let m = values.len() / self.k;
        let mut out = vec![0f32; m * self.n];
        self.forward_slice(values, m, &mut out);
        dims[D - 1] = self.n;
        Tensor::from_data(TensorData::new(out, dims), &device)
    }

    /// `x`: `[m, k]` row-major; `out`: `[m, n]`. Needs [`Int8Linear::supported`].
    pub fn forward_slice(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert!(Self::supported(), "the INT8 kernel needs AVX2");
        assert_eq!(x.len(), m * self.k);
        assert_eq!(out.len(), m * self.n);
        if m == 0 {
            return;
        }
        // Quantize the input per row, in parallel.
        let mut qx = vec![0i16; m * self.k_pad];
        let mut sx = vec![0f32; m];
        qx.par_chunks_mut(self.k_pad * 64)
            .zip(sx.par_chunks_mut(64))
            .zip(x.par_chunks(self.k * 64))
            .for_each(|((q, s), x)| {
                for ((q, s), x) in q
                    .chunks_mut(self.k_pad)
                    .zip(s.iter_mut())
                    .zip(x.chunks(self.k))
                {
                    // SAFETY: only called where AVX2 was detected (forward_slice asserts it).
                    #[cfg(target_arch = "x86_64")]
                    {
                        *s = unsafe { quantize_row(x, q) };
                    }
                }
            });
        // Tasks: blocks of rows, and of panels too when there are few rows.
        let row_tasks = m.div_ceil(ROWS_PER_TASK);
        let panel_groups = if row_tasks >= 8 { 1 } else { self.panels };
        let panels_per_group = self.panels.div_ceil(panel_groups);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..row_tasks * panel_groups)
            .into_par_iter()
            .for_each(|task| {
                let (rt, pg) = (task / panel_groups, task % panel_groups);
                let rows = rt * ROWS_PER_TASK..((rt + 1) * ROWS_PER_TASK).min(m);
                let panels = pg * panels_per_group..((pg + 1) * panels_per_group).min(self.panels);
                let out_ptr = &out_ptr;
                // SAFETY: AVX2 checked above; every task writes a disjoint block of `out`.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    self.block_avx2(&qx, &sx, rows, panels, out_ptr.0);
                }
            });
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_avx2(
        &self,
        qx: &[i16],
        sx: &[f32],
        rows: std::ops::Range<usize>,
        panels: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        let pairs = self.k_pad / 2;
        for panel in panels {
            let b = &self.packed[panel * pairs * 2 * NR..(panel + 1) * pairs * 2 * NR];
            let mut r = rows.start;
            while r < rows.end {
                let count = (rows.end - r).min(MR);
                let a = &qx[r * self.k_pad..(r + count) * self.k_pad];
                let mut acc = [[0i32; NR]; MR];
                // SAFETY: slices sized by the checks above; AVX2 enabled on this function.
                unsafe {
                    match count {
                        6 => micro::<6>(a, b, self.k_pad, &mut acc),
                        5 => micro::<5>(a, b, self.k_pad, &mut acc),
                        4 => micro::<4>(a, b, self.k_pad, &mut acc),
                        3 => micro::<3>(a, b, self.k_pad, &mut acc),
                        2 => micro::<2>(a, b, self.k_pad, &mut acc),
                        _ => micro::<1>(a, b, self.k_pad, &mut acc),
                    }
                }
                let cols = panel * NR..((panel + 1) * NR).min(self.n);
                let scales = &self.scales[panel * NR..(panel + 1) * NR];
                let bias = &self.bias[panel * NR..(panel + 1) * NR];
                for (i, acc) in acc.iter().enumerate().take(count) {
                    let s = sx[r + i];
                    // SAFETY: row r + i < m and cols < n: inside `out`, owned by this task.
                    let row = unsafe { out.add((r + i) * self.n + cols.start) };
                    for j in 0..cols.len() {
                        unsafe { *row.add(j) = acc[j] as f32 * (s * scales[j]) + bias[j] };
                    }
                }
                r += count;
            }
        }
    }
}

struct SendPtr(*mut f32);
// SAFETY: the pointer is only written through at disjoint ranges by the tasks.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Symmetric per-row quantization into `q` (length k rounded up to even, tail zeroed); returns
/// the scale (NaN when the row holds a non-finite value, which then shows in the output).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_row(x: &[f32], q: &mut [i16]) -> f32 {
    use std::arch::x86_64::*;
    let k = x.len();
    let full = k / 16 * 16;
    // SAFETY: every load and store is inside x and q (16-element steps below `full`).
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        let mut nan = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= k {
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let mut max = lanes.iter().fold(0f32, |a, &b| a.max(b));
        let mut finite = _mm256_movemask_ps(nan) == 0;
        for v in &x[i..] {
            max = max.max(v.abs());
            finite &= v.is_finite();
        }
        if !finite || !max.is_finite() {
            q.fill(0);
            return f32::NAN;
        }
        if max == 0.0 {
            q.fill(0);
            return 1.0;
        }
        let inv = _mm256_set1_ps(127.0 / max);
        let mut i = 0;
        while i < full {
            // cvtps rounds to nearest even; packs + permute put the 16 values back in order.
            let a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), inv));
            let b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i + 8)), inv));
            let packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0b11_01_10_00);
            _mm256_storeu_si256(q.as_mut_ptr().add(i) as *mut __m256i, packed);
            i += 16;
        }
        let inv = 127.0 / max;
        for j in full..k {
            q[j] = (x[j] * inv).round_ties_even() as i16;
        }
        q[k..].fill(0);
        max / 127.0
    }
}

/// `acc[r][j] = sum_k a[r][k] * w[k][j]` for R rows and one 16-column panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn micro<const R: usize>(a: &[i16], b: &[i16], k_pad: usize, acc: &mut [[i32; NR]; MR]) {
    use std::arch::x86_64::*;
    let pairs = k_pad / 2;
    debug_assert!(a.len() >= R * k_pad && b.len() >= pairs * 2 * NR);
    let zero = _mm256_setzero_si256();
    let mut c0 = [zero; R];
    let mut c1 = [zero; R];
    let a_ptr = a.as_ptr();
    let mut b_ptr = b.as_ptr() as *const __m256i;
    for p in 0..pairs {
        // SAFETY: p < pairs; b holds 2 vectors per pair, a holds R rows of k_pad.
        unsafe {
            let b0 = _mm256_loadu_si256(b_ptr);
            let b1 = _mm256_loadu_si256(b_ptr.add(1));
            b_ptr = b_ptr.add(2);
            for r in 0..R {
                let pair = (a_ptr.add(r * k_pad + 2 * p) as *const i32).read_unaligned();
                let av = _mm256_set1_epi32(pair);
                c0[r] = _mm256_add_epi32(c0[r], _mm256_madd_epi16(av, b0));
                c1[r] = _mm256_add_epi32(c1[r], _mm256_madd_epi16(av, b1));
            }
        }
    }
    for r in 0..R {
        // SAFETY: acc rows are 16 i32.
        unsafe {
            _mm256_storeu_si256(acc[r].as_mut_ptr() as *mut __m256i, c0[r]);
            _mm256_storeu_si256(acc[r].as_mut_ptr().add(8) as *mut __m256i, c1[r]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Every shape class: rows not a multiple of 6, odd k, columns not a multiple of 16, one
    /// row, many rows (the row-parallel path) and few (the panel-parallel path).
    #[test]
    fn matches_the_integer_reference_and_the_float_product() {
        if !Int8Linear::supported() {
            eprintln!("no AVX2 here: the INT8 kernel is not used on this CPU");
            return;
        }
        let mut seed = 7;
        for (m, k, n) in [
            (1, 48, 144),
            (7, 3, 5),
            (13, 47, 33),
            (300, 96, 192),
            (49, 385, 17),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
            let w: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed) * 0.2).collect();
            let bias: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let layer = Int8Linear::quantize(&w, k, n, Some(&bias));
            let mut out = vec![0f32; m * n];
            layer.forward_slice(&x, m, &mut out);
            let (qw, sw) = super::super::quant::quantize_weights(&w, &[k, n], 1);
            for r in 0..m {
                let row = &x[r * k..(r + 1) * k];
                let max = row.iter().fold(0f32, |a, v| a.max(v.abs()));
                let qx: Vec<i32> = row
                    .iter()
                    .map(|v| (v * 127.0 / max).round_ties_even() as i32)
                    .collect();
                for c in 0..n {
                    let dot: i32 = (0..k).map(|i| qx[i] * qw[i * n + c] as i32).sum();
                    let want = dot as f32 * (max / 127.0 * sw[c]) + bias[c];
                    let got = out[r * n + c];
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "({m},{k},{n}) [{r},{c}]: {got} vs integer reference {want}"
                    );
                    let float: f32 = (0..k).map(|i| row[i] * w[i * n + c]).sum::<f32>() + bias[c];
                    // Quantization error: about a step of each operand times sqrt(k).
                    let tol = 0.02 * (k as f32).sqrt() * max * 0.2;
                    assert!(
                        (got - float).abs() <= tol,
                        "({m},{k},{n}) [{r},{c}]: {got} vs float {float}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_rows_give_the_bias() {
        if !Int8Linear::supported() {
            return;
        }
        let layer = Int8Linear::quantize(&[0.5, -0.5, 0.25, 1.0], 2, 2, Some(&[0.1, -0.2]));
        let mut out = vec![9f32; 4];
        layer.forward_slice(&[0.0, 0.0, 1.0, 2.0], 2, &mut out);
        assert_eq!(&out[..2], &[0.1, -0.2]);
        assert!((out[2] - (0.5 + 0.5 + 0.1)).abs() < 0.02);
        assert!((out[3] - (-0.5 + 2.0 - 0.2)).abs() < 0.02);
    }
}
