//! NEON dots of unquantized weight rows (F32, F16, BF16) with f32
//! activation rows, for 1-2 weight rows x 1-4 activation rows per call.
//!
//! Not bit-identical to the scalar fallback, which adds one product at a
//! time: sixteen f32 lanes with fused multiply-adds (one rounding per
//! element instead of two), a fixed reduction of the lanes, then the tail
//! elements in order. The order depends only on the row length, and every
//! (row, token) pair has its own accumulators, so results do not depend on
//! the batch. Error: at most about (n / 16 + 16) f32 roundings of the sum
//! of |w * x|, which the tests check against an f64 reference.

use super::simd::{block, f16x4_to_f32};
use std::arch::aarch64::*;

/// Accumulators per (row, token): 4 vectors of 4 lanes keep four
/// independent multiply-add chains in flight even for a single token.
const LANES: usize = 16;
/// Tokens per inner tile: 2 rows x 2 tokens x 4 accumulators fill 16 of
/// the 32 vector registers, leaving room for the loaded operands.
const TILE_TOKENS: usize = 2;

/// One unquantized weight format.
trait FloatRow {
    /// Bytes per weight.
    const BYTES: usize;

    /// The 16 weights of `chunk` (16 x `BYTES` bytes) as f32.
    ///
    /// # Safety
    /// NEON must be available (it is baseline on aarch64 Linux).
    unsafe fn load16(chunk: &[u8]) -> [float32x4_t; 4];

    /// Weight `at` of row `w` as f32.
    fn get(w: &[u8], at: usize) -> f32;
}

/// 16 bytes of `b` from `at`, as u8 lanes; no alignment needed.
#[inline]
#[target_feature(enable = "neon")]
fn bytes16(b: &[u8], at: usize) -> uint8x16_t {
    let s = &b[at..at + 16];
    // SAFETY: `s` is 16 readable bytes; `ld1 {v.16b}` needs no alignment.
    unsafe { vld1q_u8(s.as_ptr()) }
}

/// Four f32s of `b` from byte `at`.
#[inline]
#[target_feature(enable = "neon")]
fn f32x4_at(b: &[u8], at: usize) -> float32x4_t {
    vreinterpretq_f32_u8(bytes16(b, at))
}

struct F32;
struct F16;
struct Bf16;

impl FloatRow for F32 {
    const BYTES: usize = 4;

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load16(w: &[u8]) -> [float32x4_t; 4] {
        [
            f32x4_at(w, 0),
            f32x4_at(w, 16),
            f32x4_at(w, 32),
            f32x4_at(w, 48),
        ]
    }

    fn get(w: &[u8], at: usize) -> f32 {
        f32::from_le_bytes([w[4 * at], w[4 * at + 1], w[4 * at + 2], w[4 * at + 3]])
    }
}

impl FloatRow for F16 {
    const BYTES: usize = 2;

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load16(w: &[u8]) -> [float32x4_t; 4] {
        let (a, b) = (
            vreinterpretq_u16_u8(bytes16(w, 0)),
            vreinterpretq_u16_u8(bytes16(w, 16)),
        );
        [
            f16x4_to_f32(vget_low_u16(a)),
            f16x4_to_f32(vget_high_u16(a)),
            f16x4_to_f32(vget_low_u16(b)),
            f16x4_to_f32(vget_high_u16(b)),
        ]
    }

    fn get(w: &[u8], at: usize) -> f32 {
        half::f16::from_le_bytes([w[2 * at], w[2 * at + 1]]).to_f32()
    }
}

impl FloatRow for Bf16 {
    const BYTES: usize = 2;

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load16(w: &[u8]) -> [float32x4_t; 4] {
        // A bf16 is the top half of an f32: widen each u16 into the high bits.
        let (a, b) = (
            vreinterpretq_u16_u8(bytes16(w, 0)),
            vreinterpretq_u16_u8(bytes16(w, 16)),
        );
        [
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(a))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(a)),
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(b))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(b)),
        ]
    }

    fn get(w: &[u8], at: usize) -> f32 {
        half::bf16::from_le_bytes([w[2 * at], w[2 * at + 1]]).to_f32()
    }
}

/// Dots of `R` weight rows with `N` (at most [`TILE_TOKENS`]) activation
/// rows of `n` elements; `out[r * N + t]`.
#[inline]
#[target_feature(enable = "neon")]
fn tile<K: FloatRow, const R: usize, const N: usize>(
    ws: &[&[u8]],
    xs: &[&[u8]],
    n: usize,
    out: &mut [f32],
) {
    let mut acc = [[[vdupq_n_f32(0.0); 4]; N]; R];
    let chunks = n / LANES;
    for c in 0..chunks {
        // SAFETY: c < n / 16, and the rows hold n elements (checked by `rows`).
        let first = unsafe { K::load16(block(ws[0], c, LANES * K::BYTES)) };
        let mut w = [first; R];
        for r in 1..R {
            // SAFETY: as above.
            w[r] = unsafe { K::load16(block(ws[r], c, LANES * K::BYTES)) };
        }
        for t in 0..N {
            // SAFETY: as above; activations are f32.
            let xb = unsafe { block(xs[t], c, LANES * 4) };
            let x = [0, 1, 2, 3].map(|k| f32x4_at(xb, 16 * k));
            for r in 0..R {
                for k in 0..4 {
                    acc[r][t][k] = vfmaq_f32(acc[r][t][k], w[r][k], x[k]);
                }
            }
        }
    }
    let body = chunks * LANES;
    for r in 0..R {
        for t in 0..N {
            let [a0, a1, a2, a3] = acc[r][t];
            let mut s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
            for e in body..n {
                let x = f32::from_le_bytes([
                    xs[t][4 * e],
                    xs[t][4 * e + 1],
                    xs[t][4 * e + 2],
                    xs[t][4 * e + 3],
                ]);
                s = K::get(ws[r], e).mul_add(x, s);
            }
            out[r * N + t] = s;
        }
    }
}

/// All tokens against `R` weight rows, [`TILE_TOKENS`] at a time.
#[inline]
#[target_feature(enable = "neon")]
fn rows<K: FloatRow, const R: usize>(ws: &[&[u8]], xs: &[&[u8]], out: &mut [f32]) {
    let n = ws[0].len() / K::BYTES;
    for w in ws {
        assert_eq!(w.len(), n * K::BYTES, "weight rows differ in length");
    }
    for x in xs {
        assert!(
            x.len() >= 4 * n,
            "activation row shorter than the weight row"
        );
    }
    assert!(
        (1..=4).contains(&xs.len()),
        "1-4 activation rows, got {}",
        xs.len()
    );
    assert!(
        out.len() >= R * xs.len(),
        "output shorter than rows x tokens"
    );
    let mut part = [0.0f32; 2 * TILE_TOKENS];
    for (g, group) in xs.chunks(TILE_TOKENS).enumerate() {
        let m = group.len();
        match m {
            1 => tile::<K, R, 1>(ws, group, n, &mut part),
            _ => tile::<K, R, 2>(ws, group, n, &mut part),
        }
        for r in 0..R {
            let at = r * xs.len() + g * TILE_TOKENS;
            out[at..at + m].copy_from_slice(&part[r * m..(r + 1) * m]);
        }
    }
}

/// Generates a public entry point: 1-2 weight rows, 1-4 activation rows.
macro_rules! entry {
    ($(#[$doc:meta])* $name:ident, $kind:ty) => {
        $(#[$doc])*
        #[target_feature(enable = "neon")]
        pub unsafe fn $name(ws: &[&[u8]], xs: &[&[u8]], out: &mut [f32]) {
            match ws.len() {
                1 => rows::<$kind, 1>(ws, xs, out),
                2 => rows::<$kind, 2>(ws, xs, out),
                r => panic!("{} takes 1-2 weight rows, got {r}", stringify!($name)),
            }
        }
    };
}

entry!(
    /// Dots of one or two F32 weight rows with one to four f32 activation
    /// rows; `out[r * xs.len() + t]`.
    ///
    /// # Safety
    /// The CPU must support NEON.
    f32_f32, F32
);
entry!(
    /// F16 weights, as [`f32_f32`].
    ///
    /// # Safety
    /// As for [`f32_f32`].
    f16_f32, F16
);
entry!(
    /// BF16 weights, as [`f32_f32`].
    ///
    /// # Safety
    /// As for [`f32_f32`].
    bf16_f32, Bf16
);
