//! The ceiling every convolution's GFLOP/s is judged against: the CPU engine's widest
//! micro-kernel (12 × 32 on AVX-512) run over one K block of A and B that stay in L1,
//! on one thread and then on every core at once. Per-layer figures from
//! `dynsparse bench --layers` divided by these say how much of the machine a layer uses.
//!
//! usage: cargo run --release --example kernel_peak -- [--reps N]

use std::time::Instant;

use dynsparse::exec::cpu::gemm::{self, Acc, Isa, Tile, KC, NR};

/// Multiply-adds counted as two FLOPs, as everywhere in dynsparse.
fn gflops(tiles: usize, rows: usize, seconds: f64) -> f64 {
    (tiles * rows * NR * KC * 2) as f64 / seconds / 1e9
}

/// Runs `reps` tiles on this thread and returns the seconds taken.
fn run(isa: Isa, reps: usize) -> f64 {
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
        // SAFETY: A holds `rows` packed rows of KC columns, the panel KC × NR floats.
        unsafe { gemm::accumulate(isa, &tile, 0, KC, &mut acc) };
        std::hint::black_box(&mut acc);
    }
    start.elapsed().as_secs_f64()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut reps = 200_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--reps" => reps = args.next().ok_or("--reps needs a value")?.parse()?,
            _ => return Err(format!("unknown option {a}").into()),
        }
    }
    let isa = Isa::detect();
    let rows = isa.mr();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "micro-kernel: {} ({rows} × {NR}, K = {KC})",
        isa.engine_name()
    );
    // Three rounds each; the best is the ceiling (a noisy machine only slows a round).
    let one = (0..3).map(|_| run(isa, reps)).fold(f64::MAX, f64::min);
    println!("1 thread: {:.1} GFLOP/s", gflops(reps, rows, one));
    let all = (0..3)
        .map(|_| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| run(isa, reps));
                }
            });
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    println!(
        "{threads} threads: {:.1} GFLOP/s in all",
        gflops(reps * threads, rows, all)
    );
    Ok(())
}
