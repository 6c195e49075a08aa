//! AVX2 depthwise planes read straight from the input, with no padded copy: the
//! kernels of `depthwise_avx512` in vectors of 8. A tap whose lanes all lie inside the
//! plane is a plain load; one that reaches outside is a masked load (`vmaskmovps`),
//! whose masked-off lanes read as zero, which is exactly the zero padding. The padded
//! copy they replace cost more than the multiply-adds on the late layers (a few hundred
//! per 7×7 plane), and its stride-2 column split was scalar.
//!
//! - Stride 1 with output rows as wide as the input's, narrower than a vector (7×7):
//!   the plane is one flat array ([`FlatMasks`]); eight outputs at a time cross row
//!   ends.
//! - Column stride 2 (kernels other than 3×3 and 5×5, or rows narrower than a vector):
//!   output row by output row, eight columns at a time; a tap's inputs are the even
//!   values of 16 consecutive ones (two loads, a shuffle and a lane permute), and the
//!   next tap's are the odd values of the same two loads.
//!
//! Wider stride-1 planes keep the padded copy, which measured faster there: its 3×3 and
//! 5×5 planes are swept by [`padded_plane`], plain loads with several blocks' chains of
//! multiply-adds overlapping (`FLAT_AVX2_BELOW` in `depthwise` has the numbers). So are
//! 3×3 and 5×5 planes of column stride 2, from a copy split into even and odd columns
//! ([`split_even_odd`]; `padded_sweep` in `depthwise`).

use std::arch::x86_64::*;

use super::depthwise::Plane;
use super::depthwise_masks::{FlatMasks, RowMasks};
use crate::model::Act;

/// Outputs per vector.
pub const LANES: usize = 8;

/// Blocks of outputs accumulated together, so that the multiply-add chains of several
/// blocks overlap.
const BLOCKS: usize = 4;

/// Every lane of a vector.
const ALL: u16 = 0xFF;

/// The vector mask of lane bits `bits`: lane `l` all ones where bit `l` is set.
#[inline(always)]
unsafe fn lane_mask(bits: u16) -> __m256i {
    let sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits as i32), sel), sel)
}

/// The lanes `bits` of the 8 floats from `p`, zero elsewhere. Masked-off lanes are
/// never read, so `p` may point partly outside the plane.
#[inline(always)]
unsafe fn load(bits: u16, p: *const f32) -> __m256 {
    match bits {
        ALL => _mm256_loadu_ps(p),
        0 => _mm256_setzero_ps(),
        _ => _mm256_maskload_ps(p, lane_mask(bits)),
    }
}

/// The lanes of the first `n`.
#[inline(always)]
fn first_lanes(n: usize) -> u16 {
    if n >= LANES {
        ALL
    } else {
        (1u16 << n) - 1
    }
}

/// Bias is in `acc`; adds the residual, applies the activation, subtracts the shift and
/// stores the first `n` lanes at `out[at..]`.
#[inline(always)]
unsafe fn finish(p: &Plane, mut acc: __m256, n: usize, out: *mut f32, at: usize) {
    let bits = first_lanes(n);
    if let Some(r) = p.residual {
        acc = _mm256_add_ps(acc, load(bits, r.as_ptr().add(at)));
    }
    let zero = _mm256_setzero_ps();
    acc = match p.act {
        Act::None => acc,
        Act::Relu => _mm256_max_ps(acc, zero),
        Act::Relu6 => _mm256_min_ps(_mm256_max_ps(acc, zero), _mm256_set1_ps(6.0)),
    };
    if p.shift != 0.0 {
        acc = _mm256_sub_ps(acc, _mm256_set1_ps(p.shift));
    }
    if bits == ALL {
        _mm256_storeu_ps(out.add(at), acc);
    } else {
        _mm256_maskstore_ps(out.add(at), lane_mask(bits), acc);
    }
}

/// A flat stride-1 plane (see [`FlatMasks`], made with 8 lanes) into `out` (OH × OW).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `p.x` holds the layer's H × W input, `p.k` its kh × kw
/// taps, and `out` and `p.residual` OH × OW values, for the window `m` was made from.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn plane_flat(p: &Plane, m: &FlatMasks, out: &mut [f32]) {
    debug_assert_eq!(out.len(), m.outputs);
    match m.kernel {
        [3, 3] => flat::<9>(p, m, out),
        [5, 5] => flat::<25>(p, m, out),
        _ => flat_any(p, m, out),
    }
}

/// [`plane_flat`] with the tap count known, so that the taps and offsets unroll.
#[target_feature(enable = "avx2,fma")]
unsafe fn flat<const T: usize>(p: &Plane, m: &FlatMasks, out: &mut [f32]) {
    let off: [isize; T] = std::array::from_fn(|t| m.offs[t]);
    let blocks = m.outputs.div_ceil(LANES);
    let (x, o, masks) = (p.x.as_ptr(), out.as_mut_ptr(), m.masks.as_ptr());
    let mut q = 0;
    while q + BLOCKS <= blocks {
        let mut acc = [_mm256_set1_ps(p.bias); BLOCKS];
        for (t, &ot) in off.iter().enumerate() {
            let w = _mm256_broadcast_ss(p.k.get_unchecked(t));
            for (u, a) in acc.iter_mut().enumerate() {
                let b = q + u;
                let v = load(
                    *masks.add(b * T + t),
                    x.wrapping_offset((b * LANES) as isize + ot),
                );
                *a = _mm256_fmadd_ps(w, v, *a);
            }
        }
        for (u, a) in acc.iter().enumerate() {
            let at = (q + u) * LANES;
            finish(p, *a, m.outputs - at, o, at);
        }
        q += BLOCKS;
    }
    for b in q..blocks {
        let mut a = _mm256_set1_ps(p.bias);
        for (t, &ot) in off.iter().enumerate() {
            let v = load(
                *masks.add(b * T + t),
                x.wrapping_offset((b * LANES) as isize + ot),
            );
            a = _mm256_fmadd_ps(_mm256_broadcast_ss(p.k.get_unchecked(t)), v, a);
        }
        let at = b * LANES;
        finish(p, a, m.outputs - at, o, at);
    }
}

/// [`flat`] for any kernel size.
#[target_feature(enable = "avx2,fma")]
unsafe fn flat_any(p: &Plane, m: &FlatMasks, out: &mut [f32]) {
    let taps = m.offs.len();
    let (x, o) = (p.x.as_ptr(), out.as_mut_ptr());
    for b in 0..m.outputs.div_ceil(LANES) {
        let mut a = _mm256_set1_ps(p.bias);
        for t in 0..taps {
            let v = load(
                m.masks[b * taps + t],
                x.wrapping_offset((b * LANES) as isize + m.offs[t]),
            );
            a = _mm256_fmadd_ps(_mm256_set1_ps(p.k[t]), v, a);
        }
        let at = b * LANES;
        finish(p, a, m.outputs - at, o, at);
    }
}

/// Values 0, 2, …, 14 of the 16 in `a` then `b`.
#[inline(always)]
unsafe fn evens(a: __m256, b: __m256) -> __m256 {
    // Per 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6; then the 64-bit pairs in order 0 2 1 3.
    let s = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(s)))
}

/// Values 1, 3, …, 15 of the 16 in `a` then `b`.
#[inline(always)]
unsafe fn odds(a: __m256, b: __m256) -> __m256 {
    let s = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(s)))
}

/// A plane of column stride `SX` (1 or 2; the engine runs 2), row by row, into `out`
/// (OH × OW).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `p.x` holds `p.win`'s H × W input, `p.k` its kh × kw
/// taps, and `out` and `p.residual` OH × OW values; `p.win.stride[1] == SX`, and `m`
/// was made from `p.win` with 8 lanes.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn plane_rows<const SX: usize>(p: &Plane, m: &RowMasks, out: &mut [f32]) {
    debug_assert_eq!(p.win.stride[1], SX);
    match p.win.kernel {
        [3, 3] => rows::<SX, 3>(p, m, out),
        [5, 5] => rows::<SX, 5>(p, m, out),
        _ => rows::<SX, 0>(p, m, out),
    }
}

/// [`plane_rows`] for K × K kernels, or with `K` 0 any kernel.
#[target_feature(enable = "avx2,fma")]
unsafe fn rows<const SX: usize, const K: usize>(p: &Plane, m: &RowMasks, out: &mut [f32]) {
    let win = &p.win;
    let [h, w] = win.in_hw;
    let [oh, ow] = win.out_hw;
    let [kh, kw] = if K == 0 { win.kernel } else { [K, K] };
    let sy = win.stride[0];
    let [top, left] = win.pad_tl;
    let (x, o) = (p.x.as_ptr(), out.as_mut_ptr());
    for oy in 0..oh {
        for (c, ox0) in (0..ow).step_by(LANES).enumerate() {
            let (lo, hi) = (&m.lo[c * kw..(c + 1) * kw], &m.hi[c * kw..(c + 1) * kw]);
            // Three chains of multiply-adds (by tap column) rather than one: a single
            // chain would wait out the latency of every multiply-add in turn.
            let mut acc = [
                _mm256_set1_ps(p.bias),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            ];
            for ky in 0..kh {
                let Some(iy) = (oy * sy + ky).checked_sub(top).filter(|&iy| iy < h) else {
                    continue;
                };
                let row = x.add(iy * w);
                if SX == 2 && K > 0 {
                    // Taps kx and kx + 1 take the even and the odd values of the same
                    // 16: two loads serve both (the masks of kx cover both, being per
                    // input column).
                    for kx in (0..K).step_by(2) {
                        let start = (ox0 * 2 + kx) as isize - left as isize;
                        let a = load(lo[kx], row.wrapping_offset(start));
                        let b = load(hi[kx], row.wrapping_offset(start + LANES as isize));
                        let wv = _mm256_broadcast_ss(p.k.get_unchecked(ky * K + kx));
                        acc[kx % 3] = _mm256_fmadd_ps(wv, evens(a, b), acc[kx % 3]);
                        if kx + 1 < K {
                            let wv = _mm256_broadcast_ss(p.k.get_unchecked(ky * K + kx + 1));
                            acc[(kx + 1) % 3] = _mm256_fmadd_ps(wv, odds(a, b), acc[(kx + 1) % 3]);
                        }
                    }
                    continue;
                }
                for kx in 0..kw {
                    let wv = _mm256_broadcast_ss(p.k.get_unchecked(ky * kw + kx));
                    let start = (ox0 * SX + kx) as isize - left as isize;
                    let v = load(lo[kx], row.wrapping_offset(start));
                    let v = if SX == 1 {
                        v
                    } else {
                        let next = load(hi[kx], row.wrapping_offset(start + LANES as isize));
                        evens(v, next)
                    };
                    acc[kx % 3] = _mm256_fmadd_ps(wv, v, acc[kx % 3]);
                }
            }
            let acc = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), acc[2]);
            finish(p, acc, ow - ox0, o, oy * ow + ox0);
        }
    }
}

/// A K × K plane of column stride 1 or 2, at least [`LANES`] wide, from its zero-padded
/// copy into `out` (OH × OW): padded row `oy · sy + ky` starts at
/// `padded[(oy · sy + ky) · row_len]`; with stride 1 output column `x` of tap `kx` reads
/// its column `x + kx`, with stride 2 a row holds its even padded columns then its odd
/// ones (`row_len / 2` each), and tap `kx` reads index `x + kx / 2` of phase `kx % 2`.
/// [`BLOCKS`] blocks of 8 outputs of a row accumulate together, so that their
/// multiply-add chains overlap; a row's last block ends at its last column, overlapping
/// the one before rather than leaving a partial vector (both compute those outputs
/// alike).
///
/// # Safety
/// The CPU supports AVX2 and FMA; `p.win` has kernel K × K, column stride 1 or 2 and
/// `ow ≥ LANES`; `padded` holds `(oh - 1) · sy + K` rows of `row_len` values, with
/// `row_len ≥ pw` for stride 1 and `row_len = 2 · ⌈pw / 2⌉` for stride 2, where
/// `pw = (ow - 1) · sx + K` (every tap's run of `ow` values then lies in its row);
/// `out` and `p.residual` hold OH × OW values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn padded_plane<const K: usize>(
    p: &Plane,
    padded: &[f32],
    row_len: usize,
    out: &mut [f32],
) {
    let [oh, ow] = p.win.out_hw;
    let [sy, sx] = p.win.stride;
    debug_assert!(ow >= LANES && sx <= 2 && p.win.kernel == [K, K]);
    debug_assert!(padded.len() >= ((oh - 1) * sy + K) * row_len);
    debug_assert!(out.len() >= oh * ow);
    // Where tap kx's run starts in a padded row: column kx, or with column stride 2 index
    // kx / 2 of phase kx % 2 (the row holds its even columns, then its odd ones).
    let phase_w = row_len / sx;
    let st: [usize; K] = std::array::from_fn(|kx| (kx % sx) * phase_w + kx / sx);
    let blocks = ow.div_ceil(LANES);
    let (x, o) = (padded.as_ptr(), out.as_mut_ptr());
    for oy in 0..oh {
        let row = x.add(oy * sy * row_len);
        let mut b = 0;
        while b < blocks {
            let start = |u: usize| ((b + u) * LANES).min(ow - LANES);
            match blocks - b {
                1 => group::<K, 1>(p, row, row_len, &st, [start(0)], o, oy * ow),
                2 => group::<K, 2>(p, row, row_len, &st, [start(0), start(1)], o, oy * ow),
                3 => group::<K, 3>(p, row, row_len, &st, std::array::from_fn(start), o, oy * ow),
                _ => {
                    group::<K, BLOCKS>(p, row, row_len, &st, std::array::from_fn(start), o, oy * ow)
                }
            }
            b += BLOCKS;
        }
    }
}

/// `U` blocks of one output row of [`padded_plane`], from columns `xs`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn group<const K: usize, const U: usize>(
    p: &Plane,
    row: *const f32,
    row_len: usize,
    st: &[usize; K],
    xs: [usize; U],
    o: *mut f32,
    at: usize,
) {
    let mut acc = [_mm256_set1_ps(p.bias); U];
    for ky in 0..K {
        let r = row.add(ky * row_len);
        for (kx, &s) in st.iter().enumerate() {
            let w = _mm256_broadcast_ss(p.k.get_unchecked(ky * K + kx));
            for (a, &x) in acc.iter_mut().zip(&xs) {
                *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(r.add(x + s)), *a);
            }
        }
    }
    for (a, &x) in acc.iter().zip(&xs) {
        finish(p, *a, LANES, o, at + x);
    }
}

/// `evens[j] = src[2j]` and `odds[j] = src[2j + 1]`, for as many as each holds
/// (`evens.len() == src.len().div_ceil(2)`, `odds.len() == src.len() / 2`).
///
/// # Safety
/// The CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn split_even_odd(src: &[f32], evens: &mut [f32], odds: &mut [f32]) {
    debug_assert!(evens.len() == src.len().div_ceil(2) && odds.len() == src.len() / 2);
    let n = src.len();
    let mut block = |j: usize| {
        let a = _mm256_loadu_ps(src.as_ptr().add(2 * j));
        let b = _mm256_loadu_ps(src.as_ptr().add(2 * j + LANES));
        _mm256_storeu_ps(evens.as_mut_ptr().add(j), self::evens(a, b));
        _mm256_storeu_ps(odds.as_mut_ptr().add(j), self::odds(a, b));
    };
    let mut done = 0;
    while done + 2 * LANES <= n {
        block(done / 2);
        done += 2 * LANES;
    }
    // The rest as one more block ending at the last even start, overlapping the one
    // before (it writes the same values), rather than value by value.
    if done < n && n >= 2 * LANES {
        let start = (n - 2 * LANES) & !1;
        block(start / 2);
        done = start + 2 * LANES;
    }
    for (i, &v) in src.iter().enumerate().skip(done) {
        if i % 2 == 0 {
            evens[i / 2] = v;
        } else {
            odds[i / 2] = v;
        }
    }
}
