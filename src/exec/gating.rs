//! Gates, defined once for every executor: which convolutions can be gated, the gate
//! weights (trained ones from the model file, or training-free ones), spatial tile scores,
//! and how a gate chooses what to keep.
//!
//! For a gated convolution with input `x`, the score of output channel `co` is
//! `sum over kept ci of G[co][ci] * mean(x[ci]) + b[co]`; the `keep` highest scores are
//! kept, ties going to the lower index. A model trained with gates carries `G` and `b`
//! (see [`crate::model::ConvGate`]). Without them, `G` is the BN-folded convolution weight
//! summed over its window and `b` its bias: the score is then the channel's mean
//! pre-activation output (exact away from the padded border) — a saliency predicted from
//! the layer's input before the layer runs.

use crate::error::{Error, Result};
use crate::exec::cpu::gemm::ConvGeom;
use crate::exec::plan::Tiling;
use crate::exec::Cut;
use crate::format::{Model, TensorData};
use crate::model::{Act, Conv, LayerInfo, Node, Op, Padding};

/// Convolutions whose output channels can be gated, with the nodes that follow each
/// decision. A convolution qualifies when it is not depthwise, adds no residual, and
/// every reader of its output is a convolution reading it as input (not as a residual):
/// either a regular one (which then skips the dropped channels as inputs) or a depthwise
/// one without a residual (which computes only the kept channels) whose own readers are
/// unpadded 1×1 convolutions. Dropped channels are then never read, so they need not be
/// written.
///
/// A dropped channel is zero, and everything after it is what the dense network makes of
/// that zero. A depthwise convolution turns a zero plane into the constant plane
/// `act(bias[c])`, and an unpadded 1×1 reader turns a constant plane into a constant
/// added to each output channel: executors account for it without computing the
/// channel ([`DroppedConstants`]).
pub fn gateable(model: &Model) -> Vec<(usize, Vec<(usize, bool)>)> {
    gateable_nodes(&model.desc.nodes)
}

/// [`gateable`] over a node list.
pub fn gateable_nodes(nodes: &[Node]) -> Vec<(usize, Vec<(usize, bool)>)> {
    let conv = |i: usize| match &nodes[i].op {
        Op::Conv(c) => Some(c),
        _ => None,
    };
    // Readers of value v: (node, reads it as residual).
    let readers = |v: usize| -> Vec<(usize, bool)> {
        nodes
            .iter()
            .enumerate()
            .flat_map(|(j, n)| {
                let mut r = Vec::new();
                if n.input == v {
                    r.push((j, false));
                }
                if conv(j).and_then(|c| c.residual) == Some(v) {
                    r.push((j, true));
                }
                r
            })
            .collect()
    };
    let regular_input =
        |j: usize, residual: bool| !residual && conv(j).is_some_and(|c| c.groups == 1);
    let mut out = Vec::new();
    for i in 0..nodes.len() {
        let Some(c) = conv(i) else { continue };
        if c.groups != 1 || c.residual.is_some() {
            continue;
        }
        let mut followers = Vec::new();
        let mut ok = true;
        for (j, residual) in readers(i + 1) {
            if regular_input(j, residual) {
                followers.push((j, false));
            } else if !residual && conv(j).is_some_and(depthwise) {
                let after = readers(j + 1);
                let pointwise = |k: usize| conv(k).is_some_and(unpadded_pointwise);
                if conv(j).is_some_and(|d| d.residual.is_some())
                    || after.is_empty()
                    || !after
                        .iter()
                        .all(|&(k, r)| regular_input(k, r) && pointwise(k))
                {
                    ok = false;
                    break;
                }
                followers.push((j, true));
                followers.extend(after.iter().map(|&(k, _)| (k, false)));
            } else {
                ok = false;
                break;
            }
        }
        if ok && !followers.is_empty() {
            out.push((i, followers));
        }
    }
    out
}

/// Whether a convolution is depthwise: a group per channel, as many out as in. A reader
/// in fewer groups mixes the channels of each group, so dropped ones would be read.
fn depthwise(c: &Conv) -> bool {
    c.groups > 1 && c.groups == c.in_channels && c.in_channels == c.out_channels
}

/// Whether a convolution is 1×1 and reads no padding (TensorFlow "SAME" never pads a 1×1
/// window), so a constant input plane contributes the same value at every output.
fn unpadded_pointwise(c: &Conv) -> bool {
    c.kernel == [1, 1]
        && match c.padding {
            Padding::Symmetric { pad } => pad == [0, 0],
            Padding::TfSame => true,
        }
}

/// What a regular convolution reading a depthwise one's output does with channels
/// dropped upstream (see [`gateable`]). The depthwise convolution turns a dropped (zero)
/// input plane into the constant `act(bias[c])`, and the reader adds
/// `Σ_taps W[o][c] · act(bias[c])` to output `o` (exact for the unpadded 1×1 readers
/// [`gateable`] allows). Rather than add that per sample for the dropped channels, an
/// executor writes every kept depthwise plane less its constant and gives the reader
/// [`Self::shifted_bias`], which holds every channel's contribution: kept channels then
/// add `W · (y − act(bias))` and the bias adds back `W · act(bias)`, dropped ones only
/// the latter. That costs one subtraction per kept value, and no extra reads.
#[derive(Debug, Clone, PartialEq)]
pub struct DroppedConstants {
    /// Per input channel, `act(bias[c])` of the depthwise producer.
    pub constants: Vec<f32>,
    /// The reader's bias plus every channel's contribution.
    pub shifted_bias: Vec<f32>,
}

impl DroppedConstants {
    /// For a reader `node`; `None` where nothing needs shifting: its input is not a
    /// depthwise output, or every constant is zero.
    pub fn for_node(model: &Model, node: usize) -> Result<Option<Self>> {
        let nodes = &model.desc.nodes;
        let (Op::Conv(reader), Some(src)) = (&nodes[node].op, nodes[node].input.checked_sub(1))
        else {
            return Ok(None);
        };
        let Op::Conv(dw) = &nodes[src].op else {
            return Ok(None);
        };
        let depthwise = dw.groups == dw.in_channels && dw.groups == dw.out_channels;
        if reader.groups != 1 || dw.groups == 1 || !depthwise {
            return Ok(None);
        }
        let constants: Vec<f32> = model
            .weight(&format!("{}.bias", nodes[src].name))?
            .data
            .iter()
            .map(|&b| dw.act.apply(b))
            .collect();
        if constants.iter().all(|&a| a == 0.0) {
            return Ok(None);
        }
        let w = &model.weight(&format!("{}.weight", nodes[node].name))?.data;
        let mut shifted_bias = model
            .weight(&format!("{}.bias", nodes[node].name))?
            .data
            .clone();
        let cin = reader.in_channels;
        let taps = reader.kernel[0] * reader.kernel[1];
        if constants.len() != cin || w.len() != shifted_bias.len() * cin * taps {
            return Err(Error::ModelFormat(format!(
                "node {node} '{}' does not match the depthwise layer it reads",
                nodes[node].name
            )));
        }
        for (o, b) in shifted_bias.iter_mut().enumerate() {
            for (c, &a) in constants.iter().enumerate() {
                let row = &w[(o * cin + c) * taps..(o * cin + c + 1) * taps];
                *b += row.iter().sum::<f32>() * a;
            }
        }
        Ok(Some(DroppedConstants {
            constants,
            shifted_bias,
        }))
    }
}

/// Whether the model carries trained gates: then only the convolutions that carry them
/// are gated.
pub fn has_trained_gates(nodes: &[Node]) -> bool {
    nodes
        .iter()
        .any(|n| matches!(&n.op, Op::Conv(c) if c.gate.is_some()))
}

/// Checks that every trained gate sits where the executors can apply it: channel gates on
/// [`gateable_nodes`], spatial gates on convolutions whose output has a [`cpu_tiling`].
pub fn check_trained(nodes: &[Node], layers: &[LayerInfo]) -> Result<()> {
    let gateable: Vec<usize> = gateable_nodes(nodes).into_iter().map(|g| g.0).collect();
    for (i, (n, info)) in nodes.iter().zip(layers).enumerate() {
        let Op::Conv(c) = &n.op else { continue };
        let Some(g) = c.gate else { continue };
        if g.channels && !gateable.contains(&i) {
            return Err(Error::ModelFormat(format!(
                "node {i} '{}' carries a channel gate, but its output channels cannot be \
                 gated (it adds a residual, is grouped, or a reader needs every channel)",
                n.name
            )));
        }
        if g.tiles && cpu_tiling(info.output[1], info.output[2]).is_none() {
            return Err(Error::ModelFormat(format!(
                "node {i} '{}' carries a spatial gate, but its {}×{} output does not divide \
                 into at least 16 tiles of 4×4 or 2×2",
                n.name, info.output[1], info.output[2]
            )));
        }
    }
    Ok(())
}

/// A channel gate: the score of output channel `o` is
/// `bias[o] + Σ_c weight[o · C + c] · mean(x[c])`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelGate {
    /// `[out][C]`, row-major.
    pub weight: Vec<f32>,
    /// `[out]`.
    pub bias: Vec<f32>,
    /// `weight` as a product of two thin factors, when it is one: an executor may
    /// score as `U · (V · mean(x))`, reading far fewer values.
    pub factors: Option<LowRank>,
}

/// `weight = u · v`: `u` is `[out][rank]`, `v` is `[rank][C]`, both row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct LowRank {
    pub rank: usize,
    pub u: Vec<f32>,
    pub v: Vec<f32>,
}

/// Rank of the training-free gates where factoring them pays (see [`channel_gates`]).
pub const GATE_RANK: usize = 32;

/// Power iterations of the range finder in [`low_rank`].
const POWER_ITERATIONS: usize = 3;

/// A rank-`rank` approximation `u · v` of row-major `g` (`m × n`), close to the best one
/// (the truncated SVD): a randomized range finder with power iterations gives an
/// orthonormal basis `u` of `g`'s dominant column space, and `v = uᵀ · g`. The random
/// start is seeded, so every load gives the same factors.
pub fn low_rank(g: &[f32], m: usize, n: usize, rank: usize) -> LowRank {
    use crate::exec::cpu::ops::dot;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6a7e_5eed);
    // Bases are stored column after column.
    let mut z: Vec<f32> = (0..n * rank).map(|_| rng.random_range(-1.0..1.0)).collect();
    // g · z, as `rank` columns of length m.
    let times = |z: &[f32]| -> Vec<f32> {
        let mut q = vec![0f32; m * rank];
        for (o, row) in g.chunks_exact(n).enumerate() {
            for (j, zj) in z.chunks_exact(n).enumerate() {
                q[j * m + o] = dot(row, zj);
            }
        }
        q
    };
    // gᵀ · q, as `rank` columns of length n.
    let times_t = |q: &[f32]| -> Vec<f32> {
        let mut z = vec![0f32; n * rank];
        for (o, row) in g.chunks_exact(n).enumerate() {
            for (j, zj) in z.chunks_exact_mut(n).enumerate() {
                let w = q[j * m + o];
                zj.iter_mut().zip(row).for_each(|(acc, &a)| *acc += w * a);
            }
        }
        z
    };
    let mut q = times(&z);
    orthonormalize(&mut q, m);
    for _ in 0..POWER_ITERATIONS {
        z = times_t(&q);
        orthonormalize(&mut z, n);
        q = times(&z);
        orthonormalize(&mut q, m);
    }
    let v = times_t(&q);
    let mut u = vec![0f32; m * rank];
    for (j, col) in q.chunks_exact(m).enumerate() {
        for (o, &x) in col.iter().enumerate() {
            u[o * rank + j] = x;
        }
    }
    LowRank { rank, u, v }
}

/// Modified Gram–Schmidt, twice, on columns of length `len`; a column with nothing left
/// becomes zero.
fn orthonormalize(cols: &mut [f32], len: usize) {
    use crate::exec::cpu::ops::dot;
    for _ in 0..2 {
        for j in 0..cols.len() / len {
            let (done, rest) = cols.split_at_mut(j * len);
            let c = &mut rest[..len];
            // Past `len` columns the ones before span the space: what is left is
            // rounding error, which normalizing would blow up into a unit column that is
            // not orthogonal to them (a rank above min(m, n) then broke the factors).
            if j >= len {
                c.fill(0.0);
                continue;
            }
            for p in done.chunks_exact(len) {
                let d = dot(p, c);
                c.iter_mut().zip(p).for_each(|(x, &y)| *x -= d * y);
            }
            let norm = dot(c, c).sqrt();
            let inv = if norm > 1e-20 { 1.0 / norm } else { 0.0 };
            c.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// How a spatial gate scores the tiles of its output.
#[derive(Debug, Clone, PartialEq)]
pub enum TileScore {
    /// Training-free: mean absolute activation over the tile's input window, cut at
    /// `e / (e + layer mean) ≥ t`.
    Energy,
    /// Trained: `bias` plus the window mean of `Σ_c weight[c] · x[c]`, cut at
    /// `sigmoid(score) ≥ t`.
    Trained {
        /// `[C]`.
        weight: Vec<f32>,
        /// The score's offset.
        bias: f32,
    },
}

/// A spatial gate: the output's tiling and how tiles are scored.
#[derive(Debug, Clone, PartialEq)]
pub struct SpatialGate {
    /// Whole tiles of the output ([`cpu_tiling`]).
    pub tiling: Tiling,
    /// The score.
    pub score: TileScore,
}

/// Per node, its channel gate: the trained one it carries, or, in a model without trained
/// gates, training-free weights on every [`gateable`] convolution.
pub fn channel_gates(model: &Model) -> Result<Vec<Option<ChannelGate>>> {
    let nodes = &model.desc.nodes;
    let mut out = vec![None; nodes.len()];
    if has_trained_gates(nodes) {
        for (i, n) in nodes.iter().enumerate() {
            if matches!(&n.op, Op::Conv(c) if c.gate.is_some_and(|g| g.channels)) {
                out[i] = Some(ChannelGate {
                    factors: None,
                    weight: model
                        .weight(&format!("{}.gate.channel.weight", n.name))?
                        .data
                        .clone(),
                    bias: model
                        .weight(&format!("{}.gate.channel.bias", n.name))?
                        .data
                        .clone(),
                });
            }
        }
    } else {
        use rayon::prelude::*;
        let rank = GATE_RANK;
        // A training-free gate ranks channels by their mean pre-activation output. Behind
        // a ReLU a low mean means a mostly zero channel; a convolution without an
        // activation (a linear bottleneck) can have a mean near zero and large values
        // of both signs, so it gets no training-free gate. On EfficientNet-Lite0's real
        // weights, gating its two linear bottlenecks too cut top-1 agreement with dense
        // at keep 0.95 from 69% to 49% (PyTorch, 129 photos).
        let gates = gateable(model)
            .into_iter()
            .filter(|&(i, _)| matches!(&nodes[i].op, Op::Conv(c) if c.act != Act::None))
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|(i, _)| {
                let n = &nodes[i];
                let w = model.weight(&format!("{}.weight", n.name))?;
                let g = training_free_weights(w);
                let (m, c) = (w.shape[0], w.shape[1]);
                // A 1×1 layer's gate is as large as the layer, and every gated pass
                // reads all of it (ResNet-50: 5.6 M values per image). Where a rank
                // GATE_RANK product is at most a quarter of it, the gate is that product
                // instead: the executor that scores through the factors reads
                // `rank · (out + C)` values. The factors, or elsewhere the weights, are
                // held at half precision; every executor scores with the same rounded
                // values, and the CPU engine stores them as f16 and reads half the bytes.
                let f16 = |v: f32| half::f16::from_f32(v).to_f32();
                let (weight, factors) = if 4 * rank * (m + c) <= m * c {
                    let mut f = low_rank(&g, m, c, rank);
                    f.u.iter_mut()
                        .chain(f.v.iter_mut())
                        .for_each(|v| *v = f16(*v));
                    let mut prod = vec![0f32; m * c];
                    for (row, u) in prod.chunks_exact_mut(c).zip(f.u.chunks_exact(rank)) {
                        for (&uj, vj) in u.iter().zip(f.v.chunks_exact(c)) {
                            row.iter_mut().zip(vj).for_each(|(p, &v)| *p += uj * v);
                        }
                    }
                    (prod, Some(f))
                } else {
                    (g.into_iter().map(f16).collect(), None)
                };
                let bias = model.weight(&format!("{}.bias", n.name))?.data.clone();
                Ok((
                    i,
                    ChannelGate {
                        weight,
                        bias,
                        factors,
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, g) in gates {
            out[i] = Some(g);
        }
    }
    Ok(out)
}

/// Per node, its spatial gate: the trained one it carries, or, in a model without trained
/// gates, a training-free one on every regular convolution but those reading the image,
/// wherever the output divides into whole tiles.
pub fn spatial_gates(model: &Model) -> Result<Vec<Option<SpatialGate>>> {
    let trained = has_trained_gates(&model.desc.nodes);
    let mut out = Vec::with_capacity(model.layers.len());
    for (n, info) in model.desc.nodes.iter().zip(&model.layers) {
        let tiling = cpu_tiling(info.output[1], info.output[2]);
        let gate = match (&n.op, tiling) {
            (Op::Conv(c), Some(tiling)) if trained && c.gate.is_some_and(|g| g.tiles) => {
                let bias = model.weight(&format!("{}.gate.spatial.bias", n.name))?.data[0];
                let weight = model.weight(&format!("{}.gate.spatial.weight", n.name))?;
                Some(SpatialGate {
                    tiling,
                    score: TileScore::Trained {
                        weight: weight.data.clone(),
                        bias,
                    },
                })
            }
            (Op::Conv(c), Some(tiling)) if !trained && c.groups == 1 && n.input != 0 => {
                Some(SpatialGate {
                    tiling,
                    score: TileScore::Energy,
                })
            }
            _ => None,
        };
        out.push(gate);
    }
    Ok(out)
}

/// Training-free gate weights `[cout][cin]` from a convolution weight
/// `[cout][cin][kh][kw]`: the sum over the window.
pub fn training_free_weights(weight: &TensorData) -> Vec<f32> {
    let (cout, cin) = (weight.shape[0], weight.shape[1]);
    let taps = weight.shape[2] * weight.shape[3];
    weight.data[..cout * cin * taps]
        .chunks_exact(taps)
        .map(|w| w.iter().sum())
        .collect()
}

/// Channels kept for `keep` of `channels`, rounded up to a multiple of `round` (the
/// executing kernel's tile), at least `round` and at most `channels`.
pub fn kept_count(channels: usize, keep: f64, round: usize) -> usize {
    let r = round.max(1);
    ((channels as f64 * keep.clamp(0.0, 1.0) / r as f64).ceil() as usize * r)
        .clamp(r.min(channels), channels)
}

/// FLOPs one gate costs for one sample, counted from the plan the same way for every
/// executor: pooling each kept input channel over its `plane`, then scoring all
/// `channels` outputs from the kept inputs.
pub fn gate_flops(kept_inputs: usize, plane: usize, channels: usize) -> u64 {
    (kept_inputs * plane + 2 * kept_inputs * channels) as u64
}

/// [`gate_flops`] for a gate scored through rank-`rank` factors over all `inputs`
/// channels (dropped ones pooled as zero): `V · mean` then `U · (V · mean)`.
pub fn factored_gate_flops(
    kept_inputs: usize,
    plane: usize,
    inputs: usize,
    channels: usize,
    rank: usize,
) -> u64 {
    (kept_inputs * plane + 2 * rank * (inputs + channels)) as u64
}

/// The units a gate keeps under `cut`: the `n` best of `scores` (see [`select`]), where
/// for a ratio `n` is [`kept_count`], and for a threshold it is the number of scores at or
/// above `at(threshold)` (the threshold in score units), rounded up to `round`.
pub fn choose(scores: &[f32], cut: Cut, at: impl Fn(f64) -> f32, round: usize) -> Vec<usize> {
    select(scores, kept_units(scores, cut, at, round))
}

/// [`choose`], the kept units taken in aligned groups of `group` ([`select_groups`]):
/// as many units, at the positions of the best groups.
pub fn choose_grouped(
    scores: &[f32],
    cut: Cut,
    at: impl Fn(f64) -> f32,
    round: usize,
    group: usize,
) -> Vec<usize> {
    select_groups(scores, kept_units(scores, cut, at, round), group)
}

/// How many units [`choose`] keeps.
fn kept_units(scores: &[f32], cut: Cut, at: impl Fn(f64) -> f32, round: usize) -> usize {
    let n = scores.len();
    let r = round.max(1);
    match cut {
        Cut::All => n,
        Cut::Ratio(f) => kept_count(n, f, r),
        Cut::Threshold(t) => {
            let bar = at(t);
            let above = scores.iter().filter(|&&s| s >= bar).count();
            (above.div_ceil(r) * r).clamp(r.min(n), n)
        }
    }
}

/// A channel threshold in score units: a probability `t` is `sigmoid(score)`.
pub fn channel_bar(t: f64) -> f32 {
    (t / (1.0 - t)).ln() as f32
}

/// A tile threshold in energy units for a layer of mean energy `mean`: a tile's
/// probability is `e / (e + mean)`.
pub fn tile_bar(t: f64, mean: f32) -> f32 {
    (f64::from(mean) * t / (1.0 - t)) as f32
}

/// The CPU engine's spatial tiling of an `oh × ow` output: square tiles of the largest edge
/// in {4, 2} that divides both sides and leaves at least 16 tiles, so every tile is whole
/// and a tile count maps to an exact pixel count. `None` (no spatial gate) otherwise.
pub fn cpu_tiling(oh: usize, ow: usize) -> Option<Tiling> {
    [4, 2]
        .into_iter()
        .find(|&g| oh.is_multiple_of(g) && ow.is_multiple_of(g) && (oh / g) * (ow / g) >= 16)
        .map(|g| Tiling::with_edge(oh, ow, g))
}

/// Tiles per B panel of the CPU GEMM: kept tile counts are rounded up to this so kept
/// pixels fill whole panels of `panel` columns.
pub fn tiles_per_panel(t: &Tiling, panel: usize) -> usize {
    (panel / (t.g * t.g)).max(1)
}

/// Spatial gate scores of one sample: per output tile of `t`, the mean over the input
/// rectangle the tile's windows span (clipped to the image) of a map summed over
/// `channels` — `|x[c]|` without `weights` (activation energy), `weights[c] · x[c]` with
/// them (a trained 1×1 score map); and the same mean over the whole input. `x` holds the
/// sample's `g.in_c` planes.
pub fn tile_scores(
    x: &[f32],
    channels: &[usize],
    weights: Option<&[f32]>,
    g: &ConvGeom,
    t: &Tiling,
) -> (Vec<f32>, f32) {
    let [h, w] = g.in_hw;
    let plane = h * w;
    let mut energy = vec![0f32; plane];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        unsafe { energy_avx512(&mut energy, x, channels, weights) };
    } else {
        energy_map(&mut energy, x, channels, weights);
    }
    #[cfg(not(target_arch = "x86_64"))]
    energy_map(&mut energy, x, channels, weights);
    // Summed-area table, in f64 so window sums do not lose small tiles to cancellation.
    let mut sat = vec![0f64; (h + 1) * (w + 1)];
    for y in 0..h {
        let mut row = 0f64;
        for xx in 0..w {
            row += f64::from(energy[y * w + xx]);
            sat[(y + 1) * (w + 1) + xx + 1] = sat[y * (w + 1) + xx + 1] + row;
        }
    }
    let span = |first_out: usize, edge: usize, axis: usize, len: usize| {
        let last_out = (first_out + edge).min(g.out_hw[axis]).max(first_out + 1) - 1;
        let lo = (first_out * g.stride[axis]) as isize - g.pad_tl[axis] as isize;
        let hi = (last_out * g.stride[axis] + g.kernel[axis]) as isize - g.pad_tl[axis] as isize;
        (
            lo.clamp(0, len as isize) as usize,
            hi.clamp(0, len as isize) as usize,
        )
    };
    let scores = (0..t.tiles)
        .map(|i| {
            let (ty, tx) = (i / t.tiles_w, i % t.tiles_w);
            let (y0, y1) = span(ty * t.g, t.g, 0, h);
            let (x0, x1) = span(tx * t.g, t.g, 1, w);
            let area = (y1 - y0) * (x1 - x0);
            if area == 0 {
                return 0.0;
            }
            let sum = sat[y1 * (w + 1) + x1] - sat[y0 * (w + 1) + x1] - sat[y1 * (w + 1) + x0]
                + sat[y0 * (w + 1) + x0];
            (sum / area as f64) as f32
        })
        .collect();
    (scores, (sat[h * (w + 1) + w] / plane.max(1) as f64) as f32)
}

/// Adds each kept channel's `|x|` (or its weighted `x`) to `energy`, channel after
/// channel: the same sums on every path.
#[inline(always)]
fn energy_map(energy: &mut [f32], x: &[f32], channels: &[usize], weights: Option<&[f32]>) {
    let plane = energy.len();
    for &c in channels {
        let xs = &x[c * plane..(c + 1) * plane];
        match weights {
            None => energy.iter_mut().zip(xs).for_each(|(e, v)| *e += v.abs()),
            Some(wt) => energy.iter_mut().zip(xs).for_each(|(e, v)| *e += wt[c] * v),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn energy_avx512(
    energy: &mut [f32],
    x: &[f32],
    channels: &[usize],
    weights: Option<&[f32]>,
) {
    energy_map(energy, x, channels, weights)
}

/// FLOPs one spatial gate costs for one sample: the energy map over the kept input
/// channels, its summed-area table, and four lookups per tile.
pub fn tile_gate_flops(kept_inputs: usize, plane: usize, tiles: usize) -> u64 {
    (2 * kept_inputs * plane + 2 * plane + 4 * tiles) as u64
}

/// The output pixels (`y · ow + x`, ascending) of the kept `tiles` of `t` over an
/// `out_hw` output (edge tiles clipped to it).
///
/// Written in order, row of tiles by row of tiles and pixel row by pixel row, rather than
/// tile by tile and then sorted: for 118 of 196 tiles at 56×56 that took 1.3 µs instead
/// of 17.9 µs (the sort), on every spatial gate of every pass.
pub fn tile_pixels(t: &Tiling, tiles: &[usize], out_hw: [usize; 2]) -> Vec<usize> {
    let [oh, ow] = out_hw;
    let sorted;
    let tiles = if tiles.is_sorted() {
        tiles
    } else {
        sorted = {
            let mut v = tiles.to_vec();
            v.sort_unstable();
            v
        };
        &sorted[..]
    };
    let mut px = Vec::with_capacity(tiles.len() * t.g * t.g);
    for band in tiles.chunk_by(|a, b| a / t.tiles_w == b / t.tiles_w) {
        let y0 = band[0] / t.tiles_w * t.g;
        for y in y0..(y0 + t.g).min(oh) {
            for &i in band {
                let x0 = i % t.tiles_w * t.g;
                px.extend((x0..(x0 + t.g).min(ow)).map(|x| y * ow + x));
            }
        }
    }
    px
}

/// The `keep` best of `scores`, ties to the lower index, as sorted indices.
pub fn select(scores: &[f32], keep: usize) -> Vec<usize> {
    let n = scores.len();
    let keep = keep.min(n);
    if keep == n {
        return (0..n).collect();
    }
    if keep == 0 {
        return Vec::new();
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        return unsafe { select_avx512(scores, keep) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        return unsafe { select_avx2(scores, keep) };
    }
    select_branch_free(scores, keep)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn select_avx512(scores: &[f32], keep: usize) -> Vec<usize> {
    select_branch_free(scores, keep)
}

/// [`select_branch_free`] in 8-lane vectors (the baseline build counts in 4-lane SSE2
/// ones, without an unsigned 32-bit compare). AVX2 machine, 44% kept, fresh scores per
/// call: 2.3 against 4.8 µs for 960 scores, 2.2 against 5.8 µs for 576; MobileNetV2 at
/// budget 0.5, batch 1 (17 gates), in-process pairs (150): the pass 0.994 of the time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn select_avx2(scores: &[f32], keep: usize) -> Vec<usize> {
    select_branch_free(scores, keep)
}

/// [`select`] for `0 < keep < scores.len()`, without branching on comparisons of
/// scores. A gate's scores are in no order, so a quickselect mispredicts about every
/// other comparison: it took 10.8 µs for 1152 scores, against 2.8 µs for this (AVX-512,
/// fresh random scores per call, averaged over 4000 calls).
///
/// Each score becomes an integer key whose order is the scores' `total_cmp` order. The
/// `keep`-th largest key is found bit by bit, each bit by one counting pass over all
/// keys (these vectorize); the kept units are those above it, and the first of those
/// equal to it that are needed, read off one bit mask per 64 units. The search stops at
/// the first bit where exactly `keep` keys lie above the bar: from 32 passes (scores of
/// both signs) to about half as many; 44% kept of 576 fresh scores per call, 1.08
/// against 1.81 µs, of 960 1.78 against 2.70 (the Intel Xeon, AVX-512).
#[inline(always)]
fn select_branch_free(scores: &[f32], keep: usize) -> Vec<usize> {
    let keys: Vec<u32> = scores
        .iter()
        .map(|s| {
            // Negative scores flip every bit, the others only the sign bit.
            let b = s.to_bits();
            b ^ (((b as i32) >> 31) as u32 | 1 << 31)
        })
        .collect();
    let (lo, hi) = keys
        .iter()
        .fold((u32::MAX, 0), |(lo, hi), &k| (lo.min(k), hi.max(k)));
    // Bits above the highest one where the extremes differ are the same in every key.
    let free = 32 - (lo ^ hi).leading_zeros();
    let mut bar = lo.checked_shr(free).map_or(0, |p| p << free);
    for bit in (0..free).rev() {
        let candidate = bar | 1 << bit;
        let at_least = keys.iter().map(|&k| u32::from(k >= candidate)).sum::<u32>() as usize;
        if at_least == keep {
            // Exactly `keep` keys from here up: they are the kept ones, and the bits
            // below would only narrow the gap under them. (`candidate > 0`: it has a bit.)
            bar = candidate - 1;
            break;
        }
        if at_least > keep {
            bar = candidate;
        }
    }
    let above = keys.iter().map(|&k| u32::from(k > bar)).sum::<u32>() as usize;
    let mut ties = keep - above;
    let mut kept = Vec::with_capacity(keep);
    for (c, chunk) in keys.chunks(64).enumerate() {
        let (mut take, mut equal) = (0u64, 0u64);
        for (j, &k) in chunk.iter().enumerate() {
            take |= u64::from(k > bar) << j;
            equal |= u64::from(k == bar) << j;
        }
        if ties > 0 && equal != 0 {
            if equal.count_ones() as usize > ties {
                // Only the lowest `ties` of them.
                let mut rest = equal;
                for _ in 0..ties {
                    rest &= rest - 1;
                }
                equal ^= rest;
            }
            ties -= equal.count_ones() as usize;
            take |= equal;
        }
        while take != 0 {
            kept.push(c * 64 + take.trailing_zeros() as usize);
            take &= take - 1;
        }
    }
    kept
}

/// `keep` units chosen in aligned groups of `group` (units `group · b ..`, the last
/// group shorter when `group` does not divide the count), as sorted indices. Groups rank
/// by their mean score (ties to the lower index) and are kept whole while they fit;
/// the first that does not fit gives its best units for the rest (see [`select`]).
///
/// With the groups a packed block of weights (12 rows), the kept output channels fill
/// whole blocks: a micro-tile of them reads one stream of weights, the copy of the next
/// layer's kept input columns moves runs of 12, and whole blocks of weights are left
/// unread.
pub fn select_groups(scores: &[f32], keep: usize, group: usize) -> Vec<usize> {
    let n = scores.len();
    let group = group.max(1);
    if group == 1 || keep >= n {
        return select(scores, keep);
    }
    let means: Vec<f32> = scores
        .chunks(group)
        .map(|g| g.iter().sum::<f32>() / g.len() as f32)
        .collect();
    let mut kept = Vec::with_capacity(keep);
    for b in rank(&means) {
        let units = b * group..((b + 1) * group).min(n);
        let left = keep - kept.len();
        if units.len() <= left {
            kept.extend(units);
        } else {
            let best = select(&scores[units.clone()], left);
            kept.extend(best.into_iter().map(|i| units.start + i));
        }
        if kept.len() == keep {
            break;
        }
    }
    kept.sort_unstable();
    kept
}

/// Indices of `scores` from the best to the worst, ties to the lower index (the order
/// [`select`] keeps in).
fn rank(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1×1 expansion → depthwise 3×3 → `reader` kernel, as in an inverted residual block.
    fn block(reader: usize) -> Model {
        use crate::synthetic::{conv_chain, ConvSpec};
        let spec = |cout, k, depthwise| ConvSpec {
            cout,
            k,
            stride: 1,
            depthwise,
        };
        conv_chain(
            8,
            6,
            &[
                spec(20, 1, false),
                spec(20, 3, true),
                spec(5, reader, false),
            ],
        )
        .unwrap()
    }

    #[test]
    fn depthwise_chains_are_gateable_only_before_unpadded_pointwise_readers() {
        assert_eq!(gateable(&block(1)), vec![(0, vec![(1, true), (2, false)])]);
        // A 3×3 reader pads the depthwise output's constant planes with zeros, so a
        // dropped channel would not add the same value everywhere.
        assert!(gateable(&block(3)).is_empty());
        // Nor when the depthwise convolution adds a residual (shapes aside).
        let mut m = block(1);
        if let Op::Conv(c) = &mut m.desc.nodes[1].op {
            c.residual = Some(0);
        }
        assert!(gateable(&m).is_empty());
        // Nor before a reader in groups of several channels, which would read the
        // dropped ones.
        let mut m = block(1);
        if let Op::Conv(c) = &mut m.desc.nodes[1].op {
            c.groups = 10;
        }
        assert!(gateable(&m).is_empty());
    }

    #[test]
    fn training_free_gates_skip_convolutions_without_an_activation() {
        let mut m = block(1);
        assert!(channel_gates(&m).unwrap()[0].is_some());
        if let Op::Conv(c) = &mut m.desc.nodes[0].op {
            c.act = Act::None;
        }
        assert!(channel_gates(&m).unwrap().iter().all(Option::is_none));
    }

    /// Against the sums written out: kept channels read less their constant, with the
    /// shifted bias, give the reader's bias plus the kept channels' values plus, for
    /// every channel not kept, `Σ_o W[o][c] · relu(depthwise bias[c])`.
    #[test]
    fn shifted_bias_adds_what_the_dropped_channels_would() {
        use rand::Rng;
        let mut m = block(1);
        // Some depthwise biases below zero: those channels add nothing.
        let dwb = m.weights.get_mut("conv1.bias").unwrap();
        dwb.data.iter_mut().step_by(3).for_each(|b| *b = -b.abs());
        let m = m;
        assert!(DroppedConstants::for_node(&m, 0).unwrap().is_none());
        assert!(DroppedConstants::for_node(&m, 1).unwrap().is_none());
        let d = DroppedConstants::for_node(&m, 2).unwrap().unwrap();
        let dwb = &m.weights["conv1.bias"].data;
        let w = &m.weights["conv2.weight"].data;
        let bias = &m.weights["conv2.bias"].data;
        let mut rng = crate::exec::cpu::fresh_rng();
        for _ in 0..50 {
            let p: f64 = rng.random();
            let kept: Vec<bool> = (0..20).map(|_| rng.random_bool(p)).collect();
            let y: Vec<f32> = (0..20).map(|_| rng.random_range(0.0..6.0)).collect();
            for o in 0..5 {
                let got = d.shifted_bias[o]
                    + (0..20)
                        .filter(|&c| kept[c])
                        .map(|c| w[o * 20 + c] * (y[c] - d.constants[c]))
                        .sum::<f32>();
                let want = bias[o]
                    + (0..20)
                        .map(|c| w[o * 20 + c] * if kept[c] { y[c] } else { dwb[c].max(0.0) })
                        .sum::<f32>();
                assert!(
                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn group_selection_keeps_whole_groups_by_mean_then_the_best_of_the_next() {
        let s = [0.0, 1.0, 5.0, 5.0, -9.0, 9.0, 2.0];
        // Groups of 2 by mean: [2, 3] 5.0, [4, 5] 0.0, [6] 2.0, [0, 1] 0.5.
        assert_eq!(select_groups(&s, 2, 2), vec![2, 3]);
        assert_eq!(select_groups(&s, 3, 2), vec![2, 3, 6]);
        // The group [4, 5] does not fit whole: its best unit.
        assert_eq!(select_groups(&s, 4, 2), vec![1, 2, 3, 6]);
        // Groups of 3: [0, 1, 2] 2.0 ties [6] 2.0 and goes first, then [3, 4, 5].
        assert_eq!(select_groups(&s, 4, 3), vec![0, 1, 2, 6]);
        assert_eq!(select_groups(&s, 5, 3), vec![0, 1, 2, 5, 6]);
        assert_eq!(select_groups(&s, 7, 3), (0..7).collect::<Vec<_>>());
        assert_eq!(select_groups(&s, 3, 1), select(&s, 3));
        // Ties between group means go to the lower group.
        assert_eq!(select_groups(&[1.0, 1.0, 1.0, 1.0], 2, 2), vec![0, 1]);
    }

    /// Against a brute force over random scores: exactly `keep` units, sorted, and the
    /// kept set fills the best-ranked groups in order.
    #[test]
    fn group_selection_matches_a_brute_force() {
        use rand::Rng;
        let mut rng = crate::exec::cpu::fresh_rng();
        for _ in 0..200 {
            let n = rng.random_range(1..60);
            let group = rng.random_range(1..14);
            let keep = rng.random_range(0..=n);
            let scores: Vec<f32> = (0..n).map(|_| rng.random_range(0..8) as f32).collect();
            let got = select_groups(&scores, keep, group);
            assert_eq!(got.len(), keep);
            assert!(got.windows(2).all(|w| w[0] < w[1]));
            // Brute force: groups by mean, best first, ties to the lower group.
            let groups: Vec<Vec<usize>> = (0..n.div_ceil(group))
                .map(|b| (b * group..((b + 1) * group).min(n)).collect())
                .collect();
            let mean = |g: &Vec<usize>| g.iter().map(|&i| scores[i]).sum::<f32>() / g.len() as f32;
            let mut order: Vec<usize> = (0..groups.len()).collect();
            order.sort_by(|&a, &b| {
                mean(&groups[b])
                    .total_cmp(&mean(&groups[a]))
                    .then(a.cmp(&b))
            });
            let mut want: Vec<usize> = Vec::new();
            for b in order {
                let left = keep - want.len();
                if groups[b].len() <= left {
                    want.extend(&groups[b]);
                } else {
                    let mut units = groups[b].clone();
                    units.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
                    want.extend(&units[..left]);
                    break;
                }
            }
            want.sort_unstable();
            assert_eq!(got, want, "scores {scores:?} keep {keep} group {group}");
        }
    }

    #[test]
    fn selection_keeps_the_best_and_breaks_ties_by_index() {
        assert_eq!(select(&[0.5, 2.0, 2.0, -1.0, 3.0], 3), vec![1, 2, 4]);
        assert_eq!(select(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
        assert_eq!(select(&[1.0], 5), vec![0]);
    }

    /// The factors of a matrix of rank ≤ `rank` reproduce it, through an orthonormal basis.
    #[test]
    fn low_rank_factors_reproduce_a_low_rank_matrix() {
        use rand::Rng;
        let mut rng = crate::exec::cpu::fresh_rng();
        for case in 0..10 {
            let (m, n) = (rng.random_range(8..70), rng.random_range(8..70));
            let true_rank = rng.random_range(1..8);
            // The first three cases ask for more columns than the matrix has rows.
            let (m, true_rank) = if case < 3 {
                (true_rank, true_rank)
            } else {
                (m, true_rank)
            };
            let a: Vec<f32> = (0..m * true_rank)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let b: Vec<f32> = (0..true_rank * n)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let g: Vec<f32> = (0..m * n)
                .map(|i| {
                    (0..true_rank)
                        .map(|j| a[i / n * true_rank + j] * b[j * n + i % n])
                        .sum()
                })
                .collect();
            let rank = true_rank + rng.random_range(usize::from(case < 3)..3);
            let f = low_rank(&g, m, n, rank);
            assert_eq!((f.u.len(), f.v.len()), (m * rank, rank * n));
            let scale = g.iter().fold(0f32, |s, v| s.max(v.abs()));
            for (i, &want) in g.iter().enumerate() {
                let (o, c) = (i / n, i % n);
                let got: f32 = (0..rank).map(|j| f.u[o * rank + j] * f.v[j * n + c]).sum();
                assert!(
                    (got - want).abs() <= 1e-4 * scale,
                    "{m}×{n} rank {true_rank}"
                );
            }
            for j in 0..true_rank {
                for k in 0..true_rank {
                    let d: f32 = (0..m).map(|o| f.u[o * rank + j] * f.u[o * rank + k]).sum();
                    let want = if j == k { 1.0 } else { 0.0 };
                    assert!((d - want).abs() < 1e-4, "uᵀu[{j}][{k}] = {d}");
                }
            }
        }
    }

    #[test]
    fn selection_equals_a_full_sort() {
        use rand::Rng;
        let mut rng = crate::exec::cpu::fresh_rng();
        for round in 0..400 {
            let n = rng.random_range(1..if round % 2 == 0 { 300 } else { 2000 });
            // Few distinct values (many ties), or every score drawn from a range.
            let levels = rng.random_range(1..8);
            let continuous = round % 4 == 3;
            let special = [-0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY, -1e30, 1e-40];
            let scores: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..10) {
                    0 => special[rng.random_range(0..special.len())],
                    _ if continuous => rng.random_range(-3.0..5.0),
                    _ => rng.random_range(0..levels) as f32 - 2.0,
                })
                .collect();
            let keep = rng.random_range(0..=n + 1);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            order.truncate(keep);
            order.sort_unstable();
            assert_eq!(select(&scores, keep), order, "{scores:?} keep {keep}");
            if (1..n).contains(&keep) {
                let portable = select_branch_free(&scores, keep);
                assert_eq!(portable, order, "{scores:?} keep {keep}");
            }
        }
    }

    #[test]
    fn kept_counts_round_up_to_the_tile() {
        assert_eq!(kept_count(64, 0.5, 8), 32);
        assert_eq!(kept_count(64, 0.3, 8), 24);
        assert_eq!(kept_count(64, 0.01, 8), 8);
        assert_eq!(kept_count(6, 0.01, 8), 6);
        assert_eq!(kept_count(100, 1.0, 12), 100);
        assert_eq!(kept_count(100, 0.5, 12), 60);
    }

    #[test]
    fn thresholds_keep_what_clears_the_bar_rounded_up() {
        let s = [3.0, -1.0, 0.5, 0.0, -2.0, 1.0];
        // sigmoid ≥ 0.5 ⇔ score ≥ 0: four clear it, rounded up to 2s is 4.
        assert_eq!(
            choose(&s, Cut::Threshold(0.5), channel_bar, 2),
            vec![0, 2, 3, 5]
        );
        assert_eq!(
            choose(&s, Cut::Threshold(0.5), channel_bar, 3),
            (0..6).collect::<Vec<_>>()
        );
        // Nothing clears it: one round's worth is still kept.
        assert_eq!(
            choose(&s, Cut::Threshold(0.999), channel_bar, 2),
            vec![0, 5]
        );
        assert_eq!(choose(&s, Cut::Ratio(0.5), channel_bar, 1), vec![0, 2, 5]);
        assert_eq!(choose(&s, Cut::All, channel_bar, 4).len(), 6);
        assert!((tile_bar(0.5, 2.0) - 2.0).abs() < 1e-6);
        assert!((channel_bar(0.5)).abs() < 1e-6);
    }

    #[test]
    fn tile_scores_are_window_means_over_kept_channels() {
        use crate::exec::cpu::fresh_rng;
        use rand::Rng;
        let mut rng = fresh_rng();
        for _ in 0..50 {
            let g = ConvGeom {
                in_c: rng.random_range(1..5),
                in_hw: [rng.random_range(4..20), rng.random_range(4..20)],
                out_hw: [0, 0],
                kernel: [rng.random_range(1..4), rng.random_range(1..4)],
                stride: [rng.random_range(1..3), rng.random_range(1..3)],
                pad_tl: [rng.random_range(0..2), rng.random_range(0..2)],
            };
            let g = ConvGeom {
                out_hw: [
                    (g.in_hw[0] + 2 * g.pad_tl[0]).saturating_sub(g.kernel[0]) / g.stride[0] + 1,
                    (g.in_hw[1] + 2 * g.pad_tl[1]).saturating_sub(g.kernel[1]) / g.stride[1] + 1,
                ],
                ..g
            };
            let t = Tiling::with_edge(g.out_hw[0], g.out_hw[1], rng.random_range(1..4));
            let plane = g.in_hw[0] * g.in_hw[1];
            let x: Vec<f32> = (0..g.in_c * plane)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let chans: Vec<usize> = (0..g.in_c).filter(|_| rng.random_bool(0.7)).collect();
            // Half the cases weigh the channels (a trained gate), half take |x| (energy).
            let wt: Option<Vec<f32>> = rng
                .random_bool(0.5)
                .then(|| (0..g.in_c).map(|_| rng.random_range(-1.0..1.0)).collect());
            let (scores, mean) = tile_scores(&x, &chans, wt.as_deref(), &g, &t);
            let e = |y: usize, xx: usize| -> f64 {
                chans
                    .iter()
                    .map(|&c| {
                        let v = f64::from(x[c * plane + y * g.in_hw[1] + xx]);
                        wt.as_ref().map_or(v.abs(), |w| f64::from(w[c]) * v)
                    })
                    .sum()
            };
            for (i, &s) in scores.iter().enumerate() {
                // Naive: every in-image pixel of the rectangle from the first window's
                // top-left tap to the last window's bottom-right tap, summed directly.
                let mut seen = Vec::new();
                let (ty, tx) = (i / t.tiles_w, i % t.tiles_w);
                let last_y = ((ty + 1) * t.g).min(g.out_hw[0]) - 1;
                let last_x = ((tx + 1) * t.g).min(g.out_hw[1]) - 1;
                let top = (ty * t.g * g.stride[0]) as isize - g.pad_tl[0] as isize;
                let left = (tx * t.g * g.stride[1]) as isize - g.pad_tl[1] as isize;
                let bottom = (last_y * g.stride[0] + g.kernel[0]) as isize - g.pad_tl[0] as isize;
                let right = (last_x * g.stride[1] + g.kernel[1]) as isize - g.pad_tl[1] as isize;
                for y in top..bottom {
                    for xx in left..right {
                        let inside = y >= 0
                            && xx >= 0
                            && (y as usize) < g.in_hw[0]
                            && (xx as usize) < g.in_hw[1];
                        if inside {
                            seen.push((y as usize, xx as usize));
                        }
                    }
                }
                let want = if seen.is_empty() {
                    0.0
                } else {
                    seen.iter().map(|&(y, xx)| e(y, xx)).sum::<f64>() / seen.len() as f64
                };
                assert!(
                    (f64::from(s) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "tile {i} of {t:?}, {g:?}: {s} vs {want}"
                );
            }
            let all: f64 = (0..g.in_hw[0])
                .flat_map(|y| (0..g.in_hw[1]).map(move |xx| (y, xx)))
                .map(|(y, xx)| e(y, xx))
                .sum();
            assert!((f64::from(mean) - all / plane as f64).abs() <= 1e-4 * (1.0 + all.abs()));
        }
    }

    /// Kept tiles' pixels, in any order of tiles, equal the pixels of each tile written
    /// out and sorted, on tilings with and without clipped edge tiles.
    #[test]
    fn tile_pixels_match_every_tile_written_out_and_sorted() {
        use rand::seq::SliceRandom;
        use rand::Rng;
        let mut rng = crate::exec::cpu::fresh_rng();
        for _ in 0..200 {
            let (oh, ow) = (rng.random_range(1..40), rng.random_range(1..40));
            let t = Tiling::with_edge(oh, ow, rng.random_range(1..6));
            let mut kept: Vec<usize> = (0..t.tiles).filter(|_| rng.random_bool(0.6)).collect();
            if rng.random_bool(0.3) {
                kept.shuffle(&mut rng);
            }
            let mut want = Vec::new();
            for &i in &kept {
                let (y0, x0) = (i / t.tiles_w * t.g, i % t.tiles_w * t.g);
                for y in y0..(y0 + t.g).min(oh) {
                    for x in x0..(x0 + t.g).min(ow) {
                        want.push(y * ow + x);
                    }
                }
            }
            want.sort_unstable();
            assert_eq!(
                tile_pixels(&t, &kept, [oh, ow]),
                want,
                "{oh}×{ow} g {}",
                t.g
            );
        }
    }

    #[test]
    fn cpu_tiles_are_whole_and_pixels_cover_them() {
        let t = cpu_tiling(56, 56).unwrap();
        assert_eq!((t.g, t.tiles), (4, 196));
        assert_eq!(cpu_tiling(14, 14).unwrap().g, 2);
        assert_eq!(cpu_tiling(8, 8).unwrap().g, 2);
        assert!(cpu_tiling(7, 7).is_none());
        assert!(cpu_tiling(4, 4).is_none());
        let t = cpu_tiling(8, 12).unwrap();
        let px = tile_pixels(&t, &[0, 5], [8, 12]);
        assert_eq!(px, vec![0, 1, 10, 11, 12, 13, 22, 23]);
        assert_eq!(tiles_per_panel(&t, 32), 8);
        let all: Vec<usize> = (0..t.tiles).collect();
        assert_eq!(tile_pixels(&t, &all, [8, 12]), (0..96).collect::<Vec<_>>());
        // Edge tiles of a tiling that does not divide the output are clipped.
        let t = Tiling::with_edge(5, 7, 3);
        let all: Vec<usize> = (0..t.tiles).collect();
        assert_eq!(tile_pixels(&t, &all, [5, 7]), (0..35).collect::<Vec<_>>());
    }
}
