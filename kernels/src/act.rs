//! Element-wise activations: the SwiGLU step of every FFN (`g = silu(g) *
//! u`) and the softmax of attention scores, with `exp` computed as ggml's
//! AVX2 and NEON code computes it (`ggml_v_expf`, after Arm's optimized
//! routines: at most 1.45 ulp plus rounding), so llama.cpp's AVX2 and NEON
//! builds and ours agree on SwiGLU bit for bit (and on the softmax of its
//! `soft_max` op), and the float steps cost a few instructions per 8
//! elements instead of a libm call each.
//!
//! [`exp`] is the definition, one lane written in plain Rust (every fused
//! step a `mul_add`); the AVX2 and NEON paths reproduce it exactly, and the
//! softmax's sum adds each 8 values in the same tree on every path.

use crate::isa::Isa;

/// `g = silu(g) * u` over the shorter of the two.
pub type SwigluFn = fn(g: &mut [f32], u: &[f32]);
/// `x = exp(x - max) / sum` in place, the sum taken in f64.
pub type SoftmaxFn = fn(x: &mut [f32]);

/// The activations for one ISA.
#[derive(Clone, Copy)]
pub struct ActFns {
    pub swiglu: SwigluFn,
    pub softmax: SoftmaxFn,
}

/// The activation functions for `isa` (scalar where it has no SIMD path).
pub fn act_fns(isa: Isa) -> ActFns {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && isa.available() {
        return ActFns {
            swiglu: x86::swiglu_avx2,
            softmax: x86::softmax_avx2,
        };
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon && isa.available() {
        return ActFns {
            swiglu: arm::swiglu_neon,
            softmax: arm::softmax_neon,
        };
    }
    let _ = isa;
    ActFns {
        swiglu: swiglu_scalar,
        softmax: softmax_scalar,
    }
}

// The polynomial's constants (ggml_v_expf's, after Arm's expf).
const SHIFT: f32 = 12_582_912.0; // 0x1.8p23
const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // 0x1.715476p+0
const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // 0x1.62e4p-1
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // 0x1.7f7d1cp-20
const C1: f32 = f32::from_bits(0x3f7f_fff6); // 0x1.ffffecp-1
const C2: f32 = f32::from_bits(0x3eff_fedb); // 0x1.fffdb6p-2
const C3: f32 = f32::from_bits(0x3e2a_af33); // 0x1.555e66p-3
const C4: f32 = f32::from_bits(0x3d2b_9f17); // 0x1.573e2ep-5
const C5: f32 = f32::from_bits(0x3c07_2010); // 0x1.0e4020p-7

/// `e^x`: `x = n ln2 + b` with `n` rounded by the shift trick, a degree-5
/// polynomial in `b`, and `2^n` built in the exponent bits; when `|n| > 126`
/// the scale is split in two factors so results near the range's ends are
/// still right (overflow to infinity above ~88.38, zero below ~-103.97).
pub fn exp(x: f32) -> f32 {
    let z = x.mul_add(LOG2E, SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let u = b * b;
    let j = C5
        .mul_add(b, C4)
        .mul_add(u, C3.mul_add(b, C2))
        .mul_add(u, C1 * b);
    if n.abs() <= 126.0 || n.is_nan() {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// `x / (1 + e^-x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(0.0 - x))
}

fn swiglu_scalar(g: &mut [f32], u: &[f32]) {
    for (a, &b) in g.iter_mut().zip(u) {
        *a = silu(*a) * b;
    }
}

/// The SwiGLU every SIMD path runs: `block` does `W` elements of `g` with
/// the same of `u`, [`swiglu_scalar`] the rest.
#[inline(always)]
fn swiglu_by<const W: usize>(g: &mut [f32], u: &[f32], block: impl Fn(&mut [f32], &[f32])) {
    let n = g.len().min(u.len());
    let mut gs = g[..n].chunks_exact_mut(W);
    let mut us = u[..n].chunks_exact(W);
    for (gb, ub) in (&mut gs).zip(&mut us) {
        block(gb, ub);
    }
    swiglu_scalar(gs.into_remainder(), us.remainder());
}

/// Eight values summed as the SIMD paths do: halves, pairs, then the last
/// two (`((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7))`).
fn sum8(v: &[f32]) -> f32 {
    let h: [f32; 4] = std::array::from_fn(|i| v[i] + v[i + 4]);
    (h[0] + h[2]) + (h[1] + h[3])
}

/// The softmax every path runs: `block` turns 8 scores into `exp(v - max)`
/// in place and returns their [`sum8`]; the sum of the blocks and of the
/// rest (one by one) is taken in f64, as ggml's `ggml_vec_soft_max_f32`.
#[inline(always)]
fn softmax_by(x: &mut [f32], block: impl Fn(&mut [f32], f32) -> f32) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    let mut blocks = x.chunks_exact_mut(8);
    for b in &mut blocks {
        sum += f64::from(block(b, max));
    }
    for v in blocks.into_remainder() {
        *v = exp(*v - max);
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

fn softmax_scalar(x: &mut [f32]) {
    softmax_by(x, |b, max| {
        b.iter_mut().for_each(|v| *v = exp(*v - max));
        sum8(b)
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`exp`] of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let set = _mm256_set1_ps;
        let z = _mm256_fmadd_ps(x, set(LOG2E), set(SHIFT));
        let n = _mm256_sub_ps(z, set(SHIFT));
        let b = _mm256_fnmadd_ps(n, set(LN2_LO), _mm256_fnmadd_ps(n, set(LN2_HI), x));
        let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
        let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_castps_si256(set(1.0))));
        let abs_n = _mm256_andnot_ps(set(-0.0), n);
        let c = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, set(126.0));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(set(C5), b, set(C4)),
                u,
                _mm256_fmadd_ps(set(C3), b, set(C2)),
            ),
            u,
            _mm256_mul_ps(set(C1), b),
        );
        let plain = _mm256_fmadd_ps(j, k, k);
        if _mm256_movemask_ps(c) == 0 {
            return plain;
        }
        let g = _mm256_and_si256(
            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
            _mm256_set1_epi32(0x8200_0000u32 as i32),
        );
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let d = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, set(192.0));
        let scaled = _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1);
        _mm256_blendv_ps(_mm256_blendv_ps(plain, scaled, c), _mm256_mul_ps(s1, s1), d)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    pub(super) fn swiglu_avx2(g: &mut [f32], u: &[f32]) {
        // SAFETY: handed out by `act_fns` only when AVX2/FMA are present.
        unsafe { swiglu(g, u) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn swiglu(g: &mut [f32], u: &[f32]) {
        swiglu_by::<8>(g, u, |gb, ub| {
            // SAFETY: both chunks hold 8 floats; unaligned loads and store.
            // The closure runs inside this AVX2/FMA function (inherited).
            unsafe {
                let x = _mm256_loadu_ps(gb.as_ptr());
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                let y = _mm256_mul_ps(s, _mm256_loadu_ps(ub.as_ptr()));
                _mm256_storeu_ps(gb.as_mut_ptr(), y);
            }
        });
    }

    pub(super) fn softmax_avx2(x: &mut [f32]) {
        // SAFETY: handed out by `act_fns` only when AVX2/FMA are present.
        unsafe { softmax(x) }
    }

    #[target_feature(enable = "avx2,fma")]
    fn softmax(x: &mut [f32]) {
        softmax_by(x, |b, max| {
            // SAFETY: blocks hold 8 floats; unaligned load and store. The
            // closure runs inside this AVX2/FMA function (inherited).
            unsafe {
                let v = exp8(_mm256_sub_ps(
                    _mm256_loadu_ps(b.as_ptr()),
                    _mm256_set1_ps(max),
                ));
                _mm256_storeu_ps(b.as_mut_ptr(), v);
                hsum8(v)
            }
        });
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::*;
    use std::arch::aarch64::*;

    /// [`exp`] of four lanes.
    #[inline]
    #[target_feature(enable = "neon")]
    fn exp4(x: float32x4_t) -> float32x4_t {
        let set = vdupq_n_f32;
        let z = vfmaq_f32(set(SHIFT), x, set(LOG2E));
        let n = vsubq_f32(z, set(SHIFT));
        let b = vfmsq_f32(vfmsq_f32(x, n, set(LN2_HI)), n, set(LN2_LO));
        let e = vshlq_n_u32::<23>(vreinterpretq_u32_f32(z));
        let k = vreinterpretq_f32_u32(vaddq_u32(e, vreinterpretq_u32_f32(set(1.0))));
        let c = vcagtq_f32(n, set(126.0));
        let u = vmulq_f32(b, b);
        let j = vfmaq_f32(
            vmulq_f32(set(C1), b),
            vfmaq_f32(
                vfmaq_f32(set(C2), set(C3), b),
                vfmaq_f32(set(C4), set(C5), b),
                u,
            ),
            u,
        );
        let plain = vfmaq_f32(k, j, k);
        if vmaxvq_u32(c) == 0 {
            return plain;
        }
        let g = vandq_u32(vclezq_f32(n), vdupq_n_u32(0x8200_0000));
        let s1 = vreinterpretq_f32_u32(vaddq_u32(g, vdupq_n_u32(0x7f00_0000)));
        let s2 = vreinterpretq_f32_u32(vsubq_u32(e, g));
        let scaled = vmulq_f32(vfmaq_f32(s2, s2, j), s1);
        vbslq_f32(
            vcagtq_f32(n, set(192.0)),
            vmulq_f32(s1, s1),
            vbslq_f32(c, scaled, plain),
        )
    }

    pub(super) fn swiglu_neon(g: &mut [f32], u: &[f32]) {
        // SAFETY: handed out by `act_fns` only when NEON is present.
        unsafe { swiglu(g, u) }
    }

    #[target_feature(enable = "neon")]
    fn swiglu(g: &mut [f32], u: &[f32]) {
        swiglu_by::<4>(g, u, |gb, ub| {
            // SAFETY: both chunks hold 4 floats.
            unsafe {
                let x = vld1q_f32(gb.as_ptr());
                let e = exp4(vsubq_f32(vdupq_n_f32(0.0), x));
                let s = vdivq_f32(x, vaddq_f32(vdupq_n_f32(1.0), e));
                vst1q_f32(gb.as_mut_ptr(), vmulq_f32(s, vld1q_f32(ub.as_ptr())));
            }
        });
    }

    pub(super) fn softmax_neon(x: &mut [f32]) {
        // SAFETY: handed out by `act_fns` only when NEON is present.
        unsafe { softmax(x) }
    }

    #[target_feature(enable = "neon")]
    fn softmax(x: &mut [f32]) {
        softmax_by(x, |b, max| {
            // SAFETY: blocks hold 8 floats: two registers.
            unsafe {
                let m = vdupq_n_f32(max);
                let lo = exp4(vsubq_f32(vld1q_f32(b.as_ptr()), m));
                let hi = exp4(vsubq_f32(vld1q_f32(b.as_ptr().add(4)), m));
                vst1q_f32(b.as_mut_ptr(), lo);
                vst1q_f32(b.as_mut_ptr().add(4), hi);
                // `sum8`'s tree: halves, pairs (0+2, 1+3), the last two.
                let h = vaddq_f32(lo, hi);
                let p = vadd_f32(vget_low_f32(h), vget_high_f32(h));
                vget_lane_f32::<0>(p) + vget_lane_f32::<1>(p)
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs across exp's whole range: ordinary, near the scale split
    /// (|n| about 126 and 192), past overflow and underflow, signed zeros,
    /// infinities and NaN.
    fn inputs() -> Vec<f32> {
        let mut v: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.057).collect();
        for edge in [
            87.0, 87.3, 88.0, 88.37, 88.38, 88.5, 89.0, 100.0, -87.0, -87.4, -88.0, -100.0, -103.0,
            -103.9, -104.0, -110.0, -133.0, -140.0, 133.0, 140.0, 200.0, -200.0, 0.0, -0.0, 1e-30,
            -1e-30, 1e30, -1e30,
        ] {
            v.push(edge);
        }
        v.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
        v
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        for x in inputs() {
            let (got, want) = (exp(x), x.exp());
            if want.is_nan() {
                assert!(got.is_nan(), "exp({x}) = {got}");
            } else if want.is_infinite() || want == 0.0 {
                assert_eq!(got, want, "exp({x})");
            } else if want < f32::MIN_POSITIVE {
                // Subnormal results: an absolute bound.
                assert!((got - want).abs() <= 2.0 * f32::from_bits(1), "exp({x})");
            } else {
                let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulps <= 2, "exp({x}) = {got}, libm {want}: {ulps} ulp");
            }
        }
    }

    #[test]
    fn every_isa_matches_the_scalar_definition_bit_for_bit() {
        let xs = inputs();
        let us: Vec<f32> = (0..xs.len())
            .map(|i| (i % 13) as f32 * 0.25 - 1.5)
            .collect();
        let mut want = xs.clone();
        swiglu_scalar(&mut want, &us);
        for (i, (&x, &w)) in xs.iter().zip(&want).enumerate() {
            let plain = x / (1.0 + (-x).exp()) * us[i];
            if plain.is_finite() && plain.abs() > 1e-30 {
                assert!((w - plain).abs() <= 1e-6 * plain.abs(), "silu({x})");
            }
        }
        // Softmax rows of several lengths (tails of 0-7), scores in a
        // realistic range.
        let rows: Vec<Vec<f32>> = [1, 7, 8, 9, 31, 64, 1000]
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|i| ((i * 37) % 101) as f32 * 0.3 - 15.0)
                    .collect()
            })
            .collect();
        for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
            let f = act_fns(isa);
            // Every length's tail: the SIMD body and the scalar rest.
            for len in [0, 1, 7, 8, 9, 15, 16, 17, xs.len()] {
                let mut g = xs[..len].to_vec();
                (f.swiglu)(&mut g, &us[..len]);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&g), bits(&want[..len]), "{isa} swiglu, {len}");
            }
            for row in &rows {
                let (mut a, mut b) = (row.clone(), row.clone());
                softmax_scalar(&mut a);
                (f.softmax)(&mut b);
                assert_eq!(a, b, "{isa} softmax of {}", row.len());
                let total: f64 = a.iter().map(|&v| f64::from(v)).sum();
                assert!((total - 1.0).abs() < 1e-5, "sums to {total}");
                let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let i = row.iter().position(|&v| v == top).unwrap();
                assert!(a.iter().all(|&v| v <= a[i]), "the largest score wins");
            }
        }
    }

    #[test]
    fn softmax_of_huge_scores_is_stable() {
        let mut x = [1000.0f32, 1001.0, 999.0];
        (act_fns(Isa::detect()).softmax)(&mut x);
        let e = [(-1.0f64).exp(), 1.0, (-2.0f64).exp()];
        let s: f64 = e.iter().sum();
        for (a, b) in x.iter().zip(e) {
            assert!((f64::from(*a) - b / s).abs() < 1e-6);
        }
    }
}
