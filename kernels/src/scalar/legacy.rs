//! The 32-wide formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the Q8_1
//! activations): one block at a time, quantize, expand and dot.
//!
//! Packing shared by all 4- and 5-bit kinds: byte `j` of `qs` holds element
//! `j` in its low nibble and element `j + 16` in its high nibble; for 5-bit
//! kinds bit `i` of the little-endian `qh` word is the fifth bit of element `i`.

use crate::blocks::{BlockQ4_0, BlockQ4_1, BlockQ5_0, BlockQ5_1, BlockQ8_0, BlockQ8_1, QK};
use half::f16;

const HALF: usize = QK / 2;

/// The element of largest magnitude, with its sign (the first one on ties).
pub(super) fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// Smallest and largest element, starting from ±f32::MAX as ggml does.
fn min_max(x: &[f32]) -> (f32, f32) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 { 1.0 / d } else { 0.0 }
}

/// C's `(int8_t)f` as x86-64 compilers emit it: truncate toward zero to
/// 32 bits (NaN and out-of-range give `i32::MIN`), keep the low byte. Only
/// degenerate blocks (a subnormal scale whose inverse is infinite) reach the
/// out-of-range case; Rust's saturating `as` would store a different code.
#[inline]
fn trunc_i8(f: f32) -> i8 {
    let wide = if f.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&f) {
        i32::MIN
    } else {
        f as i32
    };
    wide as i8
}

/// Splits 32 five-bit codes into low nibbles and the `qh` word.
fn pack_5bit(codes: &[u8; QK]) -> ([u8; HALF], [u8; 4]) {
    let mut qs = [0u8; HALF];
    let mut qh = 0u32;
    for j in 0..HALF {
        let (lo, hi) = (codes[j], codes[j + HALF]);
        qs[j] = (lo & 0x0f) | ((hi & 0x0f) << 4);
        qh |= u32::from((lo & 0x10) >> 4) << j;
        qh |= u32::from((hi & 0x10) >> 4) << (j + HALF);
    }
    (qs, qh.to_le_bytes())
}

/// The 5-bit codes of elements `j` and `j + 16`.
#[inline]
fn unpack_5bit(qs: &[u8; HALF], qh: [u8; 4], j: usize) -> (u8, u8) {
    let qh = u32::from_le_bytes(qh);
    let lo = (qs[j] & 0x0f) | ((((qh >> j) << 4) & 0x10) as u8);
    let hi = (qs[j] >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
    (lo, hi)
}

pub(super) fn quantize_q4_0(x: &[f32]) -> BlockQ4_0 {
    // The element of largest magnitude maps to code 0 (= -8) exactly.
    let d = signed_absmax(x) / -8.0;
    let id = inverse_or_zero(d);
    let mut qs = [0u8; HALF];
    for j in 0..HALF {
        let lo = trunc_i8(x[j] * id + 8.5).min(15) as u8;
        let hi = trunc_i8(x[j + HALF] * id + 8.5).min(15) as u8;
        qs[j] = lo | (hi << 4);
    }
    BlockQ4_0 {
        d: f16::from_f32(d),
        qs,
    }
}

pub(super) fn quantize_q4_1(x: &[f32]) -> BlockQ4_1 {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse_or_zero(d);
    let mut qs = [0u8; HALF];
    for j in 0..HALF {
        let lo = trunc_i8((x[j] - min) * id + 0.5).min(15) as u8;
        let hi = trunc_i8((x[j + HALF] - min) * id + 0.5).min(15) as u8;
        qs[j] = lo | (hi << 4);
    }
    BlockQ4_1 {
        d: f16::from_f32(d),
        m: f16::from_f32(min),
        qs,
    }
}

pub(super) fn quantize_q5_0(x: &[f32]) -> BlockQ5_0 {
    let d = signed_absmax(x) / -16.0;
    let id = inverse_or_zero(d);
    let mut codes = [0u8; QK];
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = trunc_i8(v * id + 16.5).min(31) as u8;
    }
    let (qs, qh) = pack_5bit(&codes);
    BlockQ5_0 {
        d: f16::from_f32(d),
        qh,
        qs,
    }
}

pub(super) fn quantize_q5_1(x: &[f32]) -> BlockQ5_1 {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse_or_zero(d);
    let mut codes = [0u8; QK];
    for (c, &v) in codes.iter_mut().zip(x) {
        // ggml converts straight to uint8_t here, with no clamp.
        *c = trunc_i8((v - min) * id + 0.5) as u8;
    }
    let (qs, qh) = pack_5bit(&codes);
    BlockQ5_1 {
        d: f16::from_f32(d),
        m: f16::from_f32(min),
        qh,
        qs,
    }
}

/// Symmetric 8-bit codes with `d = absmax / 127`, rounding half away from
/// zero (C's `roundf`).
fn quantize_8bit(x: &[f32]) -> (f32, [i8; QK]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse_or_zero(d);
    let mut qs = [0i8; QK];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = trunc_i8((v * id).round());
    }
    (d, qs)
}

pub(super) fn quantize_q8_0(x: &[f32]) -> BlockQ8_0 {
    let (d, qs) = quantize_8bit(x);
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs,
    }
}

pub(super) fn quantize_q8_1(x: &[f32]) -> BlockQ8_1 {
    let (d, qs) = quantize_8bit(x);
    let sum: i32 = qs.iter().map(|&q| i32::from(q)).sum();
    BlockQ8_1 {
        d: f16::from_f32(d),
        // The unrounded f32 scale, as ggml uses.
        s: f16::from_f32(sum as f32 * d),
        qs,
    }
}

pub(super) fn dequantize_q4_0(b: &BlockQ4_0, out: &mut [f32]) {
    let d = b.d.to_f32();
    for j in 0..HALF {
        out[j] = (i32::from(b.qs[j] & 0x0f) - 8) as f32 * d;
        out[j + HALF] = (i32::from(b.qs[j] >> 4) - 8) as f32 * d;
    }
}

pub(super) fn dequantize_q4_1(b: &BlockQ4_1, out: &mut [f32]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    for j in 0..HALF {
        out[j] = f32::from(b.qs[j] & 0x0f) * d + m;
        out[j + HALF] = f32::from(b.qs[j] >> 4) * d + m;
    }
}

pub(super) fn dequantize_q5_0(b: &BlockQ5_0, out: &mut [f32]) {
    let d = b.d.to_f32();
    for j in 0..HALF {
        let (lo, hi) = unpack_5bit(&b.qs, b.qh, j);
        out[j] = (i32::from(lo) - 16) as f32 * d;
        out[j + HALF] = (i32::from(hi) - 16) as f32 * d;
    }
}

pub(super) fn dequantize_q5_1(b: &BlockQ5_1, out: &mut [f32]) {
    let (d, m) = (b.d.to_f32(), b.m.to_f32());
    for j in 0..HALF {
        let (lo, hi) = unpack_5bit(&b.qs, b.qh, j);
        out[j] = f32::from(lo) * d + m;
        out[j + HALF] = f32::from(hi) * d + m;
    }
}

pub(super) fn dequantize_q8_0(b: &BlockQ8_0, out: &mut [f32]) {
    let d = b.d.to_f32();
    for (o, &q) in out.iter_mut().zip(&b.qs) {
        *o = f32::from(q) * d;
    }
}

/// Integer dot of 32 weight codes (already offset) with 8-bit activations,
/// summed in two halves as ggml does (the result is exact either way).
#[inline]
fn int_dot(codes: impl Fn(usize) -> (i32, i32), acts: &[i8; QK]) -> i32 {
    let mut lo = 0i32;
    let mut hi = 0i32;
    for j in 0..HALF {
        let (a, b) = codes(j);
        lo += a * i32::from(acts[j]);
        hi += b * i32::from(acts[j + HALF]);
    }
    lo + hi
}

// Each `dot_*` returns one block's contribution; the caller adds them in
// block order into an f32, and each keeps ggml's grouping of the scale
// products.

pub(super) fn dot_q4_0(w: &BlockQ4_0, a: &BlockQ8_0) -> f32 {
    let sum = int_dot(
        |j| (i32::from(w.qs[j] & 0x0f) - 8, i32::from(w.qs[j] >> 4) - 8),
        &a.qs,
    );
    sum as f32 * w.d.to_f32() * a.d.to_f32()
}

pub(super) fn dot_q4_1(w: &BlockQ4_1, a: &BlockQ8_1) -> f32 {
    let sum = int_dot(
        |j| (i32::from(w.qs[j] & 0x0f), i32::from(w.qs[j] >> 4)),
        &a.qs,
    );
    w.d.to_f32() * a.d.to_f32() * sum as f32 + w.m.to_f32() * a.s.to_f32()
}

pub(super) fn dot_q5_0(w: &BlockQ5_0, a: &BlockQ8_0) -> f32 {
    let sum = int_dot(
        |j| {
            let (lo, hi) = unpack_5bit(&w.qs, w.qh, j);
            (i32::from(lo) - 16, i32::from(hi) - 16)
        },
        &a.qs,
    );
    w.d.to_f32() * a.d.to_f32() * sum as f32
}

pub(super) fn dot_q5_1(w: &BlockQ5_1, a: &BlockQ8_1) -> f32 {
    let sum = int_dot(
        |j| {
            let (lo, hi) = unpack_5bit(&w.qs, w.qh, j);
            (i32::from(lo), i32::from(hi))
        },
        &a.qs,
    );
    w.d.to_f32() * a.d.to_f32() * sum as f32 + w.m.to_f32() * a.s.to_f32()
}

pub(super) fn dot_q8_0(w: &BlockQ8_0, a: &BlockQ8_0) -> f32 {
    let sum: i32 =
        w.qs.iter()
            .zip(&a.qs)
            .map(|(&p, &q)| i32::from(p) * i32::from(q))
            .sum();
    sum as f32 * (w.d.to_f32() * a.d.to_f32())
}
