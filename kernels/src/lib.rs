//! Compute kernels for lfmd: the ggml block formats, a plainly written scalar
//! reference for every operation, and SIMD variants (AVX2, AVX-512 with VNNI,
//! NEON) chosen at run time from what the CPU has ([`isa`], [`dispatch`]).
//!
//! Invariant: this crate knows nothing about GGUF files or models. It sees
//! blocks, rows and slices; the daemon maps files and hands slices in.

pub mod act;
pub mod attn;
pub mod blocks;
pub mod dispatch;
pub mod isa;
pub mod matmul;
pub mod pool;
pub mod repack;
pub mod scalar;
pub mod stream;
pub mod types;

pub use blocks::*;
pub use types::{ActType, WeightType};

#[cfg(target_arch = "x86_64")]
pub mod x86;

#[cfg(target_arch = "aarch64")]
pub mod arm;
