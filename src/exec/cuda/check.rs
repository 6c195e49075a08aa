//! Validation and timing of the CUDA kernels on a real device, run by
//! `dynsparse cuda-check`: every kernel against a naive CPU reference on random shapes
//! and random per-sample plans (fresh seed, printed), then whole models against the CPU
//! engine, then latency of the captured pass at several executed-FLOP fractions.

use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::executor::{
    act_code, cuda_err, launch_conv, ConvParams, Kernels, PlanBuffers, PlanDests,
};
use super::{CudaExecutor, Device, Precision};
use crate::error::{Error, Result};
use crate::exec::plan::{random_subset, SamplePlan, Tiling};
use crate::format::Model;
use crate::model::{Act, Op};

/// Outcome of one kernel case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    /// What was run.
    pub case: String,
    /// max |gpu − ref| / max |ref|.
    pub rel_max: f64,
    /// ‖gpu − ref‖₂ / ‖ref‖₂.
    pub rel_l2: f64,
    /// Tolerance on `rel_max`.
    pub tol: f64,
    /// Whether it passed (and no output was left unwritten).
    pub pass: bool,
}

fn compare(case: String, got: &[f32], want: &[f64], tol: f64) -> CaseResult {
    let (mut dmax, mut rmax, mut d2, mut r2) = (0f64, 0f64, 0f64, 0f64);
    let mut finite = got.len() == want.len();
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            finite = false;
        }
        let d = (g as f64 - w).abs();
        dmax = dmax.max(d);
        rmax = rmax.max(w.abs());
        d2 += d * d;
        r2 += w * w;
    }
    let rel_max = dmax / rmax.max(1e-30);
    let rel_l2 = (d2 / r2.max(1e-60)).sqrt();
    CaseResult {
        case,
        rel_max,
        rel_l2,
        tol,
        pass: finite && rel_max <= tol,
    }
}

fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Irwin–Hall approximation of a standard normal: cheap and never all zeros.
            (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0
        })
        .collect()
}

/// Naive masked convolution in f64, NHWC, weights `[co][kh][kw][ci]` (or `[kh][kw][c]`
/// for depthwise): what the plan keeps is computed, the rest is the residual or zero.
#[allow(clippy::too_many_arguments)]
fn reference_conv(
    p: &ConvParams,
    depthwise: bool,
    batch: usize,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    res: Option<&[f32]>,
    plans: &[SamplePlan],
    act: Act,
) -> Vec<f64> {
    let (h, wd, cin) = (p.h as usize, p.w as usize, p.cin as usize);
    let (oh, ow, cout) = (p.oh as usize, p.ow as usize, p.cout as usize);
    let (kh, kw) = (p.kh as usize, p.kw as usize);
    let tiling = Tiling::with_edge(oh, ow, p.g as usize);
    let mut y = vec![0f64; batch * oh * ow * cout];
    for (n, pl) in plans.iter().enumerate().take(batch) {
        let mut tile_kept = vec![false; tiling.tiles];
        for &t in &pl.tiles {
            tile_kept[t as usize] = true;
        }
        for oy in 0..oh {
            for ox in 0..ow {
                let t = (oy / tiling.g) * tiling.tiles_w + ox / tiling.g;
                let base = ((n * oh + oy) * ow + ox) * cout;
                for co in 0..cout {
                    y[base + co] = res.map_or(0.0, |r| r[base + co] as f64);
                }
                if !tile_kept[t] {
                    continue;
                }
                for &co in &pl.oc {
                    let co = co as usize;
                    let mut acc = b[co] as f64;
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * p.sh as usize + ky) as isize - p.pt as isize;
                            let ix = (ox * p.sw as usize + kx) as isize - p.pl as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            let xi = ((n * h + iy as usize) * wd + ix as usize) * cin;
                            if depthwise {
                                acc += x[xi + co] as f64 * w[(ky * kw + kx) * cout + co] as f64;
                            } else {
                                for &ci in &pl.ic {
                                    let ci = ci as usize;
                                    acc += x[xi + ci] as f64
                                        * w[((co * kh + ky) * kw + kx) * cin + ci] as f64;
                                }
                            }
                        }
                    }
                    if let Some(r) = res {
                        acc += r[base + co] as f64;
                    }
                    y[base + co] = act.apply(acc as f32) as f64;
                }
            }
        }
    }
    y
}

fn random_conv_case(rng: &mut StdRng, depthwise: bool) -> (ConvParams, usize, Act, bool) {
    let k = [1usize, 3, 3, 5, 7][rng.random_range(0..5)];
    let s = rng.random_range(1..=2usize);
    let h = rng.random_range(k.max(2)..=20usize);
    let w = rng.random_range(k.max(2)..=20usize);
    let pad = rng.random_range(0..=k / 2);
    // Up to three 64-wide tiles in either GEMM dimension, with ragged edges.
    let cin = if depthwise {
        rng.random_range(1..=200usize)
    } else {
        // Multiples of 4 half the time, for the 16-byte load path.
        let c = rng.random_range(1..=96usize);
        if rng.random_bool(0.5) {
            c.div_ceil(4) * 4
        } else {
            c
        }
    };
    let cout = if depthwise {
        cin
    } else {
        rng.random_range(1..=150usize)
    };
    let oh = (h + 2 * pad - k) / s + 1;
    let ow = (w + 2 * pad - k) / s + 1;
    let g = [1usize, 2, 3, 4, 7, 8][rng.random_range(0..6)];
    let tiling = Tiling::with_edge(oh, ow, g);
    let act = [Act::None, Act::Relu, Act::Relu6][rng.random_range(0..3)];
    let residual = rng.random_bool(0.4);
    let p = ConvParams {
        h: h as i32,
        w: w as i32,
        cin: cin as i32,
        oh: oh as i32,
        ow: ow as i32,
        cout: cout as i32,
        kh: k as i32,
        kw: k as i32,
        sh: s as i32,
        sw: s as i32,
        pt: pad as i32,
        pl: pad as i32,
        g: tiling.g as i32,
        tiles_w: tiling.tiles_w as i32,
        tiles: tiling.tiles as i32,
        act: act_code(act),
        has_res: residual as i32,
        ..ConvParams::default()
    };
    (p, rng.random_range(1..=3usize), act, residual)
}

fn random_plans(
    rng: &mut StdRng,
    p: &ConvParams,
    batch: usize,
    depthwise: bool,
) -> Vec<SamplePlan> {
    let (cout, cin, tiles) = (p.cout as usize, p.cin as usize, p.tiles as usize);
    (0..batch)
        .map(|_| {
            if rng.random_bool(0.25) {
                return SamplePlan::dense(cout, cin, tiles);
            }
            let frac = |rng: &mut StdRng, n: usize| {
                ((n as f64 * rng.random_range(0.05..1.0)).ceil() as usize).max(1)
            };
            let k = frac(rng, cout);
            let oc = random_subset(rng, cout, k);
            // Every input channel kept takes the 16-byte load path when cin % 4 == 0.
            let ic = if depthwise {
                oc.clone()
            } else if rng.random_bool(0.35) {
                (0..cin as i32).collect()
            } else {
                let k = frac(rng, cin);
                random_subset(rng, cin, k)
            };
            let k = frac(rng, tiles);
            let t = random_subset(rng, tiles, k);
            SamplePlan { oc, ic, tiles: t }
        })
        .collect()
}

fn conv_case(dev: &Device, k: &Kernels, rng: &mut StdRng, depthwise: bool) -> Result<CaseResult> {
    let (p, batch, act, residual) = random_conv_case(rng, depthwise);
    let s = &dev.stream;
    let e = cuda_err("kernel check");
    let (h, w, cin) = (p.h as usize, p.w as usize, p.cin as usize);
    let (oh, ow, cout) = (p.oh as usize, p.ow as usize, p.cout as usize);
    let (kh, kw) = (p.kh as usize, p.kw as usize);
    let x = normal(rng, batch * h * w * cin);
    let wt = normal(
        rng,
        if depthwise {
            kh * kw * cout
        } else {
            cout * kh * kw * cin
        },
    );
    let b = normal(rng, cout);
    let res = residual.then(|| normal(rng, batch * oh * ow * cout));
    let plans = random_plans(rng, &p, batch, depthwise);
    let want = reference_conv(
        &p,
        depthwise,
        batch,
        &x,
        &wt,
        &b,
        res.as_deref(),
        &plans,
        act,
    );

    let dx = s.clone_htod(&x).map_err(&e)?;
    let dw = s.clone_htod(&wt).map_err(&e)?;
    let db = s.clone_htod(&b).map_err(&e)?;
    let dres = match &res {
        Some(r) => Some(s.clone_htod(r).map_err(&e)?),
        None => None,
    };
    // Poison: anything the kernels leave unwritten shows up as NaN.
    let mut dy = s
        .clone_htod(&vec![f32::NAN; batch * oh * ow * cout])
        .map_err(&e)?;
    let mut pb = PlanBuffers::new(s, &p, batch)?;
    pb.upload(s, &p, &plans)?;
    let sparse = plans
        .iter()
        .any(|pl| !pl.is_dense(cout, cin, p.tiles as usize));
    // Sometimes pretend the device is tiny, so the unsplit path runs on small cases too.
    let mut k = k.clone();
    if rng.random_bool(0.3) {
        k.conv_blocks = 1;
    }
    k.precision = match rng.random_range(0..10) {
        _ if depthwise => Precision::Tf32,
        0..=2 => Precision::Tf32x3,
        3..=4 => Precision::Fp16,
        _ => Precision::Tf32,
    };
    let k = &k;
    let ws_len = p
        .for_launch(batch, k.conv_blocks, depthwise)
        .workspace_len();
    let mut ws = s.alloc_zeros::<f32>(ws_len.max(1)).map_err(&e)?;
    launch_conv(
        s,
        k,
        &p,
        depthwise,
        batch,
        &dx,
        &dw,
        &db,
        dres.as_ref(),
        &mut dy,
        &pb,
        sparse,
        &mut ws,
    )?;
    let got = s.clone_dtoh(&dy).map_err(&e)?;
    s.synchronize().map_err(&e)?;
    let kept: Vec<String> = plans
        .iter()
        .map(|pl| format!("{}/{}/{}", pl.oc.len(), pl.ic.len(), pl.tiles.len()))
        .collect();
    let split = p.for_launch(batch, k.conv_blocks, depthwise).split_max;
    let case = format!(
        "{} {}x{} s{} pad{} {}x{}x{}->{} g{} n{} act{} res{} split<={split} kept(oc/ic/tiles) {}",
        match (depthwise, k.precision) {
            (true, _) => "dw",
            (false, Precision::Tf32) => "conv",
            (false, Precision::Tf32x3) => "conv-3xtf32",
            (false, Precision::Fp16) => "conv-fp16",
        },
        kh,
        kw,
        p.sh,
        p.pt,
        h,
        w,
        cin,
        cout,
        p.g,
        batch,
        p.act,
        residual as u8,
        kept.join(",")
    );
    // TF32 rounds operands to 10 mantissa bits. 3xTF32 restores them but the tensor
    // cores' FP32 accumulation still drifts over long unsplit K (measured 1.4e-4 at
    // K = 4606); depthwise runs in plain FP32.
    let tol = match (depthwise, k.precision) {
        (true, _) => 1e-5,
        (false, Precision::Tf32x3) => 3e-4,
        // FP16 operands keep 10 mantissa bits like TF32 but overflow past 65504 and lose
        // precision below 6e-5; the random data here stays within range.
        (false, Precision::Fp16) => 5e-3,
        (false, Precision::Tf32) => 5e-3,
    };
    Ok(compare(case, &got, &want, tol))
}

/// The channel-gate kernels (pool, score over kept inputs, select, copy) against a CPU
/// computation of the same definition, with ties forced in half the cases.
fn gate_case(dev: &Device, k: &Kernels, rng: &mut StdRng) -> Result<CaseResult> {
    let s = &dev.stream;
    let e = cuda_err("gate check");
    let batch = rng.random_range(1..=4usize);
    let cin = rng.random_range(1..=300usize);
    let cout = rng.random_range(1..=2500usize);
    let hw = rng.random_range(1..=200usize);
    let ties = rng.random_bool(0.5);
    let x = normal(rng, batch * hw * cin);
    let mut g = normal(rng, cout * cin);
    if ties {
        // Identical rows give identical scores: the order must fall back to the index.
        for o in (1..cout).step_by(3) {
            let (a, b) = g.split_at_mut(o * cin);
            b[..cin].copy_from_slice(&a[(o - 1) * cin..o * cin]);
        }
    }
    let mut gb = normal(rng, cout);
    if ties {
        for o in (1..cout).step_by(3) {
            gb[o] = gb[o - 1];
        }
    }
    let ic: Vec<Vec<i32>> = (0..batch)
        .map(|_| {
            let m = rng.random_range(1..=cin);
            random_subset(rng, cin, m)
        })
        .collect();
    let keep: Vec<i32> = (0..batch)
        .map(|_| rng.random_range(1..=cout) as i32)
        .collect();
    // CPU: the same definition in f64.
    let mut want_idx: Vec<Vec<i32>> = Vec::new();
    let mut max_gap = 0f64;
    for n in 0..batch {
        let pooled: Vec<f64> = (0..cin)
            .map(|c| {
                (0..hw)
                    .map(|p| x[(n * hw + p) * cin + c] as f64)
                    .sum::<f64>()
                    / hw as f64
            })
            .collect();
        let score: Vec<f64> = (0..cout)
            .map(|o| {
                gb[o] as f64
                    + ic[n]
                        .iter()
                        .map(|&c| g[o * cin + c as usize] as f64 * pooled[c as usize])
                        .sum::<f64>()
            })
            .collect();
        let mut order: Vec<usize> = (0..cout).collect();
        order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        let kk = keep[n] as usize;
        // Distinct scores closer than f32 rounding may legitimately swap at the cut.
        if kk < cout && score[order[kk - 1]] != score[order[kk]] {
            max_gap = max_gap.max(1.0 / (score[order[kk - 1]] - score[order[kk]]).abs());
        }
        let mut kept: Vec<i32> = order[..kk].iter().map(|&i| i as i32).collect();
        kept.sort_unstable();
        want_idx.push(kept);
    }
    let dx = s.clone_htod(&x).map_err(&e)?;
    let dg = s.clone_htod(&g).map_err(&e)?;
    let dgb = s.clone_htod(&gb).map_err(&e)?;
    let mut ic_flat = vec![0i32; batch * cin];
    for (n, l) in ic.iter().enumerate() {
        ic_flat[n * cin..n * cin + l.len()].copy_from_slice(l);
    }
    let dic = s.clone_htod(&ic_flat).map_err(&e)?;
    let dicc = s
        .clone_htod(&ic.iter().map(|l| l.len() as i32).collect::<Vec<_>>())
        .map_err(&e)?;
    let dkeep = s.clone_htod(&keep).map_err(&e)?;
    let mut pooled = s.alloc_zeros::<f32>(batch * cin).map_err(&e)?;
    let mut score = s.alloc_zeros::<f32>(batch * cout).map_err(&e)?;
    let mut flags = s.alloc_zeros::<i32>(batch * cout).map_err(&e)?;
    let mut idx = s.clone_htod(&vec![-1i32; batch * cout]).map_err(&e)?;
    let mut cnt = s.clone_htod(&vec![-1i32; batch]).map_err(&e)?;
    let mut idx2 = s.clone_htod(&vec![-1i32; batch * cout]).map_err(&e)?;
    let mut cnt2 = s.clone_htod(&vec![-1i32; batch]).map_err(&e)?;
    let mut dests = PlanDests::default();
    dests.push(s, &mut idx, &mut cnt)?;
    dests.push(s, &mut idx2, &mut cnt2)?;
    let (hwi, cini, couti, nb) = (hw as i32, cin as i32, cout as i32, batch as i32);
    // SAFETY (all four launches): arguments match the kernels' signatures and every
    // buffer holds batch × its row length.
    unsafe {
        let mut lb = s.launch_builder(&k.gate_pool);
        lb.arg(&dx).arg(&mut pooled).arg(&hwi).arg(&cini);
        lb.launch(LaunchConfig {
            grid_dim: (
                (cin as u32).div_ceil(32),
                (hw as u32).div_ceil(16).clamp(1, 64),
                batch as u32,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        })
        .map_err(&e)?;
        let mut lb = s.launch_builder(&k.gate_fc);
        lb.arg(&pooled)
            .arg(&dg)
            .arg(&dgb)
            .arg(&dic)
            .arg(&dicc)
            .arg(&mut score)
            .arg(&nb)
            .arg(&cini)
            .arg(&couti);
        lb.launch(LaunchConfig {
            grid_dim: ((batch * cout * 32).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
        .map_err(&e)?;
        let mut lb = s.launch_builder(&k.gate_rank);
        lb.arg(&score).arg(&couti).arg(&dkeep).arg(&mut flags);
        lb.launch(LaunchConfig {
            grid_dim: ((cout as u32).div_ceil(256), batch as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
        .map_err(&e)?;
        let mut lb = s.launch_builder(&k.gate_compact);
        lb.arg(&flags).arg(&couti).arg(&dests);
        lb.launch(LaunchConfig {
            grid_dim: (batch as u32, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        })
        .map_err(&e)?;
    }
    // Both destinations must hold the same list.
    let first_idx = s.clone_dtoh(&idx).map_err(&e)?;
    let first_cnt = s.clone_dtoh(&cnt).map_err(&e)?;
    let got_idx = s.clone_dtoh(&idx2).map_err(&e)?;
    let got_cnt = s.clone_dtoh(&cnt2).map_err(&e)?;
    s.synchronize().map_err(&e)?;
    let mut mismatched = usize::from(first_idx != got_idx || first_cnt != got_cnt);
    for n in 0..batch {
        let c = got_cnt[n].max(0) as usize;
        let got = &got_idx[n * cout..n * cout + c.min(cout)];
        let want = &want_idx[n];
        mismatched += got
            .iter()
            .filter(|i| want.binary_search(i).is_err())
            .count()
            + want.len().abs_diff(got.len());
    }
    // f32 scores may swap two channels whose f64 scores differ by less than rounding.
    let near_tie = max_gap > 1e4;
    Ok(CaseResult {
        case: format!(
            "gates n{batch} cin{cin} cout{cout} hw{hw} ties{} keep {keep:?}: {mismatched} channels differ{}",
            ties as u8,
            if near_tie { " (near tie at the cut)" } else { "" }
        ),
        rel_max: mismatched as f64,
        rel_l2: 0.0,
        tol: if near_tie { 2.0 } else { 0.0 },
        pass: mismatched == 0 || (near_tie && mismatched <= 2),
    })
}

/// Runs `cases` random cases of the gate kernels.
pub fn check_gates(dev: &Device, seed: u64, cases: usize) -> Result<Vec<CaseResult>> {
    let k = Kernels::load(dev)?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9a7e);
    (0..cases).map(|_| gate_case(dev, &k, &mut rng)).collect()
}

/// A model with device-side gates: the pass with gates on must equal the pass that
/// replays the plans the gates wrote, uploaded from the host (so gated execution is the
/// plan-driven execution the kernel checks validate), and every gated layer must keep
/// exactly the policy's channel count.
pub fn check_gated_model(
    model: &Model,
    dev: &Device,
    batch: usize,
    seed: u64,
) -> Result<CaseResult> {
    let exec = CudaExecutor::new(model, dev.clone())?;
    let i = model.desc.input;
    let mut rng = StdRng::seed_from_u64(seed);
    let x = normal(&mut rng, batch * i.channels * i.height * i.width);
    let gated = exec.set_channel_gates(batch, Some(0.5), 8)?;
    let a = exec.run(&x, batch)?;
    let plans = exec.read_plans(batch)?;
    let mut wrong_counts = 0;
    for ((shape, gs), pl) in exec
        .conv_shapes()
        .iter()
        .zip(exec.gate_shapes())
        .zip(&plans)
    {
        if let (Some((cout, ..)), Some(_), Some(per)) = (shape, gs, pl) {
            let want = (*cout as f64 * 0.5 / 8.0).ceil() as usize * 8;
            wrong_counts += per.iter().filter(|s| s.oc.len() != want.min(*cout)).count();
        }
    }
    // What Runtime reports for this pass, derived on the host, against the plans read back.
    let counted = plan_flops(model, &exec, &plans, true);
    let (derived, _) = exec.gated_flops(0.5, 8);
    exec.set_plans(batch, &plans)?;
    let b = exec.run(&x, batch)?;
    let want: Vec<f64> = b.iter().map(|&v| v as f64).collect();
    let mut r = compare(
        format!(
            "{} batch {batch}: {gated} gated layers at keep 0.5, gated pass vs replayed plans ({wrong_counts} wrong counts; FLOPs {derived} derived, {counted} from the plans)",
            model.desc.arch
        ),
        &a,
        &want,
        1e-6,
    );
    r.pass &= wrong_counts == 0 && gated > 0 && derived == counted;
    Ok(r)
}

/// Registers, local bytes and shared bytes of every kernel, from the driver.
pub fn kernel_resources(dev: &Device) -> Result<Vec<(&'static str, i32, i32, i32)>> {
    Ok(Kernels::load(dev)?.resources())
}

/// Runs `cases` random cases of each convolution kernel. Returns every case's result.
pub fn check_kernels(dev: &Device, seed: u64, cases: usize) -> Result<Vec<CaseResult>> {
    let k = Kernels::load(dev)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for i in 0..2 * cases {
        out.push(conv_case(dev, &k, &mut rng, i % 2 == 1)?);
    }
    Ok(out)
}

/// Logits of the CUDA executor, and of the CPU engine, against the CPU reference
/// executor (Candle) for one model on random inputs.
pub fn check_model(
    model: &Model,
    dev: &Device,
    batch: usize,
    seed: u64,
) -> Result<[CaseResult; 4]> {
    use crate::exec::Executor;
    let reference = crate::exec::cpu::ReferenceExecutor::new(model)?;
    let engine = crate::exec::cpu::EngineExecutor::new(model)?;
    let gpu = CudaExecutor::new(model, dev.clone())?;
    let i = model.desc.input;
    let mut rng = StdRng::seed_from_u64(seed);
    let x = normal(&mut rng, batch * i.channels * i.height * i.width);
    let want: Vec<f64> = reference
        .forward(&x, batch)?
        .iter()
        .map(|&v| v as f64)
        .collect();
    let got = gpu.forward(&x, batch)?;
    let cpu = engine.forward(&x, batch)?;
    let precise =
        CudaExecutor::with_precision(model, dev.clone(), Precision::Tf32x3)?.forward(&x, batch)?;
    let half =
        CudaExecutor::with_precision(model, dev.clone(), Precision::Fp16)?.forward(&x, batch)?;
    Ok([
        compare(
            format!(
                "{} batch {batch} cuda (TF32) vs CPU reference",
                model.desc.arch
            ),
            &got,
            &want,
            // TF32's own error: 4e-4 … 7e-4 on the ResNets and Lite0, 8e-3 … 1.06e-2 on
            // mobilenet_v2 with randomized BatchNorm (3xTF32 brings it to 3e-5).
            2e-2,
        ),
        compare(
            format!(
                "{} batch {batch} cuda (3xTF32) vs CPU reference",
                model.desc.arch
            ),
            &precise,
            &want,
            // Measured 1e-6 … 1.6e-4: larger where K is accumulated unsplit (batch 32).
            5e-4,
        ),
        compare(
            format!(
                "{} batch {batch} cuda (FP16) vs CPU reference",
                model.desc.arch
            ),
            &half,
            &want,
            // Reported, like TF32's: FP16 operands carry TF32's mantissa with less range.
            5e-2,
        ),
        compare(
            format!(
                "{} batch {batch} {} vs CPU reference",
                model.desc.arch,
                engine.name()
            ),
            &cpu,
            &want,
            1e-4,
        ),
    ])
}

/// Synthetic plans that keep a fraction of every convolution's output tiles (spatial
/// sparsity, all channels) — a stand-in for gates until the planner drives them.
/// Returns the plans and the executed FLOPs per sample.
pub fn tile_plans(
    model: &Model,
    exec: &CudaExecutor,
    batch: usize,
    fraction: f64,
    rng: &mut StdRng,
) -> (Vec<Option<Vec<SamplePlan>>>, u64) {
    let shapes = exec.conv_shapes();
    let mut flops = 0u64;
    let mut plans = Vec::new();
    for ((shape, info), node) in shapes.iter().zip(&model.layers).zip(&model.desc.nodes) {
        match shape {
            Some((cout, cin, tiling, _)) => {
                let keep =
                    ((tiling.tiles as f64 * fraction).round() as usize).clamp(1, tiling.tiles);
                let mut per = Vec::new();
                for _ in 0..batch {
                    let tiles = if keep == tiling.tiles {
                        (0..tiling.tiles as i32).collect()
                    } else {
                        random_subset(rng, tiling.tiles, keep)
                    };
                    let [_, oh, ow] = info.output;
                    let pixels: usize = tiles
                        .iter()
                        .map(|&t| tiling.pixels_in(t as usize, oh, ow))
                        .sum();
                    flops += info.flops * pixels as u64 / (oh * ow) as u64;
                    per.push(SamplePlan {
                        oc: (0..*cout as i32).collect(),
                        ic: (0..*cin as i32).collect(),
                        tiles,
                    });
                }
                plans.push(Some(per));
            }
            None => {
                if matches!(node.op, Op::Linear(_)) {
                    flops += info.flops * batch as u64;
                }
                plans.push(None);
            }
        }
    }
    (plans, flops / batch.max(1) as u64)
}

/// Synthetic plans that keep a fraction of every convolution's output channels (random,
/// rounded to 8) at every position; the next convolution skips the dropped channels as
/// inputs, a residual block passes the identity through them. Returns the plans and the
/// executed FLOPs per sample.
pub fn channel_plans(
    model: &Model,
    exec: &CudaExecutor,
    batch: usize,
    fraction: f64,
    rng: &mut StdRng,
) -> (Vec<Option<Vec<SamplePlan>>>, u64) {
    let shapes = exec.conv_shapes();
    let nodes = &model.desc.nodes;
    let mut flops = 0u64;
    let mut plans: Vec<Option<Vec<SamplePlan>>> = Vec::new();
    // Per value, per sample: the channels that hold computed data (None = all).
    let mut kept: Vec<Vec<Option<Vec<i32>>>> = vec![vec![None; batch]];
    for (i, (shape, info)) in shapes.iter().zip(&model.layers).enumerate() {
        let input = nodes[i].input;
        match (shape, &nodes[i].op) {
            (Some((cout, cin, tiling, depthwise)), Op::Conv(cv)) => {
                let [_, oh, ow] = info.output;
                let k = (cv.kernel[0] * cv.kernel[1]) as u64;
                let mut per = Vec::new();
                let mut out_kept = Vec::new();
                for sample_kept in kept[input].clone() {
                    let ic: Vec<i32> = sample_kept.unwrap_or_else(|| (0..*cin as i32).collect());
                    let oc = if *depthwise {
                        ic.clone()
                    } else if fraction >= 1.0 {
                        (0..*cout as i32).collect()
                    } else {
                        let want = ((*cout as f64 * fraction / 8.0).round() as usize * 8)
                            .clamp(1.min(*cout), *cout);
                        random_subset(rng, *cout, want)
                    };
                    let macs = if *depthwise {
                        oc.len() as u64 * k
                    } else {
                        oc.len() as u64 * ic.len() as u64 * k
                    };
                    flops += 2 * macs * (oh * ow) as u64;
                    out_kept.push(if cv.residual.is_some() || oc.len() == *cout {
                        None
                    } else {
                        Some(oc.clone())
                    });
                    per.push(SamplePlan {
                        oc,
                        ic,
                        tiles: (0..tiling.tiles as i32).collect(),
                    });
                }
                plans.push(Some(per));
                kept.push(out_kept);
            }
            _ => {
                flops += info.flops * batch as u64;
                plans.push(None);
                // Pooling keeps the channel set; a classifier reads everything.
                let pass = matches!(
                    nodes[i].op,
                    Op::MaxPool(_) | Op::GlobalAvgPool | Op::AdaptiveAvgPool { .. }
                );
                kept.push(if pass {
                    kept[input].clone()
                } else {
                    vec![None; batch]
                });
            }
        }
    }
    (plans, flops / batch.max(1) as u64)
}

/// Executed FLOPs per sample (averaged over the batch) of `plans`, plus the gates' own
/// cost when `gates` is given (pooling the input, scoring over the kept inputs).
pub fn plan_flops(
    model: &Model,
    exec: &CudaExecutor,
    plans: &[Option<Vec<SamplePlan>>],
    gates: bool,
) -> u64 {
    let shapes = exec.conv_shapes();
    let gate_shapes = exec.gate_shapes();
    let mut total = 0u64;
    let mut batch = 1;
    for (i, info) in model.layers.iter().enumerate() {
        match (&shapes[i], &plans[i], &model.desc.nodes[i].op) {
            (Some((cout, _, tiling, depthwise)), Some(per), Op::Conv(cv)) => {
                batch = per.len().max(1);
                let [_, oh, ow] = info.output;
                let k = (cv.kernel[0] * cv.kernel[1]) as u64;
                for sp in per {
                    let pixels: u64 = sp
                        .tiles
                        .iter()
                        .map(|&t| tiling.pixels_in(t as usize, oh, ow) as u64)
                        .sum();
                    let inner = if *depthwise { 1 } else { sp.ic.len() as u64 };
                    total += 2 * pixels * sp.oc.len() as u64 * inner * k;
                    if let (true, Some((_, hw))) = (gates, gate_shapes[i]) {
                        total += crate::exec::gating::gate_flops(sp.ic.len(), hw, *cout);
                    }
                }
            }
            _ => total += info.flops * batch as u64,
        }
    }
    total / batch as u64
}

/// How synthetic plans drop work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanMode {
    /// A fraction of output tiles, all channels ([`tile_plans`]).
    Tiles,
    /// A fraction of output channels, all tiles ([`channel_plans`]).
    Channels,
    /// Training-free channel gates on the device keep a fraction of each gated layer's
    /// channels, chosen per input.
    Gates,
    /// Dense, with FP16 tensor-core operands instead of TF32.
    DenseFp16,
}

/// One timing row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TimingRow {
    /// Model architecture.
    pub model: String,
    /// Batch size.
    pub batch: usize,
    /// What the plans drop.
    pub mode: PlanMode,
    /// Fraction of output tiles or channels kept.
    pub keep: f64,
    /// Executed FLOPs per sample over dense FLOPs.
    pub flop_fraction: f64,
    /// Median milliseconds per pass (graph replay, device events).
    pub median_ms: f64,
    /// 10th percentile.
    pub p10_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// Median over the dense median measured in the same run.
    pub vs_dense: f64,
    /// Images per second.
    pub images_per_s: f64,
    /// Executed TFLOP/s.
    pub tflops: f64,
}

fn percentile(sorted: &[f32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64
}

/// Times the captured pass at each batch and kept fraction; dense first in each batch
/// so every row carries its ratio to dense from the same run.
pub fn time_model(
    model: &Model,
    dev: &Device,
    batches: &[usize],
    keeps: &[f64],
    modes: &[PlanMode],
    reps: usize,
    seed: u64,
) -> Result<Vec<TimingRow>> {
    let exec = CudaExecutor::new(model, dev.clone())?;
    let exec16 = CudaExecutor::with_precision(model, dev.clone(), Precision::Fp16)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let dense_flops = model.flops_per_sample() as f64;
    let mut rows = Vec::new();
    for &batch in batches {
        let i = model.desc.input;
        let x = normal(&mut rng, batch * i.channels * i.height * i.width);
        exec.run(&x, batch)?;
        let mut dense_ms = f64::NAN;
        let mut order: Vec<(PlanMode, f64)> = vec![(PlanMode::Tiles, 1.0)];
        for &m in modes {
            if m == PlanMode::DenseFp16 {
                order.push((m, 1.0));
            } else {
                order.extend(keeps.iter().filter(|&&k| k < 1.0).map(|&k| (m, k)));
            }
        }
        for (mode, keep) in order {
            let exec = if mode == PlanMode::DenseFp16 {
                &exec16
            } else {
                &exec
            };
            let flops = match mode {
                PlanMode::DenseFp16 => {
                    exec.run(&x, batch)?;
                    model.flops_per_sample()
                }
                PlanMode::Tiles | PlanMode::Channels => {
                    let (plans, flops) = if mode == PlanMode::Tiles {
                        tile_plans(model, exec, batch, keep, &mut rng)
                    } else {
                        channel_plans(model, exec, batch, keep, &mut rng)
                    };
                    exec.set_plans(batch, &plans)?;
                    flops
                }
                PlanMode::Gates => {
                    exec.set_channel_gates(batch, Some(keep), 8)?;
                    exec.run(&x, batch)?;
                    plan_flops(model, exec, &exec.read_plans(batch)?, true)
                }
            };
            let mut t = exec.time_replays(batch, 10, reps)?;
            t.sort_by(|a, b| a.total_cmp(b));
            let med = percentile(&t, 0.5);
            if keep >= 1.0 && mode != PlanMode::DenseFp16 {
                dense_ms = med;
            }
            rows.push(TimingRow {
                model: model.desc.arch.clone(),
                batch,
                mode,
                keep,
                flop_fraction: flops as f64 / dense_flops,
                median_ms: med,
                p10_ms: percentile(&t, 0.1),
                p90_ms: percentile(&t, 0.9),
                vs_dense: med / dense_ms,
                images_per_s: batch as f64 / (med / 1e3),
                tflops: flops as f64 * batch as f64 / (med / 1e3) / 1e12,
            });
        }
    }
    exec.context()
        .synchronize()
        .map_err(cuda_err("finishing the timing"))?;
    Ok(rows)
}

/// Markdown table of timing rows.
pub fn timing_table(rows: &[TimingRow]) -> String {
    let mut s = String::from(
        "| model | batch | plan | kept | FLOP fraction | median ms | p10 | p90 | vs dense | img/s | TFLOP/s |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.1} |",
            r.model,
            r.batch,
            if r.keep >= 1.0 && r.mode != PlanMode::DenseFp16 {
                "dense"
            } else {
                match r.mode {
                    PlanMode::Tiles => "tiles",
                    PlanMode::Channels => "channels",
                    PlanMode::Gates => "gates",
                    PlanMode::DenseFp16 => "dense fp16",
                }
            },
            r.keep,
            r.flop_fraction,
            r.median_ms,
            r.p10_ms,
            r.p90_ms,
            r.vs_dense,
            r.images_per_s,
            r.tflops
        );
    }
    s
}

/// Errors when any case failed, listing them.
pub fn require_all_pass(results: &[CaseResult]) -> Result<()> {
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.pass)
        .map(|r| format!("{} (rel max {:.2e} > {:.0e})", r.case, r.rel_max, r.tol))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Cuda(format!(
            "{} of {} checks failed:\n{}",
            failed.len(),
            results.len(),
            failed.join("\n")
        )))
    }
}
