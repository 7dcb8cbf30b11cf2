//! Vector pieces of attention over an f16 KV cache: `q . k` and
//! `out += s * v` with f16 `k`/`v`, scalar and AVX2 (F16C converts eight
//! halves per instruction). The summation order is fixed per ISA, so a
//! sequence's attention does not depend on its batch.

use crate::isa::Isa;
use half::f16;

/// `q . k` for a head.
pub type DotF16 = fn(&[f32], &[f16]) -> f32;
/// `out += s * v` for a head.
pub type AxpyF16 = fn(f32, &[f16], &mut [f32]);

fn dot_scalar(q: &[f32], k: &[f16]) -> f32 {
    assert_eq!(q.len(), k.len(), "head sizes differ");
    q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum()
}

fn axpy_scalar(s: f32, v: &[f16], out: &mut [f32]) {
    assert_eq!(v.len(), out.len(), "head sizes differ");
    for (o, x) in out.iter_mut().zip(v) {
        *o += s * x.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2(q: &[f32], k: &[f16]) -> f32 {
    assert!(
        q.len() == k.len() && q.len().is_multiple_of(8),
        "head sizes differ or are not a multiple of 8"
    );
    // SAFETY: handed out by `attention_fns` only when AVX2/FMA/F16C are
    // present; lengths checked just above.
    unsafe { x86::dot_f16(q, k) }
}

#[cfg(target_arch = "x86_64")]
fn axpy_avx2(s: f32, v: &[f16], out: &mut [f32]) {
    assert!(
        v.len() == out.len() && v.len().is_multiple_of(8),
        "head sizes differ or are not a multiple of 8"
    );
    // SAFETY: as above.
    unsafe { x86::axpy_f16(s, v, out) }
}

/// The attention pieces for `isa` and a head size (SIMD needs multiples of 8).
pub fn attention_fns(isa: Isa, head_dim: usize) -> (DotF16, AxpyF16) {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && isa.available() && head_dim.is_multiple_of(8) {
        return (dot_avx2, axpy_avx2);
    }
    let _ = (isa, head_dim);
    (dot_scalar, axpy_scalar)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2, FMA and F16C must be present; `q.len() == k.len()`, a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(q: &[f32], k: &[f16]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for i in (0..q.len()).step_by(8) {
            // SAFETY: i + 8 <= len for both slices (multiple of 8, equal lengths).
            let (a, b) = unsafe {
                (
                    _mm256_loadu_ps(q.as_ptr().add(i)),
                    _mm_loadu_si128(k.as_ptr().add(i).cast()),
                )
            };
            acc = _mm256_fmadd_ps(a, _mm256_cvtph_ps(b), acc);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// # Safety
    /// As for [`dot_f16`], with `v.len() == out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(s: f32, v: &[f16], out: &mut [f32]) {
        let sv = _mm256_set1_ps(s);
        for i in (0..v.len()).step_by(8) {
            // SAFETY: i + 8 <= len for both slices.
            unsafe {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i).cast()));
                let o = _mm256_loadu_ps(out.as_ptr().add(i));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_fmadd_ps(sv, x, o));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_isa_matches_the_scalar_loop() {
        for len in [8, 64, 72] {
            let q: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let k: Vec<f16> = (0..len)
                .map(|i| f16::from_f32((i as f32 * 0.11).cos() * 3.0))
                .collect();
            let want: f32 = q.iter().zip(&k).map(|(a, b)| a * b.to_f32()).sum();
            for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                let (dot_f16, axpy_f16) = attention_fns(isa, len);
                let got = dot_f16(&q, &k);
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{isa} {len}: {got} vs {want}"
                );
                let mut out: Vec<f32> = (0..len).map(|i| i as f32).collect();
                axpy_f16(0.5, &k, &mut out);
                for (i, o) in out.iter().enumerate() {
                    assert!(
                        (o - (i as f32 + 0.5 * k[i].to_f32())).abs() < 1e-5,
                        "{isa} axpy {i}"
                    );
                }
            }
        }
    }
}
