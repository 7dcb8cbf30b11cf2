//! AVX2 products of Q4_K / Q5_K / Q6_K weight rows with Q8_K activations in
//! groups of [`GROUP`] weight rows, one per i32 lane of a ymm register: the
//! k-quant counterpart of [`super::avx2`] for CPUs without AVX-512 VNNI.
//! A group's super-blocks are unpacked once per group into a thread-local
//! buffer that every token tile reads (many tokens; no copy of a matrix
//! outlives the call); one to four tokens of Q4_K / Q5_K / Q6_K (decode, a
//! few sequences' step) run as 8-row groups of row pairs straight from the
//! mapping, headers unpacked in lanes once for all the tokens. All compute
//! the same integers and float expression.
//!
//! Numerics are those of the AVX-512 panels ([`super::avx512k`]): per
//! super-block exact integers (the scaled sub-block dots, the minimum or
//! +32 terms through the activation's 16-element sums), then the same float
//! expression, accumulated from block 0 up; so every output is
//! bit-identical to the panels' whatever the batch, group position or path.
//!
//! `vpmaddubsw` (unsigned weight bytes times signed activation bytes into
//! saturating i16 pair sums) is exact here: a pair is at most
//! 2 * 63 * 128 = 16128 in magnitude, and the pair sums of a run of dwords
//! are added in i16 only as far as they provably fit (8 dwords of 4-bit
//! Q4_K values: 8 * 3840; 4 of 5-bit Q5_K: 4 * 7936; 2 of 6-bit Q6_K:
//! 2 * 16128) before `vpmaddwd` applies the sub-block scale in i32.

use super::avx2::{
    Ahead, GROUP, NextGroup, TILE, by_len, group_rows, load_pair, load_pairs4, row_f16s, sum_pairs,
    transpose4, with_packed,
};
use super::avx512::{Out, check_panel};
use super::avx512k::KFormat;
use std::arch::x86_64::*;

/// Token counts up to this run as row tiles from the mapping ([`direct`]);
/// more tokens pay for unpacking the group once.
const DIRECT_MAX: usize = 4;
const Q8K_BYTES: usize = 292;
/// Offsets of the Q8_K block's quants and 16-element sums.
const Q8K_QS: usize = 4;
const Q8K_BSUMS: usize = 260;

/// Const-generic format codes.
const Q4K: u8 = 0;
const Q5K: u8 = 1;
const Q6K: u8 = 2;

/// Register layout of an unpacked block (lane `r` = row `r`):
/// `0..64`: the weights meeting activation dword `k` (elements `4k..4k + 4`)
/// as unsigned bytes. Q4_K / Q5_K: `64 + j`: sub-block `j`'s scale and
/// `72 + j` its minimum, each in both i16 halves; `80`: d, `81`: dmin (f32).
/// Q6_K: `64 + k`: the scale of sixteen `k` in both i16 halves; `80 + m`:
/// scales `2m` and `2m + 1` in the two halves; `88`: d (f32).
const fn regs(f: u8) -> usize {
    if f == Q6K { 89 } else { 82 }
}

const fn bytes_of(f: u8) -> usize {
    match f {
        Q4K => 144,
        Q5K => 176,
        _ => 210,
    }
}

/// 16 bytes at `at` of every row of the group, transposed: register `k`
/// holds dword `k` of them, lane `r` row `r`'s.
///
/// # Safety
/// `at..at + 16` must be readable in every row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dwords4(rows: &[*const u8; GROUP], at: usize) -> [__m256i; 4] {
    // SAFETY: by the caller.
    transpose4(unsafe { load_pairs4(rows, at) })
}

/// A pshufb control that copies byte `lo` of each dword into its low i16
/// and byte `hi` into its high i16, each into the half's low byte (`SHIFT`
/// false, zero-extended) or high byte (`SHIFT` true, for an arithmetic
/// shift right by 8 that sign-extends).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pick16<const SHIFT: bool>(lo: i32, hi: i32) -> __m256i {
    let ctl = |d: i32| {
        let (a, b) = (4 * d + lo, 4 * d + hi);
        let v = if SHIFT {
            0x80 | (a << 8) | (0x80 << 16) | (b << 24)
        } else {
            a | (0x80 << 8) | (b << 16) | (0x80 << 24)
        };
        v as u32 as i32
    };
    let (c0, c1, c2, c3) = (ctl(0), ctl(1), ctl(2), ctl(3));
    _mm256_setr_epi32(c0, c1, c2, c3, c0, c1, c2, c3)
}

/// 8 f16 in the low i16 of each lane of `v` (`HIGH`: the high i16), as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_lanes<const HIGH: bool>(v: __m256i) -> __m256 {
    let h = if HIGH {
        _mm256_srli_epi32::<16>(v)
    } else {
        _mm256_and_si256(v, _mm256_set1_epi32(0xffff))
    };
    // Within each 128-bit half: the 4 values, then (from the zero) nothing.
    let p = _mm256_packus_epi32(h, _mm256_setzero_si256());
    let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(p);
    _mm256_cvtph_ps(_mm256_castsi256_si128(p))
}

/// Block `i` of the group's rows, unpacked into `out` (layout: [`regs`]).
///
/// # Safety
/// AVX2/FMA/F16C must be present and block `i` of every row readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_block<const F: u8>(rows: &[*const u8; GROUP], i: usize, out: &mut [__m256i]) {
    let at = i * bytes_of(F);
    let lo4 = _mm256_set1_epi8(0x0f);
    if F != Q6K {
        // d @0, dmin @2, scales[12] @4, then Q4_K: qs[128] @16; Q5_K:
        // qh[32] @16 (bit j of byte l: element 32j + l), qs[128] @48.
        let qs = if F == Q5K { 48 } else { 16 };
        let qh: [__m256i; 8] = if F == Q5K {
            // SAFETY: inside block i of every row (the caller).
            let (a, b) = unsafe { (dwords4(rows, at + 16), dwords4(rows, at + 32)) };
            [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
        } else {
            [_mm256_setzero_si256(); 8]
        };
        let one = _mm256_set1_epi8(1);
        for c in 0..8 {
            // 16 bytes of the 32 holding sub-blocks 2k (low nibbles) and
            // 2k + 1 (high): their dwords 4(c % 2)..
            let k = c / 2;
            // SAFETY: inside block i of every row (the caller).
            let v = unsafe { dwords4(rows, at + qs + 16 * c) };
            for (e, d) in v.into_iter().enumerate() {
                let g = 4 * (c % 2) + e;
                let mut lo = _mm256_and_si256(d, lo4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(d), lo4);
                if F == Q5K {
                    // Bit s of each qh byte to bit 4 (byte-local: s < 8).
                    let bit = |s: usize| {
                        let b = _mm256_srl_epi32(qh[g], _mm_cvtsi32_si128(s as i32));
                        _mm256_slli_epi32::<4>(_mm256_and_si256(b, one))
                    };
                    lo = _mm256_or_si256(lo, bit(2 * k));
                    hi = _mm256_or_si256(hi, bit(2 * k + 1));
                }
                out[8 * (2 * k) + g] = lo;
                out[8 * (2 * k + 1) + g] = hi;
            }
        }
        // SAFETY: inside block i of every row (the caller).
        let [dd, a, b, c] = unsafe { dwords4(rows, at) };
        // The 6-bit scales and mins of sub-blocks 0..4 and 4..8, a byte each
        // (see `scalar::scale_min`).
        let low6 = _mm256_set1_epi8(0x3f);
        let top2 = |v: __m256i| {
            let t = _mm256_and_si256(_mm256_srli_epi32::<6>(v), _mm256_set1_epi8(3));
            _mm256_slli_epi32::<4>(t)
        };
        let sc_lo = _mm256_and_si256(a, low6);
        let m_lo = _mm256_and_si256(b, low6);
        let sc_hi = _mm256_or_si256(_mm256_and_si256(c, lo4), top2(a));
        let m_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32::<4>(c), lo4), top2(b));
        for j in 0..4 {
            let p = pick16::<false>(j, j);
            let j = j as usize;
            out[64 + j] = _mm256_shuffle_epi8(sc_lo, p);
            out[68 + j] = _mm256_shuffle_epi8(sc_hi, p);
            out[72 + j] = _mm256_shuffle_epi8(m_lo, p);
            out[76 + j] = _mm256_shuffle_epi8(m_hi, p);
        }
        out[80] = _mm256_castps_si256(f16_lanes::<false>(dd));
        out[81] = _mm256_castps_si256(f16_lanes::<true>(dd));
    } else {
        // ql[128] @0, qh[64] @128, scales i8[16] @192, d @208.
        let m2 = _mm256_set1_epi8(3);
        for n in 0..2 {
            for half in 0..2 {
                // SAFETY: inside block i of every row (the caller).
                let (a, b, h) = unsafe {
                    (
                        dwords4(rows, at + 64 * n + 16 * half),
                        dwords4(rows, at + 64 * n + 32 + 16 * half),
                        dwords4(rows, at + 128 + 32 * n + 16 * half),
                    )
                };
                for e in 0..4 {
                    let hi = |s: i32| {
                        let t = _mm256_srl_epi32(h[e], _mm_cvtsi32_si128(s));
                        _mm256_slli_epi32::<4>(_mm256_and_si256(t, m2))
                    };
                    // Dword of elements 128n + 4gi (+ 32, + 64, + 96).
                    let k = 32 * n + 4 * half + e;
                    let a_hi = _mm256_and_si256(_mm256_srli_epi16::<4>(a[e]), lo4);
                    let b_hi = _mm256_and_si256(_mm256_srli_epi16::<4>(b[e]), lo4);
                    out[k] = _mm256_or_si256(_mm256_and_si256(a[e], lo4), hi(0));
                    out[k + 8] = _mm256_or_si256(_mm256_and_si256(b[e], lo4), hi(2));
                    out[k + 16] = _mm256_or_si256(a_hi, hi(4));
                    out[k + 24] = _mm256_or_si256(b_hi, hi(6));
                }
            }
        }
        // SAFETY: inside block i of every row (the caller).
        let s = unsafe { dwords4(rows, at + 192) };
        for k in 0..16 {
            let b = (k % 4) as i32;
            let v = _mm256_shuffle_epi8(s[k / 4], pick16::<true>(b, b));
            out[64 + k] = _mm256_srai_epi16::<8>(v);
        }
        for m in 0..8 {
            let b = 2 * (m % 2) as i32;
            let v = _mm256_shuffle_epi8(s[m / 2], pick16::<true>(b, b + 1));
            out[80 + m] = _mm256_srai_epi16::<8>(v);
        }
        // SAFETY: d (bytes 206..210 hold it last) of block i of every row
        // is readable.
        out[88] = _mm256_castps_si256(unsafe { row_f16s::<true>(rows, at + 206) });
    }
}

/// Activation dword at `p`, in every lane.
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dword(p: *const u8) -> __m256i {
    // SAFETY: by the caller.
    _mm256_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
}

/// Adds one unpacked block `blk` dotted with block `i` of the tokens
/// `xs[..N]` (Q8_K rows) to their accumulators.
///
/// # Safety
/// AVX2/FMA/F16C must be present; each `xs[t]` must hold block `i`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate<const F: u8, const N: usize>(
    blk: &[__m256i],
    xs: &[*const u8; N],
    i: usize,
    acc: &mut [__m256; N],
) {
    let xb: [*const u8; N] = std::array::from_fn(|t| xs[t].wrapping_add(i * Q8K_BYTES));
    let q6 = F == Q6K;
    // Sub-blocks, their dwords, and the dwords whose pair sums add up in
    // i16 (module comment).
    let (subs, per, run) = match F {
        Q4K => (8, 8, 8),
        Q5K => (8, 8, 4),
        _ => (16, 4, 2),
    };
    let mut isum = [_mm256_setzero_si256(); N];
    for j in 0..subs {
        let sc = blk[64 + j];
        for c in 0..per / run {
            let mut a16 = [_mm256_setzero_si256(); N];
            for g in 0..run {
                let k = per * j + run * c + g;
                let w = blk[k];
                for t in 0..N {
                    // SAFETY: block i of xs[t] holds these quant bytes.
                    let x = unsafe { dword(xb[t].add(Q8K_QS + 4 * k)) };
                    a16[t] = _mm256_add_epi16(a16[t], _mm256_maddubs_epi16(w, x));
                }
            }
            for t in 0..N {
                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(a16[t], sc));
            }
        }
    }
    for t in 0..N {
        // SAFETY: block i of xs[t] holds its d and its 16 sums.
        let (dx, s) = unsafe {
            (
                _mm256_set1_ps(xb[t].cast::<f32>().read_unaligned()),
                xb[t].add(Q8K_BSUMS),
            )
        };
        let pairs = if q6 { 80 } else { 72 };
        let mut msum = _mm256_setzero_si256();
        for m in 0..8 {
            // SAFETY: as above.
            let b = unsafe { dword(s.add(4 * m)) };
            msum = _mm256_add_epi32(msum, _mm256_madd_epi16(blk[pairs + m], b));
        }
        let block = if q6 {
            // (sum(sc * q * x) - 32 * sum(sc * bsum)) * (d_w * d_x)
            let total = _mm256_sub_epi32(isum[t], _mm256_slli_epi32::<5>(msum));
            let d = _mm256_mul_ps(_mm256_castsi256_ps(blk[88]), dx);
            _mm256_mul_ps(_mm256_cvtepi32_ps(total), d)
        } else {
            // sum(sc * q * x) * (d_w * d_x) - sum(m * bsum) * (dmin_w * d_x)
            let d = _mm256_mul_ps(_mm256_castsi256_ps(blk[80]), dx);
            let dmin = _mm256_mul_ps(_mm256_castsi256_ps(blk[81]), dx);
            _mm256_sub_ps(
                _mm256_mul_ps(_mm256_cvtepi32_ps(isum[t]), d),
                _mm256_mul_ps(_mm256_cvtepi32_ps(msum), dmin),
            )
        };
        acc[t] = _mm256_add_ps(acc[t], block);
    }
}

/// All (1..=4) tokens against the group at `w`, straight from the
/// mapping: with this few tokens, transposing a group's blocks would cost
/// more than it saves.
///
/// # Safety
/// As [`panel`] checked.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn direct<const F: u8>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    nb: usize,
    xs: &[&[u8]],
    r0: usize,
    out: Out,
) {
    assert!((1..=DIRECT_MAX).contains(&xs.len()), "1 to 4 tokens");
    // SAFETY: as [`panel`] checked.
    unsafe {
        if F == Q6K {
            by_len!(
                xs.len(),
                q6k_few::<Q6K>,
                (w, row_bytes, rows, nb, xs, r0, out)
            )
        } else {
            by_len!(
                xs.len(),
                q45k_few::<F>,
                (w, row_bytes, rows, nb, xs, r0, out)
            )
        }
    };
}

/// `N` (1..=4) tokens against the Q4_K or Q5_K group at `w` (decode, or a
/// few sequences' step). Each row pair's quants (rows `p` and `p + 4` in
/// the two halves; Q5_K's fifth bit from its qh bytes), unpacked once, meet
/// each token's quants broadcast to both halves straight from the mapping,
/// scaled per sub-block in i32; the headers (scales, mins, d, dmin) are
/// unpacked once for all 8 rows and tokens in the lane layout, the four
/// pairs reduced to one lane per row and finished by [`accumulate`]'s
/// float expression in lanes. (The 2-row tiles of [`super::kquants`],
/// which these replaced for 2-4 tokens, unpacked each row's header and
/// quants once per 2 rows: 1.3-1.8x slower.) The same exact integers, so
/// the same bits.
///
/// # Safety
/// As [`panel`] checked, with `x` the token's Q8_K row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q45k_few<const F: u8, const N: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    nb: usize,
    xs: &[&[u8]],
    r0: usize,
    out: Out,
) {
    let rp = group_rows(w, row_bytes, rows);
    let (lo4, low6) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x3f));
    let top2 = |v: __m256i| {
        let t = _mm256_and_si256(_mm256_srli_epi32::<6>(v), _mm256_set1_epi8(3));
        _mm256_slli_epi32::<4>(t)
    };
    // Byte `j` of each half's dword `p` (rows p and p + 4) in every i16.
    let pick = |p: usize, j: usize| _mm256_set1_epi16((0x8000 | (4 * p + j)) as u16 as i16);
    // The next group, spread over the four 64-weight steps of each block
    // (a block is 144 bytes a row: 18 lines a block in one burst measured
    // slower).
    let mut next = NextGroup::new(w, row_bytes, 4 * nb);
    let mut acc = [_mm256_setzero_ps(); N];
    // Q4_K: qs[128] @16; Q5_K: qh[32] @16 (bit j of byte l: element
    // 32j + l), qs[128] @48 (see `load_block`).
    let qs = if F == Q5K { 48 } else { 16 };
    let one = _mm256_set1_epi8(1);
    for x in &xs[..N] {
        assert!(x.len() >= nb * Q8K_BYTES, "activation row too short");
    }
    for i in 0..nb {
        let at = i * bytes_of(F);
        let xb: [*const u8; N] = std::array::from_fn(|t| xs[t][i * Q8K_BYTES..].as_ptr());
        // d @0, dmin @2, scales[12] @4 (see `load_block`).
        // SAFETY: block i of every row is readable (checked by `panel`).
        let [dd, a, b, c] = unsafe { dwords4(&rp, at) };
        let sc = [
            _mm256_and_si256(a, low6),
            _mm256_or_si256(_mm256_and_si256(c, lo4), top2(a)),
        ];
        let mins = [
            _mm256_and_si256(b, low6),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32::<4>(c), lo4), top2(b)),
        ];
        let mut isum = [[_mm256_setzero_si256(); 4]; N];
        for m in 0..4 {
            next.step();
            // qs[32m..32m + 32]: sub-block 2m in the low nibbles, 2m + 1
            // in the high; 16 bytes (half h) at a time, with each token's
            // quants of each in both halves.
            // (Loops, not array maps, whose closures can be compiled out
            // of line.)
            let mut y = [[(_mm256_setzero_si256(), _mm256_setzero_si256()); 2]; N];
            for (t, yt) in y.iter_mut().enumerate() {
                for (h, y) in yt.iter_mut().enumerate() {
                    // SAFETY: block i of xs[t] holds its 256 quants from
                    // Q8K_QS (asserted above).
                    *y = unsafe {
                        let q = xb[t].add(Q8K_QS + 64 * m + 16 * h);
                        (
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(q.cast())),
                            _mm256_broadcastsi128_si256(_mm_loadu_si128(q.add(32).cast())),
                        )
                    };
                }
            }
            let (j_lo, j_hi) = (2 * m, 2 * m + 1);
            // `p` names a row pair (loads, scale picks), not only a sum.
            #[allow(clippy::needless_range_loop)]
            for p in 0..4 {
                let mut lo = [_mm256_setzero_si256(); N];
                let mut hi = [_mm256_setzero_si256(); N];
                for h in 0..2 {
                    // SAFETY: block i of rows p and p + 4 is readable.
                    let v = unsafe { load_pair(&rp, p, at + qs + 32 * m + 16 * h) };
                    // Two pair sums of 4-bit (5-bit) values: at most
                    // 2 * 3840 (2 * 7936).
                    let mut q_lo = _mm256_and_si256(v, lo4);
                    let mut q_hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), lo4);
                    if F == Q5K {
                        // SAFETY: as above; qh bytes 16h.. of both rows.
                        let qh = unsafe { load_pair(&rp, p, at + 16 + 16 * h) };
                        // Bits 2m and 2m + 1 of each qh byte to bit 4.
                        let bit = |s: usize| {
                            let b = _mm256_srl_epi32(qh, _mm_cvtsi32_si128(s as i32));
                            _mm256_slli_epi32::<4>(_mm256_and_si256(b, one))
                        };
                        q_lo = _mm256_or_si256(q_lo, bit(2 * m));
                        q_hi = _mm256_or_si256(q_hi, bit(2 * m + 1));
                    }
                    for t in 0..N {
                        let (y_lo, y_hi) = y[t][h];
                        lo[t] = _mm256_add_epi16(lo[t], _mm256_maddubs_epi16(q_lo, y_lo));
                        hi[t] = _mm256_add_epi16(hi[t], _mm256_maddubs_epi16(q_hi, y_hi));
                    }
                }
                let s_lo = _mm256_shuffle_epi8(sc[j_lo / 4], pick(p, j_lo % 4));
                let s_hi = _mm256_shuffle_epi8(sc[j_hi / 4], pick(p, j_hi % 4));
                for t in 0..N {
                    let s = &mut isum[t][p];
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(lo[t], s_lo));
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(hi[t], s_hi));
                }
            }
        }
        let dw = f16_lanes::<false>(dd);
        let dmin_w = f16_lanes::<true>(dd);
        for t in 0..N {
            let isum = sum_pairs(isum[t]);
            // From here [`accumulate`]'s steps for one token.
            // SAFETY: block i of xs[t] holds its d and its 16 sums.
            let (dx, bsums) = unsafe {
                (
                    _mm256_set1_ps(xb[t].cast::<f32>().read_unaligned()),
                    xb[t].add(Q8K_BSUMS),
                )
            };
            let mut msum = _mm256_setzero_si256();
            for j in 0..8 {
                let mj =
                    _mm256_shuffle_epi8(mins[j / 4], pick16::<false>(j as i32 % 4, j as i32 % 4));
                // SAFETY: as above.
                let b = unsafe { dword(bsums.add(4 * j)) };
                msum = _mm256_add_epi32(msum, _mm256_madd_epi16(mj, b));
            }
            // sum(sc * q * x) * (d_w * d_x) - sum(m * bsum) * (dmin_w * d_x)
            let d = _mm256_mul_ps(dw, dx);
            let dmin = _mm256_mul_ps(dmin_w, dx);
            let block = _mm256_sub_ps(
                _mm256_mul_ps(_mm256_cvtepi32_ps(isum), d),
                _mm256_mul_ps(_mm256_cvtepi32_ps(msum), dmin),
            );
            acc[t] = _mm256_add_ps(acc[t], block);
        }
    }
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: `panel` checked that every token's outputs fit; r0 < rows.
        unsafe { out.store8(t, r0, *a) };
    }
}

/// `N` (1..=4) tokens against the Q6_K group at `w`, as [`q45k_few`] does
/// for Q4_K: row pairs (rows `p` and `p + 4` in the two halves) straight
/// from the mapping, each pair's 16 sub-block scales sign-extended once per
/// block, the +32 offset taken off in i32 before the reduction to one lane
/// per row, then the panels' float expression in lanes. The same exact
/// (wrapping) integers, so the same bits.
///
/// # Safety
/// As [`panel`] checked, with `x` the token's Q8_K row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_few<const F: u8, const N: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    nb: usize,
    xs: &[&[u8]],
    r0: usize,
    out: Out,
) {
    debug_assert_eq!(F, Q6K);
    let rp = group_rows(w, row_bytes, rows);
    let (m4, m30) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
    // i16 `k` of each half in every i16 of it.
    let word = |k: usize| _mm256_set1_epi16((((2 * k + 1) << 8) | (2 * k)) as i16);
    // The next group, spread over the four row pairs of each block.
    let mut next = NextGroup::new(w, row_bytes, 4 * nb);
    let mut acc = [_mm256_setzero_ps(); N];
    for x in &xs[..N] {
        assert!(x.len() >= nb * Q8K_BYTES, "activation row too short");
    }
    for i in 0..nb {
        let at = i * bytes_of(Q6K);
        let xb: [*const u8; N] = std::array::from_fn(|t| xs[t][i * Q8K_BYTES..].as_ptr());
        // ql[128] @0, qh[64] @128, scales i8[16] @192, d @208.
        let mut bsum = [(_mm256_setzero_si256(), _mm256_setzero_si256()); N];
        for (t, b) in bsum.iter_mut().enumerate() {
            // SAFETY: block i of xs[t] holds its 16 sums of 16 quants
            // (asserted above).
            *b = unsafe {
                let b = xb[t].add(Q8K_BSUMS);
                (
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(b.cast())),
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(b.add(16).cast())),
                )
            };
        }
        let mut isum = [[_mm256_setzero_si256(); 4]; N];
        // `p` names a row pair (loads), not only a sum.
        #[allow(clippy::needless_range_loop)]
        for p in 0..4 {
            next.step();
            // SAFETY: block i of rows p and p + 4 is readable.
            let e = unsafe { load_pair(&rp, p, at + 192) };
            let sc = [
                _mm256_srai_epi16::<8>(_mm256_unpacklo_epi8(e, e)),
                _mm256_srai_epi16::<8>(_mm256_unpackhi_epi8(e, e)),
            ];
            // Sub-block k's scale times each activation's sum of it, for
            // the +32 the values are stored with.
            let mut corr = [_mm256_setzero_si256(); N];
            for (c, (b_lo, b_hi)) in corr.iter_mut().zip(bsum) {
                *c = _mm256_add_epi32(
                    _mm256_madd_epi16(sc[0], b_lo),
                    _mm256_madd_epi16(sc[1], b_hi),
                );
            }
            let mut s = [_mm256_setzero_si256(); N];
            for n in 0..2 {
                for h in 0..2 {
                    // Values 128n + 32q + 16h.. (q = 0..4) of sub-block
                    // 8n + 2q + h: ql bytes 64n + 16h.. (low nibbles, then
                    // high) and 64n + 32 + 16h.., with qh bits 2q.. of
                    // bytes 32n + 16h...
                    let l = at + 64 * n + 16 * h;
                    // SAFETY: block i of rows p and p + 4 is readable.
                    let (a, b, hb) = unsafe {
                        (
                            load_pair(&rp, p, l),
                            load_pair(&rp, p, l + 32),
                            load_pair(&rp, p, at + 128 + 32 * n + 16 * h),
                        )
                    };
                    let q = [
                        _mm256_or_si256(
                            _mm256_and_si256(a, m4),
                            _mm256_and_si256(_mm256_slli_epi16::<4>(hb), m30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(b, m4),
                            _mm256_and_si256(_mm256_slli_epi16::<2>(hb), m30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(a), m4),
                            _mm256_and_si256(hb, m30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(b), m4),
                            _mm256_and_si256(_mm256_srli_epi16::<2>(hb), m30),
                        ),
                    ];
                    for (k, v) in q.into_iter().enumerate() {
                        let sub = 8 * n + 2 * k + h;
                        let scale = _mm256_shuffle_epi8(sc[sub / 8], word(sub % 8));
                        for t in 0..N {
                            // SAFETY: block i of xs[t] holds its 256 quants.
                            let y = unsafe {
                                let at = Q8K_QS + 128 * n + 32 * k + 16 * h;
                                _mm256_broadcastsi128_si256(_mm_loadu_si128(xb[t].add(at).cast()))
                            };
                            // A pair of 6-bit values: at most 2 * 63 * 128.
                            s[t] = _mm256_add_epi32(
                                s[t],
                                _mm256_madd_epi16(_mm256_maddubs_epi16(v, y), scale),
                            );
                        }
                    }
                }
            }
            for t in 0..N {
                // (sum(sc * q * x) - 32 * sum(sc * bsum)), wrapping as the
                // panels' lanes do.
                isum[t][p] = _mm256_sub_epi32(s[t], _mm256_slli_epi32::<5>(corr[t]));
            }
        }
        // d @208 as the high word of 4 bytes @206 (a load at 208 would
        // reach past the block, and past the mapping after the last).
        // SAFETY: bytes 206..210 of block i of every row are readable.
        let dw = unsafe { row_f16s::<true>(&rp, at + 206) };
        for t in 0..N {
            let total = sum_pairs(isum[t]);
            // SAFETY: block i of xs[t] holds its d.
            let dx = _mm256_set1_ps(unsafe { xb[t].cast::<f32>().read_unaligned() });
            // (...) * (d_w * d_x)
            let block = _mm256_mul_ps(_mm256_cvtepi32_ps(total), _mm256_mul_ps(dw, dx));
            acc[t] = _mm256_add_ps(acc[t], block);
        }
    }
    for (t, a) in acc.iter().enumerate() {
        // SAFETY: `panel` checked that every token's outputs fit; r0 < rows.
        unsafe { out.store8(t, r0, *a) };
    }
}

/// Tokens `t0..t0 + N` against a packed group; results to rows `r0..`;
/// `ahead` brings the rows below to L2 meanwhile.
///
/// # Safety
/// As [`panel`] checked; `packed` holds `nb` packed blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn from_packed<const F: u8, const N: usize>(
    packed: &[__m256i],
    xs: &[&[u8]],
    t0: usize,
    r0: usize,
    out: Out,
    ahead: Ahead,
) {
    let x: [*const u8; N] = std::array::from_fn(|t| xs[t0 + t].as_ptr());
    let mut acc = [_mm256_setzero_ps(); N];
    let nb = packed.len() / regs(F);
    for (i, blk) in packed.chunks_exact(regs(F)).enumerate() {
        ahead.block(i, nb);
        // SAFETY: xs[t] holds as many blocks as packed (checked by `panel`).
        unsafe { accumulate::<F, N>(blk, &x, i, &mut acc) };
    }
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: `panel` checked that every token's outputs fit; r0 < rows.
        unsafe { out.store8(t0 + k, r0, *a) };
    }
}

/// Dots of `rows` (1..=16) consecutive weight rows (`w` starts at the
/// first, `row_bytes` apart, `nb` super-blocks each) with every Q8_K
/// activation row, written to `out` (token `t`, row `r` at `t * ld + r`):
/// the same contract and the same bits as [`super::avx512k::panel`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
///
/// # Panics
/// If `w`, an activation row or `out` is too short, or `rows` is not in
/// 1..=16.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn panel(
    format: KFormat,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    xs: &[&[u8]],
    nb: usize,
    out: Out,
) {
    let bytes = match format {
        KFormat::Q4K => bytes_of(Q4K),
        KFormat::Q5K => bytes_of(Q5K),
        KFormat::Q6K => bytes_of(Q6K),
    };
    check_panel(w, row_bytes, rows, nb * bytes, xs.len(), out);
    for x in xs {
        assert!(x.len() >= nb * Q8K_BYTES, "activation row too short");
    }
    // SAFETY: features by the caller; lengths asserted above.
    unsafe {
        match format {
            KFormat::Q4K => panel_of::<Q4K>(w, row_bytes, rows, nb, xs, out),
            KFormat::Q5K => panel_of::<Q5K>(w, row_bytes, rows, nb, xs, out),
            KFormat::Q6K => panel_of::<Q6K>(w, row_bytes, rows, nb, xs, out),
        }
    }
}

/// [`panel`] for one format, group by group.
///
/// # Safety
/// As [`panel`] checked.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_of<const F: u8>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    nb: usize,
    xs: &[&[u8]],
    out: Out,
) {
    let n = xs.len();
    let bytes = bytes_of(F);
    for r0 in (0..rows).step_by(GROUP) {
        let g = &w[r0 * row_bytes..];
        let g_rows = (rows - r0).min(GROUP);
        if n <= DIRECT_MAX {
            // SAFETY: as [`panel`] checked.
            unsafe { direct::<F>(g, row_bytes, g_rows, nb, xs, r0, out) };
            continue;
        }
        with_packed(regs(F) * nb, |packed| {
            let rp = group_rows(g, row_bytes, g_rows);
            for (i, p) in packed.chunks_exact_mut(regs(F)).enumerate() {
                for r in rp {
                    // Two blocks ahead in each row (a hint).
                    let a = r.wrapping_add((i + 2) * bytes);
                    for line in (0..bytes).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(line).cast());
                    }
                }
                // SAFETY: as [`panel`] checked.
                unsafe { load_block::<F>(&rp, i, p) };
            }
            // The group below (usually this thread's next) goes to L2 a
            // share per token tile while this one is used.
            let next = g.as_ptr().wrapping_add(GROUP * row_bytes);
            let mut t0 = 0;
            while t0 < n {
                let len = (n - t0).min(TILE);
                let ahead = Ahead::share(next, GROUP * row_bytes, n, t0);
                // SAFETY: as [`panel`] checked; packed holds nb blocks.
                unsafe { by_len!(len, from_packed::<F>, (packed, xs, t0, r0, out, ahead)) };
                t0 += len;
            }
        });
    }
}

/// The AVX-512 panels' arithmetic, plainly written: what every group output
/// must equal bit for bit (integer steps wrap as the vector lanes do). The
/// reference of the x86 k-quant kernels' tests (`tests/isa_paths.rs`).
pub fn panel_order_dot(format: KFormat, w: &[u8], x: &[u8], nb: usize) -> f32 {
    let f16 = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let bytes = match format {
        KFormat::Q4K => 144,
        KFormat::Q5K => 176,
        KFormat::Q6K => 210,
    };
    let mut acc = 0.0f32;
    for i in 0..nb {
        let wb = &w[i * bytes..(i + 1) * bytes];
        let xb = &x[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
        let dx = f32::from_le_bytes([xb[0], xb[1], xb[2], xb[3]]);
        let q = |e: usize| i32::from(xb[Q8K_QS + e] as i8);
        let bsum = |k: usize| {
            i32::from(i16::from_le_bytes([
                xb[Q8K_BSUMS + 2 * k],
                xb[Q8K_BSUMS + 2 * k + 1],
            ]))
        };
        let block = if format == KFormat::Q6K {
            let code = |e: usize| {
                let (n, l) = (e / 128, e % 128);
                let (quarter, b) = (l / 32, l % 32);
                let byte = wb[64 * n + 32 * (quarter % 2) + b];
                let low = if quarter < 2 { byte & 15 } else { byte >> 4 };
                let high = (wb[128 + 32 * n + b] >> (2 * quarter)) & 3;
                i32::from(low | (high << 4))
            };
            let (mut isum, mut msum) = (0i32, 0i32);
            for k in 0..16 {
                let sc = i32::from(wb[192 + k] as i8);
                let dot: i32 = (16 * k..16 * k + 16).map(|e| code(e) * q(e)).sum();
                isum = isum.wrapping_add(sc.wrapping_mul(dot));
                msum = msum.wrapping_add(sc.wrapping_mul(bsum(k)));
            }
            let total = isum.wrapping_sub(msum.wrapping_shl(5));
            total as f32 * (f16(wb, 208) * dx)
        } else {
            let qs = if format == KFormat::Q5K { 48 } else { 16 };
            let code = |e: usize| {
                let byte = wb[qs + 32 * (e / 64) + e % 32];
                let low = if e % 64 < 32 { byte & 15 } else { byte >> 4 };
                let fifth = if format == KFormat::Q5K {
                    ((wb[16 + e % 32] >> (e / 32)) & 1) << 4
                } else {
                    0
                };
                i32::from(low | fifth)
            };
            let packed: &[u8; 12] = wb[4..16].try_into().expect("12 bytes");
            let (mut isum, mut msum) = (0i32, 0i32);
            for j in 0..8 {
                let (sc, m) = crate::scalar::scale_min(j, packed);
                let dot: i32 = (32 * j..32 * j + 32).map(|e| code(e) * q(e)).sum();
                isum = isum.wrapping_add(i32::from(sc) * dot);
                msum = msum.wrapping_add(i32::from(m) * (bsum(2 * j) + bsum(2 * j + 1)));
            }
            isum as f32 * (f16(wb, 0) * dx) - msum as f32 * (f16(wb, 2) * dx)
        };
        acc += block;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar;
    use crate::types::{ActType, WeightType};

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u8 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u8
        }
        fn values(&mut self, n: usize, spread: f32) -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let v = (f32::from(self.next()) / 255.0 - 0.5) * spread;
                    if i % 37 == 0 { v * 9.0 } else { v }
                })
                .collect()
        }
    }

    /// How test blocks are filled.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Fill {
        /// Through the scalar quantizers.
        Quantized,
        /// Random bytes (every bit pattern of scales and quants), sane d.
        Raw,
        /// Largest codes and scales, smallest activations, largest d.
        Extreme,
    }

    fn weight_type(f: KFormat) -> WeightType {
        match f {
            KFormat::Q4K => WeightType::Q4K,
            KFormat::Q5K => WeightType::Q5K,
            KFormat::Q6K => WeightType::Q6K,
        }
    }

    /// `rows` weight rows of `nb` blocks, `stride` bytes apart.
    fn weights(
        f: KFormat,
        rows: usize,
        nb: usize,
        stride: usize,
        fill: Fill,
        rng: &mut Lcg,
    ) -> Vec<u8> {
        let ty = weight_type(f);
        let (bytes, used) = (ty.block_bytes(), ty.row_bytes(nb * 256));
        let mut w = vec![0u8; rows * stride];
        for row in w.chunks_exact_mut(stride) {
            let row = &mut row[..used];
            match fill {
                Fill::Quantized => scalar::quantize_row(ty, &rng.values(nb * 256, 4.0), row),
                _ => {
                    for b in row.iter_mut() {
                        *b = if fill == Fill::Raw { rng.next() } else { 0xff };
                    }
                    let d_at: &[usize] = if f == KFormat::Q6K { &[208] } else { &[0, 2] };
                    for blk in row.chunks_exact_mut(bytes) {
                        for &at in d_at {
                            let d = if fill == Fill::Raw { 0.0123 } else { 65504.0 };
                            blk[at..at + 2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                        }
                        if fill == Fill::Extreme && f == KFormat::Q6K {
                            // The most negative scales.
                            blk[192..208].fill(0x80);
                        }
                    }
                }
            }
        }
        w
    }

    fn acts(nb: usize, fill: Fill, rng: &mut Lcg) -> Vec<u8> {
        let mut x = vec![0u8; nb * Q8K_BYTES];
        match fill {
            Fill::Quantized => {
                scalar::quantize_acts(ActType::Q8K, &rng.values(nb * 256, 6.0), &mut x)
            }
            Fill::Raw => {
                for b in x.iter_mut() {
                    *b = rng.next();
                }
                for blk in x.chunks_exact_mut(Q8K_BYTES) {
                    blk[..4].copy_from_slice(&0.037f32.to_le_bytes());
                }
            }
            Fill::Extreme => {
                for blk in x.chunks_exact_mut(Q8K_BYTES) {
                    blk[..4].copy_from_slice(&1.0e3f32.to_le_bytes());
                    blk[Q8K_QS..Q8K_BSUMS].fill(0x80);
                    for k in 0..16 {
                        let s = (-128i16 * 16).to_le_bytes();
                        blk[Q8K_BSUMS + 2 * k..Q8K_BSUMS + 2 * k + 2].copy_from_slice(&s);
                    }
                }
            }
        }
        x
    }

    #[test]
    fn groups_give_the_panel_bits_and_agree_with_the_scalar_reference() {
        if !crate::isa::Isa::Avx2.available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut rng = Lcg(23);
        for format in [KFormat::Q4K, KFormat::Q5K, KFormat::Q6K] {
            let ty = weight_type(format);
            // Every direct tile (1..=4 tokens), packed tiles with every
            // remainder, partial and whole groups, one and two groups.
            for &(rows, nb, n) in &[
                (16, 1, 1),
                (5, 3, 1),
                (8, 7, 1),
                (3, 3, 2),
                (8, 2, 3),
                (16, 4, 4),
                (9, 3, 5),
                (16, 2, 8),
                (1, 2, 6),
                (13, 3, 11),
                (15, 1, 7),
                (7, 2, 9),
            ] {
                for fill in [Fill::Quantized, Fill::Raw, Fill::Extreme] {
                    let used = ty.row_bytes(nb * 256);
                    // A row stride larger than the blocks, as a sub-matrix view has.
                    let stride = used + if rows % 2 == 1 { ty.block_bytes() } else { 0 };
                    let w = weights(format, rows, nb, stride, fill, &mut rng);
                    let xs: Vec<Vec<u8>> = (0..n).map(|_| acts(nb, fill, &mut rng)).collect();
                    let refs: Vec<&[u8]> = xs.iter().map(Vec::as_slice).collect();
                    let ld = 17;
                    let mut out = vec![f32::NAN; n * ld];
                    // SAFETY: AVX2 detected above.
                    unsafe {
                        panel(
                            format,
                            &w,
                            stride,
                            rows,
                            &refs,
                            nb,
                            Out::new(&mut out, ld, rows),
                        )
                    };
                    for t in 0..n {
                        // Nothing past the panel's rows is written.
                        assert!(out[t * ld + rows..(t + 1) * ld].iter().all(|v| v.is_nan()));
                    }
                    for r in 0..rows {
                        let row = &w[r * stride..r * stride + used];
                        for t in 0..n {
                            let got = out[t * ld + r];
                            let want = panel_order_dot(format, row, &xs[t], nb);
                            assert!(
                                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                                "{format:?} {fill:?} rows={rows} nb={nb} n={n} r={r} t={t}: {got} vs {want}"
                            );
                            if fill == Fill::Quantized {
                                let want = scalar::vec_dot(ty, row, &xs[t], nb * 256);
                                let mut wf = vec![0.0f32; nb * 256];
                                scalar::dequantize_row(ty, row, &mut wf);
                                let mag: f32 = wf.iter().map(|v| v.abs()).sum::<f32>() * 3.0;
                                assert!(
                                    (got - want).abs() <= 1e-5 * mag.max(1.0),
                                    "{format:?} rows={rows} nb={nb} r={r} t={t}: {got} vs scalar {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
