//! Architectures as data: each builder emits the [`Node`] list of a network together with
//! where every node's weights come from in a checkpoint that uses the original
//! implementation's parameter names (torchvision, or lukemelas-style for EfficientNet).

use crate::model::{Act, Conv, InputSpec, Linear, MaxPool, Node, Op, Padding, Preprocess};

/// Where one node's folded weights come from in the checkpoint.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// A convolution, optionally with its own bias, optionally followed by BatchNorm.
    Conv {
        conv: String,
        has_bias: bool,
        bn: Option<String>,
        eps: f32,
        shape: [usize; 4],
    },
    /// A fully connected layer.
    Linear { name: String, shape: [usize; 2] },
}

impl Source {
    /// Every checkpoint tensor this source reads, with its shape.
    pub(crate) fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Source::Conv {
                conv,
                has_bias,
                bn,
                shape,
                ..
            } => {
                let mut t = vec![(format!("{conv}.weight"), shape.to_vec())];
                if *has_bias {
                    t.push((format!("{conv}.bias"), vec![shape[0]]));
                }
                if let Some(bn) = bn {
                    for p in ["weight", "bias", "running_mean", "running_var"] {
                        t.push((format!("{bn}.{p}"), vec![shape[0]]));
                    }
                }
                t
            }
            Source::Linear { name, shape } => vec![
                (format!("{name}.weight"), shape.to_vec()),
                (format!("{name}.bias"), vec![shape[0]]),
            ],
        }
    }
}

/// A network under construction: nodes plus, per parameterised node, its source.
pub(crate) struct Builder {
    pub nodes: Vec<Node>,
    pub sources: Vec<(String, Source)>,
    pub input: InputSpec,
    pub preprocess: Preprocess,
    bn_eps: f32,
}

/// A convolution's hyper-parameters.
#[derive(Clone, Copy)]
pub(crate) struct ConvCfg {
    pub k: usize,
    pub stride: usize,
    pub pad: Padding,
    pub groups: usize,
    pub act: Act,
}

impl ConvCfg {
    /// k×k convolution, PyTorch padding (k-1)/2.
    pub fn same(k: usize, stride: usize, act: Act) -> Self {
        ConvCfg {
            k,
            stride,
            pad: Padding::Symmetric {
                pad: [(k - 1) / 2; 2],
            },
            groups: 1,
            act,
        }
    }
    pub fn tf_same(k: usize, stride: usize, act: Act) -> Self {
        ConvCfg {
            pad: Padding::TfSame,
            ..Self::same(k, stride, act)
        }
    }
    pub fn depthwise(self, channels: usize) -> Self {
        ConvCfg {
            groups: channels,
            ..self
        }
    }
}

impl Builder {
    fn new(input: InputSpec, preprocess: Preprocess, bn_eps: f32) -> Self {
        Builder {
            nodes: vec![],
            sources: vec![],
            input,
            preprocess,
            bn_eps,
        }
    }

    fn push(&mut self, name: &str, input: usize, op: Op) -> usize {
        self.nodes.push(Node {
            name: name.to_string(),
            input,
            op,
        });
        self.nodes.len()
    }

    /// Adds a convolution followed by the BatchNorm `bn` (if any); returns its value.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        input: usize,
        name: &str,
        bn: Option<&str>,
        has_bias: bool,
        cin: usize,
        cout: usize,
        cfg: ConvCfg,
        residual: Option<usize>,
    ) -> usize {
        self.sources.push((
            name.to_string(),
            Source::Conv {
                conv: name.to_string(),
                has_bias,
                bn: bn.map(str::to_string),
                eps: self.bn_eps,
                shape: [cout, cin / cfg.groups, cfg.k, cfg.k],
            },
        ));
        let op = Op::Conv(Conv {
            in_channels: cin,
            out_channels: cout,
            kernel: [cfg.k; 2],
            stride: [cfg.stride; 2],
            padding: cfg.pad,
            groups: cfg.groups,
            residual,
            act: cfg.act,
            gate: None,
        });
        self.push(name, input, op)
    }

    /// Conv without bias followed by BatchNorm — the common case.
    fn conv_bn(
        &mut self,
        input: usize,
        name: &str,
        bn: &str,
        cin: usize,
        cout: usize,
        cfg: ConvCfg,
    ) -> usize {
        self.conv(input, name, Some(bn), false, cin, cout, cfg, None)
    }

    fn linear(&mut self, input: usize, name: &str, fin: usize, fout: usize, act: Act) -> usize {
        self.sources.push((
            name.to_string(),
            Source::Linear {
                name: name.to_string(),
                shape: [fout, fin],
            },
        ));
        let op = Op::Linear(Linear {
            in_features: fin,
            out_features: fout,
            act,
        });
        self.push(name, input, op)
    }

    fn max_pool(&mut self, input: usize, name: &str, k: usize, s: usize, p: usize) -> usize {
        let op = Op::MaxPool(MaxPool {
            kernel: [k; 2],
            stride: [s; 2],
            padding: [p; 2],
        });
        self.push(name, input, op)
    }
}

/// The checkpoint tensor whose first dimension gives the number of classes.
pub(crate) fn classifier_weight(arch: &str) -> Option<&'static str> {
    Some(match arch {
        a if a.starts_with("resnet") => "fc.weight",
        "vgg16_bn" => "classifier.6.weight",
        "mobilenet_v2" => "classifier.1.weight",
        "efficientnet_lite0" => "_fc.weight",
        _ => return None,
    })
}

/// Builds the named architecture for `classes` outputs; `None` for an unknown name.
pub(crate) fn build(arch: &str, classes: usize) -> Option<Builder> {
    Some(match arch {
        "resnet18" => resnet(&[2, 2, 2, 2], false, classes),
        "resnet34" => resnet(&[3, 4, 6, 3], false, classes),
        "resnet50" => resnet(&[3, 4, 6, 3], true, classes),
        "resnet101" => resnet(&[3, 4, 23, 3], true, classes),
        "resnet20" => resnet_cifar(3, classes),
        "resnet56" => resnet_cifar(9, classes),
        "vgg16_bn" => vgg16_bn(classes),
        "mobilenet_v2" => mobilenet_v2(classes),
        "efficientnet_lite0" => efficientnet_lite0(classes),
        _ => return None,
    })
}

const IMAGENET_INPUT: InputSpec = InputSpec {
    channels: 3,
    height: 224,
    width: 224,
};

/// torchvision ResNet (v1.5: stride on the 3×3 of a bottleneck).
fn resnet(blocks: &[usize; 4], bottleneck: bool, classes: usize) -> Builder {
    let mut b = Builder::new(IMAGENET_INPUT, Preprocess::imagenet(), 1e-5);
    let x = b.conv_bn(0, "conv1", "bn1", 3, 64, ConvCfg::same(7, 2, Act::Relu));
    let mut x = b.max_pool(x, "maxpool", 3, 2, 1);
    let expansion = if bottleneck { 4 } else { 1 };
    let mut inplanes = 64;
    for (li, (&n, planes)) in blocks.iter().zip([64, 128, 256, 512]).enumerate() {
        for bi in 0..n {
            let stride = if li > 0 && bi == 0 { 2 } else { 1 };
            let p = format!("layer{}.{bi}", li + 1);
            x = residual_block(&mut b, x, &p, inplanes, planes, stride, bottleneck);
            inplanes = planes * expansion;
        }
    }
    let x = b.push("avgpool", x, Op::GlobalAvgPool);
    b.linear(x, "fc", inplanes, classes, Act::None);
    b
}

/// One torchvision BasicBlock or Bottleneck named `p` (`layer2.0`); returns its output value.
fn residual_block(
    b: &mut Builder,
    x: usize,
    p: &str,
    inplanes: usize,
    planes: usize,
    stride: usize,
    bottleneck: bool,
) -> usize {
    let out = if bottleneck { planes * 4 } else { planes };
    let identity = if stride != 1 || inplanes != out {
        b.conv_bn(
            x,
            &format!("{p}.downsample.0"),
            &format!("{p}.downsample.1"),
            inplanes,
            out,
            ConvCfg::same(1, stride, Act::None),
        )
    } else {
        x
    };
    let relu = Act::Relu;
    let name = |s: &str| format!("{p}.{s}");
    if bottleneck {
        let y = b.conv_bn(
            x,
            &name("conv1"),
            &name("bn1"),
            inplanes,
            planes,
            ConvCfg::same(1, 1, relu),
        );
        let y = b.conv_bn(
            y,
            &name("conv2"),
            &name("bn2"),
            planes,
            planes,
            ConvCfg::same(3, stride, relu),
        );
        let cfg = ConvCfg::same(1, 1, relu);
        b.conv(
            y,
            &name("conv3"),
            Some(&name("bn3")),
            false,
            planes,
            out,
            cfg,
            Some(identity),
        )
    } else {
        let y = b.conv_bn(
            x,
            &name("conv1"),
            &name("bn1"),
            inplanes,
            planes,
            ConvCfg::same(3, stride, relu),
        );
        let cfg = ConvCfg::same(3, 1, relu);
        b.conv(
            y,
            &name("conv2"),
            Some(&name("bn2")),
            false,
            planes,
            out,
            cfg,
            Some(identity),
        )
    }
}

/// CIFAR-style ResNet (He et al. 2016, §4.2): 3×3 stem, three stages of `n` basic blocks
/// at 16/32/64 channels on 32×32 input, 1×1 projection shortcuts, torchvision names.
fn resnet_cifar(n: usize, classes: usize) -> Builder {
    let pre = Preprocess {
        resize_shorter: 32,
        crop: [32, 32],
        mean: [0.4914, 0.4822, 0.4465],
        std: [0.2470, 0.2435, 0.2616],
        channel_order: crate::model::ChannelOrder::Rgb,
    };
    let input = InputSpec {
        channels: 3,
        height: 32,
        width: 32,
    };
    let mut b = Builder::new(input, pre, 1e-5);
    let mut x = b.conv_bn(0, "conv1", "bn1", 3, 16, ConvCfg::same(3, 1, Act::Relu));
    let mut inplanes = 16;
    for (li, planes) in [16, 32, 64].into_iter().enumerate() {
        for bi in 0..n {
            let stride = if li > 0 && bi == 0 { 2 } else { 1 };
            x = residual_block(
                &mut b,
                x,
                &format!("layer{}.{bi}", li + 1),
                inplanes,
                planes,
                stride,
                false,
            );
            inplanes = planes;
        }
    }
    let x = b.push("avgpool", x, Op::GlobalAvgPool);
    b.linear(x, "fc", 64, classes, Act::None);
    b
}

/// torchvision VGG-16 with BatchNorm (its convolutions keep their bias).
fn vgg16_bn(classes: usize) -> Builder {
    const CFG: [usize; 18] = [
        64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
    ];
    let mut b = Builder::new(IMAGENET_INPUT, Preprocess::imagenet(), 1e-5);
    let (mut x, mut idx, mut cin) = (0, 0, 3);
    for c in CFG {
        if c == 0 {
            x = b.max_pool(x, &format!("features.{idx}"), 2, 2, 0);
            idx += 1;
        } else {
            let (conv, bn) = (format!("features.{idx}"), format!("features.{}", idx + 1));
            x = b.conv(
                x,
                &conv,
                Some(&bn),
                true,
                cin,
                c,
                ConvCfg::same(3, 1, Act::Relu),
                None,
            );
            cin = c;
            idx += 3;
        }
    }
    let x = b.push("avgpool", x, Op::AdaptiveAvgPool { output: [7, 7] });
    let x = b.linear(x, "classifier.0", 512 * 7 * 7, 4096, Act::Relu);
    let x = b.linear(x, "classifier.3", 4096, 4096, Act::Relu);
    b.linear(x, "classifier.6", 4096, classes, Act::None);
    b
}

/// torchvision MobileNetV2 (width 1.0).
fn mobilenet_v2(classes: usize) -> Builder {
    const SETTINGS: [(usize, usize, usize, usize); 7] = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let r6 = Act::Relu6;
    let mut b = Builder::new(IMAGENET_INPUT, Preprocess::imagenet(), 1e-5);
    let mut x = b.conv_bn(
        0,
        "features.0.0",
        "features.0.1",
        3,
        32,
        ConvCfg::same(3, 2, r6),
    );
    let (mut cin, mut idx) = (32, 1);
    for (t, c, n, s) in SETTINGS {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let p = format!("features.{idx}.conv");
            let hidden = cin * t;
            // Module indices inside `conv` shift by one when there is no expansion layer.
            let (y, j) = if t != 1 {
                let cfg = ConvCfg::same(1, 1, r6);
                (
                    b.conv_bn(
                        x,
                        &format!("{p}.0.0"),
                        &format!("{p}.0.1"),
                        cin,
                        hidden,
                        cfg,
                    ),
                    1,
                )
            } else {
                (x, 0)
            };
            let dw = ConvCfg::same(3, stride, r6).depthwise(hidden);
            let y = b.conv_bn(
                y,
                &format!("{p}.{j}.0"),
                &format!("{p}.{j}.1"),
                hidden,
                hidden,
                dw,
            );
            let residual = (stride == 1 && cin == c).then_some(x);
            let (pw, bn) = (format!("{p}.{}", j + 1), format!("{p}.{}", j + 2));
            x = b.conv(
                y,
                &pw,
                Some(&bn),
                false,
                hidden,
                c,
                ConvCfg::same(1, 1, Act::None),
                residual,
            );
            cin = c;
            idx += 1;
        }
    }
    let x = b.conv_bn(
        x,
        "features.18.0",
        "features.18.1",
        320,
        1280,
        ConvCfg::same(1, 1, r6),
    );
    let x = b.push("avgpool", x, Op::GlobalAvgPool);
    b.linear(x, "classifier.1", 1280, classes, Act::None);
    b
}

/// EfficientNet-Lite0 with lukemelas-style names: ReLU6, no squeeze-excitation,
/// TensorFlow "SAME" padding, BatchNorm eps 1e-3.
fn efficientnet_lite0(classes: usize) -> Builder {
    // (repeats, kernel, stride, expansion, in, out)
    const BLOCKS: [(usize, usize, usize, usize, usize, usize); 7] = [
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ];
    let r6 = Act::Relu6;
    let mut b = Builder::new(IMAGENET_INPUT, Preprocess::imagenet(), 1e-3);
    let mut x = b.conv_bn(0, "_conv_stem", "_bn0", 3, 32, ConvCfg::tf_same(3, 2, r6));
    let mut idx = 0;
    for (r, k, s, e, i, o) in BLOCKS {
        for j in 0..r {
            let (cin, stride) = if j == 0 { (i, s) } else { (o, 1) };
            let p = format!("_blocks.{idx}");
            let hidden = cin * e;
            let y = if e != 1 {
                let cfg = ConvCfg::tf_same(1, 1, r6);
                b.conv_bn(
                    x,
                    &format!("{p}._expand_conv"),
                    &format!("{p}._bn0"),
                    cin,
                    hidden,
                    cfg,
                )
            } else {
                x
            };
            let dw = ConvCfg::tf_same(k, stride, r6).depthwise(hidden);
            let y = b.conv_bn(
                y,
                &format!("{p}._depthwise_conv"),
                &format!("{p}._bn1"),
                hidden,
                hidden,
                dw,
            );
            let residual = (stride == 1 && cin == o).then_some(x);
            let (pw, bn) = (format!("{p}._project_conv"), format!("{p}._bn2"));
            x = b.conv(
                y,
                &pw,
                Some(&bn),
                false,
                hidden,
                o,
                ConvCfg::tf_same(1, 1, Act::None),
                residual,
            );
            idx += 1;
        }
    }
    let x = b.conv_bn(
        x,
        "_conv_head",
        "_bn1",
        320,
        1280,
        ConvCfg::tf_same(1, 1, r6),
    );
    let x = b.push("avgpool", x, Op::GlobalAvgPool);
    b.linear(x, "_fc", 1280, classes, Act::None);
    b
}
