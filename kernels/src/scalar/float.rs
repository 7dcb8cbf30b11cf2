//! Unquantized rows: F32, F16 and BF16 conversions and dot products.
//!
//! Conversions round to nearest, ties to even, as ggml's do; dot products
//! accumulate f32 products in f64, as ggml's non-SIMD build does.

use half::f16;

/// f32 to bf16 bits exactly as ggml: round to nearest even, NaN made quiet.
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 64) as u16;
    }
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// bf16 bits to f32 (exact).
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Parses little-endian values of `W` bytes each.
fn elements<const W: usize>(bytes: &[u8]) -> impl Iterator<Item = [u8; W]> + '_ {
    bytes
        .chunks_exact(W)
        .map(|c| c.try_into().expect("chunk has W bytes"))
}

pub(super) fn f32_values(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    elements::<4>(bytes).map(f32::from_le_bytes)
}

pub(super) fn f16_values(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    elements::<2>(bytes).map(|b| f16::from_le_bytes(b).to_f32())
}

pub(super) fn bf16_values(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    elements::<2>(bytes).map(|b| bf16_bits_to_f32(u16::from_le_bytes(b)))
}

pub(super) fn write_f32(x: &[f32], out: &mut [u8]) {
    for (o, v) in out.chunks_exact_mut(4).zip(x) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

pub(super) fn write_f16(x: &[f32], out: &mut [u8]) {
    for (o, &v) in out.chunks_exact_mut(2).zip(x) {
        o.copy_from_slice(&f16::from_f32(v).to_le_bytes());
    }
}

pub(super) fn write_bf16(x: &[f32], out: &mut [u8]) {
    for (o, &v) in out.chunks_exact_mut(2).zip(x) {
        o.copy_from_slice(&f32_to_bf16_bits(v).to_le_bytes());
    }
}

/// Sum of f32 products accumulated in f64, rounded to f32 once at the end.
pub(super) fn dot(a: impl Iterator<Item = f32>, b: impl Iterator<Item = f32>) -> f32 {
    let mut sum = 0.0f64;
    for (x, y) in a.zip(b) {
        sum += f64::from(x * y);
    }
    sum as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_ties_to_even_and_quiets_nan() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go even.
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(f32_to_bf16_bits(1.0 + 1.0 / 256.0 + 1e-6), 0x3f81);
        assert_eq!(f32_to_bf16_bits(-2.0), 0xc000);
        assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80, "rounds up to inf");
        assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(bf16_bits_to_f32(0x3f81), 1.0078125);
    }
}
