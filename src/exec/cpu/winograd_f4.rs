//! The transforms of Winograd's F(4×4, 3×3), which [`super::winograd`] runs beside
//! F(2×2, 3×3) on the same GEMMs.
//!
//! Each 4×4 block of outputs comes from the 6×6 input patch under it: 36 GEMMs (one per
//! element ξ of the 6×6 grid) over a quarter of F(2×2, 3×3)'s tiles, so 36/16 = 2.25
//! multiply-adds per output and channel pair where F(2×2, 3×3) does 4 and the direct
//! convolution 9. The price: `U` holds 36/9 = 4× the direct weights' bytes (F(2×2, 3×3):
//! 16/9), the transforms take more adds per value, and the rounding error grows (the
//! transforms' constants reach 8 and 1/24).
//!
//! With `d` a 6×6 patch, `g` a 3×3 filter and `M` the sum over input channels of
//! `U ⊙ V`:
//!
//! ```text
//!      ⎡4  0 -5  0  1  0⎤        ⎡ 1/4    0     0 ⎤
//!      ⎢0 -4 -4  1  1  0⎥        ⎢-1/6  -1/6  -1/6⎥        ⎡1 1  1 1  1 0⎤
//! Bᵀ = ⎢0  4 -4 -1  1  0⎥    G = ⎢-1/6   1/6  -1/6⎥   Aᵀ = ⎢0 1 -1 2 -2 0⎥
//!      ⎢0 -2 -1  2  1  0⎥        ⎢1/24  1/12   1/6⎥        ⎢0 1  1 4  4 0⎥
//!      ⎢0  2 -1 -2  1  0⎥        ⎢1/24 -1/12   1/6⎥        ⎣0 1 -1 8 -8 1⎦
//!      ⎣0  4  0 -5  0  1⎦        ⎣  0     0     1 ⎦
//!
//! V = Bᵀ d B,   U = G g Gᵀ,   Y = Aᵀ M A
//! ```
//!
//! Every constant of `Bᵀ` and `Aᵀ` is a power of two or a sum of two terms written as
//! one, so each step is `a ± b` or `k · a + b` with `k` a power of two, which rounds once
//! whether fused or not: the vector transforms and the portable ones (the reference
//! they are tested against) agree bit for bit.

use super::gemm::{Isa, OutPtr, Residual, NR};
#[cfg(target_arch = "x86_64")]
use super::lanes::{Lanes, Ymm, Zmm};
use super::winograd::{row_span, tile_rows, Algorithm, Back, Dest, Scratch, COLS};
#[cfg(target_arch = "x86_64")]
use super::winograd::{store_row_part, store_straight, store_tiles};

/// Elements of the transformed 6×6 grid: GEMMs per convolution.
pub const XI4: usize = 36;

/// Widest tile row served (the widest output row is [`super::winograd::MAX_WIDTH`]).
const MAX_TW4: usize = super::winograd::MAX_WIDTH / 4;
const _: () = assert!(MAX_TW4 + 16 <= COLS);

/// `U = G g Gᵀ` of one 3×3 filter `g` (row-major), `[ξ]` with ξ = 6 · i + j, computed in
/// f64 and rounded once.
pub fn filter_transform(g: &[f32]) -> [f32; XI4] {
    const G: [[f64; 3]; 6] = [
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    let mut gg = [[0f64; 3]; 6];
    for (row, gi) in gg.iter_mut().zip(&G) {
        for (c, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|r| gi[r] * f64::from(g[3 * r + c])).sum();
        }
    }
    let mut out = [0f32; XI4];
    for (i, row) in gg.iter().enumerate() {
        for (j, gj) in G.iter().enumerate() {
            out[6 * i + j] = (0..3).map(|c| row[c] * gj[c]).sum::<f64>() as f32;
        }
    }
    out
}

/// The arithmetic of the transforms, on one value or a vector of them.
trait Arith: Copy {
    /// # Safety
    /// The CPU has the type's features.
    unsafe fn add(self, b: Self) -> Self;
    /// # Safety
    /// As for `add`.
    unsafe fn sub(self, b: Self) -> Self;
    /// `k · self + b` for `k` a power of two (exact, so fused or not the same).
    ///
    /// # Safety
    /// As for `add`.
    unsafe fn kadd(self, k: f32, b: Self) -> Self;
}

impl Arith for f32 {
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        self + b
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        self - b
    }
    #[inline(always)]
    unsafe fn kadd(self, k: f32, b: Self) -> Self {
        k * self + b
    }
}

#[cfg(target_arch = "x86_64")]
impl<V: Lanes> Arith for V {
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        V::add(self, b)
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        V::sub(self, b)
    }
    #[inline(always)]
    unsafe fn kadd(self, k: f32, b: Self) -> Self {
        V::fmadd(self, V::splat(k), b)
    }
}

/// `Bᵀ d` of six values.
#[inline(always)]
unsafe fn b_t<T: Arith>([d0, d1, d2, d3, d4, d5]: [T; 6]) -> [T; 6] {
    let e42 = d4.sub(d2);
    let e31 = d3.sub(d1);
    [
        d0.sub(d2).kadd(4.0, e42),
        d1.add(d2).kadd(-4.0, d3.add(d4)),
        d1.sub(d2).kadd(4.0, d4.sub(d3)),
        e31.kadd(2.0, e42),
        e31.kadd(-2.0, e42),
        d1.sub(d3).kadd(4.0, d5.sub(d3)),
    ]
}

/// `Aᵀ m` of six values.
#[inline(always)]
unsafe fn a_t<T: Arith>([m0, m1, m2, m3, m4, m5]: [T; 6]) -> [T; 4] {
    let (s12, d12) = (m1.add(m2), m1.sub(m2));
    let (s34, d34) = (m3.add(m4), m3.sub(m4));
    [
        m0.add(s12).add(s34),
        d34.kadd(2.0, d12),
        s34.kadd(4.0, s12),
        d34.kadd(8.0, d12).add(m5),
    ]
}

/// Transforms one input plane into its [`Dest`], as [`super::winograd`]'s input transform
/// does for F(2×2, 3×3).
///
/// # Safety
/// As for that transform: `v` holds `XI4 · panels · kc · NR` floats, and no other thread
/// writes the lanes this plane's tiles take.
pub(super) unsafe fn input_transform(
    isa: Isa,
    scratch: &mut Scratch,
    plane: &[f32],
    hw: [usize; 2],
    to: Dest,
) {
    let (th, tw) = Algorithm::F4.tiles(hw[0], hw[1]);
    assert!(tw <= MAX_TW4 && to.range[0] < to.range[1] && to.range[1] <= th * tw);
    assert!(plane.len() >= hw[0] * hw[1]);
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => return input_transform_avx512(scratch, plane, hw, to),
        Isa::Portable => {}
        _ => return input_transform_avx2(scratch, plane, hw, to),
    }
    let _ = (isa, scratch);
    input_transform_body(plane, hw, to)
}

/// The portable input transform, tile by tile: the reference of the vector one, with the
/// same operations in the same order (each patch row by [`b_t`], then each column).
#[allow(clippy::needless_range_loop)] // j picks the same column of six rows
unsafe fn input_transform_body(plane: &[f32], [h, w]: [usize; 2], to: Dest) {
    let tw = Algorithm::F4.tiles(h, w).1;
    let at = |y: usize, x: usize| {
        let (y, x) = (y.wrapping_sub(1), x.wrapping_sub(1));
        if y < h && x < w {
            plane[y * w + x]
        } else {
            0.0
        }
    };
    let v_xi = to.v_xi();
    for t in to.range[0]..to.range[1] {
        let (ty, tx) = (t / tw, t % tw);
        let rows: [[f32; 6]; 6] =
            std::array::from_fn(|r| b_t(std::array::from_fn(|c| at(4 * ty + r, 4 * tx + c))));
        let lane = to.first_tile + t - to.range[0];
        let (p, lane) = (lane / NR, lane % NR);
        for j in 0..6 {
            let col = b_t(std::array::from_fn(|r| rows[r][j]));
            for (i, v) in col.into_iter().enumerate() {
                *to.v
                    .get()
                    .add((6 * i + j) * v_xi + (p * to.kc + to.ci) * NR + lane) = v;
            }
        }
    }
    if let Some((p, lane)) = to.tail() {
        for xi in 0..XI4 {
            let at = to.v.get().add(xi * v_xi + (p * to.kc + to.ci) * NR + lane);
            std::slice::from_raw_parts_mut(at, NR - lane).fill(0.0);
        }
    }
}

/// One padded input row's column transform: `[j][tile column]`.
pub(super) type ColRow6 = [[f32; COLS]; 6];

/// The input transform in vectors of tile columns. A padded row is split twice into
/// even and odd columns, so that each of a tile's six columns (4·tx .. 4·tx + 6) is a
/// contiguous vector over tx; every padded row's column transform is kept (a row serves
/// two tile rows), then each tile row's six rows combined, the plane's transformed tiles
/// written to a buffer whole and copied into the panels in runs; with AVX-512 over rows of
/// more than 8 tiles, stored straight into the panels instead, as F(2×2, 3×3)'s are (see
/// `super::winograd`'s `input_transform_vec`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // j picks the same column of six rows, i one of six ξ
unsafe fn input_transform_vec<V: Lanes>(
    scratch: &mut Scratch,
    plane: &[f32],
    [h, w]: [usize; 2],
    to: Dest,
) {
    let lanes = V::N;
    let tw = Algorithm::F4.tiles(h, w).1;
    let [ty0, ty1] = tile_rows(to.range, tw);
    let th = ty1 - ty0;
    let prows = 4 * th + 2;
    let cols = &mut scratch.cols6;
    if cols.len() < prows {
        cols.resize(prows, [[0f32; COLS]; 6]);
    }
    // Padded column p is input column p - 1, zero outside the row, loaded from the
    // plane with masks and split in registers, rather than through a copy of the row
    // and arrays of its even and odd columns, each load straddling stores just made.
    // In process, the way switched pass by pass (30 pairs, 2 threads, batch 1): the
    // 56 × 56 layers of ResNet-18 and ResNet-50 took 0.88–0.93 of their time (dense and
    // at budget 0.5).
    for (r, c) in cols[..prows].iter_mut().enumerate() {
        let y = (4 * ty0 + r).wrapping_sub(1);
        if y >= h {
            for cj in c.iter_mut() {
                cj[..tw].fill(0.0);
            }
            continue;
        }
        let row = plane[y * w..(y + 1) * w].as_ptr();
        for x in (0..tw).step_by(lanes) {
            // Padded columns 4·x on: their even and odd ones, and those again, give
            // columns 4·tx + j for j < 4; j = 4, 5 are the next tile's 0 and 1 (the
            // last from the vector after).
            let q = [0, 1, 2, 3, 4].map(|k| V::load_padded(row, w, 4 * x + k * lanes));
            let (e01, o01) = V::split_pair(q[0], q[1]);
            let (e23, o23) = V::split_pair(q[2], q[3]);
            let (d0, d2) = V::split_pair(e01, e23);
            let (d1, d3) = V::split_pair(o01, o23);
            let (d4, d5) = (V::shift_in::<0>(d0, q[4]), V::shift_in::<1>(d1, q[4]));
            let t = b_t([d0, d1, d2, d3, d4, d5]);
            for j in 0..6 {
                V::store(c[j].as_mut_ptr().add(x), t[j]);
            }
        }
    }
    if V::N == 16 && 2 * tw > V::N {
        return store_straight(&cols[..prows], th, tw, ty0, &to, |d: [V; 6]| b_t(d));
    }
    // [ξ][tile of tile rows ty0..ty1], a vector's room past the last tile.
    let t_one = th * tw;
    let stride = t_one + lanes;
    let buf = &mut scratch.tiles;
    if buf.len() < XI4 * stride {
        buf.resize(XI4 * stride, 0.0);
    }
    let bp = buf.as_mut_ptr();
    for ty in 0..th {
        let rows = &cols[4 * ty..4 * ty + 6];
        for j in 0..6 {
            let [r0, r1, r2, r3, r4, r5] = [0, 1, 2, 3, 4, 5].map(|k| rows[k][j].as_ptr());
            for x in (0..tw).step_by(lanes) {
                let (d0, d1, d2) = (V::load(r0.add(x)), V::load(r1.add(x)), V::load(r2.add(x)));
                let (d3, d4, d5) = (V::load(r3.add(x)), V::load(r4.add(x)), V::load(r5.add(x)));
                let col = b_t([d0, d1, d2, d3, d4, d5]);
                for i in 0..6 {
                    V::store(bp.add((6 * i + j) * stride + ty * tw + x), col[i]);
                }
            }
        }
    }
    store_tiles::<V>(bp, stride, to.range[0] - ty0 * tw, XI4, to);
}

/// [`input_transform_vec`] in AVX2 vectors of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn input_transform_avx2(scratch: &mut Scratch, plane: &[f32], hw: [usize; 2], to: Dest) {
    input_transform_vec::<Ymm>(scratch, plane, hw, to)
}

/// [`input_transform_vec`] in AVX-512 vectors of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_transform_avx512(scratch: &mut Scratch, plane: &[f32], hw: [usize; 2], to: Dest) {
    input_transform_vec::<Zmm>(scratch, plane, hw, to)
}

/// Transforms one output row's `M` back into its plane, as [`super::winograd`]'s output
/// transform does for F(2×2, 3×3).
///
/// # Safety
/// As for that transform; `b.m` holds `(XI4 - 1) · m_xi + row_at + tiles + 7` floats.
pub(super) unsafe fn output_transform(isa: Isa, b: Back, dst: OutPtr) {
    let (th, tw) = Algorithm::F4.tiles(b.hw[0], b.hw[1]);
    let count = b.range[1] - b.range[0];
    assert!(b.range[0] < b.range[1] && b.range[1] <= th * tw && tw <= MAX_TW4);
    assert!(b.m.len() >= (XI4 - 1) * b.m_xi + b.row_at + count + 7);
    if let Residual::Apart(res) = b.residual {
        assert!(res.len() >= b.hw[0] * b.hw[1]);
    }
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 => return output_transform_avx512(b, dst),
        Isa::Portable => {}
        _ => return output_transform_avx2(b, dst),
    }
    let _ = isa;
    output_transform_body(b, dst)
}

/// The portable output transform, tile by tile: the reference of the vector one (each
/// column of `M` by [`a_t`], then each row, then the bias).
#[allow(clippy::needless_range_loop)] // a picks the same row of six columns
unsafe fn output_transform_body(b: Back, dst: OutPtr) {
    let [h, w] = b.hw;
    let tw = Algorithm::F4.tiles(h, w).1;
    let d = dst.get();
    for t in b.range[0]..b.range[1] {
        let (ty, tx) = (t / tw, t % tw);
        let at = b.row_at + t - b.range[0];
        let cols: [[f32; 4]; 6] =
            std::array::from_fn(|j| a_t(std::array::from_fn(|i| b.m[(6 * i + j) * b.m_xi + at])));
        for a in 0..4 {
            let oy = 4 * ty + a;
            if oy >= h {
                break;
            }
            let y = a_t(std::array::from_fn(|j| cols[j][a]));
            for (c, yc) in y.into_iter().enumerate() {
                let ox = 4 * tx + c;
                if ox >= w {
                    break;
                }
                let i = oy * w + ox;
                let mut v = yc + b.bias;
                match b.residual {
                    Residual::InOut => v += *d.add(i),
                    Residual::Apart(res) => v += res[i],
                    Residual::None => {}
                }
                *d.add(i) = b.act.apply(v);
            }
        }
    }
}

/// The output transform in vectors of tile columns: per vector, each of the six columns
/// of `M` combined over its rows, then each output row's four values per tile
/// interleaved into place and stored with bias, residual and activation.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // i and j pick ξ = 6 · i + j, a the same row of six columns
unsafe fn output_transform_vec<V: Lanes>(b: Back, dst: OutPtr) {
    let lanes = V::N;
    let (m, m_xi, row_at, [h, w]) = (b.m, b.m_xi, b.row_at, b.hw);
    let tw = Algorithm::F4.tiles(h, w).1;
    let (mp, bv) = (m.as_ptr(), V::splat(b.bias));
    let dp = dst.get();
    let [ty0, ty1] = tile_rows(b.range, tw);
    for ty in ty0..ty1 {
        let base = (row_at + ty * tw).wrapping_sub(b.range[0]);
        let [from, to] = row_span(b.range, tw, ty);
        let end = (4 * to).min(w);
        for x in (from..to).step_by(lanes) {
            let (at, n) = (mp.add(base.wrapping_add(x)), to - x);
            let mut cols = [[V::zero(); 4]; 6];
            for j in 0..6 {
                let mut m6 = [V::zero(); 6];
                for i in 0..6 {
                    m6[i] = V::load_upto(at.add((6 * i + j) * m_xi), n);
                }
                cols[j] = a_t(m6);
            }
            for a in 0..4 {
                let oy = 4 * ty + a;
                if oy >= h {
                    break;
                }
                let mut r6 = [V::zero(); 6];
                for j in 0..6 {
                    r6[j] = cols[j][a];
                }
                let y = a_t(r6);
                let (y0, y1) = (V::add(y[0], bv), V::add(y[1], bv));
                let (y2, y3) = (V::add(y[2], bv), V::add(y[3], bv));
                // Output columns 4·tx + c from y_c: two interleaves.
                let [p0, p1] = V::interleave(y0, y2);
                let [q0, q1] = V::interleave(y1, y3);
                let [o0, o1] = V::interleave(p0, q0);
                let [o2, o3] = V::interleave(p1, q1);
                for (k, v) in [o0, o1, o2, o3].into_iter().enumerate() {
                    let ox = 4 * x + lanes * k;
                    if ox >= end {
                        break;
                    }
                    store_row_part(dp, oy * w + ox, end - ox, v, b.residual, b.act);
                }
            }
        }
    }
}

/// [`output_transform_vec`] in AVX2 vectors of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn output_transform_avx2(b: Back, dst: OutPtr) {
    output_transform_vec::<Ymm>(b, dst)
}

/// [`output_transform_vec`] in AVX-512 vectors of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_transform_avx512(b: Back, dst: OutPtr) {
    output_transform_vec::<Zmm>(b, dst)
}
