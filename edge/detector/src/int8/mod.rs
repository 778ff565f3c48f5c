//! INT8 compute for quantized models on the CPU: a GEMM with 32-bit integer accumulation, with
//! one kernel per CPU class chosen at run time ([`crate::cpu`]). The packing, the kernels and
//! the portable reference they are tested against belong together.
//!
//! burn 0.22's quantized matmul on its CPU backend dequantizes and multiplies in float, so
//! INT8 weights alone save bytes but not time. Here a Linear layer of a quantized model file
//! keeps its weights as INT8 (symmetric, one scale per output channel, exactly the values of the
//! file), and each call quantizes its input per row (dynamic, symmetric: scale = max|x| / 127),
//! multiplies in integers, and scales the `i32` sums back: `y = (qx . qw) * sx * sw + b`.
//!
//! Every path computes the same integers and the same epilogue, so their outputs are equal to
//! the bit (the tests compare each path the CPU has against the portable one):
//! - AVX-512 VNNI and AVX-VNNI: `vpdpbusd` multiplies unsigned by signed bytes, four per 32-bit
//!   lane. Inputs are stored as `u8 = q + 128` and each column's `128 x sum(w)` is subtracted
//!   after the sums. Weights are packed in panels of 16 output channels, four inputs per
//!   channel in each 64-byte row (one zmm, or two ymm). The AVX-512 kernel keeps 8 rows x 32
//!   columns of sums in registers, the AVX-VNNI one 6 x 16.
//! - AVX2: no byte dot product, so weights and inputs are widened to `i16` and `vpmaddwd`
//!   multiplies 16 pairs and adds neighbours into 8 `i32` lanes; 6 rows x 16 columns.
//! - Portable: `i8` dot products in plain Rust; the reference. With it a quantized model runs
//!   its float layers instead (as on CPUs without AVX2), and so do autodiff and the GPUs.
//!
//! No sum overflows: |q| <= 127 on both sides (255 x 127 for the offset inputs), so K <= 66,000
//! products fit an `i32`.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

use crate::cpu::{self, KernelPath};
use crate::kernels::for_each_chunk;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Output channels per packed panel.
const NR: usize = 16;
/// Rows per parallel task (a multiple of every kernel's row block: 6 and 8).
const ROWS_PER_TASK: usize = 48;
/// Layers smaller than this many multiply-adds run on the calling thread.
const PARALLEL_MACS: usize = 1 << 21;
/// Memory passes (transposes, im2col) over fewer elements run on the calling thread.
const PARALLEL_ELEMENTS: usize = 1 << 18;

/// A Linear layer's weights packed for one kernel path.
#[derive(Debug)]
pub struct Int8Linear {
    path: KernelPath,
    k: usize,
    n: usize,
    /// Quantized inputs per row: `k` rounded up to the kernel's group of inputs.
    k_pad: usize,
    panels: usize,
    weights: Packed,
    /// Per output channel, padded to whole panels with zeros.
    scales: Vec<f32>,
    bias: Vec<f32>,
}

#[derive(Debug)]
enum Packed {
    /// AVX2: `[panel][pair][16 columns x (even, odd input)]` as i16.
    Pairs(Vec<i16>),
    /// VNNI: `[panel][quad][16 columns x 4 inputs]` as i8, and per column (padded to whole
    /// panels) `128 x sum(w)`, the excess that the `u8 = q + 128` inputs add to each sum.
    Quads { weights: Vec<i8>, excess: Vec<i32> },
    /// Portable: `[column][k]` as i8.
    Columns(Vec<i8>),
}

/// Shared handle stored in the model (cloned with it, never trained).
pub type Int8Weights = Option<Arc<Int8Linear>>;

impl Int8Linear {
    /// From INT8 weights in burn's Linear layout `[k (in), n (out)]`, row-major, with one scale
    /// per output column, packed for this process's kernel path.
    pub fn new(q: &[i8], scales: &[f32], k: usize, n: usize, bias: Option<&[f32]>) -> Self {
        Self::new_for(cpu::active(), q, scales, k, n, bias)
    }

    /// As [`Int8Linear::new`], for a given path (which this CPU must support).
    pub fn new_for(
        path: KernelPath,
        q: &[i8],
        scales: &[f32],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
    ) -> Self {
        assert_eq!(q.len(), k * n, "weights are not [k, n]");
        assert_eq!(scales.len(), n, "one scale per output channel");
        assert!(path.supported(), "this CPU cannot run the {path} kernels");
        let panels = n.div_ceil(NR);
        let at = |row: usize, col: usize| {
            if row < k && col < n {
                q[row * n + col]
            } else {
                0
            }
        };
        let (k_pad, weights) = match path {
            KernelPath::Avx2 => {
                let k_pad = k.next_multiple_of(2);
                let pairs = k_pad / 2;
                let mut packed = vec![0i16; panels * pairs * 2 * NR];
                for panel in 0..panels {
                    for p in 0..pairs {
                        let base = (panel * pairs + p) * 2 * NR;
                        for j in 0..NR {
                            for t in 0..2 {
                                packed[base + 2 * j + t] = at(2 * p + t, panel * NR + j) as i16;
                            }
                        }
                    }
                }
                (k_pad, Packed::Pairs(packed))
            }
            KernelPath::AvxVnni | KernelPath::Avx512Vnni => {
                let k_pad = k.next_multiple_of(4);
                let quads = k_pad / 4;
                let mut packed = vec![0i8; panels * quads * 4 * NR];
                for panel in 0..panels {
                    for g in 0..quads {
                        let base = (panel * quads + g) * 4 * NR;
                        for j in 0..NR {
                            for t in 0..4 {
                                packed[base + 4 * j + t] = at(4 * g + t, panel * NR + j);
                            }
                        }
                    }
                }
                let excess = (0..panels * NR)
                    .map(|col| 128 * (0..k).map(|row| at(row, col) as i32).sum::<i32>())
                    .collect();
                (
                    k_pad,
                    Packed::Quads {
                        weights: packed,
                        excess,
                    },
                )
            }
            KernelPath::Portable => {
                let columns = (0..n)
                    .flat_map(|col| (0..k).map(move |row| (row, col)))
                    .map(|(row, col)| at(row, col))
                    .collect();
                (k.next_multiple_of(2), Packed::Columns(columns))
            }
        };
        let mut padded_scales = vec![0f32; panels * NR];
        padded_scales[..n].copy_from_slice(scales);
        let mut padded_bias = vec![0f32; panels * NR];
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "one bias per output channel");
            padded_bias[..n].copy_from_slice(b);
        }
        Self {
            path,
            k,
            n,
            k_pad,
            panels,
            weights,
            scales: padded_scales,
            bias: padded_bias,
        }
    }

    /// Quantizes float weights `[k, n]` per output column (scale = max|w| / 127): for weights
    /// that were loaded from an INT8 file this recovers the file's integers exactly.
    pub fn quantize(weights: &[f32], k: usize, n: usize, bias: Option<&[f32]>) -> Self {
        Self::quantize_for(cpu::active(), weights, k, n, bias)
    }

    /// As [`Int8Linear::quantize`], for a given path.
    pub fn quantize_for(
        path: KernelPath,
        weights: &[f32],
        k: usize,
        n: usize,
        bias: Option<&[f32]>,
    ) -> Self {
        let (q, scales) = super::quant::quantize_weights(weights, &[k, n], 1);
        Self::new_for(path, &q, &scales, k, n, bias)
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// The kernel path the weights are packed for.
    pub fn path(&self) -> KernelPath {
        self.path
    }

    /// Whether quantized models run their Linear layers in INT8 in this process: on every path
    /// but the portable one, where burn's float layers are faster.
    pub fn supported() -> bool {
        cpu::active() != KernelPath::Portable
    }

    /// Whether [`Int8Linear::forward`] can take this tensor: f32 on the Flex backend without
    /// autodiff, last axis = in_features.
    pub fn applies<const D: usize>(&self, x: &Tensor<D>) -> bool {
        let device = x.device();
        !device.is_autodiff()
            && device == Device::flex()
            && x.dtype() == DType::F32
            && x.dims()[D - 1] == self.k
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

    /// `x`: `[m, k]` row-major; `out`: `[m, n]`.
    pub fn forward_slice(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(out.len(), m * self.n);
        // SAFETY: out holds m x n values.
        unsafe { self.run(x, m, out.as_mut_ptr()) }
    }

    /// Quantized inputs take `k_pad` bytes a row (`k_pad` i16 for the AVX2 pairs); the
    /// scratch buffer is counted in i16.
    fn row_i16s(&self) -> usize {
        match self.weights {
            Packed::Pairs(_) => self.k_pad,
            _ => self.k_pad / 2,
        }
    }

    /// Writes all `m x n` outputs through `out`.
    ///
    /// # Safety
    /// `out` must be valid for `m * n` writes.
    unsafe fn run(&self, x: &[f32], m: usize, out: *mut f32) {
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
            let row = self.row_i16s();
            if qx.len() < m * row {
                qx.resize(m * row, 0);
            }
            let qx = &mut qx[..m * row];
            let mut sx = vec![0f32; m];
            let out_ptr = SendPtr(out);
            let row_tasks = m.div_ceil(ROWS_PER_TASK);
            // Handing work to the thread pool costs tens of microseconds (the caller is not a
            // pool thread): small layers run on the calling thread.
            let parallel = m * self.k * self.n >= PARALLEL_MACS && rayon::current_num_threads() > 1;
            if !parallel || row_tasks >= 8 {
                // Blocks of rows, each quantizing its own rows and then multiplying them.
                let task = |(t, (qx, sx)): (usize, (&mut [i16], &mut [f32]))| {
                    let row0 = t * ROWS_PER_TASK;
                    self.quantize_rows(qx, sx, &x[row0 * self.k..(row0 + sx.len()) * self.k]);
                    let out_ptr = &out_ptr;
                    // SAFETY: every task writes its own rows of `out`.
                    unsafe {
                        self.block(qx, sx, 0..self.panels, out_ptr.0.add(row0 * self.n));
                    }
                };
                if parallel {
                    qx.par_chunks_mut(ROWS_PER_TASK * row)
                        .zip(sx.par_chunks_mut(ROWS_PER_TASK))
                        .enumerate()
                        .for_each(task);
                } else {
                    qx.chunks_mut(ROWS_PER_TASK * row)
                        .zip(sx.chunks_mut(ROWS_PER_TASK))
                        .enumerate()
                        .for_each(task);
                }
            } else {
                // Few rows: quantize them here, then one task per panel.
                self.quantize_rows(qx, &mut sx, x);
                let (qx, sx) = (&*qx, &sx);
                (0..self.panels).into_par_iter().for_each(|panel| {
                    let out_ptr = &out_ptr;
                    // SAFETY: every task writes its own columns of `out`.
                    unsafe { self.block(qx, sx, panel..panel + 1, out_ptr.0) };
                });
            }
        });
    }

    /// Quantizes the rows of `x` into `qx` (this path's layout), their scales into `sx`.
    fn quantize_rows(&self, qx: &mut [i16], sx: &mut [f32], x: &[f32]) {
        let row = self.row_i16s();
        for ((q, s), x) in qx.chunks_mut(row).zip(sx.iter_mut()).zip(x.chunks(self.k)) {
            *s = match self.path {
                #[cfg(target_arch = "x86_64")]
                // SAFETY (all three): the path was checked to be supported at construction.
                KernelPath::Avx2 => unsafe { x86::quantize_row_i16(x, q) },
                #[cfg(target_arch = "x86_64")]
                KernelPath::AvxVnni => unsafe { x86::quantize_row_u8_avx2(x, as_bytes(q)) },
                #[cfg(target_arch = "x86_64")]
                KernelPath::Avx512Vnni => unsafe { x86::quantize_row_u8_avx512(x, as_bytes(q)) },
                _ => quantize_row::<false>(x, as_bytes(q)),
            };
        }
    }

    /// Rows `qx` (quantized, `sx.len()` of them) times the given panels, into `out` (the
    /// first row's outputs, `n` apart).
    ///
    /// # Safety
    /// `out` must be valid for writes of those rows' columns in these panels.
    unsafe fn block(&self, qx: &[i16], sx: &[f32], panels: std::ops::Range<usize>, out: *mut f32) {
        match (&self.weights, self.path) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY (all three): the path was checked to be supported at construction; the
            // caller vouches for `out`.
            (Packed::Pairs(w), _) => unsafe { x86::block_avx2(self, w, qx, sx, panels, out) },
            #[cfg(target_arch = "x86_64")]
            (Packed::Quads { weights, excess }, KernelPath::Avx512Vnni) => unsafe {
                x86::block_vnni512(self, weights, excess, as_bytes_ref(qx), sx, panels, out)
            },
            #[cfg(target_arch = "x86_64")]
            (Packed::Quads { weights, excess }, _) => unsafe {
                x86::block_avxvnni(self, weights, excess, as_bytes_ref(qx), sx, panels, out)
            },
            (Packed::Columns(w), _) => {
                let qx = as_bytes_ref(qx);
                let cols = panels.start * NR..(panels.end * NR).min(self.n);
                for (r, &s) in sx.iter().enumerate() {
                    let a = &qx[r * self.k_pad..r * self.k_pad + self.k];
                    for col in cols.clone() {
                        let dot = dot_i8(a, &w[col * self.k..(col + 1) * self.k]);
                        let y = (dot as f32).mul_add(s * self.scales[col], self.bias[col]);
                        // SAFETY: the caller vouches for these rows and columns.
                        unsafe { out.add(r * self.n + col).write(y) };
                    }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the portable path exists off x86-64"),
        }
    }
}

/// `sum a[i] * b[i]` of bytes holding i8 values, in i32.
fn dot_i8(a: &[u8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| x as i8 as i32 * y as i32)
        .sum()
}

/// Symmetric quantization of one row into bytes (`q.len()` >= `x.len()`, the tail padded):
/// `round(x * 127 / max|x|)` as i8, plus 128 as u8 when `OFFSET`. Returns the scale (NaN when
/// the row holds a non-finite value, which then shows in the output). Every path's quantizer
/// gives these values.
#[inline(always)]
fn quantize_row<const OFFSET: bool>(x: &[f32], q: &mut [u8]) -> f32 {
    let zero = if OFFSET { 0x80 } else { 0 };
    let mut lanes = [0f32; 16];
    let mut finite = [true; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for l in 0..16 {
            let a = chunk[l].abs();
            lanes[l] = lanes[l].max(a);
            finite[l] &= a < f32::INFINITY;
        }
    }
    let mut max = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let mut all_finite = finite.iter().all(|&f| f);
    for v in rest {
        max = max.max(v.abs());
        all_finite &= v.is_finite();
    }
    if !all_finite {
        q.fill(zero);
        return f32::NAN;
    }
    if max == 0.0 {
        q.fill(zero);
        return 1.0;
    }
    let inv = 127.0 / max;
    for (d, &v) in q.iter_mut().zip(x) {
        // |v * inv| <= 127: the conversion is exact, and the same on every path.
        *d = ((v * inv).round_ties_even() as i32 as i8 as u8) ^ zero;
    }
    q[x.len()..].fill(zero);
    max / 127.0
}

fn as_bytes(v: &mut [i16]) -> &mut [u8] {
    // SAFETY: u8 has no alignment or validity requirements; the length covers the same bytes.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 2) }
}

fn as_bytes_ref(v: &[i16]) -> &[u8] {
    // SAFETY: as in `as_bytes`.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 2) }
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
        for_each_chunk(&mut nhwc_in, w * c, PARALLEL_ELEMENTS, |row, dst| {
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
            for_each_chunk(&mut cols, wo * k, PARALLEL_ELEMENTS, |row, chunk| {
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
        for_each_chunk(&mut out, ho * wo, PARALLEL_ELEMENTS, |plane, dst| {
            let (bi, o) = (plane / n, plane % n);
            for (p, d) in dst.iter_mut().enumerate() {
                *d = nhwc[(bi * ho * wo + p) * n + o];
            }
        });
        recycle(nhwc);
        Tensor::from_data(TensorData::new(out, [b, n, ho, wo]), &device)
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
            let layer = Int8Linear::quantize_for(KernelPath::Portable, &w, k, n, Some(&bias));
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

    /// Every kernel path this CPU has gives the portable path's outputs to the bit, on every
    /// shape class (rows not a multiple of 6 or 8, k not a multiple of 2 or 4, columns not a
    /// multiple of 16 or 32, the row-parallel and the panel-parallel split) and on rows that
    /// are all zero or hold a NaN.
    #[test]
    fn every_path_equals_the_portable_one() {
        let mut seed = 11;
        let paths: Vec<KernelPath> = KernelPath::ALL
            .into_iter()
            .filter(|p| p.supported() && *p != KernelPath::Portable)
            .collect();
        eprintln!("paths compared with the portable one: {paths:?}");
        for (m, k, n) in [
            (1, 48, 144),
            (7, 3, 5),
            (9, 5, 33),
            (13, 47, 48),
            (300, 96, 192),
            (500, 64, 80),
            (49, 385, 17),
            (17, 1030, 40),
        ] {
            let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
            x[..k].fill(0.0);
            if m > 2 {
                x[2 * k + k / 2] = f32::NAN;
            }
            let w: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed) * 0.2).collect();
            let bias: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let reference = Int8Linear::quantize_for(KernelPath::Portable, &w, k, n, Some(&bias));
            let mut want = vec![0f32; m * n];
            reference.forward_slice(&x, m, &mut want);
            for &path in &paths {
                let layer = Int8Linear::quantize_for(path, &w, k, n, Some(&bias));
                let mut got = vec![0f32; m * n];
                layer.forward_slice(&x, m, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                        "{path} ({m},{k},{n}) [{},{}]: {g} vs portable {w}",
                        i / n,
                        i % n
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
