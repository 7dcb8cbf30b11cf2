//! AVX2 products of Q4_0 / Q8_0 weight rows with Q8_0 activations, in
//! groups of [`GROUP`] weight rows: one ymm lane per weight row, so every
//! block's integer dot ends in its own lane with no horizontal sum, and one
//! broadcast activation dword feeds 8 rows' `vpmaddubsw`.
//!
//! The weights stay where they are (the model mapping): a group's blocks are
//! transposed into the lane layout as they are used (decode: few tokens,
//! each block serves every token of the call) or unpacked once per group
//! into a small thread-local buffer that every token tile then reads from
//! L1/L2 (5 tokens and more). No copy of a matrix outlives the call. A
//! Q4_0 panel's two groups are unpacked together and each broadcast
//! activation dword then feeds 16 rows' `vpmaddubsw` (the broadcasts are a
//! third of the vector µops with one group: 14-18% faster from 5 tokens up).
//!
//! Numerics: each block's integer dot is exact, and the float steps are the
//! scalar reference's, in its order (`(sum * d_w) * d_x` for Q4_0,
//! `sum * (d_w * d_x)` for Q8_0, then `acc += block` from block 0 up), so
//! every output is bit-identical to `scalar::vec_dot` (and to the AVX-512
//! panels) whatever the batch, group position or path.
//!
//! `vpmaddubsw` multiplies unsigned by signed bytes into saturating i16 pair
//! sums, so weights enter as 4-bit unsigned values: a pair is at most
//! 2 * 15 * 128 = 3840 in magnitude and a block's 8 pairs per lane add up
//! exactly in i16 (<= 30720) before one `vpmaddwd` widens them. Q4_0 nibbles
//! are `q + 8`; a Q8_0 byte enters as `q + 128 = 16 * hi + lo`, two nibble
//! dots. `offset * sum(x)` per activation block ([`ActSums`]) is subtracted
//! after.

use super::avx512::{ActSums, FloatRow, Format, Out, check_panel, load1};
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Weight rows per group: one per 32-bit lane of a ymm register.
pub const GROUP: usize = 8;
/// Tokens per register tile of the packed path.
pub(super) const TILE: usize = 4;
/// Token counts up to this are computed from blocks transposed on the fly;
/// more tokens pay for unpacking the group once.
const DIRECT_MAX: usize = 4;
const Q8_0_BYTES: usize = 34;

/// Registers a block of a group takes in the lane layout (in the
/// thread-local buffer, or in registers): register `k` < 8 holds 4 unsigned
/// 4-bit weights per row (lane), the ones that meet activation dword `k`;
/// Q8_0 has 8 more, the high nibbles of `q + 128`; the last holds the
/// rows' scales as f32.
const fn packed_regs(q8: bool) -> usize {
    if q8 { 17 } else { 9 }
}

/// A 4x4 transpose of dwords in each 128-bit lane: lane `r` of output `k`
/// is dword `k` of input `r % 4`'s lane `r / 4`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn transpose4(v: [__m256i; 4]) -> [__m256i; 4] {
    let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
    let t1 = _mm256_unpacklo_epi32(v[2], v[3]);
    let t2 = _mm256_unpackhi_epi32(v[0], v[1]);
    let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    [
        _mm256_unpacklo_epi64(t0, t1),
        _mm256_unpackhi_epi64(t0, t1),
        _mm256_unpacklo_epi64(t2, t3),
        _mm256_unpackhi_epi64(t2, t3),
    ]
}

/// 16 bytes at `p + at` of rows `a` (low lane) and `a + 4` (high lane).
///
/// # Safety
/// Both 16-byte ranges must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load_pair(rows: &[*const u8; GROUP], a: usize, at: usize) -> __m256i {
    // SAFETY: by the caller; the loads are unaligned.
    unsafe {
        _mm256_set_m128i(
            _mm_loadu_si128(rows[a + 4].add(at).cast()),
            _mm_loadu_si128(rows[a].add(at).cast()),
        )
    }
}

/// [`load_pair`] for the four pairs `a`, `a + 4` (written out: a closure
/// here was left out of line, a call per pair in the packing loop).
///
/// # Safety
/// 16 bytes at `at` of every row must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load_pairs4(rows: &[*const u8; GROUP], at: usize) -> [__m256i; 4] {
    // SAFETY: by the caller.
    unsafe {
        [
            load_pair(rows, 0, at),
            load_pair(rows, 1, at),
            load_pair(rows, 2, at),
            load_pair(rows, 3, at),
        ]
    }
}

/// Block `i` of the group's rows in the lane layout, written to
/// `out[..packed_regs(Q8)]`.
///
/// # Safety
/// AVX2/FMA/F16C must be present and block `i` of every row readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_block<const Q8: bool>(rows: &[*const u8; GROUP], i: usize, out: &mut [__m256i]) {
    let bytes = if Q8 { Format::Q8_0 } else { Format::Q4_0 }.block_bytes();
    let at = i * bytes;
    let m = _mm256_set1_epi8(0x0f);
    // SAFETY (all loads): block i of every row is readable (the caller);
    // the reads are its 2-byte scale and its quant bytes.
    let d = unsafe { row_f16s::<false>(rows, at) };
    out[packed_regs(Q8) - 1] = _mm256_castps_si256(d);
    if Q8 {
        // Dwords 0..4 then 4..8 of the 32 quant bytes.
        let flip = _mm256_set1_epi8(i8::MIN);
        for half in 0..2 {
            let at = at + 2 + 16 * half;
            // SAFETY: see above.
            let v = unsafe { load_pairs4(rows, at) };
            for (k, p) in transpose4(v).into_iter().enumerate() {
                let u = _mm256_xor_si256(p, flip);
                out[4 * half + k] = _mm256_and_si256(u, m);
                out[8 + 4 * half + k] = _mm256_and_si256(_mm256_srli_epi16::<4>(u), m);
            }
        }
    } else {
        // SAFETY: see above.
        let v = unsafe { load_pairs4(rows, at + 2) };
        for (k, p) in transpose4(v).into_iter().enumerate() {
            // Packed byte j holds elements j (low) and j + 16 (high).
            out[k] = _mm256_and_si256(p, m);
            out[k + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(p), m);
        }
    }
}

/// Adds block `i` of `N` tokens (Q8_0 rows `x`, with their per-block
/// scales `d[t]` and offset sums `s[t]`) to their accumulators.
///
/// # Safety
/// AVX2/FMA/F16C must be present and every `x[t]`, `d[t]` and `s[t]` hold
/// block `i`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate<const Q8: bool, const N: usize>(
    lo: &[__m256i; 8],
    hi: &[__m256i; 8],
    dw: __m256,
    x: &[*const u8; N],
    i: usize,
    d: &[*const f32; N],
    s: &[*const i32; N],
    acc: &mut [__m256; N],
) {
    let mut a_lo = [_mm256_setzero_si256(); N];
    let mut a_hi = [_mm256_setzero_si256(); N];
    for k in 0..8 {
        for t in 0..N {
            // SAFETY: the caller guarantees block i of x[t]; this reads 4 of
            // its quant bytes (unaligned).
            let xk = unsafe {
                x[t].add(i * Q8_0_BYTES + 2 + 4 * k)
                    .cast::<i32>()
                    .read_unaligned()
            };
            let xk = _mm256_set1_epi32(xk);
            // Exact: see the module comment for the i16 bound.
            a_lo[t] = _mm256_add_epi16(a_lo[t], _mm256_maddubs_epi16(lo[k], xk));
            if Q8 {
                a_hi[t] = _mm256_add_epi16(a_hi[t], _mm256_maddubs_epi16(hi[k], xk));
            }
        }
    }
    for t in 0..N {
        let mut sum = _mm256_madd_epi16(a_lo[t], _mm256_set1_epi16(1));
        if Q8 {
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(a_hi[t], _mm256_set1_epi16(16)));
        }
        // SAFETY: the caller guarantees entry i of d[t] and s[t].
        unsafe { add_block::<Q8>(sum, dw, d[t].add(i), s[t].add(i), &mut acc[t]) };
    }
}

/// Adds one block's products to `acc` (8 rows, one token): `sum` holds the
/// rows' integer dots with the token's quants, `*d` and `*s` the token's
/// block scale and offset sum, `dw` the rows' scales. The float steps are
/// the scalar reference's, in its order.
///
/// # Safety
/// AVX2/FMA/F16C must be present, `d` and `s` readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_block<const Q8: bool>(
    sum: __m256i,
    dw: __m256,
    d: *const f32,
    s: *const i32,
    acc: &mut __m256,
) {
    // SAFETY: by the caller; read where they are, so each is one
    // broadcast load.
    let (st, dt) = unsafe { (*s, *d) };
    let f = _mm256_cvtepi32_ps(_mm256_sub_epi32(sum, _mm256_set1_epi32(st)));
    let block = if Q8 {
        // scalar: sum as f32 * (d_w * d_x)
        _mm256_mul_ps(f, _mm256_mul_ps(dw, _mm256_set1_ps(dt)))
    } else {
        // scalar: sum as f32 * d_w * d_x
        _mm256_mul_ps(_mm256_mul_ps(f, dw), _mm256_set1_ps(dt))
    };
    *acc = _mm256_add_ps(*acc, block);
}

/// The 8 rows' f16 fields at byte `at` as floats: each the low word (the
/// high one if `HIGH`) of a 4-byte load, interleaved into one register by
/// an unpack tree (7 shuffles; inserting word by word costs twice the µops).
/// `HIGH` reads a field that ends its block without loading past it.
///
/// # Safety
/// AVX2/FMA/F16C must be present and 4 bytes at `at` of every row readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn row_f16s<const HIGH: bool>(rows: &[*const u8; GROUP], at: usize) -> __m256 {
    // SAFETY: by the caller.
    let h = |r: usize| unsafe {
        let v = rows[r].add(at).cast::<u32>().read_unaligned();
        _mm_cvtsi32_si128((if HIGH { v >> 16 } else { v }) as i32)
    };
    let pair = |a: usize| _mm_unpacklo_epi16(h(a), h(a + 1));
    _mm256_cvtph_ps(_mm_unpacklo_epi64(
        _mm_unpacklo_epi32(pair(0), pair(2)),
        _mm_unpacklo_epi32(pair(4), pair(6)),
    ))
}

/// Integer dots of Q4_0 block `i` of the 8 rows (at byte `at`) with one
/// token's 32 quants at `x`, row `r` in lane `r` (as `accumulate` sums
/// them). Row pairs straight from memory against the token's quants
/// broadcast to both halves, then one reduction: with a single token the
/// transposition into the lane layout costs more than it saves.
///
/// # Safety
/// AVX2/FMA/F16C must be present, block `i` of every row and 32 bytes at
/// `x` readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_dots_one(rows: &[*const u8; GROUP], at: usize, x: *const u8) -> __m256i {
    let m = _mm256_set1_epi8(0x0f);
    // Packed byte j holds weights j (low nibble) and j + 16 (high).
    // SAFETY (all loads): by the caller; unaligned.
    let (x_lo, x_hi) = unsafe {
        (
            _mm256_broadcastsi128_si256(_mm_loadu_si128(x.cast())),
            _mm256_broadcastsi128_si256(_mm_loadu_si128(x.add(16).cast())),
        )
    };
    // SAFETY: see above. Pair a: rows a (low half) and a + 4 (high half).
    let mut v = unsafe { load_pairs4(rows, at + 2) };
    // A loop, not an array map: the map's closure can be compiled out of
    // line, a call per row pair (measured: half the decode rate).
    for p in &mut v {
        // Each i16 at most 2 * 15 * 128 per product pair: the sum of two
        // fits.
        let lo = _mm256_maddubs_epi16(_mm256_and_si256(*p, m), x_lo);
        let hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16::<4>(*p), m), x_hi);
        *p = _mm256_madd_epi16(_mm256_add_epi16(lo, hi), _mm256_set1_epi16(1));
    }
    sum_pairs(v)
}

/// One i32 lane per row from four row-pair registers: `v[a]` holds four
/// partial sums of row `a` (low half) and of row `a + 4` (high half); the
/// result holds row `r` in lane `r`, the lane layout of the groups.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn sum_pairs(v: [__m256i; 4]) -> __m256i {
    let t01 = _mm256_add_epi32(
        _mm256_unpacklo_epi32(v[0], v[1]),
        _mm256_unpackhi_epi32(v[0], v[1]),
    );
    let t23 = _mm256_add_epi32(
        _mm256_unpacklo_epi32(v[2], v[3]),
        _mm256_unpackhi_epi32(v[2], v[3]),
    );
    _mm256_add_epi32(
        _mm256_unpacklo_epi64(t01, t23),
        _mm256_unpackhi_epi64(t01, t23),
    )
}

/// Prefetches the group after the one at hand (usually this thread's
/// next) into L1 in address order, its lines spread evenly over `steps`
/// calls of [`NextGroup::step`]. Measured on a DRAM-sized run of matrices
/// (`decode-dram` bench, Zen 3, 2 threads): 11.6 GB/s prefetching one line
/// per row at the row's current offset, 13.3-14.1 GB/s with this linear
/// stream (the hardware prefetcher joins in).
pub(super) struct NextGroup {
    ahead: *const u8,
    lines: usize,
    steps: usize,
    line: usize,
    owed: usize,
}

impl NextGroup {
    /// For the group of `GROUP` rows `row_bytes` apart at `w`.
    pub(super) fn new(w: &[u8], row_bytes: usize, steps: usize) -> NextGroup {
        let span = GROUP * row_bytes;
        NextGroup {
            ahead: w.as_ptr().wrapping_add(span),
            lines: span.div_ceil(64),
            steps: steps.max(1),
            line: 0,
            owed: 0,
        }
    }

    /// The lines due by this step (counted without a division).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn step(&mut self) {
        self.owed += self.lines;
        while self.owed >= self.steps {
            self.owed -= self.steps;
            // A hint: an address past the mapping is harmless.
            _mm_prefetch::<_MM_HINT_T0>(self.ahead.wrapping_add(self.line * 64).cast());
            self.line += 1;
        }
    }
}

/// The low- and high-nibble registers of a block in the lane layout (Q4_0
/// has only the low ones; `hi` is then unused).
#[inline]
fn split_block<const Q8: bool>(b: &[__m256i]) -> (&[__m256i; 8], &[__m256i; 8]) {
    let lo: &[__m256i; 8] = b[..8].try_into().expect("a block has 8 low registers");
    let hi = if Q8 {
        b[8..16]
            .try_into()
            .expect("a Q8_0 block has 8 high registers")
    } else {
        lo
    };
    (lo, hi)
}

/// Where the activation scales and sums of tokens `t0..t0 + N` start
/// (`sums.nb` entries each).
///
/// # Panics
/// If `sums` has no entries for those tokens.
#[inline]
fn token_args<const N: usize>(sums: &ActSums, t0: usize) -> ([*const f32; N], [*const i32; N]) {
    let nb = sums.nb;
    assert!(
        sums.d.len() >= (t0 + N) * nb && sums.s.len() >= (t0 + N) * nb,
        "activation sums for too few tokens"
    );
    (
        std::array::from_fn(|t| sums.d[(t0 + t) * nb..].as_ptr()),
        std::array::from_fn(|t| sums.s[(t0 + t) * nb..].as_ptr()),
    )
}

/// Row pointers of a group of `rows` (1..=8) rows from `w`, `row_bytes`
/// apart; lanes past `rows` repeat the last row (valid addresses; their
/// results are never stored).
pub(super) fn group_rows(w: &[u8], row_bytes: usize, rows: usize) -> [*const u8; GROUP] {
    std::array::from_fn(|r| w.as_ptr().wrapping_add(r.min(rows - 1) * row_bytes))
}

/// Tokens `t0..t0 + N` against blocks transposed on the fly from the group
/// at `w`; results to rows `r0..` of `out`.
///
/// # Safety
/// As [`panel`] checked: features present, rows and activations long enough.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn direct<const Q8: bool, const N: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    xs: &[&[u8]],
    sums: &ActSums,
    t0: usize,
    r0: usize,
    out: Out,
) {
    let nb = sums.nb;
    let rp = group_rows(w, row_bytes, rows);
    let x: [*const u8; N] = std::array::from_fn(|t| xs[t0 + t].as_ptr());
    let (d, s) = token_args::<N>(sums, t0);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut next = NextGroup::new(w, row_bytes, nb);
    for i in 0..nb {
        next.step();
        if N == 1 && !Q8 {
            let at = i * Format::Q4_0.block_bytes();
            // SAFETY: every row has nb blocks (checked by `panel`), xs[0]
            // holds nb blocks, d[0] and s[0] nb entries.
            unsafe {
                let x0 = x[0].add(i * Q8_0_BYTES + 2);
                let sum = q4_0_dots_one(&rp, at, x0);
                add_block::<false>(
                    sum,
                    row_f16s::<false>(&rp, at),
                    d[0].add(i),
                    s[0].add(i),
                    &mut acc[0],
                );
            }
            continue;
        }
        let mut b = [_mm256_setzero_si256(); 17];
        // SAFETY: every row has nb blocks (checked by `panel`).
        unsafe { load_block::<Q8>(&rp, i, &mut b) };
        let (lo, hi) = split_block::<Q8>(&b);
        let dw = _mm256_castsi256_ps(b[packed_regs(Q8) - 1]);
        // SAFETY: xs[t] holds nb blocks (checked by ActSums::new), and so
        // do d[t] and s[t] (token_args).
        unsafe { accumulate::<Q8, N>(lo, hi, dw, &x, i, &d, &s, &mut acc) };
    }
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: `panel` checked that every token's outputs fit; r0 < rows.
        unsafe { out.store8(t0 + k, r0, *a) };
    }
}

/// Tokens `t0..t0 + N` against a packed group; results to rows `r0..`;
/// `ahead` brings the rows below to L2 meanwhile.
///
/// # Safety
/// As [`panel`] checked; `packed` holds `nb` packed blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn from_packed<const Q8: bool, const N: usize>(
    packed: &[__m256i],
    xs: &[&[u8]],
    sums: &ActSums,
    t0: usize,
    r0: usize,
    out: Out,
    ahead: Ahead,
) {
    let nb = sums.nb;
    let x: [*const u8; N] = std::array::from_fn(|t| xs[t0 + t].as_ptr());
    let (d, s) = token_args::<N>(sums, t0);
    let mut acc = [_mm256_setzero_ps(); N];
    for (i, p) in packed.chunks_exact(packed_regs(Q8)).take(nb).enumerate() {
        ahead.block(i, nb);
        let (lo, hi) = split_block::<Q8>(p);
        let dw = _mm256_castsi256_ps(p[packed_regs(Q8) - 1]);
        // SAFETY: xs[t] holds nb blocks (checked by ActSums::new), and so
        // do d[t] and s[t] (token_args).
        unsafe { accumulate::<Q8, N>(lo, hi, dw, &x, i, &d, &s, &mut acc) };
    }
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: `panel` checked that every token's outputs fit; r0 < rows.
        unsafe { out.store8(t0 + k, r0, *a) };
    }
}

/// [`accumulate`] for two groups (16 rows) at once: each broadcast
/// activation dword feeds both groups' `vpmaddubsw`, so a token's
/// broadcasts are shared by 16 rows instead of 8 (the same integer dots and
/// float steps per row, so the same bits).
///
/// A copy of [`accumulate`]'s steps on purpose: one function generic over
/// the group count (tried) compiled the single-group decode path 18-26%
/// slower for Q8_0 (`matmul/q8_0/avx2/decode`), through LLVM's inlining
/// and register choices, not its arithmetic. Change both together.
///
/// # Safety
/// As [`accumulate`].
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate2<const Q8: bool, const N: usize>(
    a: (&[__m256i; 8], &[__m256i; 8], __m256),
    b: (&[__m256i; 8], &[__m256i; 8], __m256),
    x: &[*const u8; N],
    i: usize,
    d: &[*const f32; N],
    s: &[*const i32; N],
    acc: &mut [[__m256; N]; 2],
) {
    let mut a_lo = [[_mm256_setzero_si256(); N]; 2];
    let mut a_hi = [[_mm256_setzero_si256(); N]; 2];
    for k in 0..8 {
        for t in 0..N {
            // SAFETY: the caller guarantees block i of x[t]; this reads 4 of
            // its quant bytes (unaligned).
            let xk = unsafe {
                x[t].add(i * Q8_0_BYTES + 2 + 4 * k)
                    .cast::<i32>()
                    .read_unaligned()
            };
            let xk = _mm256_set1_epi32(xk);
            // Exact: see the module comment for the i16 bound.
            a_lo[0][t] = _mm256_add_epi16(a_lo[0][t], _mm256_maddubs_epi16(a.0[k], xk));
            a_lo[1][t] = _mm256_add_epi16(a_lo[1][t], _mm256_maddubs_epi16(b.0[k], xk));
            if Q8 {
                a_hi[0][t] = _mm256_add_epi16(a_hi[0][t], _mm256_maddubs_epi16(a.1[k], xk));
                a_hi[1][t] = _mm256_add_epi16(a_hi[1][t], _mm256_maddubs_epi16(b.1[k], xk));
            }
        }
    }
    for (g, dw) in [a.2, b.2].into_iter().enumerate() {
        for t in 0..N {
            let mut sum = _mm256_madd_epi16(a_lo[g][t], _mm256_set1_epi16(1));
            if Q8 {
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(a_hi[g][t], _mm256_set1_epi16(16)));
            }
            // SAFETY: the caller guarantees entry i of d[t] and s[t].
            unsafe { add_block::<Q8>(sum, dw, d[t].add(i), s[t].add(i), &mut acc[g][t]) };
        }
    }
}

/// Tokens `t0..t0 + N` against a panel's two packed groups (rows `0..8`
/// from `pa`, the rest from `pb`); `ahead` brings the rows below to L2
/// meanwhile.
///
/// # Safety
/// As [`panel`] checked; `pa` and `pb` hold `nb` packed blocks each, and
/// the panel has more than [`GROUP`] rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn from_packed2<const Q8: bool, const N: usize>(
    pa: &[__m256i],
    pb: &[__m256i],
    xs: &[&[u8]],
    sums: &ActSums,
    t0: usize,
    out: Out,
    ahead: Ahead,
) {
    let nb = sums.nb;
    let regs = packed_regs(Q8);
    let x: [*const u8; N] = std::array::from_fn(|t| xs[t0 + t].as_ptr());
    let (d, s) = token_args::<N>(sums, t0);
    let mut acc = [[_mm256_setzero_ps(); N]; 2];
    for (i, (p, q)) in pa
        .chunks_exact(regs)
        .zip(pb.chunks_exact(regs))
        .take(nb)
        .enumerate()
    {
        ahead.block(i, nb);
        let (lo_a, hi_a) = split_block::<Q8>(p);
        let (lo_b, hi_b) = split_block::<Q8>(q);
        let dw_a = _mm256_castsi256_ps(p[regs - 1]);
        let dw_b = _mm256_castsi256_ps(q[regs - 1]);
        // SAFETY: xs[t] holds nb blocks (checked by ActSums::new), and so
        // do d[t] and s[t] (token_args).
        unsafe {
            accumulate2::<Q8, N>(
                (lo_a, hi_a, dw_a),
                (lo_b, hi_b, dw_b),
                &x,
                i,
                &d,
                &s,
                &mut acc,
            )
        };
    }
    for (g, acc) in acc.iter().enumerate() {
        for (k, a) in acc.iter().enumerate() {
            // SAFETY: `panel` checked that every token's outputs fit; the
            // caller that GROUP < rows.
            unsafe { out.store8(t0 + k, g * GROUP, *a) };
        }
    }
}

thread_local! {
    /// The packed group of the calling thread (Q4_0/Q8_0 here, k-quants in
    /// `avx2k`), reused across calls.
    static PACKED: RefCell<Vec<__m256i>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the calling thread's packing buffer, `len` registers long.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn with_packed<R>(len: usize, f: impl FnOnce(&mut [__m256i]) -> R) -> R {
    PACKED.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, _mm256_setzero_si256());
        }
        f(&mut buf[..len])
    })
}

/// Dispatches a tile of `len` (1..=4) tokens to the const-generic kernel
/// `f::<kind, len>`.
macro_rules! by_len {
    ($len:expr, $f:ident::<$kind:ident>, ($($arg:expr),*)) => {
        match $len {
            1 => $f::<$kind, 1>($($arg),*),
            2 => $f::<$kind, 2>($($arg),*),
            3 => $f::<$kind, 3>($($arg),*),
            _ => $f::<$kind, 4>($($arg),*),
        }
    };
}
pub(super) use by_len;

/// Dots of `rows` (1..=16) consecutive weight rows (`w` starts at the
/// first, `row_bytes` apart, `sums.nb` blocks each) with every activation
/// row, written to `out` (token `t`, row `r` at `t * ld + r`): the same
/// contract and the same bits as [`super::avx512::panel`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
///
/// # Panics
/// If `w`, an activation row or `out` is too short, or `rows` is not in
/// 1..=16.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn panel(
    format: Format,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    xs: &[&[u8]],
    sums: &ActSums,
    out: Out,
) {
    let (n, nb) = (xs.len(), sums.nb);
    check_panel(w, row_bytes, rows, nb * format.block_bytes(), n, out);
    assert_eq!(
        sums.d.len(),
        n * nb,
        "activation sums do not match the rows"
    );
    // SAFETY: features by the caller; lengths asserted above.
    unsafe {
        match format {
            Format::Q4_0 => panel_of::<false>(w, row_bytes, rows, xs, sums, out),
            Format::Q8_0 => panel_of::<true>(w, row_bytes, rows, xs, sums, out),
        }
    }
}

/// [`panel`] for one format: few tokens from blocks transposed on the fly,
/// group by group; more from packed groups, a Q4_0 panel's two groups
/// together ([`from_packed2`]).
///
/// # Safety
/// As [`panel`] checked.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_of<const Q8: bool>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    xs: &[&[u8]],
    sums: &ActSums,
    out: Out,
) {
    let (n, nb) = (xs.len(), sums.nb);
    let regs = packed_regs(Q8) * nb;
    // Q8_0 has twice the registers per block: two groups' accumulators
    // spill, and measured no faster (`matmul/q8_0/avx2/prefill64`).
    if n > DIRECT_MAX && rows > GROUP && !Q8 {
        with_packed(2 * regs, |packed| {
            let (pa, pb) = packed.split_at_mut(regs);
            // SAFETY: as [`panel`] checked; rows > GROUP.
            unsafe {
                pack_group::<Q8>(pa, w, row_bytes, GROUP);
                pack_group::<Q8>(pb, &w[GROUP * row_bytes..], row_bytes, rows - GROUP);
            }
            let (pa, pb) = packed.split_at(regs);
            let next = w.as_ptr().wrapping_add(rows * row_bytes);
            let mut t0 = 0;
            while t0 < n {
                let len = (n - t0).min(TILE);
                let ahead = Ahead::share(next, rows * row_bytes, n, t0);
                // SAFETY: as [`panel`] checked; both halves hold nb blocks,
                // and rows > GROUP.
                unsafe { by_len!(len, from_packed2::<Q8>, (pa, pb, xs, sums, t0, out, ahead)) };
                t0 += len;
            }
        });
        return;
    }
    for r0 in (0..rows).step_by(GROUP) {
        let g = &w[r0 * row_bytes..];
        let g_rows = (rows - r0).min(GROUP);
        if n <= DIRECT_MAX {
            // SAFETY: as [`panel`] checked.
            unsafe {
                by_len!(
                    n,
                    direct::<Q8>,
                    (g, row_bytes, g_rows, xs, sums, 0, r0, out)
                )
            };
            continue;
        }
        with_packed(regs, |packed| {
            // SAFETY: as [`panel`] checked.
            unsafe { pack_group::<Q8>(packed, g, row_bytes, g_rows) };
            let next = g.as_ptr().wrapping_add(GROUP * row_bytes);
            let mut t0 = 0;
            while t0 < n {
                let len = (n - t0).min(TILE);
                let ahead = Ahead::share(next, GROUP * row_bytes, n, t0);
                // SAFETY: as [`panel`] checked; packed holds nb blocks.
                unsafe {
                    by_len!(
                        len,
                        from_packed::<Q8>,
                        (packed, xs, sums, t0, r0, out, ahead)
                    )
                };
                t0 += len;
            }
        });
    }
}

/// Packs the group of `rows` (1..=8) rows at `g` into `packed` (every
/// block of the rows, in the lane layout).
///
/// # Safety
/// AVX2/FMA/F16C must be present; the rows hold `packed.len() /
/// packed_regs(Q8)` blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_group<const Q8: bool>(
    packed: &mut [__m256i],
    g: &[u8],
    row_bytes: usize,
    rows: usize,
) {
    let bytes = if Q8 { Format::Q8_0 } else { Format::Q4_0 }.block_bytes();
    let rp = group_rows(g, row_bytes, rows.min(GROUP));
    for (i, p) in packed.chunks_exact_mut(packed_regs(Q8)).enumerate() {
        if i % (64 / bytes) == 0 {
            for r in rp {
                // Four blocks ahead in each row (a hint).
                _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add((i + 4) * bytes).cast());
            }
        }
        // SAFETY: by the caller, block i of every row is readable.
        unsafe { load_block::<Q8>(&rp, i, p) };
    }
}

/// The share of the next rows a token tile brings to L2 while it
/// computes, a few lines per block: issued all at once, the hints of a
/// whole share queue behind each other and stall the tile.
#[derive(Clone, Copy)]
pub(super) struct Ahead {
    at: *const u8,
    lines: usize,
}

impl Ahead {
    /// The tile at `t0` of `n` tokens: its share of the `len` bytes at
    /// `next` (the rows below, usually this thread's next).
    pub(super) fn share(next: *const u8, len: usize, n: usize, t0: usize) -> Ahead {
        let per_tile = len.div_ceil(n.div_ceil(TILE)).div_ceil(64) * 64;
        let start = (t0 / TILE * per_tile).min(len);
        let end = (start + per_tile).min(len);
        Ahead {
            at: next.wrapping_add(start),
            lines: (end - start) / 64,
        }
    }

    /// Before block `i` of `nb`: this block's lines of the share. A hint:
    /// an address past the mapping is harmless.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn block(self, i: usize, nb: usize) {
        for line in i * self.lines / nb..(i + 1) * self.lines / nb {
            _mm_prefetch::<_MM_HINT_T1>(self.at.wrapping_add(line * 64).cast());
        }
    }
}

/// Q8_0 activation blocks of `x` (a multiple of 32 values) into `out`,
/// byte-identical to `scalar::quantize_acts` (ggml's reference quantizer),
/// as `super::avx512::quantize_q8_0` is: the scale from the largest
/// magnitude (NaN ignored), `roundf` (half away from zero), and C's
/// truncating `(int8_t)` cast, which keeps the low byte of the i32.
///
/// # Safety
/// The CPU must support AVX2.
///
/// # Panics
/// If `out` is not 34 bytes per 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    assert!(
        x.len().is_multiple_of(32) && out.len() == x.len() / 32 * Q8_0_BYTES,
        "q8_0: bad row sizes"
    );
    let abs = |v: __m256| _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX)));
    // The low byte of each dword, gathered into the low 4 bytes of each
    // 128-bit lane.
    let low_bytes = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, //
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
    );
    for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        // SAFETY: xb holds 32 f32 values (4 loads of 8).
        let v: [__m256; 4] =
            std::array::from_fn(|k| unsafe { _mm256_loadu_ps(xb.as_ptr().add(8 * k)) });
        // max(|v|, m) keeps m when |v| is NaN, as the scalar fold does.
        let mut m = _mm256_setzero_ps();
        for vk in v {
            m = _mm256_max_ps(abs(vk), m);
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        ob[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        let mut q = [0u32; 8];
        for (k, vk) in v.into_iter().enumerate() {
            let y = _mm256_mul_ps(vk, _mm256_set1_ps(id));
            // roundf: truncate, then one step away from zero when the
            // (exact) fraction is at least a half.
            let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(abs(_mm256_sub_ps(y, t)), _mm256_set1_ps(0.5));
            let one = _mm256_or_ps(
                _mm256_and_ps(y, _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN))),
                _mm256_set1_ps(1.0),
            );
            let r = _mm256_add_ps(t, _mm256_and_ps(up, one));
            // Truncating conversion: NaN / out of range give i32::MIN, whose
            // low byte is what C's (int8_t) keeps.
            let b = _mm256_shuffle_epi8(_mm256_cvttps_epi32(r), low_bytes);
            q[2 * k] = _mm256_extract_epi32::<0>(b) as u32;
            q[2 * k + 1] = _mm256_extract_epi32::<4>(b) as u32;
        }
        for (o, w) in ob[2..].chunks_exact_mut(4).zip(q) {
            o.copy_from_slice(&w.to_le_bytes());
        }
    }
}

/// Q8_K activation blocks of `x` (a multiple of 256 values) into `out`,
/// byte-identical to `scalar::quantize_acts` (ggml's reference), as
/// `super::avx512::quantize_q8k` is: the scale from the first value of the
/// largest magnitude (NaN ignored), ggml's `nearest_int` (the low mantissa
/// bits of `v + 1.5 * 2^23`), the truncating `as i8` cast, and the i16 sums
/// of each 16 quants.
///
/// # Safety
/// The CPU must support AVX2.
///
/// # Panics
/// If `out` is not 292 bytes per 256 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8k(x: &[f32], out: &mut [u8]) {
    const Q8K: usize = 292;
    assert!(
        x.len().is_multiple_of(256) && out.len() == x.len() / 256 * Q8K,
        "q8_k: bad row sizes"
    );
    let abs = |v: __m256| _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX)));
    for (xb, ob) in x.chunks_exact(256).zip(out.chunks_exact_mut(Q8K)) {
        // max(|v|, m) keeps m when |v| is NaN, as the scalar scan does.
        let mut m = _mm256_setzero_ps();
        for c in xb.chunks_exact(8) {
            // SAFETY: c holds 8 f32 values.
            m = _mm256_max_ps(abs(unsafe { _mm256_loadu_ps(c.as_ptr()) }), m);
        }
        let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        let amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        ob.fill(0);
        if amax == 0.0 {
            continue;
        }
        // The first element of that magnitude, as the scalar scan keeps.
        let max = xb.iter().copied().find(|f| f.abs() == amax).unwrap_or(amax);
        let iscale = -127.0 / max;
        for (k, c) in xb.chunks_exact(16).enumerate() {
            let q = |at: usize| {
                // SAFETY: c holds 16 f32 values; `at` is 0 or 8.
                let v = unsafe { _mm256_loadu_ps(c.as_ptr().add(at)) };
                let f = _mm256_add_ps(
                    _mm256_mul_ps(_mm256_set1_ps(iscale), v),
                    _mm256_set1_ps(12_582_912.0),
                );
                let i = _mm256_sub_epi32(
                    _mm256_and_si256(_mm256_castps_si256(f), _mm256_set1_epi32(0x007f_ffff)),
                    _mm256_set1_epi32(0x0040_0000),
                );
                // The low byte, sign-extended: what `as i8` keeps.
                let i = _mm256_min_epi32(i, _mm256_set1_epi32(127));
                _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(i))
            };
            let (a, b) = (q(0), q(8));
            let s = _mm256_add_epi32(a, b);
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            let sum = _mm_cvtsi128_si32(s) as i16;
            ob[260 + 2 * k..262 + 2 * k].copy_from_slice(&sum.to_le_bytes());
            // Bytes in order: words a0..3 b0..3 | a4..7 b4..7, lanes put
            // back in order, then bytes (every value is in -128..=127).
            let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
            let bytes =
                _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
            // SAFETY: ob[4 + 16k..4 + 16k + 16] is in the block.
            unsafe { _mm_storeu_si128(ob.as_mut_ptr().add(4 + 16 * k).cast(), bytes) };
        }
        ob[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

/// 8 weights from `p` (element `i` onward) as f32.
///
/// # Safety
/// AVX2/F16C must be present and the 8 elements readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8(kind: FloatRow, p: *const u8, i: usize) -> __m256 {
    // SAFETY: by the caller; unaligned loads.
    unsafe {
        match kind {
            FloatRow::F32 => _mm256_loadu_ps(p.cast::<f32>().add(i)),
            FloatRow::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i).cast())),
            FloatRow::BF16 => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i).cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
        }
    }
}

/// Float weight rows (f32, f16 or bf16: the MoE routers, float models)
/// dotted with f32 activation rows: four 8-lane fused multiply-add chains
/// over 32-element steps, a fixed sum of the chains and lanes, then the
/// tail in order. The same steps for every (row, token), so results do not
/// depend on the batch; they differ from the scalar reference's sequential
/// sum by rounding.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
///
/// # Panics
/// If a row holds fewer than `n` values or `out` is shorter than
/// `ws.len() * xs.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_float(
    kind: FloatRow,
    ws: &[&[u8]],
    xs: &[&[u8]],
    n: usize,
    out: &mut [f32],
) {
    let wbytes = if kind == FloatRow::F32 { 4 } else { 2 };
    assert!(out.len() >= ws.len() * xs.len(), "output too short");
    for (ri, w) in ws.iter().enumerate() {
        for (t, x) in xs.iter().enumerate() {
            assert!(
                w.len() >= wbytes * n && x.len() >= 4 * n,
                "float row too short"
            );
            let xp = x.as_ptr().cast::<f32>();
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            // SAFETY (loads): i + 8 <= n, and both rows hold n values
            // (asserted above); unaligned loads.
            while i + 32 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    let (wv, xv) = unsafe {
                        (
                            load8(kind, w.as_ptr(), i + 8 * k),
                            _mm256_loadu_ps(xp.add(i + 8 * k)),
                        )
                    };
                    *a = _mm256_fmadd_ps(wv, xv, *a);
                }
                i += 32;
            }
            while i + 8 <= n {
                let (wv, xv) = unsafe { (load8(kind, w.as_ptr(), i), _mm256_loadu_ps(xp.add(i))) };
                acc[0] = _mm256_fmadd_ps(wv, xv, acc[0]);
                i += 8;
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut s = super::simd::hsum_ps(sum);
            while i < n {
                let xi = f32::from_le_bytes([x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]]);
                s += load1(kind, w, i) * xi;
                i += 1;
            }
            out[ri * xs.len() + t] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar;
    use crate::types::WeightType;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u8 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) as u8
        }
    }

    /// Random blocks, or extreme ones: largest, smallest and zero scales,
    /// quant bytes from {-128 (weights only), -127, 127, 0, -1}.
    fn blocks(rng: &mut Lcg, n: usize, size: usize, extreme: bool, act: bool) -> Vec<u8> {
        let mut v = Vec::with_capacity(n * size);
        for _ in 0..n {
            let d = if extreme {
                half::f16::from_f32([65504.0, -65504.0, 6.1e-5, 0.0][rng.next() as usize % 4])
            } else {
                half::f16::from_f32(0.001 + f32::from(rng.next()) * 1e-4)
            };
            v.extend_from_slice(&d.to_le_bytes());
            for _ in 2..size {
                let b = rng.next();
                let b = if extreme {
                    [0x80, 0x81, 0x7f, 0x00, 0xff][b as usize % 5]
                } else {
                    b
                };
                // -128 never occurs in Q8_0 activations.
                v.push(if act && b == 0x80 { 0x81 } else { b });
            }
        }
        v
    }

    #[test]
    fn float_dots_agree_with_a_wide_sum() {
        if !crate::isa::Isa::Avx2.available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut rng = Lcg(9);
        for n in [0, 1, 7, 8, 31, 32, 33, 100, 2048] {
            let mut val = || (f32::from(rng.next()) - 127.5) / 32.0;
            let w: Vec<f32> = (0..n).map(|_| val()).collect();
            let x: Vec<f32> = (0..n).map(|_| val()).collect();
            let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
            let rows = [
                (
                    FloatRow::F32,
                    w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
                ),
                (
                    FloatRow::F16,
                    w.iter()
                        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                        .collect(),
                ),
                (
                    FloatRow::BF16,
                    w.iter()
                        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                        .collect(),
                ),
            ];
            for (kind, wb) in rows {
                let want: f64 = (0..n)
                    .map(|i| f64::from(load1(kind, &wb, i)) * f64::from(x[i]))
                    .sum();
                // Two weight rows (the second reversed) by two tokens.
                let wr: Vec<u8> = wb
                    .chunks_exact(if kind == FloatRow::F32 { 4 } else { 2 })
                    .rev()
                    .flatten()
                    .copied()
                    .collect();
                let mut out = [f32::NAN; 4];
                // SAFETY: AVX2 checked above; rows hold n values.
                unsafe { dot_float(kind, &[&wb, &wr], &[&xb, &xb], n, &mut out) };
                let tol = 1e-4 * (n as f64).max(1.0);
                assert!(
                    (f64::from(out[0]) - want).abs() <= tol,
                    "n={n}: {} vs {want}",
                    out[0]
                );
                assert_eq!(out[0].to_bits(), out[1].to_bits(), "same row, same token");
                let want_r: f64 = (0..n)
                    .map(|i| f64::from(load1(kind, &wr, i)) * f64::from(x[i]))
                    .sum();
                assert!((f64::from(out[2]) - want_r).abs() <= tol, "n={n} reversed");
            }
        }
    }

    #[test]
    fn q8_0_quantizer_writes_the_scalar_bytes() {
        if !crate::isa::Isa::Avx2.available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut rng = Lcg(5);
        let blocks = 400;
        let mut x: Vec<f32> = (0..32 * blocks)
            .map(|i| {
                // Magnitudes from 1e-30 to 1e30, a different one per block.
                let scale = 10f32.powi((i / 32) as i32 % 61 - 30);
                (f32::from(rng.next()) - 127.5) / 64.0 * scale
            })
            .collect();
        // Exact ties once scaled (amax 127 gives id 1), NaN, infinities,
        // subnormals, signed zeros, all-zero and all-NaN blocks.
        for (j, v) in x[..32].iter_mut().enumerate() {
            *v = j as f32 - 15.5;
        }
        x[31] = 127.0;
        x[40] = f32::NAN;
        x[70] = f32::INFINITY;
        x[100] = f32::NEG_INFINITY;
        x[130] = 1e-40;
        x[131] = -0.0;
        x[160..192].fill(0.0);
        x[192..224].fill(f32::NAN);
        x[224..256].fill(-1e-45);
        let mut want = vec![0u8; blocks * Q8_0_BYTES];
        scalar::quantize_acts(crate::types::ActType::Q8_0, &x, &mut want);
        let mut got = vec![0u8; want.len()];
        // SAFETY: AVX2 checked above.
        unsafe { quantize_q8_0(&x, &mut got) };
        for (b, (g, w)) in got
            .chunks_exact(Q8_0_BYTES)
            .zip(want.chunks_exact(Q8_0_BYTES))
            .enumerate()
        {
            assert_eq!(g, w, "block {b}: {:?}", &x[32 * b..32 * b + 32]);
        }
    }

    #[test]
    fn q8k_quantizer_writes_the_scalar_bytes() {
        if !crate::isa::Isa::Avx2.available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut rng = Lcg(7);
        let blocks = 70;
        let mut x: Vec<f32> = (0..256 * blocks)
            .map(|i| {
                // Magnitudes from 1e-30 to 1e30, a different one per block.
                let scale = 10f32.powi((i / 256) as i32 % 61 - 30);
                (f32::from(rng.next()) - 127.5) / 64.0 * scale
            })
            .collect();
        // Ties for the largest magnitude (the first one's sign wins), exact
        // halves once scaled, NaN, infinities, a subnormal largest value
        // (the scale overflows), signed zeros, all-zero and all-NaN blocks.
        let b = |k: usize| 256 * k..256 * (k + 1);
        x[b(0)]
            .iter_mut()
            .enumerate()
            .for_each(|(j, v)| *v = j as f32 - 127.5);
        x[b(0)][3] = -254.0;
        x[b(0)][9] = 254.0;
        x[b(1)][5] = f32::NAN;
        x[b(2)][7] = f32::INFINITY;
        x[b(3)][11] = f32::NEG_INFINITY;
        x[b(4)].fill(-0.0);
        x[b(4)][200] = 1e-45;
        x[b(4)][201] = -7e-46;
        x[b(5)].fill(0.0);
        x[b(6)].fill(f32::NAN);
        x[b(7)][0] = -0.0;
        // A scale of exactly 1: every value a half, ties to even.
        x[b(8)]
            .iter_mut()
            .enumerate()
            .for_each(|(j, v)| *v = j as f32 / 2.0 - 64.0);
        x[b(8)][1] = -127.0;
        let mut want = vec![0u8; blocks * 292];
        scalar::quantize_acts(crate::types::ActType::Q8K, &x, &mut want);
        let mut got = vec![0u8; want.len()];
        // SAFETY: AVX2 checked above.
        unsafe { quantize_q8k(&x, &mut got) };
        for (k, (g, w)) in got
            .chunks_exact(292)
            .zip(want.chunks_exact(292))
            .enumerate()
        {
            assert_eq!(g, w, "block {k}");
        }
    }

    #[test]
    fn groups_are_bit_identical_to_the_scalar_reference() {
        if !crate::isa::Isa::Avx2.available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut rng = Lcg(11);
        for (format, ty) in [
            (Format::Q4_0, WeightType::Q4_0),
            (Format::Q8_0, WeightType::Q8_0),
        ] {
            // Every direct tile (1..=4 tokens), packed tiles with every
            // remainder, partial and whole groups, one and two groups.
            for &(rows, nb, n) in &[
                (16, 1, 1),
                (5, 9, 1),
                (16, 65, 1),
                (3, 7, 2),
                (8, 2, 3),
                (16, 65, 4),
                (9, 3, 5),
                (16, 8, 8),
                (1, 4, 6),
                (13, 5, 21),
                (15, 2, 7),
            ] {
                for extreme in [false, true] {
                    let bytes = format.block_bytes();
                    // A row stride larger than the blocks, as a sub-matrix view has.
                    let stride = nb * bytes + if rows % 2 == 1 { bytes } else { 0 };
                    let w = blocks(&mut rng, rows * stride / bytes, bytes, extreme, false);
                    let xs: Vec<Vec<u8>> = (0..n)
                        .map(|_| blocks(&mut rng, nb, Q8_0_BYTES, extreme, true))
                        .collect();
                    let refs: Vec<&[u8]> = xs.iter().map(Vec::as_slice).collect();
                    let sums = ActSums::new(format, &refs, nb);
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
                            &sums,
                            Out::new(&mut out, ld, rows),
                        )
                    };
                    for t in 0..n {
                        // Nothing past the panel's rows is written.
                        assert!(out[t * ld + rows..(t + 1) * ld].iter().all(|v| v.is_nan()));
                    }
                    for r in 0..rows {
                        let row = &w[r * stride..r * stride + nb * bytes];
                        for t in 0..n {
                            let want = scalar::vec_dot(ty, row, &xs[t], nb * 32);
                            let got = out[t * ld + r];
                            assert!(
                                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                                "{format:?} rows={rows} nb={nb} n={n} extreme={extreme} r={r} t={t}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
