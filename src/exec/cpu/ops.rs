//! Plain loops for the operations Candle lacks or runs slowly on the CPU: depthwise
//! convolution (Candle splits it into one convolution per channel), max pooling with
//! padding, and adaptive average pooling. Inputs and outputs are NCHW f32.

use rayon::prelude::*;

use crate::model::Act;

/// Geometry of one 2-D window operation on one sample plane.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub in_hw: [usize; 2],
    pub out_hw: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Top and left padding; bottom/right padding is implied by `out_hw`.
    pub pad_tl: [usize; 2],
}

impl Window {
    /// Calls `f(input_index, kernel_index)` for every in-bounds tap of output pixel (oy, ox).
    #[inline]
    fn taps(&self, oy: usize, ox: usize, mut f: impl FnMut(usize, usize)) {
        let [h, w] = self.in_hw;
        for ky in 0..self.kernel[0] {
            let iy = (oy * self.stride[0] + ky) as isize - self.pad_tl[0] as isize;
            if iy < 0 || iy as usize >= h {
                continue;
            }
            for kx in 0..self.kernel[1] {
                let ix = (ox * self.stride[1] + kx) as isize - self.pad_tl[1] as isize;
                if ix < 0 || ix as usize >= w {
                    continue;
                }
                f(iy as usize * w + ix as usize, ky * self.kernel[1] + kx);
            }
        }
    }
}

/// Depthwise convolution (one filter per channel) with bias, optional residual and
/// activation. `input`: N×C×H×W, `weight`: C×kh×kw, `out`/`residual`: N×C×OH×OW.
pub fn depthwise(
    input: &[f32],
    weight: &[f32],
    bias: &[f32],
    residual: Option<&[f32]>,
    act: Act,
    channels: usize,
    win: Window,
) -> Vec<f32> {
    let in_plane = win.in_hw[0] * win.in_hw[1];
    let out_plane = win.out_hw[0] * win.out_hw[1];
    let taps = win.kernel[0] * win.kernel[1];
    let mut out = vec![0f32; input.len() / in_plane * out_plane];
    out.par_chunks_mut(out_plane)
        .enumerate()
        .for_each(|(nc, o)| {
            let c = nc % channels;
            let x = &input[nc * in_plane..(nc + 1) * in_plane];
            let k = &weight[c * taps..(c + 1) * taps];
            for oy in 0..win.out_hw[0] {
                for ox in 0..win.out_hw[1] {
                    let mut acc = bias[c];
                    win.taps(oy, ox, |i, t| acc += x[i] * k[t]);
                    let idx = oy * win.out_hw[1] + ox;
                    if let Some(r) = residual {
                        acc += r[nc * out_plane + idx];
                    }
                    o[idx] = act.apply(acc);
                }
            }
        });
    out
}

/// Max pooling; padded cells never win. `input`: N×C×H×W (N·C planes).
pub fn max_pool(input: &[f32], win: Window) -> Vec<f32> {
    let planes = input.len() / (win.in_hw[0] * win.in_hw[1]);
    let mut out = vec![0f32; planes * win.out_hw[0] * win.out_hw[1]];
    max_pool_into(&mut out, input, win, 1);
    out
}

/// [`max_pool`] into `out` (every cell is written), `input` holding `samples` samples.
pub fn max_pool_into(out: &mut [f32], input: &[f32], win: Window, samples: usize) {
    let [h, w] = win.in_hw;
    let [oh, ow] = win.out_hw;
    let in_plane = h * w;
    let out_plane = oh * ow;
    assert_eq!(
        out.len(),
        input.len() / in_plane * out_plane,
        "pool output size"
    );
    // Separable: the max over a window is the max over its columns of each column's max
    // over the window's rows. Per output row, first the vertical maxima of the rows it
    // spans (contiguous: vectorized), then the horizontal maxima of those: the row,
    // padded with −∞, is split into its `stride` phases (every stride-th value), so that
    // each tap of every output is one contiguous run of a phase, and the output is the
    // elementwise maximum of `kw` runs (vectorized too). `if v > m` (not `f32::max`) so
    // the compiler emits `vmaxps`; starting from −∞, a NaN never wins in either form.
    let rows: Vec<(usize, usize)> = (0..oh)
        .map(|oy| {
            let lo = (oy * win.stride[0]) as isize - win.pad_tl[0] as isize;
            let hi = lo + win.kernel[0] as isize;
            (lo.max(0) as usize, (hi.max(0) as usize).min(h))
        })
        .collect();
    let [s, kw, pl] = [win.stride[1], win.kernel[1], win.pad_tl[1]];
    #[cfg(target_arch = "x86_64")]
    if [s, kw, pl] == [2, 3, 1] && std::arch::is_x86_feature_detected!("avx512f") {
        // Each plane in one part of its output rows per thread, every plane's first part
        // first (of each sample): the loop then shares out its work as the stem before it
        // did, by output rows at batch 1 (the top rows to one thread, the bottom ones to
        // the other), and each thread reads mostly what it wrote rather than half of
        // every plane from the other core. Against whole planes (one engine, the way
        // switched pass by pass, 100 pairs, batch 1, 2 threads): ResNet-18's and
        // ResNet-50's pools 0.92–0.93 of their time, passes 1.003 and 0.991.
        let parts = rayon::current_num_threads().clamp(1, oh.max(1));
        let mut tasks: Vec<(usize, std::ops::Range<usize>, &mut [f32])> = Vec::new();
        for (p, o) in out.chunks_mut(out_plane).enumerate() {
            let mut rest = o;
            for part in 0..parts {
                let r = part * oh / parts..(part + 1) * oh / parts;
                let (now, later) = rest.split_at_mut(r.len() * ow);
                rest = later;
                tasks.push((p, r, now));
            }
        }
        // Sample by sample, as the stem's tasks go: over a batch they share out its
        // samples, not its rows. Every sample's first parts first (each thread taking
        // part of every sample, half of it written on the other core), ResNet-18's pool
        // at batch 8 had taken 1.57–1.70× its time and ResNet-50's 1.36× (in-process
        // pairs, Zen 5, 2 threads), the 3×3 layers after it 1.05–1.10×; passes 1.023 and
        // 1.030 (0.984 in a third run) and 1.001.
        let per_sample = (input.len() / in_plane / samples.max(1)).max(1);
        tasks.sort_by_key(|(p, r, _)| (*p / per_sample, r.start, *p));
        tasks.into_par_iter().for_each(|(p, r, o)| {
            let x = &input[p * in_plane..(p + 1) * in_plane];
            // SAFETY: AVX-512F is present; `o` holds the output rows `r` of the plane,
            // every row range inside the plane.
            unsafe { max_pool_3s2_avx512(o, x, w, ow, &rows[r]) };
        });
        return;
    }
    // Phase length: the last output's last tap is at ow − 1 + (kw − 1) / s.
    let phase_len = ow + (kw - 1) / s;
    let padded_len = (s * phase_len).max(pl + w);
    let larger = |m: f32, v: f32| if v > m { v } else { m };
    out.par_chunks_mut(out_plane).enumerate().for_each_init(
        || (vec![0f32; padded_len], vec![0f32; s * phase_len]),
        |(vpad, phases), (p, o)| {
            let x = &input[p * in_plane..(p + 1) * in_plane];
            for (orow, &(y0, y1)) in o.chunks_exact_mut(ow).zip(&rows) {
                vpad.fill(f32::NEG_INFINITY);
                let vmax = &mut vpad[pl..pl + w];
                for r in x[y0 * w..y1 * w].chunks_exact(w) {
                    vmax.iter_mut()
                        .zip(r)
                        .for_each(|(m, &v)| *m = larger(*m, v));
                }
                split_phases(vpad, s, phase_len, phases);
                orow.fill(f32::NEG_INFINITY);
                for t in 0..kw {
                    let run = &phases[(t % s) * phase_len + t / s..][..ow];
                    orow.iter_mut()
                        .zip(run)
                        .for_each(|(m, &v)| *m = larger(*m, v));
                }
            }
        },
    );
}

/// One plane's output rows of a max pool whose windows are 3 wide at column stride 2
/// with one column of padding on the left (ResNet's 3×3, stride-2 pool), each from the
/// input rows it spans: their elementwise maximum, 32 columns at a time, split into even
/// and odd columns; output `j` of a block of 16 is the maximum of odd column `j − 1` (the
/// block before's last, −∞ first), even `j` and odd `j`. Each output row splits one row
/// of maxima rather than each input row being split into scratch first: ResNet's pool
/// alone (64 planes of 112 × 112, in a loop, medians of 580) 0.042 ms on two threads
/// against 0.070, 0.074 against 0.132 on one (ONNX Runtime's pool 0.04–0.05 in a pass);
/// in passes (in-process pairs, batch 1, 100) ResNet-18's pool 0.87–0.93 of its time,
/// ResNet-50's 0.83–1.19 (the machine slow and noisy), 0.86 at batch 8. The generic way
/// (a padded copy, the vertical maxima, a phase split and the taps per output row, each
/// a pass over a short row) had taken 0.10–0.15 ms of a ResNet pass on two threads.
///
/// # Safety
/// AVX-512F is available; `x` holds `rows`' input rows of `w` values (the loads are
/// masked to them), `o` `rows.len() · ow`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_pool_3s2_avx512(
    o: &mut [f32],
    x: &[f32],
    w: usize,
    ow: usize,
    rows: &[(usize, usize)],
) {
    use std::arch::x86_64::*;
    let lanes = |n: usize| ((1u32 << n.min(16)) - 1) as __mmask16;
    let neg = _mm512_set1_ps(f32::NEG_INFINITY);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (orow, &(y0, y1)) in o.chunks_exact_mut(ow).zip(rows) {
        let mut last_odd = neg;
        for j0 in (0..ow).step_by(16) {
            // Input columns 2·j0 .. 2·j0 + 32 of every row, −∞ past the row.
            let c = 2 * j0;
            let (ma, mb) = (lanes(w.saturating_sub(c)), lanes(w.saturating_sub(c + 16)));
            let (mut a, mut b) = (neg, neg);
            for y in y0..y1 {
                // (wrapping: past the row, the masked loads read nothing.)
                let src = x.as_ptr().wrapping_add(y * w + c);
                // `max(v, m)` is `v > m ? v : m`: a NaN never wins, as in the generic way.
                a = _mm512_max_ps(_mm512_mask_loadu_ps(neg, ma, src), a);
                b = _mm512_max_ps(_mm512_mask_loadu_ps(neg, mb, src.wrapping_add(16)), b);
            }
            let ev = _mm512_permutex2var_ps(a, even, b);
            let od = _mm512_permutex2var_ps(a, odd, b);
            // Odd column j − 1: lane 15 of the block before, then this block's 0..15.
            let before = _mm512_castsi512_ps(_mm512_alignr_epi32::<15>(
                _mm512_castps_si512(od),
                _mm512_castps_si512(last_odd),
            ));
            let m = _mm512_max_ps(_mm512_max_ps(ev, od), before);
            _mm512_mask_storeu_ps(orow.as_mut_ptr().add(j0), lanes(ow - j0), m);
            last_odd = od;
        }
    }
}

/// `phases` (`stride` runs of `phase_len`) gets phase `q` of `src`: `src[q + stride · j]`
/// at `q · phase_len + j`, for every `j < phase_len` (`src` holds `stride · phase_len`
/// values at least). Stride 2 goes through [`split_even_odd`]: with AVX2 shuffles the
/// 3×3 stride-2 max pools of ResNet-18 and ResNet-50 took 0.71–0.78 of their time
/// (in-process pairs, AVX2) against the split value by value.
fn split_phases(src: &[f32], stride: usize, phase_len: usize, phases: &mut [f32]) {
    if stride == 2 {
        let (evens, odds) = phases[..2 * phase_len].split_at_mut(phase_len);
        return split_even_odd(&src[..2 * phase_len], evens, odds);
    }
    for (q, phase) in phases.chunks_exact_mut(phase_len).enumerate() {
        for (j, d) in phase.iter_mut().enumerate() {
            *d = src[q + stride * j];
        }
    }
}

/// `evens[j] = src[2j]` and `odds[j] = src[2j + 1]` (`evens.len() ==
/// src.len().div_ceil(2)`, `odds.len() == src.len() / 2`): the even/odd split of every
/// column-stride-2 input (depthwise padded copies, in-place convolutions, max pooling),
/// by vector where the CPU has AVX-512 (`copy_even`) or AVX2 (shuffles), else value by
/// value.
pub(crate) fn split_even_odd(src: &[f32], evens: &mut [f32], odds: &mut [f32]) {
    assert!(
        evens.len() == src.len().div_ceil(2) && odds.len() == src.len() / 2,
        "even/odd split lengths"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if !odds.is_empty() && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present; each call reads exactly the values it copies
            // (2 · len − 1 from its start).
            unsafe {
                super::gemm::copy_even(&src[..2 * evens.len() - 1], evens);
                super::gemm::copy_even(&src[1..2 * odds.len()], odds);
            }
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present; the lengths are as it asks (checked above).
            return unsafe { super::depthwise_avx2::split_even_odd(src, evens, odds) };
        }
    }
    for (i, &v) in src.iter().enumerate() {
        if i % 2 == 0 {
            evens[i / 2] = v;
        } else {
            odds[i / 2] = v;
        }
    }
}

/// One zero-padded plane: `src` (rows `in_w` wide) into `dst` (rows `ow` wide), its
/// top-left value at (`top`, `left`); `[rows, cols]` is how much of the input lies inside
/// `dst` (the rest is cut), and every other value of `dst` is zero. With AVX-512 each row
/// is written in whole vectors whose lanes outside the input are masked off on the load.
/// Copied slice by slice with a fill on either side, a padded 56-wide row had cost three
/// calls for 232 bytes; in vectors, the padding of ResNet-18's passes takes 0.64 of that
/// time at batch 1 and 0.75 at batch 8, and the dense pass 0.98 at batch 1 (in-process
/// pairs; 0.99–1.00 at batch 8 and for ResNet-50).
pub(crate) fn pad_plane(
    dst: &mut [f32],
    src: &[f32],
    in_w: usize,
    [top, left]: [usize; 2],
    [rows, cols]: [usize; 2],
    ow: usize,
) {
    assert!(
        left + cols <= ow
            && (top + rows) * ow <= dst.len()
            && (rows == 0 || (rows - 1) * in_w + cols <= src.len()),
        "padded plane bounds"
    );
    dst[..top * ow].fill(0.0);
    dst[(top + rows) * ow..].fill(0.0);
    let body = &mut dst[top * ow..(top + rows) * ow];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; the bounds are checked above.
        return unsafe { pad_rows_avx512(body, src, in_w, left, cols, ow) };
    }
    for (y, row) in body.chunks_exact_mut(ow).enumerate() {
        row[..left].fill(0.0);
        row[left..left + cols].copy_from_slice(&src[y * in_w..y * in_w + cols]);
        row[left + cols..].fill(0.0);
    }
}

/// The rows of [`pad_plane`] between its top and bottom padding.
///
/// # Safety
/// AVX-512F is available, `left + cols <= ow`, `body` holds whole rows of `ow`, and `src`
/// holds `cols` values from `y · in_w` for every row `y` of `body`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pad_rows_avx512(
    body: &mut [f32],
    src: &[f32],
    in_w: usize,
    left: usize,
    cols: usize,
    ow: usize,
) {
    use std::arch::x86_64::*;
    let lanes = |n: usize| ((1u32 << n.min(16)) - 1) as __mmask16;
    for (y, row) in body.chunks_exact_mut(ow).enumerate() {
        let from = src.as_ptr().wrapping_add(y * in_w);
        for c in (0..ow).step_by(16) {
            // Lanes j with left ≤ c + j < left + cols hold input column c + j − left.
            let (lo, hi) = (left.saturating_sub(c), (left + cols).saturating_sub(c));
            let load = lanes(hi) & !lanes(lo);
            // Masked-off lanes are not read, so the address may lie outside `src`.
            let v = _mm512_maskz_loadu_ps(load, from.wrapping_add(c).wrapping_sub(left));
            _mm512_mask_storeu_ps(row.as_mut_ptr().add(c), lanes(ow - c), v);
        }
    }
}

/// PyTorch's adaptive average pooling: output cell i covers input rows
/// floor(i·H/OH) .. ceil((i+1)·H/OH).
pub fn adaptive_avg_pool(input: &[f32], in_hw: [usize; 2], out_hw: [usize; 2]) -> Vec<f32> {
    let in_plane = in_hw[0] * in_hw[1];
    let out_plane = out_hw[0] * out_hw[1];
    let range =
        |i: usize, n_in: usize, n_out: usize| (i * n_in / n_out, ((i + 1) * n_in).div_ceil(n_out));
    let mut out = vec![0f32; input.len() / in_plane * out_plane];
    out.par_chunks_mut(out_plane)
        .enumerate()
        .for_each(|(p, o)| {
            let x = &input[p * in_plane..(p + 1) * in_plane];
            for oy in 0..out_hw[0] {
                let (y0, y1) = range(oy, in_hw[0], out_hw[0]);
                for ox in 0..out_hw[1] {
                    let (x0, x1) = range(ox, in_hw[1], out_hw[1]);
                    let mut s = 0f32;
                    for y in y0..y1 {
                        s += x[y * in_hw[1] + x0..y * in_hw[1] + x1].iter().sum::<f32>();
                    }
                    o[oy * out_hw[1] + ox] = s / ((y1 - y0) * (x1 - x0)) as f32;
                }
            }
        });
    out
}

/// `Σ a[i] · b[i]` in sixteen lanes (a product added to each per chunk, not fused), then
/// the lanes and the tail summed in order.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for j in 0..16 {
            lanes[j] += x[j] * y[j];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Naive reference: pads explicitly, then sums over the full window.
    fn naive_window(
        x: &[f32],
        planes: usize,
        win: Window,
        pad_br: [usize; 2],
        fill: f32,
        mut reduce: impl FnMut(usize, &[f32]) -> f32,
    ) -> Vec<f32> {
        let [h, w] = win.in_hw;
        let (ph, pw) = (h + win.pad_tl[0] + pad_br[0], w + win.pad_tl[1] + pad_br[1]);
        let mut out = Vec::new();
        for p in 0..planes {
            let mut padded = vec![fill; ph * pw];
            for y in 0..h {
                for xx in 0..w {
                    padded[(y + win.pad_tl[0]) * pw + xx + win.pad_tl[1]] =
                        x[p * h * w + y * w + xx];
                }
            }
            for oy in 0..win.out_hw[0] {
                for ox in 0..win.out_hw[1] {
                    let mut vals = Vec::new();
                    for ky in 0..win.kernel[0] {
                        for kx in 0..win.kernel[1] {
                            vals.push(
                                padded[(oy * win.stride[0] + ky) * pw + ox * win.stride[1] + kx],
                            );
                        }
                    }
                    out.push(reduce(p, &vals));
                }
            }
        }
        out
    }

    fn random_window(rng: &mut impl Rng) -> (Window, [usize; 2]) {
        let k = [rng.random_range(1..=7), rng.random_range(1..=7)];
        let stride = [rng.random_range(1..=2), rng.random_range(1..=2)];
        let in_hw = [
            rng.random_range(k[0]..k[0] + 12),
            rng.random_range(k[1]..k[1] + 12),
        ];
        let pad_tl = [
            rng.random_range(0..=k[0] / 2),
            rng.random_range(0..=k[1] / 2),
        ];
        let pad_br = [
            rng.random_range(0..=k[0] / 2),
            rng.random_range(0..=k[1] / 2),
        ];
        let out_hw = [
            (in_hw[0] + pad_tl[0] + pad_br[0] - k[0]) / stride[0] + 1,
            (in_hw[1] + pad_tl[1] + pad_br[1] - k[1]) / stride[1] + 1,
        ];
        let win = Window {
            in_hw,
            out_hw,
            kernel: k,
            stride,
            pad_tl,
        };
        (win, pad_br)
    }

    #[test]
    fn depthwise_matches_naive() {
        let mut rng = super::super::fresh_rng();
        for _ in 0..50 {
            let (win, pad_br) = random_window(&mut rng);
            let (n, c) = (rng.random_range(1..=3), rng.random_range(1..=9));
            let taps = win.kernel[0] * win.kernel[1];
            let x: Vec<f32> = (0..n * c * win.in_hw[0] * win.in_hw[1])
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let w: Vec<f32> = (0..c * taps).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..c).map(|_| rng.random_range(-1.0..1.0)).collect();
            let out_len = n * c * win.out_hw[0] * win.out_hw[1];
            let r: Vec<f32> = (0..out_len).map(|_| rng.random_range(-1.0..1.0)).collect();
            let act = [Act::None, Act::Relu, Act::Relu6][rng.random_range(0..3)];
            let use_res = rng.random_bool(0.5);
            let got = depthwise(&x, &w, &b, use_res.then_some(r.as_slice()), act, c, win);
            let mut want = naive_window(&x, n * c, win, pad_br, 0.0, |p, vals| {
                let ch = p % c;
                b[ch]
                    + vals
                        .iter()
                        .zip(&w[ch * taps..])
                        .map(|(v, k)| v * k)
                        .sum::<f32>()
            });
            for (i, v) in want.iter_mut().enumerate() {
                *v = act.apply(*v + if use_res { r[i] } else { 0.0 });
            }
            assert_eq!(got.len(), want.len());
            for (g, e) in got.iter().zip(&want) {
                assert!(
                    (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{win:?}: {g} vs {e}"
                );
            }
        }
    }

    #[test]
    fn even_odd_split_matches_indexing_at_every_length() {
        // Lengths around the vector widths: whole blocks, an overlapping last block, and
        // rows too short for one.
        for n in 0usize..70 {
            let src: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let (mut evens, mut odds) = (vec![f32::NAN; n.div_ceil(2)], vec![f32::NAN; n / 2]);
            split_even_odd(&src, &mut evens, &mut odds);
            let want_e: Vec<f32> = src.iter().step_by(2).copied().collect();
            let want_o: Vec<f32> = src.iter().skip(1).step_by(2).copied().collect();
            assert_eq!((evens, odds), (want_e, want_o), "length {n}");
        }
    }

    #[test]
    fn padded_plane_matches_indexing() {
        // Widths around the vector width, padding on either side or none, and inputs cut
        // by a padded plane smaller than input + padding (a stride that skips the last
        // column or row).
        let mut rng = super::super::fresh_rng();
        for _ in 0..300 {
            let in_hw = [rng.random_range(1..=9), rng.random_range(1..=40)];
            let [top, left] = [rng.random_range(0..=3), rng.random_range(0..=3)];
            let oh = rng.random_range(top + 1..=top + in_hw[0] + 3);
            let ow = rng.random_range(left + 1..=left + in_hw[1] + 3);
            let fit = [in_hw[0].min(oh - top), in_hw[1].min(ow - left)];
            let src: Vec<f32> = (0..in_hw[0] * in_hw[1])
                .map(|_| rng.random_range(1.0..2.0))
                .collect();
            // One more value past the plane: nothing beyond it is written.
            let mut got = vec![f32::NAN; oh * ow + 1];
            pad_plane(&mut got[..oh * ow], &src, in_hw[1], [top, left], fit, ow);
            let mut want = vec![0f32; oh * ow];
            for y in 0..fit[0] {
                for x in 0..fit[1] {
                    want[(y + top) * ow + x + left] = src[y * in_hw[1] + x];
                }
            }
            assert!(got[oh * ow].is_nan(), "wrote past the plane");
            assert_eq!(
                got[..oh * ow],
                want,
                "{in_hw:?} at {top},{left} into {oh}×{ow}"
            );
        }
    }

    #[test]
    fn max_pool_matches_naive() {
        let mut rng = super::super::fresh_rng();
        for _ in 0..200 {
            let (mut win, _) = random_window(&mut rng);
            // Strides up to 3: the phase split has a vector path for 2 only.
            if rng.random_bool(0.3) {
                win.stride = [rng.random_range(1..=3), 3];
            }
            // PyTorch's rule: padding at most half the window, same on both sides.
            win.pad_tl = [
                win.pad_tl[0].min(win.kernel[0] / 2),
                win.pad_tl[1].min(win.kernel[1] / 2),
            ];
            let pad_br = win.pad_tl;
            win.out_hw = [
                (win.in_hw[0] + 2 * pad_br[0] - win.kernel[0]) / win.stride[0] + 1,
                (win.in_hw[1] + 2 * pad_br[1] - win.kernel[1]) / win.stride[1] + 1,
            ];
            let planes = rng.random_range(1..=5);
            let x: Vec<f32> = (0..planes * win.in_hw[0] * win.in_hw[1])
                .map(|_| rng.random_range(-5.0..-1.0))
                .collect();
            let got = max_pool(&x, win);
            let want = naive_window(&x, planes, win, pad_br, f32::NEG_INFINITY, |_, v| {
                v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            });
            assert_eq!(got, want, "{win:?}");
        }
    }

    #[test]
    fn max_pool_three_wide_at_column_stride_two_matches_naive() {
        // The vector way's windows (3 wide, column stride 2, one column of padding on
        // the left) over any rows; odd and even widths, rows past a vector's 16 outputs,
        // NaNs that never win.
        let mut rng = super::super::fresh_rng();
        for case in 0..120 {
            let kh = rng.random_range(1..=3);
            let ph = rng.random_range(0..=kh / 2);
            let in_hw = [rng.random_range(kh..30), rng.random_range(1..80)];
            let sh = rng.random_range(1..=2);
            let win = Window {
                in_hw,
                out_hw: [
                    (in_hw[0] + 2 * ph - kh) / sh + 1,
                    (in_hw[1] + 2 - 3) / 2 + 1,
                ],
                kernel: [kh, 3],
                stride: [sh, 2],
                pad_tl: [ph, 1],
            };
            // Planes of one sample or several (each sample's shared out on its own).
            let samples = rng.random_range(1..=3);
            let planes = samples * rng.random_range(1..=4);
            let mut x: Vec<f32> = (0..planes * in_hw[0] * in_hw[1])
                .map(|_| rng.random_range(-5.0..5.0))
                .collect();
            if case % 4 == 0 {
                let i = rng.random_range(0..x.len());
                x[i] = f32::NAN;
            }
            let mut got = vec![0f32; planes * win.out_hw[0] * win.out_hw[1]];
            max_pool_into(&mut got, &x, win, samples);
            let want = naive_window(&x, planes, win, [ph, 1], f32::NEG_INFINITY, |_, v| {
                v.iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
            });
            assert_eq!(got, want, "case {case}: {win:?}");
        }
    }

    #[test]
    fn adaptive_avg_pool_cases() {
        // 5 → 3 covers overlapping windows: rows [0,2), [1,4), [3,5).
        let x: Vec<f32> = (0..5).map(|v| v as f32).collect();
        assert_eq!(adaptive_avg_pool(&x, [5, 1], [3, 1]), vec![0.5, 2.0, 3.5]);
        // Upsampling 1 → 2 repeats the value; equal sizes are the identity.
        assert_eq!(adaptive_avg_pool(&[3.0], [1, 1], [2, 2]), vec![3.0; 4]);
        let y: Vec<f32> = (0..12).map(|v| v as f32 * 0.5).collect();
        assert_eq!(adaptive_avg_pool(&y, [3, 4], [3, 4]), y);
    }
}
