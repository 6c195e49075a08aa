//! AVX-512 depthwise planes read straight from the input, with no padded copy: each
//! tap is a masked load whose lanes outside the plane read as zero, which is exactly the
//! zero padding. A plane is a few hundred multiply-adds on the late layers (7×7 and
//! 14×14), so what the copy and its bookkeeping cost per plane is what these avoid.
//!
//! - Stride 1 with output rows as wide as the input's: the plane is one flat array, and
//!   tap (ky, kx) of output `i` reads input `i + (ky − top)·W + (kx − left)`. Sixteen
//!   outputs at a time cross row ends, so a 7×7 plane is four vectors, not seven
//!   part-filled rows; which lanes of a block a tap may read depends only on the layer's
//!   geometry ([`FlatMasks`], made once per layer).
//! - Otherwise with a column stride of 1 or 2: output row by output row, sixteen columns
//!   at a time; with stride 2 a tap's inputs are every other value of 32 consecutive
//!   ones, taken with one two-vector permute, and the next tap's are the values between
//!   them: the same two loads serve both (without masks inside the row). Against a load
//!   pair per tap, one thread, alternating runs: 112→56 3×3 planes 0.80 of the time,
//!   56→28 0.91, 5×5 0.72–0.78; 28→14 and 14→7 unchanged within the noise.

use std::arch::x86_64::*;

use super::depthwise::Plane;
use super::depthwise_masks::{FlatMasks, RowMasks};
use super::lanes::first_lanes;
use crate::model::Act;

/// Outputs per vector.
const LANES: usize = 16;

/// Blocks of outputs accumulated together, so that the multiply-add chains of several
/// blocks overlap.
const BLOCKS: usize = 4;

/// Bias is in `acc`; adds the residual, applies the activation, subtracts the shift and
/// stores the lanes of `mask` at `out[at..]`.
#[inline(always)]
unsafe fn finish(p: &Plane, mut acc: __m512, mask: u16, out: *mut f32, at: usize) {
    if let Some(r) = p.residual {
        acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(mask, r.as_ptr().add(at)));
    }
    let zero = _mm512_setzero_ps();
    acc = match p.act {
        Act::None => acc,
        Act::Relu => _mm512_max_ps(acc, zero),
        Act::Relu6 => _mm512_min_ps(_mm512_max_ps(acc, zero), _mm512_set1_ps(6.0)),
    };
    if p.shift != 0.0 {
        acc = _mm512_sub_ps(acc, _mm512_set1_ps(p.shift));
    }
    _mm512_mask_storeu_ps(out.add(at), mask, acc);
}

/// A flat stride-1 plane (see [`FlatMasks`]) into `out` (OH × OW).
///
/// # Safety
/// The CPU supports AVX-512F; `p.x` holds the layer's H × W input, `p.k` its kh × kw
/// taps, and `out` and `p.residual` OH × OW values, for the window `m` was made from.
#[target_feature(enable = "avx512f")]
pub unsafe fn plane_flat(p: &Plane, m: &FlatMasks, out: &mut [f32]) {
    debug_assert_eq!(out.len(), m.outputs);
    match m.kernel {
        [3, 3] => flat::<9>(p, m, out),
        [5, 5] => flat::<25>(p, m, out),
        _ => flat_any(p, m, out),
    }
}

/// [`plane_flat`] with the tap count known, so that the taps unroll and their weights
/// and offsets stay in registers.
#[target_feature(enable = "avx512f")]
unsafe fn flat<const T: usize>(p: &Plane, m: &FlatMasks, out: &mut [f32]) {
    let w: [__m512; T] = std::array::from_fn(|t| _mm512_set1_ps(p.k[t]));
    let off: [isize; T] = std::array::from_fn(|t| m.offs[t]);
    let blocks = m.outputs.div_ceil(LANES);
    let (x, o, masks) = (p.x.as_ptr(), out.as_mut_ptr(), m.masks.as_ptr());
    let mut q = 0;
    while q + BLOCKS <= blocks {
        let mut acc = [_mm512_set1_ps(p.bias); BLOCKS];
        for t in 0..T {
            for (u, a) in acc.iter_mut().enumerate() {
                let b = q + u;
                // Lanes outside the plane are masked off, so the address they would
                // have (possibly outside the slice) is never read.
                let v = _mm512_maskz_loadu_ps(
                    *masks.add(b * T + t),
                    x.wrapping_offset((b * LANES) as isize + off[t]),
                );
                *a = _mm512_fmadd_ps(w[t], v, *a);
            }
        }
        for (u, a) in acc.iter().enumerate() {
            let at = (q + u) * LANES;
            finish(p, *a, first_lanes(m.outputs - at), o, at);
        }
        q += BLOCKS;
    }
    for b in q..blocks {
        let mut a = _mm512_set1_ps(p.bias);
        for t in 0..T {
            let v = _mm512_maskz_loadu_ps(
                *masks.add(b * T + t),
                x.wrapping_offset((b * LANES) as isize + off[t]),
            );
            a = _mm512_fmadd_ps(w[t], v, a);
        }
        let at = b * LANES;
        finish(p, a, first_lanes(m.outputs - at), o, at);
    }
}

/// [`flat`] for any kernel size.
#[target_feature(enable = "avx512f")]
unsafe fn flat_any(p: &Plane, m: &FlatMasks, out: &mut [f32]) {
    let taps = m.offs.len();
    let (x, o) = (p.x.as_ptr(), out.as_mut_ptr());
    for b in 0..m.outputs.div_ceil(LANES) {
        let mut a = _mm512_set1_ps(p.bias);
        for t in 0..taps {
            let v = _mm512_maskz_loadu_ps(
                m.masks[b * taps + t],
                x.wrapping_offset((b * LANES) as isize + m.offs[t]),
            );
            a = _mm512_fmadd_ps(_mm512_set1_ps(p.k[t]), v, a);
        }
        let at = b * LANES;
        finish(p, a, first_lanes(m.outputs - at), o, at);
    }
}

/// A plane of column stride `SX` (1 or 2), row by row, into `out` (OH × OW).
///
/// # Safety
/// The CPU supports AVX-512F; `p.x` holds `p.win`'s H × W input, `p.k` its kh × kw taps,
/// and `out` and `p.residual` OH × OW values; `p.win.stride[1] == SX`, and `m` was made
/// from `p.win`.
#[target_feature(enable = "avx512f")]
pub unsafe fn plane_rows<const SX: usize>(p: &Plane, m: &RowMasks, out: &mut [f32]) {
    debug_assert_eq!(p.win.stride[1], SX);
    match p.win.kernel {
        [3, 3] => rows::<SX, 3>(p, m, out),
        [5, 5] => rows::<SX, 5>(p, m, out),
        _ => rows::<SX, 0>(p, m, out),
    }
}

/// [`plane_rows`] for K × K kernels, or with `K` 0 any kernel.
#[target_feature(enable = "avx512f")]
unsafe fn rows<const SX: usize, const K: usize>(p: &Plane, m: &RowMasks, out: &mut [f32]) {
    let win = &p.win;
    let [h, w] = win.in_hw;
    let [oh, ow] = win.out_hw;
    let [kh, kw] = if K == 0 { win.kernel } else { [K, K] };
    let sy = win.stride[0];
    let [top, left] = win.pad_tl;
    let (x, o) = (p.x.as_ptr(), out.as_mut_ptr());
    // Lane j takes value 2j of the pair (lo, hi): every other column.
    let even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    let odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for oy in 0..oh {
        for (c, ox0) in (0..ow).step_by(LANES).enumerate() {
            let (lo, hi) = (&m.lo[c * kw..(c + 1) * kw], &m.hi[c * kw..(c + 1) * kw]);
            // Three chains of multiply-adds (by tap column) rather than one: a single
            // chain would wait out the latency of every multiply-add in turn.
            let mut acc = [
                _mm512_set1_ps(p.bias),
                _mm512_setzero_ps(),
                _mm512_setzero_ps(),
            ];
            for ky in 0..kh {
                let Some(iy) = (oy * sy + ky).checked_sub(top).filter(|&iy| iy < h) else {
                    continue;
                };
                let row = x.add(iy * w);
                if SX == 2 && K > 0 {
                    // Taps kx and kx + 1 take the even and the odd values of the same
                    // 32: two loads serve both (the masks of kx cover both, being
                    // per input column); inside the row, without masks.
                    for kx in (0..K).step_by(2) {
                        let start = (ox0 * 2 + kx) as isize - left as isize;
                        let (ml, mh) = (lo[kx], hi[kx]);
                        let (a, b) = if ml == u16::MAX && mh == u16::MAX {
                            let a = _mm512_loadu_ps(row.offset(start));
                            (a, _mm512_loadu_ps(row.offset(start + LANES as isize)))
                        } else {
                            // Masked-off lanes (outside the row) are never read.
                            let a = _mm512_maskz_loadu_ps(ml, row.wrapping_offset(start));
                            let b = row.wrapping_offset(start + LANES as isize);
                            (a, _mm512_maskz_loadu_ps(mh, b))
                        };
                        let wv = _mm512_set1_ps(*p.k.get_unchecked(ky * K + kx));
                        let v = _mm512_permutex2var_ps(a, even, b);
                        acc[kx % 3] = _mm512_fmadd_ps(wv, v, acc[kx % 3]);
                        if kx + 1 < K {
                            let wv = _mm512_set1_ps(*p.k.get_unchecked(ky * K + kx + 1));
                            let v = _mm512_permutex2var_ps(a, odd, b);
                            acc[(kx + 1) % 3] = _mm512_fmadd_ps(wv, v, acc[(kx + 1) % 3]);
                        }
                    }
                    continue;
                }
                for kx in 0..kw {
                    let wv = _mm512_set1_ps(*p.k.get_unchecked(ky * kw + kx));
                    let start = (ox0 * SX + kx) as isize - left as isize;
                    // Masked-off lanes (outside the row) are never read.
                    let v = _mm512_maskz_loadu_ps(lo[kx], row.wrapping_offset(start));
                    let v = if SX == 1 {
                        v
                    } else {
                        let next = _mm512_maskz_loadu_ps(
                            hi[kx],
                            row.wrapping_offset(start + LANES as isize),
                        );
                        _mm512_permutex2var_ps(v, even, next)
                    };
                    acc[kx % 3] = _mm512_fmadd_ps(wv, v, acc[kx % 3]);
                }
            }
            let acc = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), acc[2]);
            finish(p, acc, first_lanes(ow - ox0), o, oy * ow + ox0);
        }
    }
}
