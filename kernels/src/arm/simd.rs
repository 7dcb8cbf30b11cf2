//! NEON helpers shared by the aarch64 kernels: loads from block byte slices
//! (rows come straight from the mapping, so every load is unaligned and
//! bounds-checked against its block), f16 scale conversion, and the
//! per-token lane gathers the tiles use.

use std::arch::aarch64::*;

/// 16 bytes of `b` starting at `at`, as signed lanes.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn load_s8(b: &[u8], at: usize) -> int8x16_t {
    let s = &b[at..at + 16];
    // SAFETY: `s` is 16 readable bytes; `ld1 {v.16b}` needs no alignment.
    unsafe { vld1q_s8(s.as_ptr().cast()) }
}

/// 16 bytes of `b` starting at `at`, as unsigned lanes.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn load_u8(b: &[u8], at: usize) -> uint8x16_t {
    vreinterpretq_u8_s8(load_s8(b, at))
}

/// The little-endian u16 at `at` (an f16's bits, or an i16).
#[inline]
pub(super) fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The little-endian f32 at `at`.
#[inline]
pub(super) fn le_f32(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Four halves (as bits) widened to f32. `fcvtl` is base ARMv8 (no FP16
/// arithmetic extension needed) and exact, as is the scalar reference's
/// conversion, subnormals included. Inline assembly because its intrinsic
/// (`vcvt_f32_f16`) is newer than the workspace's minimum Rust.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn f16x4_to_f32(bits: uint16x4_t) -> float32x4_t {
    let wide: float32x4_t;
    // SAFETY: `fcvtl` only reads and writes the two vector registers, and
    // NEON is enabled on this function.
    unsafe {
        std::arch::asm!(
            "fcvtl {wide:v}.4s, {bits:v}.4h",
            wide = out(vreg) wide,
            bits = in(vreg) bits,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    wide
}

/// One half (as bits) as f32 in every lane.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn f16_splat(bits: u16) -> float32x4_t {
    f16x4_to_f32(vdup_n_u16(bits))
}

/// One half (as bits) as f32.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn f16_to_f32(bits: u16) -> f32 {
    vgetq_lane_f32::<0>(f16_splat(bits))
}

/// `v` with lane `lane` (0..4) set to `x`; `lane` is a constant once the
/// tiles' token loops are unrolled, so the match folds away.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn set_lane_u16(v: uint16x4_t, lane: usize, x: u16) -> uint16x4_t {
    match lane {
        0 => vset_lane_u16::<0>(x, v),
        1 => vset_lane_u16::<1>(x, v),
        2 => vset_lane_u16::<2>(x, v),
        _ => vset_lane_u16::<3>(x, v),
    }
}

/// Block `i` (`bytes` long) of `row`, without a bounds check: the kernels
/// check every row's length once, not once per block and load.
///
/// # Safety
/// `(i + 1) * bytes <= row.len()`.
#[inline]
pub(super) unsafe fn block(row: &[u8], i: usize, bytes: usize) -> &[u8] {
    debug_assert!((i + 1) * bytes <= row.len());
    // SAFETY: in bounds by the caller's contract.
    unsafe { row.get_unchecked(i * bytes..(i + 1) * bytes) }
}

/// Lane `t < n` of the result is the sum of the four lanes of `s[t]`: one
/// horizontal reduction for up to four (row, token) integer sums; lanes from
/// `n` on are unspecified. Integer sums are exact, so the order of the
/// additions does not matter.
#[inline]
#[target_feature(enable = "neon")]
pub(super) fn reduce(s: [int32x4_t; 4], n: usize) -> int32x4_t {
    match n {
        1 => {
            let p = vpaddq_s32(s[0], s[0]);
            vpaddq_s32(p, p)
        }
        2 => {
            let p = vpaddq_s32(s[0], s[1]);
            vpaddq_s32(p, p)
        }
        _ => vpaddq_s32(vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3])),
    }
}

/// `acc += a * b` with `a`, `b` 16 signed bytes each, as ARMv8.2 `sdot`
/// (each i32 lane takes four adjacent byte products; exact).
/// `vdotq_s32` is still unstable in Rust, hence the inline assembly.
#[inline]
#[target_feature(enable = "neon,dotprod")]
pub(super) fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: `sdot` only reads and writes the three vector registers; the
    // dotprod feature is enabled on this function, and it is only reachable
    // from code the dispatcher hands out after detecting dotprod.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}
