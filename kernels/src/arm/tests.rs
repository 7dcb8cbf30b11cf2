//! The aarch64 kernels against the scalar reference. Quantized kernels must
//! give the reference's bits for every (row, token) in every tile shape, on
//! quantizer output, raw random blocks and extreme blocks; float kernels must
//! stay within their rounding bound of an f64 dot and give the same bits in
//! every tile shape. CI runs these under qemu as a CPU with dotprod and as
//! one without (`.ci/run`), so both integer-dot paths run.

use super::{float, has_dotprod, kquants, legacy};
use crate::scalar;
use crate::types::WeightType;
use proptest::prelude::*;

type Kernel = unsafe fn(&[&[u8]], &[&[u8]], &mut [f32]);

/// Every quantized kernel this CPU can run, with its type and path name.
fn quantized_kernels() -> Vec<(WeightType, &'static str, Kernel)> {
    use WeightType::*;
    let mut v: Vec<(WeightType, &'static str, Kernel)> = vec![
        (Q4_0, "neon", legacy::q4_0),
        (Q4_1, "neon", legacy::q4_1),
        (Q5_0, "neon", legacy::q5_0),
        (Q5_1, "neon", legacy::q5_1),
        (Q8_0, "neon", legacy::q8_0),
        (Q4K, "neon", kquants::q4k),
        (Q5K, "neon", kquants::q5k),
        (Q6K, "neon", kquants::q6k),
    ];
    if has_dotprod() {
        v.extend([
            (Q4_0, "sdot", legacy::q4_0_sdot as Kernel),
            (Q4_1, "sdot", legacy::q4_1_sdot),
            (Q5_0, "sdot", legacy::q5_0_sdot),
            (Q5_1, "sdot", legacy::q5_1_sdot),
            (Q8_0, "sdot", legacy::q8_0_sdot),
        ]);
    }
    v
}

/// splitmix64: small, seedable, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), with one value in 64 scaled up as an outlier.
    fn value(&mut self) -> f32 {
        let v = (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        if self.next().is_multiple_of(64) {
            v * 20.0
        } else {
            v
        }
    }

    /// A finite f16 of either sign between about 2^-10 and 2.
    fn scale(&mut self) -> [u8; 2] {
        let mag = (2.0f32).powi((self.next() % 12) as i32 - 10) * (1.0 + self.value().abs());
        let v = if self.next().is_multiple_of(2) {
            mag
        } else {
            -mag
        };
        half::f16::from_f32(v).to_le_bytes()
    }
}

/// Where a block's fields sit: the f16 scales, the 6/8-bit sub-block scales
/// (k-quants), and the quants. Activation formats are described too.
struct Layout {
    bytes: usize,
    halves: &'static [usize],
    scales: std::ops::Range<usize>,
    quants: std::ops::Range<usize>,
}

fn weight_layout(ty: WeightType) -> Layout {
    let l = |bytes, halves, scales, quants| Layout {
        bytes,
        halves,
        scales,
        quants,
    };
    match ty {
        WeightType::Q4_0 => l(18, &[0][..], 0..0, 2..18),
        WeightType::Q4_1 => l(20, &[0, 2], 0..0, 4..20),
        WeightType::Q5_0 => l(22, &[0], 0..0, 2..22),
        WeightType::Q5_1 => l(24, &[0, 2], 0..0, 4..24),
        WeightType::Q8_0 => l(34, &[0], 0..0, 2..34),
        WeightType::Q4K => l(144, &[0, 2], 4..16, 16..144),
        WeightType::Q5K => l(176, &[0, 2], 4..16, 16..176),
        WeightType::Q6K => l(210, &[208], 192..208, 0..192),
        t => unreachable!("{t:?} is not quantized"),
    }
}

/// How to fill a test block.
#[derive(Clone, Copy, Debug)]
struct Fill {
    /// Every quant byte, or random bytes if `None`.
    quant: Option<u8>,
    /// Every sub-block scale byte (k-quants), or random if `None`.
    scale: Option<u8>,
    /// Every f16 scale field's bits, or random finite scales if `None`.
    half: Option<u16>,
}

const RANDOM: Fill = Fill {
    quant: None,
    scale: None,
    half: None,
};

fn weight_row(ty: WeightType, blocks: usize, fill: Fill, rng: &mut Rng) -> Vec<u8> {
    let lay = weight_layout(ty);
    let mut row = vec![0u8; blocks * lay.bytes];
    for b in row.chunks_exact_mut(lay.bytes) {
        for at in lay.quants.clone() {
            b[at] = fill.quant.unwrap_or_else(|| rng.next() as u8);
        }
        for at in lay.scales.clone() {
            b[at] = fill.scale.unwrap_or_else(|| rng.next() as u8);
        }
        for &at in lay.halves {
            let h = fill.half.map_or_else(|| rng.scale(), u16::to_le_bytes);
            b[at..at + 2].copy_from_slice(&h);
        }
    }
    row
}

/// An activation row in the format `ty` pairs with. `fill.half` (or a
/// random scale) sets `d`, and `s` for Q8_1; Q8_K's f32 `d` is `kd` (or
/// random) and its sums of 16 are computed from the quants, as the
/// quantizer stores them.
fn act_row(ty: WeightType, blocks: usize, fill: Fill, kd: Option<f32>, rng: &mut Rng) -> Vec<u8> {
    let (bytes, halves, quants) = match ty {
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => (34, &[0][..], 2..34),
        WeightType::Q4_1 | WeightType::Q5_1 => (36, &[0, 2][..], 4..36),
        _ => (292, &[][..], 4..260),
    };
    let mut row = vec![0u8; blocks * bytes];
    for b in row.chunks_exact_mut(bytes) {
        for at in quants.clone() {
            b[at] = fill.quant.unwrap_or_else(|| rng.next() as u8);
        }
        for &at in halves {
            let h = fill.half.map_or_else(|| rng.scale(), u16::to_le_bytes);
            b[at..at + 2].copy_from_slice(&h);
        }
        if bytes == 292 {
            let d = kd.unwrap_or_else(|| rng.value() * 0.05);
            b[..4].copy_from_slice(&d.to_le_bytes());
            for g in 0..16 {
                let sum: i16 = b[4 + 16 * g..20 + 16 * g]
                    .iter()
                    .map(|&q| i16::from(q as i8))
                    .sum();
                b[260 + 2 * g..262 + 2 * g].copy_from_slice(&sum.to_le_bytes());
            }
        }
    }
    row
}

/// Weight and activation rows from the scalar quantizers (what the engine
/// multiplies).
fn quantized_rows(ty: WeightType, blocks: usize, rng: &mut Rng) -> ([Vec<u8>; 2], [Vec<u8>; 4]) {
    let n = blocks * ty.block_size();
    let mut values = |scale: f32| (0..n).map(|_| rng.value() * scale).collect::<Vec<f32>>();
    let ws = [0.5, 2.0].map(|s| {
        let mut w = vec![0u8; ty.row_bytes(n)];
        scalar::quantize_row(ty, &values(s), &mut w);
        w
    });
    let act = ty.act_type();
    let xs = [1.0, 3.0, 0.1, 8.0].map(|s| {
        let mut x = vec![0u8; act.row_bytes(n)];
        scalar::quantize_acts(act, &values(s), &mut x);
        x
    });
    (ws, xs)
}

/// Runs `kernel` on every tile shape (1-2 weight rows x 1-4 activation
/// rows, in several orders) drawn from `ws` and `xs`, and hands each output
/// to `check(row, token, value, shape)`.
fn every_shape(
    kernel: Kernel,
    ws: &[Vec<u8>; 2],
    xs: &[Vec<u8>; 4],
    mut check: impl FnMut(usize, usize, f32, &str),
) {
    let row_sets: [&[usize]; 4] = [&[0], &[1], &[0, 1], &[1, 0]];
    let mut token_sets: Vec<Vec<usize>> = (1..=4)
        .flat_map(|n| (0..=4 - n).map(move |s| (s..s + n).collect()))
        .collect();
    token_sets.extend([vec![3, 2, 1, 0], vec![2, 0], vec![1, 3, 0]]);
    for rows in row_sets {
        for tokens in &token_sets {
            let wr: Vec<&[u8]> = rows.iter().map(|&r| ws[r].as_slice()).collect();
            let xr: Vec<&[u8]> = tokens.iter().map(|&t| xs[t].as_slice()).collect();
            // A value no kernel computes here, so an unwritten slot shows.
            let mut out = vec![f32::from_bits(0x7fa5_a5a5); wr.len() * xr.len()];
            // SAFETY: every kernel under test needs NEON (baseline) and, for
            // the sdot ones, dotprod, which `quantized_kernels` and the float
            // list only include when detected.
            unsafe { kernel(&wr, &xr, &mut out) };
            let shape = format!("rows {rows:?} x tokens {tokens:?}");
            for (i, &r) in rows.iter().enumerate() {
                for (j, &t) in tokens.iter().enumerate() {
                    check(r, t, out[i * xr.len() + j], &shape);
                }
            }
        }
    }
}

/// Checks every tile shape of `kernel` against `scalar::vec_dot`, bit for bit.
fn assert_reference_bits(
    ty: WeightType,
    path: &str,
    kernel: Kernel,
    ws: &[Vec<u8>; 2],
    xs: &[Vec<u8>; 4],
    what: &str,
) {
    let n = ws[0].len() / weight_layout(ty).bytes * ty.block_size();
    let want: Vec<Vec<f32>> = ws
        .iter()
        .map(|w| xs.iter().map(|x| scalar::vec_dot(ty, w, x, n)).collect())
        .collect();
    every_shape(kernel, ws, xs, |r, t, got, shape| {
        assert_eq!(
            got.to_bits(),
            want[r][t].to_bits(),
            "{ty:?} {path} {what}, n={n}, {shape}, row {r} token {t}: {got} vs {}",
            want[r][t]
        );
    });
}

#[test]
fn quantized_kernels_give_the_reference_bits_in_every_tile_shape() {
    let mut rng = Rng(1);
    for (ty, path, kernel) in quantized_kernels() {
        for blocks in [1, 3, 7, 65] {
            let (ws, xs) = quantized_rows(ty, blocks, &mut rng);
            assert_reference_bits(ty, path, kernel, &ws, &xs, "quantizer output");
            let ws = [0, 1].map(|_| weight_row(ty, blocks, RANDOM, &mut rng));
            let xs = [0, 1, 2, 3].map(|_| act_row(ty, blocks, RANDOM, None, &mut rng));
            assert_reference_bits(ty, path, kernel, &ws, &xs, "random blocks");
        }
    }
}

#[test]
fn extreme_blocks_give_the_reference_bits() {
    const F16_MAX: u16 = 0x7bff;
    const F16_MIN_SUBNORMAL: u16 = 0x0001;
    let mut rng = Rng(2);
    // Largest codes with the largest sub-block scales (for Q6_K 0xff is
    // scale -1; 0x7f and 0x80 are covered by the next lines), smallest
    // codes, random codes, each at the largest and the smallest f16 scale.
    let mut weight_fills = Vec::new();
    for half in [Some(F16_MAX), Some(F16_MIN_SUBNORMAL), Some(0xfbff), None] {
        for (quant, scale) in [
            (Some(0xff), Some(0xff)),
            (Some(0x00), Some(0xff)),
            (Some(0x7f), Some(0x7f)),
            (Some(0x80), Some(0x80)),
            (None, Some(0x3f)),
            (None, None),
        ] {
            weight_fills.push(Fill { quant, scale, half });
        }
    }
    // Activations at +-127 (what the quantizer can produce) and -128, at
    // the largest and the smallest scales.
    let mut act_fills = Vec::new();
    for (half, kd) in [
        (Some(F16_MAX), Some(3.0e38f32)),
        (Some(F16_MIN_SUBNORMAL), Some(1.0e-40)),
        (None, None),
    ] {
        for quant in [Some(0x7f), Some(0x81), Some(0x80), None] {
            act_fills.push((
                Fill {
                    quant,
                    scale: None,
                    half,
                },
                kd,
            ));
        }
    }
    for (ty, path, kernel) in quantized_kernels() {
        for blocks in [1, 3] {
            for wf in &weight_fills {
                for (k, (af, kd)) in act_fills.iter().enumerate() {
                    let ws = [
                        weight_row(ty, blocks, *wf, &mut rng),
                        weight_row(ty, blocks, RANDOM, &mut rng),
                    ];
                    let other = act_fills[(k + 5) % act_fills.len()];
                    let xs = [
                        act_row(ty, blocks, *af, *kd, &mut rng),
                        act_row(ty, blocks, other.0, other.1, &mut rng),
                        act_row(ty, blocks, *af, *kd, &mut rng),
                        act_row(ty, blocks, RANDOM, None, &mut rng),
                    ];
                    let what = format!("weights {wf:?}, activations {af:?} d={kd:?}");
                    assert_reference_bits(ty, path, kernel, &ws, &xs, &what);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random raw blocks of any length: the reference's bits, any shape.
    #[test]
    fn prop_random_blocks_give_the_reference_bits(seed in any::<u64>(), blocks in 1usize..12) {
        let mut rng = Rng(seed);
        for (ty, path, kernel) in quantized_kernels() {
            let ws = [0, 1].map(|_| weight_row(ty, blocks, RANDOM, &mut rng));
            let xs = [0, 1, 2, 3].map(|_| act_row(ty, blocks, RANDOM, None, &mut rng));
            assert_reference_bits(ty, path, kernel, &ws, &xs, "random blocks");
        }
    }
}

/// The float kernels with the scalar reference's own conversion of their
/// weight bytes (`scalar::quantize_row` rounds f32 to F16/BF16).
fn float_kernels() -> [(WeightType, Kernel); 3] {
    [
        (WeightType::F32, float::f32_f32 as Kernel),
        (WeightType::F16, float::f16_f32),
        (WeightType::BF16, float::bf16_f32),
    ]
}

#[test]
fn float_kernels_stay_within_rounding_and_ignore_batching() {
    let mut rng = Rng(3);
    for (ty, kernel) in float_kernels() {
        for n in [1, 7, 16, 17, 100, 1029] {
            let mut values = |s: f32| (0..n).map(|_| rng.value() * s).collect::<Vec<f32>>();
            let ws = [0.5, 300.0].map(|s| {
                let mut w = vec![0u8; ty.row_bytes(n)];
                scalar::quantize_row(ty, &values(s), &mut w);
                w
            });
            let xv = [1.0, 1e-3, 40.0, 1.0].map(&mut values);
            let xs = xv
                .clone()
                .map(|x| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
            let mut single = [[0.0f32; 4]; 2];
            for r in 0..2 {
                let mut wv = vec![0.0f32; n];
                scalar::dequantize_row(ty, &ws[r], &mut wv);
                for t in 0..4 {
                    let mut out = [0.0f32];
                    // SAFETY: NEON is baseline on aarch64.
                    unsafe { kernel(&[&ws[r]], &[&xs[t]], &mut out) };
                    single[r][t] = out[0];
                    let exact: f64 = wv
                        .iter()
                        .zip(&xv[t])
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    let mass: f64 = wv
                        .iter()
                        .zip(&xv[t])
                        .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
                        .sum();
                    let bound = (n / 16 + 20) as f64 * f64::from(f32::EPSILON) * mass
                        + f64::from(f32::MIN_POSITIVE);
                    let err = (f64::from(out[0]) - exact).abs();
                    assert!(
                        err <= bound,
                        "{ty:?} n={n} row {r} token {t}: {} vs {exact} (err {err}, bound {bound})",
                        out[0]
                    );
                }
            }
            every_shape(kernel, &ws, &xs, |r, t, got, shape| {
                assert_eq!(
                    got.to_bits(),
                    single[r][t].to_bits(),
                    "{ty:?} n={n} {shape}: row {r} token {t}"
                );
            });
        }
    }
}

/// CI runs this crate's tests under qemu as `-cpu max` (dotprod) and as
/// `-cpu cortex-a72` (none) and says which in `LFM_EXPECT_DOTPROD`: if the
/// emulated CPU were not what the run claims, one of the two paths would
/// silently go untested.
#[test]
fn detected_dotprod_matches_the_expected_cpu() {
    match std::env::var("LFM_EXPECT_DOTPROD").as_deref() {
        Ok("1") => assert!(has_dotprod(), "expected a CPU with dotprod"),
        Ok("0") => assert!(!has_dotprod(), "expected a CPU without dotprod"),
        Ok(other) => panic!("LFM_EXPECT_DOTPROD is 0 or 1, not {other:?}"),
        Err(_) => eprintln!(
            "LFM_EXPECT_DOTPROD unset; this CPU {} dotprod",
            if has_dotprod() { "has" } else { "lacks" }
        ),
    }
}
