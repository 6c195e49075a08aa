//! CPU executors: the fast engine (packed GEMM with SIMD micro-kernels) and the Candle
//! reference it is tested against.

mod bands;
mod depthwise;
#[cfg(target_arch = "x86_64")]
mod depthwise_avx2;
#[cfg(target_arch = "x86_64")]
mod depthwise_avx512;
#[cfg(target_arch = "x86_64")]
mod depthwise_lanes;
#[cfg(target_arch = "x86_64")]
mod depthwise_masks;
mod engine;
mod gate_scores;
pub mod gemm;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod linear;
pub(crate) mod ops;
#[cfg(target_arch = "x86_64")]
mod partial_avx2;
pub mod peak;
mod pool;
mod reference;
pub mod thread_choice;
mod transposed;
mod tuning;
mod winograd;
mod winograd_f4;
#[cfg(target_arch = "x86_64")]
mod winograd_lines;
mod workers;

pub use engine::EngineExecutor;
pub use reference::ReferenceExecutor;
pub use tuning::Tuning;

/// A random generator with a fresh seed per run, printed so a failure can be replayed:
/// `DYNSPARSE_TEST_SEED=S cargo test NAME` runs with seed S.
#[cfg(test)]
pub(crate) fn fresh_rng() -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("DYNSPARSE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("seed {seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// The micro-kernel paths this CPU runs, widest first: every one a test should cover.
#[cfg(test)]
pub(crate) fn test_isas() -> Vec<gemm::Isa> {
    use gemm::Isa;
    match Isa::detect() {
        Isa::Avx512 => vec![Isa::Avx512, Isa::Avx2, Isa::Portable],
        Isa::Avx2 => vec![Isa::Avx2, Isa::Portable],
        Isa::Portable => vec![Isa::Portable],
    }
}
