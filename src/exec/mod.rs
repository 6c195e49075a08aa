//! Executors decide *how* a [`Model`](crate::format::Model) is computed. The model
//! description says what to compute; an executor is built once from a model (where it
//! may repack weights for its kernels) and then runs any number of forward passes.
//!
//! The seam is deliberately narrow — NCHW f32 in, logits out — so a faster CPU engine or
//! a CUDA executor replaces the reference one without touching the model code.

pub mod cpu;
pub mod cuda;

use crate::error::Result;

/// Runs forward passes of one model. Implementations are immutable after construction,
/// so one executor serves concurrent callers.
pub trait Executor: Send + Sync {
    /// Short name for logs and stats (`"cpu-reference"`, …).
    fn name(&self) -> &'static str;

    /// Computes logits for `batch` samples laid out NCHW in `input`
    /// (`batch × C × H × W` values of the model's input shape).
    /// Returns `batch × classes` logits, row-major.
    fn forward(&self, input: &[f32], batch: usize) -> Result<Vec<f32>>;
}
