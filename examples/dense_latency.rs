//! Latency of converted models at several batch sizes: median, p10, p90 over repeated
//! forward passes of random inputs (preprocessing excluded), as JSON lines — dense, and
//! with gates: `--keep R,...` (channel gates), `--tiles R,...` (spatial gates),
//! `--both R,...` (both at R), `--budget F,...` and `--budget-spatial F,...` (FLOP
//! budgets). The policies are interleaved run by run so that drift hits all alike.
//!
//! usage: cargo run --release --example dense_latency -- [--batch 1,8] [--runs N] [--keep R,...] [--tiles R,...] [--both R,...] [--budget F,...] [--budget-spatial F,...] MODEL...
//!
//! A stop-gap until the benchmark harness (`dynsparse bench`) lands; `benches/peers/`
//! runs ONNX Runtime on the same weights for the ratios.
//!
//! With `--serve MODEL [BUDGET]` it times one pass per line read from stdin (the line
//! is the batch size; dense, or at the FLOP budget given) and answers each with the
//! pass's milliseconds, so that a driver can alternate our passes with a peer's, run by
//! run (`benches/peers/paired_dense.py`).

use std::io::BufRead;
use std::time::Instant;

use dynsparse::{Budget, Cut, Gates, Input, Options, Policy, Runtime, TensorData};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Passes run on this thread, the pool's other workers joining it (as `dynsparse`
    // runs them).
    dynsparse::join_global_pool(None)?;
    let mut batches = vec![1usize, 8];
    let mut runs = 20usize;
    let mut policies = vec![("dense".to_string(), Policy::Dense)];
    let mut models = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--serve" => {
                let model = args.next().ok_or("--serve needs a model")?;
                let policy = match args.next() {
                    Some(f) => Policy::Budget(Budget::Flops(f.parse()?)),
                    None => Policy::Dense,
                };
                return serve(&model, policy);
            }
            "--batch" => {
                batches = args
                    .next()
                    .ok_or("--batch needs a value")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--runs" => runs = args.next().ok_or("--runs needs a value")?.parse()?,
            "--keep" | "--tiles" | "--both" | "--budget" | "--budget-spatial" => {
                let values: Vec<f64> = args
                    .next()
                    .ok_or(format!("{a} needs a value"))?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
                for r in values {
                    let gates = |channels, tiles| Policy::Gates(Gates { channels, tiles });
                    let policy = match a.as_str() {
                        "--keep" => Policy::Keep(r),
                        "--tiles" => gates(Cut::All, Cut::Ratio(r)),
                        "--both" => gates(Cut::Ratio(r), Cut::Ratio(r)),
                        "--budget" => Policy::Budget(Budget::Flops(r)),
                        _ => Policy::Budget(Budget::FlopsWithTiles(r)),
                    };
                    policies.push((format!("{}={r}", &a[2..]), policy));
                }
            }
            _ => models.push(a),
        }
    }
    for path in models {
        let model = dynsparse::Model::load(&path)?;
        let runtimes = policies
            .iter()
            .map(|&(_, policy)| {
                let opts = Options {
                    policy,
                    ..Options::default()
                };
                Runtime::new(model.clone(), opts)
            })
            .collect::<Result<Vec<_>, _>>()?;
        for &b in &batches {
            let t = input(&model, b)?;
            let mut flops = vec![0u64; runtimes.len()];
            for (rt, f) in runtimes.iter().zip(flops.iter_mut()) {
                for _ in 0..3 {
                    *f = rt.infer(Input::Tensor(&t))?[0].stats.flops_executed;
                }
            }
            let mut ms = vec![Vec::with_capacity(runs); runtimes.len()];
            for _ in 0..runs {
                for (rt, m) in runtimes.iter().zip(ms.iter_mut()) {
                    let s = Instant::now();
                    rt.infer(Input::Tensor(&t))?;
                    m.push(s.elapsed().as_secs_f64() * 1e3);
                }
            }
            let mut dense_ms = f64::NAN;
            for (((label, policy), m), f) in policies.iter().zip(ms.iter_mut()).zip(&flops) {
                m.sort_by(f64::total_cmp);
                let q = |p: f64| m[((m.len() - 1) as f64 * p).round() as usize];
                if *policy == Policy::Dense {
                    dense_ms = q(0.5);
                }
                println!(
                    "{{\"model\":\"{}\",\"batch\":{b},\"policy\":\"{label}\",\"median_ms\":{:.3},\"p10_ms\":{:.3},\"p90_ms\":{:.3},\"vs_dense\":{:.3},\"flop_fraction\":{:.3},\"gflop\":{:.4}}}",
                    model.desc.arch,
                    q(0.5),
                    q(0.1),
                    q(0.9),
                    q(0.5) / dense_ms,
                    *f as f64 / model.flops_per_sample() as f64,
                    (*f * b as u64) as f64 / 1e9
                );
            }
        }
    }
    Ok(())
}

/// Deterministic pseudo-random input in [-1, 1) for a batch of `b`.
fn input(model: &dynsparse::Model, b: usize) -> Result<TensorData, Box<dyn std::error::Error>> {
    let spec = model.desc.input;
    let n = b * spec.channels * spec.height * spec.width;
    let data = (0..n)
        .map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
        .collect();
    Ok(TensorData::new(
        vec![b, spec.channels, spec.height, spec.width],
        data,
    )?)
}

/// One pass under `policy` per stdin line (a batch size), answered with its
/// milliseconds.
fn serve(path: &str, policy: Policy) -> Result<(), Box<dyn std::error::Error>> {
    let model = dynsparse::Model::load(path)?;
    let opts = Options {
        policy,
        ..Options::default()
    };
    let rt = Runtime::new(model.clone(), opts)?;
    let mut inputs = std::collections::HashMap::new();
    for line in std::io::stdin().lock().lines() {
        let b: usize = line?.trim().parse()?;
        let x = match inputs.entry(b) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(input(&model, b)?),
        };
        let s = Instant::now();
        rt.infer(Input::Tensor(x))?;
        println!("{:.4}", s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(())
}
