//! NEON dots of the k-quant super-blocks (Q4_K, Q5_K, Q6_K) with Q8_K
//! activations, for 1-2 weight rows x 1-4 activation rows per call.
//!
//! Each weight block is expanded once and serves up to four tokens, but the
//! rows of a call run one after the other: an expanded super-block is 16
//! vectors, two of them do not fit the 32 registers beside the activations,
//! and the spills cost more than sharing the activation loads saves
//! (measured: a 2-row x 4-token Q4_K tile took ~70% more instructions per
//! dot than two 1 x 4 passes).
//!
//! Bit-identical to `scalar::vec_dot`, which follows ggml's generic order:
//! per super-block, integer products go to 8 interleaved lanes (element `e`
//! to lane `e % 8`), each lane is converted and scaled into its own f32 sum,
//! the min correction goes to a separate total, and the lanes are added to
//! it at the end. NEON reproduces the lanes exactly: a widening multiply of
//! 16 consecutive bytes leaves elements `k` and `k + 8` in i16 lane `k`, and
//! since sub-blocks start at multiples of 8, every i16 lane only ever holds
//! one interleaved lane's elements. The float steps are the scalar's, in its
//! order, per (row, token), so batching changes nothing.
//!
//! No dotprod variant: `sdot` adds four *adjacent* byte products into a
//! lane, which mixes the interleaved lanes. Keeping them apart means
//! transposing the activations (elements `k, k+8, k+16, k+24` side by side)
//! for every weight row; per sub-block of 32 that is two table lookups, two
//! zeroed accumulators, two `sdot`s and two scale multiply-adds, against
//! the six i16 multiply-accumulates here.

use super::simd::{block, f16_to_f32, le_f32, le_u16, load_s8, load_u8};
use std::arch::aarch64::*;

const Q8K_BYTES: usize = 292;

/// The state the scalar `KDot` keeps for one (row, token): 8 f32 lanes and
/// the total the min corrections are subtracted from.
#[derive(Clone, Copy)]
struct Acc {
    lanes: [float32x4_t; 2],
    total: f32,
}

impl Acc {
    #[inline]
    #[target_feature(enable = "neon")]
    fn new() -> Acc {
        Acc {
            lanes: [vdupq_n_f32(0.0); 2],
            total: 0.0,
        }
    }

    /// `lanes[k] += d * (li[k] as f32)`, as `KDot::add_lanes`.
    #[inline]
    #[target_feature(enable = "neon")]
    fn add_lanes(&mut self, d: f32, li: [int32x4_t; 2]) {
        for (sum, v) in self.lanes.iter_mut().zip(li) {
            *sum = vaddq_f32(*sum, vmulq_n_f32(vcvtq_f32_s32(v), d));
        }
    }

    /// The total plus the lanes one by one, as `KDot::finish`.
    #[inline]
    #[target_feature(enable = "neon")]
    fn finish(self) -> f32 {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` has room for two vectors of 4 f32s.
        unsafe {
            vst1q_f32(lanes.as_mut_ptr(), self.lanes[0]);
            vst1q_f32(lanes.as_mut_ptr().add(4), self.lanes[1]);
        }
        let mut s = self.total;
        for v in lanes {
            s += v;
        }
        s
    }
}

/// Adds one sub-block of 32 (`w0`/`x0`: its elements 0..16, `w1`/`x1`:
/// 16..32) times lane `J` of `scales` to the interleaved lanes `li`. Four
/// products per i16 lane stay below 2^15 for weights up to 31 (4 * 31 * 128).
#[inline]
#[target_feature(enable = "neon")]
fn sub32<const J: i32>(
    li: &mut [int32x4_t; 2],
    w0: int8x16_t,
    w1: int8x16_t,
    x0: int8x16_t,
    x1: int8x16_t,
    scales: int16x8_t,
) {
    let p = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    let p = vmlal_high_s8(p, w0, x0);
    let p = vmlal_s8(p, vget_low_s8(w1), vget_low_s8(x1));
    let p = vmlal_high_s8(p, w1, x1);
    li[0] = vmlal_laneq_s16::<J>(li[0], vget_low_s16(p), scales);
    li[1] = vmlal_high_laneq_s16::<J>(li[1], p, scales);
}

/// Adds one group of 16 times lane `L` of `scales` to the interleaved lanes.
#[inline]
#[target_feature(enable = "neon")]
fn sub16<const L: i32>(li: &mut [int32x4_t; 2], w: int8x16_t, x: int8x16_t, scales: int16x8_t) {
    let p = vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x);
    li[0] = vmlal_laneq_s16::<L>(li[0], vget_low_s16(p), scales);
    li[1] = vmlal_high_laneq_s16::<L>(li[1], p, scales);
}

/// One k-quant format: its block expanded once per call, the integer lanes
/// against a Q8_K block, and the float update of one (row, token).
///
/// The implementations are `#[inline(always)]`, which cannot be combined
/// with `#[target_feature]`, hence plain `unsafe fn`s: left to the inliner,
/// the larger ones stayed out of line and passed their 16 vectors through
/// memory.
trait KQuant {
    const BYTES: usize;
    type Unpacked: Copy;

    /// Block `b` expanded for [`KQuant::lanes`].
    ///
    /// # Safety
    /// NEON must be available (it is baseline on aarch64 Linux).
    unsafe fn unpack(b: &[u8]) -> Self::Unpacked;

    /// The 8 interleaved integer lanes of `w` against Q8_K block `xb`.
    ///
    /// # Safety
    /// As for [`KQuant::unpack`].
    unsafe fn lanes(w: &Self::Unpacked, xb: &[u8]) -> [int32x4_t; 2];

    /// Folds one row's lanes `li` for Q8_K block `xb` (scale `xd`) into `acc`.
    ///
    /// # Safety
    /// As for [`KQuant::unpack`].
    unsafe fn accumulate(acc: &mut Acc, w: &Self::Unpacked, li: [int32x4_t; 2], xb: &[u8], xd: f32);
}

/// A Q4_K or Q5_K block: 256 unsigned levels as 16 vectors in element order,
/// the super-block scales, and the 6-bit sub-block scales and mins.
#[derive(Clone, Copy)]
struct Affine {
    q: [int8x16_t; 16],
    d: f32,
    dmin: f32,
    scales: int16x8_t,
    mins: [int32x4_t; 2],
}

/// Decodes the Q4_K / Q5_K header (bytes 0..16). The 12 packed bytes are
/// unpacked four at a time, as ggml's SIMD paths do; the result equals
/// `scalar::scale_min` for every sub-block (the tests compare whole dots).
#[inline]
#[target_feature(enable = "neon")]
fn affine_header(b: &[u8], q: [int8x16_t; 16]) -> Affine {
    const K1: u32 = 0x3f3f_3f3f;
    const K2: u32 = 0x0f0f_0f0f;
    const K3: u32 = 0x0303_0303;
    let u = |k: usize| u32::from_le_bytes([b[4 + 4 * k], b[5 + 4 * k], b[6 + 4 * k], b[7 + 4 * k]]);
    let (u0, u1, u2) = (u(0), u(1), u(2));
    // Sub-blocks 0..4 keep the low 6 bits of bytes 0..4 (scales) and 4..8
    // (mins); sub-blocks 4..8 take a nibble of bytes 8..12, topped with the
    // high 2 bits of bytes 0..4 (scales) or 4..8 (mins).
    let scales = u64::from(u0 & K1) | u64::from((u2 & K2) | (((u0 >> 6) & K3) << 4)) << 32;
    let mins = u64::from(u1 & K1) | u64::from(((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4)) << 32;
    let mins = vmovl_u8(vcreate_u8(mins));
    Affine {
        q,
        d: f16_to_f32(le_u16(b, 0)),
        dmin: f16_to_f32(le_u16(b, 2)),
        scales: vreinterpretq_s16_u16(vmovl_u8(vcreate_u8(scales))),
        mins: [
            vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(mins))),
            vreinterpretq_s32_u32(vmovl_high_u16(mins)),
        ],
    }
}

/// Integer lanes shared by Q4_K and Q5_K (same element order and scales).
#[inline]
#[target_feature(enable = "neon")]
fn affine_lanes(w: &Affine, xb: &[u8]) -> [int32x4_t; 2] {
    let mut li = [vdupq_n_s32(0); 2];
    macro_rules! sub_block {
        ($($j:literal)*) => {$(
            let (x0, x1) = (load_s8(xb, 4 + 32 * $j), load_s8(xb, 20 + 32 * $j));
            sub32::<$j>(&mut li, w.q[2 * $j], w.q[2 * $j + 1], x0, x1, w.scales);
        )*};
    }
    sub_block!(0 1 2 3 4 5 6 7);
    li
}

/// The float update shared by Q4_K and Q5_K, in `KDot::add_affine`'s order.
#[inline]
#[target_feature(enable = "neon")]
fn affine_accumulate(acc: &mut Acc, w: &Affine, li: [int32x4_t; 2], xb: &[u8], xd: f32) {
    // Each sub-block of 32 covers two of the activations' sums of 16;
    // widening pairwise adds keep even out-of-range sums exact.
    let bsums = |at| vpaddlq_s16(vreinterpretq_s16_s8(load_s8(xb, at)));
    let mins = vmlaq_s32(vmulq_s32(bsums(260), w.mins[0]), bsums(276), w.mins[1]);
    let min_sum = vaddvq_s32(mins);
    acc.add_lanes(w.d * xd, li);
    acc.total -= w.dmin * xd * min_sum as f32;
}

struct Q4K;
struct Q5K;
struct Q6K;

impl KQuant for Q4K {
    const BYTES: usize = 144;
    type Unpacked = Affine;

    #[inline(always)]
    unsafe fn unpack(b: &[u8]) -> Affine {
        // SAFETY: the caller guarantees NEON (this function's contract).
        unsafe {
            let mut q = [vdupq_n_s8(0); 16];
            let low = vdupq_n_u8(0x0f);
            for c in 0..4 {
                // Bytes 32c..32c+32 of qs: sub-block 2c in the low nibbles,
                // 2c + 1 in the high ones.
                let (a, b) = (load_u8(b, 16 + 32 * c), load_u8(b, 32 + 32 * c));
                q[4 * c] = vreinterpretq_s8_u8(vandq_u8(a, low));
                q[4 * c + 1] = vreinterpretq_s8_u8(vandq_u8(b, low));
                q[4 * c + 2] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(a));
                q[4 * c + 3] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(b));
            }
            affine_header(b, q)
        }
    }

    #[inline(always)]
    unsafe fn lanes(w: &Affine, xb: &[u8]) -> [int32x4_t; 2] {
        // SAFETY: the caller guarantees NEON (this function's contract).
        unsafe { affine_lanes(w, xb) }
    }

    #[inline(always)]
    unsafe fn accumulate(acc: &mut Acc, w: &Affine, li: [int32x4_t; 2], xb: &[u8], xd: f32) {
        // SAFETY: the caller guarantees NEON (this function's contract).
        unsafe { affine_accumulate(acc, w, li, xb, xd) }
    }
}

impl KQuant for Q5K {
    const BYTES: usize = 176;
    type Unpacked = Affine;

    #[inline(always)]
    unsafe fn unpack(b: &[u8]) -> Affine {
        // SAFETY: the caller guarantees NEON (this function's contract).
        unsafe {
            let mut q = [vdupq_n_s8(0); 16];
            let low = vdupq_n_u8(0x0f);
            let bit4 = vdupq_n_u8(0x10);
            // Sub-block j's fifth bits are bit j of qh[0..32].
            let qh = [load_u8(b, 16), load_u8(b, 32)];
            for c in 0..4 {
                let qs = [load_u8(b, 48 + 32 * c), load_u8(b, 64 + 32 * c)];
                for k in 0..2 {
                    for (half, nib) in [vandq_u8(qs[k], low), vshrq_n_u8::<4>(qs[k])]
                        .into_iter()
                        .enumerate()
                    {
                        let j = 2 * c + half;
                        // Bit j moved to bit 4 (a negative shift moves right).
                        let high = vandq_u8(vshlq_u8(qh[k], vdupq_n_s8(4 - j as i8)), bit4);
                        q[2 * j + k] = vreinterpretq_s8_u8(vorrq_u8(nib, high));
                    }
                }
            }
            affine_header(b, q)
        }
    }

    #[inline(always)]
    unsafe fn lanes(w: &Affine, xb: &[u8]) -> [int32x4_t; 2] {
        // SAFETY: the caller guarantees NEON (this function's contract).
        unsafe { affine_lanes(w, xb) }
    }

    #[inline(always)]
    unsafe fn accumulate(acc: &mut Acc, w: &Affine, li: [int32x4_t; 2], xb: &[u8], xd: f32) {
        // SAFETY: the caller guarantees NEON (this function's contract).
        unsafe { affine_accumulate(acc, w, li, xb, xd) }
    }
}

/// A Q6_K block: 256 signed values (code - 32) as 16 vectors in element
/// order, the super-block scale and the 16 scales as two i16 vectors.
#[derive(Clone, Copy)]
struct Six {
    q: [int8x16_t; 16],
    d: f32,
    scales: [int16x8_t; 2],
}

impl KQuant for Q6K {
    const BYTES: usize = 210;
    type Unpacked = Six;

    #[inline(always)]
    unsafe fn unpack(b: &[u8]) -> Six {
        // SAFETY: the caller guarantees NEON (this function's contract).
        unsafe {
            let mut q = [vdupq_n_s8(0); 16];
            let (three, offset) = (vdupq_n_u8(3), vdupq_n_s8(32));
            for h in 0..2 {
                for k in 0..2 {
                    // Lanes 16k..16k+16 of quarter q of half h: the low (q < 2)
                    // or high nibble of ql[64h + 32 * (q % 2) + l], bits 2q..2q+2
                    // of qh[32h + l] on top.
                    let a = load_u8(b, 64 * h + 16 * k);
                    let c = load_u8(b, 64 * h + 32 + 16 * k);
                    let hb = load_u8(b, 128 + 32 * h + 16 * k);
                    let codes = [
                        vsliq_n_u8::<4>(a, vandq_u8(hb, three)),
                        vsliq_n_u8::<4>(c, vandq_u8(vshrq_n_u8::<2>(hb), three)),
                        vsliq_n_u8::<4>(vshrq_n_u8::<4>(a), vandq_u8(vshrq_n_u8::<4>(hb), three)),
                        vsliq_n_u8::<4>(vshrq_n_u8::<4>(c), vshrq_n_u8::<6>(hb)),
                    ];
                    for (quarter, code) in codes.into_iter().enumerate() {
                        q[8 * h + 2 * quarter + k] = vsubq_s8(vreinterpretq_s8_u8(code), offset);
                    }
                }
            }
            let sc = load_s8(b, 192);
            Six {
                q,
                d: f16_to_f32(le_u16(b, 208)),
                scales: [vmovl_s8(vget_low_s8(sc)), vmovl_high_s8(sc)],
            }
        }
    }

    #[inline(always)]
    unsafe fn lanes(w: &Six, xb: &[u8]) -> [int32x4_t; 2] {
        // SAFETY: the caller guarantees NEON (this function's contract).
        unsafe {
            let mut li = [vdupq_n_s32(0); 2];
            // Two products per i16 lane: |value| <= 32, so far below 2^15.
            macro_rules! group {
                ($($g:literal)*) => {$(
                    let x = load_s8(xb, 4 + 16 * $g);
                    sub16::<{ $g % 8 }>(&mut li, w.q[$g], x, w.scales[$g / 8]);
                )*};
            }
            group!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            li
        }
    }

    #[inline(always)]
    unsafe fn accumulate(acc: &mut Acc, w: &Six, li: [int32x4_t; 2], _xb: &[u8], xd: f32) {
        // SAFETY: the caller guarantees NEON (this function's contract).
        unsafe {
            acc.add_lanes(w.d * xd, li);
        }
    }
}

/// Dots of weight row `w` of format `K` with `N` Q8_K activation rows;
/// `out[t]`. Each weight block is expanded once for all the tokens.
#[inline]
#[target_feature(enable = "neon")]
fn tile<K: KQuant, const N: usize>(w: &[u8], xs: &[&[u8]], out: &mut [f32]) {
    let nb = w.len() / K::BYTES;
    for x in xs {
        assert!(
            x.len() >= nb * Q8K_BYTES,
            "activation row shorter than the weight row"
        );
    }
    assert!(out.len() >= N, "output shorter than the tokens");
    // Row slices in locals, so the loop keeps their pointers in registers.
    let xrows: [&[u8]; N] = std::array::from_fn(|t| xs[t]);
    let mut acc = [Acc::new(); N];
    for i in 0..nb {
        // SAFETY: i < nb, and every row holds nb blocks (`w` by definition of
        // nb, the activations asserted above); NEON is baseline on aarch64.
        let wb = unsafe { K::unpack(block(w, i, K::BYTES)) };
        for t in 0..N {
            // SAFETY: as above.
            let xb = unsafe { block(xrows[t], i, Q8K_BYTES) };
            let xd = le_f32(xb, 0);
            // SAFETY: NEON is baseline on aarch64.
            unsafe {
                let li = K::lanes(&wb, xb);
                K::accumulate(&mut acc[t], &wb, li, xb, xd);
            }
        }
    }
    for t in 0..N {
        out[t] = acc[t].finish();
    }
}

/// All tokens against each weight row in turn; `out[r * xs.len() + t]`.
#[inline]
#[target_feature(enable = "neon")]
fn rows<K: KQuant>(ws: &[&[u8]], xs: &[&[u8]], out: &mut [f32]) {
    let nb = ws[0].len() / K::BYTES;
    for w in ws {
        assert_eq!(w.len() / K::BYTES, nb, "weight rows differ in length");
    }
    let n = xs.len();
    assert!(
        out.len() >= ws.len() * n,
        "output shorter than rows x tokens"
    );
    for (r, w) in ws.iter().enumerate() {
        let o = &mut out[r * n..(r + 1) * n];
        match n {
            1 => tile::<K, 1>(w, xs, o),
            2 => tile::<K, 2>(w, xs, o),
            3 => tile::<K, 3>(w, xs, o),
            4 => tile::<K, 4>(w, xs, o),
            _ => unreachable!("checked by the entry point"),
        }
    }
}

/// Generates a public entry point: 1-2 weight rows, 1-4 activation rows.
macro_rules! entry {
    ($(#[$doc:meta])* $name:ident, $kind:ty) => {
        $(#[$doc])*
        #[target_feature(enable = "neon")]
        pub unsafe fn $name(ws: &[&[u8]], xs: &[&[u8]], out: &mut [f32]) {
            assert!(
                (1..=2).contains(&ws.len()) && (1..=4).contains(&xs.len()),
                "{} takes 1-2 weight rows and 1-4 activation rows, got {} and {}",
                stringify!($name),
                ws.len(),
                xs.len()
            );
            rows::<$kind>(ws, xs, out)
        }
    };
}

entry!(
    /// Dots of one or two Q4_K weight rows with one to four Q8_K activation
    /// rows; `out[r * xs.len() + t]`, bit-identical to `scalar::vec_dot`.
    ///
    /// # Safety
    /// The CPU must support NEON.
    ///
    /// # Panics
    /// If the weight rows differ in block count, an activation row holds
    /// fewer blocks, or `out` is shorter than rows x tokens.
    q4k, Q4K
);
entry!(
    /// Q5_K weights, as [`q4k`].
    ///
    /// # Safety
    /// As for [`q4k`].
    q5k, Q5K
);
entry!(
    /// Q6_K weights, as [`q4k`].
    ///
    /// # Safety
    /// As for [`q4k`].
    q6k, Q6K
);
