//! Depthwise convolution of a group of planes at once, one channel per vector lane:
//! eight with AVX2, sixteen with AVX-512.
//!
//! The plane-by-plane kernels put a plane's columns in the vector, which leaves lanes
//! idle on short rows, needs masks or shuffles at the edges and for stride 2, and pays a
//! fixed cost per plane that small planes (7×7, 14×14) cannot spread. Here a group's
//! planes are transposed into one zero-padded buffer whose cell `(y, x)` is a vector of
//! the group's channels' values: every tap of every output is then one plain load and
//! one multiply-add with that tap's weights, at any stride and with no edge cases, and
//! the outputs are transposed back into their planes with the epilogue (residual,
//! activation, shift). Large planes go in strips of output rows, so that a strip's
//! buffers stay in L2 ([`strip_rows`]). Counted in instructions, the transposes of a
//! 3×3 layer are about as many as its multiply-adds; on small planes the plane-by-plane
//! kernels' edges cost more (measured at `depthwise::Plan::with_lanes`). Sixteen lanes
//! halve the multiply-adds and loads per output, and a 16 × 16 transpose takes 4
//! instructions per vector where an 8 × 8 one takes 3 for half the values.

use std::ops::Range;

use super::lanes::{Lanes, Ymm, Zmm, MAX_LANES};
use super::ops::Window;
use crate::model::Act;

/// Planes per group on this CPU's kernels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Width {
    /// Eight planes, AVX2 and FMA.
    Eight,
    /// Sixteen planes, AVX-512F.
    Sixteen,
}

impl Width {
    /// Planes per group.
    pub fn lanes(self) -> usize {
        match self {
            Width::Eight => 8,
            Width::Sixteen => 16,
        }
    }
}

/// A group's operands, one per lane. Lanes from `n` on are padding: their pointers
/// must still be valid operands (callers repeat the group's last plane), and their
/// outputs are never stored. Kernels of eight lanes read the first eight entries.
pub struct Group {
    /// Planes in use (1..=lanes).
    pub n: usize,
    /// Each lane's input plane (`in_hw`).
    pub x: [*const f32; MAX_LANES],
    /// Each lane's kernel (`kernel[0] × kernel[1]`).
    pub k: [*const f32; MAX_LANES],
    pub bias: [f32; MAX_LANES],
    /// Subtracted from each lane's outputs after the activation.
    pub shift: [f32; MAX_LANES],
    /// Each lane's residual plane (`out_hw`), added before the activation.
    pub residual: Option<[*const f32; MAX_LANES]>,
    /// Each lane's output plane (`out_hw`).
    pub out: [*mut f32; MAX_LANES],
}

/// Whether [`group`] runs this window: 3×3 and 5×5 kernels of stride 1 or 2, padded
/// on the top and left by less than the kernel (as every "same" padding is), so that
/// the padding above a strip lies inside the strip's rows.
pub fn supports(win: &Window) -> bool {
    matches!(win.kernel, [3, 3] | [5, 5])
        && matches!(win.stride, [1, 1] | [2, 2])
        && win.pad_tl[0] < win.kernel[0]
        && win.pad_tl[1] < win.kernel[1]
}

/// Convolves output rows `rows` of one group of planes of `win` (which [`supports`]
/// accepts) on kernels of `width`, `strip` output rows at a time ([`strip_rows`]);
/// `scratch` is the caller's reusable buffer.
///
/// # Safety
/// The CPU supports AVX2 and FMA, and AVX-512F for [`Width::Sixteen`]; each of the
/// first `width.lanes()` lanes points at a whole plane of its kind (input, kernel,
/// residual, output), no two lanes below `g.n` share an output, and `rows` lies inside
/// `0..win.out_hw[0]`.
pub unsafe fn group(
    width: Width,
    win: &Window,
    g: &Group,
    act: Act,
    rows: Range<usize>,
    strip: usize,
    scratch: &mut Vec<f32>,
) {
    debug_assert!((1..=width.lanes()).contains(&g.n));
    let strip = strip.max(1);
    match width {
        Width::Eight => group_avx2(win, g, act, rows, strip, scratch),
        Width::Sixteen => group_avx512(win, g, act, rows, strip, scratch),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn group_avx2(
    win: &Window,
    g: &Group,
    act: Act,
    rows: Range<usize>,
    strip: usize,
    scratch: &mut Vec<f32>,
) {
    by_window::<Ymm>(win, g, act, rows, strip, scratch)
}

#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn group_avx512(
    win: &Window,
    g: &Group,
    act: Act,
    rows: Range<usize>,
    strip: usize,
    scratch: &mut Vec<f32>,
) {
    by_window::<Zmm>(win, g, act, rows, strip, scratch)
}

/// [`run`] for the window's kernel size and stride.
#[inline(always)]
unsafe fn by_window<V: Lanes>(
    win: &Window,
    g: &Group,
    act: Act,
    rows: Range<usize>,
    strip: usize,
    scratch: &mut Vec<f32>,
) {
    match (win.kernel[0], win.stride[0]) {
        (3, 1) => run::<V, 3, 1>(win, g, act, rows, strip, scratch),
        (3, _) => run::<V, 3, 2>(win, g, act, rows, strip, scratch),
        (_, 1) => run::<V, 5, 1>(win, g, act, rows, strip, scratch),
        _ => run::<V, 5, 2>(win, g, act, rows, strip, scratch),
    }
}

/// `N` vectors from `f(l)` for `l < N`, transposed (lanes past `N` hold zeros).
#[inline(always)]
unsafe fn transposed<V: Lanes>(f: impl Fn(usize) -> V) -> [V; MAX_LANES] {
    let mut r = [V::zero(); MAX_LANES];
    for (l, v) in r.iter_mut().enumerate().take(V::N) {
        *v = f(l);
    }
    V::transpose(&mut r);
    r
}

/// Outputs of one row accumulated together, so that their chains of multiply-adds
/// overlap: with two multiply-adds issued per cycle and four cycles' latency, eight
/// chains keep the units busy.
const BLOCK: usize = 8;

#[inline(always)]
unsafe fn run<V: Lanes, const K: usize, const S: usize>(
    win: &Window,
    g: &Group,
    act: Act,
    rows: Range<usize>,
    strip: usize,
    scratch: &mut Vec<f32>,
) {
    let ([ih, iw], [oh, ow], [pt, pl]) = (win.in_hw, win.out_hw, win.pad_tl);
    debug_assert!(rows.end <= oh);
    if oh == 0 || ow == 0 {
        return;
    }
    // The padded width the windows reach; input columns past it are never read.
    let pw = (ow - 1) * S + K;
    let lanes = V::N;
    let (in_len, out_len) = (
        ((strip - 1) * S + K) * pw * lanes,
        (strip * ow).next_multiple_of(lanes) * lanes,
    );
    // One buffer for the interleaved input and output of a strip, started on a vector's
    // boundary (where the allocator allows) so that no vector load spans two cache lines.
    scratch.resize(in_len + out_len + lanes, 0.0);
    let skip = scratch.as_ptr().align_offset(4 * lanes).min(lanes);
    let buf = scratch.as_mut_ptr().add(skip);
    let obuf = buf.add(in_len);

    let (x, k) = (g.x, g.k);
    // Tap t's weights, one per lane.
    let mut w = [V::zero(); 32];
    for t in (0..K * K).step_by(lanes) {
        let n = (K * K - t).min(lanes);
        let v = transposed(|l| V::load_first(k[l].add(t), n));
        w[t..t + lanes].copy_from_slice(&v[..lanes]);
    }
    let bias = V::load(g.bias.as_ptr());
    let cols = iw.min(pw.saturating_sub(pl));
    let (zero, six) = (V::zero(), V::splat(6.0));

    for oy0 in rows.clone().step_by(strip) {
        let oy1 = (oy0 + strip).min(rows.end);
        // The strip's padded rows, from padded row `top`.
        let (top, height) = (oy0 * S, (oy1 - oy0 - 1) * S + K);
        // Zeros where the padding is, and only there (the rest is overwritten): rows
        // above and below the plane, then each row's columns left and right of it.
        // Clearing the whole strip instead took 1.04–1.11 of the layer's time (one
        // thread, 7×7 to 28×28, stride 1 and 2).
        let inside = top.max(pt)..(top + height).min(pt + ih).max(top.max(pt));
        let clear = |cell: usize, cells: usize| {
            std::ptr::write_bytes(buf.add(cell * lanes), 0, cells * lanes)
        };
        clear(0, (inside.start - top) * pw);
        clear((inside.end - top) * pw, (top + height - inside.end) * pw);
        // Rows of fewer than two vectors that are not one, whole (7, 14 and 28 wide): the
        // strip's rows inside the plane as one flat run of values, a vector's worth at a
        // time (a 7 × 7 plane's 49 values in 4 transposes rather than one per row, 7;
        // 28-wide rows in 1.75 per row rather than 2), each value stored at its cell.
        // Against transposes by row (one engine, the way switched pass by pass, 2
        // threads): one layer alone, 3×3 at 7 × 7 (960 channels) 0.76 of its time on one
        // thread and 0.80 on two, 5×5 at 7 × 7 0.94 / 0.97, 3×3 at 14 × 14 0.92, stride 2
        // from 14 × 14 0.76 / 0.81, at 28 × 28 0.94 / 0.96, stride 2 from 28 × 28 0.90 /
        // 0.91; in passes (200 pairs at batch 1, 30 at batch 8) MobileNetV2's and
        // EfficientNet-Lite0's 7 × 7 and 14 × 14 depthwise layers 0.84–0.94 and their
        // 28 × 28 ones 0.90–0.97. Passes, 7 and 14 wide first, then 28 as well (each
        // against the step before): MobileNetV2 0.988 then 0.995 of its time at batch 1,
        // 0.992 then 0.994 at batch 8, 0.982 then 0.980 at budget 0.5; Lite0 0.991 then
        // 0.999, 0.996 then 0.997, 0.989 then 0.992. Not 56 wide (1.12–1.15
        // from 56 × 56 at stride 2: the value-by-value stores cost more than the 0.5
        // transposes a row saved). Sixteen lanes only: with eight, a 7 × 7 plane takes 7
        // transposes either way, and wider ones were not measured.
        if lanes == 16 && iw < 2 * lanes && iw != lanes && cols == iw {
            for py in inside.clone() {
                let row = (py - top) * pw;
                clear(row, pl);
                clear(row + pl + cols, pw - pl - cols);
            }
            let plane = ih * iw;
            let (f1, mut f) = ((inside.end - pt) * iw, (inside.start - pt) * iw);
            // The cell of flat value f: its row inside the strip and its column.
            let (mut y, mut x0) = (inside.start - top, 0);
            while f < f1 {
                let n = (f1 - f).min(lanes);
                let v = if f + lanes <= plane {
                    transposed(|l| V::load(x[l].add(f)))
                } else {
                    transposed(|l| V::load_first(x[l].add(f), plane - f))
                };
                for c in v.iter().take(n) {
                    V::store(buf.add((y * pw + pl + x0) * lanes), *c);
                    x0 += 1;
                    if x0 == iw {
                        (y, x0) = (y + 1, 0);
                    }
                }
                f += lanes;
            }
        } else {
            // The interleaved input: the strip's rows inside the plane, a vector's worth of
            // columns at a time.
            for py in inside {
                let iy = py - pt;
                let row = (py - top) * pw;
                clear(row, pl);
                clear(row + pl + cols, pw - pl - cols);
                let to = buf.add((row + pl) * lanes);
                let mut ix = 0;
                while ix < cols {
                    let n = (cols - ix).min(lanes);
                    let at = iy * iw + ix;
                    if n == lanes {
                        let v = transposed(|l| V::load(x[l].add(at)));
                        for (j, c) in v.iter().enumerate().take(lanes) {
                            V::store(to.add((ix + j) * lanes), *c);
                        }
                    } else if iy + 1 < ih && iw >= lanes - n {
                        // A short piece of a row that is not the plane's last: plain loads,
                        // whose lanes past the piece read the next row, inside the plane, and
                        // are not stored. Partial loads there cost 7×7 layers 3% of their
                        // time (one thread, in-process pairs: 0.970 with 3×3 windows, 0.984
                        // with 5×5; 14×14 0.989 and 0.998; whole passes 0.995–0.997 at batch
                        // 1, 1.00 at batch 8).
                        let v = transposed(|l| V::load(x[l].add(at)));
                        for (j, c) in v.iter().enumerate().take(n) {
                            V::store(to.add((ix + j) * lanes), *c);
                        }
                    } else {
                        let v = transposed(|l| V::load_first(x[l].add(at), n));
                        for (j, c) in v.iter().enumerate().take(n) {
                            V::store(to.add((ix + j) * lanes), *c);
                        }
                    }
                    ix += lanes;
                }
            }
        }

        for oy in oy0..oy1 {
            let from = buf.add((oy - oy0) * S * pw * lanes);
            let to = obuf.add((oy - oy0) * ow * lanes);
            let mut ox = 0;
            while ox + BLOCK <= ow {
                outputs::<V, K, S, BLOCK>(from, pw, ox, &w, bias, to);
                ox += BLOCK;
            }
            // The rest of the row as one block too: a lone output is a chain of K²
            // dependent multiply-adds. (Called in place, not through a pointer: the
            // kernel must be inlined here to be compiled with its target features.)
            match ow - ox {
                0 => {}
                1 => outputs::<V, K, S, 1>(from, pw, ox, &w, bias, to),
                2 => outputs::<V, K, S, 2>(from, pw, ox, &w, bias, to),
                3 => outputs::<V, K, S, 3>(from, pw, ox, &w, bias, to),
                4 => outputs::<V, K, S, 4>(from, pw, ox, &w, bias, to),
                5 => outputs::<V, K, S, 5>(from, pw, ox, &w, bias, to),
                6 => outputs::<V, K, S, 6>(from, pw, ox, &w, bias, to),
                _ => outputs::<V, K, S, 7>(from, pw, ox, &w, bias, to),
            }
        }

        // Back into the planes, eight positions at a time, with the epilogue (chosen
        // once per strip, outside the loops).
        let at = (oy0 * ow, (oy1 - oy0) * ow);
        match (g.residual, act) {
            (None, Act::None) => back(g, obuf, at, |y: V, _, _| y),
            (None, Act::Relu) => back(g, obuf, at, |y, _, _| V::max(y, zero)),
            (None, Act::Relu6) => back(g, obuf, at, |y, _, _| V::min(V::max(y, zero), six)),
            (Some(r), act) => {
                let add = |y, l: usize, (p, n)| V::add(y, V::load_first(r[l].add(p), n));
                match act {
                    Act::None => back(g, obuf, at, add),
                    Act::Relu => back(g, obuf, at, |y, l, p| V::max(add(y, l, p), zero)),
                    Act::Relu6 => back(g, obuf, at, |y, l, p| {
                        V::min(V::max(add(y, l, p), zero), six)
                    }),
                }
            }
        }
    }
}

/// Output rows per strip of `win` in groups of `lanes` planes: as many as keep a
/// strip's buffer (its interleaved padded input rows and outputs) within `strip_bytes`,
/// at least one. Smaller strips pay for the rows their windows share with the next
/// strip; a group of whole large planes leaves L2 (see `Tuning::depthwise_strip_bytes`).
pub fn strip_rows(win: &Window, lanes: usize, strip_bytes: usize) -> usize {
    let [oh, ow] = win.out_hw;
    let pw = (ow.max(1) - 1) * win.stride[1] + win.kernel[1];
    // Per output row: `stride` padded input rows and the row's outputs; plus the
    // window's extra rows once.
    let bytes = |rows: usize| rows * lanes * std::mem::size_of::<f32>();
    let row = bytes(win.stride[0] * pw + ow);
    let extra = bytes(win.kernel[0].saturating_sub(win.stride[0]) * pw);
    (strip_bytes.saturating_sub(extra) / row).clamp(1, oh.max(1))
}

/// Transposes a strip's interleaved outputs `obuf` (`count` positions from `p0` of the
/// planes, a multiple of the lanes allocated) back into the lanes' planes, each vector
/// through `epilogue(vector, lane, (position, count))` and less its lane's shift.
#[inline(always)]
unsafe fn back<V: Lanes>(
    g: &Group,
    obuf: *const f32,
    (p0, count): (usize, usize),
    epilogue: impl Fn(V, usize, (usize, usize)) -> V,
) {
    let lanes = V::N;
    let shift: [V; MAX_LANES] = std::array::from_fn(|l| V::splat(g.shift[l]));
    let mut p = 0;
    while p < count {
        let n = (count - p).min(lanes);
        let v = transposed(|j| V::load(obuf.add((p + j) * lanes)));
        for l in 0..g.n {
            let y = V::sub(epilogue(v[l], l, (p0 + p, n)), shift[l]);
            V::store_first(g.out[l].add(p0 + p), y, n);
        }
        p += lanes;
    }
}

/// Outputs `ox..ox + B` of one row: `from` is the padded row its windows start on.
#[inline(always)]
unsafe fn outputs<V: Lanes, const K: usize, const S: usize, const B: usize>(
    from: *const f32,
    pw: usize,
    ox: usize,
    w: &[V; 32],
    bias: V,
    to: *mut f32,
) {
    let mut acc = [bias; B];
    for ky in 0..K {
        for kx in 0..K {
            let wv = w[ky * K + kx];
            for (j, a) in acc.iter_mut().enumerate() {
                let at = from.add((ky * pw + (ox + j) * S + kx) * V::N);
                *a = V::fmadd(V::load(at), wv, *a);
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        V::store(to.add((ox + j) * V::N), *a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A width's transpose on an `N × N` block of distinct values: row `i`, column `j`
    /// comes back at row `j`, column `i`.
    #[inline(always)]
    unsafe fn transposes<V: Lanes>() {
        let n = V::N;
        let block: Vec<f32> = (0..n * n).map(|v| v as f32).collect();
        let mut got = vec![f32::NAN; n * n];
        let r = transposed(|i| V::load(block[i * n..].as_ptr()));
        for (j, v) in r.iter().enumerate().take(n) {
            V::store(got[j * n..].as_mut_ptr(), *v);
        }
        for i in 0..n {
            for j in 0..n {
                assert_eq!(got[j * n + i], block[i * n + j], "{n} lanes, ({i}, {j})");
            }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn transposes_eight() {
        transposes::<Ymm>()
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn transposes_sixteen() {
        transposes::<Zmm>()
    }

    #[test]
    fn transposes_swap_rows_and_columns() {
        // SAFETY: each runs only where the CPU has its features.
        if is_x86_feature_detected!("avx2") {
            unsafe { transposes_eight() };
        }
        if is_x86_feature_detected!("avx512f") {
            unsafe { transposes_sixteen() };
        }
    }
}
