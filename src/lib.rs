//! # dynsparse
//!
//! An inference runtime for image-classification CNNs that decides per input which
//! channels and spatial regions of each convolution are worth computing and computes
//! only those. This release runs dense inference on the CPU with its own engine and on
//! NVIDIA GPUs with its own CUDA kernels, and dynamic execution on the CPU: channel and
//! spatial gates chosen per input, cut by ratio, threshold or FLOP budget ([`Policy`]),
//! timed against dense by [`mod@bench`].
//!
//! ```
//! use dynsparse::{demo, preprocess, Options, Runtime};
//! // `Runtime::load("resnet50.dsm", …)` for a converted model; here the embedded demo.
//! let rt = Runtime::from_bytes(demo::MODEL, Options::default())?;
//! let (name, png) = demo::SAMPLES[1];
//! let img = preprocess::decode_image(png)?; // or preprocess::load_image(path)
//! let pred = &rt.infer(&img)?[0];
//! println!("{name}: {} ({:.1}%)", pred.top[0].label, 100.0 * pred.top[0].prob);
//! assert_eq!(Some(pred.top[0].class), demo::sample_label(name));
//! # Ok::<(), dynsparse::Error>(())
//! ```

pub mod bench;
pub mod convert;
pub mod demo;
mod error;
pub mod exec;
pub mod format;
pub mod model;
pub mod npy;
pub mod preprocess;
pub mod profile;
mod runtime;
pub mod synthetic;

pub use error::{Error, Result};
pub use exec::{Budget, Cut, Gates, Policy};
pub use format::{Model, TensorData};
pub use runtime::{
    join_global_pool, ClassScore, DeviceChoice, Engine, Input, LayerStats, Options, Prediction,
    Runtime, Stats, DEFAULT_LINGER,
};
