//! # dynsparse
//!
//! An inference runtime for image-classification CNNs that decides per input which
//! channels and spatial regions of each convolution are worth computing and computes
//! only those. This release runs dense inference on the CPU; the model file, converter,
//! runtime API and executor seam are the foundation the dynamic executors plug into.
//!
//! ```no_run
//! use dynsparse::{Options, Runtime};
//! let rt = Runtime::load("resnet50.dsm", Options::default())?;
//! let img = dynsparse::preprocess::load_image("cat.jpg".as_ref())?;
//! let pred = &rt.infer(&img)?[0];
//! println!("{} ({:.1}%)", pred.top[0].label, 100.0 * pred.top[0].prob);
//! # Ok::<(), dynsparse::Error>(())
//! ```

pub mod convert;
pub mod demo;
mod error;
pub mod exec;
pub mod format;
pub mod model;
pub mod npy;
pub mod preprocess;
mod runtime;

pub use error::{Error, Result};
pub use format::{Model, TensorData};
pub use runtime::{ClassScore, Input, Options, Prediction, Runtime, Stats};
