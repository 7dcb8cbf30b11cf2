//! Products of Q4_0 matrices repacked once, when the model loads, into the
//! AVX-512 panels' lane layout (`crate::repack::Repacked`), with Q8_0
//! activations ([`panel`]).
//!
//! The panels of `avx512.rs` transpose a 16-row panel's blocks into lanes on
//! every call: from 5 tokens on, by packing the panel into a buffer first,
//! which is 40% of an 8-token product (`matmul/q4_0/avx512/few8`, Zen 4).
//! For the dense matrices every decode step multiplies, that work is the
//! same every step, so it is done once: a repacked panel holds, per block,
//! four registers of quant dwords (lane `r`: row `r`'s dword `k`, both
//! nibbles) and the 16 rows' f16 scales, the same 288 bytes as the 16 rows'
//! blocks in the file. A product then only splits the nibbles (an `and`,
//! a shift) before `vpdpbusd`, for every token count, so one copy serves
//! decode and prefill alike and the file's pages of those matrices are not
//! read again.
//!
//! Numerics: the block dot and the float steps are `avx512::accumulate`'s
//! (the scalar reference's order), so every output is bit-identical to
//! `scalar::vec_dot` and to every other Q4_0 path.

use super::avx512::{ActSums, Block, Out, PANEL, accumulate};
use crate::repack::{QUANT_BYTES, SCALE_BYTES, offsets};
use std::arch::x86_64::*;

/// Tokens per register tile: 8 accumulators plus 8 weight registers.
const TILE: usize = 8;
/// How far ahead of its reads a product hints the panel's lines: 2 KiB
/// (tried 0.5-16 KiB; 1-4 KiB alike). Measured from DRAM (Zen 4 VM, 2
/// threads, `matmul/q4_0/avx512r/*-dram`, three rounds): with 4 and 8
/// tokens the hints give 1.5-2x (the tile's compute leaves the hardware
/// prefetcher behind), with 2 tokens 1.1-2x, with 1 level.
const AHEAD: usize = 2048;

/// Block `i` of a repacked panel, the nibbles split into `vpdpbusd`'s
/// unsigned bytes: what `avx512::gather` gives for the file's rows.
///
/// # Safety
/// AVX-512 F/BW must be present; `p` must hold a panel of `nb` blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block(p: *const u8, nb: usize, i: usize) -> Block {
    let m = _mm512_set1_epi8(0x0f);
    // SAFETY: by the caller, the block's 256 quant bytes and 32 scale
    // bytes are readable (unaligned loads). The nibbles are split in line:
    // a closure here would not inherit the target features.
    unsafe {
        let (quants, scales) = offsets(nb, i);
        let q = p.add(quants);
        let v: [__m512i; 4] = [
            _mm512_loadu_si512(q.cast()),
            _mm512_loadu_si512(q.add(64).cast()),
            _mm512_loadu_si512(q.add(128).cast()),
            _mm512_loadu_si512(q.add(192).cast()),
        ];
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(scales).cast()));
        (
            [
                _mm512_and_si512(v[0], m),
                _mm512_and_si512(v[1], m),
                _mm512_and_si512(v[2], m),
                _mm512_and_si512(v[3], m),
                _mm512_and_si512(_mm512_srli_epi32::<4>(v[0]), m),
                _mm512_and_si512(_mm512_srli_epi32::<4>(v[1]), m),
                _mm512_and_si512(_mm512_srli_epi32::<4>(v[2]), m),
                _mm512_and_si512(_mm512_srli_epi32::<4>(v[3]), m),
            ],
            d,
        )
    }
}

/// Tokens `t0..t0 + N` against a repacked panel of `nb` blocks.
///
/// # Safety
/// As [`panel`] checked.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const N: usize>(p: &[u8], xs: &[&[u8]], sums: &ActSums, t0: usize, out: Out) {
    let nb = sums.nb;
    let base = p.as_ptr();
    let mut acc = [_mm512_setzero_ps(); N];
    for i in 0..nb {
        if t0 == 0 {
            // The first tile brings the panel in: hints AHEAD bytes on
            // (past the panel: the next one, usually this thread's next
            // unit; a hint past the buffer is harmless).
            let at = base.wrapping_add(i * (QUANT_BYTES + SCALE_BYTES) + AHEAD);
            for l in 0..5 {
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * l).cast());
            }
        }
        // SAFETY: `panel` checked that p holds nb blocks.
        let blk = unsafe { block(base, nb, i) };
        for (k, a) in acc.iter_mut().enumerate() {
            let t = t0 + k;
            let j = t * nb + i;
            // SAFETY: xs[t] holds nb blocks (checked by ActSums::new).
            *a = unsafe { accumulate::<false>(&blk, xs[t].as_ptr(), i, sums.d[j], sums.s[j], *a) };
        }
    }
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: `panel` checked that every token's outputs fit.
        unsafe { out.store(t0 + k, *a) };
    }
}

/// Dots of a repacked panel's `rows` (1..=16) rows (`p` starts at the
/// panel: `Repacked::bytes` at a multiple of 16 rows) with every Q8_0
/// activation row, written to `out` (token `t`, row `r` at `t * ld + r`):
/// the same contract and bits as `avx512::panel` on the file's rows.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI.
///
/// # Panics
/// If `p` is shorter than a panel of `sums.nb` blocks, `rows` is not in
/// 1..=16, or `out` or the sums do not fit the tokens.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn panel(p: &[u8], rows: usize, xs: &[&[u8]], sums: &ActSums, out: Out) {
    let (n, nb) = (xs.len(), sums.nb);
    assert!((1..=PANEL).contains(&rows), "a panel has 1 to 16 rows");
    assert!(
        p.len() >= nb * (QUANT_BYTES + SCALE_BYTES),
        "panel past the weights"
    );
    assert!(out.rows == rows && out.fits(n), "output too short");
    assert_eq!(
        sums.d.len(),
        n * nb,
        "activation sums do not match the rows"
    );
    let mut t0 = 0;
    while t0 < n {
        let len = (n - t0).min(TILE);
        // SAFETY: features by the caller; lengths asserted above.
        unsafe {
            match len {
                1 => tile::<1>(p, xs, sums, t0, out),
                2 => tile::<2>(p, xs, sums, t0, out),
                3 => tile::<3>(p, xs, sums, t0, out),
                4 => tile::<4>(p, xs, sums, t0, out),
                5 => tile::<5>(p, xs, sums, t0, out),
                6 => tile::<6>(p, xs, sums, t0, out),
                7 => tile::<7>(p, xs, sums, t0, out),
                _ => tile::<8>(p, xs, sums, t0, out),
            }
        }
        t0 += len;
    }
}
