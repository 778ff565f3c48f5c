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
//! that the compiler vectorises.
//!
//! Both are compiled once per [`crate::cpu::KernelPath`] (AVX-512 16 wide, AVX2 8 wide with
//! FMA, portable) and run the path chosen at start.

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::gelu as reference_gelu;
use rayon::prelude::*;

use crate::cpu::{self, KernelPath};

/// Exact (erf) GELU as timm's `nn.GELU()`; fast path for inference on the Flex CPU backend.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    if crate::autograd::applies(&x) {
        return crate::autograd::gelu(x);
    }
    if device.is_autodiff() || device != Device::flex() || x.dtype() != DType::F32 {
        return reference_gelu(x);
    }
    // In place: burn hands over the buffer of a tensor nothing else holds.
    let mut data = x.into_data();
    match data.as_mut_slice::<f32>() {
        Ok(values) => gelu_in_place(values),
        Err(_) => return reference_gelu(Tensor::from_data(data, &device)),
    }
    Tensor::from_data(data, &device)
}

/// `x[i] = gelu(x[i])`, split over the rayon pool in cache-sized chunks.
pub fn gelu_in_place(x: &mut [f32]) {
    gelu_in_place_with(cpu::active(), x)
}

/// As [`gelu_in_place`] on a given path (one this CPU supports).
pub fn gelu_in_place_with(path: KernelPath, x: &mut [f32]) {
    assert!(path.supported(), "this CPU cannot run the {path} kernels");
    const CHUNK: usize = 16 * 1024;
    let run = |x: &mut [f32]| match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (both): the path's features were checked above.
        KernelPath::Avx512Vnni => unsafe { gelu_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::AvxVnni => unsafe { gelu_avx2(x) },
        _ => gelu_portable(x),
    };
    if x.len() <= CHUNK {
        run(x); // the calling thread: handing over costs more than the work
    } else {
        x.par_chunks_mut(CHUNK).for_each(run);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_avx2(x: &mut [f32]) {
    gelu_portable(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn gelu_avx512(x: &mut [f32]) {
    gelu_portable(x)
}

#[inline(always)]
fn gelu_portable(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// GELU's backward pass in place: `grad[i] *= gelu'(x[i])`, where
/// `gelu'(x) = Phi(x) + x phi(x)`, with the same `erf` as the forward pass.
pub fn gelu_grad_in_place_with(path: KernelPath, x: &[f32], grad: &mut [f32]) {
    assert!(path.supported(), "this CPU cannot run the {path} kernels");
    assert_eq!(
        x.len(),
        grad.len(),
        "GELU input and gradient differ in length"
    );
    const CHUNK: usize = 16 * 1024;
    let run = |i: usize, g: &mut [f32]| {
        let x = &x[i * CHUNK..][..g.len()];
        match path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY (both): the path's features were checked above.
            KernelPath::Avx512Vnni => unsafe { gelu_grad_avx512(x, g) },
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 | KernelPath::AvxVnni => unsafe { gelu_grad_avx2(x, g) },
            _ => gelu_grad_portable(x, g),
        }
    };
    for_each_chunk(grad, CHUNK, CHUNK + 1, run);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_grad_avx2(x: &[f32], g: &mut [f32]) {
    gelu_grad_portable(x, g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn gelu_grad_avx512(x: &[f32], g: &mut [f32]) {
    gelu_grad_portable(x, g)
}

#[inline(always)]
fn gelu_grad_portable(x: &[f32], g: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for (g, &x) in g.iter_mut().zip(x) {
        let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
        // exp's argument is clamped, so a large |x| gives phi ~ 0, not NaN.
        let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
        *g *= cdf + x * pdf;
    }
}

/// Whether [`window_attention`] can run these tensors: the Flex backend (without autodiff, or
/// with it through [`crate::autograd`]), f32, a head size it is compiled for, and a bias of shape
/// `[bias_windows, heads, n, n]`.
pub fn window_attention_applies(qkv: &Tensor<3>, bias: &Tensor<4>, heads: usize) -> bool {
    let device = qkv.device();
    let [_, n, three_dim] = qkv.dims();
    let [bias_windows, bias_heads, bn, bm] = bias.dims();
    let dim = three_dim / 3;
    (!device.is_autodiff() || crate::autograd::applies(qkv))
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
/// that nothing else holds in place, and copies a shared one element by element. Under
/// autodiff the backward pass is [`attention_backward`] (through [`crate::autograd`]).
pub fn window_attention(qkv: Tensor<3>, bias: Tensor<4>, heads: usize, scale: f32) -> Tensor<3> {
    window_attention_with(cpu::active(), qkv, bias, heads, scale)
}

/// As [`window_attention`] on a given path (one this CPU supports).
pub fn window_attention_with(
    path: KernelPath,
    qkv: Tensor<3>,
    bias: Tensor<4>,
    heads: usize,
    scale: f32,
) -> Tensor<3> {
    assert!(path.supported(), "this CPU cannot run the {path} kernels");
    assert!(
        window_attention_applies(&qkv, &bias, heads),
        "window_attention called on tensors it does not apply to"
    );
    if qkv.device().is_autodiff() {
        return crate::autograd::window_attention(path, qkv, bias, heads, scale);
    }
    let device = qkv.device();
    let [windows, n, three_dim] = qkv.dims();
    let qkv_data = qkv.into_data();
    let bias_data = bias.into_data();
    let qkv_values = qkv_data.as_slice::<f32>().expect("checked f32");
    let bias_values = bias_data.as_slice::<f32>().expect("checked f32");
    let shape = AttentionShape::new(n, three_dim / 3, heads, scale);
    let out = attention_forward(path, &shape, qkv_values, bias_values);
    Tensor::from_data(TensorData::new(out, [windows, n, three_dim / 3]), &device)
}

/// [`window_attention`] on slices: `qkv` `[windows, n, 3 dim]`, `bias` `[bias_windows, heads,
/// n, n]`; returns `[windows, n, dim]`.
pub(crate) fn attention_forward(
    path: KernelPath,
    shape: &AttentionShape,
    qkv: &[f32],
    bias: &[f32],
) -> Vec<f32> {
    let AttentionShape { n, dim, heads, .. } = *shape;
    let windows = qkv.len() / (n * 3 * dim);
    let bias_windows = bias.len() / (heads * n * n);
    let mut out = vec![0f32; windows * n * dim];
    out.par_chunks_mut(n * dim)
        .enumerate()
        .for_each(|(w, out_window)| {
            let qkv_window = &qkv[w * n * 3 * dim..(w + 1) * n * 3 * dim];
            let b = w % bias_windows;
            let bias_window = &bias[b * heads * n * n..(b + 1) * heads * n * n];
            attend_window(path, shape, qkv_window, bias_window, out_window);
        });
    out
}

/// The backward pass of [`window_attention`]: given the forward's inputs and the gradient of
/// its output (`[windows, n, dim]`), the gradients of `qkv` (`[windows, n, 3 dim]`) and of
/// `bias` (`[bias_windows, heads, n, n]`, summed over the windows that share each bias).
/// The softmax is recomputed per window and head (n x n scores: cheaper than keeping them).
pub(crate) fn attention_backward(
    path: KernelPath,
    shape: &AttentionShape,
    qkv: &[f32],
    bias: &[f32],
    grad_out: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    assert!(path.supported(), "this CPU cannot run the {path} kernels");
    let AttentionShape { n, dim, heads, .. } = *shape;
    let window_len = n * 3 * dim;
    let windows = qkv.len() / window_len;
    let bias_len = bias.len();
    let bias_windows = bias_len / (heads * n * n);
    assert_eq!(
        grad_out.len(),
        windows * n * dim,
        "attention gradient of the wrong size"
    );
    let mut grad_qkv = vec![0f32; qkv.len()];
    // Windows in a few large pieces, each summing its bias gradient privately.
    let pieces = (rayon::current_num_threads() * 4).max(1);
    let per_piece = windows.div_ceil(pieces).max(1);
    let grad_bias = grad_qkv
        .par_chunks_mut(per_piece * window_len)
        .enumerate()
        .map(|(piece, grad_qkv)| {
            let mut grad_bias = vec![0f32; bias_len];
            let mut scratch = AttentionScratch::new(shape);
            for (i, grad_qkv_window) in grad_qkv.chunks_mut(window_len).enumerate() {
                let w = piece * per_piece + i;
                let b = (w % bias_windows) * heads * n * n;
                let window = WindowGrad {
                    qkv: &qkv[w * window_len..(w + 1) * window_len],
                    bias: &bias[b..b + heads * n * n],
                    grad_out: &grad_out[w * n * dim..(w + 1) * n * dim],
                    grad_qkv: grad_qkv_window,
                    grad_bias: &mut grad_bias[b..b + heads * n * n],
                };
                attend_window_backward(path, shape, window, &mut scratch);
            }
            grad_bias
        })
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
        .unwrap_or_else(|| vec![0f32; bias_len]);
    (grad_qkv, grad_bias)
}

/// One window's slices for [`attend_window_backward`].
struct WindowGrad<'a> {
    qkv: &'a [f32],
    bias: &'a [f32],
    grad_out: &'a [f32],
    grad_qkv: &'a mut [f32],
    grad_bias: &'a mut [f32],
}

/// Per-thread buffers of the backward pass (one head at a time).
struct AttentionScratch {
    q: Vec<f32>,
    k: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    dout: Vec<f32>,
    p: Vec<f32>,
    dp: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl AttentionScratch {
    fn new(shape: &AttentionShape) -> Self {
        let (n, hd) = (shape.n, shape.head_dim);
        let v = || vec![0f32; n * hd];
        // Transposed k and v: rows of ROW lanes (zero past n) where a window fits in them.
        let t = || vec![0f32; transposed_stride(n) * hd];
        Self {
            q: v(),
            k: v(),
            kt: t(),
            vt: t(),
            dout: v(),
            p: vec![0f32; n * n],
            dp: vec![0f32; n * n],
            dq: v(),
            dk: v(),
            dv: v(),
        }
    }
}

fn attend_window_backward(
    path: KernelPath,
    shape: &AttentionShape,
    window: WindowGrad,
    scratch: &mut AttentionScratch,
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (both): attention_backward checked that the CPU supports the path.
        KernelPath::Avx512Vnni => unsafe { attend_window_backward_avx512(shape, window, scratch) },
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::AvxVnni => unsafe {
            attend_window_backward_avx2(shape, window, scratch)
        },
        _ => attend_window_backward_any(shape, window, scratch),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_window_backward_avx2(
    shape: &AttentionShape,
    window: WindowGrad,
    scratch: &mut AttentionScratch,
) {
    attend_window_backward_any(shape, window, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn attend_window_backward_avx512(
    shape: &AttentionShape,
    window: WindowGrad,
    scratch: &mut AttentionScratch,
) {
    attend_window_backward_any(shape, window, scratch)
}

/// `y += a * x` over equal-length slices (vectorised by the compiler).
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// One window, every head: S = scale q k^T + bias, P = softmax(S), out = P v; given dOut:
/// dV = P^T dOut, dP = dOut v^T, dS = P (dP - rowsum(P dP)), dQ = scale dS k,
/// dK = scale dS^T q, dBias += dS. Loops run along rows of n scores or hd channels, so that
/// the compiler vectorises them for the path's width.
#[inline(always)]
fn attend_window_backward_any(
    shape: &AttentionShape,
    window: WindowGrad,
    s: &mut AttentionScratch,
) {
    let AttentionShape {
        n,
        dim,
        heads,
        head_dim: hd,
        scale,
    } = *shape;
    let row = 3 * dim;
    let stride = transposed_stride(n);
    for h in 0..heads {
        // Gather this head's q, k, v (also transposed) and dOut.
        for i in 0..n {
            let base = i * row + h * hd;
            s.q[i * hd..][..hd].copy_from_slice(&window.qkv[base..base + hd]);
            s.k[i * hd..][..hd].copy_from_slice(&window.qkv[base + dim..base + dim + hd]);
            for d in 0..hd {
                s.kt[d * stride + i] = window.qkv[base + dim + d];
                s.vt[d * stride + i] = window.qkv[base + 2 * dim + d];
            }
            s.dout[i * hd..][..hd].copy_from_slice(&window.grad_out[i * dim + h * hd..][..hd]);
        }
        let bias = &window.bias[h * n * n..(h + 1) * n * n];
        match hd {
            16 => head_backward::<16>(n, scale, bias, s),
            24 => head_backward::<24>(n, scale, bias, s),
            32 => head_backward::<32>(n, scale, bias, s),
            48 => head_backward::<48>(n, scale, bias, s),
            64 => head_backward::<64>(n, scale, bias, s),
            other => unreachable!("head dim {other} is filtered out before the kernel"),
        }
        let grad_bias = &mut window.grad_bias[h * n * n..(h + 1) * n * n];
        grad_bias.iter_mut().zip(&s.dp).for_each(|(b, g)| *b += g);
        for i in 0..n {
            let base = i * row + h * hd;
            window.grad_qkv[base..base + hd].copy_from_slice(&s.dq[i * hd..(i + 1) * hd]);
            window.grad_qkv[base + dim..base + dim + hd]
                .copy_from_slice(&s.dk[i * hd..(i + 1) * hd]);
            window.grad_qkv[base + 2 * dim..base + 2 * dim + hd]
                .copy_from_slice(&s.dv[i * hd..(i + 1) * hd]);
        }
    }
}

/// Lanes of one score row in the backward pass's fast path (windows of up to 8 x 8).
const ROW: usize = 64;

/// Row stride of the transposed k and v: [`ROW`] where a window fits in it, else `n`.
fn transposed_stride(n: usize) -> usize {
    if n <= ROW { ROW } else { n }
}

/// One head of the backward pass: P and dS row by row (into `s.p`, `s.dp`), then the
/// gradients of q, k and v.
#[inline(always)]
fn head_backward<const HD: usize>(n: usize, scale: f32, bias: &[f32], s: &mut AttentionScratch) {
    if n <= ROW {
        head_rows::<HD>(n, scale, bias, s);
    } else {
        head_rows_any(n, HD, scale, bias, s);
    }
    head_grads::<HD>(n, scale, s);
}

/// P = softmax(scale q k^T + bias) and dS = P (dP - rowsum(P dP)) with dP = dOut v^T, one row
/// at a time in [`ROW`] lanes held in registers (positions past n masked), for windows of at
/// most [`ROW`] positions.
#[inline(always)]
fn head_rows<const HD: usize>(n: usize, scale: f32, bias: &[f32], s: &mut AttentionScratch) {
    const PARTS: usize = 16;
    for i in 0..n {
        let q_i: [f32; HD] = s.q[i * HD..(i + 1) * HD].try_into().expect("HD channels");
        let dout_i: [f32; HD] = s.dout[i * HD..(i + 1) * HD]
            .try_into()
            .expect("HD channels");
        let mut p = [f32::NEG_INFINITY; ROW];
        p[..n].copy_from_slice(&bias[i * n..(i + 1) * n]);
        let mut dp = [0f32; ROW];
        for d in 0..HD {
            let (a, b) = (scale * q_i[d], dout_i[d]);
            let kt: &[f32; ROW] = s.kt[d * ROW..(d + 1) * ROW].try_into().expect("ROW");
            let vt: &[f32; ROW] = s.vt[d * ROW..(d + 1) * ROW].try_into().expect("ROW");
            for c in 0..ROW {
                p[c] += a * kt[c];
                dp[c] += b * vt[c];
            }
        }
        let mut max = [f32::NEG_INFINITY; PARTS];
        for c in 0..ROW {
            max[c % PARTS] = max[c % PARTS].max(p[c]);
        }
        let max = max.into_iter().fold(f32::NEG_INFINITY, f32::max);
        for v in p.iter_mut() {
            *v = exp(*v - max);
        }
        p[n..].fill(0.0);
        let mut sum = [0f32; PARTS];
        for c in 0..ROW {
            sum[c % PARTS] += p[c];
        }
        let inv = 1.0 / sum.into_iter().sum::<f32>();
        let mut dot = [0f32; PARTS];
        for c in 0..ROW {
            p[c] *= inv;
            dot[c % PARTS] += p[c] * dp[c];
        }
        let dot: f32 = dot.into_iter().sum();
        for c in 0..ROW {
            dp[c] = p[c] * (dp[c] - dot);
        }
        s.p[i * n..(i + 1) * n].copy_from_slice(&p[..n]);
        s.dp[i * n..(i + 1) * n].copy_from_slice(&dp[..n]);
    }
}

/// [`head_rows`] for windows of any size (transposed k and v with row stride n).
#[inline(always)]
fn head_rows_any(n: usize, hd: usize, scale: f32, bias: &[f32], s: &mut AttentionScratch) {
    for i in 0..n {
        let p = &mut s.p[i * n..(i + 1) * n];
        p.copy_from_slice(&bias[i * n..(i + 1) * n]);
        for d in 0..hd {
            axpy(p, scale * s.q[i * hd + d], &s.kt[d * n..(d + 1) * n]);
        }
        let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in p.iter_mut() {
            *v = exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        p.iter_mut().for_each(|v| *v *= inv);
        let dp = &mut s.dp[i * n..(i + 1) * n];
        dp.fill(0.0);
        for d in 0..hd {
            axpy(dp, s.dout[i * hd + d], &s.vt[d * n..(d + 1) * n]);
        }
        let dot: f32 = p.iter().zip(dp.iter()).map(|(p, g)| p * g).sum();
        for (g, p) in dp.iter_mut().zip(p.iter()) {
            *g = p * (*g - dot);
        }
    }
}

/// One head's dQ = scale dS k, dK = scale dS^T q and dV = P^T dOut (`dS` in `s.dp`), each
/// output row summed in `HD` registers' worth of accumulators (a compile-time head width, so
/// that the compiler keeps them in vector registers instead of loading and storing a short row
/// per term).
#[inline(always)]
fn head_grads<const HD: usize>(n: usize, scale: f32, s: &mut AttentionScratch) {
    let AttentionScratch {
        q,
        k,
        dout,
        p,
        dp: ds,
        dq,
        dk,
        dv,
        ..
    } = s;
    let row = |m: &[f32], i: usize| -> [f32; HD] {
        m[i * HD..(i + 1) * HD].try_into().expect("HD channels")
    };
    for i in 0..n {
        let mut acc = [0f32; HD];
        for (j, &a) in ds[i * n..(i + 1) * n].iter().enumerate() {
            let k_j = row(k, j);
            for d in 0..HD {
                acc[d] += a * k_j[d];
            }
        }
        for (out, acc) in dq[i * HD..(i + 1) * HD].iter_mut().zip(acc) {
            *out = acc * scale;
        }
    }
    for j in 0..n {
        let (mut acc_k, mut acc_v) = ([0f32; HD], [0f32; HD]);
        for i in 0..n {
            let (a, b) = (ds[i * n + j], p[i * n + j]);
            let (q_i, dout_i) = (row(q, i), row(dout, i));
            for d in 0..HD {
                acc_k[d] += a * q_i[d];
                acc_v[d] += b * dout_i[d];
            }
        }
        for (out, acc) in dk[j * HD..(j + 1) * HD].iter_mut().zip(acc_k) {
            *out = acc * scale;
        }
        dv[j * HD..(j + 1) * HD].copy_from_slice(&acc_v);
    }
}

/// Whether [`windows_from_image`] and [`image_from_windows`] apply: the Flex backend, f32
/// (for training too, through [`crate::autograd`]).
pub fn window_copy_applies(x: &Tensor<4>) -> bool {
    let device = x.device();
    (!device.is_autodiff() || crate::autograd::applies(x))
        && device == Device::flex()
        && x.dtype() == DType::F32
}

/// Windows per image and windows across for an `h x w` image padded to whole windows.
fn window_counts(h: usize, w: usize, window: [usize; 2]) -> (usize, usize) {
    let across = w.div_ceil(window[1]);
    (h.div_ceil(window[0]) * across, across)
}

/// One copy for Swin's `roll(-shift)`, zero padding to whole windows and window partition:
/// `[b, h, w, c]` -> `[b * nW, wh * ww, c]`, windows in row-major order per image (timm's order).
/// burn's path is three copies (roll, pad, permute). Call where [`window_copy_applies`].
pub fn windows_from_image(x: Tensor<4>, window: [usize; 2], shift: [usize; 2]) -> Tensor<3> {
    if x.device().is_autodiff() {
        return crate::autograd::windows_from_image(x, window, shift);
    }
    let device = x.device();
    let [b, h, w, c] = x.dims();
    let data = x.into_data();
    let src = data.as_slice::<f32>().expect("checked f32");
    let (out, dims) = gather_windows(src, [b, h, w, c], window, shift);
    Tensor::from_data(TensorData::new(out, dims), &device)
}

/// [`windows_from_image`] on a row-major `[b, h, w, c]` slice: the windows and their shape.
/// Also the backward pass of [`image_from_windows`] (padding positions get zero).
pub(crate) fn gather_windows(
    src: &[f32],
    [b, h, w, c]: [usize; 4],
    window: [usize; 2],
    shift: [usize; 2],
) -> (Vec<f32>, [usize; 3]) {
    let [wh, ww] = window;
    let n = wh * ww;
    let (nw, windows_across) = window_counts(h, w, window);
    let mut out = vec![0f32; b * nw * n * c];
    let fill = |index: usize, dst: &mut [f32]| {
        let (image, wi) = (index / nw, index % nw);
        let (y0, x0) = ((wi / windows_across) * wh, (wi % windows_across) * ww);
        for r in 0..wh {
            let y = y0 + r;
            if y >= h {
                break; // padding rows stay zero
            }
            let sy = (y + shift[0]) % h;
            for s in 0..ww {
                let x = x0 + s;
                if x >= w {
                    break;
                }
                let sx = (x + shift[1]) % w;
                let from = ((image * h + sy) * w + sx) * c;
                dst[(r * ww + s) * c..][..c].copy_from_slice(&src[from..from + c]);
            }
        }
    };
    for_each_chunk(&mut out, n * c, PARALLEL_COPY, fill);
    (out, [b * nw, n, c])
}

/// The inverse of [`windows_from_image`] in one copy: window reverse, crop of the padding and
/// `roll(+shift)`: `[b * nW, wh * ww, c]` -> `[b, h, w, c]`.
pub fn image_from_windows(
    windows: Tensor<3>,
    window: [usize; 2],
    shift: [usize; 2],
    b: usize,
    h: usize,
    w: usize,
) -> Tensor<4> {
    if windows.device().is_autodiff() {
        return crate::autograd::image_from_windows(windows, window, shift, [b, h, w]);
    }
    let device = windows.device();
    let [_, n, c] = windows.dims();
    let data = windows.into_data();
    let src = data.as_slice::<f32>().expect("checked f32");
    let out = scatter_windows(src, [n, c], window, shift, [b, h, w]);
    Tensor::from_data(TensorData::new(out, [b, h, w, c]), &device)
}

/// [`image_from_windows`] on a `[b * nW, n, c]` slice: the `[b, h, w, c]` image. Also the
/// backward pass of [`windows_from_image`] (every image position was copied exactly once).
pub(crate) fn scatter_windows(
    src: &[f32],
    [n, c]: [usize; 2],
    window: [usize; 2],
    shift: [usize; 2],
    [b, h, w]: [usize; 3],
) -> Vec<f32> {
    let [wh, ww] = window;
    assert_eq!(n, wh * ww, "windows of {n} tokens for a {wh}x{ww} window");
    let (nw, windows_across) = window_counts(h, w, window);
    assert_eq!(
        src.len(),
        b * nw * n * c,
        "windows of the wrong size for the image"
    );
    let mut out = vec![0f32; b * h * w * c];
    // One destination row (image, oy) at a time: its tokens came from row y of the shifted grid.
    let fill = |row: usize, dst: &mut [f32]| {
        let (image, oy) = (row / h, row % h);
        let y = (oy + h - shift[0] % h) % h;
        let (wy, r) = (y / wh, y % wh);
        for ox in 0..w {
            let x = (ox + w - shift[1] % w) % w;
            let (wx, s) = (x / ww, x % ww);
            let window = image * nw + wy * windows_across + wx;
            let from = (window * n + r * ww + s) * c;
            dst[ox * c..][..c].copy_from_slice(&src[from..from + c]);
        }
    };
    for_each_chunk(&mut out, w * c, PARALLEL_COPY, fill);
    out
}

/// Copies over fewer elements run on the calling thread.
const PARALLEL_COPY: usize = 1 << 16;

/// `f(index, chunk)` over `chunk`-sized pieces of `data`, on the thread pool when `data` has at
/// least `min_parallel` elements (smaller ones cost more to hand over than to do).
pub(crate) fn for_each_chunk(
    data: &mut [f32],
    chunk: usize,
    min_parallel: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    if data.len() >= min_parallel && rayon::current_num_threads() > 1 {
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct AttentionShape {
    pub n: usize,
    pub dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl AttentionShape {
    pub(crate) fn new(n: usize, dim: usize, heads: usize, scale: f32) -> Self {
        Self {
            n,
            dim,
            heads,
            head_dim: dim / heads,
            scale,
        }
    }
}

/// Head sizes the kernel is compiled for (the edge model uses 24, swin_tiny 32).
const HEAD_DIMS: [usize; 5] = [16, 24, 32, 48, 64];

fn attend_window(
    path: KernelPath,
    shape: &AttentionShape,
    qkv: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (both): the caller checked that the CPU supports the path.
        KernelPath::Avx512Vnni => unsafe { attend_window_avx512(shape, qkv, bias, out) },
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::AvxVnni => unsafe {
            attend_window_avx2(shape, qkv, bias, out)
        },
        _ => attend_window_any::<false, 1>(shape, qkv, bias, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_window_avx2(shape: &AttentionShape, qkv: &[f32], bias: &[f32], out: &mut [f32]) {
    attend_window_any::<true, 1>(shape, qkv, bias, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn attend_window_avx512(shape: &AttentionShape, qkv: &[f32], bias: &[f32], out: &mut [f32]) {
    attend_window_any::<true, 4>(shape, qkv, bias, out)
}

#[inline(always)]
fn attend_window_any<const FMA: bool, const CB: usize>(
    shape: &AttentionShape,
    qkv: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    match shape.head_dim {
        16 => attend_window_hd::<16, FMA, CB>(shape, qkv, bias, out),
        24 => attend_window_hd::<24, FMA, CB>(shape, qkv, bias, out),
        32 => attend_window_hd::<32, FMA, CB>(shape, qkv, bias, out),
        48 => attend_window_hd::<48, FMA, CB>(shape, qkv, bias, out),
        64 => attend_window_hd::<64, FMA, CB>(shape, qkv, bias, out),
        other => unreachable!("head dim {other} is filtered out before the kernel"),
    }
}

/// `a * b + c`, fused where the path has FMA (a plain `mul_add` elsewhere would be a library
/// call per element).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Queries per lane block: the kernel keeps 64 queries of one key (or one channel) in four zmm
/// or eight ymm registers.
const QB: usize = 64;

/// One window, every head, with the queries in the vector lanes: per head and block of 64
/// queries, the scores of each key against all of them (`st[j][i]`, K broadcast against Q
/// transposed, four keys at a time), the softmax down each lane, then each output channel as
/// a sum over keys of `v[j][c] x st[j][..]` (`CB` channels at a time). Every inner loop is a
/// fixed-size vector FMA with operands in registers; only the stores transpose back.
#[inline(always)]
fn attend_window_hd<const HD: usize, const FMA: bool, const CB: usize>(
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
    let stride = 3 * dim;
    let mut qt = vec![[0f32; QB]; HD];
    let mut st = vec![[0f32; QB]; n];
    for h in 0..heads {
        let (q_off, k_off, v_off) = (h * HD, dim + h * HD, 2 * dim + h * HD);
        let bias_head = &bias[h * n * n..(h + 1) * n * n];
        for i0 in (0..n).step_by(QB) {
            let lanes = (n - i0).min(QB);
            for (l, token) in qkv[i0 * stride..].chunks(stride).take(lanes).enumerate() {
                for (row, &q) in qt.iter_mut().zip(&token[q_off..q_off + HD]) {
                    row[l] = q * scale;
                }
            }
            if lanes < QB {
                for row in qt.iter_mut() {
                    row[lanes..].fill(0.0);
                }
            }
            // Scores, four keys at a time against the 64 queries.
            let mut j = 0;
            while j < n {
                let keys = (n - j).min(4);
                let mut acc = [[0f32; QB]; 4];
                for (c, q) in qt.iter().enumerate() {
                    for (t, a) in acc.iter_mut().enumerate().take(keys) {
                        let k = qkv[(j + t) * stride + k_off + c];
                        for l in 0..QB {
                            a[l] = madd::<FMA>(k, q[l], a[l]);
                        }
                    }
                }
                for (t, a) in acc.iter().enumerate().take(keys) {
                    let row = &mut st[j + t];
                    *row = *a;
                    for l in 0..lanes {
                        row[l] += bias_head[(i0 + l) * n + j + t];
                    }
                }
                j += keys;
            }
            // Softmax over the keys, down each lane.
            let mut max = [f32::NEG_INFINITY; QB];
            for row in &st {
                for l in 0..QB {
                    max[l] = max[l].max(row[l]);
                }
            }
            let mut sum = [0f32; QB];
            for row in st.iter_mut() {
                for l in 0..QB {
                    row[l] = exp(row[l] - max[l]);
                    sum[l] += row[l];
                }
            }
            let inv: [f32; QB] = std::array::from_fn(|l| 1.0 / sum[l]);
            // Outputs, CB channels at a time.
            for c0 in (0..HD).step_by(CB) {
                let mut acc = [[0f32; QB]; CB];
                for (j, p) in st.iter().enumerate() {
                    let v = &qkv[j * stride + v_off + c0..j * stride + v_off + c0 + CB];
                    for (a, &vc) in acc.iter_mut().zip(v) {
                        for l in 0..QB {
                            a[l] = madd::<FMA>(vc, p[l], a[l]);
                        }
                    }
                }
                for (c, a) in acc.iter().enumerate() {
                    for l in 0..lanes {
                        out[(i0 + l) * dim + h * HD + c0 + c] = a[l] * inv[l];
                    }
                }
            }
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
    fn window_copies_equal_burns_roll_pad_and_partition() {
        use burn::tensor::ops::PadMode;
        let device = Device::flex();
        // Shifted and not, padded and not, one window per image, batch > 1.
        for (b, h, w, c, window, shift) in [
            (2, 14, 21, 3, [7, 7], [3, 3]),
            (1, 14, 14, 5, [7, 7], [0, 0]),
            (3, 10, 9, 4, [7, 7], [3, 3]),
            (2, 7, 7, 8, [7, 7], [0, 0]),
            (1, 12, 16, 2, [4, 8], [2, 4]),
        ] {
            let x = Tensor::<4>::random([b, h, w, c], Distribution::Default, &device);
            assert!(window_copy_applies(&x));
            let [wh, ww] = window;
            let (pad_h, pad_w) = ((wh - h % wh) % wh, (ww - w % ww) % ww);
            let shifted = x
                .clone()
                .roll(&[-(shift[0] as i64), -(shift[1] as i64)], &[1, 2]);
            let padded = shifted.pad([(0, pad_h), (0, pad_w), (0, 0)], PadMode::Constant(0.0));
            let (hp, wp) = (h + pad_h, w + pad_w);
            let reference = padded
                .reshape([b, hp / wh, wh, wp / ww, ww, c])
                .permute([0, 1, 3, 2, 4, 5])
                .reshape([b * (hp / wh) * (wp / ww), wh * ww, c]);
            let ours = windows_from_image(x.clone(), window, shift);
            ours.clone()
                .into_data()
                .assert_eq(&reference.clone().into_data(), true);
            // And back: an attention stand-in (x 2) in between, then reverse, crop, roll.
            let attended = reference * 2.0;
            let merged = attended
                .clone()
                .reshape([b, hp / wh, wp / ww, wh, ww, c])
                .permute([0, 1, 3, 2, 4, 5])
                .reshape([b, hp, wp, c])
                .slice([0..b, 0..h, 0..w, 0..c])
                .roll(&[shift[0] as i64, shift[1] as i64], &[1, 2]);
            let back = image_from_windows(attended, window, shift, b, h, w);
            back.into_data()
                .assert_eq(&merged.clone().into_data(), true);
            (x * 2.0).into_data().assert_eq(&merged.into_data(), true);
        }
    }

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
            let reference = reference_gelu(x.clone());
            let src = x.clone().into_data().try_to_vec::<f32>().unwrap();
            for path in KernelPath::ALL.into_iter().filter(|p| p.supported()) {
                let mut out = src.clone();
                gelu_in_place_with(path, &mut out);
                let fast = Tensor::<2>::from_data(TensorData::new(out, x.shape()), &device);
                // Absolute 2e-6 near zero, relative 2e-7 (about 2 ulp) for large values.
                let scale = x.clone().abs().clamp_min(1.0);
                let diff = ((fast - reference.clone()).abs() / scale)
                    .max()
                    .into_scalar::<f32>();
                assert!(
                    diff < 2e-6,
                    "{path}: max scaled |fast - reference| = {diff}"
                );
            }
            // The tensor entry point runs the active path.
            let same = gelu(x.clone()).equal(Tensor::from_data(
                TensorData::new(
                    {
                        let mut out = src.clone();
                        gelu_in_place(&mut out);
                        out
                    },
                    x.shape(),
                ),
                &device,
            ));
            assert!(same.all().into_scalar::<bool>());
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
            let paths: Vec<KernelPath> = KernelPath::ALL
                .into_iter()
                .filter(|p| p.supported())
                .collect();
            let ours: Vec<Tensor<3>> = paths
                .iter()
                .map(|&p| window_attention_with(p, qkv.clone(), bias.clone(), heads, scale))
                .collect();
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
            for (path, ours) in paths.iter().zip(ours) {
                let diff = (ours - reference.clone()).abs().max().into_scalar::<f32>();
                assert!(
                    diff < 2e-5,
                    "{path}: n {n}, head dim {head_dim}: max |ours - burn| = {diff}"
                );
            }
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
