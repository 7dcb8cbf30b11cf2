//! Element-wise and small operations of the forward pass, written to follow
//! ggml's CPU arithmetic where it matters for agreement with llama.cpp
//! (f64 sums in RMSNorm, iterative f32 RoPE angles). SwiGLU and softmax
//! live in `lfm_kernels::act` (SIMD, with ggml's vector `exp`).

/// `x / sqrt(mean(x^2) + eps) * w`, row by row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum: f64 = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// In-place RMSNorm of each `w.len()`-sized chunk (per-head q/k norms).
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for xr in x.chunks_exact_mut(n) {
        let sum: f64 = xr.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let mean = (sum / n as f64) as f32;
        let scale = 1.0 / (mean + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v * scale * g;
        }
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// NEOX-style rotary embedding of one head (`x.len()` = head_dim): element i
/// pairs with i + head_dim/2. Angles advance by repeated f32 multiplication,
/// as ggml computes them.
pub fn rope_neox(x: &mut [f32], pos: usize, freq_base: f32) {
    let n = x.len();
    let half = n / 2;
    let theta_scale = freq_base.powf(-2.0 / n as f32);
    let mut theta = pos as f32;
    for i in 0..half {
        let (s, c) = theta.sin_cos();
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
        theta *= theta_scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_gives_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 5.0];
        let mut y = [0.0; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut y);
        let rms = (y.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
        assert!((y[1] / y[0] + 4.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let mut x: Vec<f32> = (0..64).map(|i| i as f32 * 0.1 - 3.0).collect();
        let orig = x.clone();
        rope_neox(&mut x, 0, 1e6);
        assert_eq!(x, orig);
        rope_neox(&mut x, 1234, 1e6);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() / n0 < 1e-5);
        // The first pair rotates by exactly `pos` radians.
        let (s, c) = 1234f32.sin_cos();
        assert!((x[0] - (orig[0] * c - orig[32] * s)).abs() < 1e-4);
    }
}
