//! The k-quant super-blocks of 256 (Q4_K, Q5_K, Q6_K) and their Q8_K
//! activations: quantize, expand and dot, one super-block at a time.
//!
//! Layouts, by element index `e` within a super-block:
//! - Q4_K/Q5_K: sub-block `e / 32` has a 6-bit scale and min packed into 12
//!   bytes ([`scale_min`]); the low nibble of `qs[32 * (e / 64) + e % 32]`
//!   holds even sub-blocks, the high nibble odd ones; for Q5_K bit `e / 32` of
//!   `qh[e % 32]` is the fifth bit.
//! - Q6_K: 16 sub-blocks of 16 with signed 8-bit scales (`scales[e / 16]`);
//!   within each half of 128, quarter `q` and lane `l` take the low (q < 2) or
//!   high nibble of `ql[64h + l + 32 * (q % 2)]` and bits `2q..2q+2` of
//!   `qh[32h + l]`; the 6-bit code is offset by 32.

use super::search::{GROUP_MAX_EPS, affine_levels, nearest_int, symmetric_levels_x2_weighted};
use crate::blocks::{BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8K, K_SCALE_SIZE, QK_K};
use half::f16;

const SUB: usize = 32;
const N_SUB: usize = QK_K / SUB;

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes: for
/// `j < 4` the low 6 bits of bytes `j` and `j + 4`; otherwise a nibble of
/// byte `j + 4` plus the top two bits of bytes `j - 4` and `j`.
pub fn scale_min(j: usize, packed: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// Inverse of [`scale_min`] for 6-bit `scales` and `mins`.
fn pack_scale_min(scales: &[u8; N_SUB], mins: &[u8; N_SUB]) -> [u8; K_SCALE_SIZE] {
    let mut packed = [0u8; K_SCALE_SIZE];
    for j in 0..N_SUB {
        let (ls, lm) = (scales[j], mins[j]);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    packed
}

/// Per-sub-block (scale, min) fit shared by Q4_K and Q5_K: importance
/// weights `rms + |x|`, an affine search, then both quantized to 6 bits
/// relative to their maxima. Returns the packed scales, `d`, `dmin` and the
/// levels found by the search (used where the final scale rounds to zero).
fn fit_affine_super_block(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> ([u8; K_SCALE_SIZE], f16, f16, [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0f32; N_SUB];
    let mut mins = [0f32; N_SUB];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for j in 0..N_SUB {
        let xs = &x[SUB * j..SUB * (j + 1)];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let rms = (sum_x2 / SUB as f32).sqrt();
        let mut weights = [0f32; SUB];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = rms + v.abs();
        }
        let (scale, min) = affine_levels(
            nmax,
            xs,
            &weights,
            &mut levels[SUB * j..SUB * (j + 1)],
            rmin,
            0.1,
            nstep,
        );
        scales[j] = scale;
        mins[j] = min;
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut q_scales = [0u8; N_SUB];
    let mut q_mins = [0u8; N_SUB];
    for j in 0..N_SUB {
        // ggml narrows to uint8_t before clamping.
        q_scales[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        q_mins[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    (
        pack_scale_min(&q_scales, &q_mins),
        f16::from_f32(max_scale / 63.0),
        f16::from_f32(max_min / 63.0),
        levels,
    )
}

/// Requantizes each sub-block against its final 6-bit scale and min.
fn requantize_affine(
    x: &[f32],
    packed: &[u8; K_SCALE_SIZE],
    d: f16,
    dmin: f16,
    nmax: i32,
    levels: &mut [u8; QK_K],
) {
    for j in 0..N_SUB {
        let (sc, m) = scale_min(j, packed);
        let ds = d.to_f32() * f32::from(sc);
        if ds == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * f32::from(m);
        for i in SUB * j..SUB * (j + 1) {
            levels[i] = nearest_int((x[i] + dm) / ds).clamp(0, nmax) as u8;
        }
    }
}

pub(super) fn quantize_q4k(x: &[f32]) -> BlockQ4K {
    let (scales, d, dmin, mut levels) = fit_affine_super_block(x, 15, -1.0, 20);
    requantize_affine(x, &scales, d, dmin, 15, &mut levels);
    let mut qs = [0u8; QK_K / 2];
    for (c, chunk) in levels.chunks_exact(64).enumerate() {
        for l in 0..32 {
            qs[32 * c + l] = chunk[l] | (chunk[l + 32] << 4);
        }
    }
    BlockQ4K {
        d,
        dmin,
        scales,
        qs,
    }
}

pub(super) fn quantize_q5k(x: &[f32]) -> BlockQ5K {
    let (scales, d, dmin, mut levels) = fit_affine_super_block(x, 31, -0.5, 15);
    requantize_affine(x, &scales, d, dmin, 31, &mut levels);
    let mut qs = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 8];
    for (c, chunk) in levels.chunks_exact(64).enumerate() {
        for l in 0..32 {
            let (lo, hi) = (chunk[l], chunk[l + 32]);
            qh[l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            qs[32 * c + l] = (lo & 0x0f) | ((hi & 0x0f) << 4);
        }
    }
    BlockQ5K {
        d,
        dmin,
        scales,
        qh,
        qs,
    }
}

pub(super) fn quantize_q6k(x: &[f32]) -> BlockQ6K {
    let mut levels = [0i8; QK_K];
    let mut scales = [0f32; QK_K / 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for (ib, scale) in scales.iter_mut().enumerate() {
        let r = 16 * ib..16 * (ib + 1);
        *scale = symmetric_levels_x2_weighted(32, &x[r.clone()], &mut levels[r]);
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = *scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        return BlockQ6K {
            ql: [0; QK_K / 2],
            qh: [0; QK_K / 4],
            scales: [0; QK_K / 16],
            d: f16::ZERO,
        };
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut q_scales = [0i8; QK_K / 16];
    for (q, &s) in q_scales.iter_mut().zip(&scales) {
        *q = nearest_int(iscale * s).min(127) as i8;
    }
    for (j, &sc) in q_scales.iter().enumerate() {
        let ds = d.to_f32() * f32::from(sc);
        if ds == 0.0 {
            continue;
        }
        for i in 16 * j..16 * (j + 1) {
            levels[i] = (nearest_int(x[i] / ds).clamp(-32, 31) + 32) as i8;
        }
    }
    let mut ql = [0u8; QK_K / 2];
    let mut qh = [0u8; QK_K / 4];
    for (h, half) in levels.chunks_exact(128).enumerate() {
        for l in 0..32 {
            let q = [half[l], half[l + 32], half[l + 64], half[l + 96]].map(|v| v as u8);
            ql[64 * h + l] = (q[0] & 0x0f) | ((q[2] & 0x0f) << 4);
            ql[64 * h + l + 32] = (q[1] & 0x0f) | ((q[3] & 0x0f) << 4);
            qh[32 * h + l] =
                (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
    BlockQ6K {
        ql,
        qh,
        scales: q_scales,
        d,
    }
}

pub(super) fn quantize_q8k(x: &[f32]) -> BlockQ8K {
    let max = super::legacy::signed_absmax(x);
    let amax = max.abs();
    let mut block = BlockQ8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    if amax == 0.0 {
        // ggml leaves `bsums` unwritten here; zero is the only sane value.
        return block;
    }
    // -127 rather than -128 keeps every code in [-127, 127] (ggml's choice).
    let iscale = -127.0 / max;
    for (q, &v) in block.qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (sum, group) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
        *sum = group.iter().map(|&q| i16::from(q)).sum();
    }
    block.d = 1.0 / iscale;
    block
}

/// The 4-bit levels of a Q4_K super-block, in element order.
fn levels_q4k(b: &BlockQ4K) -> [u8; QK_K] {
    let mut levels = [0u8; QK_K];
    for (c, chunk) in levels.chunks_exact_mut(64).enumerate() {
        for l in 0..32 {
            let byte = b.qs[32 * c + l];
            chunk[l] = byte & 0x0f;
            chunk[l + 32] = byte >> 4;
        }
    }
    levels
}

/// The 5-bit levels of a Q5_K super-block, in element order.
fn levels_q5k(b: &BlockQ5K) -> [u8; QK_K] {
    let mut levels = [0u8; QK_K];
    for (c, chunk) in levels.chunks_exact_mut(64).enumerate() {
        for l in 0..32 {
            let byte = b.qs[32 * c + l];
            let hi_bits = b.qh[l] >> (2 * c);
            chunk[l] = (byte & 0x0f) | ((hi_bits & 1) << 4);
            chunk[l + 32] = (byte >> 4) | (((hi_bits >> 1) & 1) << 4);
        }
    }
    levels
}

/// The signed 6-bit values (code - 32) of a Q6_K super-block, in element order.
fn values_q6k(b: &BlockQ6K) -> [i8; QK_K] {
    let mut values = [0i8; QK_K];
    for (h, half) in values.chunks_exact_mut(128).enumerate() {
        for l in 0..32 {
            let (lo, hi) = (b.ql[64 * h + l], b.ql[64 * h + l + 32]);
            let top = b.qh[32 * h + l];
            let codes = [lo & 0x0f, hi & 0x0f, lo >> 4, hi >> 4];
            for (q, code) in codes.into_iter().enumerate() {
                let six = code | (((top >> (2 * q)) & 3) << 4);
                half[l + 32 * q] = six as i8 - 32;
            }
        }
    }
    values
}

fn dequantize_affine(
    levels: &[u8; QK_K],
    packed: &[u8; K_SCALE_SIZE],
    d: f16,
    dmin: f16,
    out: &mut [f32],
) {
    let (d, dmin) = (d.to_f32(), dmin.to_f32());
    for j in 0..N_SUB {
        let (sc, m) = scale_min(j, packed);
        let (ds, dm) = (d * f32::from(sc), dmin * f32::from(m));
        for i in SUB * j..SUB * (j + 1) {
            out[i] = ds * f32::from(levels[i]) - dm;
        }
    }
}

pub(super) fn dequantize_q4k(b: &BlockQ4K, out: &mut [f32]) {
    dequantize_affine(&levels_q4k(b), &b.scales, b.d, b.dmin, out);
}

pub(super) fn dequantize_q5k(b: &BlockQ5K, out: &mut [f32]) {
    dequantize_affine(&levels_q5k(b), &b.scales, b.d, b.dmin, out);
}

pub(super) fn dequantize_q6k(b: &BlockQ6K, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (i, &v) in values_q6k(b).iter().enumerate() {
        out[i] = d * f32::from(b.scales[i / 16]) * f32::from(v);
    }
}

/// Accumulates a k-quant row dot the way ggml's generic code does: integer
/// products summed per super-block into 8 interleaved lanes (element `e` goes
/// to lane `e % 8`), each lane scaled and added to its own f32 sum, the min
/// correction subtracted from a separate total, lanes added to it last.
#[derive(Default)]
pub(super) struct KDot {
    lanes: [f32; 8],
    total: f32,
}

impl KDot {
    fn add_lanes(&mut self, d: f32, lanes: &[i32; 8]) {
        for (sum, &v) in self.lanes.iter_mut().zip(lanes) {
            *sum += d * v as f32;
        }
    }

    pub(super) fn finish(self) -> f32 {
        let mut s = self.total;
        for v in self.lanes {
            s += v;
        }
        s
    }

    fn add_affine(
        &mut self,
        levels: &[u8; QK_K],
        packed: &[u8; K_SCALE_SIZE],
        d: f16,
        dmin: f16,
        a: &BlockQ8K,
    ) {
        let sub_scales: [(u8, u8); N_SUB] = std::array::from_fn(|j| scale_min(j, packed));
        let mut lanes = [0i32; 8];
        for (e, (&l, &q)) in levels.iter().zip(&a.qs).enumerate() {
            let sc = sub_scales[e / SUB].0;
            lanes[e % 8] += i32::from(sc) * (i32::from(l) * i32::from(q));
        }
        // Each sub-block of 32 covers two of the activations' 16-wide sums.
        let mut min_sum = 0i32;
        for (j, &bsum) in a.bsums.iter().enumerate() {
            min_sum += i32::from(bsum) * i32::from(sub_scales[j / 2].1);
        }
        self.add_lanes(d.to_f32() * a.d, &lanes);
        self.total -= dmin.to_f32() * a.d * min_sum as f32;
    }

    pub(super) fn add_q4k(&mut self, w: &BlockQ4K, a: &BlockQ8K) {
        self.add_affine(&levels_q4k(w), &w.scales, w.d, w.dmin, a);
    }

    pub(super) fn add_q5k(&mut self, w: &BlockQ5K, a: &BlockQ8K) {
        self.add_affine(&levels_q5k(w), &w.scales, w.d, w.dmin, a);
    }

    pub(super) fn add_q6k(&mut self, w: &BlockQ6K, a: &BlockQ8K) {
        let mut lanes = [0i32; 8];
        for (e, (&v, &q)) in values_q6k(w).iter().zip(&a.qs).enumerate() {
            lanes[e % 8] += i32::from(w.scales[e / 16]) * (i32::from(v) * i32::from(q));
        }
        self.add_lanes(w.d.to_f32() * a.d, &lanes);
    }
}
