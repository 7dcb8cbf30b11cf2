//! The scale searches behind ggml's k-quant reference quantizers.
//!
//! Every float operation here is in the order ggml performs it (ggml's
//! quantizers are built without FMA contraction), so the chosen integer
//! levels and scales, and hence the stored bytes, are identical.

/// Below this magnitude a group counts as all zero.
pub(super) const GROUP_MAX_EPS: f32 = 1e-15;

/// Rounds to the nearest integer, ties to even, by ggml's trick of adding
/// 1.5 * 2^23 and reading the mantissa. Meaningful for |v| < 2^22; larger
/// inputs give the same (meaningless) result as ggml.
#[inline]
pub(super) fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// Symmetric levels `l` in `[-nmax, nmax - 1]` (stored as `l + nmax` in
/// `levels`) and the scale minimizing the error weighted by `x²`, trying 18
/// perturbations of the plain `-nmax / max` scale (ggml's `make_qx_quants`
/// with `rmse_type = 1` and no importance weights). Returns the scale.
pub(super) fn symmetric_levels_x2_weighted(nmax: i32, x: &[f32], levels: &mut [i8]) -> f32 {
    let max = super::legacy::signed_absmax(x);
    let amax = max.abs();
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let clamp = |l: i32| l.clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let mut sum_lx = 0.0f32;
    let mut sum_l2 = 0.0f32;
    for (&v, level) in x.iter().zip(levels.iter_mut()) {
        let l = clamp(nearest_int(iscale * v));
        *level = (l + nmax) as i8;
        let w = v * v;
        let lf = l as f32;
        sum_lx += w * v * lf;
        sum_l2 += w * lf * lf;
    }
    let mut scale = if sum_l2 != 0.0 { sum_lx / sum_l2 } else { 0.0 };
    let mut best = scale * sum_lx;
    for step in (-9..=9).filter(|&s| s != 0) {
        iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        sum_lx = 0.0;
        sum_l2 = 0.0;
        for &v in x {
            let lf = clamp(nearest_int(iscale * v)) as f32;
            let w = v * v;
            sum_lx += w * v * lf;
            sum_l2 += w * lf * lf;
        }
        if sum_l2 > 0.0 && sum_lx * sum_lx > best * sum_l2 {
            for (&v, level) in x.iter().zip(levels.iter_mut()) {
                *level = (clamp(nearest_int(iscale * v)) + nmax) as i8;
            }
            scale = sum_lx / sum_l2;
            best = scale * sum_lx;
        }
    }
    scale
}

/// Asymmetric levels in `[0, nmax]` with a scale and a non-positive offset,
/// `x ≈ scale * l + offset`, found by refitting both by weighted least
/// squares for `nstep + 1` candidate inverse scales (ggml's
/// `make_qkx2_quants` with squared error). Returns `(scale, -offset)`.
pub(super) fn affine_levels(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        // C's `if (v < min) min = v;` (not f32::min, which treats NaN differently).
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let clamp = |l: i32| l.clamp(0, nmax);
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = clamp(nearest_int(iscale * (x[i] - min)));
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut trial = [0u8; 32];
    let trial = &mut trial[..n];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax as f32) / (max - min);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for i in 0..n {
            let l = clamp(nearest_int(iscale * (x[i] - min)));
            trial[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * trial[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels.copy_from_slice(trial);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.5, -2),
            (0.49999997, 0),
            (3.7, 4),
            (-3.7, -4),
            (127.0, 127),
            (-128.0, -128),
        ];
        for (v, want) in cases {
            assert_eq!(nearest_int(v), want, "{v}");
        }
    }

    #[test]
    fn affine_levels_constant_group_is_all_zero_levels() {
        let x = [2.0f32; 32];
        let w = [1.0f32; 32];
        let mut l = [7u8; 32];
        // min is clamped to 0, so max != min and the group is representable.
        let (scale, neg_min) = affine_levels(15, &x, &w, &mut l, -1.0, 0.1, 20);
        assert!((scale * l[0] as f32 - neg_min - 2.0).abs() < 1e-6);
        let x = [-3.0f32; 32];
        let (scale, neg_min) = affine_levels(15, &x, &w, &mut l, -1.0, 0.1, 20);
        assert_eq!((scale, neg_min), (0.0, 3.0));
        assert!(l.iter().all(|&v| v == 0));
    }
}
