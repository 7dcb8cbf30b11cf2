//! NEON dot products of Q4_0 / Q8_0 weight rows with Q8_0 activation rows.
//! Each block's integer sum is exact and the blocks are added in order with
//! the scalar reference's float operations, so results are bit-identical to
//! `scalar::vec_dot` (and therefore batch-invariant).

use std::arch::aarch64::*;

const Q4_0_BYTES: usize = 18;
const Q8_0_BYTES: usize = 34;

#[inline]
fn f16_at(p: &[u8]) -> f32 {
    half::f16::from_le_bytes([p[0], p[1]]).to_f32()
}

/// Sum of the four widening products of two pairs of 16-lane i8 vectors.
#[inline]
#[target_feature(enable = "neon")]
fn sum_products(a0: int8x16_t, b0: int8x16_t, a1: int8x16_t, b1: int8x16_t) -> i32 {
    let mut acc = vpaddlq_s16(vmull_s8(vget_low_s8(a0), vget_low_s8(b0)));
    acc = vpadalq_s16(acc, vmull_high_s8(a0, b0));
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a1), vget_low_s8(b1)));
    acc = vpadalq_s16(acc, vmull_high_s8(a1, b1));
    vaddvq_s32(acc)
}

#[inline]
#[target_feature(enable = "neon")]
fn load16(p: &[u8], at: usize) -> int8x16_t {
    assert!(at + 16 <= p.len());
    // SAFETY: bounds checked just above; NEON loads need no alignment.
    unsafe { vld1q_s8(p.as_ptr().add(at).cast()) }
}

#[inline]
#[target_feature(enable = "neon")]
fn row_q4_0(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / Q4_0_BYTES;
    assert!(
        x.len() >= nb * Q8_0_BYTES,
        "activation row shorter than the weight row"
    );
    let mut sum = 0.0f32;
    for i in 0..nb {
        let wb = &w[i * Q4_0_BYTES..(i + 1) * Q4_0_BYTES];
        let xb = &x[i * Q8_0_BYTES..(i + 1) * Q8_0_BYTES];
        let qs = vreinterpretq_u8_s8(load16(wb, 2));
        let lo = vsubq_s8(
            vreinterpretq_s8_u8(vandq_u8(qs, vdupq_n_u8(0x0f))),
            vdupq_n_s8(8),
        );
        let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(qs)), vdupq_n_s8(8));
        let sumi = sum_products(lo, load16(xb, 2), hi, load16(xb, 18));
        sum += sumi as f32 * f16_at(wb) * f16_at(xb);
    }
    sum
}

#[inline]
#[target_feature(enable = "neon")]
fn row_q8_0(w: &[u8], x: &[u8]) -> f32 {
    let nb = w.len() / Q8_0_BYTES;
    assert!(
        x.len() >= nb * Q8_0_BYTES,
        "activation row shorter than the weight row"
    );
    let mut sum = 0.0f32;
    for i in 0..nb {
        let wb = &w[i * Q8_0_BYTES..(i + 1) * Q8_0_BYTES];
        let xb = &x[i * Q8_0_BYTES..(i + 1) * Q8_0_BYTES];
        let sumi = sum_products(load16(wb, 2), load16(xb, 2), load16(wb, 18), load16(xb, 18));
        // ggml groups the scales first for Q8_0 (and not for Q4_0).
        sum += sumi as f32 * (f16_at(wb) * f16_at(xb));
    }
    sum
}

/// Dots of Q4_0 weight rows with Q8_0 activation rows; `out[r * xs.len() + t]`.
///
/// # Safety
/// The CPU must support NEON; every activation row must hold as many blocks
/// as each weight row; `out.len() >= ws.len() * xs.len()`.
#[target_feature(enable = "neon")]
pub unsafe fn dot_q4_0_q8_0(ws: &[&[u8]], xs: &[&[u8]], out: &mut [f32]) {
    for (r, w) in ws.iter().enumerate() {
        for (t, x) in xs.iter().enumerate() {
            out[r * xs.len() + t] = row_q4_0(w, x);
        }
    }
}

/// Dots of Q8_0 weight rows with Q8_0 activation rows, as [`dot_q4_0_q8_0`].
///
/// # Safety
/// As for [`dot_q4_0_q8_0`].
#[target_feature(enable = "neon")]
pub unsafe fn dot_q8_0_q8_0(ws: &[&[u8]], xs: &[&[u8]], out: &mut [f32]) {
    for (r, w) in ws.iter().enumerate() {
        for (t, x) in xs.iter().enumerate() {
            out[r * xs.len() + t] = row_q8_0(w, x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar;
    use crate::types::{ActType, WeightType};

    #[test]
    fn bit_identical_to_the_scalar_reference() {
        if !crate::isa::Isa::Neon.available() {
            return;
        }
        let mut s = 99u64;
        let mut rnd = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for blocks in [1, 3, 64] {
            let n = 32 * blocks;
            let x: Vec<f32> = (0..n).map(|_| rnd() * 4.0).collect();
            let mut xq = vec![0u8; ActType::Q8_0.row_bytes(n)];
            scalar::quantize_acts(ActType::Q8_0, &x, &mut xq);
            for (ty, f) in [
                (
                    WeightType::Q4_0,
                    dot_q4_0_q8_0 as unsafe fn(&[&[u8]], &[&[u8]], &mut [f32]),
                ),
                (WeightType::Q8_0, dot_q8_0_q8_0),
            ] {
                let w: Vec<f32> = (0..n).map(|_| rnd()).collect();
                let mut wq = vec![0u8; ty.row_bytes(n)];
                scalar::quantize_row(ty, &w, &mut wq);
                let mut got = [0.0f32];
                // SAFETY: NEON was detected above.
                unsafe { f(&[&wq], &[&xq], &mut got) };
                assert_eq!(
                    got[0].to_bits(),
                    scalar::vec_dot(ty, &wq, &xq, n).to_bits(),
                    "{ty:?} n={n}"
                );
            }
        }
    }
}
