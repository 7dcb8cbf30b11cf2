//! AVX2 + FMA + F16C dot products of quantized weight rows with Q8_0
//! activation rows (block layouts as in ggml; rows are byte slices straight
//! from the mapping, so every load is unaligned).

use std::arch::x86_64::*;

const Q4_0_BYTES: usize = 18;
/// How far ahead of the current block weight rows are prefetched.
const PREFETCH_AHEAD: usize = 1024;
const Q8_0_BYTES: usize = 34;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_at(p: &[u8]) -> f32 {
    let bits = u16::from_le_bytes([p[0], p[1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Signed 8-bit dot product of 32 lanes, as 8 i32 partial sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_i8(a: __m256i, b: __m256i) -> __m256i {
    // maddubs wants unsigned x signed: move a's sign onto b.
    let ax = _mm256_sign_epi8(a, a);
    let sb = _mm256_sign_epi8(b, a);
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sb), _mm256_set1_epi16(1))
}

/// One Q4_0 x Q8_0 block product as 8 f32 partial sums, scaled.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_0_block(wb: &[u8], xb: &[u8], acc: __m256) -> __m256 {
    let d = _mm256_set1_ps(f16_at(wb) * f16_at(xb));
    // SAFETY: callers pass whole blocks: wb[2..18] is 16 readable bytes,
    // xb[2..34] is 32.
    let (qs, y) = unsafe {
        (
            _mm_loadu_si128(wb.as_ptr().add(2).cast()),
            _mm256_loadu_si256(xb.as_ptr().add(2).cast()),
        )
    };
    // Elements 0..16 are the low nibbles, 16..32 the high ones.
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs);
    let q = _mm256_sub_epi8(
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f)),
        _mm256_set1_epi8(8),
    );
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(q, y)), d, acc)
}

/// Dot of one Q4_0 row with one Q8_0 row of `w.len() / 18` blocks.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `x` must hold as many Q8_0
/// blocks as `w` holds Q4_0 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q4_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / Q4_0_BYTES;
    assert!(x.len() >= nb * Q8_0_BYTES);
    // Four accumulators keep four blocks in flight instead of one FMA chain.
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 4 <= nb {
        // Weights stream from memory; rows lie back to back, so fetching a
        // little past this row's end is the next row's start. Prefetch is a
        // hint: an address past the mapping is harmless.
        _mm_prefetch::<_MM_HINT_T0>(
            w.as_ptr()
                .wrapping_add(i * Q4_0_BYTES + PREFETCH_AHEAD)
                .cast(),
        );
        _mm_prefetch::<_MM_HINT_T0>(
            w.as_ptr()
                .wrapping_add(i * Q4_0_BYTES + PREFETCH_AHEAD + 64)
                .cast(),
        );
        for (k, a) in acc.iter_mut().enumerate() {
            let b = i + k;
            *a = q4_0_block(
                &w[b * Q4_0_BYTES..(b + 1) * Q4_0_BYTES],
                &x[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES],
                *a,
            );
        }
        i += 4;
    }
    while i < nb {
        acc[0] = q4_0_block(
            &w[i * Q4_0_BYTES..(i + 1) * Q4_0_BYTES],
            &x[i * Q8_0_BYTES..(i + 1) * Q8_0_BYTES],
            acc[0],
        );
        i += 1;
    }
    hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ))
}

/// Dot of one Q8_0 weight row with one Q8_0 activation row.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `x` must hold as many blocks as `w`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn vec_dot_q8_0_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / Q8_0_BYTES;
    assert!(x.len() >= nb * Q8_0_BYTES);
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let wb = &w[i * Q8_0_BYTES..(i + 1) * Q8_0_BYTES];
        let xb = &x[i * Q8_0_BYTES..(i + 1) * Q8_0_BYTES];
        let d = _mm256_set1_ps(f16_at(wb) * f16_at(xb));
        // SAFETY: both blocks hold 32 quant bytes after the 2-byte scale.
        let (q, y) = unsafe {
            (
                _mm256_loadu_si256(wb.as_ptr().add(2).cast()),
                _mm256_loadu_si256(xb.as_ptr().add(2).cast()),
            )
        };
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8(q, y)), d, acc);
    }
    hsum(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar_q4(w: &[u8], x: &[u8]) -> f32 {
        let mut s = 0.0;
        for (wb, xb) in w.chunks_exact(Q4_0_BYTES).zip(x.chunks_exact(Q8_0_BYTES)) {
            let d = half::f16::from_le_bytes([wb[0], wb[1]]).to_f32()
                * half::f16::from_le_bytes([xb[0], xb[1]]).to_f32();
            let mut sumi = 0i32;
            for j in 0..16 {
                sumi += (i32::from(wb[2 + j] & 15) - 8) * i32::from(xb[2 + j] as i8);
                sumi += (i32::from(wb[2 + j] >> 4) - 8) * i32::from(xb[18 + j] as i8);
            }
            s += sumi as f32 * d;
        }
        s
    }

    fn scalar_q8(w: &[u8], x: &[u8]) -> f32 {
        let mut s = 0.0;
        for (wb, xb) in w.chunks_exact(Q8_0_BYTES).zip(x.chunks_exact(Q8_0_BYTES)) {
            let d = half::f16::from_le_bytes([wb[0], wb[1]]).to_f32()
                * half::f16::from_le_bytes([xb[0], xb[1]]).to_f32();
            let sumi: i32 = (0..32)
                .map(|j| i32::from(wb[2 + j] as i8) * i32::from(xb[2 + j] as i8))
                .sum();
            s += sumi as f32 * d;
        }
        s
    }

    fn blocks(seed: u64, n: usize, size: usize, extreme: bool) -> Vec<u8> {
        let mut v = Vec::with_capacity(n * size);
        let mut s = seed;
        for _ in 0..n {
            let d = half::f16::from_f32(0.01 + (s % 100) as f32 * 0.001);
            v.extend_from_slice(&d.to_le_bytes());
            for _ in 2..size {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (s >> 33) as u8;
                // -128 never occurs in Q8_0 activations; extremes use +-127 / 0x00 / 0xff.
                v.push(if extreme {
                    [0x81, 0x7f, 0x00, 0xff][(s >> 60) as usize % 4]
                } else if b == 0x80 {
                    0x81
                } else {
                    b
                });
            }
        }
        v
    }

    #[test]
    fn matches_scalar_on_random_and_extreme_blocks() {
        if !crate::isa::Isa::Avx2.available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        for n in [1, 2, 3, 7, 64, 65] {
            for extreme in [false, true] {
                let w4 = blocks(n as u64, n, Q4_0_BYTES, extreme);
                let w8 = blocks(n as u64 + 7, n, Q8_0_BYTES, extreme);
                let x = blocks(n as u64 + 99, n, Q8_0_BYTES, extreme);
                // SAFETY: AVX2 was detected above.
                let (a, b) = unsafe { (vec_dot_q4_0_q8_0(&w4, &x), vec_dot_q8_0_q8_0(&w8, &x)) };
                let (ra, rb) = (scalar_q4(&w4, &x), scalar_q8(&w8, &x));
                let tol = |r: f32| 1e-5 * r.abs().max(1.0) * n as f32;
                assert!((a - ra).abs() <= tol(ra), "q4_0 n={n}: {a} vs {ra}");
                assert!((b - rb).abs() <= tol(rb), "q8_0 n={n}: {b} vs {rb}");
            }
        }
    }
}
