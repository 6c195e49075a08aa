//! CPU executors: the fast engine (packed GEMM with SIMD micro-kernels) and the Candle
//! reference it is tested against.

mod depthwise;
mod engine;
pub mod gemm;
mod ops;
mod pool;
mod reference;

pub use engine::EngineExecutor;
pub use reference::ReferenceExecutor;
