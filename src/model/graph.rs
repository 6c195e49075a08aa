//! Checks a description for consistency and derives what follows from it: the shape of
//! every value, the tensors each node needs, and the FLOPs each node costs.

use super::{ModelDesc, Op, FORMAT_VERSION};
use crate::error::{Error, Result};

/// Shape of one value for one sample: channels, height, width.
pub type ValueShape = [usize; 3];

/// What the rest of the system needs to know about one node, derived once at load.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerInfo {
    /// Shape of the node's input value.
    pub input: ValueShape,
    /// Shape of the node's output value.
    pub output: ValueShape,
    /// Multiply-adds × 2 for one sample, executed densely.
    pub flops: u64,
    /// Tensors the node needs, with their shapes.
    pub tensors: Vec<(String, Vec<usize>)>,
}

fn bad(msg: String) -> Error {
    Error::ModelFormat(msg)
}

impl ModelDesc {
    /// Validates the description and derives per-node shapes, tensors and FLOPs.
    ///
    /// Fails with [`Error::ModelFormat`] naming the first inconsistent node.
    pub fn analyze(&self) -> Result<Vec<LayerInfo>> {
        if self.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is not supported (this build reads version {FORMAT_VERSION})",
                self.format_version
            )));
        }
        let inp = self.input;
        if inp.channels == 0 || inp.height == 0 || inp.width == 0 {
            return Err(bad(format!("input shape {inp:?} has a zero dimension")));
        }
        if self.nodes.is_empty() {
            return Err(bad("the model has no nodes".into()));
        }
        let mut values: Vec<ValueShape> = vec![[inp.channels, inp.height, inp.width]];
        let mut infos = Vec::with_capacity(self.nodes.len());
        let mut names = std::collections::HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let at = |msg: String| bad(format!("node {i} '{}': {msg}", node.name));
            if !names.insert(node.name.as_str()) {
                return Err(at("duplicate node name".into()));
            }
            let input = *values.get(node.input).ok_or_else(|| {
                at(format!(
                    "reads value {} which is not defined yet",
                    node.input
                ))
            })?;
            let [c, h, w] = input;
            let (output, flops, tensors) = match &node.op {
                Op::Conv(cv) => {
                    if cv.in_channels != c {
                        return Err(at(format!(
                            "expects {} input channels, gets {c}",
                            cv.in_channels
                        )));
                    }
                    if cv.groups == 0
                        || cv.in_channels % cv.groups != 0
                        || cv.out_channels % cv.groups != 0
                        || cv.out_channels == 0
                    {
                        return Err(at(format!(
                            "groups {} do not divide {} input and {} output channels",
                            cv.groups, cv.in_channels, cv.out_channels
                        )));
                    }
                    if cv.kernel.contains(&0) || cv.stride.contains(&0) {
                        return Err(at("zero kernel or stride".into()));
                    }
                    let [pt, pb, pl, pr] = cv.padding.resolve([h, w], cv.kernel, cv.stride);
                    let (ph, pw) = (h + pt + pb, w + pl + pr);
                    if ph < cv.kernel[0] || pw < cv.kernel[1] {
                        return Err(at(format!(
                            "kernel {:?} larger than padded input {ph}×{pw}",
                            cv.kernel
                        )));
                    }
                    let out = [
                        cv.out_channels,
                        (ph - cv.kernel[0]) / cv.stride[0] + 1,
                        (pw - cv.kernel[1]) / cv.stride[1] + 1,
                    ];
                    if let Some(r) = cv.residual {
                        let rs = values
                            .get(r)
                            .ok_or_else(|| at(format!("residual value {r} is not defined yet")))?;
                        if *rs != out {
                            return Err(at(format!(
                                "residual shape {rs:?} differs from output {out:?}"
                            )));
                        }
                    }
                    let k =
                        (cv.in_channels / cv.groups) as u64 * (cv.kernel[0] * cv.kernel[1]) as u64;
                    let flops = out.iter().fold(2 * k, |a, &d| a.saturating_mul(d as u64));
                    let tensors = vec![
                        (
                            format!("{}.weight", node.name),
                            vec![
                                cv.out_channels,
                                cv.in_channels / cv.groups,
                                cv.kernel[0],
                                cv.kernel[1],
                            ],
                        ),
                        (format!("{}.bias", node.name), vec![cv.out_channels]),
                    ];
                    let mut tensors = tensors;
                    if let Some(gate) = cv.gate {
                        if cv.groups != 1 {
                            return Err(at(
                                "gates on a grouped convolution are not supported".into()
                            ));
                        }
                        let name = &node.name;
                        if gate.channels {
                            tensors.push((
                                format!("{name}.gate.channel.weight"),
                                vec![cv.out_channels, cv.in_channels],
                            ));
                            tensors
                                .push((format!("{name}.gate.channel.bias"), vec![cv.out_channels]));
                        }
                        if gate.tiles {
                            tensors.push((
                                format!("{name}.gate.spatial.weight"),
                                vec![cv.in_channels],
                            ));
                            tensors.push((format!("{name}.gate.spatial.bias"), vec![1]));
                        }
                    }
                    (out, flops, tensors)
                }
                Op::MaxPool(p) => {
                    if p.kernel.contains(&0) || p.stride.contains(&0) {
                        return Err(at("zero kernel or stride".into()));
                    }
                    if p.padding[0] * 2 > p.kernel[0] || p.padding[1] * 2 > p.kernel[1] {
                        return Err(at("padding exceeds half the window".into()));
                    }
                    let (ph, pw) = (h + 2 * p.padding[0], w + 2 * p.padding[1]);
                    if ph < p.kernel[0] || pw < p.kernel[1] {
                        return Err(at("window larger than padded input".into()));
                    }
                    let out = [
                        c,
                        (ph - p.kernel[0]) / p.stride[0] + 1,
                        (pw - p.kernel[1]) / p.stride[1] + 1,
                    ];
                    (out, 0, vec![])
                }
                Op::GlobalAvgPool => ([c, 1, 1], 0, vec![]),
                Op::AdaptiveAvgPool { output } => {
                    if output.contains(&0) {
                        return Err(at("zero output size".into()));
                    }
                    ([c, output[0], output[1]], 0, vec![])
                }
                Op::Linear(l) => {
                    let features = c.saturating_mul(h).saturating_mul(w);
                    if l.in_features != features {
                        return Err(at(format!(
                            "expects {} input features, gets {features}",
                            l.in_features
                        )));
                    }
                    let tensors = vec![
                        (
                            format!("{}.weight", node.name),
                            vec![l.out_features, l.in_features],
                        ),
                        (format!("{}.bias", node.name), vec![l.out_features]),
                    ];
                    (
                        [l.out_features, 1, 1],
                        2u64.saturating_mul(l.in_features as u64)
                            .saturating_mul(l.out_features as u64),
                        tensors,
                    )
                }
            };
            values.push(output);
            infos.push(LayerInfo {
                input,
                output,
                flops,
                tensors,
            });
        }
        let last = values[values.len() - 1];
        if last[1] != 1 || last[2] != 1 || last[0] != self.classes.len() {
            return Err(bad(format!(
                "the last node produces {last:?}, expected {} class scores",
                self.classes.len()
            )));
        }
        Ok(infos)
    }
}
