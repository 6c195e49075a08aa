//! Executors decide *how* a [`Model`](crate::format::Model) is computed. The model
//! description says what to compute; an executor is built once from a model (where it
//! may repack weights for its kernels) and then runs any number of forward passes.
//!
//! The seam is deliberately narrow — NCHW f32 in, logits out — so a faster CPU engine or
//! a CUDA executor replaces the reference one without touching the model code.

pub mod cpu;
pub mod cuda;
pub mod gating;
pub mod plan;

use crate::error::{Error, Result};

/// What a forward pass computes.
///
/// ```
/// use dynsparse::{demo, Input, Options, Policy, Runtime, TensorData};
/// let opts = Options { policy: Policy::Keep(0.5), ..Options::default() };
/// let rt = Runtime::from_bytes(demo::MODEL, opts)?;
/// let x = TensorData::new(vec![1, 3, 32, 32], (0..3072).map(|i| (i % 7) as f32 / 7.0).collect())?;
/// let p = &rt.infer(Input::Tensor(&x))?[0];
/// assert!(p.stats.flops_executed < p.stats.flops_dense); // gates kept about half
/// # Ok::<(), dynsparse::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Policy {
    /// Every channel of every layer.
    #[default]
    Dense,
    /// Channel gates keep this fraction (0..=1] of each gated convolution's output
    /// channels, chosen per input; the executor rounds the count up to its kernel's tile.
    Keep(f64),
}

/// The result of [`Executor::forward_with`].
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// `batch × classes` logits.
    pub logits: Vec<f32>,
    /// FLOPs executed per sample, gates included; `None` when the pass was dense.
    pub flops: Option<Vec<u64>>,
    /// Per node, per sample: the output channels computed (`None`: all of them).
    pub kept: Vec<Option<Vec<Vec<usize>>>>,
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
                flops: None,
                kept: Vec::new(),
            }),
            Policy::Keep(_) => Err(Error::Input(format!(
                "the {} executor runs dense only",
                self.name()
            ))),
        }
    }
}
