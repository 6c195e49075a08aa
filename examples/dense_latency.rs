//! Dense latency of converted models at several batch sizes: median, p10, p90 over
//! repeated forward passes of random inputs (preprocessing excluded), as JSON lines.
//!
//! usage: cargo run --release --example dense_latency -- [--batch 1,8] [--runs N] MODEL...
//!
//! A stop-gap until the benchmark harness (`dynsparse bench`) lands; `benches/peers/`
//! runs ONNX Runtime on the same weights for the ratios.

use std::time::Instant;

use dynsparse::{Input, Options, Runtime, TensorData};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut batches = vec![1usize, 8];
    let mut runs = 20usize;
    let mut models = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--batch" => {
                batches = args
                    .next()
                    .ok_or("--batch needs a value")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--runs" => runs = args.next().ok_or("--runs needs a value")?.parse()?,
            _ => models.push(a),
        }
    }
    for path in models {
        let rt = Runtime::load(&path, Options::default())?;
        let spec = rt.model().desc.input;
        for &b in &batches {
            let n = b * spec.channels * spec.height * spec.width;
            // Deterministic pseudo-random input in [-1, 1).
            let data = (0..n)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 23) as f32 - 1.0
                })
                .collect();
            let t = TensorData::new(vec![b, spec.channels, spec.height, spec.width], data)?;
            for _ in 0..3 {
                rt.infer(Input::Tensor(&t))?;
            }
            let mut ms: Vec<f64> = (0..runs)
                .map(|_| {
                    let s = Instant::now();
                    rt.infer(Input::Tensor(&t))
                        .map(|_| s.elapsed().as_secs_f64() * 1e3)
                })
                .collect::<Result<_, _>>()?;
            ms.sort_by(f64::total_cmp);
            let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
            println!(
                "{{\"model\":\"{}\",\"batch\":{b},\"median_ms\":{:.3},\"p10_ms\":{:.3},\"p90_ms\":{:.3},\"gflop\":{:.4}}}",
                rt.model().desc.arch,
                q(0.5),
                q(0.1),
                q(0.9),
                (rt.model().flops_per_sample() * b as u64) as f64 / 1e9
            );
        }
    }
    Ok(())
}
