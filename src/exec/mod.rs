//! Executors decide *how* a [`Model`](crate::format::Model) is computed. The model
//! description says what to compute; an executor is built once from a model (where it
//! may repack weights for its kernels) and then runs any number of forward passes.
//!
//! The seam is deliberately narrow — NCHW f32 in, logits out — so a faster CPU engine or
//! a CUDA executor replaces the reference one without touching the model code.

pub mod channel_order;
pub mod cpu;
pub mod cuda;
pub mod gating;
pub mod plan;

use crate::error::{Error, Result};

/// What a forward pass computes.
///
/// ```
/// use dynsparse::{demo, Budget, Cut, Gates, Input, Options, Policy, Runtime, TensorData};
/// // The demo model takes 3×64×64 inputs.
/// let x = TensorData::new(vec![1, 3, 64, 64], (0..12288).map(|i| (i % 7) as f32 / 7.0).collect())?;
/// let run = |policy| -> Result<_, dynsparse::Error> {
///     let rt = Runtime::from_bytes(demo::MODEL, Options { policy, ..Options::default() })?;
///     Ok(rt.infer(Input::Tensor(&x))?.remove(0).stats)
/// };
/// // Channel gates keep about half of each gated convolution's output channels.
/// let half = run(Policy::Keep(0.5))?;
/// assert!(half.flops_executed < half.flops_dense);
/// // Spatial gates too: a quarter of the output tiles, the most active ones.
/// let both = run(Policy::Gates(Gates { channels: Cut::Ratio(0.5), tiles: Cut::Ratio(0.25) }))?;
/// assert!(both.flops_executed < half.flops_executed);
/// // A budget: at most 60% of the dense FLOPs, gates' own cost aside.
/// let budget = run(Policy::Budget(Budget::Flops(0.6)))?;
/// assert!(budget.flops_executed - budget.flops_gates <= budget.flops_dense * 3 / 5);
/// # Ok::<(), dynsparse::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Policy {
    /// Every channel of every layer.
    #[default]
    Dense,
    /// Channel gates keep this fraction (0..=1] of each gated convolution's output
    /// channels, chosen per input; the executor rounds the count up to its kernel's tile.
    /// The same as `Gates { channels: Cut::Ratio(r), tiles: Cut::All }`.
    Keep(f64),
    /// Channel and spatial gates, each with its own cut.
    Gates(Gates),
    /// A FLOP budget per input, which the executor's planner turns into per-layer cuts.
    Budget(Budget),
}

/// How one kind of gate cuts, per input and layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cut {
    /// The gate does not run; everything is computed.
    All,
    /// Keep this fraction (0, 1] of the units (channels or tiles) with the highest scores.
    Ratio(f64),
    /// Keep the units whose gate probability is at least this value, in (0, 1). A channel's
    /// probability is the sigmoid of its score (for training-free gates, of its predicted
    /// mean pre-activation output, so 0.5 keeps the channels whose mean pre-activation is
    /// predicted positive); a tile's is `e / (e + m)`, its activation energy `e` against the
    /// layer's mean `m` (0.5 keeps the tiles busier than average). Counts are rounded up
    /// to the kernel's tile, and at least one tile is kept.
    Threshold(f64),
}

/// The cuts of the channel gates and of the spatial (tile) gates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gates {
    /// Output channels of each gated convolution.
    pub channels: Cut,
    /// Output tiles of each convolution with a spatial gate.
    pub tiles: Cut,
}

/// A global cost limit per input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// At most this fraction (0, 1] of the dense FLOPs, the gates' own cost aside (it is
    /// reported separately): the planner keeps the same, largest fraction of channels in
    /// every channel gate that fits.
    Flops(f64),
    /// The same with spatial gates too: one fraction for the channels and the tiles of
    /// every gated layer.
    FlopsWithTiles(f64),
}

impl Policy {
    /// Checks that ratios are in (0, 1] and thresholds in (0, 1).
    pub fn validate(&self) -> Result<()> {
        let ratio = |r: f64, what: &str| {
            if r.is_finite() && r > 0.0 && r <= 1.0 {
                Ok(())
            } else {
                Err(Error::Input(format!("{what} {r} is outside (0, 1]")))
            }
        };
        let cut = |c: Cut, what: &str| match c {
            Cut::All => Ok(()),
            Cut::Ratio(r) => ratio(r, &format!("{what} keep ratio")),
            Cut::Threshold(t) if t > 0.0 && t < 1.0 => Ok(()),
            Cut::Threshold(t) => Err(Error::Input(format!(
                "{what} threshold {t} is outside (0, 1)"
            ))),
        };
        match *self {
            Policy::Dense => Ok(()),
            Policy::Keep(r) => ratio(r, "keep ratio"),
            Policy::Gates(g) => cut(g.channels, "channel").and(cut(g.tiles, "tile")),
            Policy::Budget(Budget::Flops(f) | Budget::FlopsWithTiles(f)) => ratio(f, "FLOP budget"),
        }
    }
}

/// The result of [`Executor::forward_with`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Forward {
    /// `batch × classes` logits.
    pub logits: Vec<f32>,
    /// FLOPs executed per sample, gates included; `None` when the pass was dense.
    pub flops: Option<Vec<u64>>,
    /// Of those, FLOPs the gates spent deciding, per sample.
    pub gate_flops: Option<Vec<u64>>,
    /// Per node, per sample: the output channels computed (`None`: all of them).
    pub kept: Vec<Option<Vec<Vec<usize>>>>,
    /// Per node, per sample: the output tiles computed (`None`: all of them); see
    /// [`gating::cpu_tiling`] for the geometry.
    pub tiles: Vec<Option<Vec<Vec<usize>>>>,
    /// Per node: wall time and FLOPs per sample (empty for executors that do not trace).
    pub layers: Vec<LayerTrace>,
}

/// Cost of one node in one forward pass.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LayerTrace {
    /// Wall time of the node for the whole batch, in milliseconds. On the CPU engine a
    /// depthwise layer that runs band by band inside the 1×1 expansion before it shows 0,
    /// and the expansion's time includes it; where a big batch runs its first nodes in
    /// parts, the parts' times are summed, and parts run side by side on different
    /// threads, so those nodes' times can add up to more than the pass took.
    pub ms: f64,
    /// Of which the node's gates took deciding, in milliseconds.
    pub gate_ms: f64,
    /// FLOPs executed per sample, the node's gates included.
    pub flops: Vec<u64>,
}

/// Runs forward passes of one model. Implementations are immutable after construction,
/// so one executor serves concurrent callers.
pub trait Executor: Send + Sync {
    /// Short name for logs and stats (`"cpu-reference"`, …).
    fn name(&self) -> &'static str;

    /// Computes logits for `batch` samples laid out NCHW in `input`
    /// (`batch × C × H × W` values of the model's input shape).
    /// Returns `batch × classes` logits, row-major.
    fn forward(&self, input: &[f32], batch: usize) -> Result<Vec<f32>>;

    /// A forward pass under `policy`. Executors without dynamic execution run
    /// [`Policy::Dense`] only.
    fn forward_with(&self, input: &[f32], batch: usize, policy: Policy) -> Result<Forward> {
        match policy {
            Policy::Dense => Ok(Forward {
                logits: self.forward(input, batch)?,
                ..Forward::default()
            }),
            _ => Err(Error::Input(format!(
                "the {} executor runs dense only",
                self.name()
            ))),
        }
    }
}
