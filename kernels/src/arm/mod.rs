//! aarch64 kernels: NEON row dots for every weight type, plus `sdot`
//! (ARMv8.2 dotprod) variants of the 32-wide quantized formats. Reachable
//! only through the dispatch table, which checks NEON once and dotprod once
//! per lookup; nothing here tests CPU features inside a loop.

pub mod float;
pub mod kquants;
pub mod legacy;
mod simd;

#[cfg(test)]
mod tests;

/// Whether this CPU has the ARMv8.2 dot-product instructions (`sdot`).
pub fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}
