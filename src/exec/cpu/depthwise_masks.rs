//! Which lanes of a depthwise kernel's vector loads fall inside the input plane, worked
//! out once per layer from its geometry. The masked kernels (`depthwise_avx512`, 16
//! lanes, and `depthwise_avx2`, 8) read the input in place and let masked-off lanes read
//! as zero, which is exactly the zero padding.

use super::ops::Window;

/// For a stride-1 plane whose output rows are as wide as its input rows: per block of
/// `lanes` outputs, which lanes each kernel row and each kernel column may read inside
/// the plane, and each tap's offset from the output index.
pub struct FlatMasks {
    pub kernel: [usize; 2],
    pub outputs: usize,
    /// Block `q`, tap `t = ky * kw + kx`: `masks[q * taps + t]`, bit `l` for lane `l`.
    pub masks: Vec<u16>,
    /// Tap `ky * kw + kx`: input index minus output index.
    pub offs: Vec<isize>,
}

impl FlatMasks {
    /// The masks for `win` in vectors of `lanes` (at most 16), or `None` when its
    /// outputs do not map to inputs by a shift (a stride other than 1, or output rows
    /// narrower or wider than input rows).
    pub fn new(win: &Window, lanes: usize) -> Option<FlatMasks> {
        debug_assert!((1..=16).contains(&lanes));
        let [h, w] = win.in_hw;
        let [oh, ow] = win.out_hw;
        let [kh, kw] = win.kernel;
        let [top, left] = win.pad_tl;
        if win.stride != [1, 1] || ow != w || oh == 0 || ow == 0 {
            return None;
        }
        let outputs = oh * ow;
        let taps = kh * kw;
        let mut masks = vec![0u16; outputs.div_ceil(lanes) * taps];
        for i in 0..outputs {
            let (oy, ox) = (i / ow, i % ow);
            let (q, bit) = (i / lanes, 1u16 << (i % lanes));
            for ky in 0..kh {
                if (oy + ky).checked_sub(top).is_none_or(|iy| iy >= h) {
                    continue;
                }
                for kx in 0..kw {
                    if (ox + kx).checked_sub(left).is_some_and(|ix| ix < w) {
                        masks[q * taps + ky * kw + kx] |= bit;
                    }
                }
            }
        }
        let offs = (0..kh)
            .flat_map(|ky| {
                (0..kw).map(move |kx| {
                    (ky as isize - top as isize) * w as isize + kx as isize - left as isize
                })
            })
            .collect();
        Some(FlatMasks {
            kernel: win.kernel,
            outputs,
            masks,
            offs,
        })
    }
}

/// The lanes `t` of a `lanes`-value load at input column `start + t` that fall inside a
/// row of `width` columns.
fn inside(start: isize, width: usize, lanes: usize) -> u16 {
    let lo = (-start).clamp(0, lanes as isize) as u32;
    let hi = (width as isize - start).clamp(0, lanes as isize) as u32;
    if hi <= lo {
        return 0;
    }
    let below_hi = if hi == 16 { u16::MAX } else { (1u16 << hi) - 1 };
    below_hi & !((1u16 << lo) - 1)
}

/// For a plane of column stride 1 or 2 run row by row: per block of `lanes` output
/// columns and kernel column, which lanes of the (one or two) loads of a tap lie inside
/// the row.
pub struct RowMasks {
    /// Block `c`, kernel column `kx`: `lo[c * kw + kx]`, for the load at the block's
    /// first input column for `kx`; `hi` for the next `lanes` (stride 2).
    pub lo: Vec<u16>,
    pub hi: Vec<u16>,
}

impl RowMasks {
    /// The masks for `win` in vectors of `lanes` (at most 16), or `None` for a column
    /// stride other than 1 and 2.
    pub fn new(win: &Window, lanes: usize) -> Option<RowMasks> {
        let sx = win.stride[1];
        if !(1..=2).contains(&sx) {
            return None;
        }
        let (w, ow, kw) = (win.in_hw[1], win.out_hw[1], win.kernel[1]);
        let mut lo = Vec::new();
        let mut hi = Vec::new();
        for ox0 in (0..ow).step_by(lanes) {
            for kx in 0..kw {
                let start = (ox0 * sx + kx) as isize - win.pad_tl[1] as isize;
                lo.push(inside(start, w, lanes));
                hi.push(inside(start + lanes as isize, w, lanes));
            }
        }
        Some(RowMasks { lo, hi })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_masks_the_columns_of_the_row() {
        assert_eq!(inside(0, 16, 16), u16::MAX);
        assert_eq!(inside(0, 20, 16), u16::MAX);
        assert_eq!(inside(-1, 20, 16), 0xFFFE);
        assert_eq!(inside(-3, 5, 16), 0b1111_1000);
        assert_eq!(inside(10, 14, 16), 0b1111);
        assert_eq!(inside(14, 14, 16), 0);
        assert_eq!(inside(-16, 14, 16), 0);
        assert_eq!(inside(-20, 14, 16), 0);
        // Eight lanes: a vector of AVX2.
        assert_eq!(inside(0, 20, 8), 0xFF);
        assert_eq!(inside(-1, 20, 8), 0xFE);
        assert_eq!(inside(2, 7, 8), 0b1_1111);
        assert_eq!(inside(-8, 7, 8), 0);
    }

    #[test]
    fn flat_masks_mark_the_taps_inside_the_plane() {
        // 3×3, pad 1, on a 3×3 plane: output 0 (corner) reads rows 0..=1 and
        // columns 0..=1 of the input only.
        let win = Window {
            in_hw: [3, 3],
            out_hw: [3, 3],
            kernel: [3, 3],
            stride: [1, 1],
            pad_tl: [1, 1],
        };
        let m = FlatMasks::new(&win, 16).unwrap();
        // Tap (0, 0) reads above or left of the plane for output row 0 and column 0
        // (outputs 0, 1, 2, 3, 6); tap (1, 1) reads every output's own pixel; tap (2, 2)
        // reads below or right of it for row 2 and column 2 (outputs 2, 5, 6, 7, 8).
        assert_eq!(m.masks[0], 0b1_1011_0000);
        assert_eq!(m.masks[4], 0b1_1111_1111);
        assert_eq!(m.masks[8], 0b0_0001_1011);
        assert_eq!(m.offs, vec![-4, -3, -2, -1, 0, 1, 2, 3, 4]);
        let narrower = Window {
            out_hw: [3, 2],
            ..win
        };
        assert!(FlatMasks::new(&narrower, 16).is_none());
        // In vectors of 8: output 8 (a corner) is the second block's only lane.
        let m8 = FlatMasks::new(&win, 8).unwrap();
        assert_eq!(m8.masks[0], 0b1011_0000);
        assert_eq!(m8.masks[9], 0b1);
        assert_eq!(m8.masks[9 + 8], 0b0);
    }
}
