//! AVX2 depthwise planes, in vectors of 8.
//!
//! - Stride-1 3×3 planes narrower than 28 columns, and 5×5 planes of stride 1 or 2 with
//!   output rows at least 7 wide: a copy whose rows are a whole number of vectors long,
//!   zeros filling each row past its values ([`plane_pitched`]); every tap is then a
//!   plain load at a fixed offset, and output vectors of several rows accumulate
//!   together.
//! - Other stride-1 planes with output rows as wide as the input's, narrower than a
//!   vector (7×7 planes of other kernels): the plane read in place as one flat array
//!   ([`FlatMasks`]); a tap whose lanes reach outside the plane is a masked load
//!   (`vmaskmovps`), whose masked-off lanes read as zero, which is exactly the padding.
//! - Column stride 2 with kernels other than 3×3 and 5×5, or with output rows narrower
//!   than a vector (3×3) or than 7 (5×5): output row by output row, eight columns at a
//!   time, read in place with masked loads; a tap's inputs are the even values of 16
//!   consecutive ones (two loads, a shuffle and a lane permute), and the next tap's are
//!   the odd values of the same two loads.
//!
//! Wider stride-1 3×3 planes take the padded copy, swept by [`padded_plane`], plain loads
//! with several blocks' chains of multiply-adds overlapping (`FLAT_AVX2_BELOW` and
//! `PITCHED_3X3_BELOW` in `depthwise` have the numbers). So do 3×3 planes of column
//! stride 2 with rows of at least a vector, from a copy split into even and odd columns
//! ([`split_even_odd`]; `padded_sweep` in `depthwise`).

use std::arch::x86_64::*;

use super::depthwise::Plane;
use super::depthwise_masks::{FlatMasks, RowMasks};
use super::partial_avx2::{load_first, store_first};
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
    if let Some(r) = p.residual {
        acc = _mm256_add_ps(acc, load_first(r.as_ptr().add(at), n));
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
    store_first(out.add(at), acc, n);
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

/// Zeros before and after a stride-1 pitched copy ([`plane_pitched`]): the first
/// output's leftmost taps read up to `K / 2` values before its first padded row, the last
/// vector's rightmost taps as far past its last.
const GUARD: usize = LANES;

/// The row pitch of [`plane_pitched`]'s copy of a plane of `win`, or `None` where it
/// does not apply. It applies to 3 × 3 and 5 × 5 kernels of stride 1 with output rows as
/// wide as the input's, and of stride 2 in both directions, with output rows at least
/// `LANES - 1` wide (narrower ones would leave most lanes idle).
///
/// Stride 1: the pitch is the row width plus the wider side's padding, rounded up to
/// whole vectors, so each row's zero columns pad both its right end and the next row's
/// left end. Stride 2: each padded row is held as its even padded columns then its odd
/// ones, each part `pitch` long: room for the padding and the input's values, and for
/// every lane the output vectors' taps read.
pub fn pitch(win: &super::ops::Window) -> Option<usize> {
    let [_, w] = win.in_hw;
    let [oh, ow] = win.out_hw;
    let k = win.kernel[0];
    let pl = win.pad_tl[1];
    let fits = win.kernel == [k, k] && matches!(k, 3 | 5) && oh > 0 && ow + 1 >= LANES && pl < k;
    match win.stride {
        [1, 1] if fits && ow == w => Some((w + pl.max(k - 1 - pl)).next_multiple_of(LANES)),
        [2, 2] if fits => {
            let data = pl.div_ceil(2) + w.div_ceil(2 * LANES) * LANES;
            let taps = ow.next_multiple_of(LANES) + (k - 1) / 2;
            Some(data.max(taps).next_multiple_of(LANES))
        }
        _ => None,
    }
}

/// A K × K plane of stride `S` (1, or 2 in both directions) through a copy whose rows
/// are a whole number of vectors long (see [`pitch`]), zeros filling them past the
/// input's values and filling the padding rows above and below, so that every tap of
/// every output vector is a plain load at a fixed offset. Output vectors (⌈OW / 8⌉ per
/// row, the last one's extra lanes computed and dropped) run [`PITCH_BLOCKS`] at a time,
/// so that their multiply-add chains overlap across rows. The kernels this replaces
/// made a mask and a masked load per multiply-add (7 × 7 planes, and rows of stride 2
/// narrower than a vector), or copied each row by a call and ran two vectors of a row
/// at a time.
///
/// Stores go in order, a full vector each: the lanes past a row's end land on the next
/// row's first outputs, which their own vector writes later; only the plane's last
/// vector is cut to the plane.
///
/// # Safety
/// The CPU supports AVX2 and FMA; `pitch == pitch(&p.win)` (not `None`), the kernel is
/// K × K and the stride S × S; `p.x` holds the H × W input, `p.k` K × K taps, `out` and
/// `p.residual` OH × OW values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn plane_pitched<const K: usize, const S: usize>(
    p: &Plane,
    pitch: usize,
    scratch: &mut Vec<f32>,
    out: &mut [f32],
) {
    let [h, w] = p.win.in_hw;
    let [oh, ow] = p.win.out_hw;
    let [pt, pl] = p.win.pad_tl;
    debug_assert_eq!(Some(pitch), self::pitch(&p.win));
    debug_assert!(p.win.kernel == [K, K] && p.win.stride == [S, S]);
    debug_assert!(out.len() >= oh * ow);
    let rows = (oh - 1) * S + K;
    // A padded row's length: its values (stride 1), or both column phases (stride 2).
    let row_len = S * pitch;
    let guard = if S == 1 { GUARD } else { 0 };
    let len = guard + rows * row_len + guard;
    if scratch.len() < len {
        scratch.resize(len, 0.0);
    }
    let buf = scratch.as_mut_ptr();
    let zero = _mm256_setzero_ps();
    if S == 1 {
        _mm256_storeu_ps(buf, zero);
        _mm256_storeu_ps(buf.add(len - GUARD), zero);
    }
    // Every value the taps read is written below, whatever the scratch held.
    let (full, tail) = (w / LANES, w % LANES);
    // A row's last values (stride 1): all but the last row read a whole vector (it ends
    // inside the plane, the rows being at least 7 wide) and keep the row's lanes.
    let keep_tail = _mm256_castsi256_ps(lane_mask(first_lanes(tail)));
    // Stride 2: where input column 0 lands (its padded column pl: phase pl % 2, index
    // pl / 2), and column 1.
    let even_at = (pl % 2) * pitch + pl / 2;
    let odd_at = ((pl + 1) % 2) * pitch + pl.div_ceil(2);
    let x = p.x.as_ptr();
    for r in 0..rows {
        let d = buf.add(guard + r * row_len);
        let input = r.checked_sub(pt).filter(|&iy| iy < h);
        if S == 1 {
            let mut j = 0;
            if let Some(iy) = input {
                let s = x.add(iy * w);
                while j < full {
                    _mm256_storeu_ps(d.add(j * LANES), _mm256_loadu_ps(s.add(j * LANES)));
                    j += 1;
                }
                if tail > 0 {
                    let v = if iy + 1 < h {
                        _mm256_and_ps(_mm256_loadu_ps(s.add(j * LANES)), keep_tail)
                    } else {
                        load_first(s.add(j * LANES), tail)
                    };
                    _mm256_storeu_ps(d.add(j * LANES), v);
                    j += 1;
                }
            }
            while j * LANES < row_len {
                _mm256_storeu_ps(d.add(j * LANES), zero);
                j += 1;
            }
            continue;
        }
        for j in 0..row_len / LANES {
            _mm256_storeu_ps(d.add(j * LANES), zero);
        }
        let Some(iy) = input else { continue };
        let s = x.add(iy * w);
        // 16 input values at a time split into their 8 even and 8 odd columns; past the
        // row's end the loads read zeros, which go to the zero columns.
        for (m, c) in (0..w).step_by(2 * LANES).enumerate() {
            let n = w - c;
            let (a, b) = if n >= 2 * LANES {
                (_mm256_loadu_ps(s.add(c)), _mm256_loadu_ps(s.add(c + LANES)))
            } else {
                (
                    load_first(s.add(c), n),
                    load_first(s.add(c + LANES), n.saturating_sub(LANES)),
                )
            };
            _mm256_storeu_ps(d.add(even_at + m * LANES), evens(a, b));
            _mm256_storeu_ps(d.add(odd_at + m * LANES), odds(a, b));
        }
    }
    // Stride 1: tap kx of output column x reads padded column x + kx - pl, its row's
    // zeros standing for the padding; stride 2: the padding is in the copy.
    let src = if S == 1 { buf.add(GUARD - pl) } else { buf };
    let per_row = ow.div_ceil(LANES);
    let total = oh * per_row;
    let o = out.as_mut_ptr();
    let mut g = PitchGroup {
        src,
        row_len,
        phase: pitch,
        per_row,
        ow,
        plane: oh * ow,
        row: 0,
        col: 0,
    };
    let mut v = 0;
    while v < total {
        match total - v {
            1 => g.run::<K, S, 1>(p, o),
            2 => g.run::<K, S, 2>(p, o),
            3 => g.run::<K, S, 3>(p, o),
            4 => g.run::<K, S, 4>(p, o),
            5 => g.run::<K, S, 5>(p, o),
            6 => g.run::<K, S, 6>(p, o),
            7 => g.run::<K, S, 7>(p, o),
            _ => g.run::<K, S, PITCH_BLOCKS>(p, o),
        }
        v += PITCH_BLOCKS;
    }
}

/// Output vectors accumulated together by [`plane_pitched`].
const PITCH_BLOCKS: usize = 8;

/// Where [`plane_pitched`]'s next output vectors are: vector `col` of output row `row`
/// (`per_row` to a row), and what locates them in the copy: padded rows `row_len`
/// apart, with stride 2 the odd columns `phase` after the even ones.
struct PitchGroup {
    src: *const f32,
    row_len: usize,
    phase: usize,
    per_row: usize,
    ow: usize,
    plane: usize,
    row: usize,
    col: usize,
}

impl PitchGroup {
    /// The next `U` output vectors, which it moves past.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn run<const K: usize, const S: usize, const U: usize>(
        &mut self,
        p: &Plane,
        o: *mut f32,
    ) {
        // (where the vector reads its first tap, where it stores)
        let mut at = [(0usize, 0usize); U];
        for a in &mut at {
            *a = (
                self.row * S * self.row_len + self.col * LANES,
                self.row * self.ow + self.col * LANES,
            );
            self.col += 1;
            if self.col == self.per_row {
                (self.row, self.col) = (self.row + 1, 0);
            }
        }
        let mut acc = [_mm256_set1_ps(p.bias); U];
        for ky in 0..K {
            let r = self.src.add(ky * self.row_len);
            for kx in 0..K {
                // Stride 2: padded column 2x + kx is index x + kx / 2 of phase kx % 2.
                let tap = r.add((kx % S) * self.phase + kx / S);
                let wv = _mm256_broadcast_ss(p.k.get_unchecked(ky * K + kx));
                for (a, &(i, _)) in acc.iter_mut().zip(&at) {
                    *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(tap.add(i)), *a);
                }
            }
        }
        for (a, &(_, s)) in acc.iter().zip(&at) {
            finish(p, *a, (self.plane - s).min(LANES), o, s);
        }
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
