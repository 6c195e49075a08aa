//! The hardware profile behind `dynsparse profile`: the CPU engine's latency against the
//! number of kept output channels and of kept tiles for representative layer shapes — the
//! tail-effect staircase — and the channel granularity chosen from it, which the planner
//! then rounds kept channel counts to ([`crate::Options::channel_round`]).
//!
//! A micro-kernel computes whole tiles of rows, so a gated layer's time is flat between
//! multiples of its row tile and steps at each; keeping a count just past a step costs a
//! whole tile. [`choose_round`] picks the largest rounding whose extra kept channels cost
//! at most [`ROUND_COST`] more time for 9 counts in 10: channels inside a step are free,
//! a rounding that crosses steps is not.
//!
//! ```
//! use dynsparse::profile::{choose_round, Staircase, PairShape, Unit};
//! // Time steps every 4 channels: rounding up to 4 is free, to 8 is not.
//! let ms: Vec<f64> = (1..=16).map(|k: usize| 1.0 + k.div_ceil(4) as f64).collect();
//! let stair = Staircase {
//!     shape: PairShape { cin: 8, cout: 16, k: 3, hw: 8 },
//!     unit: Unit::Channels,
//!     counts: (1..=16).collect(),
//!     ms,
//!     reader_ms: Vec::new(),
//! };
//! assert_eq!(choose_round(&[stair]), 4);
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::exec::cpu::EngineExecutor;
use crate::exec::cuda::{CudaExecutor, Device};
use crate::exec::plan::{random_subset, SamplePlan, Tiling};
use crate::exec::{Cut, Executor, Gates, Policy};
use crate::synthetic::{conv_chain, pseudo_random, ConvSpec};

/// Version of the profile file this build writes and reads.
pub const PROFILE_VERSION: u32 = 1;

/// Largest time ratio (rounded count / exact count) a rounding may cost, for 9 counts
/// in 10.
pub const ROUND_COST: f64 = 1.05;

/// A layer pair to profile: a gated k×k convolution `cin → cout` (stride 1, same padding)
/// at `hw × hw`, and the convolution reading it (`cout → cin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairShape {
    /// Input channels of the gated convolution (and output channels of its reader).
    pub cin: usize,
    /// Output channels of the gated convolution: the units a channel staircase cuts.
    pub cout: usize,
    /// Square kernel edge of both convolutions.
    pub k: usize,
    /// Input and output height and width.
    pub hw: usize,
}

/// What a staircase cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// The gated convolution's output channels (the time is both convolutions').
    Channels,
    /// The reading convolution's output tiles (the time is that convolution's).
    Tiles,
}

/// Median latency against kept units for one layer pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Staircase {
    /// The layers.
    pub shape: PairShape,
    /// What was cut.
    pub unit: Unit,
    /// Kept units, ascending.
    pub counts: Vec<usize>,
    /// Median milliseconds at each count.
    pub ms: Vec<f64>,
    /// Channel staircases: the reading convolution's own median at each count (it grows
    /// with its kept inputs while the gated one steps at row tiles); empty for tiles.
    #[serde(default)]
    pub reader_ms: Vec<f64>,
}

/// A measured hardware profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// See [`PROFILE_VERSION`].
    pub version: u32,
    /// The engine's micro-kernel (its executor name, e.g. `cpu-engine-avx2`), or `cuda`.
    pub executor: String,
    /// The GPU a `cuda` profile was measured on; `None` on the CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Worker threads during the measurement (1 on a GPU: one host thread launches).
    pub threads: usize,
    /// Samples per timed pass, each with its own plan.
    #[serde(default = "one")]
    pub batch: usize,
    /// Rows of the micro-kernel's tile (on a GPU: output channels per block tile).
    pub kernel_rows: usize,
    /// Kept channel counts round up to a multiple of this ([`choose_round`]).
    pub channel_round: usize,
    /// The measurements.
    pub stairs: Vec<Staircase>,
}

/// Channel staircases `dynsparse profile` measures by default: a 3×3 pair at 28×28, one
/// at 14×14, and a 1×1 pair.
pub const CHANNEL_SHAPES: [PairShape; 3] = [
    PairShape {
        cin: 64,
        cout: 96,
        k: 3,
        hw: 28,
    },
    PairShape {
        cin: 128,
        cout: 64,
        k: 3,
        hw: 14,
    },
    PairShape {
        cin: 256,
        cout: 64,
        k: 1,
        hw: 14,
    },
];

/// Channel staircases `dynsparse profile --device cuda` measures by default: wider
/// layers, since the GPU kernels step at block tiles of
/// [`CHANNEL_TILE`](crate::exec::cuda::CHANNEL_TILE) channels — ResNet-50's 3×3 of
/// layer 3 fed by 128 channels, and its 1×1 pair (1024 → 256 → 1024) at 14×14.
pub const CUDA_CHANNEL_SHAPES: [PairShape; 2] = [
    PairShape {
        cin: 128,
        cout: 256,
        k: 3,
        hw: 14,
    },
    PairShape {
        cin: 1024,
        cout: 256,
        k: 1,
        hw: 14,
    },
];

/// The tile staircase's layers: 3×3 64→64 at 28×28 (49 tiles of 4×4).
pub const TILE_SHAPE: PairShape = PairShape {
    cin: 64,
    cout: 64,
    k: 3,
    hw: 28,
};

fn one() -> usize {
    1
}

fn pair(s: PairShape) -> Result<crate::Model> {
    let conv = |cout| ConvSpec {
        cout,
        k: s.k,
        stride: 1,
        depthwise: false,
    };
    conv_chain(s.cin, s.hw, &[conv(s.cout), conv(s.cin)])
}

/// The staircases to measure: a channel staircase per shape, then the tile staircase;
/// an error for a shape with a zero dimension.
fn staircases(shapes: &[PairShape], tiles: Option<PairShape>) -> Result<Vec<(PairShape, Unit)>> {
    let all: Vec<(PairShape, Unit)> = shapes
        .iter()
        .map(|&s| (s, Unit::Channels))
        .chain(tiles.map(|s| (s, Unit::Tiles)))
        .collect();
    match all
        .iter()
        .find(|(s, _)| s.cin == 0 || s.cout == 0 || s.k == 0 || s.hw == 0)
    {
        Some((s, _)) => Err(Error::Input(format!("{s:?} has a zero dimension"))),
        None => Ok(all),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures channel staircases for `shapes` (every count from 1 to `cout`, rounding off)
/// and a tile staircase for `tiles`, over `runs` interleaved rounds, on the calling
/// thread's rayon pool; `progress(done, total)` after each round.
pub fn measure(
    shapes: &[PairShape],
    tiles: Option<PairShape>,
    runs: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Profile> {
    if runs == 0 {
        return Err(Error::Input("a profile needs at least one run".into()));
    }
    struct Job {
        engine: EngineExecutor,
        input: Vec<f32>,
        shape: PairShape,
        unit: Unit,
        times: Vec<Vec<f64>>,
        reader: Vec<Vec<f64>>,
        counts: Vec<usize>,
    }
    let mut jobs = Vec::new();
    let mut kernel_rows = 1;
    let mut executor = String::new();
    for (shape, unit) in staircases(shapes, tiles)? {
        let engine = EngineExecutor::new(&pair(shape)?)?;
        kernel_rows = engine.channel_round();
        executor = engine.name().to_string();
        let units = match unit {
            Unit::Channels => shape.cout,
            Unit::Tiles => {
                crate::exec::gating::cpu_tiling(shape.hw, shape.hw)
                    .ok_or_else(|| {
                        Error::Input(format!(
                            "{}×{} does not split into whole tiles",
                            shape.hw, shape.hw
                        ))
                    })?
                    .tiles
            }
        };
        jobs.push(Job {
            engine: engine.with_channel_round(1),
            input: pseudo_random(shape.cin * shape.hw * shape.hw, 7),
            shape,
            unit,
            times: vec![Vec::new(); units + 1],
            reader: vec![Vec::new(); units + 1],
            counts: Vec::new(),
        });
    }
    // A ratio just under k / units keeps exactly k units once rounding is off.
    let policy = |unit: Unit, k: usize, units: usize| {
        let r = (k as f64 / units as f64 - 1e-9).min(1.0);
        match unit {
            Unit::Channels => Policy::Keep(r),
            Unit::Tiles => Policy::Gates(Gates {
                channels: Cut::All,
                tiles: Cut::Ratio(r),
            }),
        }
    };
    // One warm-up round, then counts interleaved within each round so drift hits all alike.
    for round in 0..=runs {
        for job in &mut jobs {
            let units = job.times.len() - 1;
            for k in 1..=units {
                let f = job
                    .engine
                    .forward_with(&job.input, 1, policy(job.unit, k, units))?;
                if round == 0 {
                    continue;
                }
                let (kept, ms) = match job.unit {
                    Unit::Channels => {
                        job.reader[k].push(f.layers[1].ms);
                        (k, f.layers[0].ms + f.layers[1].ms)
                    }
                    // Tile counts round to whole GEMM panels: record what ran.
                    Unit::Tiles => (
                        f.tiles[1].as_ref().map_or(units, |t| t[0].len()),
                        f.layers[1].ms,
                    ),
                };
                job.times[kept].push(ms);
            }
        }
        if round > 0 {
            progress(round, runs);
        }
    }
    let stairs = jobs
        .into_iter()
        .map(|mut job| {
            for (k, t) in job.times.iter().enumerate() {
                if !t.is_empty() {
                    job.counts.push(k);
                }
            }
            let ms = job
                .counts
                .iter()
                .map(|&k| median(&mut job.times[k]))
                .collect();
            let reader_ms = match job.unit {
                Unit::Channels => job
                    .counts
                    .iter()
                    .map(|&k| median(&mut job.reader[k]))
                    .collect(),
                Unit::Tiles => Vec::new(),
            };
            Staircase {
                shape: job.shape,
                unit: job.unit,
                counts: job.counts,
                ms,
                reader_ms,
            }
        })
        .collect::<Vec<_>>();
    let channel_round = choose_round(&stairs);
    Ok(Profile {
        version: PROFILE_VERSION,
        executor,
        device: None,
        threads: rayon::current_num_threads(),
        batch: 1,
        kernel_rows,
        channel_round,
        stairs,
    })
}

/// Plans for one point of a staircase on the CUDA executor, whose nodes are [`pair`]'s
/// (`shapes` from [`CudaExecutor::conv_shapes`]): with [`Unit::Channels`] the first
/// convolution keeps `k` random output channels and the second reads those as its only
/// inputs; with [`Unit::Tiles`] the second keeps `k` random output tiles. Every sample
/// draws its own subset, as gates would.
fn stair_plans(
    shapes: &[Option<(usize, usize, Tiling, bool)>],
    unit: Unit,
    k: usize,
    batch: usize,
    rng: &mut impl Rng,
) -> Result<Vec<Option<Vec<SamplePlan>>>> {
    let (Some((c0, i0, t0, _)), Some((c1, i1, t1, _))) = (
        shapes.first().copied().flatten(),
        shapes.get(1).copied().flatten(),
    ) else {
        return Err(Error::Exec("a staircase needs two convolutions".into()));
    };
    let mut first = Vec::with_capacity(batch);
    let mut second = Vec::with_capacity(batch);
    for _ in 0..batch {
        let mut a = SamplePlan::dense(c0, i0, t0.tiles);
        let mut b = SamplePlan::dense(c1, i1, t1.tiles);
        match unit {
            Unit::Channels => {
                a.oc = random_subset(rng, c0, k);
                b.ic = a.oc.clone();
            }
            Unit::Tiles => b.tiles = random_subset(rng, t1.tiles, k),
        }
        first.push(a);
        second.push(b);
    }
    let mut plans = vec![Some(first), Some(second)];
    plans.resize(shapes.len(), None);
    Ok(plans)
}

/// [`measure`] on a CUDA GPU: the same layer pairs through [`CudaExecutor`] at `batch`
/// samples per pass (each with its own random subset of the kept count), every count
/// timed as the whole captured pass with device events, 3 replays per count in each of
/// `runs` interleaved rounds after one warm-up round. The pass's fixed costs (input
/// copy-in layout, pooling, classifier) are in every count alike. The last count keeps
/// everything: its plan is dense and replays the dense graph, whose 16-byte copy path
/// makes it faster than the count below it (measured on an H200: 0.436 against
/// 0.549 ms at batch 64).
pub fn measure_cuda(
    dev: &Device,
    shapes: &[PairShape],
    tiles: Option<PairShape>,
    batch: usize,
    runs: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Profile> {
    if runs == 0 {
        return Err(Error::Input("a profile needs at least one run".into()));
    }
    if batch == 0 {
        return Err(Error::Input("batch must be at least 1".into()));
    }
    struct Job {
        exec: CudaExecutor,
        shapes: Vec<Option<(usize, usize, Tiling, bool)>>,
        shape: PairShape,
        unit: Unit,
        times: Vec<Vec<f64>>,
    }
    let mut jobs = Vec::new();
    for (shape, unit) in staircases(shapes, tiles)? {
        let exec = CudaExecutor::new(&pair(shape)?, dev.clone())?;
        // Allocates this batch size's buffers and captures nothing yet.
        exec.run(
            &pseudo_random(batch * shape.cin * shape.hw * shape.hw, 7),
            batch,
        )?;
        let conv_shapes = exec.conv_shapes();
        let units = match (unit, conv_shapes.get(1).copied().flatten()) {
            (Unit::Channels, _) => shape.cout,
            (Unit::Tiles, Some((_, _, t, _))) => t.tiles,
            (Unit::Tiles, None) => return Err(Error::Exec("no second convolution".into())),
        };
        jobs.push(Job {
            exec,
            shapes: conv_shapes,
            shape,
            unit,
            times: vec![Vec::new(); units + 1],
        });
    }
    let mut rng = StdRng::seed_from_u64(7);
    for round in 0..=runs {
        for job in &mut jobs {
            let units = job.times.len() - 1;
            for k in 1..=units {
                let plans = stair_plans(&job.shapes, job.unit, k, batch, &mut rng)?;
                job.exec.set_plans(batch, &plans)?;
                let t = job.exec.time_replays(batch, 1, 3)?;
                if round > 0 {
                    job.times[k].extend(t.into_iter().map(f64::from));
                }
            }
        }
        if round > 0 {
            progress(round, runs);
        }
    }
    let stairs: Vec<Staircase> = jobs
        .into_iter()
        .map(|mut job| {
            let counts: Vec<usize> = (1..job.times.len()).collect();
            let ms = counts.iter().map(|&k| median(&mut job.times[k])).collect();
            Staircase {
                shape: job.shape,
                unit: job.unit,
                counts,
                ms,
                reader_ms: Vec::new(),
            }
        })
        .collect();
    Ok(Profile {
        version: PROFILE_VERSION,
        executor: "cuda".into(),
        device: Some(format!("{dev:?}")),
        threads: 1,
        batch,
        kernel_rows: crate::exec::cuda::CHANNEL_TILE,
        channel_round: choose_round(&stairs),
        stairs,
    })
}

/// The largest rounding in 1..=16 under which, on every channel staircase, keeping each
/// count rounded up (within the layer) costs at most [`ROUND_COST`] times the exact
/// count's time, for 9 counts in 10 (the 90th percentile, so one noisy count does not
/// decide). 1 when no staircase has every count.
pub fn choose_round(stairs: &[Staircase]) -> usize {
    let cost = |s: &Staircase, r: usize| -> Option<f64> {
        let top = *s.counts.last()?;
        let at = |k: usize| s.counts.binary_search(&k).ok().map(|i| s.ms[i]);
        let mut ratios = Vec::new();
        for k in (1..=top).filter(|k| k % r != 0) {
            let up = (k.div_ceil(r) * r).min(top);
            ratios.push(at(up)? / at(k)?);
        }
        ratios.sort_by(f64::total_cmp);
        Some(if ratios.is_empty() {
            1.0
        } else {
            ratios[((ratios.len() - 1) as f64 * 0.9).round() as usize]
        })
    };
    let channel: Vec<&Staircase> = stairs.iter().filter(|s| s.unit == Unit::Channels).collect();
    (1..=16)
        .rev()
        .find(|&r| {
            !channel.is_empty()
                && channel
                    .iter()
                    .all(|s| cost(s, r).is_some_and(|c| c <= ROUND_COST))
        })
        .unwrap_or(1)
}

impl Profile {
    /// Reads a profile written by `dynsparse profile`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let p: Profile = serde_json::from_str(&text).map_err(|e| {
            Error::Input(format!("{}: not a dynsparse profile ({e})", path.display()))
        })?;
        if p.version != PROFILE_VERSION {
            return Err(Error::Input(format!(
                "{}: profile version {} (this build reads {PROFILE_VERSION})",
                path.display(),
                p.version
            )));
        }
        if p.channel_round == 0 {
            return Err(Error::Input(format!(
                "{}: channel_round must be at least 1",
                path.display()
            )));
        }
        Ok(p)
    }

    /// The channel granularity to plan with on this machine: an error when the profile
    /// was measured with another micro-kernel than the one this CPU runs.
    pub fn channel_round_here(&self) -> Result<usize> {
        let here = crate::exec::cpu::gemm::Isa::detect().engine_name();
        if self.executor != here {
            return Err(Error::Input(format!(
                "the profile was measured with {}, this machine runs {here}; measure one \
                 here with `dynsparse profile`",
                self.executor
            )));
        }
        Ok(self.channel_round)
    }

    /// Writes the profile as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Exec(format!("cannot write the profile: {e}")))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stair(step: usize, top: usize, noise: f64) -> Staircase {
        Staircase {
            shape: PairShape {
                cin: 8,
                cout: top,
                k: 3,
                hw: 8,
            },
            unit: Unit::Channels,
            counts: (1..=top).collect(),
            reader_ms: Vec::new(),
            ms: (1..=top)
                .map(|k| 1.0 + k.div_ceil(step) as f64 + noise * ((k * 7) % 3) as f64)
                .collect(),
        }
    }

    #[test]
    fn cuda_stair_plans_cut_what_they_say() {
        let t = |tiles| Tiling {
            g: 4,
            tiles_w: 2,
            tiles,
        };
        let shapes = vec![
            Some((24, 16, t(4), false)),
            Some((16, 24, t(9), false)),
            None,
            None,
        ];
        let mut rng = crate::exec::cpu::fresh_rng();
        for k in [1, 5, 24] {
            let p = stair_plans(&shapes, Unit::Channels, k, 3, &mut rng).unwrap();
            assert_eq!(p.len(), 4);
            assert!(p[2].is_none() && p[3].is_none());
            let (a, b) = (p[0].as_ref().unwrap(), p[1].as_ref().unwrap());
            assert_eq!((a.len(), b.len()), (3, 3));
            for (a, b) in a.iter().zip(b) {
                assert_eq!(a.oc.len(), k);
                assert!(a.oc.windows(2).all(|w| w[0] < w[1]) && a.oc.iter().all(|&c| c < 24));
                assert_eq!((a.ic.len(), a.tiles.len()), (16, 4));
                assert_eq!(b.ic, a.oc);
                assert_eq!((b.oc.len(), b.tiles.len()), (16, 9));
            }
        }
        let p = stair_plans(&shapes, Unit::Tiles, 7, 2, &mut rng).unwrap();
        let (a, b) = (p[0].as_ref().unwrap(), p[1].as_ref().unwrap());
        for (a, b) in a.iter().zip(b) {
            assert!(a.is_dense(24, 16, 4));
            assert_eq!((b.oc.len(), b.ic.len(), b.tiles.len()), (16, 24, 7));
            assert!(b.tiles.iter().all(|&t| t < 9));
        }
        assert!(stair_plans(&shapes[..1], Unit::Tiles, 1, 1, &mut rng).is_err());
    }

    #[test]
    fn rounding_follows_the_steps() {
        assert_eq!(choose_round(&[stair(6, 96, 0.0)]), 6);
        assert_eq!(choose_round(&[stair(4, 64, 0.01)]), 4);
        // Two layers: only a rounding free on both.
        assert_eq!(choose_round(&[stair(6, 96, 0.0), stair(4, 64, 0.0)]), 2);
        // Time proportional to the count: no free rounding.
        let linear = Staircase {
            ms: (1..=32).map(|k| k as f64).collect(),
            ..stair(1, 32, 0.0)
        };
        assert_eq!(choose_round(&[linear]), 1);
        // No channel staircase, or a staircase with holes: no rounding.
        assert_eq!(choose_round(&[]), 1);
        let mut holes = stair(6, 96, 0.0);
        holes.counts.remove(10);
        holes.ms.remove(10);
        assert_eq!(choose_round(&[holes]), 1);
    }
}
