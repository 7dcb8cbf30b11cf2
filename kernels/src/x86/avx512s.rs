//! AVX-512 products (VNNI, VBMI, GFNI) of Q4_0 weight rows with one to
//! four Q8_0 activation rows that stream each weight row from the mapping
//! once, in address order: *blocks in lanes*.
//!
//! The panels of `avx512.rs` put one weight row in each lane, which makes
//! every block a gather across 16 rows: cheap once a gathered block serves
//! many tokens, the bottleneck for one. Here a row's blocks are taken 16 at
//! a time (a *chunk*, 288 contiguous bytes): six overlapping loads, one
//! byte permute per four blocks puts each block's 16 packed bytes in its
//! own 128-bit lane, a 4x4 dword transpose inside each 128-bit lane puts
//! dword `j` of all 16 blocks into register `j` (one block per 32-bit
//! lane), an `and` and a GF(2) affine map split the nibbles, and
//! `vpdpbusd` multiplies them by the activation quants arranged the same
//! way ([`StreamActs`], built once per product): the eight dot products of
//! a token add each block's 32 products up in its own lane, with no
//! reduction per token. The scales come out of the same loads by two word
//! permutes. So each row is read once, front to back, with no gather and
//! no horizontal sum per row: per 16 blocks about 35 zmm operations for
//! the weights and 13 per token, where the AVX2 groups need about 146 ymm
//! ones (measured, Zen 4, 2 threads: 47-53 GB/s from cache against the
//! AVX2 groups' 39-42, 26-29 GB/s from DRAM against 23-24). (A reduction
//! tree per token, as this kernel first had, cost 3-7% more time for 2-8
//! tokens, one thread; taking two rows at a time to share the activation
//! loads gained nothing.)
//!
//! Numerics: the block's integer dot is exact and its float steps are the
//! scalar reference's, `(sum * d_w) * d_x`, computed per lane. The sum over
//! blocks must run in block order from block 0 (`acc += block`), so the
//! block values of the panel's 16 rows are transposed (rows into lanes)
//! and added one block at a time. Every output is bit-identical to
//! `scalar::vec_dot`, as the AVX2 groups and the AVX-512 panels are, so the
//! engine may pick any of them by token count.
//!
//! The same chunk permutes pack Q4_0 panels for the AVX-512 panel kernels
//! (`pack_q4_0`): 16 rows of blocks-in-lanes registers transposed into
//! rows in lanes replace the panels' gathers.

use std::arch::x86_64::*;

use super::avx512::{Format, Out, PANEL, check_panel, with_panel_buffer};

/// Blocks per chunk: one per 32-bit lane of a zmm register.
const CHUNK: usize = 16;
/// Tokens per pass over the rows: each pass keeps its tokens' block values
/// of every chunk in the thread's panel buffer.
pub const TILE: usize = 4;
const Q4_0_BYTES: usize = 18;
const Q8_0_BYTES: usize = 34;
/// Bytes of a full chunk of Q4_0 blocks.
const CHUNK_BYTES: usize = CHUNK * Q4_0_BYTES;
/// The bit matrix of `vgf2p8affineqb` that maps a byte to its high nibble:
/// row `7 - i` (byte `7 - i` of the qword) selects the input bit that
/// becomes output bit `i`: bits 4..8 for `i` < 4, none above.
pub(super) const HIGH_NIBBLE: i64 = 0x1020_4080_0000_0000;
/// How far ahead of the chunk at hand its row's stream is brought to L2:
/// the rows of a panel (and the panels of a thread) lie one after the
/// other, so this runs ahead through page boundaries, where the hardware
/// prefetcher stops. Measured (`matmul/q4_0/avx512s/decode-dram`, Zen 4,
/// 2 threads): 21-22 GB/s without, 24 at 4 KiB, 26-29 at 6-8 KiB, 24-27 at
/// 12-16 KiB; hints to L1 at 0.5-1 KiB did not help.
const AHEAD: usize = 8192;
/// Registers per (token, chunk) in [`StreamActs`]: four quant dwords of the
/// low and of the high half of every block, the offset sums, the scales.
const PER_CHUNK: usize = 10;

/// The lane of a chunk's sums that holds block `b` (and the block lane `p`
/// holds: the map is its own inverse). The in-lane transpose of the four
/// group registers leaves block `4g + l` in lane `4l + g`.
const fn lane_of(b: usize) -> usize {
    4 * (b % 4) + b / 4
}

/// 16 lanes of 32 bits, aligned for one zmm load.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Lanes(pub(super) [i32; 16]);

/// The activation rows of a product as the stream kernel reads them: for
/// each token and chunk, quant dword `j` of every block in register `j`
/// (quants `4j..4j + 4`) and `4 + j` (quants `16 + 4j..`), block `b` in
/// lane `lane_of(b)` as in the unpacked weights, then the blocks'
/// negated offset sums (`-8 * sum(x)`, where each dot starts) and scales
/// in the same lanes. Built once per product; lanes past a row's last
/// block hold zeros.
pub struct StreamActs {
    nb: usize,
    chunks: usize,
    n: usize,
    lanes: Vec<Lanes>,
}

impl StreamActs {
    /// The lanes of `xs` (Q8_0 rows of at least `nb` blocks) against Q4_0
    /// weights.
    ///
    /// # Panics
    /// If an activation row is shorter than `nb` blocks.
    pub fn new(xs: &[&[u8]], nb: usize) -> StreamActs {
        let chunks = nb.div_ceil(CHUNK);
        let mut lanes = vec![Lanes([0; 16]); xs.len() * chunks * PER_CHUNK];
        let off = Format::Q4_0.offset();
        for (t, x) in xs.iter().enumerate() {
            assert!(x.len() >= nb * Q8_0_BYTES, "activation row too short");
            for (b, blk) in x[..nb * Q8_0_BYTES].chunks_exact(Q8_0_BYTES).enumerate() {
                let (c, k) = (b / CHUNK, b % CHUNK);
                let base = (t * chunks + c) * PER_CHUNK;
                let dword = |at: usize| {
                    i32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]])
                };
                for j in 0..4 {
                    lanes[base + j].0[lane_of(k)] = dword(2 + 4 * j);
                    lanes[base + 4 + j].0[lane_of(k)] = dword(18 + 4 * j);
                }
                let sum: i32 = blk[2..].iter().map(|&q| i32::from(q as i8)).sum();
                lanes[base + 8].0[lane_of(k)] = -(off * sum);
                let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                lanes[base + 9].0[lane_of(k)] = d.to_bits() as i32;
            }
        }
        StreamActs {
            nb,
            chunks,
            n: xs.len(),
            lanes,
        }
    }

    /// The registers of token `t`, chunk `c`.
    fn of(&self, t: usize, c: usize) -> &[Lanes; PER_CHUNK] {
        let at = (t * self.chunks + c) * PER_CHUNK;
        self.lanes[at..at + PER_CHUNK]
            .try_into()
            .expect("PER_CHUNK registers per token and chunk")
    }
}

/// A zmm register from aligned lanes.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn reg(l: &Lanes) -> __m512i {
    // SAFETY: `Lanes` is 64 bytes, aligned to 64.
    unsafe { _mm512_load_si512(l.0.as_ptr().cast()) }
}

/// Where a chunk's loads start: six 64-byte windows (the last may be
/// partly past the chunk), chosen so that each group of four blocks (72
/// bytes from `72 g`) lies in two of them and all 16 scales in two pairs.
const LOADS: [usize; 6] = [0, 64, 128, 144, 208, 256];
/// The loads (indices into [`LOADS`]) each group's permute reads.
const GROUP_LOADS: [[usize; 2]; 4] = [[0, 1], [1, 2], [3, 4], [4, 5]];

/// Index of chunk byte `at` in the 128-byte table of loads `pair`.
const fn table_index(pair: [usize; 2], at: usize) -> usize {
    let (a, b) = (LOADS[pair[0]], LOADS[pair[1]]);
    if at >= a && at < a + 64 {
        at - a
    } else {
        assert!(at >= b && at < b + 64, "chunk byte outside the loads");
        64 + at - b
    }
}

/// Byte indices of the permutes that move group `g`'s four blocks so that
/// 128-bit lane `l` holds block `4g + l`'s 16 packed quant bytes: fixed by
/// the layout, so worked out at compile time.
const GROUP_INDEX: [[u8; 64]; 4] = {
    let mut idx = [[0u8; 64]; 4];
    let mut g = 0;
    while g < 4 {
        let mut j = 0;
        while j < 64 {
            let (l, i) = (j / 16, j % 16);
            let at = 72 * g + Q4_0_BYTES * l + 2 + i;
            idx[g][j] = table_index(GROUP_LOADS[g], at) as u8;
            j += 1;
        }
        g += 1;
    }
    idx
};

/// Word indices of the two permutes that gather a chunk's 16 scales, in
/// lane order, from loads 0-1 (blocks 0..8) and 3-4 (blocks 8..16), and the
/// lanes the second serves: block `b`'s scale is the word at chunk byte
/// `18 b`.
const SCALE_INDEX: ([[u16; 32]; 2], u32) = {
    let mut idx = [[0u16; 32]; 2];
    let mut high = 0u32;
    let mut p = 0;
    while p < CHUNK {
        let b = lane_of(p);
        let (k, pair) = if b < 8 { (0, [0, 1]) } else { (1, [3, 4]) };
        idx[k][p] = (table_index(pair, Q4_0_BYTES * b) / 2) as u16;
        if k == 1 {
            high |= 1 << p;
        }
        p += 1;
    }
    (idx, high)
};

/// A 64-byte index table as a register.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn index_reg<T>(table: &[T]) -> __m512i {
    assert_eq!(
        std::mem::size_of_val(table),
        64,
        "an index table is 64 bytes"
    );
    // SAFETY: the table is 64 readable bytes (asserted).
    unsafe { _mm512_loadu_si512(table.as_ptr().cast()) }
}

/// The permutes of a chunk, built once per panel call.
#[derive(Clone, Copy)]
struct Perms {
    group: [__m512i; 4],
    scale: [__m512i; 2],
    scale_high: __mmask32,
}

impl Perms {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn new() -> Perms {
        Perms {
            group: [
                index_reg(&GROUP_INDEX[0]),
                index_reg(&GROUP_INDEX[1]),
                index_reg(&GROUP_INDEX[2]),
                index_reg(&GROUP_INDEX[3]),
            ],
            scale: [index_reg(&SCALE_INDEX.0[0]), index_reg(&SCALE_INDEX.0[1])],
            scale_high: SCALE_INDEX.1,
        }
    }

    /// The chunk's 16 scales as f32, lane `p` block [`lane_of`]`(p)`'s,
    /// from its loads 0, 1, 3 and 4 ([`LOADS`]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn scales(&self, l0: __m512i, l1: __m512i, l3: __m512i, l4: __m512i) -> __m512 {
        let lo = _mm512_permutex2var_epi16(l0, self.scale[0], l1);
        let hi = _mm512_permutex2var_epi16(l3, self.scale[1], l4);
        let d = _mm512_mask_blend_epi16(self.scale_high, lo, hi);
        _mm512_cvtph_ps(_mm512_castsi512_si256(d))
    }
}

/// The 64 bytes from `from` of the chunk at `p`, of which `valid` bytes are
/// readable: bytes past them load as zero and are not read.
///
/// # Safety
/// AVX-512 F/BW must be present and `valid` bytes at `p` readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn load(p: *const u8, valid: usize, from: usize) -> __m512i {
    // SAFETY: by the caller; the masked load reads only the bytes below
    // `valid`.
    unsafe {
        if valid >= from + 64 {
            _mm512_loadu_si512(p.add(from).cast())
        } else {
            let n = valid.saturating_sub(from);
            let mask = if n == 0 { 0 } else { u64::MAX >> (64 - n) };
            _mm512_maskz_loadu_epi8(mask, p.wrapping_add(from).cast())
        }
    }
}

/// One row's chunk of weights, unpacked: `lo[j]` / `hi[j]` the low and
/// high nibbles of quant dword `j` of each block (block [`lane_of`]`(p)` in
/// lane `p`), `dw` the blocks' scales in the same lanes.
#[derive(Clone, Copy)]
struct ChunkWeights {
    lo: [__m512i; 4],
    hi: [__m512i; 4],
    dw: __m512,
}

/// Unpacks the chunk at `p` (`valid` bytes of it, at most a chunk's).
/// (Loops, no closures: a closure may be compiled out of line, a call per
/// chunk.)
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI/VBMI and GFNI must be present; the `valid` bytes
/// at `p` must be readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")]
unsafe fn chunk_weights(p: *const u8, valid: usize, perms: &Perms) -> ChunkWeights {
    // SAFETY: by the caller; a full chunk's last 32 bytes are one load.
    let l = unsafe {
        if valid == CHUNK_BYTES {
            [
                _mm512_loadu_si512(p.cast()),
                _mm512_loadu_si512(p.add(LOADS[1]).cast()),
                _mm512_loadu_si512(p.add(LOADS[2]).cast()),
                _mm512_loadu_si512(p.add(LOADS[3]).cast()),
                _mm512_loadu_si512(p.add(LOADS[4]).cast()),
                _mm512_castsi256_si512(_mm256_loadu_si256(p.add(LOADS[5]).cast())),
            ]
        } else {
            [
                load(p, valid, LOADS[0]),
                load(p, valid, LOADS[1]),
                load(p, valid, LOADS[2]),
                load(p, valid, LOADS[3]),
                load(p, valid, LOADS[4]),
                load(p, valid, LOADS[5]),
            ]
        }
    };
    let m = _mm512_set1_epi8(0x0f);
    let mut q = [_mm512_setzero_si512(); 4];
    for g in 0..4 {
        let [a, b] = GROUP_LOADS[g];
        q[g] = _mm512_permutex2var_epi8(l[a], perms.group[g], l[b]);
    }
    // Dword j of every block into register j, block 4g + l at lane
    // lane_of(4g + l) = 4l + g: a block's eight dwords then meet in one
    // lane, summed by the dot products themselves, once per chunk instead
    // of a reduction per token.
    let q = dwords_by_block(q);
    let mut lo = [_mm512_setzero_si512(); 4];
    let mut hi = [_mm512_setzero_si512(); 4];
    for j in 0..4 {
        lo[j] = _mm512_and_si512(q[j], m);
        // Each byte's high nibble into its low bits (an affine map over
        // GF(2): output bit i is input bit i + 4), one operation.
        hi[j] = _mm512_gf2p8affine_epi64_epi8::<0>(q[j], _mm512_set1_epi64(HIGH_NIBBLE));
    }
    let dw = perms.scales(l[0], l[1], l[3], l[4]);
    ChunkWeights { lo, hi, dw }
}

/// The values of one row's unpacked chunk `w` for one token's registers
/// `x` of that chunk: lane `p` holds `(sum * d_w) * d_x` of block
/// [`lane_of`]`(p)`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn chunk_values(w: &ChunkWeights, x: &[Lanes; PER_CHUNK]) -> __m512 {
    // Exact integer sums from minus offset * sum(x), in two chains.
    let mut a = reg(&x[8]);
    let mut b = _mm512_setzero_si512();
    for j in 0..4 {
        a = _mm512_dpbusd_epi32(a, w.lo[j], reg(&x[j]));
        b = _mm512_dpbusd_epi32(b, w.hi[j], reg(&x[4 + j]));
    }
    let sum = _mm512_add_epi32(a, b);
    let dx = _mm512_castsi512_ps(reg(&x[9]));
    // scalar: sum as f32 * d_w * d_x
    _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), w.dw), dx)
}

/// A 4x4 dword transpose inside each 128-bit lane: `q[g]` holds dwords
/// 0..4 of block `4g + l` in 128-bit lane `l`; output `j` holds dword `j`
/// of block `4g + l` in lane `4l + g` ([`lane_of`]).
#[inline]
#[target_feature(enable = "avx512f")]
fn dwords_by_block(q: [__m512i; 4]) -> [__m512i; 4] {
    let t0 = _mm512_unpacklo_epi32(q[0], q[1]);
    let t1 = _mm512_unpackhi_epi32(q[0], q[1]);
    let t2 = _mm512_unpacklo_epi32(q[2], q[3]);
    let t3 = _mm512_unpackhi_epi32(q[2], q[3]);
    [
        _mm512_unpacklo_epi64(t0, t2),
        _mm512_unpackhi_epi64(t0, t2),
        _mm512_unpacklo_epi64(t1, t3),
        _mm512_unpackhi_epi64(t1, t3),
    ]
}

/// The 16x16 transpose of `v` (row `r`'s values in `v[r]`): lane `r` of
/// output `p` is lane `p` of `v[r]`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn transpose16(v: &[__m512; 16]) -> [__m512; 16] {
    // Rows 4j..4j + 4, column 4q + k of each, in 128-bit lane q of c[j][k].
    let mut c = [[_mm512_setzero_ps(); 4]; 4];
    for (j, cj) in c.iter_mut().enumerate() {
        let r = 4 * j;
        let a0 = _mm512_unpacklo_ps(v[r], v[r + 1]);
        let b0 = _mm512_unpackhi_ps(v[r], v[r + 1]);
        let a1 = _mm512_unpacklo_ps(v[r + 2], v[r + 3]);
        let b1 = _mm512_unpackhi_ps(v[r + 2], v[r + 3]);
        cj[0] = _mm512_shuffle_ps::<0x44>(a0, a1);
        cj[1] = _mm512_shuffle_ps::<0xee>(a0, a1);
        cj[2] = _mm512_shuffle_ps::<0x44>(b0, b1);
        cj[3] = _mm512_shuffle_ps::<0xee>(b0, b1);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for k in 0..4 {
        // A 4x4 transpose of 128-bit lanes: lane j of output 4q + k is
        // lane q of c[j][k].
        let e0 = _mm512_shuffle_f32x4::<0x44>(c[0][k], c[1][k]);
        let e1 = _mm512_shuffle_f32x4::<0xee>(c[0][k], c[1][k]);
        let e2 = _mm512_shuffle_f32x4::<0x44>(c[2][k], c[3][k]);
        let e3 = _mm512_shuffle_f32x4::<0xee>(c[2][k], c[3][k]);
        out[k] = _mm512_shuffle_f32x4::<0x88>(e0, e2);
        out[4 + k] = _mm512_shuffle_f32x4::<0xdd>(e0, e2);
        out[8 + k] = _mm512_shuffle_f32x4::<0x88>(e1, e3);
        out[12 + k] = _mm512_shuffle_f32x4::<0xdd>(e1, e3);
    }
    out
}

/// Dots of `rows` (1..=16) consecutive Q4_0 weight rows (`w` starts at the
/// first, `row_bytes` apart, `acts.nb` blocks each) with every activation
/// row, written to `out` (token `t`, row `r` at `t * ld + r`): the contract
/// and the bits of [`super::avx512::panel`], for any token count (fastest
/// for one to a few).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL, VNNI and VBMI, and GFNI.
///
/// # Panics
/// If `format` is not Q4_0, `w` or `out` is too short, `acts` was built for
/// another token count, or `rows` is not in 1..=16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")]
pub unsafe fn panel(
    format: Format,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    acts: &StreamActs,
    out: Out,
) {
    assert_eq!(format, Format::Q4_0, "the stream kernel reads Q4_0 rows");
    let (n, nb) = (acts.n, acts.nb);
    check_panel(w, row_bytes, rows, nb * Q4_0_BYTES, n, out);
    let perms = Perms::new();
    let mut t0 = 0;
    while t0 < n {
        let len = (n - t0).min(TILE);
        // SAFETY: as checked above; features by the caller.
        unsafe {
            match len {
                1 => tile::<1>(w, row_bytes, rows, acts, &perms, t0, out),
                2 => tile::<2>(w, row_bytes, rows, acts, &perms, t0, out),
                3 => tile::<3>(w, row_bytes, rows, acts, &perms, t0, out),
                _ => tile::<4>(w, row_bytes, rows, acts, &perms, t0, out),
            }
        }
        t0 += len;
    }
}

/// Tokens `t0..t0 + N` of [`panel`], in the thread's panel buffer.
///
/// # Safety
/// As [`panel`] checked.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")]
unsafe fn tile<const N: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    acts: &StreamActs,
    perms: &Perms,
    t0: usize,
    out: Out,
) {
    with_panel_buffer(acts.chunks * N * PANEL, |buf| {
        // SAFETY: as [`panel`] checked; the buffer has the length asked.
        unsafe { tile_in::<N>(buf, w, row_bytes, rows, acts, perms, t0, out) }
    });
}

/// [`tile`]: every row's chunk values into `buf` (`[chunk][token][row]`),
/// rows in address order (one linear stream); then per chunk and token the
/// rows into lanes and the blocks added in order.
///
/// # Safety
/// As [`panel`] checked; `buf` holds `chunks * N * PANEL` registers.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")]
unsafe fn tile_in<const N: usize>(
    buf: &mut [__m512i],
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    acts: &StreamActs,
    perms: &Perms,
    t0: usize,
    out: Out,
) {
    let (nb, chunks) = (acts.nb, acts.chunks);
    for r in 0..PANEL {
        if r >= rows {
            clear_row::<N>(buf, r, chunks);
            continue;
        }
        let row = w.as_ptr().wrapping_add(r * row_bytes);
        for c in 0..chunks {
            let p = row.wrapping_add(c * CHUNK_BYTES);
            prefetch_ahead(p, CHUNK_BYTES);
            let valid = (nb - c * CHUNK).min(CHUNK) * Q4_0_BYTES;
            // SAFETY: the row's blocks lie inside `w` (checked by `panel`);
            // this reads the chunk's `valid` bytes of them.
            let cw = unsafe { chunk_weights(p, valid, perms) };
            for t in 0..N {
                let v = chunk_values(&cw, acts.of(t0 + t, c));
                buf[(c * N + t) * PANEL + r] = _mm512_castps_si512(v);
            }
        }
    }
    let mut acc = [_mm512_setzero_ps(); N];
    let mut by_row = [_mm512_setzero_ps(); PANEL];
    for c in 0..chunks {
        let blocks = (nb - c * CHUNK).min(CHUNK);
        for (t, a) in acc.iter_mut().enumerate() {
            let at = (c * N + t) * PANEL;
            for (r, x) in by_row.iter_mut().enumerate() {
                *x = _mm512_castsi512_ps(buf[at + r]);
            }
            let cols = transpose16(&by_row);
            for b in 0..blocks {
                *a = _mm512_add_ps(*a, cols[lane_of(b)]);
            }
        }
    }
    for (t, a) in acc.into_iter().enumerate() {
        // SAFETY: `panel` checked that every token's outputs fit.
        unsafe { out.store(t0 + t, a) };
    }
}

/// Row `r`'s registers of every chunk and of `N` tokens in a stream
/// kernel's buffer (`[chunk][token][row]`) set to zero: the lanes of rows
/// past a panel's, from which no result is stored (zeros, not stale
/// values).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn clear_row<const N: usize>(buf: &mut [__m512i], r: usize, chunks: usize) {
    for c in 0..chunks {
        for t in 0..N {
            buf[(c * N + t) * PANEL + r] = _mm512_setzero_si512();
        }
    }
}

/// Brings the `bytes` of a row's stream [`AHEAD`] of the chunk at `p` to
/// L2 (hints: an address past the mapping is harmless).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn prefetch_ahead(p: *const u8, bytes: usize) {
    for line in 0..bytes.div_ceil(64) {
        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(AHEAD + 64 * line).cast());
    }
}

/// Packs rows `0..rows` (1..=16; lanes past them repeat the last row) of
/// `nb` Q4_0 blocks each (`w` starts at the first, `row_bytes` apart) into
/// the AVX-512 panels' layout: for block `i`, `packed[9 i + k]` holds the
/// low nibbles of quant dword `k` (bytes `4k..4k + 4`) of the 16 rows, one
/// row per 32-bit lane, `packed[9 i + 4 + k]` its high nibbles, and
/// `packed[9 i + 8]` the rows' scales as f32: the bits the panels' gathers
/// give, from contiguous loads instead. Per chunk of 16 blocks, each row's
/// loads are permuted into blocks-in-lanes form (as the stream kernel
/// does) and 16 rows of it transposed into rows-in-lanes form (a 16x16
/// transpose per four blocks and one for the scales): about 4 operations
/// per row and block where 5 gathers of 16 lanes cost about twice that
/// (Zen 4).
///
/// # Safety
/// AVX-512 F/BW/VL and VBMI must be present; the rows' `nb` blocks must be
/// readable.
///
/// # Panics
/// If `packed` holds fewer than `9 * nb` registers or `rows` is not in
/// 1..=16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
pub(super) unsafe fn pack_q4_0(
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    nb: usize,
    packed: &mut [__m512i],
) {
    assert!(packed.len() >= 9 * nb, "packed panel too short");
    assert!((1..=PANEL).contains(&rows), "a panel has 1..=16 rows");
    let perms = Perms::new();
    let m = _mm512_set1_epi8(0x0f);
    let mut by_row = [_mm512_setzero_ps(); PANEL];
    for c in 0..nb.div_ceil(CHUNK) {
        let first = c * CHUNK;
        let blocks = (nb - first).min(CHUNK);
        let valid = blocks * Q4_0_BYTES;
        let at = |r: usize| w.wrapping_add(r.min(rows - 1) * row_bytes + first * Q4_0_BYTES);
        for (g, idx) in perms.group.iter().enumerate() {
            if 4 * g >= blocks {
                break;
            }
            let [a, b] = GROUP_LOADS[g];
            for (r, v) in by_row.iter_mut().enumerate() {
                // SAFETY: the chunk's `valid` bytes of the row are readable
                // (by the caller); `load` reads no byte past them.
                let (x, y) =
                    unsafe { (load(at(r), valid, LOADS[a]), load(at(r), valid, LOADS[b])) };
                *v = _mm512_castsi512_ps(_mm512_permutex2var_epi8(x, *idx, y));
            }
            // Lane r of t[4l + k]: quant dword k of block 4g + l of row r.
            let t = transpose16(&by_row);
            for l in 0..4.min(blocks - 4 * g) {
                let i = first + 4 * g + l;
                for k in 0..4 {
                    let v = _mm512_castps_si512(t[4 * l + k]);
                    packed[9 * i + k] = _mm512_and_si512(v, m);
                    packed[9 * i + 4 + k] = _mm512_and_si512(_mm512_srli_epi32::<4>(v), m);
                }
            }
        }
        for (r, v) in by_row.iter_mut().enumerate() {
            // The same chunk of the next panel's row (usually this
            // thread's next unit) to L2: from DRAM, packing otherwise
            // waits on every row (`matmul/q4_0/avx512/few8-dram`, Zen 4:
            // 7.2-7.3 GB/s without, 9.1-9.2 with; two panels ahead 8-10).
            for k in 0..CHUNK_BYTES.div_ceil(64) {
                // A hint: an address past the mapping is harmless.
                _mm_prefetch::<_MM_HINT_T1>(at(r).wrapping_add(PANEL * row_bytes + 64 * k).cast());
            }
            // SAFETY: as above.
            let l = unsafe {
                [
                    load(at(r), valid, LOADS[0]),
                    load(at(r), valid, LOADS[1]),
                    load(at(r), valid, LOADS[3]),
                    load(at(r), valid, LOADS[4]),
                ]
            };
            *v = perms.scales(l[0], l[1], l[2], l[3]);
        }
        // Lane r of u[p]: the scale of block lane_of(p) of row r.
        let u = transpose16(&by_row);
        for (p, v) in u.iter().enumerate() {
            let b = lane_of(p);
            if b < blocks {
                packed[9 * (first + b) + 8] = _mm512_castps_si512(*v);
            }
        }
    }
}
