//! The reference CPU executor: Candle's convolution and matmul for dense layers, plain
//! loops (see [`super::ops`]) for depthwise convolution and pooling. Correct first; the
//! fast engine replaces it behind the same [`Executor`] trait.

use candle_core::{DType, Device, Tensor};

use super::ops::{self, Window};
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::format::Model;
use crate::model::{Act, Op};

enum Prepared {
    Conv { weight: Tensor, bias: Tensor },
    Depthwise { weight: Vec<f32>, bias: Vec<f32> },
    Linear { weight_t: Tensor, bias: Tensor },
    Other,
}

/// Dense execution with Candle on the CPU.
pub struct ReferenceExecutor {
    model: Model,
    prepared: Vec<Prepared>,
    /// For each value, the index of the last node that reads it (to free it early).
    last_use: Vec<usize>,
}

fn tensor(t: &crate::format::TensorData) -> Result<Tensor> {
    Ok(Tensor::from_slice(
        &t.data,
        t.shape.as_slice(),
        &Device::Cpu,
    )?)
}

fn activate(x: Tensor, act: Act) -> Result<Tensor> {
    Ok(match act {
        Act::None => x,
        Act::Relu => x.relu()?,
        Act::Relu6 => x.clamp(0f32, 6f32)?,
    })
}

impl ReferenceExecutor {
    /// Prepares the model's weights as Candle tensors.
    pub fn new(model: &Model) -> Result<Self> {
        let mut prepared = Vec::with_capacity(model.desc.nodes.len());
        let mut last_use = vec![usize::MAX; model.desc.nodes.len() + 1];
        for (i, node) in model.desc.nodes.iter().enumerate() {
            last_use[node.input] = i;
            let w = || model.weight(&format!("{}.weight", node.name));
            let b = || model.weight(&format!("{}.bias", node.name));
            prepared.push(match &node.op {
                Op::Conv(cv) => {
                    if let Some(r) = cv.residual {
                        last_use[r] = i;
                    }
                    if cv.groups > 1 && cv.groups == cv.in_channels && cv.groups == cv.out_channels
                    {
                        Prepared::Depthwise {
                            weight: w()?.data.clone(),
                            bias: b()?.data.clone(),
                        }
                    } else {
                        Prepared::Conv {
                            weight: tensor(w()?)?,
                            bias: tensor(b()?)?.reshape((1, cv.out_channels, 1, 1))?,
                        }
                    }
                }
                Op::Linear(l) => Prepared::Linear {
                    weight_t: tensor(w()?)?.t()?.contiguous()?,
                    bias: tensor(b()?)?.reshape((1, l.out_features))?,
                },
                _ => Prepared::Other,
            });
        }
        Ok(ReferenceExecutor {
            model: model.clone(),
            prepared,
            last_use,
        })
    }
}

impl Executor for ReferenceExecutor {
    fn name(&self) -> &'static str {
        "cpu-reference"
    }

    fn forward(&self, input: &[f32], batch: usize) -> Result<Vec<f32>> {
        self.run(input, batch, None)
    }
}

impl ReferenceExecutor {
    /// One sample's forward pass where convolution `i` computes only the output pixels
    /// in `pixels[i]` (`None`: all): every other pixel takes the residual, or zero — the
    /// definition of a spatially gated pass, for checking the fast engine's.
    pub fn forward_masked(&self, input: &[f32], pixels: &[Option<Vec<usize>>]) -> Result<Vec<f32>> {
        self.run(input, 1, Some(pixels))
    }

    fn run(
        &self,
        input: &[f32],
        batch: usize,
        pixels: Option<&[Option<Vec<usize>>]>,
    ) -> Result<Vec<f32>> {
        let spec = self.model.desc.input;
        let shape = (batch, spec.channels, spec.height, spec.width);
        if input.len() != batch * spec.channels * spec.height * spec.width {
            return Err(Error::Input(format!(
                "{} values do not fill a batch of {batch} × {}×{}×{}",
                input.len(),
                spec.channels,
                spec.height,
                spec.width
            )));
        }
        let mut values: Vec<Option<Tensor>> = vec![None; self.model.desc.nodes.len() + 1];
        values[0] = Some(Tensor::from_slice(input, shape, &Device::Cpu)?);
        let get = |values: &[Option<Tensor>], v: usize| -> Result<Tensor> {
            values[v]
                .clone()
                .ok_or_else(|| Error::Exec(format!("value {v} was freed before its last use")))
        };
        for (i, (node, prep)) in self.model.desc.nodes.iter().zip(&self.prepared).enumerate() {
            let info = &self.model.layers[i];
            let x = get(&values, node.input)?;
            let out = match (&node.op, prep) {
                (Op::Conv(cv), Prepared::Conv { weight, bias }) => {
                    let [t, b, l, r] =
                        cv.padding
                            .resolve([info.input[1], info.input[2]], cv.kernel, cv.stride);
                    let (x, pad) = if t == b && l == r && t == l {
                        (x, t)
                    } else {
                        (x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?, 0)
                    };
                    let y = if cv.stride[0] == cv.stride[1] {
                        x.conv2d(weight, pad, cv.stride[0], 1, cv.groups)?
                    } else {
                        return Err(Error::Exec(format!(
                            "node '{}': unequal strides are not supported",
                            node.name
                        )));
                    };
                    let mut y = y.broadcast_add(bias)?;
                    if let Some(r) = cv.residual {
                        y = (y + get(&values, r)?)?;
                    }
                    let y = activate(y, cv.act)?;
                    match pixels.and_then(|p| p.get(i)).and_then(Option::as_ref) {
                        None => y,
                        Some(px) => {
                            let shape = y.dims().to_vec();
                            let mut v = y.flatten_all()?.to_vec1::<f32>()?;
                            let r = match cv.residual {
                                Some(r) => Some(get(&values, r)?.flatten_all()?.to_vec1::<f32>()?),
                                None => None,
                            };
                            let n = info.output[1] * info.output[2];
                            let mut keep = vec![false; n];
                            for &p in px {
                                *keep.get_mut(p).ok_or_else(|| {
                                    Error::Input(format!("pixel {p} is outside node {i}'s output"))
                                })? = true;
                            }
                            for (j, cell) in v.iter_mut().enumerate() {
                                if !keep[j % n] {
                                    *cell = r.as_ref().map_or(0.0, |r| r[j]);
                                }
                            }
                            Tensor::from_vec(v, shape, &Device::Cpu)?
                        }
                    }
                }
                (Op::Conv(cv), Prepared::Depthwise { weight, bias }) => {
                    let [t, _, l, _] =
                        cv.padding
                            .resolve([info.input[1], info.input[2]], cv.kernel, cv.stride);
                    let win = Window {
                        in_hw: [info.input[1], info.input[2]],
                        out_hw: [info.output[1], info.output[2]],
                        kernel: cv.kernel,
                        stride: cv.stride,
                        pad_tl: [t, l],
                    };
                    let xs = x.flatten_all()?.to_vec1::<f32>()?;
                    let res = match cv.residual {
                        Some(r) => Some(get(&values, r)?.flatten_all()?.to_vec1::<f32>()?),
                        None => None,
                    };
                    let y = ops::depthwise(
                        &xs,
                        weight,
                        bias,
                        res.as_deref(),
                        cv.act,
                        cv.in_channels,
                        win,
                    );
                    Tensor::from_vec(
                        y,
                        (batch, info.output[0], info.output[1], info.output[2]),
                        &Device::Cpu,
                    )?
                }
                (Op::MaxPool(p), _) => {
                    let win = Window {
                        in_hw: [info.input[1], info.input[2]],
                        out_hw: [info.output[1], info.output[2]],
                        kernel: p.kernel,
                        stride: p.stride,
                        pad_tl: p.padding,
                    };
                    let y = ops::max_pool(&x.flatten_all()?.to_vec1::<f32>()?, win);
                    Tensor::from_vec(
                        y,
                        (batch, info.output[0], info.output[1], info.output[2]),
                        &Device::Cpu,
                    )?
                }
                (Op::GlobalAvgPool, _) => x.mean_keepdim(3)?.mean_keepdim(2)?,
                (Op::AdaptiveAvgPool { output }, _) => {
                    let y = ops::adaptive_avg_pool(
                        &x.flatten_all()?.to_vec1::<f32>()?,
                        [info.input[1], info.input[2]],
                        *output,
                    );
                    Tensor::from_vec(
                        y,
                        (batch, info.output[0], output[0], output[1]),
                        &Device::Cpu,
                    )?
                }
                (Op::Linear(l), Prepared::Linear { weight_t, bias }) => {
                    let y = x
                        .reshape((batch, l.in_features))?
                        .matmul(weight_t)?
                        .broadcast_add(bias)?;
                    activate(y, l.act)?.reshape((batch, l.out_features, 1, 1))?
                }
                _ => {
                    return Err(Error::Exec(format!(
                        "node '{}': weights were not prepared",
                        node.name
                    )))
                }
            };
            values[i + 1] = Some(out);
            for (v, slot) in values.iter_mut().enumerate().take(i + 1) {
                if self.last_use[v] == i {
                    *slot = None;
                }
            }
        }
        let logits = values
            .pop()
            .flatten()
            .ok_or_else(|| Error::Exec("the model produced no output".into()))?;
        Ok(logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}
