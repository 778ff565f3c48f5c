//! INT8 compute for quantized models on the CPU: a GEMM with 32-bit integer accumulation. One
//! file: the packing, the AVX2 kernel and the portable reference it is tested against belong
//! together.
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
/// Layers smaller than this many multiply-adds run on the calling thread.
const PARALLEL_MACS: usize = 1 << 21;
/// Memory passes (transposes, im2col) over fewer elements run on the calling thread.
const PARALLEL_ELEMENTS: usize = 1 << 18;

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
        let mut out: Vec<f32> = Vec::with_capacity(m * self.n);
        // SAFETY: `run` writes every one of the m x n outputs before the length is set.
        unsafe {
            self.run(values, m, out.spare_capacity_mut().as_mut_ptr() as *mut f32);
            out.set_len(m * self.n);
        }
        dims[D - 1] = self.n;
        Tensor::from_data(TensorData::new(out, dims), &device)
    }

    /// `x`: `[m, k]` row-major; `out`: `[m, n]`. Needs [`Int8Linear::supported`].
    pub fn forward_slice(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(out.len(), m * self.n);
        // SAFETY: out holds m x n values.
        unsafe { self.run(x, m, out.as_mut_ptr()) }
    }

    /// Writes all `m x n` outputs through `out`.
    ///
    /// # Safety
    /// `out` must be valid for `m * n` writes.
    unsafe fn run(&self, x: &[f32], m: usize, out: *mut f32) {
        assert!(Self::supported(), "the INT8 kernel needs AVX2");
        assert_eq!(x.len(), m * self.k);
        if m == 0 {
            return;
        }
        thread_local! {
            // Quantized inputs, reused across calls (a fresh buffer per call cost page faults
            // and a memset about as long as the multiply on the large early-stage layers).
            static SCRATCH: std::cell::RefCell<Vec<i16>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with(|scratch| {
            let mut fresh = Vec::new();
            let mut borrowed = scratch.try_borrow_mut();
            let qx: &mut Vec<i16> = match borrowed.as_deref_mut() {
                Ok(v) => v,
                Err(_) => &mut fresh,
            };
            if qx.len() < m * self.k_pad {
                qx.resize(m * self.k_pad, 0);
            }
            let qx = &mut qx[..m * self.k_pad];
            let mut sx = vec![0f32; m];
            let quantize = |qx: &mut [i16], sx: &mut [f32], x: &[f32]| {
                for ((q, s), x) in qx
                    .chunks_mut(self.k_pad)
                    .zip(sx.iter_mut())
                    .zip(x.chunks(self.k))
                {
                    // SAFETY: AVX2 was checked above.
                    #[cfg(target_arch = "x86_64")]
                    {
                        *s = unsafe { quantize_row(x, q) };
                    }
                }
            };
            let out_ptr = SendPtr(out);
            let row_tasks = m.div_ceil(ROWS_PER_TASK);
            // Handing work to the thread pool costs tens of microseconds (the caller is not a
            // pool thread): small layers run on the calling thread.
            let parallel = m * self.k * self.n >= PARALLEL_MACS && rayon::current_num_threads() > 1;
            if !parallel || row_tasks >= 8 {
                // Blocks of rows, each quantizing its own rows and then multiplying them.
                let task = |(t, (qx, sx)): (usize, (&mut [i16], &mut [f32]))| {
                    let row0 = t * ROWS_PER_TASK;
                    quantize(qx, sx, &x[row0 * self.k..(row0 + sx.len()) * self.k]);
                    let out_ptr = &out_ptr;
                    // SAFETY: AVX2 checked above; every task writes its own rows of `out`.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        self.block_avx2(qx, sx, 0..self.panels, out_ptr.0.add(row0 * self.n));
                    }
                };
                if parallel {
                    qx.par_chunks_mut(ROWS_PER_TASK * self.k_pad)
                        .zip(sx.par_chunks_mut(ROWS_PER_TASK))
                        .enumerate()
                        .for_each(task);
                } else {
                    qx.chunks_mut(ROWS_PER_TASK * self.k_pad)
                        .zip(sx.chunks_mut(ROWS_PER_TASK))
                        .enumerate()
                        .for_each(task);
                }
            } else {
                // Few rows: quantize them here, then one task per panel.
                quantize(qx, &mut sx, x);
                let (qx, sx) = (&*qx, &sx);
                (0..self.panels).into_par_iter().for_each(|panel| {
                    let out_ptr = &out_ptr;
                    // SAFETY: AVX2 checked above; every task writes its own columns of `out`.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        self.block_avx2(qx, sx, panel..panel + 1, out_ptr.0);
                    }
                });
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    /// Rows `qx` (quantized, `sx.len()` of them) times the given panels, into `out` (the
    /// first row's outputs).
    unsafe fn block_avx2(
        &self,
        qx: &[i16],
        sx: &[f32],
        panels: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        let rows = 0..sx.len();
        let pairs = self.k_pad / 2;
        for panel in panels {
            let b = &self.packed[panel * pairs * 2 * NR..(panel + 1) * pairs * 2 * NR];
            let epilogue = Epilogue {
                scales: &self.scales[panel * NR..(panel + 1) * NR],
                bias: &self.bias[panel * NR..(panel + 1) * NR],
                cols: ((panel + 1) * NR).min(self.n) - panel * NR,
                row_stride: self.n,
            };
            let mut r = rows.start;
            while r < rows.end {
                let count = (rows.end - r).min(MR);
                let a = &qx[r * self.k_pad..(r + count) * self.k_pad];
                let s = &sx[r..r + count];
                // SAFETY: rows r.. r + count and this panel's columns are inside `out` and
                // owned by this task; AVX2 is enabled on this function.
                unsafe {
                    let o = out.add(r * self.n + panel * NR);
                    match count {
                        6 => micro::<6>(a, b, self.k_pad, s, &epilogue, o),
                        5 => micro::<5>(a, b, self.k_pad, s, &epilogue, o),
                        4 => micro::<4>(a, b, self.k_pad, s, &epilogue, o),
                        3 => micro::<3>(a, b, self.k_pad, s, &epilogue, o),
                        2 => micro::<2>(a, b, self.k_pad, s, &epilogue, o),
                        _ => micro::<1>(a, b, self.k_pad, s, &epilogue, o),
                    }
                }
                r += count;
            }
        }
    }
}

/// What turns a panel's i32 sums into outputs: `acc * sx[row] * scales[col] + bias[col]`.
struct Epilogue<'a> {
    scales: &'a [f32],
    bias: &'a [f32],
    /// Valid columns in this panel (16 but in the last).
    cols: usize,
    row_stride: usize,
}

/// A 2-D convolution (any kernel size, stride and zero padding; no dilation or groups) of a
/// quantized model, computed as im2col + the INT8 GEMM. Input and output are NCHW like burn's.
#[derive(Debug)]
pub struct Int8Conv {
    kernel: [usize; 2],
    stride: [usize; 2],
    /// top, left, bottom, right.
    padding: [usize; 4],
    cin: usize,
    /// Weights as a `[kh * kw * cin, cout]` matrix (im2col column order: kernel row, kernel
    /// column, channel, so that a patch is `kh * kw` contiguous runs of an NHWC input).
    linear: Int8Linear,
}

impl Int8Conv {
    /// From a burn Conv2d holding (dequantized) INT8 weights; None for what the kernel does not
    /// take (dilation, groups, `Same` padding).
    pub fn from_conv(conv: &burn::nn::conv::Conv2d) -> Option<Self> {
        use burn::nn::PaddingConfig2d;
        if conv.dilation != [1, 1] || conv.groups != 1 {
            return None;
        }
        let padding = match conv.padding {
            PaddingConfig2d::Valid => [0; 4],
            PaddingConfig2d::Explicit(t, l, b, r) => [t, l, b, r],
            PaddingConfig2d::Same => return None,
        };
        let [cout, cin, kh, kw] = conv.weight.dims();
        let w = conv.weight.val().into_data().try_to_vec::<f32>().ok()?;
        // [cout, cin, kh, kw] -> [(kh, kw, cin), cout]
        let k = cin * kh * kw;
        let mut matrix = vec![0f32; k * cout];
        for o in 0..cout {
            for c in 0..cin {
                for t in 0..kh * kw {
                    matrix[(t * cin + c) * cout + o] = w[(o * cin + c) * kh * kw + t];
                }
            }
        }
        let bias = match &conv.bias {
            Some(b) => Some(b.val().into_data().try_to_vec::<f32>().ok()?),
            None => None,
        };
        Some(Self {
            kernel: [kh, kw],
            stride: conv.stride,
            padding,
            cin,
            linear: Int8Linear::quantize(&matrix, k, cout, bias.as_deref()),
        })
    }

    pub fn applies(&self, x: &Tensor<4>) -> bool {
        let device = x.device();
        !device.is_autodiff()
            && device == Device::flex()
            && x.dtype() == DType::F32
            && x.dims()[1] == self.cin
            && Int8Linear::supported()
    }

    /// `[B, cin, H, W]` -> `[B, cout, H', W']`. Call it where [`Int8Conv::applies`].
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let device = x.device();
        let [b, c, h, w] = x.dims();
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.stride;
        let [pt, pl, pb, pr] = self.padding;
        let ho = (h + pt + pb - kh) / sh + 1;
        let wo = (w + pl + pr - kw) / sw + 1;
        let data = x.into_data();
        let input = data.as_slice::<f32>().expect("applies() checked f32");
        // NCHW -> NHWC, one image row per task.
        let mut nhwc_in = scratch(b * h * w * c);
        for_each_chunk(&mut nhwc_in, w * c, |row, dst| {
            let (bi, y) = (row / h, row % h);
            for ci in 0..c {
                let src = &input[((bi * c + ci) * h + y) * w..((bi * c + ci) * h + y + 1) * w];
                for (xi, v) in src.iter().enumerate() {
                    dst[xi * c + ci] = *v;
                }
            }
        });
        let k = c * kh * kw;
        let m = b * ho * wo;
        let pointwise = kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt + pl + pb + pr == 0;
        let cols = if pointwise {
            nhwc_in
        } else {
            // im2col: each patch is kh * kw runs of c channels, zeros where it leaves the image.
            let mut cols = scratch(m * k);
            for_each_chunk(&mut cols, wo * k, |row, chunk| {
                let (bi, y) = (row / ho, row % ho);
                for (xo, patch) in chunk.chunks_mut(k).enumerate() {
                    for ky in 0..kh {
                        let yi = (y * sh + ky) as isize - pt as isize;
                        let runs = &mut patch[ky * kw * c..(ky + 1) * kw * c];
                        if yi < 0 || yi >= h as isize {
                            runs.fill(0.0); // padding (the buffer is reused, not zeroed)
                            continue;
                        }
                        for kx in 0..kw {
                            let xi = (xo * sw + kx) as isize - pl as isize;
                            let run = &mut runs[kx * c..(kx + 1) * c];
                            if xi < 0 || xi >= w as isize {
                                run.fill(0.0);
                                continue;
                            }
                            let at = ((bi * h + yi as usize) * w + xi as usize) * c;
                            run.copy_from_slice(&nhwc_in[at..at + c]);
                        }
                    }
                }
            });
            recycle(nhwc_in);
            cols
        };
        let n = self.linear.out_features();
        let mut nhwc = scratch(m * n);
        self.linear.forward_slice(&cols, m, &mut nhwc);
        recycle(cols);
        // NHWC -> NCHW, one output channel plane per task.
        let mut out = vec![0f32; b * n * ho * wo];
        for_each_chunk(&mut out, ho * wo, |plane, dst| {
            let (bi, o) = (plane / n, plane % n);
            for (p, d) in dst.iter_mut().enumerate() {
                *d = nhwc[(bi * ho * wo + p) * n + o];
            }
        });
        recycle(nhwc);
        Tensor::from_data(TensorData::new(out, [b, n, ho, wo]), &device)
    }
}

/// `f(index, chunk)` over `chunk`-sized pieces of `data`, on the thread pool when `data` is
/// large enough to pay for the hand-over.
fn for_each_chunk(data: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if data.len() >= PARALLEL_ELEMENTS && rayon::current_num_threads() > 1 {
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

thread_local! {
    /// Intermediate buffers of the convolution, kept for the next call: freshly allocated
    /// megabytes came back from the kernel as zeroed pages on every call.
    static POOL: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `len` from this thread's pool when it has one: its contents are stale, every
/// user writes all of it.
fn scratch(len: usize) -> Vec<f32> {
    let mut v = POOL
        .with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
        .unwrap_or_default();
    v.truncate(len);
    v.resize(len, 0.0);
    v
}

fn recycle(v: Vec<f32>) {
    POOL.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut()
            && p.len() < 4
        {
            p.push(v);
        }
    });
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

/// `out[r][j] = (sum_k a[r][k] * w[k][j]) * sx[r] * scales[j] + bias[j]` for R rows and one
/// 16-column panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn micro<const R: usize>(
    a: &[i16],
    b: &[i16],
    k_pad: usize,
    sx: &[f32],
    epilogue: &Epilogue,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let pairs = k_pad / 2;
    debug_assert!(a.len() >= R * k_pad && b.len() >= pairs * 2 * NR && sx.len() >= R);
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
    // SAFETY: scales and bias hold 16 values; out rows hold `cols` values at row_stride.
    unsafe {
        let s0 = _mm256_loadu_ps(epilogue.scales.as_ptr());
        let s1 = _mm256_loadu_ps(epilogue.scales.as_ptr().add(8));
        let bias0 = _mm256_loadu_ps(epilogue.bias.as_ptr());
        let bias1 = _mm256_loadu_ps(epilogue.bias.as_ptr().add(8));
        for r in 0..R {
            let sr = _mm256_set1_ps(sx[r]);
            let y0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c0[r]), _mm256_mul_ps(sr, s0), bias0);
            let y1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c1[r]), _mm256_mul_ps(sr, s1), bias1);
            let row = out.add(r * epilogue.row_stride);
            if epilogue.cols == NR {
                _mm256_storeu_ps(row, y0);
                _mm256_storeu_ps(row.add(8), y1);
            } else {
                let mut tmp = [0f32; NR];
                _mm256_storeu_ps(tmp.as_mut_ptr(), y0);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), y1);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), row, epilogue.cols);
            }
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
    /// row, small layers (the calling thread), many rows (row-parallel) and few (one task per
    /// panel).
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
            (500, 64, 80),
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

    /// Against burn's float convolution with the same (INT8-representable) weights: 3x3 with
    /// padding 1, 1x1, and a 4x4 stride-4 patch embedding with odd sizes.
    #[test]
    fn int8_conv_matches_burn_conv() {
        if !Int8Linear::supported() {
            return;
        }
        use burn::nn::PaddingConfig2d;
        use burn::nn::conv::Conv2dConfig;
        let device = Device::flex();
        let cases = [
            (3, 10, 4, 4, 0, 17, 13),
            (16, 5, 1, 1, 0, 6, 6),
            (8, 12, 3, 1, 1, 9, 7),
        ];
        // Twice: the second round reuses the first round's (stale) scratch buffers, so the
        // padded case must write its zeros.
        for &(cin, cout, k, stride, pad, h, w) in cases.iter().chain(&cases) {
            let mut conv = Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .init(&device);
            // Make the weights exactly INT8-representable, as a quantized file loads them.
            let weight = conv.weight.val();
            let dims = weight.dims();
            let values = weight.into_data().try_to_vec::<f32>().unwrap();
            let (q, scales) = super::super::quant::quantize_weights(&values, &[cout, cin, k, k], 0);
            let deq = super::super::quant::dequantize_weights(&q, &scales, &[cout, cin, k, k], 0);
            conv.weight = burn::module::Param::from_tensor(Tensor::from_data(
                TensorData::new(deq, dims),
                &device,
            ));
            let int8 = Int8Conv::from_conv(&conv).unwrap();
            let x = Tensor::<4>::random(
                [2, cin, h, w],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            );
            assert!(int8.applies(&x));
            let want = conv.forward(x.clone());
            let got = int8.forward(x);
            assert_eq!(got.dims(), want.dims());
            let want = want.into_data().try_to_vec::<f32>().unwrap();
            let got = got.into_data().try_to_vec::<f32>().unwrap();
            let spread = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff < 0.03 * spread,
                "{cin}->{cout} k{k}: diff {diff}, spread {spread}"
            );
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
