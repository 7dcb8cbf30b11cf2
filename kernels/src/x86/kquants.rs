//! AVX2 dot products of k-quant weight rows (Q4_K, Q6_K) with Q8_K
//! activation rows, for up to four activation rows per pass over a weight
//! row. Per token the operations and their order do not depend on how many
//! tokens share the call, so results are batch-invariant.
//!
//! Layouts (ggml): Q4_K = d f16, dmin f16, 12 bytes of packed 6-bit scales
//! and mins, 128 bytes of nibbles (per 64 values: 32 low nibbles then 32
//! high); Q6_K = 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 i8
//! scales, d f16; Q8_K = d f32, 256 i8, 16 i16 sums of 16.

use crate::scalar::scale_min;
use std::arch::x86_64::*;

const Q4K_BYTES: usize = 144;
const Q5K_BYTES: usize = 176;
const Q6K_BYTES: usize = 210;
const Q8K_BYTES: usize = 292;
/// Prefetch distance for the streamed weight row.
const PREFETCH_AHEAD: usize = 4096;

#[inline]
fn f16_bits_to_f32(lo: u8, hi: u8) -> f32 {
    half::f16::from_le_bytes([lo, hi]).to_f32()
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load(p: &[u8], at: usize) -> __m256i {
    assert!(at + 32 <= p.len());
    // SAFETY: bounds checked just above; the load is unaligned.
    unsafe { _mm256_loadu_si256(p.as_ptr().add(at).cast()) }
}

/// Q8_K block fields: scale and the i16 sums of each 16 values.
#[inline]
fn q8k_d(x: &[u8]) -> f32 {
    f32::from_le_bytes([x[0], x[1], x[2], x[3]])
}

#[inline]
fn q8k_bsum(x: &[u8], k: usize) -> i32 {
    i32::from(i16::from_le_bytes([x[260 + 2 * k], x[261 + 2 * k]]))
}

/// The super-block scale and min and the 8 sub-block scales and mins of a
/// Q4_K / Q5_K block (same header layout).
#[inline]
fn k_header(wb: &[u8]) -> (f32, f32, [i16; 8], [i32; 8]) {
    let packed: &[u8; 12] = wb[4..16].try_into().expect("12 scale bytes");
    let mut sc = [0i16; 8];
    let mut mn = [0i32; 8];
    for j in 0..8 {
        let (s, m) = scale_min(j, packed);
        sc[j] = i16::from(s);
        mn[j] = i32::from(m);
    }
    (
        f16_bits_to_f32(wb[0], wb[1]),
        f16_bits_to_f32(wb[2], wb[3]),
        sc,
        mn,
    )
}

/// `d_y * (d * sum_j sc_j * (q_j . y_j) - dmin * sum_j mn_j * sum(y_j))` for
/// one Q4_K / Q5_K block whose unsigned values are in `q`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k_block_dot(
    q: &[__m256i; 8],
    d: f32,
    dmin: f32,
    sc: &[i16; 8],
    mn: &[i32; 8],
    xb: &[u8],
) -> f32 {
    let mut sumi = _mm256_setzero_si256();
    for j in 0..8 {
        // Unsigned values (< 32) x i8 pairs stay below 2^15 in maddubs.
        let p = _mm256_maddubs_epi16(q[j], load(xb, 4 + 32 * j));
        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, _mm256_set1_epi16(sc[j])));
    }
    let mins: i32 = (0..8)
        .map(|j| mn[j] * (q8k_bsum(xb, 2 * j) + q8k_bsum(xb, 2 * j + 1)))
        .sum();
    q8k_d(xb) * (d * hsum_i32(sumi) as f32 - dmin * mins as f32)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_q4k<const N: usize>(w: &[u8], xs: &[&[u8]], out: &mut [f32]) {
    let nb = w.len() / Q4K_BYTES;
    for x in xs {
        assert!(
            x.len() >= nb * Q8K_BYTES,
            "activation row shorter than the weight row"
        );
    }
    let mut acc = [0.0f32; N];
    let low = _mm256_set1_epi8(0x0f);
    for i in 0..nb {
        let wb = &w[i * Q4K_BYTES..(i + 1) * Q4K_BYTES];
        _mm_prefetch::<_MM_HINT_T0>(
            w.as_ptr()
                .wrapping_add(i * Q4K_BYTES + PREFETCH_AHEAD)
                .cast(),
        );
        let (d, dmin, sc, mn) = k_header(wb);
        // Unpacked nibbles per 64-value group, shared by every token.
        let mut q = [_mm256_setzero_si256(); 8];
        for g in 0..4 {
            let b = load(wb, 16 + 32 * g);
            q[2 * g] = _mm256_and_si256(b, low);
            q[2 * g + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(b), low);
        }
        for t in 0..N {
            let xb = &xs[t][i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            acc[t] += k_block_dot(&q, d, dmin, &sc, &mn, xb);
        }
    }
    out[..N].copy_from_slice(&acc);
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_q5k<const N: usize>(w: &[u8], xs: &[&[u8]], out: &mut [f32]) {
    let nb = w.len() / Q5K_BYTES;
    for x in xs {
        assert!(
            x.len() >= nb * Q8K_BYTES,
            "activation row shorter than the weight row"
        );
    }
    let mut acc = [0.0f32; N];
    let low = _mm256_set1_epi8(0x0f);
    let sixteen = _mm256_set1_epi8(16);
    for i in 0..nb {
        let wb = &w[i * Q5K_BYTES..(i + 1) * Q5K_BYTES];
        _mm_prefetch::<_MM_HINT_T0>(
            w.as_ptr()
                .wrapping_add(i * Q5K_BYTES + PREFETCH_AHEAD)
                .cast(),
        );
        let (d, dmin, sc, mn) = k_header(wb);
        // Sub-block j's fifth bits are bit j of the 32 high-bit bytes.
        let qh = load(wb, 16);
        let mut q = [_mm256_setzero_si256(); 8];
        for g in 0..4 {
            let b = load(wb, 48 + 32 * g);
            for (k, nib) in [
                _mm256_and_si256(b, low),
                _mm256_and_si256(_mm256_srli_epi16::<4>(b), low),
            ]
            .into_iter()
            .enumerate()
            {
                let j = 2 * g + k;
                let bit = _mm256_set1_epi8(1 << j);
                let high =
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), sixteen);
                q[j] = _mm256_or_si256(nib, high);
            }
        }
        for t in 0..N {
            let xb = &xs[t][i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            acc[t] += k_block_dot(&q, d, dmin, &sc, &mn, xb);
        }
    }
    out[..N].copy_from_slice(&acc);
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_q6k<const N: usize>(w: &[u8], xs: &[&[u8]], out: &mut [f32]) {
    let nb = w.len() / Q6K_BYTES;
    for x in xs {
        assert!(
            x.len() >= nb * Q8K_BYTES,
            "activation row shorter than the weight row"
        );
    }
    let mut acc = [0.0f32; N];
    let low = _mm256_set1_epi8(0x0f);
    let two = _mm256_set1_epi8(3);
    for i in 0..nb {
        let wb = &w[i * Q6K_BYTES..(i + 1) * Q6K_BYTES];
        _mm_prefetch::<_MM_HINT_T0>(
            w.as_ptr()
                .wrapping_add(i * Q6K_BYTES + PREFETCH_AHEAD)
                .cast(),
        );
        let d = f16_bits_to_f32(wb[208], wb[209]);
        let scales: [i8; 16] = std::array::from_fn(|k| wb[192 + k] as i8);
        // Unsigned 6-bit values (0..63) of the 8 runs of 32, in value order,
        // and the scale pair covering each run (16 values per scale).
        let mut q = [_mm256_setzero_si256(); 8];
        let mut sc = [_mm256_setzero_si256(); 8];
        for half in 0..2 {
            let ql0 = load(wb, 64 * half);
            let ql1 = load(wb, 64 * half + 32);
            let qh = load(wb, 128 + 32 * half);
            let hi = |shift: i32| -> __m256i {
                // (qh >> shift) & 3, moved to bits 4..5.
                let v = match shift {
                    0 => qh,
                    2 => _mm256_srli_epi16::<2>(qh),
                    4 => _mm256_srli_epi16::<4>(qh),
                    _ => _mm256_srli_epi16::<6>(qh),
                };
                _mm256_slli_epi16::<4>(_mm256_and_si256(v, two))
            };
            q[4 * half] = _mm256_or_si256(_mm256_and_si256(ql0, low), hi(0));
            q[4 * half + 1] = _mm256_or_si256(_mm256_and_si256(ql1, low), hi(2));
            q[4 * half + 2] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low), hi(4));
            q[4 * half + 3] =
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low), hi(6));
            for r in 0..4 {
                let (a, b) = (scales[8 * half + 2 * r], scales[8 * half + 2 * r + 1]);
                sc[4 * half + r] = _mm256_setr_epi16(
                    a.into(),
                    a.into(),
                    a.into(),
                    a.into(),
                    a.into(),
                    a.into(),
                    a.into(),
                    a.into(),
                    b.into(),
                    b.into(),
                    b.into(),
                    b.into(),
                    b.into(),
                    b.into(),
                    b.into(),
                    b.into(),
                );
            }
        }
        for t in 0..N {
            let xb = &xs[t][i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            let mut sumi = _mm256_setzero_si256();
            for r in 0..8 {
                // 0..63 x i8 pairs stay below 2^15 (2 * 63 * 127).
                let p = _mm256_maddubs_epi16(q[r], load(xb, 4 + 32 * r));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sc[r]));
            }
            // The values are stored +32: subtract 32 * sum(scale * y).
            let bias: i32 = (0..16)
                .map(|k| i32::from(scales[k]) * q8k_bsum(xb, k))
                .sum();
            acc[t] += q8k_d(xb) * d * (hsum_i32(sumi) - 32 * bias) as f32;
        }
    }
    out[..N].copy_from_slice(&acc);
}

macro_rules! entry {
    ($(#[$doc:meta])* $name:ident, $rows:ident) => {
        $(#[$doc])*
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn $name(w: &[u8], xs: &[&[u8]], out: &mut [f32]) {
            match xs.len() {
                1 => $rows::<1>(w, xs, out),
                2 => $rows::<2>(w, xs, out),
                3 => $rows::<3>(w, xs, out),
                4 => $rows::<4>(w, xs, out),
                n => panic!("{} takes 1 to 4 activation rows, got {n}", stringify!($name)),
            }
        }
    };
}

entry!(
    /// Dots of one Q4_K weight row with up to four Q8_K activation rows.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; every activation row must
    /// hold as many blocks as `w`; `out.len() >= xs.len()`, `1 <= xs.len() <= 4`.
    dot_q4k_q8k,
    rows_q4k
);
entry!(
    /// Dots of one Q5_K weight row with up to four Q8_K activation rows.
    ///
    /// # Safety
    /// As for [`dot_q4k_q8k`].
    dot_q5k_q8k,
    rows_q5k
);
entry!(
    /// Dots of one Q6_K weight row with up to four Q8_K activation rows.
    ///
    /// # Safety
    /// As for [`dot_q4k_q8k`].
    dot_q6k_q8k,
    rows_q6k
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar;
    use crate::types::{ActType, WeightType};

    fn row(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0;
                if i % 97 == 0 { v * 8.0 } else { v }
            })
            .collect()
    }

    #[test]
    fn match_the_scalar_reference_and_batching_changes_nothing() {
        if !crate::isa::Isa::Avx2.available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        for (ty, f) in [
            (
                WeightType::Q4K,
                dot_q4k_q8k as unsafe fn(&[u8], &[&[u8]], &mut [f32]),
            ),
            (WeightType::Q6K, dot_q6k_q8k),
        ] {
            for blocks in [1, 2, 7] {
                let n = 256 * blocks;
                let mut wq = vec![0u8; ty.row_bytes(n)];
                scalar::quantize_row(ty, &row(blocks as u64, n), &mut wq);
                let xs: Vec<Vec<u8>> = (0..4)
                    .map(|t| {
                        let mut a = vec![0u8; ActType::Q8K.row_bytes(n)];
                        scalar::quantize_acts(ActType::Q8K, &row(100 + t, n), &mut a);
                        a
                    })
                    .collect();
                let refs: Vec<&[u8]> = xs.iter().map(Vec::as_slice).collect();
                let mut four = [0.0f32; 4];
                // SAFETY: AVX2 was detected above.
                unsafe { f(&wq, &refs, &mut four) };
                for t in 0..4 {
                    let want = scalar::vec_dot(ty, &wq, refs[t], n);
                    let mut one = [0.0f32];
                    // SAFETY: as above.
                    unsafe { f(&wq, &refs[t..t + 1], &mut one) };
                    assert_eq!(
                        one[0].to_bits(),
                        four[t].to_bits(),
                        "{ty:?} batching changed token {t}"
                    );
                    assert!(
                        (one[0] - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "{ty:?} n={n}: {} vs {want}",
                        one[0]
                    );
                }
            }
        }
    }
}
