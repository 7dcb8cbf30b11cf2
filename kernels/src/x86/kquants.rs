//! AVX2 dots of k-quant weight rows (Q4_K, Q5_K, Q6_K) with Q8_K activation
//! rows, as register tiles of 1..=2 weight rows x 1..=4 activation rows: one
//! super-block loop (`rows`) for every type, each type supplying only its
//! block decoding (`KQuant`). Each activation load serves both weight rows.
//! An AVX-512 VNNI variant (on ymm registers) fuses each multiply-add of
//! i16 pairs into one instruction, with bit-identical results.
//!
//! Numerics are the AVX-512 panels' ([`super::avx512k`]): each (row,
//! token) pair's super-block integers are exact (lane sums, then an exact
//! horizontal sum), then one fixed float expression per super-block is
//! added from block 0 up, so the tiles give the panels' and the AVX2
//! groups' ([`super::avx2k`]) bits whatever else shares the call.
//!
//! Layouts (ggml): Q4_K = d, dmin (f16), 12 bytes of packed 6-bit scales and
//! mins, 128 bytes of nibbles (per 64 values: 32 low nibbles then 32 high);
//! Q5_K = the same plus 32 bytes of fifth bits before the nibbles (bit j of
//! byte l: value 32j + l); Q6_K = 128 bytes of low nibbles, 64 bytes of 2-bit
//! highs, 16 i8 scales, d (f16); Q8_K = d (f32), 256 i8, 16 i16 sums of 16.

use super::simd::{check_tile, f16_at, load128, load256, prefetch, tile, u32_at};
use std::arch::x86_64::*;

const Q8K_BYTES: usize = 292;
/// Offset of the Q8_K block's 16 i16 sums of 16 quants.
const Q8K_BSUMS: usize = 260;

/// What the super-block loop needs of one decoded weight block.
#[derive(Clone, Copy)]
struct KBlock<E> {
    d: f32,
    /// Scale of the mins (Q4_K / Q5_K); unused when the correction is integer.
    dmin: f32,
    /// 16 i16 multipliers of the activation block's 16 sums: the result
    /// loses `sum_k corr_k * bsum_k` (times `dmin`, or exactly, see
    /// [`KQuant::INT_CORR`]).
    corr: __m256i,
    /// Whatever the type's runs are decoded from.
    extra: E,
}

/// One k-quant format: the super-block's header and its 8 runs of 32 values.
trait KQuant {
    const BYTES: usize;
    /// The correction is an integer offset of the values (Q6_K's +32),
    /// subtracted from the integer sums before any rounding; else it is the
    /// mins, scaled by `dmin`.
    const INT_CORR: bool;
    type Extra: Copy;

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    unsafe fn header(wb: &[u8]) -> KBlock<Self::Extra>;

    /// Run `j` (0..8, values `32j..32j + 32`): the unsigned values (< 64) and
    /// the i16 multipliers of their byte pairs.
    ///
    /// # Safety
    /// As for [`KQuant::header`].
    unsafe fn run(wb: &[u8], extra: &Self::Extra, j: usize) -> (__m256i, __m256i);
}

/// Sub-block scales (as i16, in both 128-bit halves) and the corrections
/// `mins[k / 2]` of a Q4_K / Q5_K header.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scales_and_mins(wb: &[u8]) -> (__m256i, __m256i) {
    // 6-bit scales and mins packed in 12 bytes (see `scalar::scale_min`):
    // unpacked four at a time in u32 words, as ggml does.
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let (a, b, c) = (u32_at(wb, 4), u32_at(wb, 8), u32_at(wb, 12));
    let scales_lo = a & LOW6;
    let scales_hi = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let mins_lo = b & LOW6;
    let mins_hi = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    let scales = _mm_cvtepu8_epi16(_mm_setr_epi32(scales_lo as i32, scales_hi as i32, 0, 0));
    let mins = _mm_cvtepu8_epi16(_mm_setr_epi32(mins_lo as i32, mins_hi as i32, 0, 0));
    let corr = _mm256_set_m128i(
        _mm_unpackhi_epi16(mins, mins),
        _mm_unpacklo_epi16(mins, mins),
    );
    (_mm256_broadcastsi128_si256(scales), corr)
}

/// Sub-block `j`'s scale in every i16 lane, from [`scales_and_mins`]'s scales.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn broadcast_scale(scales: __m256i, j: usize) -> __m256i {
    let pick = (((2 * j + 1) << 8) | (2 * j)) as i16;
    _mm256_shuffle_epi8(scales, _mm256_set1_epi16(pick))
}

/// The low or high nibbles of 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibble_half(b: __m256i, high: bool) -> __m256i {
    let b = if high { _mm256_srli_epi16::<4>(b) } else { b };
    _mm256_and_si256(b, _mm256_set1_epi8(0x0f))
}

struct Q4K;
struct Q5K;
struct Q6K;

impl KQuant for Q4K {
    const BYTES: usize = 144;
    const INT_CORR: bool = false;
    /// The sub-block scales.
    type Extra = __m256i;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn header(wb: &[u8]) -> KBlock<__m256i> {
        let (scales, corr) = scales_and_mins(wb);
        KBlock {
            d: f16_at(wb, 0),
            dmin: f16_at(wb, 2),
            corr,
            extra: scales,
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run(wb: &[u8], scales: &__m256i, j: usize) -> (__m256i, __m256i) {
        let q = nibble_half(load256(wb, 16 + 32 * (j / 2)), j % 2 == 1);
        (q, broadcast_scale(*scales, j))
    }
}

impl KQuant for Q5K {
    const BYTES: usize = 176;
    const INT_CORR: bool = false;
    /// The sub-block scales and the 32 bytes of fifth bits.
    type Extra = (__m256i, __m256i);

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn header(wb: &[u8]) -> KBlock<(__m256i, __m256i)> {
        let (scales, corr) = scales_and_mins(wb);
        KBlock {
            d: f16_at(wb, 0),
            dmin: f16_at(wb, 2),
            corr,
            extra: (scales, load256(wb, 16)),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run(wb: &[u8], extra: &(__m256i, __m256i), j: usize) -> (__m256i, __m256i) {
        let (scales, qh) = *extra;
        let low = nibble_half(load256(wb, 48 + 32 * (j / 2)), j % 2 == 1);
        // Bit j of each qh byte moved to bit 4 (16-bit shifts: what crosses
        // from the neighbouring byte never reaches bit 4).
        let at4 = match j {
            0 => _mm256_slli_epi16::<4>(qh),
            1 => _mm256_slli_epi16::<3>(qh),
            2 => _mm256_slli_epi16::<2>(qh),
            3 => _mm256_slli_epi16::<1>(qh),
            4 => qh,
            5 => _mm256_srli_epi16::<1>(qh),
            6 => _mm256_srli_epi16::<2>(qh),
            _ => _mm256_srli_epi16::<3>(qh),
        };
        let q = _mm256_or_si256(low, _mm256_and_si256(at4, _mm256_set1_epi8(16)));
        (q, broadcast_scale(scales, j))
    }
}

impl KQuant for Q6K {
    const BYTES: usize = 210;
    const INT_CORR: bool = true;
    /// The 16 i8 scales.
    type Extra = __m128i;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn header(wb: &[u8]) -> KBlock<__m128i> {
        let scales = load128(wb, 192);
        // Values are stored +32: each 16-value group loses 32 * scale * sum(y).
        let corr = _mm256_slli_epi16::<5>(_mm256_cvtepi8_epi16(scales));
        KBlock {
            d: f16_at(wb, 208),
            dmin: 0.0,
            corr,
            extra: scales,
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run(wb: &[u8], scales: &__m128i, j: usize) -> (__m256i, __m256i) {
        // Run j = quarter j % 4 of half j / 4: low nibbles of ql bytes
        // 64h + 32(j % 2) for quarters 0 and 1, high ones for 2 and 3, with
        // bits 2(j % 4).. of the half's 32 qh bytes on top.
        let (h, quarter) = (j / 4, j % 4);
        let low = nibble_half(load256(wb, 64 * h + 32 * (quarter % 2)), quarter >= 2);
        let qh = load256(wb, 128 + 32 * h);
        let top = match quarter {
            0 => qh,
            1 => _mm256_srli_epi16::<2>(qh),
            2 => _mm256_srli_epi16::<4>(qh),
            _ => _mm256_srli_epi16::<6>(qh),
        };
        let top = _mm256_slli_epi16::<4>(_mm256_and_si256(top, _mm256_set1_epi8(3)));
        // Scales 2j (first 16 values) and 2j + 1, widened to i16.
        let pick = _mm_set_epi64x(
            0x0101_0101_0101_0101 * (2 * j as i64 + 1),
            0x0101_0101_0101_0101 * (2 * j as i64),
        );
        let m = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(*scales, pick));
        (_mm256_or_si256(low, top), m)
    }
}

/// The (wrapping) sums of the 8 lanes of `a` and of `b`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum2_epi32(a: __m256i, b: __m256i) -> (i32, i32) {
    // a0+a1, a2+a3, b0+b1, b2+b3 | the same of lanes 4..8
    let h = _mm256_hadd_epi32(a, b);
    let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
    // a, a, b, b partial sums: add the pairs.
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    (_mm_cvtsi128_si32(s), _mm_extract_epi32::<2>(s))
}

/// Integer lane sums `acc + madd(p, m)` (AVX2: two instructions).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn madd_add(acc: __m256i, p: __m256i, m: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(p, m))
}

/// [`madd_add`] in one AVX-512 VNNI instruction: the same exact integers
/// (the sums cannot wrap, see [`rows`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
fn madd_add_vnni(acc: __m256i, p: __m256i, m: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, p, m)
}

/// Generates the super-block loop for one instruction-set flavour.
macro_rules! rows_fn {
    ($name:ident, $features:literal, $madd_add:ident) => {
        /// Dots of `R` weight rows of `K` with `N` Q8_K rows; `out[r * N + t]`.
        ///
        /// Integer sums are exact: values < 64 times |y| <= 128 fit a
        /// maddubs pair (2 * 63 * 128 < 2^15), each i32 lane gathers 32
        /// products times a scale of at most 128 (< 2^25) and a block's
        /// 8 lanes stay below 2^31; they become f32 once per block, as in
        /// the panels.
        #[inline]
        #[target_feature(enable = $features)]
        fn $name<K: KQuant, const R: usize, const N: usize>(
            ws: &[&[u8]],
            xs: &[&[u8]],
            out: &mut [f32],
        ) {
            let nb = check_tile(ws, xs, out, K::BYTES, Q8K_BYTES);
            let mut acc = [[0.0f32; N]; R];
            for i in 0..nb {
                let (wo, xo) = (i * K::BYTES, i * Q8K_BYTES);
                // (Plain loops, not closures: those would lose the target
                // features and with them the intrinsics' inlining.)
                let mut wb = [&ws[0][..0]; R];
                for r in 0..R {
                    wb[r] = &ws[r][wo..wo + K::BYTES];
                    // Every cache line of the block a few rows down (rows
                    // of a matrix are contiguous and each thread walks a
                    // run of them): decode streams weights from DRAM, and
                    // rows of 1-2 KB are too short for the hardware
                    // prefetcher to catch on alone.
                    for line in (0..K::BYTES).step_by(64) {
                        prefetch(ws[r], wo + line);
                    }
                }
                // SAFETY: this function's features include AVX2/FMA/F16C.
                let mut hdr = [unsafe { K::header(wb[0]) }; R];
                for r in 1..R {
                    // SAFETY: as above.
                    hdr[r] = unsafe { K::header(wb[r]) };
                }
                let mut sumi = [[_mm256_setzero_si256(); N]; R];
                for j in 0..8 {
                    let mut run = [(_mm256_setzero_si256(), _mm256_setzero_si256()); R];
                    for r in 0..R {
                        // SAFETY: as above.
                        run[r] = unsafe { K::run(wb[r], &hdr[r].extra, j) };
                    }
                    for t in 0..N {
                        let y = load256(xs[t], xo + 4 + 32 * j);
                        for r in 0..R {
                            let p = _mm256_maddubs_epi16(run[r].0, y);
                            sumi[r][t] = $madd_add(sumi[r][t], p, run[r].1);
                        }
                    }
                }
                for t in 0..N {
                    let xb = &xs[t][xo..xo + Q8K_BYTES];
                    let dy = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
                    let bsums = load256(xb, Q8K_BSUMS);
                    for r in 0..R {
                        let h = &hdr[r];
                        // The block's exact integers (lane sums wrap as the
                        // panels' do), then the panels' float expression.
                        let c = _mm256_madd_epi16(bsums, h.corr);
                        let (isum, msum) = hsum2_epi32(sumi[r][t], c);
                        acc[r][t] += if K::INT_CORR {
                            // (sum(sc * q * x) - 32 * sum(sc * bsum)) * (d_w * d_x)
                            isum.wrapping_sub(msum) as f32 * (h.d * dy)
                        } else {
                            // sum(sc * q * x) * (d_w * d_x) - sum(m * bsum) * (dmin_w * d_x)
                            isum as f32 * (h.d * dy) - msum as f32 * (h.dmin * dy)
                        };
                    }
                }
            }
            for r in 0..R {
                for t in 0..N {
                    out[r * N + t] = acc[r][t];
                }
            }
        }
    };
}

rows_fn!(rows, "avx2,fma,f16c", madd_add);
rows_fn!(
    rows_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    madd_add_vnni
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
    /// Dots of one or two Q4_K weight rows with one to four Q8_K activation
    /// rows; `out[r * xs.len() + t]`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C. (Row lengths are checked:
    /// all weight rows must have the same block count, every activation row
    /// at least as many blocks, `out` room for every pair; activation quants
    /// lie in -127..=127 and their sums match them, as the Q8_K quantizer
    /// guarantees.)
    dot_q4k_q8k, "avx2,fma,f16c", rows, Q4K
);
entry!(
    /// Dots of Q5_K weight rows with Q8_K activation rows, as [`dot_q4k_q8k`].
    ///
    /// # Safety
    /// As for [`dot_q4k_q8k`].
    dot_q5k_q8k, "avx2,fma,f16c", rows, Q5K
);
entry!(
    /// Dots of Q6_K weight rows with Q8_K activation rows, as [`dot_q4k_q8k`].
    ///
    /// # Safety
    /// As for [`dot_q4k_q8k`].
    dot_q6k_q8k, "avx2,fma,f16c", rows, Q6K
);
entry!(
    /// [`dot_q4k_q8k`] with AVX-512 VNNI (bit-identical results).
    ///
    /// # Safety
    /// As for [`dot_q4k_q8k`], and the CPU must support AVX-512 VNNI and VL.
    dot_q4k_q8k_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", rows_vnni, Q4K
);
entry!(
    /// [`dot_q5k_q8k`] with AVX-512 VNNI (bit-identical results).
    ///
    /// # Safety
    /// As for [`dot_q4k_q8k_vnni`].
    dot_q5k_q8k_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", rows_vnni, Q5K
);
entry!(
    /// [`dot_q6k_q8k`] with AVX-512 VNNI (bit-identical results).
    ///
    /// # Safety
    /// As for [`dot_q4k_q8k_vnni`].
    dot_q6k_q8k_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", rows_vnni, Q6K
);
