//! AVX2 depthwise convolution of eight planes at once, one channel per vector lane.
//!
//! The plane-by-plane kernels put a plane's columns in the vector, which leaves lanes
//! idle on short rows, needs masks or shuffles at the edges and for stride 2, and pays a
//! fixed cost per plane that small planes (7×7, 14×14) cannot spread. Here eight planes
//! are transposed into one zero-padded buffer whose cell `(y, x)` is a vector of the
//! eight channels' values: every tap of every output is then one plain load and one
//! multiply-add with that tap's eight weights, at any stride and with no edge cases, and
//! the outputs are transposed back into their planes with the epilogue (residual,
//! activation, shift). The transposes cost about as much as the multiply-adds of a 3×3
//! window; the plane-by-plane kernels' edges cost more on small planes.

use std::arch::x86_64::*;

use super::ops::Window;
use super::partial_avx2::{load_first, store_first};
use crate::model::Act;

/// Planes per group: the lanes of a vector.
pub const LANES: usize = 8;

/// Eight planes' operands, one per lane. Lanes from `n` on are padding: they read lane
/// 0's operands and are never stored.
pub struct Group {
    /// Planes in use (1..=8).
    pub n: usize,
    /// Each lane's input plane (`in_hw`).
    pub x: [*const f32; LANES],
    /// Each lane's kernel (`kernel[0] × kernel[1]`).
    pub k: [*const f32; LANES],
    pub bias: [f32; LANES],
    /// Subtracted from each lane's outputs after the activation.
    pub shift: [f32; LANES],
    /// Each lane's residual plane (`out_hw`), added before the activation.
    pub residual: Option<[*const f32; LANES]>,
    /// Each lane's output plane (`out_hw`).
    pub out: [*mut f32; LANES],
}

/// Whether [`group`] runs this window: 3×3 and 5×5 kernels of stride 1 or 2.
pub fn supports(win: &Window) -> bool {
    matches!(win.kernel, [3, 3] | [5, 5]) && matches!(win.stride, [1, 1] | [2, 2])
}

/// Bytes of the buffer a group of `win` takes: its interleaved padded input and output.
pub fn scratch_bytes(win: &Window) -> usize {
    let [oh, ow] = win.out_hw;
    let (ph, pw) = (
        (oh.max(1) - 1) * win.stride[0] + win.kernel[0],
        (ow.max(1) - 1) * win.stride[1] + win.kernel[1],
    );
    (ph * pw + (oh * ow).next_multiple_of(LANES)) * LANES * std::mem::size_of::<f32>()
}

/// Convolves one group of planes of `win` (which [`supports`] accepts); `scratch` is
/// the caller's reusable buffer.
///
/// # Safety
/// The CPU supports AVX2 and FMA; each lane below `g.n` points at a whole plane of its
/// kind (input, kernel, residual, output) and no two lanes' outputs overlap.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn group(win: &Window, g: &Group, act: Act, scratch: &mut Vec<f32>) {
    match (win.kernel[0], win.stride[0]) {
        (3, 1) => run::<3, 1>(win, g, act, scratch),
        (3, _) => run::<3, 2>(win, g, act, scratch),
        (_, 1) => run::<5, 1>(win, g, act, scratch),
        _ => run::<5, 2>(win, g, act, scratch),
    }
}

/// Rows of an 8 × 8 block become its columns.
#[inline(always)]
unsafe fn transpose(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Outputs of one row accumulated together, so that their chains of multiply-adds
/// overlap: with two multiply-adds issued per cycle and four cycles' latency, eight
/// chains keep the units busy.
const BLOCK: usize = 8;

#[target_feature(enable = "avx2,fma")]
unsafe fn run<const K: usize, const S: usize>(
    win: &Window,
    g: &Group,
    act: Act,
    scratch: &mut Vec<f32>,
) {
    let ([ih, iw], [oh, ow], [pt, pl]) = (win.in_hw, win.out_hw, win.pad_tl);
    if oh == 0 || ow == 0 {
        return;
    }
    // The padded extent the windows reach; input past it is never read.
    let (ph, pw) = ((oh - 1) * S + K, (ow - 1) * S + K);
    let outs = oh * ow;
    let (in_len, out_len) = (ph * pw * LANES, outs.next_multiple_of(LANES) * LANES);
    // One buffer for the interleaved input and output, started on a 32-byte boundary
    // (where the allocator allows) so that no vector load spans two cache lines.
    scratch.resize(in_len + out_len + LANES, 0.0);
    let skip = scratch.as_ptr().align_offset(32).min(LANES);
    // Zeros where the padding is; the rest is overwritten.
    scratch[skip..skip + in_len].fill(0.0);
    let buf = scratch.as_mut_ptr().add(skip);
    let obuf = buf.add(in_len);

    let lane = |l: usize| if l < g.n { l } else { 0 };
    // The interleaved input: every padded row, eight columns at a time.
    let (rows, cols) = (ih.min(ph.saturating_sub(pt)), iw.min(pw.saturating_sub(pl)));
    let x: [*const f32; LANES] = std::array::from_fn(|l| g.x[lane(l)]);
    for iy in 0..rows {
        let to = buf.add(((iy + pt) * pw + pl) * LANES);
        let mut ix = 0;
        while ix < cols {
            let n = (cols - ix).min(LANES);
            let at = iy * iw + ix;
            if n == LANES {
                let v = transpose(std::array::from_fn(|l| _mm256_loadu_ps(x[l].add(at))));
                for (j, c) in v.iter().enumerate() {
                    _mm256_storeu_ps(to.add((ix + j) * LANES), *c);
                }
            } else {
                let v = transpose(std::array::from_fn(|l| load_first(x[l].add(at), n)));
                for (j, c) in v.iter().enumerate().take(n) {
                    _mm256_storeu_ps(to.add((ix + j) * LANES), *c);
                }
            }
            ix += LANES;
        }
    }

    // Tap t's eight weights, one per lane.
    let k: [*const f32; LANES] = std::array::from_fn(|l| g.k[lane(l)]);
    let mut w = [_mm256_setzero_ps(); 32];
    for t in (0..K * K).step_by(LANES) {
        let n = (K * K - t).min(LANES);
        let v = transpose(std::array::from_fn(|l| load_first(k[l].add(t), n)));
        w[t..t + LANES].copy_from_slice(&v);
    }
    let bias = _mm256_loadu_ps(g.bias.as_ptr());
    for oy in 0..oh {
        let from = buf.add(oy * S * pw * LANES);
        let to = obuf.add(oy * ow * LANES);
        let mut ox = 0;
        while ox + BLOCK <= ow {
            outputs::<K, S, BLOCK>(from, pw, ox, &w, bias, to);
            ox += BLOCK;
        }
        // The rest of the row as one block too: a lone output is a chain of K² dependent
        // multiply-adds.
        // (Called in place, not through a pointer: the kernel must be inlined into this
        // function to be compiled with its target features.)
        match ow - ox {
            0 => {}
            1 => outputs::<K, S, 1>(from, pw, ox, &w, bias, to),
            2 => outputs::<K, S, 2>(from, pw, ox, &w, bias, to),
            3 => outputs::<K, S, 3>(from, pw, ox, &w, bias, to),
            4 => outputs::<K, S, 4>(from, pw, ox, &w, bias, to),
            5 => outputs::<K, S, 5>(from, pw, ox, &w, bias, to),
            6 => outputs::<K, S, 6>(from, pw, ox, &w, bias, to),
            _ => outputs::<K, S, 7>(from, pw, ox, &w, bias, to),
        }
    }

    // Back into the planes, eight positions at a time, with the epilogue (chosen once,
    // outside the loops).
    let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
    match (g.residual, act) {
        (None, Act::None) => back(g, obuf, outs, |y, _, _| y),
        (None, Act::Relu) => back(g, obuf, outs, |y, _, _| _mm256_max_ps(y, zero)),
        (None, Act::Relu6) => back(g, obuf, outs, |y, _, _| {
            _mm256_min_ps(_mm256_max_ps(y, zero), six)
        }),
        (Some(r), act) => {
            let add = |y, l: usize, (p, n)| _mm256_add_ps(y, load_first(r[l].add(p), n));
            match act {
                Act::None => back(g, obuf, outs, add),
                Act::Relu => back(g, obuf, outs, |y, l, at| _mm256_max_ps(add(y, l, at), zero)),
                Act::Relu6 => back(g, obuf, outs, |y, l, at| {
                    _mm256_min_ps(_mm256_max_ps(add(y, l, at), zero), six)
                }),
            }
        }
    }
}

/// Transposes the interleaved outputs `obuf` (`outs` positions, a multiple of 8
/// allocated) back into the lanes' planes, each vector through `epilogue(vector, lane,
/// (position, count))` and less its lane's shift.
#[inline(always)]
unsafe fn back(
    g: &Group,
    obuf: *const f32,
    outs: usize,
    epilogue: impl Fn(__m256, usize, (usize, usize)) -> __m256,
) {
    let shift: [__m256; LANES] = std::array::from_fn(|l| _mm256_set1_ps(g.shift[l]));
    let mut p = 0;
    while p < outs {
        let n = (outs - p).min(LANES);
        let v = transpose(std::array::from_fn(|j| {
            _mm256_loadu_ps(obuf.add((p + j) * LANES))
        }));
        for l in 0..g.n {
            let y = _mm256_sub_ps(epilogue(v[l], l, (p, n)), shift[l]);
            store_first(g.out[l].add(p), y, n);
        }
        p += LANES;
    }
}

/// Outputs `ox..ox + B` of one row: `from` is the padded row its windows start on.
#[inline(always)]
unsafe fn outputs<const K: usize, const S: usize, const B: usize>(
    from: *const f32,
    pw: usize,
    ox: usize,
    w: &[__m256; 32],
    bias: __m256,
    to: *mut f32,
) {
    let mut acc = [bias; B];
    for ky in 0..K {
        for kx in 0..K {
            let wv = w[ky * K + kx];
            for (j, a) in acc.iter_mut().enumerate() {
                let at = from.add((ky * pw + (ox + j) * S + kx) * LANES);
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(at), wv, *a);
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(to.add((ox + j) * LANES), *a);
    }
}
