//! x86-64 kernels. Each function carries `#[target_feature]` and is only
//! reachable through the dispatch table after runtime detection said the
//! features are present.

pub mod avx2;
pub mod avx2k;
pub mod avx512;
pub mod avx512k;
pub mod avx512r;
pub mod avx512s;
pub mod avx512sk;
pub mod kquants;
pub mod legacy;
mod simd;

#[cfg(test)]
mod tests;
