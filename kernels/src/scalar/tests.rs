//! Unit tests of the scalar reference: hand-built golden blocks (which catch
//! layout bugs self-consistency cannot), round-trip error bounds, extremes and
//! the dot-product contract, over every type.

use super::*;
use half::f16;
use proptest::prelude::*;

fn quantize(ty: WeightType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len())];
    quantize_row(ty, x, &mut out);
    out
}

fn dequantize(ty: WeightType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    dequantize_row(ty, bytes, &mut out);
    out
}

fn acts(ty: ActType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len())];
    quantize_acts(ty, x, &mut out);
    out
}

/// Deterministic values in [-1, 1) with some spread of magnitudes.
fn ramp(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / 8_388_608.0 - 1.0
        })
        .collect()
}

fn h(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

// ---------------------------------------------------------------- goldens

/// Builds a block from (offset, bytes) patches over zeros.
fn block(len: usize, patches: &[(usize, &[u8])]) -> Vec<u8> {
    let mut b = vec![0u8; len];
    for (at, bytes) in patches {
        b[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    b
}

#[test]
fn golden_q4_0() {
    // d = 0.5; byte 0 = 0x31: element 0 is code 1, element 16 code 3.
    let b = block(18, &[(0, &h(0.5)), (2, &[0x31]), (17, &[0xf0])]);
    let y = dequantize(WeightType::Q4_0, &b, 32);
    assert_eq!((y[0], y[16]), (-3.5, -2.5));
    assert_eq!((y[15], y[31]), (-4.0, 3.5));
    assert_eq!(y[1], -4.0, "code 0 is -8 steps");
}

#[test]
fn golden_q4_1() {
    let b = block(20, &[(0, &h(0.25)), (2, &h(-1.0)), (4 + 2, &[0x5a])]);
    let y = dequantize(WeightType::Q4_1, &b, 32);
    assert_eq!((y[2], y[18]), (1.5, 0.25));
    assert_eq!(y[0], -1.0, "code 0 is the minimum");
}

#[test]
fn golden_q5_0() {
    // Fifth bits for elements 3 and 20 (bits 3 and 20 of the LE qh word).
    let qh = ((1u32 << 3) | (1 << 20)).to_le_bytes();
    let b = block(
        22,
        &[(0, &h(1.0)), (2, &qh), (6 + 3, &[0x02]), (6 + 4, &[0x21])],
    );
    let y = dequantize(WeightType::Q5_0, &b, 32);
    assert_eq!((y[3], y[19]), (2.0, -16.0));
    assert_eq!((y[4], y[20]), (-15.0, 2.0));
}

#[test]
fn golden_q5_1() {
    let qh = (1u32 << 31).to_le_bytes();
    let b = block(
        24,
        &[(0, &h(0.5)), (2, &h(2.0)), (4, &qh), (8 + 15, &[0xf7])],
    );
    let y = dequantize(WeightType::Q5_1, &b, 32);
    assert_eq!((y[15], y[31]), (5.5, 17.5));
}

#[test]
fn golden_q8_0() {
    let b = block(34, &[(0, &h(0.125)), (2 + 5, &[0x80]), (2 + 31, &[0x7f])]);
    let y = dequantize(WeightType::Q8_0, &b, 32);
    assert_eq!((y[5], y[31], y[0]), (-16.0, 15.875, 0.0));
}

/// Packed scales with sub-block 0 = (scale 3, min 2) and sub-block 5 =
/// (scale 33, min 17), the latter split across nibble and top bits.
fn k4_scales() -> [u8; 12] {
    let mut s = [0u8; 12];
    s[0] = 3;
    s[4] = 2;
    s[9] = 0x11; // low nibbles of 33 and 17
    s[1] = 2 << 6; // top bits of 33 (0b10)
    s[5] = 1 << 6; // top bits of 17 (0b01)
    s
}

#[test]
fn golden_scale_min_unpacking() {
    let s = k4_scales();
    assert_eq!(scale_min(0, &s), (3, 2));
    assert_eq!(scale_min(5, &s), (33, 17));
    assert_eq!(
        scale_min(1, &s),
        (0, 0),
        "top bits must not leak into the low 6"
    );
    for j in [2, 3, 4, 6, 7] {
        assert_eq!(scale_min(j, &s), (0, 0), "sub-block {j}");
    }
}

#[test]
fn golden_q4_k() {
    // d = 1, dmin = 0.5. Element 0: low nibble of qs[0]. Element 161 is
    // sub-block 5 (elements 160..192: high nibbles of qs[64..96]), lane 1.
    let b = block(
        144,
        &[
            (0, &h(1.0)),
            (2, &h(0.5)),
            (4, &k4_scales()),
            (16, &[0x07]),
            (16 + 65, &[0x90]),
        ],
    );
    let y = dequantize(WeightType::Q4K, &b, 256);
    assert_eq!(y[0], 3.0 * 7.0 - 0.5 * 2.0);
    assert_eq!(y[32], 0.0, "high nibble of qs[0] belongs to sub-block 1");
    assert_eq!(y[161], 33.0 * 9.0 - 0.5 * 17.0);
    assert_eq!(
        y[129], 0.0,
        "low nibble of qs[65] is sub-block 4 (scale and min 0)"
    );
    assert_eq!(y[160], -0.5 * 17.0);
}

#[test]
fn golden_q5_k() {
    // As Q4_K, plus fifth bits: bit 5 of qh[1] (element 161) and bit 0 of
    // qh[0] (element 0).
    let b = block(
        176,
        &[
            (0, &h(1.0)),
            (2, &h(0.5)),
            (4, &k4_scales()),
            (16, &[0x01]),
            (17, &[1 << 5]),
            (48, &[0x07]),
            (48 + 65, &[0x90]),
        ],
    );
    let y = dequantize(WeightType::Q5K, &b, 256);
    assert_eq!(y[0], 3.0 * 23.0 - 0.5 * 2.0);
    assert_eq!(y[161], 33.0 * 25.0 - 0.5 * 17.0);
    assert_eq!(y[1], -0.5 * 2.0, "qh[1] bit 5 only affects sub-block 5");
}

#[test]
fn golden_q6_k() {
    // Element 200: half 1, quarter 2, lane 8 -> high nibble of ql[72], bits
    // 4..6 of qh[40], scale 12. Element 8: low nibble of ql[8], bits 0..2 of
    // qh[8], scale 0.
    let mut scales = [0u8; 16];
    scales[0] = 2;
    scales[12] = (-3i8) as u8;
    let b = block(
        210,
        &[
            (8, &[0x05]),
            (72, &[0xa0]),
            (128 + 40, &[0b0011_0000]),
            (192, &scales),
            (208, &h(0.5)),
        ],
    );
    let y = dequantize(WeightType::Q6K, &b, 256);
    assert_eq!(y[200], 0.5 * -3.0 * (58.0 - 32.0));
    assert_eq!(y[8], 0.5 * 2.0 * (5.0 - 32.0));
    assert_eq!(y[72], 0.0, "ql[72] low nibble is element 136, scale 8 = 0");
}

#[test]
fn golden_float_types() {
    let b: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(dequantize(WeightType::F32, &b, 2), [1.5, -2.0]);
    assert_eq!(
        dequantize(WeightType::F16, &[0x00, 0x3c, 0x00, 0xc0], 2),
        [1.0, -2.0]
    );
    assert_eq!(
        dequantize(WeightType::BF16, &[0xc0, 0x3f, 0x80, 0xbf], 2),
        [1.5, -1.0]
    );
}

#[test]
fn golden_q8_k_activations() {
    let mut x = vec![0.0f32; 256];
    x[0] = 1.0;
    x[17] = -2.0; // the signed maximum: maps to +127 (iscale = -127 / max)
    x[255] = 0.5;
    let a = acts(ActType::Q8K, &x);
    let d = f32::from_le_bytes(a[..4].try_into().unwrap());
    assert_eq!(d, 1.0 / (-127.0 / -2.0f32));
    let q = |i: usize| a[4 + i] as i8;
    assert_eq!(
        (q(0), q(17), q(255)),
        (64, -127, 32),
        "63.5 rounds to even 64, 31.75 to 32"
    );
    let bsum = |j: usize| i16::from_le_bytes([a[260 + 2 * j], a[261 + 2 * j]]);
    assert_eq!((bsum(0), bsum(1), bsum(15)), (64, -127, 32));
}

#[test]
fn golden_q8_1_activations() {
    let mut x = ramp(32, 3);
    x[9] = 2.54;
    let a = acts(ActType::Q8_1, &x);
    let d = f16::from_le_bytes([a[0], a[1]]).to_f32();
    let s = f16::from_le_bytes([a[2], a[3]]).to_f32();
    let sum: i32 = a[4..].iter().map(|&q| i32::from(q as i8)).sum();
    assert_eq!(a[4 + 9] as i8, 127);
    assert_eq!(d, f16::from_f32(2.54 / 127.0).to_f32());
    assert_eq!(s, f16::from_f32(sum as f32 * (2.54f32 / 127.0)).to_f32());
}

#[test]
fn q8_0_rounds_ties_away_from_zero() {
    // With max 127 the scale is exactly 1, so x = k + 0.5 is a tie.
    let mut x = vec![0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -2.5;
    x[3] = 0.5;
    let a = acts(ActType::Q8_0, &x);
    assert_eq!([a[3] as i8, a[4] as i8, a[5] as i8], [3, -3, 1]);
}

#[test]
fn q4_0_maps_largest_magnitude_to_code_zero() {
    let mut x = ramp(32, 1);
    x[5] = -9.0;
    let b = quantize(WeightType::Q4_0, &x);
    assert_eq!(
        b[2 + 5] & 0x0f,
        0,
        "largest magnitude must be code 0 (= -8)"
    );
    let y = dequantize(WeightType::Q4_0, &b, 32);
    assert!((y[5] + 9.0).abs() < 0.01);
}

#[test]
fn typed_entry_points_agree_with_byte_api() {
    let x = ramp(96, 9);
    let mut blocks = vec![
        BlockQ4_0 {
            d: f16::ZERO,
            qs: [0; 16]
        };
        3
    ];
    quantize_row_q4_0(&x, &mut blocks);
    let mut bytes = vec![0u8; 54];
    for (b, o) in blocks.iter().zip(bytes.chunks_exact_mut(18)) {
        b.write(o);
    }
    assert_eq!(bytes, quantize(WeightType::Q4_0, &x));
    let mut y = vec![0.0; 96];
    dequantize_row_q4_0(&blocks, &mut y);
    assert_eq!(y, dequantize(WeightType::Q4_0, &bytes, 96));

    let mut q8 = vec![
        BlockQ8_0 {
            d: f16::ZERO,
            qs: [0; 32]
        };
        3
    ];
    quantize_row_q8_0(&x, &mut q8);
    dequantize_row_q8_0(&q8, &mut y);
    assert_eq!(
        y,
        dequantize(WeightType::Q8_0, &quantize(WeightType::Q8_0, &x), 96)
    );
}

// ------------------------------------------------------- round-trip bounds

/// Half the spacing of f16 subnormals: the absolute error of storing a tiny
/// scale as f16.
const F16_SUBNORMAL_HALF_STEP: f32 = 1.0 / (1u32 << 25) as f32;

/// Largest error `|x - dequantize(quantize(x))|` allowed for one block,
/// from the format's step size. Each bound adds slack for the rounding of
/// stored f16 scales: a few ulps relative, and once they turn subnormal, the
/// absolute f16 step times the largest code.
fn round_trip_bound(ty: WeightType, xb: &[f32]) -> f32 {
    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (min, max) = xb
        .iter()
        .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let max_code = match ty {
        WeightType::F32 | WeightType::F16 | WeightType::BF16 => 1.0,
        WeightType::Q4_0 | WeightType::Q4_1 => 16.0,
        WeightType::Q5_0 | WeightType::Q5_1 => 32.0,
        WeightType::Q8_0 => 128.0,
        // 6-bit sub-block scale times level, for scale and min.
        WeightType::Q4K => 2.0 * 63.0 * 16.0,
        WeightType::Q5K => 2.0 * 63.0 * 32.0,
        WeightType::Q6K => 128.0 * 32.0,
    };
    let f16_slack = amax * 2.0f32.powi(-9) + max_code * F16_SUBNORMAL_HALF_STEP;
    match ty {
        WeightType::F32 => 0.0,
        WeightType::F16 => amax * 2.0f32.powi(-11) + F16_SUBNORMAL_HALF_STEP,
        WeightType::BF16 => amax * 2.0f32.powi(-8),
        // Half a step on the side of the maximum; a full step on the other
        // side, where code 2^(b-1) is missing.
        WeightType::Q4_0 => amax / 8.0 + f16_slack,
        WeightType::Q5_0 => amax / 16.0 + f16_slack,
        WeightType::Q8_0 => 0.5 * amax / 127.0 + f16_slack,
        WeightType::Q4_1 => 0.5 * (max - min) / 15.0 + 2.0 * f16_slack,
        WeightType::Q5_1 => 0.5 * (max - min) / 31.0 + 2.0 * f16_slack,
        // K-quants: scales are searched, then themselves quantized to 6 or 8
        // bits relative to the super-block's largest; bounded by about one
        // step of a sub-block spanning the whole super-block range.
        WeightType::Q4K => (max - min) / 15.0 + f16_slack,
        WeightType::Q5K => (max - min) / 31.0 + f16_slack,
        WeightType::Q6K => amax / 32.0 + f16_slack,
    }
}

fn check_round_trip(ty: WeightType, x: &[f32]) -> Result<(), String> {
    let y = dequantize(ty, &quantize(ty, x), x.len());
    let bs = ty.block_size().max(32);
    for (b, (xb, yb)) in x.chunks(bs).zip(y.chunks(bs)).enumerate() {
        let bound = round_trip_bound(ty, xb);
        for (i, (a, c)) in xb.iter().zip(yb).enumerate() {
            // Written so that a NaN result fails too.
            let within = (a - c).abs() <= bound;
            if !within {
                return Err(format!(
                    "{ty:?} block {b} element {i}: {a} became {c} (bound {bound})"
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn round_trip_within_bounds_on_ramps() {
    for ty in WeightType::ALL {
        for seed in 0..8 {
            let scale = 10.0f32.powi(seed as i32 - 4);
            let x: Vec<f32> = ramp(512, seed).iter().map(|v| v * scale).collect();
            check_round_trip(ty, &x).unwrap();
        }
    }
}

/// Mean squared round-trip error relative to the signal, on smooth random
/// data: a layout bug that still stays within per-element bounds (say, two
/// swapped sub-block scales) shows up here.
#[test]
fn k_quants_have_expected_precision() {
    let x = ramp(4096, 42);
    let power: f32 = x.iter().map(|v| v * v).sum();
    for (ty, max_rel) in [
        (WeightType::Q4_0, 0.012),
        (WeightType::Q4_1, 0.009),
        (WeightType::Q5_0, 0.003),
        (WeightType::Q5_1, 0.0025),
        (WeightType::Q8_0, 2e-5),
        (WeightType::Q4K, 0.006),
        (WeightType::Q5K, 0.0015),
        (WeightType::Q6K, 0.0004),
    ] {
        let y = dequantize(ty, &quantize(ty, &x), x.len());
        let err: f32 = x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum();
        let rel = err / power;
        assert!(rel < max_rel, "{ty:?}: relative squared error {rel}");
    }
}

// ---------------------------------------------------------------- extremes

fn extreme_rows(n: usize) -> Vec<(&'static str, Vec<f32>)> {
    let base = ramp(n, 77);
    let mut outlier: Vec<f32> = base.iter().map(|v| v * 0.01).collect();
    outlier[n / 3] = 50.0;
    let mut neg_max = base.clone();
    for (i, v) in neg_max.iter_mut().enumerate() {
        if i % 32 == 11 {
            *v = -4.0;
        }
    }
    vec![
        ("zeros", vec![0.0; n]),
        ("huge", base.iter().map(|v| v * 30_000.0).collect()),
        ("tiny", base.iter().map(|v| v * 1e-6).collect()),
        ("constant", vec![0.75; n]),
        ("constant negative", vec![-0.75; n]),
        ("one outlier", outlier),
        ("negative max", neg_max),
    ]
}

#[test]
fn extremes_round_trip_within_bounds() {
    for ty in WeightType::ALL {
        for (name, x) in extreme_rows(512) {
            check_round_trip(ty, &x).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

#[test]
fn zeros_stay_zero_everywhere() {
    for ty in WeightType::ALL {
        let x = vec![0.0f32; 512];
        let w = quantize(ty, &x);
        assert!(dequantize(ty, &w, 512).iter().all(|&v| v == 0.0), "{ty:?}");
        let a = acts(ty.act_type(), &ramp(512, 5));
        assert_eq!(vec_dot(ty, &w, &a, 512), 0.0, "{ty:?}");
        let a0 = acts(ty.act_type(), &x);
        let w1 = quantize(ty, &ramp(512, 6));
        assert_eq!(
            vec_dot(ty, &w1, &a0, 512),
            0.0,
            "{ty:?} against zero activations"
        );
    }
}

// ------------------------------------------------------------ dot products

/// f32 view of an activation row (what the integer kernels multiply).
fn act_values(ty: ActType, a: &[u8], n: usize) -> Vec<f32> {
    match ty {
        ActType::F32 => dequantize(WeightType::F32, a, n),
        ActType::F16 => dequantize(WeightType::F16, a, n),
        ActType::BF16 => dequantize(WeightType::BF16, a, n),
        ActType::Q8_0 => dequantize(WeightType::Q8_0, a, n),
        ActType::Q8_1 => a
            .chunks_exact(BlockQ8_1::BYTES)
            .flat_map(|b| {
                let b = BlockQ8_1::read(b);
                b.qs.map(|q| b.d.to_f32() * f32::from(q))
            })
            .collect(),
        ActType::Q8K => a
            .chunks_exact(BlockQ8K::BYTES)
            .flat_map(|b| {
                let b = BlockQ8K::read(b);
                b.qs.map(|q| b.d * f32::from(q))
            })
            .collect(),
    }
}

/// Largest error of one activation element after conversion to `ty`.
fn act_error_bound(ty: ActType, xb: &[f32]) -> f32 {
    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    match ty {
        ActType::F32 => 0.0,
        ActType::F16 => amax * 2.0f32.powi(-11) + F16_SUBNORMAL_HALF_STEP,
        ActType::BF16 => amax * 2.0f32.powi(-8),
        // Half a step, plus the f16 rounding of the scale times 127 steps.
        ActType::Q8_0 | ActType::Q8_1 => {
            0.5 * amax / 127.0 + amax * 2.0f32.powi(-11) + 127.0 * F16_SUBNORMAL_HALF_STEP
        }
        ActType::Q8K => 0.5 * amax / 127.0 * (1.0 + 1e-6),
    }
}

/// Checks the contract of `vec_dot` for one weight row and activation row:
/// (1) it equals the f32 dot of the dequantized weights with the dequantized
/// activations up to float rounding (the integer sums are exact), and (2) it
/// is within the activation quantization error of the dot with the original
/// f32 activations.
fn check_dot(ty: WeightType, xw: &[f32], xa: &[f32]) -> Result<(), String> {
    let n = xw.len();
    let act = ty.act_type();
    let w = quantize(ty, xw);
    let a = acts(act, xa);
    let got = vec_dot(ty, &w, &a, n);
    let wf = dequantize(ty, &w, n);
    let af = act_values(act, &a, n);
    let magnitude: f32 = wf.iter().zip(&af).map(|(p, q)| (p * q).abs()).sum();
    let exact: f64 = wf
        .iter()
        .zip(&af)
        .map(|(&p, &q)| f64::from(p) * f64::from(q))
        .sum();
    // Q4_1/Q5_1 apply the weight minimum through the activation block's
    // stored sum `s`, which ggml computes from the unrounded f32 scale, so it
    // is not exactly `d * sum(q)` of the stored f16 `d`; that difference is
    // part of the format's semantics.
    let min_correction: f64 = match ty {
        WeightType::Q4_1 | WeightType::Q5_1 => w
            .chunks_exact(ty.block_bytes())
            .zip(a.chunks_exact(BlockQ8_1::BYTES))
            .map(|(wb, ab)| {
                let m = f16::from_le_bytes([wb[2], wb[3]]).to_f32();
                let ab = BlockQ8_1::read(ab);
                let sum: i32 = ab.qs.iter().map(|&q| i32::from(q)).sum();
                let stored = f64::from(ab.s.to_f32());
                f64::from(m) * (stored - f64::from(ab.d.to_f32()) * f64::from(sum))
            })
            .sum(),
        _ => 0.0,
    };
    let exact = exact + min_correction;
    let tol = 1e-5 * magnitude + 1e-30;
    if (f64::from(got) - exact).abs() > f64::from(tol) {
        return Err(format!(
            "{ty:?}: vec_dot {got} vs dequantized dot {exact} (tol {tol})"
        ));
    }
    let bs = act.block_size().max(32);
    let act_err: f32 = wf
        .chunks(bs)
        .zip(xa.chunks(bs))
        .map(|(wb, xb)| wb.iter().map(|v| v.abs()).sum::<f32>() * act_error_bound(act, xb))
        .sum();
    let float_dot: f64 = wf
        .iter()
        .zip(xa)
        .map(|(&p, &q)| f64::from(p) * f64::from(q))
        .sum();
    let tol = f64::from(act_err + tol) + min_correction.abs();
    if (f64::from(got) - float_dot).abs() > tol {
        return Err(format!(
            "{ty:?}: vec_dot {got} vs dot with f32 activations {float_dot} (tol {tol})"
        ));
    }
    Ok(())
}

#[test]
fn dot_contract_on_extremes() {
    for ty in WeightType::ALL {
        for (wname, xw) in extreme_rows(512) {
            for (aname, xa) in extreme_rows(512) {
                check_dot(ty, &xw, &xa).unwrap_or_else(|e| panic!("w {wname}, a {aname}: {e}"));
            }
        }
    }
}

#[test]
fn matmul_ref_is_vec_dot_per_row_and_token() {
    for ty in WeightType::ALL {
        let (rows, cols, n_tok) = (3, 512, 2);
        let w = quantize(ty, &ramp(rows * cols, 11));
        let x = ramp(n_tok * cols, 12);
        let mut y = vec![f32::NAN; rows * n_tok];
        matmul_ref(ty, &w, rows, cols, &x, n_tok, &mut y);
        let wrb = ty.row_bytes(cols);
        for t in 0..n_tok {
            let a = acts(ty.act_type(), &x[t * cols..(t + 1) * cols]);
            for r in 0..rows {
                let want = vec_dot(ty, &w[r * wrb..(r + 1) * wrb], &a, cols);
                assert_eq!(
                    y[t * rows + r].to_bits(),
                    want.to_bits(),
                    "{ty:?} t{t} r{r}"
                );
            }
        }
    }
    let mut y = vec![1.0; 4];
    matmul_ref(WeightType::Q8_0, &[], 2, 0, &[], 2, &mut y);
    assert_eq!(y, [0.0; 4], "an empty inner dimension sums to zero");
}

#[test]
fn unaligned_rows_give_the_same_results() {
    // Rows inside a mapping start at arbitrary offsets; shift by one byte.
    for ty in WeightType::ALL {
        let x = ramp(512, 21);
        let w = quantize(ty, &x);
        let mut shifted = vec![0u8; w.len() + 1];
        shifted[1..].copy_from_slice(&w);
        assert_eq!(
            dequantize(ty, &shifted[1..], 512),
            dequantize(ty, &w, 512),
            "{ty:?}"
        );
        let a = acts(ty.act_type(), &ramp(512, 22));
        let mut a_shifted = vec![0u8; a.len() + 1];
        a_shifted[1..].copy_from_slice(&a);
        assert_eq!(
            vec_dot(ty, &shifted[1..], &a_shifted[1..], 512).to_bits(),
            vec_dot(ty, &w, &a, 512).to_bits()
        );
    }
}

#[test]
fn length_mismatch_panics_naming_the_type() {
    let err = std::panic::catch_unwind(|| {
        let mut y = vec![0.0; 256];
        dequantize_row(WeightType::Q6K, &[0u8; 200], &mut y);
    })
    .unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(msg.contains("Q6_K") && msg.contains("210"), "{msg}");
}

// ------------------------------------------------------------- properties

fn row_strategy() -> impl Strategy<Value = (WeightType, Vec<f32>, Vec<f32>)> {
    (0..WeightType::ALL.len(), 1usize..4, -6i32..6).prop_flat_map(|(t, k, exp)| {
        let ty = WeightType::ALL[t];
        let n = k * ty.block_size().max(32);
        let scale = 2.0f32.powi(exp);
        (
            Just(ty),
            prop::collection::vec(-1.0f32..1.0, n)
                .prop_map(move |v| v.iter().map(|x| x * scale).collect()),
            prop::collection::vec(-4.0f32..4.0, n),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn prop_round_trip_within_bounds((ty, xw, _) in row_strategy()) {
        check_round_trip(ty, &xw).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn prop_dot_contract((ty, xw, xa) in row_strategy()) {
        check_dot(ty, &xw, &xa).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn prop_quantize_is_idempotent_on_dequantized((ty, xw, _) in row_strategy()) {
        // Re-quantizing dequantized 32-wide symmetric formats is exact: the
        // grid already contains every value. (Affine and k-quant formats may
        // move to a better grid, so only the symmetric ones are checked.)
        if matches!(ty, WeightType::Q8_0 | WeightType::F16 | WeightType::BF16 | WeightType::F32) {
            let n = xw.len();
            let once = dequantize(ty, &quantize(ty, &xw), n);
            let twice = dequantize(ty, &quantize(ty, &once), n);
            prop_assert_eq!(once, twice);
        }
    }
}
