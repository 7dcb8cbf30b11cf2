//! AVX-512 products (VNNI, VBMI, GFNI) of Q4_K and Q6_K weight rows with
//! one to four Q8_K activation rows that stream each weight row from the
//! mapping once, in address order: the k-quant counterparts of
//! [`super::avx512s`]'s Q4_0 stream kernel, *sub-blocks in lanes*.
//!
//! Q6_K takes one super-block (210 bytes, 16 sub-blocks of 16) at a time:
//! two-source dword permutes of its `ql` bytes and one-source ones of its
//! `qh` bytes, per-lane shifts and one ternary-logic merge build each
//! sub-block's 6-bit codes in one lane across four registers; per token
//! four `vpdpbusd`, starting from `-32 * sum(x)`, give `dot - 32 * sum`
//! per sub-block and one multiply the signed scale, so the lanes add up to
//! the super-block's `isum - 32 * msum`; the same reduction across rows
//! puts the 16 rows in lanes for `total * (d * dx)`.
//!
//! Q4_K:
//! A row's super-blocks are taken two at a time (a *chunk*, 288
//! contiguous bytes, 16 sub-blocks of 32 weights). Four 64-byte loads hold
//! their quants; two-source dword permutes and a blend per register put
//! dword `k` and `k + 4` of every sub-block pair's 32 quant bytes into
//! register `a` (`k = a`, lanes `0..8` and `8..16`), so the low nibbles
//! hold eight sub-blocks and the high nibbles the other eight; a GF(2)
//! affine map takes the high nibbles. Per token, eight `vpdpbusd` against
//! activations arranged the same way ([`KStreamActs`], built once per
//! product) and one fold of the two register halves leave each sub-block's
//! exact integer dot in its own lane; one multiply applies the sub-blocks'
//! 6-bit scales (unpacked in lanes once per row and chunk by a byte
//! permute), one more the minimums against the activation's 32-element
//! sums, and a second fold leaves, per 128-bit lane, four partial sums of
//! one super-block's `sum(sc * dot)` (lanes 0, 1) or `sum(m * bsum)`
//! (lanes 2, 3). After all rows, a reduction tree across each pair of rows
//! and a 4x4 transpose of 128-bit lanes put the 16 rows' sums into lanes,
//! and the float steps run there, super-block by super-block from the
//! first.
//!
//! Numerics: the integer sums are exact (wrapping, in any order) and the
//! float expression per super-block is the panels' (`avx2k::
//! panel_order_dot`: `isum * (d * dx) - msum * (dmin * dx)`, added from
//! super-block 0), so every output is bit-identical to the AVX2 groups'
//! and the AVX-512 panels', and the engine may pick any of them by token
//! count.

use std::arch::x86_64::*;

use super::avx512::{Out, PANEL, check_panel, row_offsets, with_panel_buffer};
use super::avx512k::KFormat;
use super::avx512s::{HIGH_NIBBLE, Lanes, TILE, clear_row, index_reg, load, prefetch_ahead, reg};

/// Super-blocks per chunk: 16 sub-blocks, one per 32-bit lane.
const SB: usize = 2;
const Q4K_BYTES: usize = 144;
const Q8K_BYTES: usize = 292;
/// Offsets of the Q8_K block's quants and 16-element sums.
const Q8K_QS: usize = 4;
const Q8K_BSUMS: usize = 260;
/// Registers per (token, chunk) in [`KStreamActs`]: the quants meeting the
/// four low-nibble and four high-nibble weight registers, and the
/// sub-blocks' 32-element sums.
const PER_CHUNK: usize = 9;
/// The same for Q6_K: four quant dwords per sub-block, the offset sums.
const PER_CHUNK6: usize = 5;
const Q6K_BYTES: usize = 210;

/// The lane of a chunk's sub-block dots (after the first fold) that holds
/// sub-block `j` of super-block `s`: `4s + j / 2`, plus 8 for odd `j`.
const fn sub_lane(s: usize, j: usize) -> usize {
    4 * s + j / 2 + 8 * (j % 2)
}

/// The activation rows of a product as the k-quant stream kernels read
/// them, for each token and chunk. Q4_K: registers `a` and `4 + a` hold the
/// quant dwords meeting weight register `a`'s low and high nibbles (lane
/// `4s + m`: dword `a` of sub-blocks `2m` / `2m + 1` of super-block `s`;
/// lane `8 + 4s + m`: dword `a + 4`), register 8 each sub-block's
/// 32-element sum in the lane `sub_lane` gives. Q6_K (one super-block a
/// chunk): register `k` quant dword `k` of each 16-element sub-block, one
/// sub-block per lane, register 4 `-32 * sum` of each sub-block's quants
/// (where its dot starts: the codes are offset by 32). And each
/// super-block's scale `d`. Built once per product; lanes past a row's
/// last super-block hold zeros.
pub struct KStreamActs {
    format: KFormat,
    nb: usize,
    chunks: usize,
    n: usize,
    lanes: Vec<Lanes>,
    d: Vec<f32>,
}

impl KStreamActs {
    /// The lanes of `xs` (Q8_K rows of at least `nb` super-blocks) against
    /// `format` weights.
    ///
    /// # Panics
    /// If an activation row is shorter than `nb` super-blocks, or `format`
    /// has no stream kernel (Q5_K).
    pub fn new(format: KFormat, xs: &[&[u8]], nb: usize) -> KStreamActs {
        let (sbs, per_chunk) = match format {
            KFormat::Q4K => (SB, PER_CHUNK),
            KFormat::Q6K => (1, PER_CHUNK6),
            KFormat::Q5K => panic!("no Q5_K stream kernel"),
        };
        let chunks = nb.div_ceil(sbs);
        let mut lanes = vec![Lanes([0; 16]); xs.len() * chunks * per_chunk];
        let mut d = vec![0.0f32; xs.len() * nb];
        for (t, x) in xs.iter().enumerate() {
            assert!(x.len() >= nb * Q8K_BYTES, "activation row too short");
            for (i, blk) in x[..nb * Q8K_BYTES].chunks_exact(Q8K_BYTES).enumerate() {
                let (c, s) = (i / sbs, i % sbs);
                let base = (t * chunks + c) * per_chunk;
                d[t * nb + i] = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
                let quants = |e: usize| {
                    let at = Q8K_QS + e;
                    i32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]])
                };
                let bsum = |k: usize| {
                    let at = Q8K_BSUMS + 2 * k;
                    i32::from(i16::from_le_bytes([blk[at], blk[at + 1]]))
                };
                if format == KFormat::Q6K {
                    for sub in 0..16 {
                        for k in 0..4 {
                            lanes[base + k].0[sub] = quants(16 * sub + 4 * k);
                        }
                        lanes[base + 4].0[sub] = -32 * bsum(sub);
                    }
                    continue;
                }
                for m in 0..4 {
                    let u = 4 * s + m;
                    for a in 0..4 {
                        for (lane, k) in [(u, a), (8 + u, a + 4)] {
                            lanes[base + a].0[lane] = quants(32 * (2 * m) + 4 * k);
                            lanes[base + 4 + a].0[lane] = quants(32 * (2 * m + 1) + 4 * k);
                        }
                    }
                }
                for j in 0..8 {
                    lanes[base + 8].0[sub_lane(s, j)] = bsum(2 * j) + bsum(2 * j + 1);
                }
            }
        }
        KStreamActs {
            format,
            nb,
            chunks,
            n: xs.len(),
            lanes,
            d,
        }
    }

    /// The `P` registers of token `t`, chunk `c`.
    fn of<const P: usize>(&self, t: usize, c: usize) -> &[Lanes; P] {
        let at = (t * self.chunks + c) * P;
        self.lanes[at..at + P]
            .try_into()
            .expect("P registers per token and chunk")
    }

    /// Token `t`'s scale of super-block `i`.
    fn d(&self, t: usize, i: usize) -> f32 {
        self.d[t * self.nb + i]
    }
}

/// Dword indices of the permutes that build weight register `a` from a
/// super-block's two quant loads (bytes 16..80 and 80..144 of the block:
/// dword `8m + k` of its quants is sub-block pair `m`'s dword `k`): lane
/// `L` takes pair `m = L % 4`'s dword `a` (lanes below 8) or `a + 4`.
const QUANT_INDEX: [[u32; 16]; 4] = {
    let mut idx = [[0u32; 16]; 4];
    let mut a = 0;
    while a < 4 {
        let mut lane = 0;
        while lane < 16 {
            let m = lane % 4;
            let k = a + if lane >= 8 { 4 } else { 0 };
            let table = if m < 2 { 0 } else { 16 };
            idx[a][lane] = (table + 8 * (m % 2) + k) as u32;
            lane += 1;
        }
        a += 1;
    }
    idx
};

/// Byte indices of the permute that gathers, for each lane of the chunk's
/// sub-block dots ([`sub_lane`]), the header bytes its scale and minimum
/// are unpacked from (super-block `s`'s 16-byte header in bytes `16s..`,
/// the 12 packed bytes from 4; see `scalar::scale_min`): byte 0 the
/// scale's low bits, byte 1 (`j >= 4`) the byte whose top two bits are the
/// scale's high bits, bytes 2 and 3 the same for the minimum. Bytes
/// [`HEADER_ZERO`] leaves clear are not read.
const HEADER_INDEX: [u8; 64] = {
    let mut idx = [0u8; 64];
    let mut s = 0;
    while s < SB {
        let mut j = 0;
        while j < 8 {
            let lane = sub_lane(s, j);
            let b = 16 * s + 4;
            if j < 4 {
                idx[4 * lane] = (b + j) as u8;
                idx[4 * lane + 2] = (b + j + 4) as u8;
            } else {
                idx[4 * lane] = (b + j + 4) as u8;
                idx[4 * lane + 1] = (b + j - 4) as u8;
                idx[4 * lane + 2] = (b + j + 4) as u8;
                idx[4 * lane + 3] = (b + j) as u8;
            }
            j += 1;
        }
        s += 1;
    }
    idx
};

/// Which bytes of [`HEADER_INDEX`]'s permute are kept: bytes 1 and 3 of
/// the lanes of sub-blocks 0..4 are zero (those scales have no high bits).
const HEADER_ZERO: u64 = {
    let mut keep = u64::MAX;
    let mut s = 0;
    while s < SB {
        let mut j = 0;
        while j < 4 {
            let lane = sub_lane(s, j);
            keep &= !(1u64 << (4 * lane + 1));
            keep &= !(1u64 << (4 * lane + 3));
            j += 1;
        }
        s += 1;
    }
    keep
};

/// Per lane (as [`sub_lane`]): the scale's low-bit mask, the minimum's
/// shift and low-bit mask (sub-blocks 0..4: six bits of one byte; 4..8:
/// four, the high two from another byte).
const fn header_masks() -> ([i32; 16], [u32; 16], [i32; 16]) {
    let (mut sc, mut sh, mut mn) = ([0i32; 16], [0u32; 16], [0i32; 16]);
    let mut s = 0;
    while s < SB {
        let mut j = 0;
        while j < 8 {
            let lane = sub_lane(s, j);
            if j < 4 {
                (sc[lane], sh[lane], mn[lane]) = (63, 16, 63);
            } else {
                (sc[lane], sh[lane], mn[lane]) = (15, 20, 15);
            }
            j += 1;
        }
        s += 1;
    }
    (sc, sh, mn)
}
const HEADER_MASKS: ([i32; 16], [u32; 16], [i32; 16]) = header_masks();

/// The constant registers of the kernel, built once per panel call.
#[derive(Clone, Copy)]
struct Consts {
    quant: [__m512i; 4],
    header: __m512i,
    sc_mask: __m512i,
    mn_shift: __m512i,
    mn_mask: __m512i,
}

impl Consts {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn new() -> Consts {
        Consts {
            quant: [
                index_reg(&QUANT_INDEX[0]),
                index_reg(&QUANT_INDEX[1]),
                index_reg(&QUANT_INDEX[2]),
                index_reg(&QUANT_INDEX[3]),
            ],
            header: index_reg(&HEADER_INDEX),
            sc_mask: index_reg(&HEADER_MASKS.0),
            mn_shift: index_reg(&HEADER_MASKS.1),
            mn_mask: index_reg(&HEADER_MASKS.2),
        }
    }
}

/// One row's chunk of weights, unpacked: `lo[a]` / `hi[a]` the low and high
/// nibbles of weight register `a` ([`QUANT_INDEX`]), `sc` and `mn` the
/// sub-blocks' scales and minimums in the lanes [`sub_lane`] gives.
#[derive(Clone, Copy)]
struct ChunkWeights {
    lo: [__m512i; 4],
    hi: [__m512i; 4],
    sc: __m512i,
    mn: __m512i,
}

/// Unpacks the chunk at `p` (`valid` bytes of it: one or two super-blocks).
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI/VBMI and GFNI must be present; the `valid` bytes
/// at `p` must be readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")]
unsafe fn chunk_weights(p: *const u8, valid: usize, k: &Consts) -> ChunkWeights {
    // SAFETY: by the caller; `load` reads no byte past `valid`.
    let (q, hdr) = unsafe {
        (
            [
                load(p, valid, 16),
                load(p, valid, 80),
                load(p, valid, Q4K_BYTES + 16),
                load(p, valid, Q4K_BYTES + 80),
            ],
            [load(p, valid, 0), load(p, valid, Q4K_BYTES)],
        )
    };
    let m4 = _mm512_set1_epi8(0x0f);
    let mut lo = [_mm512_setzero_si512(); 4];
    let mut hi = [_mm512_setzero_si512(); 4];
    for a in 0..4 {
        // Super-block 0 into lanes 0..4 and 8..12, 1 into 4..8 and 12..16.
        let s0 = _mm512_permutex2var_epi32(q[0], k.quant[a], q[1]);
        let s1 = _mm512_permutex2var_epi32(q[2], k.quant[a], q[3]);
        let w = _mm512_mask_blend_epi32(0xf0f0, s0, s1);
        lo[a] = _mm512_and_si512(w, m4);
        // Each byte's high nibble into its low bits (an affine map over
        // GF(2): output bit i is input bit i + 4), one operation.
        hi[a] = _mm512_gf2p8affine_epi64_epi8::<0>(w, _mm512_set1_epi64(HIGH_NIBBLE));
    }
    // Both headers' first 16 bytes in the first two 128-bit lanes.
    let h = _mm512_inserti32x4::<1>(hdr[0], _mm512_castsi512_si128(hdr[1]));
    let v = _mm512_maskz_permutexvar_epi8(HEADER_ZERO, k.header, h);
    let top2 = _mm512_set1_epi32(0x30);
    // scale = low bits | the other byte's top two bits << 4 (zero below
    // sub-block 4): bits 14-15 of the lane to 4-5; the minimum's, 30-31.
    let sc = _mm512_or_si512(
        _mm512_and_si512(v, k.sc_mask),
        _mm512_and_si512(_mm512_srli_epi32::<10>(v), top2),
    );
    let mn = _mm512_or_si512(
        _mm512_and_si512(_mm512_srlv_epi32(v, k.mn_shift), k.mn_mask),
        _mm512_and_si512(_mm512_srli_epi32::<26>(v), top2),
    );
    ChunkWeights { lo, hi, sc, mn }
}

/// One row's partial sums of one chunk for one token's registers `x`:
/// 128-bit lane `g` holds four partial sums of `sum(sc * dot)` of
/// super-block `g` (lanes 0, 1) or of `sum(m * bsum)` of super-block
/// `g - 2` (lanes 2, 3).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn chunk_sums(w: &ChunkWeights, x: &[Lanes; PER_CHUNK]) -> __m512i {
    let (mut a, mut b) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    for j in 0..4 {
        a = _mm512_dpbusd_epi32(a, w.lo[j], reg(&x[j]));
        b = _mm512_dpbusd_epi32(b, w.hi[j], reg(&x[4 + j]));
    }
    // Each sub-block's two halves: the dots in the lanes `sub_lane` gives.
    let dots = fold(a, b);
    let isum = _mm512_mullo_epi32(dots, w.sc);
    let msum = _mm512_mullo_epi32(reg(&x[8]), w.mn);
    fold(isum, msum)
}

/// Lanes `l` and `l + 8` of `a` added into lane `l`, of `b` into `l + 8`.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold(a: __m512i, b: __m512i) -> __m512i {
    _mm512_add_epi32(
        _mm512_shuffle_i64x2::<0b01_00_01_00>(a, b),
        _mm512_shuffle_i64x2::<0b11_10_11_10>(a, b),
    )
}

/// The sums of 16 rows' [`chunk_sums`] (row `r` in `v[r]`): output `g`
/// holds, in lane `r`, the total of row `r`'s 128-bit lane `g`.
#[inline]
#[target_feature(enable = "avx512f")]
fn rows_into_lanes(v: &[__m512i; 16]) -> [__m512i; 4] {
    // Rows 2p, 2p + 1: per 128-bit lane, (0 + 2, 1 + 3) of each.
    let mut u = [_mm512_setzero_si512(); 8];
    for (p, u) in u.iter_mut().enumerate() {
        let (a, b) = (v[2 * p], v[2 * p + 1]);
        *u = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    }
    // Rows 4q..4q + 4, totals, per 128-bit lane.
    let mut t = [_mm512_setzero_si512(); 4];
    for (q, t) in t.iter_mut().enumerate() {
        let (a, b) = (u[2 * q], u[2 * q + 1]);
        *t = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    }
    // A 4x4 transpose of 128-bit lanes.
    let e0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(t[0], t[1]);
    let e1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(t[0], t[1]);
    let e2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(t[2], t[3]);
    let e3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(t[2], t[3]);
    [
        _mm512_shuffle_i32x4::<0b10_00_10_00>(e0, e2),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(e0, e2),
        _mm512_shuffle_i32x4::<0b10_00_10_00>(e1, e3),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(e1, e3),
    ]
}

/// Q6_K's permute indices and shifts: register `k`, lane `sub` (the
/// 16-element sub-block, in a super-block of two halves `n` of four
/// quarters `q` of 32): its quant dword `k` has the low four bits of each
/// code in `ql` dword `16n + 8(q % 2) + 4(sub % 2) + k` (low nibbles for
/// `q < 2`, high ones above) and the top two in `qh` dword
/// `8n + 4(sub % 2) + k`, at bit `2q` of each byte.
const Q6_INDEX: Q6Tables = {
    let (mut ql, mut qh) = ([[0u32; 16]; 4], [[0u32; 16]; 4]);
    let (mut ql_shift, mut qh_shift) = ([0u32; 16], [0u32; 16]);
    let mut sub = 0;
    while sub < 16 {
        let (n, q, half) = (sub / 8, (sub % 8) / 2, sub % 2);
        let mut k = 0;
        while k < 4 {
            ql[k][sub] = (16 * n + 8 * (q % 2) + 4 * half + k) as u32;
            qh[k][sub] = (8 * n + 4 * half + k) as u32;
            k += 1;
        }
        ql_shift[sub] = if q >= 2 { 4 } else { 0 };
        qh_shift[sub] = 2 * q as u32;
        sub += 1;
    }
    Q6Tables {
        ql,
        qh,
        ql_shift,
        qh_shift,
    }
};

/// [`Q6_INDEX`]'s tables.
struct Q6Tables {
    ql: [[u32; 16]; 4],
    qh: [[u32; 16]; 4],
    ql_shift: [u32; 16],
    qh_shift: [u32; 16],
}

/// Q6_K's constant registers, built once per panel call.
#[derive(Clone, Copy)]
struct Consts6 {
    ql: [__m512i; 4],
    qh: [__m512i; 4],
    ql_shift: __m512i,
    qh_shift: __m512i,
}

impl Consts6 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn new() -> Consts6 {
        let Q6Tables {
            ql,
            qh,
            ql_shift,
            qh_shift,
        } = &Q6_INDEX;
        Consts6 {
            ql: ql.each_ref().map(|t| index_reg(t)),
            qh: qh.each_ref().map(|t| index_reg(t)),
            ql_shift: index_reg(ql_shift),
            qh_shift: index_reg(qh_shift),
        }
    }
}

/// One row's Q6_K super-block, unpacked: `code[k]` quant dword `k` of each
/// sub-block's 6-bit codes (one sub-block per lane), `sc` the sub-blocks'
/// signed scales.
#[derive(Clone, Copy)]
struct ChunkWeights6 {
    code: [__m512i; 4],
    sc: __m512i,
}

/// Unpacks the Q6_K super-block at `p` (`ql[128]` at 0, `qh[64]` at 128,
/// `scales: [i8; 16]` at 192, `d` at 208).
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI/VBMI and GFNI must be present; the super-block's
/// 210 bytes at `p` must be readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")]
unsafe fn chunk_weights6(p: *const u8, k: &Consts6) -> ChunkWeights6 {
    // SAFETY: by the caller; `load` reads no byte past the super-block.
    let (l0, l1, h, sc) = unsafe {
        (
            load(p, Q6K_BYTES, 0),
            load(p, Q6K_BYTES, 64),
            load(p, Q6K_BYTES, 128),
            load(p, Q6K_BYTES, 192),
        )
    };
    let (low4, top2) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
    let mut code = [_mm512_setzero_si512(); 4];
    for (j, c) in code.iter_mut().enumerate() {
        let lo = _mm512_srlv_epi32(_mm512_permutex2var_epi32(l0, k.ql[j], l1), k.ql_shift);
        let hi = _mm512_srlv_epi32(_mm512_permutexvar_epi32(k.qh[j], h), k.qh_shift);
        let hi = _mm512_and_si512(_mm512_slli_epi32::<4>(hi), top2);
        // (lo & 0x0f) | hi
        *c = _mm512_ternarylogic_epi32::<0xec>(lo, hi, low4);
    }
    ChunkWeights6 {
        code,
        sc: _mm512_cvtepi8_epi32(_mm512_castsi512_si128(sc)),
    }
}

/// One row's Q6_K super-block for one token's registers `x`: per lane
/// (sub-block) `sc * (dot - 32 * sum(x))`, whose lanes add up to the
/// super-block's `isum - 32 * msum` (wrapping, as the panels compute it).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn chunk_sums6(w: &ChunkWeights6, x: &[Lanes; PER_CHUNK6]) -> __m512i {
    let mut a = reg(&x[4]);
    let mut b = _mm512_setzero_si512();
    for j in 0..2 {
        a = _mm512_dpbusd_epi32(a, w.code[2 * j], reg(&x[2 * j]));
        b = _mm512_dpbusd_epi32(b, w.code[2 * j + 1], reg(&x[2 * j + 1]));
    }
    _mm512_mullo_epi32(_mm512_add_epi32(a, b), w.sc)
}

/// Dots of `rows` (1..=16) consecutive Q4_K weight rows (`w` starts at the
/// first, `row_bytes` apart, `acts.nb` super-blocks each) with every
/// activation row, written to `out` (token `t`, row `r` at `t * ld + r`):
/// the contract and the bits of [`super::avx512k::panel`], for any token
/// count (fastest for one to a few).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL, VNNI and VBMI, and GFNI.
///
/// # Panics
/// If `format` is not Q4_K, `w` or `out` is too short, or `rows` is not
/// in 1..=16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")]
pub unsafe fn panel(
    format: KFormat,
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    acts: &KStreamActs,
    out: Out,
) {
    assert_eq!(format, acts.format, "activations built for another format");
    let (n, nb) = (acts.n, acts.nb);
    let bytes = match format {
        KFormat::Q4K => Q4K_BYTES,
        KFormat::Q6K => Q6K_BYTES,
        KFormat::Q5K => panic!("no Q5_K stream kernel"),
    };
    check_panel(w, row_bytes, rows, nb * bytes, n, out);
    let k = (Consts::new(), Consts6::new());
    let mut t0 = 0;
    while t0 < n {
        let len = (n - t0).min(TILE);
        // SAFETY: as checked above; features by the caller.
        unsafe {
            if format == KFormat::Q6K {
                match len {
                    1 => tile::<true, 1>(w, row_bytes, rows, acts, &k, t0, out),
                    2 => tile::<true, 2>(w, row_bytes, rows, acts, &k, t0, out),
                    3 => tile::<true, 3>(w, row_bytes, rows, acts, &k, t0, out),
                    _ => tile::<true, 4>(w, row_bytes, rows, acts, &k, t0, out),
                }
            } else {
                match len {
                    1 => tile::<false, 1>(w, row_bytes, rows, acts, &k, t0, out),
                    2 => tile::<false, 2>(w, row_bytes, rows, acts, &k, t0, out),
                    3 => tile::<false, 3>(w, row_bytes, rows, acts, &k, t0, out),
                    _ => tile::<false, 4>(w, row_bytes, rows, acts, &k, t0, out),
                }
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
unsafe fn tile<const Q6: bool, const N: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    acts: &KStreamActs,
    k: &(Consts, Consts6),
    t0: usize,
    out: Out,
) {
    with_panel_buffer(acts.chunks * N * PANEL, |buf| {
        // SAFETY: as [`panel`] checked; the buffer has the length asked.
        unsafe { tile_in::<Q6, N>(buf, w, row_bytes, rows, acts, k, t0, out) }
    });
}

/// [`tile`]: every row's chunk sums into `buf` (`[chunk][token][row]`),
/// rows in address order (one linear stream); then per chunk and token the
/// rows into lanes and the super-blocks' float steps in order.
///
/// # Safety
/// As [`panel`] checked; `buf` holds `chunks * N * PANEL` registers.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni")]
unsafe fn tile_in<const Q6: bool, const N: usize>(
    buf: &mut [__m512i],
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    acts: &KStreamActs,
    k: &(Consts, Consts6),
    t0: usize,
    out: Out,
) {
    let (nb, chunks) = (acts.nb, acts.chunks);
    // Super-blocks per chunk and their bytes.
    let (sbs, bytes) = if Q6 { (1, Q6K_BYTES) } else { (SB, Q4K_BYTES) };
    for r in 0..PANEL {
        if r >= rows {
            clear_row::<N>(buf, r, chunks);
            continue;
        }
        let row = w.as_ptr().wrapping_add(r * row_bytes);
        for c in 0..chunks {
            let p = row.wrapping_add(c * sbs * bytes);
            prefetch_ahead(p, sbs * bytes);
            let at = c * N * PANEL + r;
            if Q6 {
                // SAFETY: the row's super-blocks lie inside `w` (checked
                // by `panel`); this reads super-block c of them.
                let cw = unsafe { chunk_weights6(p, &k.1) };
                for t in 0..N {
                    buf[at + t * PANEL] = chunk_sums6(&cw, acts.of::<PER_CHUNK6>(t0 + t, c));
                }
            } else {
                let valid = (nb - c * SB).min(SB) * Q4K_BYTES;
                // SAFETY: as above; this reads the chunk's `valid` bytes.
                let cw = unsafe { chunk_weights(p, valid, &k.0) };
                for t in 0..N {
                    buf[at + t * PANEL] = chunk_sums(&cw, acts.of::<PER_CHUNK>(t0 + t, c));
                }
            }
        }
    }
    let offsets = row_offsets(rows, row_bytes);
    let mut acc = [_mm512_setzero_ps(); N];
    for c in 0..chunks {
        let blocks = (nb - c * sbs).min(sbs);
        // The scales (Q4_K: d and dmin, bytes 0..4; Q6_K: d, bytes 208..210,
        // read as the high half of bytes 206..210) of the chunk's
        // super-blocks in the 16 rows (lanes past `rows` repeat the last).
        let mut d = [_mm512_setzero_ps(); SB];
        let mut dmin = [_mm512_setzero_ps(); SB];
        for s in 0..blocks {
            let at = (c * sbs + s) * bytes + if Q6 { 206 } else { 0 };
            // SAFETY: those 4 bytes of each super-block of every row are
            // inside `w` (checked by `panel`).
            let dd = unsafe { _mm512_i32gather_epi32::<1>(offsets, w.as_ptr().add(at).cast()) };
            let high = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dd)));
            if Q6 {
                d[s] = high;
            } else {
                d[s] = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd));
                dmin[s] = high;
            }
        }
        for (t, a) in acc.iter_mut().enumerate() {
            let at = (c * N + t) * PANEL;
            let sums = rows_into_lanes(buf[at..at + PANEL].try_into().expect("a panel's rows"));
            for s in 0..blocks {
                let dx = _mm512_set1_ps(acts.d(t0 + t, c * sbs + s));
                let block = if Q6 {
                    // The four lanes' partial sums are exact integers.
                    let total = _mm512_add_epi32(
                        _mm512_add_epi32(sums[0], sums[1]),
                        _mm512_add_epi32(sums[2], sums[3]),
                    );
                    // (isum - 32 * msum) * (d * dx)
                    _mm512_mul_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d[s], dx))
                } else {
                    // isum * (d * dx) - msum * (dmin * dx), from super-block 0
                    _mm512_sub_ps(
                        _mm512_mul_ps(_mm512_cvtepi32_ps(sums[s]), _mm512_mul_ps(d[s], dx)),
                        _mm512_mul_ps(_mm512_cvtepi32_ps(sums[2 + s]), _mm512_mul_ps(dmin[s], dx)),
                    )
                };
                *a = _mm512_add_ps(*a, block);
            }
        }
    }
    for (t, a) in acc.into_iter().enumerate() {
        // SAFETY: `panel` checked that every token's outputs fit.
        unsafe { out.store(t0 + t, a) };
    }
}
