//! The plan contract between gates and kernels: per convolution and sample, the kept
//! output channels, kept input channels and kept output tiles, as sorted index lists. The
//! CUDA executor copies them into device buffers sized for the worst case, where its
//! kernels read counts and indices.

use rand::seq::index::sample;
use rand::Rng;

/// Geometry of one convolution's spatial tiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Tile edge in output pixels.
    pub g: usize,
    /// Tiles per row.
    pub tiles_w: usize,
    /// Tiles per sample.
    pub tiles: usize,
}

impl Tiling {
    /// The tiling the CUDA executor uses for an `oh × ow` output: the largest edge in
    /// 8..=4 that divides both sides (no partial edge tiles), else the whole output
    /// when it is at most 8 pixels across, else 8.
    pub fn for_output(oh: usize, ow: usize) -> Tiling {
        let g = (4..=8)
            .rev()
            .find(|&g| oh.is_multiple_of(g) && ow.is_multiple_of(g))
            .unwrap_or(if oh.max(ow) <= 8 { oh.max(ow) } else { 8 });
        Tiling::with_edge(oh, ow, g)
    }

    /// A tiling with edge `g`.
    pub fn with_edge(oh: usize, ow: usize, g: usize) -> Tiling {
        let g = g.max(1);
        let tiles_w = ow.div_ceil(g);
        Tiling {
            g,
            tiles_w,
            tiles: oh.div_ceil(g) * tiles_w,
        }
    }

    /// Output pixels of tile `t` that lie inside an `oh × ow` image.
    pub fn pixels_in(&self, t: usize, oh: usize, ow: usize) -> usize {
        let (ty, tx) = (t / self.tiles_w, t % self.tiles_w);
        let rows = oh.saturating_sub(ty * self.g).min(self.g);
        let cols = ow.saturating_sub(tx * self.g).min(self.g);
        rows * cols
    }
}

/// What one sample computes in one convolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplePlan {
    /// Kept output channels, sorted.
    pub oc: Vec<i32>,
    /// Kept input channels, sorted (for depthwise, equal to `oc`).
    pub ic: Vec<i32>,
    /// Kept output tiles, sorted.
    pub tiles: Vec<i32>,
}

impl SamplePlan {
    /// Everything kept.
    pub fn dense(cout: usize, cin: usize, tiles: usize) -> Self {
        SamplePlan {
            oc: (0..cout as i32).collect(),
            ic: (0..cin as i32).collect(),
            tiles: (0..tiles as i32).collect(),
        }
    }

    /// Whether this plan keeps everything of a `cout × cin × tiles` convolution.
    pub fn is_dense(&self, cout: usize, cin: usize, tiles: usize) -> bool {
        self.oc.len() == cout && self.ic.len() == cin && self.tiles.len() == tiles
    }
}

/// `k` sorted distinct indices below `n` (at least one when `n > 0`).
pub fn random_subset(rng: &mut impl Rng, n: usize, k: usize) -> Vec<i32> {
    let k = k.clamp(usize::from(n > 0), n);
    let mut v: Vec<i32> = sample(rng, n, k).into_iter().map(|i| i as i32).collect();
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::cpu::fresh_rng;

    /// The kernels map position `j` of a plan to (tile, pixel) exactly like this: the
    /// emulation must visit every kept in-image pixel once and nothing else.
    fn kernel_positions(t: &Tiling, tiles: &[i32], oh: usize, ow: usize) -> Vec<(usize, usize)> {
        let gg = t.g * t.g;
        (0..tiles.len() * gg)
            .filter_map(|j| {
                let tile = tiles[j / gg] as usize;
                let r = j % gg;
                let oy = (tile / t.tiles_w) * t.g + r / t.g;
                let ox = (tile % t.tiles_w) * t.g + r % t.g;
                (oy < oh && ox < ow).then_some((oy, ox))
            })
            .collect()
    }

    #[test]
    fn tile_plans_cover_each_kept_pixel_once() {
        let mut rng = fresh_rng();
        for _ in 0..300 {
            let (oh, ow) = (rng.random_range(1..40usize), rng.random_range(1..40usize));
            let t = if rng.random_bool(0.5) {
                Tiling::for_output(oh, ow)
            } else {
                Tiling::with_edge(oh, ow, rng.random_range(1..10))
            };
            let k = rng.random_range(0..=t.tiles);
            let kept = random_subset(&mut rng, t.tiles, k);
            let mut seen = kernel_positions(&t, &kept, oh, ow);
            let expected: usize = kept.iter().map(|&x| t.pixels_in(x as usize, oh, ow)).sum();
            assert_eq!(seen.len(), expected);
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), expected, "a pixel was visited twice");
            for (oy, ox) in seen {
                let tile = (oy / t.g) * t.tiles_w + ox / t.g;
                assert!(kept.binary_search(&(tile as i32)).is_ok());
            }
        }
        // Every tile kept covers the image exactly.
        let t = Tiling::for_output(7, 7);
        assert_eq!((t.g, t.tiles), (7, 1));
        let t = Tiling::for_output(56, 56);
        assert_eq!((t.g, t.tiles_w, t.tiles), (8, 7, 49));
        let t = Tiling::for_output(28, 28);
        assert_eq!(t.g, 7);
        let all: Vec<i32> = (0..t.tiles as i32).collect();
        assert_eq!(kernel_positions(&t, &all, 28, 28).len(), 28 * 28);
    }

    #[test]
    fn random_subsets_are_sorted_distinct_and_in_range() {
        let mut rng = fresh_rng();
        for _ in 0..200 {
            let n = rng.random_range(0..100usize);
            let k = rng.random_range(0..=n + 3);
            let v = random_subset(&mut rng, n, k);
            assert_eq!(v.len(), k.clamp(usize::from(n > 0), n));
            assert!(v.windows(2).all(|w| w[0] < w[1]));
            assert!(v.iter().all(|&i| (i as usize) < n));
        }
    }
}
