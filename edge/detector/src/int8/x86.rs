//! The x86-64 INT8 kernels: AVX2 (16-bit pairs), AVX-VNNI and AVX-512 VNNI (bytes). Each is
//! compiled for its features and called only on paths the CPU supports (see `super`).

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Int8Linear, NR};

/// What turns a panel's i32 sums into outputs:
/// `(acc - excess[col]) * sx[row] * scales[col] + bias[col]`.
struct Epilogue<'a> {
    scales: &'a [f32],
    bias: &'a [f32],
    /// The VNNI inputs' excess per column (empty for the AVX2 pairs).
    excess: &'a [i32],
    /// Valid columns from the first (fewer than the kernel's width only at the right edge).
    cols: usize,
    row_stride: usize,
}

impl<'a> Epilogue<'a> {
    fn at(layer: &'a Int8Linear, excess: &'a [i32], panel: usize, width: usize) -> Self {
        let from = panel * NR;
        Self {
            scales: &layer.scales[from..],
            bias: &layer.bias[from..],
            excess: if excess.is_empty() {
                excess
            } else {
                &excess[from..]
            },
            cols: ((panel + width) * NR).min(layer.n) - from,
            row_stride: layer.n,
        }
    }
}

/// AVX2: rows `qx` (16-bit pairs, `sx.len()` rows) times the given panels, into `out` (the first
/// row's outputs).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn block_avx2(
    layer: &Int8Linear,
    packed: &[i16],
    qx: &[i16],
    sx: &[f32],
    panels: Range<usize>,
    out: *mut f32,
) {
    const MR: usize = 6;
    let k_pad = layer.k_pad;
    let pairs = k_pad / 2;
    for panel in panels {
        let b = &packed[panel * pairs * 2 * NR..(panel + 1) * pairs * 2 * NR];
        let epilogue = Epilogue::at(layer, &[], panel, 1);
        let mut r = 0;
        while r < sx.len() {
            let count = (sx.len() - r).min(MR);
            let a = &qx[r * k_pad..(r + count) * k_pad];
            let s = &sx[r..r + count];
            // SAFETY: rows r..r + count and this panel's columns are inside `out` and owned by
            // this task; AVX2 is enabled on this function.
            unsafe {
                let o = out.add(r * layer.n + panel * NR);
                match count {
                    6 => micro_avx2::<6>(a, b, k_pad, s, &epilogue, o),
                    5 => micro_avx2::<5>(a, b, k_pad, s, &epilogue, o),
                    4 => micro_avx2::<4>(a, b, k_pad, s, &epilogue, o),
                    3 => micro_avx2::<3>(a, b, k_pad, s, &epilogue, o),
                    2 => micro_avx2::<2>(a, b, k_pad, s, &epilogue, o),
                    _ => micro_avx2::<1>(a, b, k_pad, s, &epilogue, o),
                }
            }
            r += count;
        }
    }
}

/// AVX-VNNI: rows `qx` (offset bytes) times the given panels, 6 rows x 16 columns at a time.
#[target_feature(enable = "avx2,fma,avxvnni")]
pub(super) unsafe fn block_avxvnni(
    layer: &Int8Linear,
    packed: &[i8],
    excess: &[i32],
    qx: &[u8],
    sx: &[f32],
    panels: Range<usize>,
    out: *mut f32,
) {
    const MR: usize = 6;
    let k_pad = layer.k_pad;
    let panel_len = k_pad * NR;
    assert!(qx.len() >= sx.len() * k_pad && packed.len() >= panels.end * panel_len);
    for panel in panels {
        let b = packed[panel * panel_len..].as_ptr();
        let epilogue = Epilogue::at(layer, excess, panel, 1);
        let mut r = 0;
        while r < sx.len() {
            let count = (sx.len() - r).min(MR);
            let a = qx[r * k_pad..].as_ptr();
            let s = &sx[r..r + count];
            // SAFETY: the asserts above bound every read; rows r..r + count and this panel's
            // columns are inside `out` and owned by this task.
            unsafe {
                let o = out.add(r * layer.n + panel * NR);
                match count {
                    6 => micro_avxvnni::<6>(a, b, k_pad, s, &epilogue, o),
                    5 => micro_avxvnni::<5>(a, b, k_pad, s, &epilogue, o),
                    4 => micro_avxvnni::<4>(a, b, k_pad, s, &epilogue, o),
                    3 => micro_avxvnni::<3>(a, b, k_pad, s, &epilogue, o),
                    2 => micro_avxvnni::<2>(a, b, k_pad, s, &epilogue, o),
                    _ => micro_avxvnni::<1>(a, b, k_pad, s, &epilogue, o),
                }
            }
            r += count;
        }
    }
}

/// AVX-512 VNNI: rows `qx` (offset bytes) times the given panels, 8 rows x 32 columns (two
/// panels) at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn block_vnni512(
    layer: &Int8Linear,
    packed: &[i8],
    excess: &[i32],
    qx: &[u8],
    sx: &[f32],
    panels: Range<usize>,
    out: *mut f32,
) {
    let k_pad = layer.k_pad;
    let panel_len = k_pad * NR;
    assert!(qx.len() >= sx.len() * k_pad && packed.len() >= panels.end * panel_len);
    let mut panel = panels.start;
    while panel < panels.end {
        let width = (panels.end - panel).min(2);
        let b = packed[panel * panel_len..].as_ptr();
        let epilogue = Epilogue::at(layer, excess, panel, width);
        let mut r = 0;
        while r < sx.len() {
            let count = (sx.len() - r).min(8);
            let a = qx[r * k_pad..].as_ptr();
            let s = &sx[r..r + count];
            // SAFETY: the asserts above bound every read; rows r..r + count and these panels'
            // columns are inside `out` and owned by this task.
            unsafe {
                let o = out.add(r * layer.n + panel * NR);
                macro_rules! call {
                    ($($rows:literal)*) => {
                        match (count, width) {
                            $(($rows, 2) => micro_vnni512::<$rows, 2>(a, b, k_pad, s, &epilogue, o),
                              ($rows, _) => micro_vnni512::<$rows, 1>(a, b, k_pad, s, &epilogue, o),)*
                            _ => unreachable!(),
                        }
                    };
                }
                call!(8 7 6 5 4 3 2 1);
            }
            r += count;
        }
        panel += width;
    }
}

/// `R` rows of offset bytes (`k_pad` apart) times one panel of byte quads, 16 columns in two
/// ymm halves.
#[target_feature(enable = "avx2,fma,avxvnni")]
#[inline]
unsafe fn micro_avxvnni<const R: usize>(
    a: *const u8,
    b: *const i8,
    k_pad: usize,
    sx: &[f32],
    epilogue: &Epilogue,
    out: *mut f32,
) {
    let zero = _mm256_setzero_si256();
    let mut c0 = [zero; R];
    let mut c1 = [zero; R];
    // SAFETY: the caller bounds a (R rows of k_pad bytes) and b (k_pad x 16 bytes).
    unsafe {
        for g in 0..k_pad / 4 {
            let b0 = _mm256_loadu_si256(b.add(g * 64) as *const __m256i);
            let b1 = _mm256_loadu_si256(b.add(g * 64 + 32) as *const __m256i);
            for r in 0..R {
                let av =
                    _mm256_set1_epi32((a.add(r * k_pad + 4 * g) as *const i32).read_unaligned());
                c0[r] = _mm256_dpbusd_avx_epi32(c0[r], av, b0);
                c1[r] = _mm256_dpbusd_avx_epi32(c1[r], av, b1);
            }
        }
        let e0 = _mm256_loadu_si256(epilogue.excess.as_ptr() as *const __m256i);
        let e1 = _mm256_loadu_si256(epilogue.excess.as_ptr().add(8) as *const __m256i);
        for r in 0..R {
            c0[r] = _mm256_sub_epi32(c0[r], e0);
            c1[r] = _mm256_sub_epi32(c1[r], e1);
        }
        store_avx2::<R>(&c0, &c1, sx, epilogue, out);
    }
}

/// `R` rows of offset bytes times `P` consecutive panels (`k_pad x 16` bytes each), 16 columns
/// per zmm.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn micro_vnni512<const R: usize, const P: usize>(
    a: *const u8,
    b: *const i8,
    k_pad: usize,
    sx: &[f32],
    epilogue: &Epilogue,
    out: *mut f32,
) {
    let panel_len = k_pad * NR;
    let mut c = [[_mm512_setzero_si512(); P]; R];
    // SAFETY: the caller bounds a (R rows of k_pad bytes), b (P panels), the epilogue's
    // slices (padded to whole panels) and out (R rows of `cols` columns).
    unsafe {
        for g in 0..k_pad / 4 {
            let mut bv = [_mm512_setzero_si512(); P];
            for (p, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(b.add(p * panel_len + g * 64) as *const __m512i);
            }
            for (r, row) in c.iter_mut().enumerate() {
                let av =
                    _mm512_set1_epi32((a.add(r * k_pad + 4 * g) as *const i32).read_unaligned());
                for (acc, bv) in row.iter_mut().zip(&bv) {
                    *acc = _mm512_dpbusd_epi32(*acc, av, *bv);
                }
            }
        }
        for p in 0..P {
            let col0 = p * NR;
            let valid = epilogue.cols.saturating_sub(col0).min(NR);
            if valid == 0 {
                break;
            }
            let mask: __mmask16 = if valid == NR { !0 } else { (1 << valid) - 1 };
            let s = _mm512_loadu_ps(epilogue.scales.as_ptr().add(col0));
            let bias = _mm512_loadu_ps(epilogue.bias.as_ptr().add(col0));
            let e = _mm512_loadu_si512(epilogue.excess.as_ptr().add(col0) as *const __m512i);
            for (r, row) in c.iter().enumerate() {
                let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(row[p], e));
                let y = _mm512_fmadd_ps(sum, _mm512_mul_ps(_mm512_set1_ps(sx[r]), s), bias);
                _mm512_mask_storeu_ps(out.add(r * epilogue.row_stride + col0), mask, y);
            }
        }
    }
}

/// The row's max |x| and whether every value is finite, AVX2.
#[target_feature(enable = "avx2,fma")]
fn max_abs_avx2(x: &[f32]) -> (f32, bool) {
    let k = x.len();
    // SAFETY: loads stay inside x (8-element steps below k).
    unsafe {
        let sign = _mm256_set1_ps(-0.0);
        let inf = _mm256_set1_ps(f32::INFINITY);
        let mut m = _mm256_setzero_ps();
        let mut bad = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= k {
            let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x.as_ptr().add(i)));
            m = _mm256_max_ps(m, a);
            // Not less than infinity: infinite or NaN.
            bad = _mm256_or_ps(bad, _mm256_cmp_ps::<_CMP_NLT_UQ>(a, inf));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        let mut max = lanes.iter().fold(0f32, |a, &b| a.max(b));
        let mut finite = _mm256_movemask_ps(bad) == 0;
        for v in &x[i..] {
            max = max.max(v.abs());
            finite &= v.is_finite();
        }
        (max, finite && max.is_finite())
    }
}

/// Offset-byte quantization ([`super::quantize_row`], the same values), AVX2: 32 values per
/// step through two saturating packs (exact: every value is within +-127).
#[target_feature(enable = "avx2,fma")]
pub(super) fn quantize_row_u8_avx2(x: &[f32], q: &mut [u8]) -> f32 {
    let (max, finite) = max_abs_avx2(x);
    if !finite || max == 0.0 {
        q.fill(0x80);
        return if finite { 1.0 } else { f32::NAN };
    }
    let k = x.len();
    let full = k / 32 * 32;
    assert!(q.len() >= k);
    // SAFETY: loads and stores stay below `full` <= k <= q.len().
    unsafe {
        let inv = _mm256_set1_ps(127.0 / max);
        let flip = _mm256_set1_epi8(-128);
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut i = 0;
        while i < full {
            let p = x.as_ptr().add(i);
            let a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p), inv));
            let b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(8)), inv));
            let c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(16)), inv));
            let d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p.add(24)), inv));
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
            let bytes = _mm256_permutevar8x32_epi32(bytes, order);
            _mm256_storeu_si256(
                q.as_mut_ptr().add(i) as *mut __m256i,
                _mm256_xor_si256(bytes, flip),
            );
            i += 32;
        }
    }
    let inv = 127.0 / max;
    for j in full..k {
        q[j] = ((x[j] * inv).round_ties_even() as i32 as i8 as u8) ^ 0x80;
    }
    q[k..].fill(0x80);
    max / 127.0
}

/// Offset-byte quantization ([`super::quantize_row`], the same values), AVX-512: 16 values per
/// step, the tail through masked loads and stores.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) fn quantize_row_u8_avx512(x: &[f32], q: &mut [u8]) -> f32 {
    let k = x.len();
    let full = k / 16 * 16;
    let tail: __mmask16 = ((1u32 << (k - full)) - 1) as __mmask16;
    assert!(q.len() >= k);
    // SAFETY: full-width loads and stores stay below `full`; the tail's are masked to k.
    unsafe {
        let inf = _mm512_set1_ps(f32::INFINITY);
        let mut m = _mm512_setzero_ps();
        let mut bad: __mmask16 = 0;
        let mut i = 0;
        while i < full {
            let a = _mm512_abs_ps(_mm512_loadu_ps(x.as_ptr().add(i)));
            m = _mm512_max_ps(m, a);
            bad |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(a, inf);
            i += 16;
        }
        let a = _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, x.as_ptr().add(full)));
        m = _mm512_max_ps(m, a);
        bad |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(a, inf);
        let max = _mm512_reduce_max_ps(m);
        if bad != 0 || max == 0.0 {
            q.fill(0x80);
            return if bad == 0 { 1.0 } else { f32::NAN };
        }
        let inv = _mm512_set1_ps(127.0 / max);
        let flip = _mm_set1_epi8(-128);
        let mut i = 0;
        while i < full {
            let v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), inv));
            let bytes = _mm_xor_si128(_mm512_cvtepi32_epi8(v), flip);
            _mm_storeu_si128(q.as_mut_ptr().add(i) as *mut __m128i, bytes);
            i += 16;
        }
        let v = _mm512_maskz_loadu_ps(tail, x.as_ptr().add(full));
        let v = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
        let bytes = _mm_xor_si128(_mm512_cvtepi32_epi8(v), flip);
        _mm_mask_storeu_epi8(q.as_mut_ptr().add(full) as *mut i8, tail, bytes);
        q[k..].fill(0x80);
        max / 127.0
    }
}

/// Symmetric per-row quantization into `q` (length k rounded up to even, tail zeroed); returns
/// the scale (NaN when the row holds a non-finite value, which then shows in the output).
#[target_feature(enable = "avx2,fma")]
pub(super) fn quantize_row_i16(x: &[f32], q: &mut [i16]) -> f32 {
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
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn micro_avx2<const R: usize>(
    a: &[i16],
    b: &[i16],
    k_pad: usize,
    sx: &[f32],
    epilogue: &Epilogue,
    out: *mut f32,
) {
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
    // SAFETY: the epilogue's slices hold 16 values; out rows hold `cols` values.
    unsafe { store_avx2::<R>(&c0, &c1, sx, epilogue, out) }
}

/// The AVX2 epilogue of 2 x 8 columns of sums for R rows.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store_avx2<const R: usize>(
    c0: &[__m256i; R],
    c1: &[__m256i; R],
    sx: &[f32],
    epilogue: &Epilogue,
    out: *mut f32,
) {
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
