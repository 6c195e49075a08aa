//! The library's typed errors. Every failure a user can cause (a bad file, a bad image,
//! a tensor of the wrong shape) maps to one variant that names what is wrong.

use std::path::PathBuf;

/// Everything that can go wrong in dynsparse.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The model file is not a valid dynsparse model (bad header, metadata or version).
    #[error("invalid model file: {0}")]
    ModelFormat(String),
    /// The model file lacks tensors the architecture needs, or holds ones of the wrong shape.
    #[error("model tensors do not match the architecture: {0}")]
    ModelTensors(String),
    /// A checkpoint could not be parsed.
    #[error("cannot read checkpoint: {0}")]
    Checkpoint(String),
    /// A checkpoint's tensors do not match the requested architecture.
    #[error("checkpoint does not match architecture '{arch}': {details}")]
    CheckpointMismatch {
        /// The architecture asked for.
        arch: String,
        /// Every missing, unexpected or mis-shaped tensor.
        details: String,
    },
    /// The architecture name is not one dynsparse knows.
    #[error("unknown architecture '{0}' (known: {known})", known = crate::convert::ARCHITECTURES.join(", "))]
    UnknownArch(String),
    /// An image could not be decoded.
    #[error("cannot decode image: {0}")]
    Image(String),
    /// An input tensor has the wrong shape, dtype or values.
    #[error("invalid input: {0}")]
    Input(String),
    /// A tensor operation failed inside an executor.
    #[error("execution failed: {0}")]
    Exec(String),
    /// CUDA is unavailable (no driver, no GPU, no NVRTC) or a CUDA call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
}

/// Result with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Exec(e.to_string())
    }
}
