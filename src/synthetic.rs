//! Small synthetic models for benchmarks and the hardware profile: a chain of
//! convolutions, then a global pool and a 1-class linear layer, with deterministic
//! pseudo-random weights.
//!
//! ```
//! use dynsparse::synthetic::{conv_chain, ConvSpec};
//! let model = conv_chain(16, 8, &[ConvSpec { cout: 24, k: 3, stride: 1, depthwise: false }])?;
//! assert_eq!(model.layers[0].output, [24, 8, 8]);
//! # Ok::<(), dynsparse::Error>(())
//! ```

use std::collections::HashMap;

use crate::error::Result;
use crate::model::{
    Act, ChannelOrder, Conv, InputSpec, Linear, ModelDesc, Node, Op, Padding, Preprocess,
    FORMAT_VERSION,
};
use crate::{Model, TensorData};

/// One convolution of a chain.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    /// Output channels.
    pub cout: usize,
    /// Square kernel edge.
    pub k: usize,
    /// Stride, both ways.
    pub stride: usize,
    /// Depthwise (groups = channels; `cout` must equal the input channels).
    pub depthwise: bool,
}

/// Values in [0, 1) from a multiplicative hash of the index.
pub fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32 ^ seed).wrapping_mul(2654435761) >> 8) as f32 / (1u32 << 24) as f32)
        .collect()
}

/// `cin × hw × hw` input → the convolutions (named `conv0`, `conv1`, …, padding k/2,
/// ReLU) → global average pool → one logit.
pub fn conv_chain(cin: usize, hw: usize, convs: &[ConvSpec]) -> Result<Model> {
    let mut nodes = Vec::new();
    let mut weights = HashMap::new();
    let w = |shape: Vec<usize>, seed: u32| {
        let n = shape.iter().product();
        let v = pseudo_random(n, seed).iter().map(|x| x - 0.5).collect();
        TensorData::new(shape, v)
    };
    let mut c = cin;
    for (i, s) in convs.iter().enumerate() {
        let groups = if s.depthwise { c } else { 1 };
        let name = format!("conv{i}");
        nodes.push(Node {
            name: name.clone(),
            input: i,
            op: Op::Conv(Conv {
                in_channels: c,
                out_channels: s.cout,
                kernel: [s.k; 2],
                stride: [s.stride; 2],
                padding: Padding::Symmetric { pad: [s.k / 2; 2] },
                groups,
                residual: None,
                act: Act::Relu,
                gate: None,
            }),
        });
        let seed = 2 * i as u32;
        weights.insert(
            format!("{name}.weight"),
            w(vec![s.cout, c / groups, s.k, s.k], seed)?,
        );
        weights.insert(format!("{name}.bias"), w(vec![s.cout], seed + 1)?);
        c = s.cout;
    }
    let n = convs.len();
    nodes.push(Node {
        name: "pool".into(),
        input: n,
        op: Op::GlobalAvgPool,
    });
    nodes.push(Node {
        name: "fc".into(),
        input: n + 1,
        op: Op::Linear(Linear {
            in_features: c,
            out_features: 1,
            act: Act::None,
        }),
    });
    weights.insert("fc.weight".into(), w(vec![1, c], 1000)?);
    weights.insert("fc.bias".into(), w(vec![1], 1001)?);
    let desc = ModelDesc {
        format_version: FORMAT_VERSION,
        arch: "synthetic".into(),
        input: InputSpec {
            channels: cin,
            height: hw,
            width: hw,
        },
        preprocess: Preprocess {
            resize_shorter: hw as u32,
            crop: [hw as u32; 2],
            mean: [0.0; 3],
            std: [1.0; 3],
            channel_order: ChannelOrder::Rgb,
        },
        classes: vec!["x".into()],
        nodes,
    };
    Model::new(desc, weights)
}
