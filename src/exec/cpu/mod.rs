//! CPU executors.

mod ops;
mod reference;

pub use reference::ReferenceExecutor;
