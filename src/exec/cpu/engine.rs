//! The fast CPU executor: convolutions as packed GEMM on the shared micro-kernels of
//! [`super::gemm`] (bias, residual and activation fused in the epilogue), a direct
//! depthwise kernel, and vectorized dot products for the classifier. Layout is NCHW.
//!
//! Work is split into tasks of one B panel (up to [`NR`] output positions of one sample)
//! times a chunk of output channels. With many panels a task packs its own panel and runs
//! every row block on it while it is hot in cache; with few panels (late layers, batch 1)
//! panels are packed once and tasks split the output channels. Layer buffers come from a
//! pool and go back to it. Tasks run on the current rayon pool.

use rayon::prelude::*;

use super::depthwise;
use super::gemm::{self, ConvGeom, Epilogue, Isa, Tile, KC, NR};
use super::ops::{self, Window};
use super::pool::BufferPool;
use crate::error::{Error, Result};
use crate::exec::{Executor, Forward, Policy};
use crate::format::Model;
use crate::model::{Act, Op};

enum Layer {
    /// Convolution through the GEMM, one GEMM per group.
    Gemm {
        weight: Vec<f32>,
        bias: Vec<f32>,
        groups: usize,
        geom: ConvGeom,
        residual: Option<usize>,
        act: Act,
    },
    Depthwise {
        weight: Vec<f32>,
        bias: Vec<f32>,
        win: Window,
        residual: Option<usize>,
        act: Act,
    },
    Linear {
        weight: Vec<f32>,
        bias: Vec<f32>,
        act: Act,
    },
    MaxPool(Window),
    GlobalAvgPool,
    AdaptiveAvgPool {
        in_hw: [usize; 2],
        output: [usize; 2],
    },
}

/// Dense execution with the dynsparse CPU engine.
pub struct EngineExecutor {
    layers: Vec<(usize, Layer)>,
    /// Per value: elements per sample.
    sizes: Vec<usize>,
    last_use: Vec<usize>,
    classes: usize,
    isa: Isa,
    /// 0, 1, …, max output channels: row indices for dense tiles.
    all_rows: Vec<usize>,
    /// 0, 1, …, max output positions: column indices for dense tiles.
    all_cols: Vec<usize>,
    pool: BufferPool,
    /// Per node: training-free gate weights `[cout][cin]` of a gateable convolution.
    gates: Vec<Option<Vec<f32>>>,
    /// Per node: dense FLOPs for one sample.
    flops: Vec<u64>,
}

/// Per value, per sample: the channels that hold computed data (`None`: all). Channels
/// outside it hold zeros, so a reader that ignores the sets is still correct.
type Kept = Option<Vec<Vec<usize>>>;

/// Output pointer shared by tasks that write disjoint cells.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method (not field access) so closures capture the `Send` wrapper, not the pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl EngineExecutor {
    /// Prepares the model for the engine with the best kernels for this CPU.
    pub fn new(model: &Model) -> Result<Self> {
        Self::with_isa(model, Isa::detect())
    }

    /// Prepares the model with a specific micro-kernel (for tests and benchmarks).
    pub fn with_isa(model: &Model, isa: Isa) -> Result<Self> {
        let nodes = &model.desc.nodes;
        let mut layers = Vec::with_capacity(nodes.len());
        let mut last_use = vec![usize::MAX; nodes.len() + 1];
        let mut sizes = vec![model.layers[0].input.iter().product()];
        let (mut max_rows, mut max_cols) = (0, 0);
        for (i, (node, info)) in nodes.iter().zip(&model.layers).enumerate() {
            last_use[node.input] = i;
            sizes.push(info.output.iter().product());
            let w = || Ok::<_, Error>(model.weight(&format!("{}.weight", node.name))?.data.clone());
            let b = || Ok::<_, Error>(model.weight(&format!("{}.bias", node.name))?.data.clone());
            let [_, ih, iw] = info.input;
            let [_, oh, ow] = info.output;
            let layer = match &node.op {
                Op::Conv(cv) => {
                    if let Some(r) = cv.residual {
                        last_use[r] = i;
                    }
                    let [t, _, l, _] = cv.padding.resolve([ih, iw], cv.kernel, cv.stride);
                    if cv.groups > 1 && cv.groups == cv.in_channels && cv.groups == cv.out_channels
                    {
                        Layer::Depthwise {
                            weight: w()?,
                            bias: b()?,
                            win: Window {
                                in_hw: [ih, iw],
                                out_hw: [oh, ow],
                                kernel: cv.kernel,
                                stride: cv.stride,
                                pad_tl: [t, l],
                            },
                            residual: cv.residual,
                            act: cv.act,
                        }
                    } else {
                        max_rows = max_rows.max(cv.out_channels);
                        max_cols = max_cols.max(oh * ow);
                        Layer::Gemm {
                            weight: w()?,
                            bias: b()?,
                            groups: cv.groups,
                            geom: ConvGeom {
                                in_c: cv.in_channels / cv.groups,
                                in_hw: [ih, iw],
                                out_hw: [oh, ow],
                                kernel: cv.kernel,
                                stride: cv.stride,
                                pad_tl: [t, l],
                            },
                            residual: cv.residual,
                            act: cv.act,
                        }
                    }
                }
                Op::Linear(l) => Layer::Linear {
                    weight: w()?,
                    bias: b()?,
                    act: l.act,
                },
                Op::MaxPool(p) => Layer::MaxPool(Window {
                    in_hw: [ih, iw],
                    out_hw: [oh, ow],
                    kernel: p.kernel,
                    stride: p.stride,
                    pad_tl: p.padding,
                }),
                Op::GlobalAvgPool => Layer::GlobalAvgPool,
                Op::AdaptiveAvgPool { output } => Layer::AdaptiveAvgPool {
                    in_hw: [ih, iw],
                    output: *output,
                },
            };
            layers.push((node.input, layer));
        }
        let mut gates = vec![None; nodes.len()];
        for (i, _) in crate::exec::gating::gateable(model) {
            let w = model.weight(&format!("{}.weight", nodes[i].name))?;
            gates[i] = Some(crate::exec::gating::training_free_weights(w));
        }
        Ok(EngineExecutor {
            gates,
            flops: model.layers.iter().map(|l| l.flops).collect(),
            layers,
            sizes,
            last_use,
            classes: model.desc.classes.len(),
            isa,
            all_rows: (0..max_rows).collect(),
            all_cols: (0..max_cols).collect(),
            pool: BufferPool::default(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_gemm(
        &self,
        x: &[f32],
        batch: usize,
        weight: &[f32],
        bias: &[f32],
        groups: usize,
        g: &ConvGeom,
        residual: Option<&[f32]>,
        act: Act,
        only_rows: Option<&[usize]>,
    ) -> Vec<f32> {
        // Zero-pad the input once so every tap of every window is in bounds: packing then
        // needs no per-pixel checks and copies contiguous runs.
        let ph = (g.out_hw[0] - 1) * g.stride[0] + g.kernel[0];
        let pw = (g.out_hw[1] - 1) * g.stride[1] + g.kernel[1];
        let needs_pad = g.pad_tl != [0, 0] || ph > g.in_hw[0] || pw > g.in_hw[1];
        let padded = needs_pad.then(|| pad_planes(&self.pool, x, g.in_hw, g.pad_tl, [ph, pw]));
        let (x, g) = match &padded {
            None => (x, *g),
            Some(p) => {
                let gp = ConvGeom {
                    in_hw: [ph, pw],
                    pad_tl: [0, 0],
                    ..*g
                };
                (p.as_slice(), gp)
            }
        };
        let g = &g;
        let rows_total = bias.len();
        let rows_per_group = rows_total / groups;
        // The output rows computed: all of a group's, or (one group) a sparse plan's kept
        // channels, whose tiles read A's rows in place and store at their own rows.
        let row_list: &[usize] = match only_rows {
            Some(r) => r,
            None => &self.all_rows[..rows_per_group],
        };
        let k = g.k();
        let n = g.out_hw[0] * g.out_hw[1];
        let in_plane = g.in_hw[0] * g.in_hw[1];
        let panels = n.div_ceil(NR);
        let mr = self.isa.mr();
        let row_blocks = row_list.len().div_ceil(mr);
        // Enough tasks to keep every thread busy, in whole row blocks.
        let wanted = 4 * rayon::current_num_threads();
        let chunks = (wanted.div_ceil(batch * groups * panels)).clamp(1, row_blocks);
        let blocks_per_chunk = row_blocks.div_ceil(chunks);
        // A 1×1, stride-1, unpadded convolution reads full panels straight from its input
        // (row k of B is input channel k); only a partial last panel is packed.
        let direct = g.kernel == [1, 1] && g.stride == [1, 1] && g.pad_tl == [0, 0];
        let panel_len = k * NR;
        // With enough panels to share out, each task packs its own panel into a buffer of
        // its thread and computes all rows on it while it is hot (`chunks` is 1). With few
        // panels, tasks split the rows too, so panels are packed once up front instead.
        let fused = chunks == 1;
        let mut packed = self.pool.take(if fused {
            0
        } else {
            batch * groups * panels * panel_len
        });
        packed
            .par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(t, panel)| {
                let (p, sg) = (t % panels, t / panels);
                if !(direct && (p + 1) * NR <= n) {
                    let cols = &self.all_cols[p * NR..(p * NR + NR).min(n)];
                    gemm::pack_panel(
                        &x[sg * g.in_c * in_plane..][..g.in_c * in_plane],
                        g,
                        cols,
                        panel,
                    );
                }
            });
        let mut out = self.pool.take(batch * rows_total * n);
        if only_rows.is_some() {
            // Rows outside the list: the residual passes through, or zero.
            match residual {
                Some(r) => out.copy_from_slice(&r[..batch * rows_total * n]),
                None => out.fill(0.0),
            }
        }
        let ptr = OutPtr(out.as_mut_ptr());
        let tasks = batch * groups * panels * chunks;
        (0..tasks)
            .into_par_iter()
            .for_each_init(Vec::new, |own, t| {
                let (chunk, sgp) = (t % chunks, t / chunks);
                let (p, sg) = (sgp % panels, sgp / panels);
                let grp = sg % groups;
                let cols = &self.all_cols[p * NR..(p * NR + NR).min(n)];
                let xs = &x[sg * g.in_c * in_plane..(sg + 1) * g.in_c * in_plane];
                let (panel, ldb) = if direct && (p + 1) * NR <= n {
                    (&xs[p * NR..], in_plane)
                } else if fused {
                    own.resize(panel_len, 0.0);
                    gemm::pack_panel(xs, g, cols, own);
                    (own.as_slice(), NR)
                } else {
                    (&packed[sgp * panel_len..(sgp + 1) * panel_len], NR)
                };
                // (sample, group) blocks of the output are contiguous: sg · rows_per_group · n.
                let out_off = sg * rows_per_group * n;
                let a = &weight[grp * rows_per_group * k..(grp + 1) * rows_per_group * k];
                let ep = Epilogue {
                    bias: &bias[grp * rows_per_group..(grp + 1) * rows_per_group],
                    residual: residual.map(|r| &r[out_off..out_off + rows_per_group * n]),
                    act,
                };
                let first = chunk * blocks_per_chunk * mr;
                let last = ((chunk + 1) * blocks_per_chunk * mr).min(row_list.len());
                let tiles: Vec<Tile> = (first..last)
                    .step_by(mr)
                    .map(|r0| Tile {
                        a,
                        k,
                        rows: &row_list[r0..(r0 + mr).min(last)],
                        panel,
                        ldb,
                        ldc: n,
                        cols,
                    })
                    .collect();
                let mut accs = vec![[[0f32; NR]; 12]; tiles.len()];
                // K blocks outermost: one KC × NR block of the panel serves every row block
                // of this task from L1.
                for k0 in (0..k).step_by(KC) {
                    let k1 = (k0 + KC).min(k);
                    for (tile, acc) in tiles.iter().zip(accs.iter_mut()) {
                        // SAFETY: rows < rows_per_group index `a`; the panel holds k × NR.
                        unsafe { gemm::accumulate(self.isa, tile, k0, k1, acc) };
                    }
                }
                for (tile, acc) in tiles.iter().zip(&accs) {
                    // SAFETY: rows < rows_per_group and cols < n index inside this (sample,
                    // group) block of `out`; tasks cover disjoint (rows, cols) cells.
                    unsafe { gemm::store(tile, &ep, acc, ptr.get().add(out_off)) };
                }
            });
        self.pool.give(packed);
        if let Some(p) = padded {
            self.pool.give(p);
        }
        out
    }

    /// The forward pass; with `keep`, channel gates keep that fraction of every gated
    /// convolution's output channels per sample and readers skip the dropped ones.
    fn run(&self, input: &[f32], batch: usize, keep: Option<f64>) -> Result<Forward> {
        if input.len() != batch * self.sizes[0] {
            return Err(Error::Input(format!(
                "{} values do not fill a batch of {batch} inputs of {} values",
                input.len(),
                self.sizes[0]
            )));
        }
        let mut values: Vec<Option<Vec<f32>>> = vec![None; self.layers.len() + 1];
        let dynamic = keep.is_some();
        let mut kept: Vec<Kept> = vec![None; self.layers.len() + 1];
        let mut node_kept: Vec<Kept> = vec![None; self.layers.len()];
        let mut flops = vec![0u64; batch];
        let mut first = self.pool.take(input.len());
        first.copy_from_slice(input);
        values[0] = Some(first);
        for (i, (src, layer)) in self.layers.iter().enumerate() {
            let get = |v: usize| {
                values[v]
                    .as_deref()
                    .ok_or_else(|| Error::Exec(format!("value {v} was freed before its last use")))
            };
            let x = get(*src)?;
            let out = match layer {
                Layer::Gemm {
                    weight,
                    bias,
                    groups,
                    geom,
                    residual,
                    act,
                } => {
                    let r = residual.map(get).transpose()?;
                    let ic_sets = kept[*src].as_ref().filter(|_| *groups == 1);
                    let gate = match (keep, &self.gates[i]) {
                        (Some(k), Some(g)) => Some((g.as_slice(), k)),
                        _ => None,
                    };
                    if ic_sets.is_none() && gate.is_none() {
                        flops.iter_mut().for_each(|f| *f += self.flops[i]);
                        self.conv_gemm(x, batch, weight, bias, *groups, geom, r, *act, None)
                    } else {
                        let (out, oc, f) =
                            self.conv_compact(x, batch, weight, bias, geom, r, *act, ic_sets, gate);
                        flops.iter_mut().zip(f).for_each(|(a, b)| *a += b);
                        if gate.is_some() {
                            kept[i + 1] = Some(oc.clone());
                            node_kept[i] = Some(oc);
                        }
                        out
                    }
                }
                Layer::Depthwise {
                    weight,
                    bias,
                    win,
                    residual,
                    act,
                } => {
                    let r = residual.map(get).transpose()?;
                    match kept[*src].clone() {
                        Some(sets) => {
                            let (out, f) = self
                                .depthwise_compact(x, batch, weight, bias, *win, r, *act, &sets);
                            flops.iter_mut().zip(f).for_each(|(a, b)| *a += b);
                            node_kept[i] = Some(sets.clone());
                            kept[i + 1] = Some(sets);
                            out
                        }
                        None => {
                            flops.iter_mut().for_each(|f| *f += self.flops[i]);
                            let mut out = self.pool.take(batch * self.sizes[i + 1]);
                            depthwise::depthwise_into(
                                &mut out,
                                x,
                                weight,
                                bias,
                                r,
                                *act,
                                bias.len(),
                                *win,
                            );
                            out
                        }
                    }
                }
                Layer::Linear { weight, bias, act } => {
                    flops.iter_mut().for_each(|f| *f += self.flops[i]);
                    let fin = self.sizes[*src];
                    let fout = bias.len();
                    let mut out = vec![0f32; batch * fout];
                    out.par_chunks_mut(fout).enumerate().for_each(|(s, o)| {
                        let xs = &x[s * fin..(s + 1) * fin];
                        o.par_iter_mut().enumerate().for_each(|(m, v)| {
                            *v = act.apply(dot(&weight[m * fin..(m + 1) * fin], xs) + bias[m]);
                        });
                    });
                    out
                }
                Layer::MaxPool(win) => ops::max_pool(x, *win),
                Layer::GlobalAvgPool => {
                    let plane = self.sizes[*src] / self.sizes[i + 1];
                    x.chunks_exact(plane)
                        .map(|p| p.iter().sum::<f32>() / plane as f32)
                        .collect()
                }
                Layer::AdaptiveAvgPool { in_hw, output } => {
                    ops::adaptive_avg_pool(x, *in_hw, *output)
                }
            };
            values[i + 1] = Some(out);
            for (v, slot) in values.iter_mut().enumerate().take(i + 1) {
                if self.last_use[v] == i {
                    if let Some(buf) = slot.take() {
                        self.pool.give(buf);
                    }
                }
            }
        }
        let logits = values
            .pop()
            .flatten()
            .ok_or_else(|| Error::Exec("the model produced no output".into()))?;
        if logits.len() != batch * self.classes {
            return Err(Error::Exec(format!(
                "{} logits for {batch} samples",
                logits.len()
            )));
        }
        Ok(Forward {
            logits,
            flops: dynamic.then_some(flops),
            kept: if dynamic { node_kept } else { Vec::new() },
        })
    }

    /// One convolution on a compact problem per sample: the sample's kept input channels
    /// (`ic`, from the value's kept sets) and, with a gate, the output channels its gate
    /// keeps. Gathers the kept input planes and weight rows, runs the shared GEMM on them
    /// and scatters the kept rows into a zeroed output (the residual passes through
    /// skipped rows). Returns the output and, per sample, the kept output channels and
    /// FLOPs executed.
    #[allow(clippy::too_many_arguments)]
    fn conv_compact(
        &self,
        x: &[f32],
        batch: usize,
        weight: &[f32],
        bias: &[f32],
        geom: &ConvGeom,
        residual: Option<&[f32]>,
        act: Act,
        ic_sets: Option<&Vec<Vec<usize>>>,
        gate: Option<(&[f32], f64)>,
    ) -> (Vec<f32>, Vec<Vec<usize>>, Vec<u64>) {
        let (cin, cout) = (geom.in_c, bias.len());
        let plane = geom.in_hw[0] * geom.in_hw[1];
        let n = geom.out_hw[0] * geom.out_hw[1];
        let taps = geom.kernel[0] * geom.kernel[1];
        let mut out = self.pool.take(batch * cout * n);
        let (mut kept, mut flops) = (Vec::with_capacity(batch), Vec::with_capacity(batch));
        for s in 0..batch {
            let xs = &x[s * cin * plane..(s + 1) * cin * plane];
            let ic: Vec<usize> = ic_sets.map_or_else(|| (0..cin).collect(), |v| v[s].clone());
            let mut f = 0u64;
            let oc: Vec<usize> = match gate {
                Some((g, keep)) => {
                    let pooled: Vec<f32> = ic
                        .iter()
                        .map(|&c| xs[c * plane..(c + 1) * plane].iter().sum::<f32>() / plane as f32)
                        .collect();
                    let scores: Vec<f32> = (0..cout)
                        .map(|o| {
                            bias[o]
                                + ic.iter()
                                    .zip(&pooled)
                                    .map(|(&c, &p)| g[o * cin + c] * p)
                                    .sum::<f32>()
                        })
                        .collect();
                    f += crate::exec::gating::gate_flops(ic.len(), plane, cout);
                    let k = crate::exec::gating::kept_count(cout, keep, self.isa.mr());
                    crate::exec::gating::select(&scores, k)
                }
                None => (0..cout).collect(),
            };
            let all_out = oc.len() == cout;
            let all_in = ic.len() == cin;
            // The kept input planes, read in place when every channel is kept.
            let xc: Option<Vec<f32>> = (!all_in).then(|| {
                let mut xc = self.pool.take(ic.len() * plane);
                for (j, &c) in ic.iter().enumerate() {
                    xc[j * plane..(j + 1) * plane].copy_from_slice(&xs[c * plane..(c + 1) * plane]);
                }
                xc
            });
            if all_in && !all_out {
                let rs = residual.map(|r| &r[s * cout * n..(s + 1) * cout * n]);
                let os = &mut out[s * cout * n..(s + 1) * cout * n];
                // Every input kept: the kept rows of A are read in place and stored at
                // their own rows; no gather, no scatter.
                let yf = self.conv_gemm(xs, 1, weight, bias, 1, geom, rs, act, Some(&oc));
                os.copy_from_slice(&yf[..cout * n]);
                self.pool.give(yf);
                f += 2 * (n * oc.len() * ic.len() * taps) as u64;
                kept.push(oc);
                flops.push(f);
                continue;
            }
            // Weights: the kept output channels' rows, restricted to the kept inputs (here
            // some input is dropped, or every channel is kept and A is read in place).
            let wc: Option<Vec<f32>> = (!all_in).then(|| {
                let mut wc = Vec::with_capacity(oc.len() * ic.len() * taps);
                for &o in &oc {
                    if taps == 1 {
                        let row = &weight[o * cin..(o + 1) * cin];
                        wc.extend(ic.iter().map(|&c| row[c]));
                    } else {
                        for &c in &ic {
                            wc.extend_from_slice(
                                &weight[(o * cin + c) * taps..(o * cin + c + 1) * taps],
                            );
                        }
                    }
                }
                wc
            });
            let bc: Vec<f32> = oc.iter().map(|&o| bias[o]).collect();
            let rs = residual.map(|r| &r[s * cout * n..(s + 1) * cout * n]);
            // The residual of the kept rows: all of it, in place, when every row is kept.
            let rc: Option<Vec<f32>> = rs.filter(|_| !all_out).map(|r| {
                oc.iter()
                    .flat_map(|&o| r[o * n..(o + 1) * n].iter().copied())
                    .collect()
            });
            let gc = ConvGeom {
                in_c: ic.len(),
                ..*geom
            };
            let yc = self.conv_gemm(
                xc.as_deref().unwrap_or(xs),
                1,
                wc.as_deref().unwrap_or(weight),
                &bc,
                1,
                &gc,
                if all_out { rs } else { rc.as_deref() },
                act,
                None,
            );
            let os = &mut out[s * cout * n..(s + 1) * cout * n];
            if all_out {
                os.copy_from_slice(&yc[..cout * n]);
            } else {
                match rs {
                    Some(r) => os.copy_from_slice(r),
                    None => os.fill(0.0),
                }
                for (j, &o) in oc.iter().enumerate() {
                    os[o * n..(o + 1) * n].copy_from_slice(&yc[j * n..(j + 1) * n]);
                }
            }
            f += 2 * (n * oc.len() * ic.len() * taps) as u64;
            if let Some(xc) = xc {
                self.pool.give(xc);
            }
            self.pool.give(yc);
            kept.push(oc);
            flops.push(f);
        }
        (out, kept, flops)
    }

    /// Depthwise convolution of each sample's kept channels only; the others are zero.
    #[allow(clippy::too_many_arguments)]
    fn depthwise_compact(
        &self,
        x: &[f32],
        batch: usize,
        weight: &[f32],
        bias: &[f32],
        win: Window,
        residual: Option<&[f32]>,
        act: Act,
        sets: &[Vec<usize>],
    ) -> (Vec<f32>, Vec<u64>) {
        let c = bias.len();
        let (ip, op) = (win.in_hw[0] * win.in_hw[1], win.out_hw[0] * win.out_hw[1]);
        let taps = win.kernel[0] * win.kernel[1];
        let mut out = self.pool.take(batch * c * op);
        let mut flops = Vec::with_capacity(batch);
        for (s, set) in sets.iter().enumerate().take(batch) {
            let gather = |src: &[f32], len: usize| -> Vec<f32> {
                set.iter()
                    .flat_map(|&ch| src[ch * len..(ch + 1) * len].iter().copied())
                    .collect()
            };
            let xc = gather(&x[s * c * ip..(s + 1) * c * ip], ip);
            let wc = gather(weight, taps);
            let bc: Vec<f32> = set.iter().map(|&ch| bias[ch]).collect();
            let rc = residual.map(|r| gather(&r[s * c * op..(s + 1) * c * op], op));
            let mut yc = vec![0f32; set.len() * op];
            depthwise::depthwise_into(&mut yc, &xc, &wc, &bc, rc.as_deref(), act, set.len(), win);
            let os = &mut out[s * c * op..(s + 1) * c * op];
            os.fill(0.0);
            for (j, &ch) in set.iter().enumerate() {
                os[ch * op..(ch + 1) * op].copy_from_slice(&yc[j * op..(j + 1) * op]);
            }
            flops.push(2 * (op * set.len() * taps) as u64);
        }
        (out, flops)
    }
}

/// Copies every `in_hw` plane of `x` into a zeroed `out_hw` plane at offset `pad_tl`,
/// cropping what falls outside.
fn pad_planes(
    pool: &BufferPool,
    x: &[f32],
    in_hw: [usize; 2],
    pad_tl: [usize; 2],
    out_hw: [usize; 2],
) -> Vec<f32> {
    let (in_plane, out_plane) = (in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]);
    let mut out = pool.take(x.len() / in_plane * out_plane);
    let rows = in_hw[0].min(out_hw[0].saturating_sub(pad_tl[0]));
    let cols = in_hw[1].min(out_hw[1].saturating_sub(pad_tl[1]));
    out.par_chunks_mut(out_plane)
        .zip(x.par_chunks(in_plane))
        .for_each(|(o, i)| {
            for y in 0..rows {
                let dst = (y + pad_tl[0]) * out_hw[1] + pad_tl[1];
                o[dst..dst + cols].copy_from_slice(&i[y * in_hw[1]..y * in_hw[1] + cols]);
            }
        });
    out
}

/// Dot product with 16 independent lanes, so it vectorizes without reassociation.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for j in 0..16 {
            lanes[j] += x[j] * y[j];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

impl Executor for EngineExecutor {
    fn name(&self) -> &'static str {
        match self.isa {
            Isa::Avx512 => "cpu-engine-avx512",
            Isa::Avx2 => "cpu-engine-avx2",
            Isa::Portable => "cpu-engine-portable",
        }
    }

    fn forward(&self, input: &[f32], batch: usize) -> Result<Vec<f32>> {
        Ok(self.run(input, batch, None)?.logits)
    }

    fn forward_with(&self, input: &[f32], batch: usize, policy: Policy) -> Result<Forward> {
        match policy {
            Policy::Dense => self.run(input, batch, None),
            // Gates that keep every channel drop nothing: the dense pass, reported as such.
            Policy::Keep(1.0) => {
                let mut f = self.run(input, batch, None)?;
                f.flops = Some(vec![self.flops.iter().sum(); batch]);
                Ok(f)
            }
            Policy::Keep(r) if r.is_finite() && r > 0.0 && r <= 1.0 => {
                self.run(input, batch, Some(r))
            }
            Policy::Keep(r) => Err(Error::Input(format!("keep ratio {r} is outside (0, 1]"))),
        }
    }
}
