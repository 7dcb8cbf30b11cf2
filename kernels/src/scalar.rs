//! The scalar reference: plain loops that every SIMD variant is tested
//! against. Quantizers follow ggml's `quantize_row_*_ref` exactly, so files we
//! write hold the same bytes llama.cpp's tools would write.

use crate::blocks::{BlockQ4_0, BlockQ8_0, QK};
use half::f16;

/// Quantizes `x` (length a multiple of 32) to Q8_0 blocks.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "q8_0: input length must be 32 x blocks"
    );
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = f16::from_f32(d);
        for (q, v) in y.qs.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
        }
    }
}

/// Quantizes `x` (length a multiple of 32) to Q4_0 blocks.
pub fn quantize_row_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "q4_0: input length must be 32 x blocks"
    );
    for (xb, y) in x.chunks_exact(QK).zip(out.iter_mut()) {
        // The value of largest magnitude maps to -8 exactly (ggml's choice).
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y.d = f16::from_f32(d);
        for j in 0..QK / 2 {
            let q0 = ((xb[j] * id + 8.5) as i8).min(15) as u8;
            let q1 = ((xb[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            y.qs[j] = q0 | (q1 << 4);
        }
    }
}

/// Expands Q8_0 blocks to f32.
pub fn dequantize_row_q8_0(x: &[BlockQ8_0], out: &mut [f32]) {
    assert_eq!(out.len(), x.len() * QK);
    for (b, o) in x.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (v, q) in o.iter_mut().zip(b.qs) {
            *v = d * f32::from(q);
        }
    }
}

/// Expands Q4_0 blocks to f32.
pub fn dequantize_row_q4_0(x: &[BlockQ4_0], out: &mut [f32]) {
    assert_eq!(out.len(), x.len() * QK);
    for (b, o) in x.iter().zip(out.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for j in 0..QK / 2 {
            o[j] = d * (i32::from(b.qs[j] & 0x0f) - 8) as f32;
            o[j + QK / 2] = d * (i32::from(b.qs[j] >> 4) - 8) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
            .collect()
    }

    #[test]
    fn q8_0_round_trip_is_within_half_a_step() {
        let x = ramp(96);
        let mut q = vec![
            BlockQ8_0 {
                d: f16::ZERO,
                qs: [0; QK]
            };
            3
        ];
        quantize_row_q8_0(&x, &mut q);
        let mut y = vec![0.0; 96];
        dequantize_row_q8_0(&q, &mut y);
        for (b, (xs, ys)) in q.iter().zip(x.chunks(QK).zip(y.chunks(QK))) {
            let step = b.d.to_f32();
            for (a, c) in xs.iter().zip(ys) {
                assert!(
                    (a - c).abs() <= step * 0.5 + 1e-3 * step.max(1e-6),
                    "{a} vs {c}"
                );
            }
        }
    }

    #[test]
    fn q4_0_maps_largest_magnitude_to_minus_eight() {
        let mut x = ramp(32);
        x[5] = -9.0;
        let mut q = [BlockQ4_0 {
            d: f16::ZERO,
            qs: [0; QK / 2],
        }];
        quantize_row_q4_0(&x, &mut q);
        assert_eq!(
            q[0].qs[5] & 0x0f,
            0,
            "largest magnitude must quantize to code 0 (= -8)"
        );
        let mut y = vec![0.0; 32];
        dequantize_row_q4_0(&q, &mut y);
        let step = q[0].d.to_f32().abs();
        assert!((y[5] + 9.0).abs() < 0.01);
        for (a, c) in x.iter().zip(&y) {
            assert!(
                (a - c).abs() <= step * 0.5 + 1e-4,
                "{a} vs {c} (step {step})"
            );
        }
    }

    #[test]
    fn all_zero_blocks_stay_zero() {
        let x = vec![0.0f32; 32];
        let mut q = [BlockQ4_0 {
            d: f16::ONE,
            qs: [0xff; QK / 2],
        }];
        quantize_row_q4_0(&x, &mut q);
        let mut y = vec![1.0; 32];
        dequantize_row_q4_0(&q, &mut y);
        assert!(y.iter().all(|&v| v == 0.0));
    }
}
