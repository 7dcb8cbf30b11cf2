//! AVX-512 VNNI panel products of Q4_K / Q6_K weight rows with Q8_K
//! activations: the k-quant counterpart of [`super::avx512`], 16 weight rows
//! in the lanes of a zmm register, blocks unpacked from the mapping as they
//! are used (few tokens) or packed once per panel into a thread-local
//! buffer (many). A block of the 16 rows is read with contiguous loads and
//! transposed into lanes (`avx512::transposed_window`), not gathered: measured on Zen 4,
//! 2 threads, 2x faster for one token, 1.3-1.5x for 2-16, prefill 5-12%.
//!
//! Numerics: per super-block everything is exact integer arithmetic (the
//! sub-block dots, their 6- or 8-bit scales, the minimum / offset terms
//! through the activation's 16-element sums), then a fixed float
//! expression per block, accumulated from block 0 up. Every path here (any
//! token count, unpacked per tile or packed) computes exactly that, so results are
//! bit-identical whatever the batch. The scalar reference follows ggml's
//! 8-lane float order instead; the two agree to rounding (tested).

use super::avx512::{
    NextPanel, Out, PANEL, check_panel, dword_at, transposed_window, with_panel_buffer,
};
use std::arch::x86_64::*;

const Q8K_BYTES: usize = 292;
/// Offset of the Q8_K block's quants and 16-element sums.
const Q8K_QS: usize = 4;
const Q8K_BSUMS: usize = 260;
/// Tokens per register tile.
const TILE: usize = 8;
/// Token counts up to this unpack each block per tile without packing the
/// panel.
const DIRECT_MAX: usize = 4;
/// Registers per unpacked block (the larger format's count).
const MAX_REGS: usize = 89;
/// Registers of a block's transposed dwords: 16 per 64-byte window of the
/// largest block (Q6_K, four windows).
const SCRATCH: usize = PANEL * bytes_of(Q6K).div_ceil(64);

/// A k-quant weight format with a panel kernel.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KFormat {
    Q4K,
    Q5K,
    Q6K,
}

impl KFormat {
    fn block_bytes(self) -> usize {
        match self {
            KFormat::Q4K => 144,
            KFormat::Q5K => 176,
            KFormat::Q6K => 210,
        }
    }
}

/// Q4_K block register layout: 64 quant groups (sub-block j, group g at
/// 8j + g), 8 scales, 8 minimums (duplicated into both i16 halves), d, dmin.
const Q4K_REGS: usize = 82;
/// Q6_K: 64 quant groups (element 4k at k), 16 scales, 8 scale pairs
/// (i16 halves), d.
const Q6K_REGS: usize = 89;

/// Const-generic format codes.
const Q4K: u8 = 0;
const Q5K: u8 = 1;
const Q6K: u8 = 2;

const fn regs(f: u8) -> usize {
    if f == Q6K { Q6K_REGS } else { Q4K_REGS }
}

const fn bytes_of(f: u8) -> usize {
    match f {
        Q4K => 144,
        Q5K => 176,
        _ => 210,
    }
}

/// Unpacks block `i` of the panel into `out` in the register layout of the
/// format, from its dwords in lanes ([`transposed_window`], into
/// `scratch`: the thread's panel buffer, so no array is cleared or copied
/// per block; a zeroed 64-register array cost 9-11% of an 8-token
/// product, arrays returned by value a copy each).
///
/// # Safety
/// As [`transposed_window`].
///
/// # Panics
/// If `scratch` holds fewer than [`SCRATCH`] registers.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack<const F: u8>(
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    i: usize,
    scratch: &mut [__m512i],
    out: &mut [__m512i],
) {
    let t = &mut scratch[..PANEL * bytes_of(F).div_ceil(64)];
    for (win, v) in t.chunks_exact_mut(PANEL).enumerate() {
        // SAFETY: by the caller.
        unsafe { transposed_window(w, row_bytes, rows, i, bytes_of(F), win, v) };
    }
    unpack_dwords::<F>(t, out)
}

/// [`unpack`] from the block's dwords in lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn unpack_dwords<const F: u8>(t: &[__m512i], out: &mut [__m512i]) {
    let g = |off: usize| dword_at(t, off);
    let lo4 = _mm512_set1_epi8(0x0f);
    let byte = |v: __m512i, k: u32| {
        _mm512_and_si512(
            _mm512_srlv_epi32(v, _mm512_set1_epi32(8 * k as i32)),
            _mm512_set1_epi32(0xff),
        )
    };
    let f16s = |v: __m512i| _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
    if F != Q6K {
        // d @0, dmin @2, scales[12] @4, then Q4_K: qs[128] @16;
        // Q5_K: qh[32] @16 (bit j of byte l: element 32j + l), qs[128] @48.
        let qs = if F == Q5K { 48 } else { 16 };
        let one = _mm512_set1_epi8(1);
        for k in 0..4 {
            for gi in 0..8 {
                let v = g(qs + 32 * k + 4 * gi);
                let mut lo = _mm512_and_si512(v, lo4);
                let mut hi = _mm512_and_si512(_mm512_srli_epi32::<4>(v), lo4);
                if F == Q5K {
                    let h = g(16 + 4 * gi);
                    let bit = |s: usize| {
                        let b = _mm512_and_si512(
                            _mm512_srlv_epi32(h, _mm512_set1_epi32(s as i32)),
                            one,
                        );
                        _mm512_slli_epi32::<4>(b)
                    };
                    lo = _mm512_or_si512(lo, bit(2 * k));
                    hi = _mm512_or_si512(hi, bit(2 * k + 1));
                }
                out[16 * k + gi] = lo;
                out[16 * k + 8 + gi] = hi;
            }
        }
        let (s0, s1, s2) = (g(4), g(8), g(12));
        let m63 = _mm512_set1_epi32(63);
        for k in 0..4u32 {
            let (a, b, c) = (byte(s0, k), byte(s1, k), byte(s2, k));
            let sc_lo = _mm512_and_si512(a, m63);
            let m_lo = _mm512_and_si512(b, m63);
            let sc_hi = _mm512_or_si512(
                _mm512_and_si512(c, _mm512_set1_epi32(0xf)),
                _mm512_slli_epi32::<4>(_mm512_srli_epi32::<6>(a)),
            );
            let m_hi = _mm512_or_si512(
                _mm512_srli_epi32::<4>(c),
                _mm512_slli_epi32::<4>(_mm512_srli_epi32::<6>(b)),
            );
            let dup = |m: __m512i| _mm512_or_si512(m, _mm512_slli_epi32::<16>(m));
            out[64 + k as usize] = sc_lo;
            out[68 + k as usize] = sc_hi;
            out[72 + k as usize] = dup(m_lo);
            out[76 + k as usize] = dup(m_hi);
        }
        let dd = g(0);
        out[80] = _mm512_castps_si512(f16s(dd));
        out[81] = _mm512_castps_si512(f16s(_mm512_srli_epi32::<16>(dd)));
    } else {
        // ql[128] @0, qh[64] @128, scales i8[16] @192, d @208.
        let m2 = _mm512_set1_epi8(3);
        for n in 0..2 {
            for gi in 0..8 {
                let a = g(64 * n + 4 * gi);
                let b = g(64 * n + 32 + 4 * gi);
                let h = g(128 + 32 * n + 4 * gi);
                let hi = |s: u32| {
                    let t = _mm512_and_si512(_mm512_srlv_epi32(h, _mm512_set1_epi32(s as i32)), m2);
                    _mm512_slli_epi32::<4>(t)
                };
                let e = 32 * n + gi; // group of element 128n + 4gi
                out[e] = _mm512_or_si512(_mm512_and_si512(a, lo4), hi(0));
                out[e + 8] = _mm512_or_si512(_mm512_and_si512(b, lo4), hi(2));
                out[e + 16] =
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32::<4>(a), lo4), hi(4));
                out[e + 24] =
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32::<4>(b), lo4), hi(6));
            }
        }
        let mut sc = [_mm512_setzero_si512(); 16];
        for m in 0..4 {
            let v = g(192 + 4 * m);
            for b in 0..4 {
                // Sign-extend byte b.
                let shl = _mm512_sllv_epi32(v, _mm512_set1_epi32(24 - 8 * b as i32));
                sc[4 * m + b] = _mm512_srai_epi32::<24>(shl);
            }
        }
        for (k, s) in sc.iter().enumerate() {
            out[64 + k] = *s;
        }
        for m in 0..8 {
            let lo = _mm512_and_si512(sc[2 * m], _mm512_set1_epi32(0xffff));
            out[80 + m] = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(sc[2 * m + 1]));
        }
        // d is the last two bytes; read the dword ending there.
        out[88] = _mm512_castps_si512(f16s(_mm512_srli_epi32::<16>(g(206))));
    }
}

/// Reads a dword of activation bytes.
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline]
unsafe fn dword(p: *const u8) -> __m512i {
    // SAFETY: by the caller.
    unsafe { _mm512_set1_epi32(p.cast::<i32>().read_unaligned()) }
}

/// Adds one block (registers `blk`) dotted with block `i` of the tokens
/// `xs[..N]` (Q8_K rows) to their accumulators.
///
/// # Safety
/// AVX-512 F/BW/VNNI must be present; each `xs[t]` must hold block `i`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn accumulate<const F: u8, const N: usize>(
    blk: &[__m512i],
    xs: &[*const u8; N],
    i: usize,
    acc: &mut [__m512; N],
) {
    let xb: [*const u8; N] = std::array::from_fn(|t| xs[t].wrapping_add(i * Q8K_BYTES));
    let mut isum = [_mm512_setzero_si512(); N];
    // Sub-blocks: 8 of 32 elements (Q4_K) or 16 of 16 (Q6_K).
    let q6 = F == Q6K;
    let (subs, groups) = if q6 { (16, 4) } else { (8, 8) };
    for j in 0..subs {
        let q = &blk[groups * j..groups * (j + 1)];
        let sc = blk[64 + j];
        for t in 0..N {
            let x = xb[t].wrapping_add(Q8K_QS + 4 * groups * j);
            let (mut a0, mut a1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for h in 0..groups / 2 {
                // SAFETY: block i of xs[t] holds these quant bytes.
                unsafe {
                    a0 = _mm512_dpbusd_epi32(a0, q[2 * h], dword(x.add(8 * h)));
                    a1 = _mm512_dpbusd_epi32(a1, q[2 * h + 1], dword(x.add(8 * h + 4)));
                }
            }
            isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(_mm512_add_epi32(a0, a1), sc));
        }
    }
    for t in 0..N {
        let s = xb[t].wrapping_add(Q8K_BSUMS);
        // SAFETY: block i of xs[t] holds its d and its 16 sums.
        let dx = unsafe { _mm512_set1_ps(xb[t].cast::<f32>().read_unaligned()) };
        let mut msum = _mm512_setzero_si512();
        let pairs = if q6 { 80 } else { 72 };
        for m in 0..8 {
            // SAFETY: as above.
            msum = _mm512_dpwssd_epi32(msum, blk[pairs + m], unsafe { dword(s.add(4 * m)) });
        }
        let block = if q6 {
            // (sum(sc * q * x) - 32 * sum(sc * bsum)) * (d_w * d_x)
            let total = _mm512_sub_epi32(isum[t], _mm512_slli_epi32::<5>(msum));
            let d = _mm512_mul_ps(_mm512_castsi512_ps(blk[88]), dx);
            _mm512_mul_ps(_mm512_cvtepi32_ps(total), d)
        } else {
            // sum(sc * q * x) * (d_w * d_x) - sum(m * bsum) * (dmin_w * d_x)
            let d = _mm512_mul_ps(_mm512_castsi512_ps(blk[80]), dx);
            let dmin = _mm512_mul_ps(_mm512_castsi512_ps(blk[81]), dx);
            _mm512_sub_ps(
                _mm512_mul_ps(_mm512_cvtepi32_ps(isum[t]), d),
                _mm512_mul_ps(_mm512_cvtepi32_ps(msum), dmin),
            )
        };
        acc[t] = _mm512_add_ps(acc[t], block);
    }
}

/// Tokens `t0..t0 + N` over all blocks, from `blocks`.
///
/// # Safety
/// As [`panel`] checked.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const F: u8, const N: usize>(
    w: &[u8],
    rows: usize,
    row_bytes: usize,
    nb: usize,
    mut blocks: Blocks<'_>,
    xs: &[&[u8]],
    t0: usize,
    out: Out,
) {
    let bytes = bytes_of(F);
    let r = regs(F);
    let ptrs: [*const u8; N] = std::array::from_fn(|t| xs[t0 + t].as_ptr());
    let mut acc = [_mm512_setzero_ps(); N];
    for i in 0..nb {
        let blk: &[__m512i] = match &mut blocks {
            Blocks::Packed(p) => &p[i * r..(i + 1) * r],
            Blocks::Dwords(t, buf) => {
                let d = dwords(F);
                if t0 == 0 {
                    // The first tile brings the panel in (hints; past the
                    // panel: usually this thread's next one).
                    let at = t.as_ptr().cast::<u8>().wrapping_add(64 * d * i + AHEAD);
                    for line in 0..d {
                        _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(64 * line).cast());
                    }
                }
                unpack_dwords::<F>(&t[d * i..d * (i + 1)], buf);
                &buf[..r]
            }
            Blocks::Gather(buf) => {
                for row in 0..rows {
                    // Prefetch the same block one panel down (a hint).
                    let p = w
                        .as_ptr()
                        .wrapping_add((row + PANEL) * row_bytes + i * bytes);
                    for line in (0..bytes).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line).cast());
                    }
                }
                let (blk, scratch) = buf.split_at_mut(MAX_REGS);
                // SAFETY: as `panel` checked.
                unsafe { unpack::<F>(w.as_ptr(), row_bytes, rows, i, scratch, blk) };
                &blk[..r]
            }
        };
        // SAFETY: as `panel` checked.
        unsafe { accumulate::<F, N>(blk, &ptrs, i, &mut acc) };
    }
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: the caller of `panel` vouched for these outputs.
        unsafe { out.store(t0 + k, *a) };
    }
}

/// Where a tile's blocks come from (the thread's panel buffer either way).
enum Blocks<'a> {
    /// Gathered from the mapping one block at a time into this scratch
    /// (at least [`MAX_REGS`] registers, then [`SCRATCH`] for [`unpack`]).
    Gather(&'a mut [__m512i]),
    /// Already packed, `regs` registers per block.
    Packed(&'a [__m512i]),
    /// A repacked panel ([`repacked_panel`]): each block's dwords already
    /// in lanes, [`dwords`] registers per block, unpacked one block at a
    /// time into the scratch (at least [`MAX_REGS`] registers).
    Dwords(&'a [__m512i], &'a mut [__m512i]),
}

/// Registers of a block's dwords in lanes (register `d`, lane `r`: bytes
/// `4d..4d + 4` of row `r`'s block): the repacked layout of
/// `crate::repack::Repacked::dwords`, the file's bytes for Q4_K and Q5_K.
const fn dwords(f: u8) -> usize {
    bytes_of(f).div_ceil(4)
}

/// How far ahead of its reads a repacked product hints the panel's lines
/// into L2: two Q4_K blocks' (measured from DRAM, Zen 4 VM, 2 threads,
/// `matmul/q4_k/avx512r/*-dram`: hints into L1 as `avx512r`'s lost
/// 10-40%; into L2 2-4 blocks ahead alike, none 20-35% slower).
const AHEAD: usize = 4608;

macro_rules! by_len {
    ($len:expr, $f:ident, ($($arg:expr),*)) => {
        match $len {
            1 => tile::<$f, 1>($($arg),*),
            2 => tile::<$f, 2>($($arg),*),
            3 => tile::<$f, 3>($($arg),*),
            4 => tile::<$f, 4>($($arg),*),
            5 => tile::<$f, 5>($($arg),*),
            6 => tile::<$f, 6>($($arg),*),
            7 => tile::<$f, 7>($($arg),*),
            _ => tile::<$f, 8>($($arg),*),
        }
    };
}

/// Dots of `rows` (1..=16) consecutive weight rows (`w` starts at the
/// first, `row_bytes` apart, `nb` super-blocks each) with every Q8_K
/// activation row, written to `out` (`out.ptr[t * out.ld + r]`, `r < rows`).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, and `out` must be
/// valid for those writes (see [`Out`]).
///
/// # Panics
/// If a slice is too short or `rows` is not in 1..=16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn panel(
    format: KFormat,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    xs: &[&[u8]],
    nb: usize,
    out: Out,
) {
    check_panel(w, row_bytes, rows, nb * format.block_bytes(), xs.len(), out);
    for x in xs {
        assert!(x.len() >= nb * Q8K_BYTES, "activation row too short");
    }
    // SAFETY: features by the caller; lengths asserted above.
    unsafe {
        match format {
            KFormat::Q4K => panel_of::<Q4K>(w, rows, row_bytes, nb, xs, out),
            KFormat::Q5K => panel_of::<Q5K>(w, rows, row_bytes, nb, xs, out),
            KFormat::Q6K => panel_of::<Q6K>(w, rows, row_bytes, nb, xs, out),
        }
    }
}

/// [`panel`] for one format.
///
/// # Safety
/// As [`panel`] checked.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn panel_of<const F: u8>(
    w: &[u8],
    rows: usize,
    row_bytes: usize,
    nb: usize,
    xs: &[&[u8]],
    out: Out,
) {
    let n = xs.len();
    if n <= DIRECT_MAX {
        with_panel_buffer(MAX_REGS + SCRATCH, |scratch| {
            let blocks = Blocks::Gather(scratch);
            // SAFETY: as `panel` checked.
            unsafe { by_len!(n, F, (w, rows, row_bytes, nb, blocks, xs, 0, out)) };
        });
        return;
    }
    let r = regs(F);
    with_panel_buffer(nb * r + SCRATCH, |buf| {
        let (packed, scratch) = buf.split_at_mut(nb * r);
        let bytes = bytes_of(F);
        for (i, blk) in packed.chunks_exact_mut(r).enumerate() {
            for row in 0..rows {
                // The same block one panel down (usually this thread's
                // next unit) to L2: from DRAM packing otherwise waits on
                // every row (`matmul/q6_k/avx512/few8-dram`, Zen 4: 8.4-9.4
                // GB/s with two blocks ahead in each row to L1, 11.0-12.2
                // with this).
                let p = w
                    .as_ptr()
                    .wrapping_add((row + PANEL) * row_bytes + i * bytes);
                for line in (0..bytes).step_by(64) {
                    // A hint: an address past the mapping is harmless.
                    _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(line).cast());
                }
            }
            // SAFETY: as `panel` checked.
            unsafe { unpack::<F>(w.as_ptr(), row_bytes, rows, i, scratch, blk) };
        }
        let next = NextPanel::new(w, row_bytes, n);
        let mut t0 = 0;
        while t0 < n {
            let len = (n - t0).min(TILE);
            next.prefetch(t0 / TILE);
            // SAFETY: as `panel` checked; packed holds nb blocks.
            unsafe {
                by_len!(
                    len,
                    F,
                    (w, rows, row_bytes, nb, Blocks::Packed(packed), xs, t0, out)
                )
            };
            t0 += len;
        }
    });
}

/// Dots of a repacked panel's `rows` (1..=16) rows (`p`: the panel's
/// `nb` blocks in `crate::repack::Repacked::dwords`'s layout, 64-byte
/// aligned) with every Q8_K activation row: [`panel`]'s contract and bits,
/// without the per-call transposes.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, and `out` must be
/// valid for those writes (see [`Out`]).
///
/// # Panics
/// If a slice is too short or misaligned, `format` has no repacked layout
/// (Q6_K), or `rows` is not in 1..=16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn repacked_panel(
    format: KFormat,
    p: &[u8],
    rows: usize,
    xs: &[&[u8]],
    nb: usize,
    out: Out,
) {
    assert!((1..=PANEL).contains(&rows), "a panel has 1 to 16 rows");
    assert!(out.rows == rows && out.fits(xs.len()), "output too short");
    for x in xs {
        assert!(x.len() >= nb * Q8K_BYTES, "activation row too short");
    }
    // SAFETY: features by the caller; lengths asserted in `repacked_of`.
    unsafe {
        match format {
            KFormat::Q4K => repacked_of::<Q4K>(p, rows, nb, xs, out),
            KFormat::Q5K => repacked_of::<Q5K>(p, rows, nb, xs, out),
            KFormat::Q6K => panic!("Q6_K has no repacked layout"),
        }
    }
}

/// [`repacked_panel`] for one format.
///
/// # Safety
/// As [`repacked_panel`] checked (but `p` is checked here).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn repacked_of<const F: u8>(p: &[u8], rows: usize, nb: usize, xs: &[&[u8]], out: Out) {
    let d = dwords(F);
    assert!(p.len() >= nb * d * 64, "panel past the weights");
    assert!(
        p.as_ptr().cast::<__m512i>().is_aligned(),
        "repacked panel not 64-byte aligned"
    );
    // SAFETY: aligned and in bounds (asserted); every bit pattern is a
    // valid __m512i, and the bytes are not written while borrowed.
    let t: &[__m512i] = unsafe { std::slice::from_raw_parts(p.as_ptr().cast(), nb * d) };
    let n = xs.len();
    let r = regs(F);
    if n == 0 {
        return;
    }
    if n <= TILE {
        with_panel_buffer(MAX_REGS, |scratch| {
            let blocks = Blocks::Dwords(t, scratch);
            // SAFETY: as checked above (`w` is unused for these blocks).
            unsafe { by_len!(n, F, (p, rows, 0, nb, blocks, xs, 0, out)) };
        });
        return;
    }
    // More tokens: unpack every block once, then tiles from the buffer.
    with_panel_buffer(nb * r, |packed| {
        for (i, blk) in packed.chunks_exact_mut(r).enumerate() {
            unpack_dwords::<F>(&t[d * i..d * (i + 1)], blk);
        }
        let mut t0 = 0;
        while t0 < n {
            let len = (n - t0).min(TILE);
            // SAFETY: as checked above; packed holds nb blocks.
            unsafe {
                by_len!(
                    len,
                    F,
                    (p, rows, 0, nb, Blocks::Packed(packed), xs, t0, out)
                )
            };
            t0 += len;
        }
    });
}

// Tested in `tests/isa_paths.rs` (bit for bit against the panels' order,
// `avx2k::panel_order_dot`), reported ignored on a CPU without AVX-512 VNNI.
