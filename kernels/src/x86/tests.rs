//! The x86 kernels of the 32-wide formats with a minimum or fifth bit and of
//! the k-quants against the scalar reference (random blocks, extreme fields,
//! odd block counts), their batch invariance (every tile shape gives every
//! (row, token) the same bits; the VNNI variants too where the CPU has
//! them, and `tests/isa_paths.rs` checks VNNI = AVX2 bit for bit); the AVX2
//! k-quant groups on the same cases against the panels' order and the
//! scalar reference.

use super::avx2k::{self, panel_order_dot};
use super::avx512::Out;
use super::avx512k::KFormat;
use super::{kquants, legacy};
use crate::isa::Isa;
use crate::scalar;
use crate::types::{ActType, WeightType};

type Kernel = unsafe fn(&[&[u8]], &[&[u8]], &mut [f32]);

/// The kernels under test: (type, AVX2 entry, AVX-512 VNNI entry).
const KERNELS: [(WeightType, Kernel, Kernel); 6] = [
    (
        WeightType::Q4_1,
        legacy::dot_q4_1_q8_1,
        legacy::dot_q4_1_q8_1_vnni,
    ),
    (
        WeightType::Q5_0,
        legacy::dot_q5_0_q8_0,
        legacy::dot_q5_0_q8_0_vnni,
    ),
    (
        WeightType::Q5_1,
        legacy::dot_q5_1_q8_1,
        legacy::dot_q5_1_q8_1_vnni,
    ),
    (
        WeightType::Q4K,
        kquants::dot_q4k_q8k,
        kquants::dot_q4k_q8k_vnni,
    ),
    (
        WeightType::Q5K,
        kquants::dot_q5k_q8k,
        kquants::dot_q5k_q8k_vnni,
    ),
    (
        WeightType::Q6K,
        kquants::dot_q6k_q8k,
        kquants::dot_q6k_q8k_vnni,
    ),
];

const BLOCK_COUNTS: [usize; 4] = [1, 3, 7, 65];

/// Kernel and reference may differ by this many f32 epsilons of the sum of
/// the magnitudes of the terms: both round each block's scale products and
/// add the blocks in f32 (the kernel per lane, then across lanes).
const TOL_EPS: f64 = 16.0;

/// How block fields are filled.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// Random values (with outliers) through the scalar quantizers.
    Quantized,
    /// Moderate scales, uniformly random quants.
    Random,
    /// Largest positive f16 scales, every quant bit set, +127 activations,
    /// largest i8 scales.
    Max,
    /// Largest negative f16 scales, quant bits clear, -127 activations,
    /// smallest i8 scales (-128).
    Min,
    /// Each field independently one of the extremes above.
    Mixed,
}

const FILLS: [Fill; 5] = [
    Fill::Quantized,
    Fill::Random,
    Fill::Max,
    Fill::Min,
    Fill::Mixed,
];

/// A field of a block, by byte offsets.
#[derive(Clone, Copy)]
enum Field {
    F16(usize),
    F32(usize),
    /// Packed codes and scales: any byte is valid.
    Bytes(usize, usize),
    /// Signed 8-bit activation quants (never -128).
    Quants(usize, usize),
    /// i8 scales (Q6_K).
    Scales(usize, usize),
    /// Q8_K's i16 sums of each 16 quants (filled from the quants).
    Bsums(usize),
    /// Q8_1's f16 `s = d * sum(qs)` (from the `d` at 0 and the quants at 4).
    Sum(usize),
}

fn weight_layout(ty: WeightType) -> (usize, &'static [Field]) {
    use Field::*;
    match ty {
        WeightType::Q4_1 => (20, &[F16(0), F16(2), Bytes(4, 20)]),
        WeightType::Q5_0 => (22, &[F16(0), Bytes(2, 22)]),
        WeightType::Q5_1 => (24, &[F16(0), F16(2), Bytes(4, 24)]),
        WeightType::Q4K => (144, &[F16(0), F16(2), Bytes(4, 144)]),
        WeightType::Q5K => (176, &[F16(0), F16(2), Bytes(4, 176)]),
        WeightType::Q6K => (210, &[Bytes(0, 192), Scales(192, 208), F16(208)]),
        _ => unreachable!("not a type under test"),
    }
}

fn act_layout(ty: ActType) -> (usize, &'static [Field]) {
    use Field::*;
    match ty {
        ActType::Q8_0 => (34, &[F16(0), Quants(2, 34)]),
        ActType::Q8_1 => (36, &[F16(0), Quants(4, 36), Sum(2)]),
        ActType::Q8K => (292, &[F32(0), Quants(4, 260), Bsums(260)]),
        _ => unreachable!("not an activation type under test"),
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// `nb` blocks of the layout, filled as `fill` (not `Quantized`) says.
fn blocks(layout: (usize, &[Field]), nb: usize, fill: Fill, rng: &mut Rng) -> Vec<u8> {
    // Which extreme a value takes (Mixed: either, value by value), or None
    // for a random one.
    let extreme = |rng: &mut Rng| match fill {
        Fill::Max => Some(true),
        Fill::Min => Some(false),
        Fill::Mixed => Some(rng.coin()),
        Fill::Random => None,
        Fill::Quantized => unreachable!("quantized rows come from the scalar quantizers"),
    };
    let (size, fields) = layout;
    let mut v = vec![0u8; nb * size];
    for b in v.chunks_exact_mut(size) {
        for &f in fields {
            match f {
                Field::F16(_) | Field::F32(_) => {
                    let scale = match extreme(rng) {
                        Some(high) => [-65504.0, 65504.0][high as usize],
                        None => (0.0005 + 0.05 * rng.unit()) * [-1.0, 1.0][rng.coin() as usize],
                    };
                    match f {
                        Field::F16(at) => {
                            b[at..at + 2].copy_from_slice(&half::f16::from_f32(scale).to_le_bytes())
                        }
                        Field::F32(at) => b[at..at + 4].copy_from_slice(&scale.to_le_bytes()),
                        _ => unreachable!(),
                    }
                }
                Field::Bytes(s, e) => {
                    for x in &mut b[s..e] {
                        *x = extreme(rng)
                            .map_or_else(|| rng.next() as u8, |h| [0x00, 0xff][h as usize]);
                    }
                }
                Field::Quants(s, e) => {
                    for x in &mut b[s..e] {
                        let q = extreme(rng).map_or_else(
                            || ((rng.next() % 255) as i16 - 127) as i8,
                            |h| [-127, 127][h as usize],
                        );
                        *x = q as u8;
                    }
                }
                Field::Scales(s, e) => {
                    for x in &mut b[s..e] {
                        *x = extreme(rng)
                            .map_or_else(|| rng.next() as u8, |h| [0x80, 0x7f][h as usize]);
                    }
                }
                Field::Sum(at) => {
                    let sum: i32 = b[4..36].iter().map(|&q| i32::from(q as i8)).sum();
                    // Clamped to the largest f16: extreme scales would overflow.
                    let s = (f16_at(b, 0) as f32 * sum as f32).clamp(-65504.0, 65504.0);
                    b[at..at + 2].copy_from_slice(&half::f16::from_f32(s).to_le_bytes());
                }
                Field::Bsums(at) => {
                    for k in 0..16 {
                        let q0 = 4 + 16 * k;
                        let sum: i16 = b[q0..q0 + 16].iter().map(|&q| i16::from(q as i8)).sum();
                        b[at + 2 * k..at + 2 * k + 2].copy_from_slice(&sum.to_le_bytes());
                    }
                }
            }
        }
    }
    v
}

fn f16_at(b: &[u8], at: usize) -> f64 {
    f64::from(half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32())
}

/// The activation values `d * q` of one row, from the bytes.
fn act_values(ty: ActType, x: &[u8]) -> Vec<f64> {
    let (size, fields) = act_layout(ty);
    let mut v = Vec::new();
    for b in x.chunks_exact(size) {
        let (d, qs) = match (fields[0], fields[1]) {
            (Field::F32(_), Field::Quants(s, e)) => (
                f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                &b[s..e],
            ),
            (Field::F16(_), Field::Quants(s, e)) => (f16_at(b, 0), &b[s..e]),
            _ => unreachable!("activation layouts start with d, then the quants"),
        };
        v.extend(qs.iter().map(|&q| d * f64::from(q as i8)));
    }
    v
}

/// The sum of the magnitudes of the terms of the dot (each weight split into
/// its scaled code and its minimum): the scale rounding errors are measured
/// against.
fn magnitude(ty: WeightType, w: &[u8], x: &[u8]) -> f64 {
    let n = w.len() / ty.block_bytes() * ty.block_size();
    let deq = |w: &[u8]| {
        let mut v = vec![0.0f32; n];
        scalar::dequantize_row(ty, w, &mut v);
        v
    };
    let y = act_values(ty.act_type(), x);
    let (bytes, _) = weight_layout(ty);
    let with_min = deq(w);
    // The same weights without their minimum: the min field zeroed.
    let mut w0 = w.to_vec();
    let (min_at, s_at) = match ty {
        WeightType::Q4_1 | WeightType::Q5_1 => (Some(2), Some(2)),
        WeightType::Q4K | WeightType::Q5K => (Some(2), None),
        _ => (None, None),
    };
    if let Some(at) = min_at {
        for b in w0.chunks_exact_mut(bytes) {
            b[at..at + 2].fill(0);
        }
    }
    let scaled = deq(&w0);
    let mut m = 0.0;
    for j in 0..n {
        let (a, b) = (f64::from(scaled[j]), f64::from(with_min[j]));
        m += (a.abs() + (b - a).abs()) * y[j].abs();
    }
    // Q8_1 carries the activations' sum in `s`: the minimum meets it once a block.
    if let Some(s_at) = s_at {
        for (wb, xb) in w.chunks_exact(bytes).zip(x.chunks_exact(36)) {
            m += (f16_at(wb, 2) * f16_at(xb, s_at)).abs();
        }
    }
    m
}

struct Case {
    nb: usize,
    fill: Fill,
    w: [Vec<u8>; 2],
    x: [Vec<u8>; 4],
}

/// A row of `n` values in about [-1, 1] with an outlier every 37.
fn values(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = rng.unit() * 2.0 - 1.0;
            if i % 37 == 0 { v * 9.0 } else { v }
        })
        .collect()
}

fn cases(ty: WeightType) -> Vec<Case> {
    let mut rng = Rng(ty as u64 * 1000 + 17);
    let mut v = Vec::new();
    for nb in BLOCK_COUNTS {
        let n = nb * ty.block_size();
        for fill in FILLS {
            let act = ty.act_type();
            let (wl, xl) = (weight_layout(ty), act_layout(act));
            let mut weight = || match fill {
                Fill::Quantized => {
                    let mut w = vec![0u8; ty.row_bytes(n)];
                    scalar::quantize_row(ty, &values(n, &mut rng), &mut w);
                    w
                }
                _ => blocks(wl, nb, fill, &mut rng),
            };
            let w = [weight(), weight()];
            let mut acts = || match fill {
                Fill::Quantized => {
                    let mut x = vec![0u8; act.row_bytes(n)];
                    scalar::quantize_acts(act, &values(n, &mut rng), &mut x);
                    x
                }
                _ => blocks(xl, nb, fill, &mut rng),
            };
            let x = [acts(), acts(), acts(), acts()];
            v.push(Case { nb, fill, w, x });
        }
    }
    v
}

/// The kernel over both weight rows and all four tokens.
fn full(f: Kernel, c: &Case) -> [f32; 8] {
    let ws: Vec<&[u8]> = c.w.iter().map(Vec::as_slice).collect();
    let xs: Vec<&[u8]> = c.x.iter().map(Vec::as_slice).collect();
    let mut out = [f32::NAN; 8];
    // SAFETY: callers checked the kernel's features; the rows match.
    unsafe { f(&ws, &xs, &mut out) };
    out
}

fn avx2() -> bool {
    let ok = Isa::Avx2.available();
    if !ok {
        eprintln!("skipped: no AVX2/FMA/F16C on this CPU");
    }
    ok
}

fn vnni() -> bool {
    let ok = Isa::Avx2.available()
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vl");
    if !ok {
        eprintln!("skipped: no AVX-512 VNNI/VL on this CPU");
    }
    ok
}

#[test]
fn kernels_match_the_scalar_reference() {
    if !avx2() {
        return;
    }
    for (ty, f, _) in KERNELS {
        for c in cases(ty) {
            let got = full(f, &c);
            let n = c.nb * ty.block_size();
            for r in 0..2 {
                for t in 0..4 {
                    let want = scalar::vec_dot(ty, &c.w[r], &c.x[t], n);
                    let mag = magnitude(ty, &c.w[r], &c.x[t]);
                    let tol = TOL_EPS * f64::from(f32::EPSILON) * mag;
                    let err = (f64::from(got[r * 4 + t]) - f64::from(want)).abs();
                    assert!(
                        err <= tol,
                        "{ty:?} {:?} {} blocks, row {r} token {t}: {} vs {want} (err {err:e}, tol {tol:e})",
                        c.fill,
                        c.nb,
                        got[r * 4 + t]
                    );
                }
            }
        }
    }
}

/// The AVX2 k-quant groups on the tile cases (extreme fields, 65 blocks):
/// the AVX-512 panels' bits (their order, plainly written), within the
/// tiles' tolerance of the scalar reference, and the same bits for every
/// choice and order of rows and tokens.
#[test]
fn kquant_groups_match_the_panel_order_and_the_scalar_reference() {
    if !avx2() {
        return;
    }
    for (ty, format) in [
        (WeightType::Q4K, KFormat::Q4K),
        (WeightType::Q5K, KFormat::Q5K),
        (WeightType::Q6K, KFormat::Q6K),
    ] {
        for c in cases(ty) {
            let n = c.nb * ty.block_size();
            let group = |rows: &[usize], toks: &[usize]| {
                // Rows back to back, as in a matrix.
                let w: Vec<u8> = rows.iter().flat_map(|&r| c.w[r].iter().copied()).collect();
                let xs: Vec<&[u8]> = toks.iter().map(|&t| c.x[t].as_slice()).collect();
                let mut out = vec![f32::NAN; xs.len() * rows.len()];
                let dst = Out::new(&mut out, rows.len(), rows.len());
                // SAFETY: AVX2/FMA/F16C detected above.
                unsafe { avx2k::panel(format, &w, c.w[0].len(), rows.len(), &xs, c.nb, dst) };
                out
            };
            let all = group(&[0, 1], &[0, 1, 2, 3]);
            for r in 0..2 {
                for t in 0..4 {
                    let got = all[t * 2 + r];
                    let want = panel_order_dot(format, &c.w[r], &c.x[t], c.nb);
                    assert!(
                        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                        "{ty:?} {:?} {} blocks, row {r} token {t}: {got} vs {want}",
                        c.fill,
                        c.nb
                    );
                    let want = scalar::vec_dot(ty, &c.w[r], &c.x[t], n);
                    let tol = TOL_EPS * f64::from(f32::EPSILON) * magnitude(ty, &c.w[r], &c.x[t]);
                    let err = (f64::from(got) - f64::from(want)).abs();
                    assert!(
                        err <= tol || (got.is_nan() && want.is_nan()),
                        "{ty:?} {:?} {} blocks, row {r} token {t}: {got} vs scalar {want} (err {err:e}, tol {tol:e})",
                        c.fill,
                        c.nb
                    );
                }
            }
            for rows in &selections(2) {
                for toks in &selections(4) {
                    let out = group(rows, toks);
                    for (i, &r) in rows.iter().enumerate() {
                        for (j, &t) in toks.iter().enumerate() {
                            assert_eq!(
                                out[j * rows.len() + i].to_bits(),
                                all[t * 2 + r].to_bits(),
                                "{ty:?} {:?} {} blocks: rows {rows:?} tokens {toks:?} changed ({r}, {t})",
                                c.fill,
                                c.nb
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Every ordered choice of distinct indices from `0..n`, of every length.
fn selections(n: usize) -> Vec<Vec<usize>> {
    let mut all = vec![vec![]];
    let mut out = Vec::new();
    for _ in 0..n {
        let mut next = Vec::new();
        for s in &all {
            for i in 0..n {
                if !s.contains(&i) {
                    let mut s = s.clone();
                    s.push(i);
                    out.push(s.clone());
                    next.push(s);
                }
            }
        }
        all = next;
    }
    out
}

#[test]
fn every_tile_shape_gives_the_same_bits() {
    if !avx2() {
        return;
    }
    let with_vnni = vnni();
    let (row_sets, token_sets) = (selections(2), selections(4));
    for (ty, f_avx2, f_vnni) in KERNELS {
        let variants: &[Kernel] = if with_vnni {
            &[f_avx2, f_vnni]
        } else {
            &[f_avx2]
        };
        for c in cases(ty) {
            for &f in variants {
                let all = full(f, &c);
                for rows in &row_sets {
                    for toks in &token_sets {
                        let ws: Vec<&[u8]> = rows.iter().map(|&r| c.w[r].as_slice()).collect();
                        let xs: Vec<&[u8]> = toks.iter().map(|&t| c.x[t].as_slice()).collect();
                        let mut out = vec![f32::NAN; ws.len() * xs.len()];
                        // SAFETY: the features were detected above.
                        unsafe { f(&ws, &xs, &mut out) };
                        for (i, &r) in rows.iter().enumerate() {
                            for (j, &t) in toks.iter().enumerate() {
                                assert_eq!(
                                    out[i * xs.len() + j].to_bits(),
                                    all[r * 4 + t].to_bits(),
                                    "{ty:?} {:?} {} blocks: rows {rows:?} tokens {toks:?} changed ({r}, {t})",
                                    c.fill,
                                    c.nb
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `LFM_EXPECT_ISA=avx2` (set by CI for its emulated Haswell run) makes sure
/// the path under test is the one detected, not a silent scalar fallback.
#[test]
fn the_expected_isa_is_detected() {
    if let Ok(want) = std::env::var("LFM_EXPECT_ISA") {
        assert_eq!(Isa::detect().to_string(), want, "LFM_EXPECT_ISA");
    }
}
