//! The ceiling every convolution's GFLOP/s is judged against: the CPU engine's widest
//! micro-kernel (12 × 32 on AVX-512) run over one K block of A and B that stay in L1,
//! on one thread and then on every core at once ([`dynsparse::exec::cpu::peak`]).
//! Per-layer figures from `dynsparse bench --layers` divided by these say how much of
//! the machine a layer uses; `bench --layers` measures the all-core figure itself,
//! between its turns.
//!
//! usage: cargo run --release --example kernel_peak -- [--reps N]

use dynsparse::exec::cpu::gemm::{Isa, KC, NR};
use dynsparse::exec::cpu::peak;

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
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "micro-kernel: {} ({} × {NR}, K = {KC})",
        isa.engine_name(),
        isa.mr()
    );
    // Three rounds each; the best is the ceiling (a noisy machine only slows a round).
    let best = |f: &dyn Fn() -> f64| (0..3).map(|_| f()).fold(0.0, f64::max);
    println!(
        "1 thread: {:.1} GFLOP/s",
        best(&|| peak::one_thread(isa, reps))
    );
    println!(
        "{threads} threads: {:.1} GFLOP/s in all",
        best(&|| peak::burst(isa, threads, reps))
    );
    Ok(())
}
