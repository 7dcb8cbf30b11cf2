//! AVX2 + FMA + F16C dots of the 32-wide formats with a minimum or a fifth
//! bit (Q4_1 x Q8_1, Q5_0 x Q8_0, Q5_1 x Q8_1), as register tiles of 1..=2
//! weight rows x 1..=4 activation rows, and an AVX-512 VNNI variant (on ymm
//! registers) whose integer lane sums, hence results, are bit-identical.
//!
//! Each (row, token) pair has one 8-lane f32 accumulator fed block by block
//! by the same operations whatever else shares the call, so its result does
//! not depend on the tile shape (batch invariance).
//!
//! Layouts (ggml): Q4_1 = d, m (f16), 16 bytes of nibbles; Q5_0 = d, qh
//! (u32 of fifth bits), nibbles; Q5_1 = d, m, qh, nibbles; Q8_0 = d, 32 i8;
//! Q8_1 = d, s = d * sum(qs) (f16), 32 i8.

use super::simd::{
    bytes_from_bits, check_tile, f16_at, f16_pair, hsum_ps, load128, load256, nibbles, prefetch,
    tile, u32_at,
};
use std::arch::x86_64::*;

/// One 32-wide weight format: its block geometry and how one block becomes
/// 32 byte values in element order.
trait Legacy {
    /// Bytes of a weight block.
    const BYTES: usize;
    /// Bytes of the paired activation block (Q8_0: 34, Q8_1: 36); its 32
    /// quants are the last 32 bytes, its f16 `d` (and `s`) the first.
    const ACT_BYTES: usize;
    /// Values are signed (`w = d * v`); else unsigned codes with a minimum
    /// (`w = d * q + m`, paired with Q8_1's `s`).
    const SIGNED: bool;

    /// The 32 values of the block `wb`: i8 when `SIGNED`, else u8.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn values(wb: &[u8]) -> __m256i;
}

struct Q4_1;
struct Q5_0;
struct Q5_1;

impl Legacy for Q4_1 {
    const BYTES: usize = 20;
    const ACT_BYTES: usize = 36;
    const SIGNED: bool = false;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values(wb: &[u8]) -> __m256i {
        nibbles(load128(wb, 4))
    }
}

impl Legacy for Q5_0 {
    const BYTES: usize = 22;
    const ACT_BYTES: usize = 34;
    const SIGNED: bool = true;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values(wb: &[u8]) -> __m256i {
        // A clear fifth bit makes the code q - 16 < 0: set the byte's top
        // nibble, so the byte reads as q - 16 in i8 either way.
        let clear = _mm256_andnot_si256(bytes_from_bits(u32_at(wb, 2)), _mm256_set1_epi8(-16));
        _mm256_or_si256(nibbles(load128(wb, 6)), clear)
    }
}

impl Legacy for Q5_1 {
    const BYTES: usize = 24;
    const ACT_BYTES: usize = 36;
    const SIGNED: bool = false;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values(wb: &[u8]) -> __m256i {
        let fifth = _mm256_and_si256(bytes_from_bits(u32_at(wb, 4)), _mm256_set1_epi8(16));
        _mm256_or_si256(nibbles(load128(wb, 8)), fifth)
    }
}

/// 8 i32 lane sums of a weight block's products with 32 i8 activations
/// (lane k covers bytes 4k..4k+4). Neither maddubs can saturate: |w| <= 31,
/// |x| <= 127, two products per i16. Signed weights go through their
/// magnitude, their signs moved onto the activations (never -128).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lanes_u8(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lanes_i8(wabs: __m256i, w: __m256i, x: __m256i) -> __m256i {
    lanes_u8(wabs, _mm256_sign_epi8(x, w))
}

/// [`lanes_u8`] in one VNNI instruction: the same exact integers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn lanes_u8_vnni(w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn lanes_i8_vnni(wabs: __m256i, w: __m256i, x: __m256i) -> __m256i {
    lanes_u8_vnni(wabs, _mm256_sign_epi8(x, w))
}

/// Generates the tile body for one instruction-set flavour.
macro_rules! rows_fn {
    ($name:ident, $features:literal, $lanes_u:ident, $lanes_i:ident) => {
        /// Dots of `R` weight rows of `K` with `N` activation rows;
        /// `out[r * N + t]`. Both rows share every activation load.
        #[inline]
        #[target_feature(enable = $features)]
        fn $name<K: Legacy, const R: usize, const N: usize>(
            ws: &[&[u8]],
            xs: &[&[u8]],
            out: &mut [f32],
        ) {
            let nb = check_tile(ws, xs, out, K::BYTES, K::ACT_BYTES);
            let mut acc = [[_mm256_setzero_ps(); N]; R];
            for i in 0..nb {
                let mut q = [_mm256_setzero_si256(); R];
                let mut qabs = [_mm256_setzero_si256(); R];
                let mut dw = [0.0f32; R];
                // The block minimum in lane 0 (added once per block).
                let mut mw = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    let wb = &ws[r][i * K::BYTES..(i + 1) * K::BYTES];
                    prefetch(ws[r], i * K::BYTES);
                    // SAFETY: this function's features include AVX2/FMA/F16C.
                    q[r] = unsafe { K::values(wb) };
                    if K::SIGNED {
                        qabs[r] = _mm256_sign_epi8(q[r], q[r]);
                        dw[r] = f16_at(wb, 0);
                    } else {
                        let (d, m) = f16_pair(wb, 0);
                        dw[r] = d;
                        mw[r] = _mm256_setr_ps(m, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
                    }
                }
                for t in 0..N {
                    let xb = &xs[t][i * K::ACT_BYTES..(i + 1) * K::ACT_BYTES];
                    let y = load256(xb, K::ACT_BYTES - 32);
                    let (dx, sx) = if K::SIGNED {
                        (f16_at(xb, 0), 0.0)
                    } else {
                        f16_pair(xb, 0)
                    };
                    for r in 0..R {
                        let s = if K::SIGNED {
                            $lanes_i(qabs[r], q[r], y)
                        } else {
                            $lanes_u(q[r], y)
                        };
                        acc[r][t] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(s),
                            _mm256_set1_ps(dw[r] * dx),
                            acc[r][t],
                        );
                        if !K::SIGNED {
                            acc[r][t] = _mm256_fmadd_ps(mw[r], _mm256_set1_ps(sx), acc[r][t]);
                        }
                    }
                }
            }
            for r in 0..R {
                for t in 0..N {
                    out[r * N + t] = hsum_ps(acc[r][t]);
                }
            }
        }
    };
}

rows_fn!(rows, "avx2,fma,f16c", lanes_u8, lanes_i8);
rows_fn!(
    rows_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    lanes_u8_vnni,
    lanes_i8_vnni
);

/// Generates a public entry point (1-2 weight rows, 1-4 activation rows).
macro_rules! entry {
    ($(#[$doc:meta])* $name:ident, $features:literal, $rows:ident, $ty:ty) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        pub unsafe fn $name(ws: &[&[u8]], xs: &[&[u8]], out: &mut [f32]) {
            tile!($rows::<$ty>(ws, xs, out))
        }
    };
}

entry!(
    /// Dots of one or two Q4_1 weight rows with one to four Q8_1 activation
    /// rows; `out[r * xs.len() + t]`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C. (Row lengths are checked:
    /// all weight rows must have the same block count, every activation row
    /// at least as many blocks, `out` room for every pair; activation quants
    /// are never -128, as every Q8 quantizer guarantees.)
    dot_q4_1_q8_1, "avx2,fma,f16c", rows, Q4_1
);
entry!(
    /// Dots of Q5_0 weight rows with Q8_0 activation rows, as [`dot_q4_1_q8_1`].
    ///
    /// # Safety
    /// As for [`dot_q4_1_q8_1`].
    dot_q5_0_q8_0, "avx2,fma,f16c", rows, Q5_0
);
entry!(
    /// Dots of Q5_1 weight rows with Q8_1 activation rows, as [`dot_q4_1_q8_1`].
    ///
    /// # Safety
    /// As for [`dot_q4_1_q8_1`].
    dot_q5_1_q8_1, "avx2,fma,f16c", rows, Q5_1
);
entry!(
    /// [`dot_q4_1_q8_1`] with AVX-512 VNNI (bit-identical results).
    ///
    /// # Safety
    /// As for [`dot_q4_1_q8_1`], and the CPU must support AVX-512 VNNI and VL.
    dot_q4_1_q8_1_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", rows_vnni, Q4_1
);
entry!(
    /// [`dot_q5_0_q8_0`] with AVX-512 VNNI (bit-identical results).
    ///
    /// # Safety
    /// As for [`dot_q4_1_q8_1_vnni`].
    dot_q5_0_q8_0_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", rows_vnni, Q5_0
);
entry!(
    /// [`dot_q5_1_q8_1`] with AVX-512 VNNI (bit-identical results).
    ///
    /// # Safety
    /// As for [`dot_q4_1_q8_1_vnni`].
    dot_q5_1_q8_1_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", rows_vnni, Q5_1
);
