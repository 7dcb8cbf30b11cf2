//! ggml's quantized block formats, bit-for-bit as llama.cpp stores them.
//!
//! Every block is `#[repr(C)]` with its size checked at compile time, so a
//! slice of blocks can be viewed directly over bytes from a GGUF mapping.

use half::f16;

/// Elements per block of the 32-wide formats.
pub const QK: usize = 32;
/// Elements per super-block of the k-quant formats.
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales/mins in `Q4_K` and `Q5_K`.
pub const K_SCALE_SIZE: usize = 12;

/// 4-bit, one f16 scale per 32 weights: `w = d * (q - 8)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// 4-bit with scale and minimum: `w = d * q + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// 5-bit: low nibbles in `qs`, fifth bits in `qh`; `w = d * (q - 16)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 5-bit with scale and minimum: `w = d * q + m`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 8-bit, one f16 scale per 32 weights: `w = d * q`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// 4-bit k-quant: 8 sub-blocks of 32 with 6-bit scales and mins.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}

/// 5-bit k-quant.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// 6-bit k-quant: 16 sub-blocks of 16 with 8-bit scales.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// 8-bit activation format used against `Q4_1`/`Q5_1`: like `Q8_0`, plus
/// `s = d * sum(qs)` so the weight minimum can be applied once per block.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}

/// 8-bit activation format used against k-quants: f32 scale and per-16 sums.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(size_of::<BlockQ4_0>() == 18);
const _: () = assert!(size_of::<BlockQ4_1>() == 20);
const _: () = assert!(size_of::<BlockQ5_0>() == 22);
const _: () = assert!(size_of::<BlockQ5_1>() == 24);
const _: () = assert!(size_of::<BlockQ8_0>() == 34);
const _: () = assert!(size_of::<BlockQ8_1>() == 36);
const _: () = assert!(size_of::<BlockQ4K>() == 144);
const _: () = assert!(size_of::<BlockQ5K>() == 176);
const _: () = assert!(size_of::<BlockQ6K>() == 210);
const _: () = assert!(size_of::<BlockQ8K>() == 292);

// The byte views below reinterpret little-endian file bytes as native fields.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "ggml block layouts are little-endian"
);

/// A block type that may be copied to and from raw bytes.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, built only from integers, `f16` and
/// `f32` (so every bit pattern is a valid value) and have no padding bytes
/// (every byte of a value is initialized). The size asserts above check the
/// last point for the types in this module: each size equals the sum of its
/// fields.
pub unsafe trait Block: Copy {
    /// Elements (weights or activations) one block holds.
    const ELEMS: usize;
    /// Bytes of one block, as stored in a row.
    const BYTES: usize = size_of::<Self>();

    /// Copies a block out of the first `Self::BYTES` bytes of `bytes`, which
    /// need not be aligned.
    #[inline]
    fn read(bytes: &[u8]) -> Self {
        assert!(
            bytes.len() >= Self::BYTES,
            "block read past the end of a row"
        );
        // SAFETY: the length was checked above, `read_unaligned` has no
        // alignment requirement, and the trait contract makes every bit
        // pattern a valid `Self`.
        unsafe { bytes.as_ptr().cast::<Self>().read_unaligned() }
    }

    /// Writes the block to the first `Self::BYTES` bytes of `out`.
    #[inline]
    fn write(&self, out: &mut [u8]) {
        // SAFETY: `self` is a live value of `Self::BYTES` bytes, and the trait
        // contract says none of them is padding, so all are initialized.
        let bytes =
            unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), Self::BYTES) };
        out[..Self::BYTES].copy_from_slice(bytes);
    }
}

// SAFETY (all impls): each type is `#[repr(C)]`, made of integers and `f16`
// (plus one `f32` in `BlockQ8K`), and its asserted size equals the sum of its
// field sizes, so it has no padding.
unsafe impl Block for BlockQ4_0 {
    const ELEMS: usize = QK;
}
unsafe impl Block for BlockQ4_1 {
    const ELEMS: usize = QK;
}
unsafe impl Block for BlockQ5_0 {
    const ELEMS: usize = QK;
}
unsafe impl Block for BlockQ5_1 {
    const ELEMS: usize = QK;
}
unsafe impl Block for BlockQ8_0 {
    const ELEMS: usize = QK;
}
unsafe impl Block for BlockQ8_1 {
    const ELEMS: usize = QK;
}
unsafe impl Block for BlockQ4K {
    const ELEMS: usize = QK_K;
}
unsafe impl Block for BlockQ5K {
    const ELEMS: usize = QK_K;
}
unsafe impl Block for BlockQ6K {
    const ELEMS: usize = QK_K;
}
unsafe impl Block for BlockQ8K {
    const ELEMS: usize = QK_K;
}
