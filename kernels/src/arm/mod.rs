//! aarch64 kernels, reachable only through the dispatch table after runtime
//! detection.

pub mod neon;
