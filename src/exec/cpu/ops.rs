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
    let in_plane = win.in_hw[0] * win.in_hw[1];
    let out_plane = win.out_hw[0] * win.out_hw[1];
    let mut out = vec![0f32; input.len() / in_plane * out_plane];
    out.par_chunks_mut(out_plane)
        .enumerate()
        .for_each(|(p, o)| {
            let x = &input[p * in_plane..(p + 1) * in_plane];
            for oy in 0..win.out_hw[0] {
                for ox in 0..win.out_hw[1] {
                    let mut m = f32::NEG_INFINITY;
                    win.taps(oy, ox, |i, _| m = m.max(x[i]));
                    o[oy * win.out_hw[1] + ox] = m;
                }
            }
        });
    out
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
