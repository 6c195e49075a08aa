//! Host side of the plan contract for the CUDA kernels: per convolution and sample, the
//! kept output channels, kept input channels and kept output tiles, as sorted index
//! lists. The executor copies them into device buffers sized for the worst case; the
//! kernels read counts and indices there.

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
