//! CUDA execution: kernels in `cuda/dynsparse.cu`, compiled at first use by NVRTC for the
//! device's compute capability (see [`nvrtc`]), launched through cudarc with the driver
//! library loaded at run time — so the crate builds and runs on machines without CUDA,
//! and asking for a GPU there is a clear [`crate::Error::Cuda`].

pub mod check;
mod executor;
pub mod nvrtc;

pub use crate::exec::plan;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

pub use executor::{gate_ratio, CudaExecutor, Precision, DEFAULT_CHANNEL_ROUND};

/// Output channels per block tile of the convolution kernels (`CBN` in
/// cuda/dynsparse.cu): a block computes this many kept channels whether or not all are
/// kept, so this is where a channel staircase can step.
pub const CHANNEL_TILE: usize = 64;

use crate::error::{Error, Result};

/// Whether the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices; 0 without a driver or a GPU.
pub fn device_count() -> usize {
    if !driver_available() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// One CUDA device with the context and stream dynsparse runs on.
#[derive(Clone)]
pub struct Device {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    name: String,
    cc: (i32, i32),
    sms: i32,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (sm_{}{}, {} SMs)",
            self.name, self.cc.0, self.cc.1, self.sms
        )
    }
}

impl Device {
    /// Opens device `ordinal`. Fails with a clear error when there is no driver, no GPU
    /// or no NVRTC to compile the kernels with.
    pub fn open(ordinal: usize) -> Result<Device> {
        if !driver_available() {
            return Err(Error::Cuda(
                "no CUDA driver (libcuda.so) on this machine; use --device cpu".into(),
            ));
        }
        let count = device_count();
        if ordinal >= count {
            return Err(Error::Cuda(format!(
                "CUDA device {ordinal} requested, {count} present"
            )));
        }
        if !nvrtc::available() {
            nvrtc::version()?; // carries the explanation
        }
        let e = |what: &'static str| move |err| Error::Cuda(format!("{what}: {err:?}"));
        let ctx = CudaContext::new(ordinal).map_err(e("creating a context"))?;
        // One stream, ordered: cudarc's cross-stream event tracking is not needed and
        // would add events to captured graphs.
        // SAFETY: called before any allocation on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(e("creating a stream"))?;
        let name = ctx.name().map_err(e("reading the device name"))?;
        let cc = ctx
            .compute_capability()
            .map_err(e("reading the compute capability"))?;
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(e("reading the SM count"))?;
        Ok(Device {
            ctx,
            stream,
            name,
            cc,
            sms,
        })
    }

    /// NVRTC target for this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Streaming multiprocessors.
    pub fn sm_count(&self) -> i32 {
        self.sms
    }
}

#[cfg(test)]
mod tests {
    use crate::exec::{Budget, Cut, Gates, Policy};
    use crate::synthetic::{conv_chain, ConvSpec};

    #[test]
    fn device_gates_take_keep_ratios_on_models_without_gated_depthwise_layers() {
        let conv = |cout, k, depthwise| ConvSpec {
            cout,
            k,
            stride: 1,
            depthwise,
        };
        let plain = conv_chain(8, 8, &[conv(16, 3, false), conv(8, 3, false)]).unwrap();
        let mobile = conv_chain(
            8,
            8,
            &[conv(16, 1, false), conv(16, 3, true), conv(8, 1, false)],
        )
        .unwrap();
        let ratio = |r| {
            Policy::Gates(Gates {
                channels: Cut::Ratio(r),
                tiles: Cut::All,
            })
        };
        assert_eq!(super::gate_ratio(&plain, Policy::Dense).unwrap(), None);
        assert_eq!(
            super::gate_ratio(&plain, Policy::Keep(0.5)).unwrap(),
            Some(0.5)
        );
        assert_eq!(super::gate_ratio(&plain, ratio(0.25)).unwrap(), Some(0.25));
        assert_eq!(super::gate_ratio(&mobile, Policy::Dense).unwrap(), None);
        let err = super::gate_ratio(&mobile, Policy::Keep(0.5)).unwrap_err();
        assert!(err.to_string().contains("depthwise"), "{err}");
        for p in [
            Policy::Budget(Budget::Flops(0.5)),
            Policy::Gates(Gates {
                channels: Cut::Threshold(0.5),
                tiles: Cut::All,
            }),
            Policy::Gates(Gates {
                channels: Cut::Ratio(0.5),
                tiles: Cut::Ratio(0.5),
            }),
        ] {
            let err = super::gate_ratio(&plain, p).unwrap_err();
            assert!(err.to_string().contains("run on the CPU"), "{p:?}: {err}");
        }
        assert!(super::gate_ratio(&plain, Policy::Keep(1.5)).is_err());
        // Keeping everything is dense, there as on the CPU.
        assert_eq!(super::gate_ratio(&mobile, Policy::Keep(1.0)).unwrap(), None);
    }

    /// The FLOPs the CUDA executor reports for a keep ratio (derived on the host) are the
    /// CPU engine's for the same ratio and rounding, on a model with trained gates and on
    /// one whose gate feeds a depthwise layer.
    #[test]
    fn keep_flops_match_the_cpu_engines_counts() {
        use crate::exec::cpu::EngineExecutor;
        use crate::exec::{gating, Executor};
        let conv = |cout, k, depthwise| ConvSpec {
            cout,
            k,
            stride: 1,
            depthwise,
        };
        let mobile = conv_chain(
            8,
            8,
            &[conv(24, 1, false), conv(24, 3, true), conv(16, 1, false)],
        )
        .unwrap();
        let demo = crate::Model::from_bytes(crate::demo::MODEL).unwrap();
        for model in [demo, mobile] {
            let cg = gating::channel_gates(&model).unwrap();
            let gates: Vec<_> = gating::gateable(&model)
                .into_iter()
                .filter(|(i, _)| cg[*i].is_some())
                .collect();
            assert!(!gates.is_empty());
            let geometry = super::executor::node_flops(&model);
            let engine = EngineExecutor::new(&model).unwrap().with_channel_round(8);
            let i = model.desc.input;
            let x = crate::synthetic::pseudo_random(2 * i.channels * i.height * i.width, 3);
            for keep in [0.3, 0.5, 0.9] {
                let f = engine.forward_with(&x, 2, Policy::Keep(keep)).unwrap();
                let (total, gate) = super::executor::keep_flops(&geometry, &gates, keep, 8);
                assert_eq!(f.flops.as_ref().unwrap(), &vec![total; 2], "keep {keep}");
                assert_eq!(
                    f.gate_flops.as_ref().unwrap(),
                    &vec![gate; 2],
                    "keep {keep}"
                );
            }
        }
    }

    #[test]
    fn channel_tile_is_the_kernels_block_width() {
        let line = format!("#define CBN {}\n", super::CHANNEL_TILE);
        assert!(super::nvrtc::SOURCE.contains(&line), "no `{}`", line.trim());
    }
}
