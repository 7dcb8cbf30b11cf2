//! Row-dot functions per (weight format, ISA), looked up once per matmul.
//! The SIMD entries are safe wrappers around `#[target_feature]` kernels and
//! are handed out only for an ISA that [`Isa::available`] confirmed.

use crate::isa::Isa;
use crate::matmul::DotFn;
use half::{bf16, f16};

/// Weight row formats the dispatch table knows, with the activation format
/// each is paired with (as llama.cpp pairs them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFormat {
    /// f32 weights, f32 activations.
    F32,
    /// f16 weights, f32 activations.
    F16,
    /// bf16 weights, f32 activations.
    BF16,
    /// Q4_0 weights, Q8_0 activations.
    Q4_0,
    /// Q8_0 weights, Q8_0 activations.
    Q8_0,
}

fn f32s(b: &[u8]) -> impl Iterator<Item = f32> + '_ {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
}

fn dot_f32(w: &[u8], x: &[u8]) -> f32 {
    f32s(w).zip(f32s(x)).map(|(a, b)| a * b).sum()
}

fn dot_f16(w: &[u8], x: &[u8]) -> f32 {
    w.chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .zip(f32s(x))
        .map(|(a, b)| a * b)
        .sum()
}

fn dot_bf16(w: &[u8], x: &[u8]) -> f32 {
    w.chunks_exact(2)
        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .zip(f32s(x))
        .map(|(a, b)| a * b)
        .sum()
}

/// ggml's generic Q4_0 x Q8_0: integer block sums scaled by both deltas.
pub fn dot_q4_0_q8_0_scalar(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (b, xb) in w.chunks_exact(18).zip(x.chunks_exact(34)) {
        let d =
            f16::from_le_bytes([b[0], b[1]]).to_f32() * f16::from_le_bytes([xb[0], xb[1]]).to_f32();
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += (i32::from(b[2 + j] & 0x0f) - 8) * i32::from(xb[2 + j] as i8);
            sumi += (i32::from(b[2 + j] >> 4) - 8) * i32::from(xb[18 + j] as i8);
        }
        sum += sumi as f32 * d;
    }
    sum
}

/// ggml's generic Q8_0 x Q8_0.
pub fn dot_q8_0_q8_0_scalar(w: &[u8], x: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (b, xb) in w.chunks_exact(34).zip(x.chunks_exact(34)) {
        let d =
            f16::from_le_bytes([b[0], b[1]]).to_f32() * f16::from_le_bytes([xb[0], xb[1]]).to_f32();
        let sumi: i32 = b[2..]
            .iter()
            .zip(&xb[2..])
            .map(|(&w, &a)| i32::from(w as i8) * i32::from(a as i8))
            .sum();
        sum += sumi as f32 * d;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
fn q4_0_avx2(w: &[u8], x: &[u8]) -> f32 {
    // SAFETY: handed out by `dot_fn` only when AVX2/FMA/F16C are present.
    unsafe { crate::x86::avx2::vec_dot_q4_0_q8_0(w, x) }
}

#[cfg(target_arch = "x86_64")]
fn q8_0_avx2(w: &[u8], x: &[u8]) -> f32 {
    // SAFETY: as above.
    unsafe { crate::x86::avx2::vec_dot_q8_0_q8_0(w, x) }
}

/// The row dot for `format` on `isa` (which must be available).
pub fn dot_fn(isa: Isa, format: RowFormat) -> DotFn {
    debug_assert!(isa.available());
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && isa.available() {
        match format {
            RowFormat::Q4_0 => return q4_0_avx2,
            RowFormat::Q8_0 => return q8_0_avx2,
            _ => {}
        }
    }
    match format {
        RowFormat::F32 => dot_f32,
        RowFormat::F16 => dot_f16,
        RowFormat::BF16 => dot_bf16,
        RowFormat::Q4_0 => dot_q4_0_q8_0_scalar,
        RowFormat::Q8_0 => dot_q8_0_q8_0_scalar,
    }
}

/// Activation rows in the format `format` pairs with: f32 little-endian bytes
/// for float weights, Q8_0 blocks (ggml's reference rounding) for Q4_0/Q8_0.
/// Returns the bytes per row.
pub fn quantize_activations(format: RowFormat, x: &[f32], cols: usize, out: &mut Vec<u8>) -> usize {
    out.clear();
    match format {
        RowFormat::F32 | RowFormat::F16 | RowFormat::BF16 => {
            out.reserve(x.len() * 4);
            x.iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            cols * 4
        }
        RowFormat::Q4_0 | RowFormat::Q8_0 => {
            let nb = cols / crate::QK;
            out.reserve(x.len() / crate::QK * 34);
            let mut blocks = vec![
                crate::BlockQ8_0 {
                    d: f16::ZERO,
                    qs: [0; crate::QK]
                };
                nb
            ];
            for row in x.chunks_exact(cols) {
                crate::scalar::quantize_row_q8_0(row, &mut blocks);
                for b in &blocks {
                    out.extend_from_slice(&b.d.to_le_bytes());
                    out.extend(b.qs.iter().map(|&q| q as u8));
                }
            }
            nb * 34
        }
    }
}
