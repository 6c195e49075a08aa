//! Channel gates, defined once for every executor: which convolutions can be gated, the
//! training-free gate weights, and how a gate chooses what to keep.
//!
//! For a gated convolution with input `x`, the score of output channel `co` is
//! `sum over kept ci of G[co][ci] * mean(x[ci]) + b[co]`; the `keep` highest scores are
//! kept, ties going to the lower index. Without trained gate weights, `G` is the
//! BN-folded convolution weight summed over its window and `b` its bias: the score is
//! then the channel's mean pre-activation output (exact away from the padded border) — a
//! saliency predicted from the layer's input before the layer runs.

use crate::format::{Model, TensorData};
use crate::model::Op;

/// Convolutions whose output channels can be gated, with the nodes that follow each
/// decision. A convolution qualifies when it is not depthwise, adds no residual, and
/// every reader of its output is a convolution reading it as input (not as a residual):
/// either a regular one (which then skips the dropped channels as inputs) or a depthwise
/// one (which computes only the kept channels) whose own readers are regular
/// convolutions. Dropped channels are then never read, so they need not be written.
pub fn gateable(model: &Model) -> Vec<(usize, Vec<(usize, bool)>)> {
    let nodes = &model.desc.nodes;
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
            } else if !residual && conv(j).is_some_and(|d| d.groups > 1) {
                let after = readers(j + 1);
                if after.is_empty() || !after.iter().all(|&(k, r)| regular_input(k, r)) {
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

/// The `keep` best of `scores`, ties to the lower index, as sorted indices.
pub fn select(scores: &[f32], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(keep.min(scores.len()));
    order.sort_unstable();
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_keeps_the_best_and_breaks_ties_by_index() {
        assert_eq!(select(&[0.5, 2.0, 2.0, -1.0, 3.0], 3), vec![1, 2, 4]);
        assert_eq!(select(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
        assert_eq!(select(&[1.0], 5), vec![0]);
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
}
