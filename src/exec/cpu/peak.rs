//! The ceiling a convolution's GFLOP/s is judged against: the widest micro-kernel of this
//! CPU run over one K block of A and one panel of B that stay in L1, so that it waits on
//! nothing but its own multiply-adds.
//!
//! On a shared machine whose speed moves by up to 2× within minutes (this project's
//! VMs did), a layer's GFLOP/s means little without the ceiling measured in the same
//! minutes: `dynsparse bench --layers` times a short burst of this after every turn of
//! the policies and reports each layer against the median.
//!
//! ```
//! use dynsparse::exec::cpu::gemm::Isa;
//! use dynsparse::exec::cpu::peak;
//! let gflops = peak::burst(Isa::detect(), 2, 200);
//! assert!(gflops.is_finite() && gflops > 0.0);
//! ```

use std::time::Instant;

use super::gemm::{self, Acc, Isa, Tile, KC, NR};

/// Multiply-adds of `tiles` micro-tiles of `rows` rows, as FLOPs (two each).
fn flops(tiles: usize, rows: usize) -> f64 {
    (tiles * rows * NR * KC * 2) as f64
}

/// Seconds this thread takes to run `reps` micro-tiles on L1-resident operands.
pub fn seconds(isa: Isa, reps: usize) -> f64 {
    let rows = isa.mr();
    let a: Vec<f32> = (0..gemm::packed_a_len(rows, KC))
        .map(|i| (i % 7) as f32 * 0.01)
        .collect();
    let panel: Vec<f32> = (0..KC * NR).map(|i| (i % 5) as f32 * 0.01).collect();
    let idx: Vec<usize> = (0..NR).collect();
    let tile = Tile {
        a: &a,
        ka: KC,
        arows: &idx[..rows],
        kmap: None,
        boff: None,
        k: KC,
        rows: &idx[..rows],
        panel: &panel,
        ldb: NR,
        ldc: NR,
        cols: &idx,
        lanes: None,
    };
    let mut acc: Acc = [[0.0; NR]; 12];
    let start = Instant::now();
    for _ in 0..reps {
        // SAFETY: A holds `rows` packed rows of KC columns, the panel KC × NR floats,
        // and the tile reads no further (see `Tile`).
        unsafe { gemm::accumulate(isa, &tile, 0, KC, &mut acc) };
        std::hint::black_box(&mut acc);
    }
    start.elapsed().as_secs_f64()
}

/// GFLOP/s of `reps` micro-tiles on one thread.
pub fn one_thread(isa: Isa, reps: usize) -> f64 {
    flops(reps, isa.mr()) / seconds(isa, reps).max(1e-12) / 1e9
}

/// GFLOP/s in all of `threads` threads each running `reps` micro-tiles at once, over
/// the wall time of the slowest: what a layer split over that many threads could reach.
/// Workers lingering after a pass ([`super::EngineExecutor::with_linger`]) stop first:
/// spinning, one took a core from the burst (276 GFLOP/s on two threads of the Zen 5 VM
/// against 521).
pub fn burst(isa: Isa, threads: usize, reps: usize) -> f64 {
    super::workers::stop_lingering();
    let threads = threads.max(1);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| seconds(isa, reps));
        }
    });
    flops(reps * threads, isa.mr()) / start.elapsed().as_secs_f64().max(1e-12) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One 12-row tile over a K block is 12 · 32 · 192 multiply-adds.
    #[test]
    fn a_tile_counts_its_multiply_adds_twice() {
        assert_eq!(flops(1, 12), 147_456.0);
        assert_eq!(flops(3, 6), 3.0 * 6.0 * 32.0 * 192.0 * 2.0);
    }
}
