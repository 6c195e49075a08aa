//! Architectures as data: a [`ModelDesc`] says *what* a network computes — a list of
//! nodes over numbered values — and nothing about *how*. Executors (see [`crate::exec`])
//! decide how. The description is stored as JSON in the model file's metadata.
//!
//! Values are numbered: value 0 is the network input, node `i` produces value `i + 1`.
//! Every node reads one earlier value; a convolution may also add an earlier value
//! (a residual) before its activation.

mod graph;

pub use graph::{LayerInfo, ValueShape};

use serde::{Deserialize, Serialize};

/// Version of the model-file description this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The full, self-describing description of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDesc {
    /// Format version; see [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Architecture name the model was converted as (`resnet50`, `efficientnet_lite0`, …).
    pub arch: String,
    /// Shape of one input sample.
    pub input: InputSpec,
    /// How an image becomes an input tensor.
    pub preprocess: Preprocess,
    /// One name per output class.
    pub classes: Vec<String>,
    /// The computation, in execution order.
    pub nodes: Vec<Node>,
}

/// Shape of one input sample (channels, height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    /// Input channels (3 for RGB).
    pub channels: usize,
    /// Input height in pixels.
    pub height: usize,
    /// Input width in pixels.
    pub width: usize,
}

/// Image preprocessing: resize the shorter side, center-crop, scale to [0, 1],
/// then normalize per channel as `(x - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    /// The shorter side is resized (bilinear) to this many pixels.
    pub resize_shorter: u32,
    /// Center crop (height, width) taken after the resize; equals the input size.
    pub crop: [u32; 2],
    /// Per-channel mean, in `channel_order`.
    pub mean: [f32; 3],
    /// Per-channel standard deviation, in `channel_order`.
    pub std: [f32; 3],
    /// Order of the colour channels in the input tensor.
    pub channel_order: ChannelOrder,
}

impl Preprocess {
    /// torchvision's ImageNet evaluation transform: resize 256, crop 224, ImageNet statistics.
    pub fn imagenet() -> Self {
        Preprocess {
            resize_shorter: 256,
            crop: [224, 224],
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            channel_order: ChannelOrder::Rgb,
        }
    }
}

/// Order of colour channels in the input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red.
    Bgr,
}

/// One step of the computation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Unique name; a parameterised node's tensors are `{name}.weight` and `{name}.bias`.
    pub name: String,
    /// The value this node reads (0 = network input, `i + 1` = output of node `i`).
    pub input: usize,
    /// What the node computes.
    pub op: Op,
}

/// The operations a model is built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Op {
    /// 2-D convolution with BatchNorm folded in, then optional residual add, then activation.
    Conv(Conv),
    /// Max pooling with implicit -inf padding.
    MaxPool(MaxPool),
    /// Average over the whole spatial extent; output is N×C×1×1.
    GlobalAvgPool,
    /// PyTorch's `adaptive_avg_pool2d` to a fixed output size.
    AdaptiveAvgPool {
        /// Output (height, width).
        output: [usize; 2],
    },
    /// Fully connected layer over the flattened input (C·H·W in NCHW order).
    Linear(Linear),
}

/// Convolution parameters. Weights: `{name}.weight` of shape
/// `[out_channels, in_channels / groups, kernel[0], kernel[1]]`, `{name}.bias` of `[out_channels]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conv {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel (height, width).
    pub kernel: [usize; 2],
    /// Stride (vertical, horizontal).
    pub stride: [usize; 2],
    /// How the input is padded.
    pub padding: Padding,
    /// Channel groups (`in_channels` for depthwise).
    pub groups: usize,
    /// Value added to the convolution's output before the activation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual: Option<usize>,
    /// Activation applied last.
    pub act: Act,
    /// Trained gates this convolution carries (see [`ConvGate`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<ConvGate>,
}

/// Trained attention gates of one convolution, both predicted from its input `x`
/// (`C` channels) before it runs. A model that carries any trained gate is gated only
/// where it carries them; a model without any gets training-free gates
/// (see [`crate::exec::gating`]).
///
/// - Channel gate, tensors `{name}.gate.channel.weight` `[out, C]` and
///   `{name}.gate.channel.bias` `[out]`: the score of output channel `o` is
///   `bias[o] + Σ_c weight[o][c] · mean(x[c])`, kept when `sigmoid(score) ≥ t` under a
///   threshold or among the best under a ratio.
/// - Spatial gate, tensors `{name}.gate.spatial.weight` `[C]` and
///   `{name}.gate.spatial.bias` `[1]`: the score of an output tile is `bias` plus the mean,
///   over the input pixels its windows read (clipped to the image), of
///   `Σ_c weight[c] · x[c]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvGate {
    /// Carries a channel gate.
    pub channels: bool,
    /// Carries a spatial gate.
    pub tiles: bool,
}

/// Padding rule of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Padding {
    /// Fixed zero padding: (vertical, horizontal) on both sides, as PyTorch's `padding=`.
    Symmetric {
        /// Pixels added above and below, left and right.
        pad: [usize; 2],
    },
    /// TensorFlow "SAME": output = ceil(input / stride); an odd total puts the extra pixel
    /// at the bottom/right.
    TfSame,
}

impl Padding {
    /// Resolves to (top, bottom, left, right) for an input of `in_h × in_w`.
    pub fn resolve(&self, in_hw: [usize; 2], kernel: [usize; 2], stride: [usize; 2]) -> [usize; 4] {
        match *self {
            Padding::Symmetric { pad } => [pad[0], pad[0], pad[1], pad[1]],
            Padding::TfSame => {
                let total = |i: usize, k: usize, s: usize| {
                    let out = i.div_ceil(s);
                    ((out.saturating_sub(1)) * s + k).saturating_sub(i)
                };
                let th = total(in_hw[0], kernel[0], stride[0]);
                let tw = total(in_hw[1], kernel[1], stride[1]);
                [th / 2, th - th / 2, tw / 2, tw - tw / 2]
            }
        }
    }
}

/// Max pooling parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaxPool {
    /// Window (height, width).
    pub kernel: [usize; 2],
    /// Stride (vertical, horizontal).
    pub stride: [usize; 2],
    /// Padding (vertical, horizontal) on both sides; padded cells never win.
    pub padding: [usize; 2],
}

/// Fully connected layer. Weights: `{name}.weight` `[out_features, in_features]`,
/// `{name}.bias` `[out_features]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Linear {
    /// Input features (C·H·W of the input value).
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Activation applied last.
    pub act: Act,
}

/// Activation functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Act {
    /// Identity.
    None,
    /// max(x, 0).
    Relu,
    /// min(max(x, 0), 6).
    Relu6,
}

impl Act {
    /// Applies the activation to one value.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Act::None => x,
            Act::Relu => x.max(0.0),
            Act::Relu6 => x.clamp(0.0, 6.0),
        }
    }

    /// Applies the activation to every value, with one branch for the whole slice (so
    /// the loop vectorizes).
    #[inline]
    pub fn apply_slice(self, xs: &mut [f32]) {
        match self {
            Act::None => {}
            Act::Relu => xs.iter_mut().for_each(|x| *x = x.max(0.0)),
            Act::Relu6 => xs.iter_mut().for_each(|x| *x = x.clamp(0.0, 6.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Padding;

    #[test]
    fn tf_same_padding_puts_the_extra_pixel_last() {
        // Worked out from output = ceil(in / stride), total = (out - 1)·s + k - in.
        assert_eq!(
            Padding::TfSame.resolve([224, 224], [3, 3], [2, 2]),
            [0, 1, 0, 1]
        );
        assert_eq!(
            Padding::TfSame.resolve([112, 112], [5, 5], [2, 2]),
            [1, 2, 1, 2]
        );
        assert_eq!(
            Padding::TfSame.resolve([14, 14], [5, 5], [1, 1]),
            [2, 2, 2, 2]
        );
        assert_eq!(
            Padding::TfSame.resolve([7, 9], [1, 1], [1, 1]),
            [0, 0, 0, 0]
        );
        assert_eq!(
            Padding::TfSame.resolve([15, 15], [3, 3], [2, 2]),
            [1, 1, 1, 1]
        );
        assert_eq!(
            Padding::Symmetric { pad: [3, 1] }.resolve([9, 9], [7, 3], [2, 1]),
            [3, 3, 1, 1]
        );
    }
}
