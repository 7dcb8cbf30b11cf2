//! NEON dots of the 32-wide weight formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
//! with their 8-bit activations (Q8_0, or Q8_1 for the formats with a
//! minimum), for 1-2 weight rows x 1-4 activation rows per call.
//!
//! Bit-identical to `scalar::vec_dot`: each block's integer sum is exact
//! (any order gives the same integer), then the block's float expression is
//! evaluated with the scalar's operations in the scalar's association (no
//! fused multiply-add), and blocks are added in order. The float steps run
//! with one token per vector lane, or for a lone token with one block per
//! lane (the contributions then added one at a time): either way every block
//! of every (row, token) goes through the scalar's operations, so a result
//! never depends on what shares the call.

use super::simd::{
    block, f16_splat, f16x4_to_f32, le_u16, load_s8, load_u8, reduce, sdot, set_lane_u16,
};
use std::arch::aarch64::*;

/// One 32-wide weight format: how to expand a block to signed bytes and
/// how the scalar reference turns a block's integer sum into its float
/// contribution.
pub(super) trait Legacy {
    /// Bytes of one weight block.
    const BYTES: usize;
    /// Bytes of one activation block: 34 (Q8_0) or 36 (Q8_1, whose `s` at
    /// bytes 2..4 carries `d * sum(qs)` for the minimum term).
    const ACT_BYTES: usize;
    /// Whether |weight| can reach 128, so that four products per i16 lane
    /// could overflow and the plain path must widen after every product pair.
    const WIDE: bool = false;
    /// Whether a lone token's two weight rows run as two 1-row passes: the
    /// 5-bit expansion needs enough registers that a 2-row x 4-block tile
    /// spills and costs more than it saves (measured).
    const SPLIT_ROWS: bool = false;

    /// The 32 weights of block `b` as signed bytes: elements 0..16 and 16..32.
    ///
    /// # Safety
    /// NEON must be available (it is baseline on aarch64 Linux).
    unsafe fn unpack(b: &[u8]) -> (int8x16_t, int8x16_t);

    /// The block's `d` and (for Q4_1 / Q5_1) `m`, as f16 bits.
    fn scales(b: &[u8]) -> (u16, u16);

    /// Each lane's block contribution from its integer sum `sumf`, weight
    /// scale `dw` and minimum `mw` (broadcast), and the token's activation
    /// scale `dx` and `sx` (Q8_1's `s`), in the scalar's order.
    ///
    /// # Safety
    /// NEON must be available.
    unsafe fn combine(
        sumf: float32x4_t,
        dw: float32x4_t,
        mw: float32x4_t,
        dx: float32x4_t,
        sx: float32x4_t,
    ) -> float32x4_t;
}

/// The 5th bits of a Q5 block (`qh`, little-endian) for elements 0..16 and
/// 16..32, each lane 0x00 or 0xff.
#[inline]
#[target_feature(enable = "neon")]
fn fifth_bits(qh: u32) -> (uint8x16_t, uint8x16_t) {
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    const LO: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
    const HI: [u8; 16] = [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3];
    let bytes = vreinterpretq_u8_u32(vdupq_n_u32(qh));
    let bit = load_u8(&BIT, 0);
    let lo = vtstq_u8(vqtbl1q_u8(bytes, load_u8(&LO, 0)), bit);
    let hi = vtstq_u8(vqtbl1q_u8(bytes, load_u8(&HI, 0)), bit);
    (lo, hi)
}

/// Low and high nibbles of 16 packed bytes: elements 0..16 and 16..32.
#[inline]
#[target_feature(enable = "neon")]
fn nibbles(qs: uint8x16_t) -> (uint8x16_t, uint8x16_t) {
    (vandq_u8(qs, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(qs))
}

pub(super) struct Q4_0;
pub(super) struct Q4_1;
pub(super) struct Q5_0;
pub(super) struct Q5_1;
pub(super) struct Q8_0;

impl Legacy for Q4_0 {
    const BYTES: usize = 18;
    const ACT_BYTES: usize = 34;

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn unpack(b: &[u8]) -> (int8x16_t, int8x16_t) {
        let (lo, hi) = nibbles(load_u8(b, 2));
        let eight = vdupq_n_s8(8);
        (
            vsubq_s8(vreinterpretq_s8_u8(lo), eight),
            vsubq_s8(vreinterpretq_s8_u8(hi), eight),
        )
    }

    fn scales(b: &[u8]) -> (u16, u16) {
        (le_u16(b, 0), 0)
    }

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn combine(
        sumf: float32x4_t,
        dw: float32x4_t,
        _mw: float32x4_t,
        dx: float32x4_t,
        _sx: float32x4_t,
    ) -> float32x4_t {
        // sum as f32 * w.d * a.d
        vmulq_f32(vmulq_f32(sumf, dw), dx)
    }
}

impl Legacy for Q4_1 {
    const BYTES: usize = 20;
    const ACT_BYTES: usize = 36;

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn unpack(b: &[u8]) -> (int8x16_t, int8x16_t) {
        let (lo, hi) = nibbles(load_u8(b, 4));
        (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
    }

    fn scales(b: &[u8]) -> (u16, u16) {
        (le_u16(b, 0), le_u16(b, 2))
    }

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn combine(
        sumf: float32x4_t,
        dw: float32x4_t,
        mw: float32x4_t,
        dx: float32x4_t,
        sx: float32x4_t,
    ) -> float32x4_t {
        // w.d * a.d * sum as f32 + w.m * a.s
        vaddq_f32(vmulq_f32(vmulq_f32(dw, dx), sumf), vmulq_f32(mw, sx))
    }
}

impl Legacy for Q5_0 {
    const BYTES: usize = 22;
    const ACT_BYTES: usize = 34;
    const SPLIT_ROWS: bool = true;

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn unpack(b: &[u8]) -> (int8x16_t, int8x16_t) {
        let (lo, hi) = nibbles(load_u8(b, 6));
        let (blo, bhi) = fifth_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]]));
        // code - 16 = nibble - (16 unless the fifth bit is set)
        let sixteen = vdupq_n_u8(16);
        (
            vreinterpretq_s8_u8(vsubq_u8(lo, vbicq_u8(sixteen, blo))),
            vreinterpretq_s8_u8(vsubq_u8(hi, vbicq_u8(sixteen, bhi))),
        )
    }

    fn scales(b: &[u8]) -> (u16, u16) {
        (le_u16(b, 0), 0)
    }

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn combine(
        sumf: float32x4_t,
        dw: float32x4_t,
        _mw: float32x4_t,
        dx: float32x4_t,
        _sx: float32x4_t,
    ) -> float32x4_t {
        // w.d * a.d * sum as f32
        vmulq_f32(vmulq_f32(dw, dx), sumf)
    }
}

impl Legacy for Q5_1 {
    const BYTES: usize = 24;
    const ACT_BYTES: usize = 36;
    const SPLIT_ROWS: bool = true;

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn unpack(b: &[u8]) -> (int8x16_t, int8x16_t) {
        let (lo, hi) = nibbles(load_u8(b, 8));
        let (blo, bhi) = fifth_bits(u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
        let sixteen = vdupq_n_u8(16);
        (
            vreinterpretq_s8_u8(vorrq_u8(lo, vandq_u8(blo, sixteen))),
            vreinterpretq_s8_u8(vorrq_u8(hi, vandq_u8(bhi, sixteen))),
        )
    }

    fn scales(b: &[u8]) -> (u16, u16) {
        (le_u16(b, 0), le_u16(b, 2))
    }

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn combine(
        sumf: float32x4_t,
        dw: float32x4_t,
        mw: float32x4_t,
        dx: float32x4_t,
        sx: float32x4_t,
    ) -> float32x4_t {
        // w.d * a.d * sum as f32 + w.m * a.s
        vaddq_f32(vmulq_f32(vmulq_f32(dw, dx), sumf), vmulq_f32(mw, sx))
    }
}

impl Legacy for Q8_0 {
    const BYTES: usize = 34;
    const ACT_BYTES: usize = 34;
    const WIDE: bool = true;

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn unpack(b: &[u8]) -> (int8x16_t, int8x16_t) {
        (load_s8(b, 2), load_s8(b, 18))
    }

    fn scales(b: &[u8]) -> (u16, u16) {
        (le_u16(b, 0), 0)
    }

    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn combine(
        sumf: float32x4_t,
        dw: float32x4_t,
        _mw: float32x4_t,
        dx: float32x4_t,
        _sx: float32x4_t,
    ) -> float32x4_t {
        // sum as f32 * (w.d * a.d): ggml groups the scales first here.
        vmulq_f32(sumf, vmulq_f32(dw, dx))
    }
}

/// Exact integer dot of 32 weights with 32 activations, left as four i32
/// lanes, without dotprod. Below 128 in magnitude, four products fit an i16
/// lane (4 * 127 * 128 < 2^15): multiply-accumulate in i16, widen once.
/// Q8_0 weights may be -128, so there every product pair is widened.
#[inline]
#[target_feature(enable = "neon")]
fn dot_plain<K: Legacy>(w0: int8x16_t, w1: int8x16_t, x0: int8x16_t, x1: int8x16_t) -> int32x4_t {
    if K::WIDE {
        let s = vpaddlq_s16(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
        let s = vpadalq_s16(s, vmull_high_s8(w0, x0));
        let s = vpadalq_s16(s, vmull_s8(vget_low_s8(w1), vget_low_s8(x1)));
        vpadalq_s16(s, vmull_high_s8(w1, x1))
    } else {
        let p = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
        let p = vmlal_high_s8(p, w0, x0);
        let p = vmlal_s8(p, vget_low_s8(w1), vget_low_s8(x1));
        vpaddlq_s16(vmlal_high_s8(p, w1, x1))
    }
}

/// The same integer lanes' total with two `sdot`s.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn dot_sdot<K: Legacy>(w0: int8x16_t, w1: int8x16_t, x0: int8x16_t, x1: int8x16_t) -> int32x4_t {
    sdot(sdot(vdupq_n_s32(0), w0, x0), w1, x1)
}

/// Generates the tile body for one integer-dot flavour.
macro_rules! tile_fn {
    ($name:ident, $features:literal, $dot:ident) => {
        /// Dots of `R` weight rows of format `K` with `N` activation rows;
        /// `out[r * N + t]`. Each row's blocks are expanded once and serve
        /// every token; each token's activation block serves both rows.
        #[inline]
        #[target_feature(enable = $features)]
        fn $name<K: Legacy, const R: usize, const N: usize>(
            ws: &[&[u8]],
            xs: &[&[u8]],
            out: &mut [f32],
        ) {
            let nb = ws[0].len() / K::BYTES;
            for w in ws {
                assert_eq!(w.len() / K::BYTES, nb, "weight rows differ in length");
            }
            for x in xs {
                assert!(
                    x.len() >= nb * K::ACT_BYTES,
                    "activation row shorter than the weight row"
                );
            }
            assert!(out.len() >= R * N, "output shorter than rows x tokens");
            let qs_at = K::ACT_BYTES - 32;
            // Row slices in locals, so the loop keeps their pointers in registers.
            let wrows: [&[u8]; R] = std::array::from_fn(|r| ws[r]);
            let xrows: [&[u8]; N] = std::array::from_fn(|t| xs[t]);
            // Lane t: token t's running sum, as the scalar's `sum` for it.
            let mut acc = [vdupq_n_f32(0.0); R];
            let mut start = 0;
            if N == 1 {
                // One token (decode): four blocks per vector instead, so the
                // reduction and the float expression serve four blocks; the
                // contributions are then added one by one in block order.
                // Each block sees the same operations as below: same bits.
                let x = xrows[0];
                let mut sum = [0.0f32; R];
                for g in 0..nb / 4 {
                    let (mut dx, mut sx) = (vdup_n_u16(0), vdup_n_u16(0));
                    let mut xv = [(vdupq_n_s8(0), vdupq_n_s8(0)); 4];
                    for k in 0..4 {
                        // SAFETY: 4g + k < nb, and every row holds nb blocks.
                        let b = unsafe { block(x, 4 * g + k, K::ACT_BYTES) };
                        dx = set_lane_u16(dx, k, le_u16(b, 0));
                        if K::ACT_BYTES == 36 {
                            sx = set_lane_u16(sx, k, le_u16(b, 2));
                        }
                        xv[k] = (load_s8(b, qs_at), load_s8(b, qs_at + 16));
                    }
                    let (dx, sx) = (f16x4_to_f32(dx), f16x4_to_f32(sx));
                    for r in 0..R {
                        let (mut dw, mut mw) = (vdup_n_u16(0), vdup_n_u16(0));
                        let mut sums = [vdupq_n_s32(0); 4];
                        for k in 0..4 {
                            // SAFETY: as above.
                            let b = unsafe { block(wrows[r], 4 * g + k, K::BYTES) };
                            // SAFETY: NEON is baseline on aarch64.
                            let (w0, w1) = unsafe { K::unpack(b) };
                            let (d, m) = K::scales(b);
                            dw = set_lane_u16(dw, k, d);
                            mw = set_lane_u16(mw, k, m);
                            sums[k] = $dot::<K>(w0, w1, xv[k].0, xv[k].1);
                        }
                        let sumf = vcvtq_f32_s32(reduce(sums, 4));
                        let (dw, mw) = (f16x4_to_f32(dw), f16x4_to_f32(mw));
                        // SAFETY: NEON is baseline on aarch64.
                        let c = unsafe { K::combine(sumf, dw, mw, dx, sx) };
                        sum[r] += vgetq_lane_f32::<0>(c);
                        sum[r] += vgetq_lane_f32::<1>(c);
                        sum[r] += vgetq_lane_f32::<2>(c);
                        sum[r] += vgetq_lane_f32::<3>(c);
                    }
                }
                start = nb / 4 * 4;
                for r in 0..R {
                    acc[r] = vsetq_lane_f32::<0>(sum[r], acc[r]);
                }
            }
            for i in start..nb {
                let mut w = [(vdupq_n_s8(0), vdupq_n_s8(0)); R];
                let mut dw = [vdupq_n_f32(0.0); R];
                let mut mw = [vdupq_n_f32(0.0); R];
                for r in 0..R {
                    // SAFETY: i < nb, and every row holds nb blocks (asserted).
                    let b = unsafe { block(wrows[r], i, K::BYTES) };
                    // SAFETY: NEON is baseline on aarch64.
                    w[r] = unsafe { K::unpack(b) };
                    let (d, m) = K::scales(b);
                    dw[r] = f16_splat(d);
                    mw[r] = f16_splat(m);
                }
                // Lanes past N are unspecified and never stored.
                let (mut dx, mut sx) = (vdup_n_u16(0), vdup_n_u16(0));
                let mut sums = [[vdupq_n_s32(0); 4]; R];
                for t in 0..N {
                    // SAFETY: as above, for the activation rows.
                    let b = unsafe { block(xrows[t], i, K::ACT_BYTES) };
                    dx = set_lane_u16(dx, t, le_u16(b, 0));
                    if K::ACT_BYTES == 36 {
                        sx = set_lane_u16(sx, t, le_u16(b, 2));
                    }
                    let (x0, x1) = (load_s8(b, qs_at), load_s8(b, qs_at + 16));
                    for r in 0..R {
                        sums[r][t] = $dot::<K>(w[r].0, w[r].1, x0, x1);
                    }
                }
                let (dx, sx) = (f16x4_to_f32(dx), f16x4_to_f32(sx));
                for r in 0..R {
                    let sumf = vcvtq_f32_s32(reduce(sums[r], N));
                    // SAFETY: NEON is baseline on aarch64.
                    let c = unsafe { K::combine(sumf, dw[r], mw[r], dx, sx) };
                    acc[r] = vaddq_f32(acc[r], c);
                }
            }
            for r in 0..R {
                let mut lanes = [0.0f32; 4];
                // SAFETY: `lanes` is 4 writable f32s.
                unsafe { vst1q_f32(lanes.as_mut_ptr(), acc[r]) };
                out[r * N..(r + 1) * N].copy_from_slice(&lanes[..N]);
            }
        }
    };
}

tile_fn!(tile_plain, "neon", dot_plain);
tile_fn!(tile_sdot, "neon,dotprod", dot_sdot);

/// Generates a public entry point: 1-2 weight rows, 1-4 activation rows.
macro_rules! entry {
    ($(#[$doc:meta])* $name:ident, $features:literal, $tile:ident, $kind:ty) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        pub unsafe fn $name(ws: &[&[u8]], xs: &[&[u8]], out: &mut [f32]) {
            match (ws.len(), xs.len()) {
                (1, 1) => $tile::<$kind, 1, 1>(ws, xs, out),
                (1, 2) => $tile::<$kind, 1, 2>(ws, xs, out),
                (1, 3) => $tile::<$kind, 1, 3>(ws, xs, out),
                (1, 4) => $tile::<$kind, 1, 4>(ws, xs, out),
                (2, 1) if <$kind as Legacy>::SPLIT_ROWS => {
                    let bytes = <$kind as Legacy>::BYTES;
                    assert_eq!(ws[0].len() / bytes, ws[1].len() / bytes, "weight rows differ in length");
                    $tile::<$kind, 1, 1>(&ws[..1], xs, &mut out[..1]);
                    $tile::<$kind, 1, 1>(&ws[1..], xs, &mut out[1..]);
                }
                (2, 1) => $tile::<$kind, 2, 1>(ws, xs, out),
                (2, 2) => $tile::<$kind, 2, 2>(ws, xs, out),
                (2, 3) => $tile::<$kind, 2, 3>(ws, xs, out),
                (2, 4) => $tile::<$kind, 2, 4>(ws, xs, out),
                (r, n) => panic!(
                    "{} takes 1-2 weight rows and 1-4 activation rows, got {r} and {n}",
                    stringify!($name)
                ),
            }
        }
    };
}

entry!(
    /// Dots of one or two Q4_0 weight rows with one to four Q8_0 activation
    /// rows; `out[r * xs.len() + t]`, bit-identical to `scalar::vec_dot`.
    ///
    /// # Safety
    /// The CPU must support NEON.
    ///
    /// # Panics
    /// If the weight rows differ in block count, an activation row holds
    /// fewer blocks, or `out` is shorter than rows x tokens.
    q4_0, "neon", tile_plain, Q4_0
);
entry!(
    /// [`q4_0`] with `sdot` (same bits).
    ///
    /// # Safety
    /// As for [`q4_0`], and the CPU must support dotprod.
    q4_0_sdot, "neon,dotprod", tile_sdot, Q4_0
);
entry!(
    /// Q4_1 weights with Q8_1 activations, as [`q4_0`].
    ///
    /// # Safety
    /// As for [`q4_0`].
    q4_1, "neon", tile_plain, Q4_1
);
entry!(
    /// [`q4_1`] with `sdot` (same bits).
    ///
    /// # Safety
    /// As for [`q4_0_sdot`].
    q4_1_sdot, "neon,dotprod", tile_sdot, Q4_1
);
entry!(
    /// Q5_0 weights with Q8_0 activations, as [`q4_0`].
    ///
    /// # Safety
    /// As for [`q4_0`].
    q5_0, "neon", tile_plain, Q5_0
);
entry!(
    /// [`q5_0`] with `sdot` (same bits).
    ///
    /// # Safety
    /// As for [`q4_0_sdot`].
    q5_0_sdot, "neon,dotprod", tile_sdot, Q5_0
);
entry!(
    /// Q5_1 weights with Q8_1 activations, as [`q4_0`].
    ///
    /// # Safety
    /// As for [`q4_0`].
    q5_1, "neon", tile_plain, Q5_1
);
entry!(
    /// [`q5_1`] with `sdot` (same bits).
    ///
    /// # Safety
    /// As for [`q4_0_sdot`].
    q5_1_sdot, "neon,dotprod", tile_sdot, Q5_1
);
entry!(
    /// Q8_0 weights with Q8_0 activations, as [`q4_0`].
    ///
    /// # Safety
    /// As for [`q4_0`].
    q8_0, "neon", tile_plain, Q8_0
);
entry!(
    /// [`q8_0`] with `sdot` (same bits).
    ///
    /// # Safety
    /// As for [`q4_0_sdot`].
    q8_0_sdot, "neon,dotprod", tile_sdot, Q8_0
);
