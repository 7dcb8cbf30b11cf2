//! AVX2 + FMA + F16C dot products of quantized weight rows with Q8_0
//! activation rows (block layouts as in ggml; rows are byte slices straight
//! from the mapping, so every load is unaligned).

use std::arch::x86_64::*;

const Q4_0_BYTES: usize = 18;
/// How far ahead of the current block weight rows are prefetched.
const PREFETCH_AHEAD: usize = 4096;
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

/// Integer products of one weight block's 32 signed values with one
/// activation block, as 8 i32 lane sums (lane k covers bytes 4k..4k+4).
/// `wabs` is |w|; `w` supplies the signs. maddubs cannot saturate here
/// (|w| <= 128, |x| <= 127, two products per i16).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lanes_i8(wabs: __m256i, w: __m256i, x: __m256i) -> __m256i {
    let sx = _mm256_sign_epi8(x, w);
    _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, sx), _mm256_set1_epi16(1))
}

/// The 32 weights of a Q4_0 block as signed bytes (values -8..=7):
/// elements 0..16 are the low nibbles, 16..32 the high ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_q4_0(wb: &[u8]) -> __m256i {
    // SAFETY: callers pass whole blocks: wb[2..18] is 16 readable bytes.
    let qs = unsafe { _mm_loadu_si128(wb.as_ptr().add(2).cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs);
    _mm256_sub_epi8(
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f)),
        _mm256_set1_epi8(8),
    )
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_q8(xb: &[u8]) -> __m256i {
    // SAFETY: callers pass whole Q8_0 blocks: xb[2..34] is 32 readable bytes.
    unsafe { _mm256_loadu_si256(xb.as_ptr().add(2).cast()) }
}

/// Generates the row-dot body for one instruction-set flavour.
macro_rules! rows_q8_fn {
    ($name:ident, $features:literal, $lanes:ident) => {
        /// Dots of `R` weight rows (Q4_0 or Q8_0, `W_BYTES` per block) with
        /// `N` Q8_0 activation rows; `out[r * N + t]`. Each (row, token) pair
        /// has one accumulator and takes the blocks in order, so its result
        /// is bit-identical whatever R and N are: batching never changes a
        /// sequence's numbers. Two rows share every activation load.
        #[inline]
        #[target_feature(enable = $features)]
        fn $name<const W_BYTES: usize, const R: usize, const N: usize>(
            ws: &[&[u8]],
            xs: &[&[u8]],
            out: &mut [f32],
        ) {
            let nb = ws[0].len() / W_BYTES;
            for w in ws {
                assert!(w.len() / W_BYTES == nb, "weight rows differ in length");
            }
            for x in xs {
                assert!(
                    x.len() >= nb * Q8_0_BYTES,
                    "activation row shorter than the weight row"
                );
            }
            let mut acc = [[_mm256_setzero_ps(); N]; R];
            for i in 0..nb {
                let mut q = [_mm256_setzero_si256(); R];
                let mut qabs = [_mm256_setzero_si256(); R];
                let mut dw = [0.0f32; R];
                for r in 0..R {
                    let wb = &ws[r][i * W_BYTES..(i + 1) * W_BYTES];
                    // Weights stream from memory; rows lie back to back, so
                    // fetching a little past this row's end is the next
                    // row's start. Prefetch is a hint: an address past the
                    // mapping is harmless.
                    _mm_prefetch::<_MM_HINT_T0>(
                        ws[r]
                            .as_ptr()
                            .wrapping_add(i * W_BYTES + PREFETCH_AHEAD)
                            .cast(),
                    );
                    q[r] = if W_BYTES == Q4_0_BYTES {
                        unpack_q4_0(wb)
                    } else {
                        load_q8(wb)
                    };
                    qabs[r] = _mm256_sign_epi8(q[r], q[r]);
                    dw[r] = f16_at(wb);
                }
                for t in 0..N {
                    let xb = &xs[t][i * Q8_0_BYTES..(i + 1) * Q8_0_BYTES];
                    let (y, dx) = (load_q8(xb), f16_at(xb));
                    for r in 0..R {
                        let s = $lanes(qabs[r], q[r], y);
                        acc[r][t] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(s),
                            _mm256_set1_ps(dw[r] * dx),
                            acc[r][t],
                        );
                    }
                }
            }
            for r in 0..R {
                for t in 0..N {
                    out[r * N + t] = hsum(acc[r][t]);
                }
            }
        }
    };
}

rows_q8_fn!(rows_q8, "avx2,fma,f16c", lanes_i8);

/// Generates the public entry point (1-2 weight rows, 1-4 activation rows).
macro_rules! dot_entry {
    ($(#[$doc:meta])* $name:ident, $features:literal, $rows:ident, $wbytes:expr) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        pub unsafe fn $name(ws: &[&[u8]], xs: &[&[u8]], out: &mut [f32]) {
            match (ws.len(), xs.len()) {
                (1, 1) => $rows::<{ $wbytes }, 1, 1>(ws, xs, out),
                (1, 2) => $rows::<{ $wbytes }, 1, 2>(ws, xs, out),
                (1, 3) => $rows::<{ $wbytes }, 1, 3>(ws, xs, out),
                (1, 4) => $rows::<{ $wbytes }, 1, 4>(ws, xs, out),
                (2, 1) => $rows::<{ $wbytes }, 2, 1>(ws, xs, out),
                (2, 2) => $rows::<{ $wbytes }, 2, 2>(ws, xs, out),
                (2, 3) => $rows::<{ $wbytes }, 2, 3>(ws, xs, out),
                (2, 4) => $rows::<{ $wbytes }, 2, 4>(ws, xs, out),
                (r, n) => panic!("{} takes 1-2 weight rows and 1-4 activation rows, got {r} and {n}", stringify!($name)),
            }
        }
    };
}

dot_entry!(
    /// Dots of one or two Q4_0 weight rows with one to four Q8_0 activation
    /// rows; `out[r * xs.len() + t]`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C. All weight rows must have the
    /// same block count and every activation row at least as many blocks;
    /// `out.len() >= ws.len() * xs.len()`.
    dot_q4_0_q8_0, "avx2,fma,f16c", rows_q8, Q4_0_BYTES
);
dot_entry!(
    /// Dots of Q8_0 weight rows with Q8_0 activation rows, as [`dot_q4_0_q8_0`].
    ///
    /// # Safety
    /// As for [`dot_q4_0_q8_0`].
    dot_q8_0_q8_0, "avx2,fma,f16c", rows_q8, Q8_0_BYTES
);
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_weight_rows_give_the_same_bits_as_one() {
        if !crate::isa::Isa::Avx2.available() {
            return;
        }
        let wa = blocks(21, 9, Q4_0_BYTES, false);
        let wb = blocks(22, 9, Q4_0_BYTES, true);
        let xs: Vec<Vec<u8>> = (0..4)
            .map(|t| blocks(30 + t, 9, Q8_0_BYTES, false))
            .collect();
        for n in 1..=4 {
            let refs: Vec<&[u8]> = xs[..n].iter().map(Vec::as_slice).collect();
            let mut both = vec![0.0f32; 2 * n];
            let (mut a, mut b) = (vec![0.0f32; n], vec![0.0f32; n]);
            // SAFETY: AVX2 was detected above.
            unsafe {
                dot_q4_0_q8_0(&[&wa, &wb], &refs, &mut both);
                dot_q4_0_q8_0(&[&wa], &refs, &mut a);
                dot_q4_0_q8_0(&[&wb], &refs, &mut b);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&both[..n]), bits(&a));
            assert_eq!(bits(&both[n..]), bits(&b));
        }
    }

    #[test]
    fn several_tokens_give_bit_identical_results_to_one() {
        if !crate::isa::Isa::Avx2.available() {
            return;
        }
        let w4 = blocks(3, 9, Q4_0_BYTES, false);
        let w8 = blocks(4, 9, Q8_0_BYTES, false);
        let xs: Vec<Vec<u8>> = (0..4)
            .map(|t| blocks(10 + t, 9, Q8_0_BYTES, false))
            .collect();
        for n in 1..=4 {
            let refs: Vec<&[u8]> = xs[..n].iter().map(Vec::as_slice).collect();
            let (mut many4, mut many8) = (vec![0.0; n], vec![0.0; n]);
            // SAFETY: AVX2 was detected above.
            unsafe {
                dot_q4_0_q8_0(&[&w4], &refs, &mut many4);
                dot_q8_0_q8_0(&[&w8], &refs, &mut many8);
            }
            for t in 0..n {
                let (mut one4, mut one8) = ([0.0], [0.0]);
                // SAFETY: as above.
                unsafe {
                    dot_q4_0_q8_0(&[&w4], &[refs[t]], &mut one4);
                    dot_q8_0_q8_0(&[&w8], &[refs[t]], &mut one8);
                }
                assert_eq!(many4[t].to_bits(), one4[0].to_bits());
                assert_eq!(many8[t].to_bits(), one8[0].to_bits());
            }
        }
    }

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
                let (mut a, mut b) = ([0.0f32], [0.0f32]);
                unsafe {
                    dot_q4_0_q8_0(&[&w4], &[&x], &mut a);
                    dot_q8_0_q8_0(&[&w8], &[&x], &mut b);
                }
                let (a, b) = (a[0], b[0]);
                let (ra, rb) = (scalar_q4(&w4, &x), scalar_q8(&w8, &x));
                let tol = |r: f32| 1e-5 * r.abs().max(1.0) * n as f32;
                assert!((a - ra).abs() <= tol(ra), "q4_0 n={n}: {a} vs {ra}");
                assert!((b - rb).abs() <= tol(rb), "q8_0 n={n}: {b} vs {rb}");
            }
        }
    }
}
