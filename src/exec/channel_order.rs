//! Channel order for the gates: a model whose gated convolutions list their output
//! channels most-often-kept first.
//!
//! A gate keeps a different set of channels for each input, but in a trained network
//! the sets overlap heavily: some channels are active for nearly every input, others
//! rarely. The order of a convolution's output channels is arbitrary (renumbering them,
//! and the input channels of every layer that reads them, computes the same network),
//! so it can be chosen to put the channels gates keep most often first. Then a pass's
//! kept channels lie mostly in one leading run: the rows the GEMM kernels read come in
//! whole packed blocks, a layer that skips input channels reads runs of consecutive
//! weight columns, and a depthwise layer's kept planes sit side by side — the same
//! FLOPs, fewer cache lines and fewer scattered reads.
//!
//! [`keep_counts`] counts, over calibration passes at a ladder of keep ratios, how often
//! each channel of each gated convolution was kept; [`KeepCounts::orders`] sorts each
//! convolution's channels by that count; [`reorder`] renumbers the model. Logits of a
//! reordered model equal the original's up to float rounding (sums over input channels
//! run in another order). Gates choose the same channels, renumbered, except where two
//! scores lie within rounding of each other, where either may win.
//!
//! ```
//! use dynsparse::exec::channel_order;
//! use dynsparse::synthetic::{conv_chain, ConvSpec};
//! use dynsparse::exec::cpu::EngineExecutor;
//! use dynsparse::exec::Executor;
//! let spec = |cout, k, depthwise| ConvSpec { cout, k, stride: 1, depthwise };
//! let model = conv_chain(8, 8, &[spec(32, 1, false), spec(32, 3, true), spec(16, 1, false)])?;
//! // Calibrate on one input (any NCHW batch of the model's input shape).
//! let x: Vec<f32> = (0..8 * 8 * 8).map(|i| (i % 13) as f32 / 13.0).collect();
//! let (reordered, counts) = channel_order::calibrate(&model, &x)?;
//! assert_eq!(counts.passes, channel_order::CALIBRATION_KEEPS.len());
//! // The same network: equal logits, dense.
//! let a = EngineExecutor::new(&model)?.forward(&x, 1)?;
//! let b = EngineExecutor::new(&reordered)?.forward(&x, 1)?;
//! assert!((a[0] - b[0]).abs() <= 1e-5 * a[0].abs().max(1.0));
//! # Ok::<(), dynsparse::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::exec::cpu::EngineExecutor;
use crate::exec::{gating, Executor, Policy};
use crate::format::{Model, TensorData};
use crate::model::Op;

/// Keep ratios every calibration input is run at: a channel kept at a small ratio ranks
/// above one kept only at larger ones.
pub const CALIBRATION_KEEPS: [f64; 3] = [0.25, 0.5, 0.75];

/// Samples per calibration pass.
const CALIBRATION_BATCH: usize = 8;

/// Per node, its output channels in a new order (`order[new] = old`), or `None` to leave
/// them as they are.
pub type Orders = Vec<Option<Vec<usize>>>;

/// How often the gates kept each channel over calibration passes.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepCounts {
    /// Sample passes counted: calibration inputs × [`CALIBRATION_KEEPS`].
    pub passes: usize,
    /// Per node: for a gated convolution, how many passes kept each output channel.
    pub counts: Vec<Option<Vec<u32>>>,
}

impl KeepCounts {
    /// Each counted convolution's channels, most often kept first; channels kept equally
    /// often keep their relative order.
    pub fn orders(&self) -> Orders {
        self.counts
            .iter()
            .map(|c| {
                c.as_ref().map(|c| {
                    let mut order: Vec<usize> = (0..c.len()).collect();
                    order.sort_by(|&a, &b| c[b].cmp(&c[a]).then(a.cmp(&b)));
                    order
                })
            })
            .collect()
    }
}

/// Of the channels in `kept` (each a pass's kept channels of one convolution), the share
/// that lie among the convolution's first channels, as many as the pass kept: 1 where
/// every pass kept a leading run. What [`reorder`] by calibrated orders aims at.
pub fn leading_share<'a>(kept: impl IntoIterator<Item = &'a Vec<usize>>) -> f64 {
    let (mut inside, mut all) = (0usize, 0usize);
    for k in kept {
        inside += k.iter().filter(|&&c| c < k.len()).count();
        all += k.len();
    }
    if all == 0 {
        1.0
    } else {
        inside as f64 / all as f64
    }
}

/// Counts, over `inputs` (NCHW, a whole number of the model's input samples) run on
/// `executor` (built from `model`) at each of [`CALIBRATION_KEEPS`], how often each
/// gateable convolution kept each of its output channels. `progress` is called after each
/// batch of samples with the number done so far.
pub fn keep_counts(
    executor: &impl Executor,
    model: &Model,
    inputs: &[f32],
    mut progress: impl FnMut(usize),
) -> Result<KeepCounts> {
    let sample = sample_len(model);
    if inputs.is_empty() || !inputs.len().is_multiple_of(sample) {
        return Err(Error::Input(format!(
            "calibration inputs hold {} values, not a whole number (at least one) of \
             samples of {sample}",
            inputs.len()
        )));
    }
    let mut counts: Vec<Option<Vec<u32>>> = vec![None; model.desc.nodes.len()];
    // (A depthwise reader reports its input's kept channels as its own: not counted.)
    let mut gated = vec![false; model.desc.nodes.len()];
    for (i, _) in gating::gateable(model) {
        gated[i] = true;
    }
    let mut done = 0;
    for batch in inputs.chunks(CALIBRATION_BATCH * sample) {
        let n = batch.len() / sample;
        for keep in CALIBRATION_KEEPS {
            let f = executor.forward_with(batch, n, Policy::Keep(keep))?;
            for (node, kept) in f.kept.iter().enumerate() {
                let (Some(kept), Op::Conv(c), true) =
                    (kept, &model.desc.nodes[node].op, gated[node])
                else {
                    continue;
                };
                let count = counts[node].get_or_insert_with(|| vec![0; c.out_channels]);
                for &ch in kept.iter().flatten() {
                    count[ch] += 1;
                }
            }
        }
        done += n;
        progress(done);
    }
    Ok(KeepCounts {
        passes: done * CALIBRATION_KEEPS.len(),
        counts,
    })
}

/// Values of one input sample.
fn sample_len(model: &Model) -> usize {
    model.layers[0].input.iter().product()
}

/// `model` with each gateable convolution's output channels in the order `orders` gives
/// it (`order[new] = old`), and every layer that reads them renumbered to match: a
/// depthwise reader's channels, a regular reader's input channels, and the trained gates'
/// rows (the convolution's own) and columns (a regular reader's) over them. Fails, changing nothing, if `orders` does not have one
/// entry per node, names a convolution whose output cannot be gated (its channels are
/// read past the layers [`gating::gateable`] follows), or gives a node something other
/// than a permutation of its output channels.
pub fn reorder(model: &Model, orders: &Orders) -> Result<Model> {
    let nodes = &model.desc.nodes;
    if orders.len() != nodes.len() {
        return Err(Error::Input(format!(
            "{} channel orders for a model of {} nodes",
            orders.len(),
            nodes.len()
        )));
    }
    let gateable = gating::gateable(model);
    for (i, order) in orders.iter().enumerate() {
        let Some(order) = order else { continue };
        let name = &nodes[i].name;
        if !gateable.iter().any(|(g, _)| *g == i) {
            return Err(Error::Input(format!(
                "node {name}: only the output channels of a convolution whose readers \
                 the gates follow can be reordered"
            )));
        }
        let Op::Conv(c) = &nodes[i].op else {
            unreachable!("gateable nodes are convolutions")
        };
        let mut seen = vec![false; c.out_channels];
        let permutation = order.len() == c.out_channels
            && order
                .iter()
                .all(|&o| o < seen.len() && !std::mem::replace(&mut seen[o], true));
        if !permutation {
            return Err(Error::Input(format!(
                "node {name}: the order is not a permutation of its {} output channels",
                c.out_channels
            )));
        }
    }
    let mut weights = model.weights.clone();
    let mut apply = |tensor: String, axis: usize, order: &[usize]| -> Result<()> {
        match weights.get_mut(&tensor) {
            Some(t) => permute_axis(t, axis, order, &tensor),
            None => Ok(()),
        }
    };
    for (i, followers) in &gateable {
        let Some(order) = &orders[*i] else { continue };
        let name = &nodes[*i].name;
        apply(format!("{name}.weight"), 0, order)?;
        apply(format!("{name}.bias"), 0, order)?;
        apply(format!("{name}.gate.channel.weight"), 0, order)?;
        apply(format!("{name}.gate.channel.bias"), 0, order)?;
        for &(j, depthwise) in followers {
            let reader = &nodes[j].name;
            if depthwise {
                // Channel c in, channel c out: its planes move with the channels. (A
                // grouped convolution carries no gates: the model format refuses them.)
                apply(format!("{reader}.weight"), 0, order)?;
                apply(format!("{reader}.bias"), 0, order)?;
            } else {
                apply(format!("{reader}.weight"), 1, order)?;
                apply(format!("{reader}.gate.channel.weight"), 1, order)?;
                apply(format!("{reader}.gate.spatial.weight"), 0, order)?;
            }
        }
    }
    Model::new(model.desc.clone(), weights)
}

/// Moves the slices of `t` along `axis` so that slice `new` holds what slice
/// `order[new]` held.
fn permute_axis(t: &mut TensorData, axis: usize, order: &[usize], name: &str) -> Result<()> {
    if t.shape.get(axis) != Some(&order.len()) {
        return Err(Error::ModelTensors(format!(
            "{name}: shape {:?} has no axis {axis} of {} to reorder",
            t.shape,
            order.len()
        )));
    }
    let outer: usize = t.shape[..axis].iter().product();
    let inner: usize = t.shape[axis + 1..].iter().product();
    let old = t.data.clone();
    for o in 0..outer {
        let base = o * order.len() * inner;
        for (new, &from) in order.iter().enumerate() {
            let (to, from) = (base + new * inner, base + from * inner);
            t.data[to..to + inner].copy_from_slice(&old[from..from + inner]);
        }
    }
    Ok(())
}

/// [`keep_counts`] on the CPU engine, then [`reorder`] by [`KeepCounts::orders`]: the
/// reordered model and the counts it was ordered by.
pub fn calibrate(model: &Model, inputs: &[f32]) -> Result<(Model, KeepCounts)> {
    let engine = EngineExecutor::new(model)?;
    let counts = keep_counts(&engine, model, inputs, |_| {})?;
    Ok((reorder(model, &counts.orders())?, counts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ConvGate;
    use crate::synthetic::{conv_chain, ConvSpec};
    use rand::seq::SliceRandom;
    use rand::Rng;

    /// Two inverted-residual blocks, then two regular 3×3 layers and a 1×1 one: gateable
    /// expansions (read by a depthwise layer and its projection), projections and 3×3
    /// layers read by regular convolutions, and a last layer read by the pool, which is
    /// not. With `trained`, every gateable layer carries a trained channel gate whose
    /// scores are its bias, set far apart (multiples of 10 over weights below 0.05), so
    /// that no two channels tie under any order of the sums; and every regular layer a
    /// spatial gate over its input channels.
    fn blocks(rng: &mut impl Rng, trained: bool) -> Model {
        let spec = |cout, k, depthwise| ConvSpec {
            cout,
            k,
            stride: 1,
            depthwise,
        };
        let specs = [
            spec(36, 1, false),
            spec(36, 3, true),
            spec(20, 1, false),
            spec(48, 1, false),
            spec(48, 3, true),
            spec(24, 1, false),
            spec(28, 3, false),
            spec(30, 3, false),
            spec(16, 1, false),
        ];
        let mut model = conv_chain(8, 8, &specs).unwrap();
        if !trained {
            return model;
        }
        let gated: Vec<usize> = gating::gateable(&model).iter().map(|g| g.0).collect();
        let mut weights = model.weights.clone();
        for (i, node) in model.desc.nodes.iter_mut().enumerate() {
            let Op::Conv(c) = &mut node.op else { continue };
            if c.groups != 1 {
                continue;
            }
            let channels = gated.contains(&i);
            let (cin, cout) = (c.in_channels, c.out_channels);
            if channels {
                let mut rank: Vec<usize> = (0..cout).collect();
                rank.shuffle(rng);
                let bias = rank.iter().map(|&r| 10.0 * r as f32 - 5.0 * cout as f32);
                weights.insert(
                    format!("{}.gate.channel.weight", node.name),
                    TensorData::new(
                        vec![cout, cin],
                        (0..cout * cin)
                            .map(|_| rng.random_range(-0.05..0.05))
                            .collect(),
                    )
                    .unwrap(),
                );
                weights.insert(
                    format!("{}.gate.channel.bias", node.name),
                    TensorData::new(vec![cout], bias.collect()).unwrap(),
                );
            }
            weights.insert(
                format!("{}.gate.spatial.weight", node.name),
                TensorData::new(
                    vec![cin],
                    (0..cin).map(|_| rng.random_range(-1.0..1.0)).collect(),
                )
                .unwrap(),
            );
            weights.insert(
                format!("{}.gate.spatial.bias", node.name),
                TensorData::new(vec![1], vec![0.0]).unwrap(),
            );
            c.gate = Some(ConvGate {
                channels,
                tiles: true,
            });
        }
        Model::new(model.desc, weights).unwrap()
    }

    fn random_orders(rng: &mut impl Rng, model: &Model) -> Orders {
        let mut orders = vec![None; model.desc.nodes.len()];
        for (i, _) in gating::gateable(model) {
            let Op::Conv(c) = &model.desc.nodes[i].op else {
                unreachable!()
            };
            let mut order: Vec<usize> = (0..c.out_channels).collect();
            order.shuffle(rng);
            orders[i] = rng.random_bool(0.8).then_some(order);
        }
        orders
    }

    fn input(rng: &mut impl Rng, model: &Model, batch: usize) -> Vec<f32> {
        (0..batch * sample_len(model))
            .map(|_| rng.random_range(-1.0..1.0))
            .collect()
    }

    /// Renumbered by random orders, a model computes the same logits dense, with
    /// training-free gates and without; with trained gates whose scores cannot tie, a
    /// gated pass keeps the same channels under their new numbers, and the same logits.
    #[test]
    fn a_reordered_model_computes_what_the_original_does() {
        let mut rng = crate::exec::cpu::fresh_rng();
        for case in 0..6 {
            let trained = case % 2 == 1;
            let model = blocks(&mut rng, trained);
            let orders = random_orders(&mut rng, &model);
            let reordered = reorder(&model, &orders).unwrap();
            let x = input(&mut rng, &model, 2);
            let (a, b) = (
                EngineExecutor::new(&model).unwrap(),
                EngineExecutor::new(&reordered).unwrap(),
            );
            let close = |p: &[f32], q: &[f32]| {
                let top = p.iter().fold(1f32, |m, v| m.max(v.abs()));
                p.iter().zip(q).all(|(u, v)| (u - v).abs() <= 1e-5 * top)
            };
            let (da, db) = (a.forward(&x, 2).unwrap(), b.forward(&x, 2).unwrap());
            assert!(close(&da, &db), "case {case}: dense {da:?} vs {db:?}");
            if !trained {
                continue;
            }
            for policy in [
                Policy::Keep(0.5),
                Policy::Gates(crate::exec::Gates {
                    channels: crate::exec::Cut::Ratio(0.4),
                    tiles: crate::exec::Cut::Ratio(0.6),
                }),
            ] {
                let (ga, gb) = (
                    a.forward_with(&x, 2, policy).unwrap(),
                    b.forward_with(&x, 2, policy).unwrap(),
                );
                assert!(
                    close(&ga.logits, &gb.logits),
                    "case {case} {policy:?}: logits"
                );
                assert_eq!(ga.flops, gb.flops, "case {case} {policy:?}: FLOPs");
                for (node, order) in orders.iter().enumerate() {
                    let (Some(order), Some(ka), Some(kb)) = (order, &ga.kept[node], &gb.kept[node])
                    else {
                        continue;
                    };
                    for (sa, sb) in ka.iter().zip(kb) {
                        let mut renamed: Vec<usize> = sb.iter().map(|&new| order[new]).collect();
                        renamed.sort_unstable();
                        assert_eq!(&renamed, sa, "case {case} {policy:?}: node {node}");
                    }
                }
            }
        }
    }

    /// Calibrated on one input, the model keeps on that input, at each calibration
    /// ratio, every gated layer's leading channels; the counts cover every gateable
    /// layer and every pass.
    #[test]
    fn calibrated_orders_put_the_kept_channels_first() {
        let mut rng = crate::exec::cpu::fresh_rng();
        let model = blocks(&mut rng, true);
        let x = input(&mut rng, &model, 1);
        let (reordered, counts) = calibrate(&model, &x).unwrap();
        assert_eq!(counts.passes, CALIBRATION_KEEPS.len());
        let gated: Vec<usize> = gating::gateable(&model).iter().map(|g| g.0).collect();
        for (node, c) in counts.counts.iter().enumerate() {
            assert_eq!(c.is_some(), gated.contains(&node), "node {node}");
            if let Some(c) = c {
                assert!(c.iter().all(|&n| n as usize <= counts.passes));
                assert!(c.contains(&3) && c.iter().any(|&n| n < 3));
            }
        }
        let engine = EngineExecutor::new(&reordered).unwrap();
        let original = EngineExecutor::new(&model).unwrap();
        for keep in CALIBRATION_KEEPS {
            let f = engine.forward_with(&x, 1, Policy::Keep(keep)).unwrap();
            let before = original.forward_with(&x, 1, Policy::Keep(keep)).unwrap();
            let kept: Vec<&Vec<usize>> = gated
                .iter()
                .filter_map(|&g| f.kept[g].as_ref())
                .flatten()
                .collect();
            assert_eq!(kept.len(), gated.len());
            for k in &kept {
                assert_eq!(**k, (0..k.len()).collect::<Vec<_>>(), "keep {keep}");
            }
            assert_eq!(leading_share(kept), 1.0);
            let scattered = gated
                .iter()
                .filter_map(|&g| before.kept[g].as_ref())
                .flatten();
            assert!(
                leading_share(scattered) < 1.0,
                "keep {keep}: already leading"
            );
        }
    }

    /// Tensor by tensor: a reordered layer's rows (weights, bias, its channel gate's rows
    /// and bias), and its readers' slices over those channels (a depthwise reader's
    /// planes and bias, a regular reader's input columns, the readers' gates' columns and
    /// spatial weights) hold what the original held at the old channel.
    #[test]
    fn reordered_tensors_move_with_their_channels() {
        let mut rng = crate::exec::cpu::fresh_rng();
        let model = blocks(&mut rng, true);
        let mut orders = random_orders(&mut rng, &model);
        for (i, _) in gating::gateable(&model) {
            if orders[i].is_none() {
                let Op::Conv(c) = &model.desc.nodes[i].op else {
                    unreachable!()
                };
                let mut order: Vec<usize> = (0..c.out_channels).collect();
                order.shuffle(&mut rng);
                orders[i] = Some(order);
            }
        }
        let reordered = reorder(&model, &orders).unwrap();
        // The old index of channel `new` along each axis of `tensor`, per node's order.
        let nodes = &model.desc.nodes;
        let input_order = |j: usize| -> Option<&Vec<usize>> {
            let src = nodes[j].input.checked_sub(1)?;
            match &nodes[src].op {
                Op::Conv(c) if c.groups > 1 => orders[nodes[src].input.checked_sub(1)?].as_ref(),
                _ => orders[src].as_ref(),
            }
        };
        let mut checked = 0;
        for (j, node) in nodes.iter().enumerate() {
            let Op::Conv(c) = &node.op else { continue };
            let own = if c.groups > 1 {
                input_order(j)
            } else {
                orders[j].as_ref()
            };
            let inp = input_order(j).filter(|_| c.groups == 1);
            for (suffix, row_axis, col_axis) in [
                ("weight", true, true),
                ("bias", true, false),
                ("gate.channel.weight", true, true),
                ("gate.channel.bias", true, false),
                ("gate.spatial.weight", false, true),
            ] {
                let name = format!("{}.{suffix}", node.name);
                let (Some(old), Some(new)) =
                    (model.weights.get(&name), reordered.weights.get(&name))
                else {
                    continue;
                };
                let rows = if row_axis { own } else { None };
                let cols = if col_axis { inp } else { None };
                let shape = &old.shape;
                let (r, cn) = (shape[0], if col_axis && row_axis { shape[1] } else { 1 });
                let inner = old.data.len() / (r * cn);
                for (idx, &v) in new.data.iter().enumerate() {
                    let (a, b, k) = (idx / (cn * inner), idx / inner % cn, idx % inner);
                    let (a, b) = if row_axis {
                        (rows.map_or(a, |o| o[a]), cols.map_or(b, |o| o[b]))
                    } else {
                        (cols.map_or(a, |o| o[a]), b)
                    };
                    assert_eq!(v, old.data[(a * cn + b) * inner + k], "{name}[{idx}]");
                }
                checked += 1;
            }
        }
        assert!(checked >= 30, "{checked} tensors checked");
    }

    #[test]
    fn orders_that_are_not_permutations_of_a_gateable_layer_are_refused() {
        let mut rng = crate::exec::cpu::fresh_rng();
        let model = blocks(&mut rng, false);
        let n = model.desc.nodes.len();
        let last = n - 3;
        let mut bad = Vec::new();
        bad.push(vec![None; n - 1]);
        let mut o = vec![None; n];
        o[0] = Some((0..35).collect());
        bad.push(o.clone());
        o[0] = Some((0..36).map(|c| c.min(34)).collect());
        bad.push(o.clone());
        o[0] = Some((1..37).collect());
        bad.push(o.clone());
        let mut o = vec![None; n];
        // The depthwise layer and the last one (read by the pool) are not gateable.
        o[1] = Some((0..36).collect());
        bad.push(o);
        let mut o = vec![None; n];
        o[last] = Some((0..16).rev().collect());
        bad.push(o);
        for orders in bad {
            assert!(
                matches!(reorder(&model, &orders), Err(Error::Input(_))),
                "{orders:?}"
            );
        }
        // Before a reader in groups that is not depthwise (channels cannot cross its
        // groups), a layer is not gateable.
        let spec = |cout, k| ConvSpec {
            cout,
            k,
            stride: 1,
            depthwise: false,
        };
        let mut grouped = conv_chain(8, 8, &[spec(16, 1), spec(16, 3), spec(8, 1)]).unwrap();
        let Op::Conv(c) = &mut grouped.desc.nodes[1].op else {
            unreachable!()
        };
        c.groups = 2;
        grouped.weights.insert(
            "conv1.weight".into(),
            TensorData::new(vec![16, 8, 3, 3], vec![0.1; 16 * 8 * 9]).unwrap(),
        );
        let grouped = Model::new(grouped.desc, grouped.weights).unwrap();
        let mut o = vec![None; grouped.desc.nodes.len()];
        o[0] = Some((0..16).rev().collect());
        match reorder(&grouped, &o) {
            Err(Error::Input(m)) => assert!(m.contains("readers the gates follow"), "{m}"),
            other => panic!("a grouped reader: {:?}", other.map(|_| ())),
        }
        // Leaving every layer as it is changes nothing.
        let same = reorder(&model, &vec![None; n]).unwrap();
        assert_eq!(same.weights, model.weights);
    }

    #[test]
    fn calibration_inputs_must_be_whole_samples() {
        let mut rng = crate::exec::cpu::fresh_rng();
        let model = blocks(&mut rng, false);
        let engine = EngineExecutor::new(&model).unwrap();
        let x = input(&mut rng, &model, 2);
        for len in [0, 1, x.len() - 1] {
            let r = keep_counts(&engine, &model, &x[..len], |_| {});
            assert!(matches!(r, Err(Error::Input(_))), "{len} values");
        }
        let mut seen = Vec::new();
        let counts = keep_counts(&engine, &model, &x, |d| seen.push(d)).unwrap();
        assert_eq!(counts.passes, 2 * CALIBRATION_KEEPS.len());
        assert_eq!(seen, vec![2]);
    }
}
