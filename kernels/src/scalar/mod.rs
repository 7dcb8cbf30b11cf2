//! The scalar reference: plain loops that every SIMD variant is tested
//! against. Quantizers follow ggml's `quantize_row_*_ref` bit for bit, so files
//! we write hold the bytes llama.cpp's tools would write; dot products follow
//! ggml's generic (non-SIMD) `ggml_vec_dot_*` including its summation order.
//!
//! Rows are byte slices in the on-disk layout and need not be aligned.
//! Length mismatches are programming errors and panic with the type named.

mod float;
mod kquants;
mod legacy;
mod search;

pub use float::{bf16_bits_to_f32, f32_to_bf16_bits};
pub use kquants::scale_min;

use crate::blocks::{
    Block, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0,
    BlockQ8_1, BlockQ8K, QK,
};
use crate::types::{ActType, WeightType};

fn check_row(name: &str, bytes: usize, want: usize, n: usize) {
    assert_eq!(
        bytes, want,
        "{name}: a row of {n} elements is {want} bytes, got {bytes}"
    );
}

/// Quantizes each block of `x` with `quantize` and writes it to `out`.
fn quantize_blocks<B: Block>(x: &[f32], out: &mut [u8], quantize: impl Fn(&[f32]) -> B) {
    for (xs, o) in x.chunks_exact(B::ELEMS).zip(out.chunks_exact_mut(B::BYTES)) {
        quantize(xs).write(o);
    }
}

/// Expands each block of `src` with `expand` into `dst`.
fn dequantize_blocks<B: Block>(src: &[u8], dst: &mut [f32], expand: impl Fn(&B, &mut [f32])) {
    for (s, d) in src
        .chunks_exact(B::BYTES)
        .zip(dst.chunks_exact_mut(B::ELEMS))
    {
        expand(&B::read(s), d);
    }
}

/// Adds per-block dot contributions in block order into one f32, as ggml's
/// generic dots for the 32-wide formats do.
fn dot_blocks<W: Block, A: Block>(w: &[u8], a: &[u8], dot: impl Fn(&W, &A) -> f32) -> f32 {
    let mut sum = 0.0f32;
    for (wb, ab) in w.chunks_exact(W::BYTES).zip(a.chunks_exact(A::BYTES)) {
        sum += dot(&W::read(wb), &A::read(ab));
    }
    sum
}

/// Dot over k-quant super-blocks with ggml's 8-lane accumulation.
fn dot_kblocks<W: Block>(
    w: &[u8],
    a: &[u8],
    add: impl Fn(&mut kquants::KDot, &W, &BlockQ8K),
) -> f32 {
    let mut acc = kquants::KDot::default();
    for (wb, ab) in w
        .chunks_exact(W::BYTES)
        .zip(a.chunks_exact(BlockQ8K::BYTES))
    {
        add(&mut acc, &W::read(wb), &BlockQ8K::read(ab));
    }
    acc.finish()
}

/// Stores the row `x` as weight type `ty`, exactly as ggml's
/// `ggml_quantize_chunk` does without an importance matrix (the
/// `quantize_row_*_ref` quantizers; F16/BF16 round to nearest even).
///
/// # Panics
/// If `x.len()` is not a multiple of the block size or `out` is not
/// `ty.row_bytes(x.len())` long.
pub fn quantize_row(ty: WeightType, x: &[f32], out: &mut [u8]) {
    let n = x.len();
    check_row(ty.name(), out.len(), ty.row_bytes(n), n);
    match ty {
        WeightType::F32 => float::write_f32(x, out),
        WeightType::F16 => float::write_f16(x, out),
        WeightType::BF16 => float::write_bf16(x, out),
        WeightType::Q4_0 => quantize_blocks(x, out, legacy::quantize_q4_0),
        WeightType::Q4_1 => quantize_blocks(x, out, legacy::quantize_q4_1),
        WeightType::Q5_0 => quantize_blocks(x, out, legacy::quantize_q5_0),
        WeightType::Q5_1 => quantize_blocks(x, out, legacy::quantize_q5_1),
        WeightType::Q8_0 => quantize_blocks(x, out, legacy::quantize_q8_0),
        WeightType::Q4K => quantize_blocks(x, out, kquants::quantize_q4k),
        WeightType::Q5K => quantize_blocks(x, out, kquants::quantize_q5k),
        WeightType::Q6K => quantize_blocks(x, out, kquants::quantize_q6k),
    }
}

/// Converts an activation row to `ty`, as ggml's reference quantizers do
/// (`quantize_row_q8_0_ref`, `_q8_1_ref`, `_q8_K_ref`; F16/BF16 round to
/// nearest even; F32 is copied).
///
/// # Panics
/// If `x.len()` is not a multiple of the block size or `out` is not
/// `ty.row_bytes(x.len())` long.
pub fn quantize_acts(ty: ActType, x: &[f32], out: &mut [u8]) {
    let n = x.len();
    check_row(ty.name(), out.len(), ty.row_bytes(n), n);
    match ty {
        ActType::F32 => float::write_f32(x, out),
        ActType::F16 => float::write_f16(x, out),
        ActType::BF16 => float::write_bf16(x, out),
        ActType::Q8_0 => quantize_blocks(x, out, legacy::quantize_q8_0),
        ActType::Q8_1 => quantize_blocks(x, out, legacy::quantize_q8_1),
        ActType::Q8K => quantize_blocks(x, out, kquants::quantize_q8k),
    }
}

/// Expands a weight row of type `ty` to f32, exactly as ggml's
/// `dequantize_row_*` (and `ggml_fp16_to_fp32_row` etc.).
///
/// # Panics
/// If `dst.len()` is not a multiple of the block size or `src` is not
/// `ty.row_bytes(dst.len())` long.
pub fn dequantize_row(ty: WeightType, src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    check_row(ty.name(), src.len(), ty.row_bytes(n), n);
    match ty {
        WeightType::F32 => dst
            .iter_mut()
            .zip(float::f32_values(src))
            .for_each(|(d, v)| *d = v),
        WeightType::F16 => dst
            .iter_mut()
            .zip(float::f16_values(src))
            .for_each(|(d, v)| *d = v),
        WeightType::BF16 => dst
            .iter_mut()
            .zip(float::bf16_values(src))
            .for_each(|(d, v)| *d = v),
        WeightType::Q4_0 => dequantize_blocks(src, dst, legacy::dequantize_q4_0),
        WeightType::Q4_1 => dequantize_blocks(src, dst, legacy::dequantize_q4_1),
        WeightType::Q5_0 => dequantize_blocks(src, dst, legacy::dequantize_q5_0),
        WeightType::Q5_1 => dequantize_blocks(src, dst, legacy::dequantize_q5_1),
        WeightType::Q8_0 => dequantize_blocks(src, dst, legacy::dequantize_q8_0),
        WeightType::Q4K => dequantize_blocks(src, dst, kquants::dequantize_q4k),
        WeightType::Q5K => dequantize_blocks(src, dst, kquants::dequantize_q5k),
        WeightType::Q6K => dequantize_blocks(src, dst, kquants::dequantize_q6k),
    }
}

/// Dot product of one weight row of type `ty` with one activation row already
/// converted to `ty.act_type()` (see [`quantize_acts`]), both `n` elements.
///
/// Follows ggml's generic `ggml_vec_dot_*`: exact integer sums per block,
/// scales applied and blocks accumulated in f32 in ggml's order (f64 for the
/// float types, as ggml's non-SIMD build).
///
/// # Panics
/// If either row's length does not match `n`.
pub fn vec_dot(ty: WeightType, w_row: &[u8], act_row: &[u8], n: usize) -> f32 {
    check_row(ty.name(), w_row.len(), ty.row_bytes(n), n);
    let act = ty.act_type();
    check_row(act.name(), act_row.len(), act.row_bytes(n), n);
    match ty {
        WeightType::F32 => float::dot(float::f32_values(w_row), float::f32_values(act_row)),
        WeightType::F16 => float::dot(float::f16_values(w_row), float::f16_values(act_row)),
        WeightType::BF16 => float::dot(float::bf16_values(w_row), float::bf16_values(act_row)),
        WeightType::Q4_0 => dot_blocks::<BlockQ4_0, BlockQ8_0>(w_row, act_row, legacy::dot_q4_0),
        WeightType::Q4_1 => dot_blocks::<BlockQ4_1, BlockQ8_1>(w_row, act_row, legacy::dot_q4_1),
        WeightType::Q5_0 => dot_blocks::<BlockQ5_0, BlockQ8_0>(w_row, act_row, legacy::dot_q5_0),
        WeightType::Q5_1 => dot_blocks::<BlockQ5_1, BlockQ8_1>(w_row, act_row, legacy::dot_q5_1),
        WeightType::Q8_0 => dot_blocks::<BlockQ8_0, BlockQ8_0>(w_row, act_row, legacy::dot_q8_0),
        WeightType::Q4K => dot_kblocks::<BlockQ4K>(w_row, act_row, kquants::KDot::add_q4k),
        WeightType::Q5K => dot_kblocks::<BlockQ5K>(w_row, act_row, kquants::KDot::add_q5k),
        WeightType::Q6K => dot_kblocks::<BlockQ6K>(w_row, act_row, kquants::KDot::add_q6k),
    }
}

/// The scalar reference matmul: `y[t * rows + r] = vec_dot(W[r], acts(x[t]))`
/// for a row-major weight matrix `w` (`rows` rows of `cols` elements of type
/// `ty`) and `n_tok` activation rows `x` (row-major `[n_tok][cols]`); `y` is
/// row-major `[n_tok][rows]`. Each activation row is converted once, as
/// ggml's `mul_mat` does.
///
/// # Panics
/// If a slice length does not match the shapes.
pub fn matmul_ref(
    ty: WeightType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
) {
    let w_row = ty.row_bytes(cols);
    let act = ty.act_type();
    let a_row = act.row_bytes(cols);
    assert_eq!(w.len(), rows * w_row, "{}: weight matrix size", ty.name());
    assert_eq!(x.len(), n_tok * cols, "activations must be n_tok x cols");
    assert_eq!(y.len(), n_tok * rows, "output must be n_tok x rows");
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    if rows == 0 {
        return;
    }
    let mut acts = vec![0u8; a_row];
    for (xt, yt) in x.chunks_exact(cols).zip(y.chunks_exact_mut(rows)) {
        quantize_acts(act, xt, &mut acts);
        for (wr, out) in w.chunks_exact(w_row).zip(yt.iter_mut()) {
            *out = vec_dot(ty, wr, &acts, cols);
        }
    }
}

// Typed single-format entry points, kept for callers that hold block slices.

/// Quantizes `x` (length a multiple of 32) to Q8_0 blocks.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "q8_0: input length must be 32 x blocks"
    );
    for (xs, b) in x.chunks_exact(QK).zip(out) {
        *b = legacy::quantize_q8_0(xs);
    }
}

/// Quantizes `x` (length a multiple of 32) to Q4_0 blocks.
pub fn quantize_row_q4_0(x: &[f32], out: &mut [BlockQ4_0]) {
    assert_eq!(
        x.len(),
        out.len() * QK,
        "q4_0: input length must be 32 x blocks"
    );
    for (xs, b) in x.chunks_exact(QK).zip(out) {
        *b = legacy::quantize_q4_0(xs);
    }
}

/// Expands Q8_0 blocks to f32.
pub fn dequantize_row_q8_0(x: &[BlockQ8_0], out: &mut [f32]) {
    assert_eq!(out.len(), x.len() * QK);
    for (b, o) in x.iter().zip(out.chunks_exact_mut(QK)) {
        legacy::dequantize_q8_0(b, o);
    }
}

/// Expands Q4_0 blocks to f32.
pub fn dequantize_row_q4_0(x: &[BlockQ4_0], out: &mut [f32]) {
    assert_eq!(out.len(), x.len() * QK);
    for (b, o) in x.iter().zip(out.chunks_exact_mut(QK)) {
        legacy::dequantize_q4_0(b, o);
    }
}

#[cfg(test)]
mod tests;
