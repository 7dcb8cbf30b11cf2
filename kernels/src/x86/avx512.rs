//! AVX-512 VNNI products of Q4_0 / Q8_0 weight rows with Q8_0 activations,
//! in panels of [`PANEL`] weight rows: one zmm lane per weight row, so every
//! block's integer dot ends in its own lane with no horizontal reduction,
//! and one broadcast activation dword feeds 16 rows' `vpdpbusd`.
//!
//! The weights stay where they are (the model mapping): a panel's blocks are
//! gathered into the lane layout as they are used (decode: few tokens, each
//! gathered block is used once per token) or packed once per panel into a
//! small thread-local buffer that every token then reads from L1/L2
//! (prefill and products of more than `DIRECT_MAX` tokens). On CPUs with
//! VBMI, Q4_0 panels are packed from contiguous loads and in-register
//! transposes instead of gathers (`avx512s::pack_q4_0`, the same
//! bits). No copy of a matrix outlives the call.
//!
//! Numerics: the block's integer dot is exact, and the float steps are the
//! scalar reference's, in its order (`(sum * d_w) * d_x` for Q4_0,
//! `sum * (d_w * d_x)` for Q8_0, then `acc += block` from block 0 up), so
//! every output is bit-identical to `scalar::vec_dot` whatever the batch,
//! panel position or path (gathered or packed).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes: weights enter as
//! `q + OFF` (Q4_0 nibbles are already `q + 8`; Q8_0 bytes get their sign
//! bit flipped, `q + 128`), and `OFF * sum(x)` per activation block, which
//! [`ActSums`] holds, is subtracted after.

use std::arch::x86_64::*;
use std::cell::RefCell;

/// Weight rows per panel: one per 32-bit lane of a zmm register.
pub const PANEL: usize = 16;
/// Tokens per register tile: 8 accumulators plus 8 weight registers.
const TILE: usize = 8;
/// Token counts up to this are computed from gathered blocks; more tokens
/// pay for packing the panel once.
const DIRECT_MAX: usize = 4;
const Q8_0_BYTES: usize = 34;

/// Where a panel's results go: `ptr[t * ld + r]` for token `t` and panel
/// row `r < rows`; `len` floats are valid from `ptr`.
#[derive(Clone, Copy, Debug)]
pub struct Out {
    ptr: *mut f32,
    ld: usize,
    pub(super) rows: usize,
    len: usize,
}

impl Out {
    /// Results into `buf`.
    pub fn new(buf: &mut [f32], ld: usize, rows: usize) -> Out {
        Out {
            ptr: buf.as_mut_ptr(),
            ld,
            rows,
            len: buf.len(),
        }
    }

    /// Results through a raw pointer, for outputs shared between threads.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be valid for writes, and nothing else may
    /// access the elements `t * ld + r` (`r < rows`) while a panel call
    /// writes them.
    pub unsafe fn raw(ptr: *mut f32, len: usize, ld: usize, rows: usize) -> Out {
        Out { ptr, ld, rows, len }
    }

    /// Whether `n` tokens' results fit.
    pub(super) fn fits(&self, n: usize) -> bool {
        n == 0 || (self.rows <= self.ld && (n - 1) * self.ld + self.rows <= self.len)
    }

    /// Stores the first `rows` lanes of `v` as token `t`'s results.
    ///
    /// # Safety
    /// AVX-512 F must be present and `fits(t + 1)` hold.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store(self, t: usize, v: __m512) {
        let mask = ((1u32 << self.rows) - 1) as __mmask16;
        // SAFETY: in bounds by the caller's `fits`; exclusive by `raw`'s or
        // `new`'s contract.
        unsafe { _mm512_mask_storeu_ps(self.ptr.add(t * self.ld), mask, v) };
    }

    /// Stores the lanes of `v` as token `t`'s results for rows `r0..r0 + 8`
    /// (those below `rows`).
    ///
    /// # Safety
    /// AVX2 must be present, `r0 < rows` and `fits(t + 1)` hold.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn store8(self, t: usize, r0: usize, v: __m256) {
        debug_assert!(r0 < self.rows);
        let p = self.ptr.wrapping_add(t * self.ld + r0);
        let n = self.rows - r0;
        if n >= 8 {
            // SAFETY: rows r0..r0 + 8 are below `rows`, so in bounds by the
            // caller's `fits`; exclusive by `raw`'s or `new`'s contract.
            unsafe { _mm256_storeu_ps(p, v) };
        } else {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lanes);
            // SAFETY: as above; only the lanes below `rows - r0` are written.
            unsafe { _mm256_maskstore_ps(p, mask, v) };
        }
    }
}

/// The weight format of a panel product.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    Q4_0,
    Q8_0,
}

impl Format {
    pub(super) fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 18,
            Format::Q8_0 => 34,
        }
    }

    /// The unsigned weight offset subtracted through the activation sums.
    pub fn offset(self) -> i32 {
        match self {
            Format::Q4_0 => 8,
            Format::Q8_0 => 128,
        }
    }
}

/// Per activation row and block, `d` as f32 and `offset * sum(qs)`: what a
/// panel product needs beside the Q8_0 bytes. Built once per product.
#[derive(Debug, Clone)]
pub struct ActSums {
    pub(super) nb: usize,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<i32>,
}

impl ActSums {
    /// Sums for `xs` (Q8_0 rows of at least `nb` blocks) against weights of
    /// `format`.
    pub fn new(format: Format, xs: &[&[u8]], nb: usize) -> Self {
        let off = format.offset();
        let mut d = Vec::with_capacity(xs.len() * nb);
        let mut s = Vec::with_capacity(xs.len() * nb);
        for x in xs {
            assert!(x.len() >= nb * Q8_0_BYTES, "activation row too short");
            for b in x[..nb * Q8_0_BYTES].chunks_exact(Q8_0_BYTES) {
                d.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
                s.push(off * b[2..].iter().map(|&q| i32::from(q as i8)).sum::<i32>());
            }
        }
        ActSums { nb, d, s }
    }
}

/// 8 weight registers (elements 4g..4g+4 of 16 rows each) and 16 scales.
pub(super) type Block = ([__m512i; 8], __m512);

/// Gathers block `i` of the panel's rows (byte offsets `idx` from `w`).
///
/// # Safety
/// AVX-512 F/BW/VNNI must be present; for every lane, `w + idx + i * bytes
/// .. + bytes` must be readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn gather<const Q8: bool>(w: *const u8, idx: __m512i, i: usize) -> Block {
    let format = if Q8 { Format::Q8_0 } else { Format::Q4_0 };
    let base = w.wrapping_add(i * format.block_bytes());
    let mut q = [_mm512_setzero_si512(); 8];
    // SAFETY (all gathers): the caller guarantees each lane's whole block is
    // readable; every dword read lies inside it (offsets 0..=14 of 18 bytes
    // for Q4_0, 0..=30 of 34 for Q8_0).
    match format {
        Format::Q4_0 => {
            let m = _mm512_set1_epi8(0x0f);
            for k in 0..4 {
                let v = unsafe { _mm512_i32gather_epi32::<1>(idx, base.add(2 + 4 * k).cast()) };
                q[k] = _mm512_and_si512(v, m);
                q[k + 4] = _mm512_and_si512(_mm512_srli_epi32::<4>(v), m);
            }
        }
        Format::Q8_0 => {
            let flip = _mm512_set1_epi8(i8::MIN);
            for (k, qk) in q.iter_mut().enumerate() {
                let v = unsafe { _mm512_i32gather_epi32::<1>(idx, base.add(2 + 4 * k).cast()) };
                *qk = _mm512_xor_si512(v, flip);
            }
        }
    }
    let dv = unsafe { _mm512_i32gather_epi32::<1>(idx, base.cast()) };
    (q, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dv)))
}

/// Window `win` (bytes `64 win..`, up to 64) of block `i` of the panel's
/// rows `0..rows` (1..=16; lanes past them repeat the last row; blocks of
/// `bytes` bytes, `w` at the first row, `row_bytes` apart) as dwords in
/// lanes: lane `r` of register `j` holds the four bytes from `64 win + 4j`
/// of row `r`'s block (bytes past the block read as zeros). Each row's
/// window is read with one contiguous load and 16 rows are transposed
/// instead of gathered: on Zen 4 a 16-lane gather costs about 20 cycles, a
/// transpose's 64 shuffles serve 16 of them.
///
/// # Safety
/// AVX-512 F/BW must be present; every row's block `i` must be readable;
/// `64 * win < bytes`.
///
/// # Panics
/// If `out` holds fewer than 16 registers.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn transposed_window(
    w: *const u8,
    row_bytes: usize,
    rows: usize,
    i: usize,
    bytes: usize,
    win: usize,
    out: &mut [__m512i],
) {
    debug_assert!(64 * win < bytes);
    let valid = (bytes - 64 * win).min(64);
    let mask = u64::MAX >> (64 - valid);
    // Loops, not `array::from_fn` / `map`: their closures do not inherit
    // the target features and were not inlined (Q8_0 decode 10x slower).
    let mut by_row = [_mm512_setzero_ps(); PANEL];
    for (r, v) in by_row.iter_mut().enumerate() {
        let p = w.wrapping_add(r.min(rows - 1) * row_bytes + i * bytes + 64 * win);
        // SAFETY: the block's bytes are readable (by the caller); the
        // masked load reads only the `valid` bytes of it.
        *v = _mm512_castsi512_ps(unsafe { _mm512_maskz_loadu_epi8(mask, p.cast()) });
    }
    let t = super::avx512s::transpose16(&by_row);
    for (o, v) in out[..PANEL].iter_mut().zip(t) {
        *o = _mm512_castps_si512(v);
    }
}

/// The dword at byte `off` (even) of every row's block, from its windows'
/// dwords in lanes ([`transposed_window`], one after the other).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn dword_at(t: &[__m512i], off: usize) -> __m512i {
    let j = off / 4;
    if off.is_multiple_of(4) {
        t[j]
    } else {
        _mm512_or_si512(
            _mm512_srli_epi32::<16>(t[j]),
            _mm512_slli_epi32::<16>(t[j + 1]),
        )
    }
}

/// A Q8_0 block of the panel's rows in the lane layout, from loads and a
/// transpose ([`transposed_window`]): the bits [`gather`] gives.
///
/// # Safety
/// As [`transposed_window`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack_q8_0(w: *const u8, row_bytes: usize, rows: usize, i: usize) -> Block {
    let mut t = [_mm512_setzero_si512(); PANEL];
    // SAFETY: by the caller; a block is one window.
    unsafe { transposed_window(w, row_bytes, rows, i, Q8_0_BYTES, 0, &mut t) };
    let flip = _mm512_set1_epi8(i8::MIN);
    let mut q = [_mm512_setzero_si512(); 8];
    for (k, qk) in q.iter_mut().enumerate() {
        *qk = _mm512_xor_si512(dword_at(&t, 2 + 4 * k), flip);
    }
    (q, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(t[0])))
}

/// Adds block `i` of token `x` (a Q8_0 row) to the 16 row accumulators.
///
/// # Safety
/// AVX-512 F/BW/VNNI must be present and `x` must hold block `i`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn accumulate<const Q8: bool>(
    (q, dw): &Block,
    x: *const u8,
    i: usize,
    d: f32,
    s: i32,
    acc: __m512,
) -> __m512 {
    let xq = x.wrapping_add(i * Q8_0_BYTES + 2);
    let (mut a0, mut a1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    for h in 0..4 {
        // SAFETY: the caller guarantees block i of x; these read its 32
        // quant bytes (unaligned 4-byte reads).
        let (x0, x1) = unsafe {
            (
                xq.add(8 * h).cast::<i32>().read_unaligned(),
                xq.add(8 * h + 4).cast::<i32>().read_unaligned(),
            )
        };
        a0 = _mm512_dpbusd_epi32(a0, q[2 * h], _mm512_set1_epi32(x0));
        a1 = _mm512_dpbusd_epi32(a1, q[2 * h + 1], _mm512_set1_epi32(x1));
    }
    // Exact: integer sums, minus offset * sum(x).
    let sum = _mm512_sub_epi32(_mm512_add_epi32(a0, a1), _mm512_set1_epi32(s));
    let f = _mm512_cvtepi32_ps(sum);
    let block = if Q8 {
        // scalar: sum as f32 * (d_w * d_x)
        _mm512_mul_ps(f, _mm512_mul_ps(*dw, _mm512_set1_ps(d)))
    } else {
        // scalar: sum as f32 * d_w * d_x
        _mm512_mul_ps(_mm512_mul_ps(f, *dw), _mm512_set1_ps(d))
    };
    _mm512_add_ps(acc, block)
}

/// Lane offsets of the panel's rows; lanes past `rows` repeat the last row
/// (valid addresses; their results are never stored).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn row_offsets(rows: usize, row_bytes: usize) -> __m512i {
    let mut o = [0i32; PANEL];
    for (r, v) in o.iter_mut().enumerate() {
        *v = (r.min(rows - 1) * row_bytes) as i32;
    }
    // SAFETY: o is 16 i32 = 64 readable bytes.
    unsafe { _mm512_loadu_si512(o.as_ptr().cast()) }
}

/// Tokens `t0..t0 + N` against gathered blocks; `out[t * PANEL + r]`.
///
/// # Safety
/// As [`panel`] checked: features present, rows and activations long enough.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn direct<const Q8: bool, const N: usize>(
    w: &[u8],
    idx: __m512i,
    rows: usize,
    row_bytes: usize,
    xs: &[&[u8]],
    sums: &ActSums,
    t0: usize,
    out: Out,
) {
    let nb = sums.nb;
    let bytes = if Q8 { Format::Q8_0 } else { Format::Q4_0 }.block_bytes();
    let mut acc = [_mm512_setzero_ps(); N];
    // Blocks per 64-byte line, roughly: prefetch each row once per line.
    let every = 64 / bytes;
    for i in 0..nb {
        if i % every == 0 {
            for r in 0..rows {
                let p = w.as_ptr().wrapping_add((r + PANEL) * row_bytes + i * bytes);
                // A hint: an address past the slice is harmless.
                _mm_prefetch::<_MM_HINT_T1>(p.cast());
            }
        }
        // SAFETY: every lane's row has nb blocks (checked by `panel`).
        let blk = unsafe {
            if Q8 {
                unpack_q8_0(w.as_ptr(), row_bytes, rows, i)
            } else {
                gather::<Q8>(w.as_ptr(), idx, i)
            }
        };
        for (k, a) in acc.iter_mut().enumerate() {
            let t = t0 + k;
            let j = t * nb + i;
            // SAFETY: xs[t] holds nb blocks (checked by ActSums::new).
            *a = unsafe { accumulate::<Q8>(&blk, xs[t].as_ptr(), i, sums.d[j], sums.s[j], *a) };
        }
    }
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: `panel` checked that every token's outputs fit.
        unsafe { out.store(t0 + k, *a) };
    }
}

/// Tokens `t0..t0 + N` against a packed panel (`nb` blocks of 9 registers).
///
/// # Safety
/// As [`panel`] checked; `packed` holds `9 * nb` registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn from_packed<const Q8: bool, const N: usize>(
    packed: &[__m512i],
    xs: &[&[u8]],
    sums: &ActSums,
    t0: usize,
    out: Out,
) {
    let nb = sums.nb;
    let mut acc = [_mm512_setzero_ps(); N];
    for (i, p) in packed.chunks_exact(9).take(nb).enumerate() {
        let blk: Block = (
            [p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]],
            _mm512_castsi512_ps(p[8]),
        );
        for (k, a) in acc.iter_mut().enumerate() {
            let t = t0 + k;
            let j = t * nb + i;
            // SAFETY: xs[t] holds nb blocks (checked by ActSums::new).
            *a = unsafe { accumulate::<Q8>(&blk, xs[t].as_ptr(), i, sums.d[j], sums.s[j], *a) };
        }
    }
    for (k, a) in acc.iter().enumerate() {
        // SAFETY: `panel` checked that every token's outputs fit.
        unsafe { out.store(t0 + k, *a) };
    }
}

thread_local! {
    /// The packed panel (or block scratch) of the calling thread, reused
    /// across calls by every panel kernel.
    static PACKED: RefCell<Vec<__m512i>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's panel buffer, at least `len` registers long
/// (grown, never shrunk or cleared: every user overwrites what it reads).
#[target_feature(enable = "avx512f")]
pub(super) fn with_panel_buffer<R>(len: usize, f: impl FnOnce(&mut [__m512i]) -> R) -> R {
    PACKED.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, _mm512_setzero_si512());
        }
        f(&mut buf[..len])
    })
}

/// The checks every panel kernel makes before touching memory: 1..=16 rows
/// of `row_bytes` (of which `used` hold blocks) inside `w`, gather offsets
/// in i32 range, and room in `out` for `n` tokens.
pub(super) fn check_panel(
    w: &[u8],
    row_bytes: usize,
    rows: usize,
    used: usize,
    n: usize,
    out: Out,
) {
    assert!((1..=PANEL).contains(&rows), "a panel has 1 to 16 rows");
    assert!(row_bytes >= used, "row shorter than its blocks");
    assert!(
        w.len() >= (rows - 1) * row_bytes + used,
        "panel past the weights"
    );
    assert!(
        i32::try_from(PANEL * row_bytes).is_ok(),
        "rows too long for gather offsets"
    );
    assert!(out.rows == rows && out.fits(n), "output too short");
}

/// Runs `$f::<N>(args.., t0, out)` over all tokens in tiles of `$tile`.
macro_rules! tiles {
    ($n:expr, $tile:expr, |$t0:ident, $len:ident| $call:expr) => {{
        let mut $t0 = 0;
        while $t0 < $n {
            let $len = ($n - $t0).min($tile);
            $call;
            $t0 += $len;
        }
    }};
}

/// Dispatches a tile of `len` tokens to the const-generic kernel.
macro_rules! by_len {
    ($len:expr, $f:ident::<$q8:ident>, ($($arg:expr),*)) => {
        match $len {
            1 => $f::<$q8, 1>($($arg),*),
            2 => $f::<$q8, 2>($($arg),*),
            3 => $f::<$q8, 3>($($arg),*),
            4 => $f::<$q8, 4>($($arg),*),
            5 => $f::<$q8, 5>($($arg),*),
            6 => $f::<$q8, 6>($($arg),*),
            7 => $f::<$q8, 7>($($arg),*),
            _ => $f::<$q8, 8>($($arg),*),
        }
    };
}

/// Dots of `rows` (1..=16) consecutive weight rows (`w` starts at the
/// first, `row_bytes` apart, `nb` blocks each) with every activation row,
/// written to `out` (token `t`, row `r` at `t * ld + r`).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI.
///
/// # Panics
/// If `w`, an activation row or `out` is too short, or `rows` is not in
/// 1..=16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
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
    let idx = row_offsets(rows, row_bytes);
    // SAFETY: features by the caller; lengths asserted above.
    unsafe {
        match format {
            Format::Q4_0 => panel_of::<false>(w, idx, row_bytes, rows, xs, sums, out),
            Format::Q8_0 => panel_of::<true>(w, idx, row_bytes, rows, xs, sums, out),
        }
    }
}

/// [`panel`] for one format.
///
/// # Safety
/// As [`panel`] checked.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn panel_of<const Q8: bool>(
    w: &[u8],
    idx: __m512i,
    row_bytes: usize,
    rows: usize,
    xs: &[&[u8]],
    sums: &ActSums,
    out: Out,
) {
    let (n, nb) = (xs.len(), sums.nb);
    if n <= DIRECT_MAX {
        // SAFETY: as [`panel`] checked.
        tiles!(n, DIRECT_MAX, |t0, len| unsafe {
            by_len!(
                len,
                direct::<Q8>,
                (w, idx, rows, row_bytes, xs, sums, t0, out)
            )
        });
        return;
    }
    with_panel_buffer(9 * nb, |packed| {
        let bytes = if Q8 { Format::Q8_0 } else { Format::Q4_0 }.block_bytes();
        if !Q8 && is_x86_feature_detected!("avx512vbmi") {
            // SAFETY: VBMI detected, the rest by the caller; `panel`
            // checked that the rows' nb blocks lie inside `w`.
            unsafe { super::avx512s::pack_q4_0(w.as_ptr(), row_bytes, rows, nb, packed) };
        } else {
            for i in 0..nb {
                if Q8 {
                    for r in 0..rows {
                        // The same block one panel down to L2 (as the
                        // k-quant panels do; hints).
                        let p = w.as_ptr().wrapping_add((r + PANEL) * row_bytes + i * bytes);
                        _mm_prefetch::<_MM_HINT_T1>(p.cast());
                        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(bytes - 1).cast());
                    }
                } else if i % (64 / bytes) == 0 {
                    for r in 0..rows {
                        // Four blocks ahead in each row (a hint).
                        let p = w.as_ptr().wrapping_add(r * row_bytes + (i + 4) * bytes);
                        _mm_prefetch::<_MM_HINT_T0>(p.cast());
                    }
                }
                // SAFETY: as [`panel`] checked.
                let (q, d) = unsafe {
                    if Q8 {
                        unpack_q8_0(w.as_ptr(), row_bytes, rows, i)
                    } else {
                        gather::<Q8>(w.as_ptr(), idx, i)
                    }
                };
                packed[9 * i..9 * i + 8].copy_from_slice(&q);
                packed[9 * i + 8] = _mm512_castps_si512(d);
            }
        }
        let next = NextPanel::new(w, row_bytes, n);
        // SAFETY: as above; packed holds 9 * nb registers.
        tiles!(n, TILE, |t0, len| unsafe {
            next.prefetch(t0 / TILE);
            by_len!(len, from_packed::<Q8>, (packed, xs, sums, t0, out))
        });
    });
}

/// The panel after a packed one (16 rows down, usually this thread's next
/// work unit), prefetched into L2 a slice per token tile while the packed
/// panel is being used, so packing it does not wait on memory.
#[derive(Clone, Copy)]
pub(super) struct NextPanel {
    ptr: *const u8,
    len: usize,
    per_tile: usize,
}

impl NextPanel {
    pub(super) fn new(w: &[u8], row_bytes: usize, n_tokens: usize) -> NextPanel {
        let len = PANEL * row_bytes;
        NextPanel {
            ptr: w.as_ptr().wrapping_add(len),
            len,
            per_tile: len.div_ceil(n_tokens.div_ceil(TILE).max(1)).div_ceil(64) * 64,
        }
    }

    /// Prefetches the share of token tile `k`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) fn prefetch(self, k: usize) {
        let end = ((k + 1) * self.per_tile).min(self.len);
        for off in (k * self.per_tile..end).step_by(64) {
            // A hint: an address past the mapping is harmless.
            _mm_prefetch::<_MM_HINT_T1>(self.ptr.wrapping_add(off).cast());
        }
    }
}

/// How a float weight row is stored.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum FloatRow {
    F32,
    F16,
    BF16,
}

/// 16 weights from `p` (element `i` onward) as f32.
///
/// # Safety
/// AVX-512 F must be present and the 16 elements readable.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn load16(kind: FloatRow, p: *const u8, i: usize) -> __m512 {
    // SAFETY: by the caller.
    unsafe {
        match kind {
            FloatRow::F32 => _mm512_loadu_ps(p.cast::<f32>().add(i)),
            FloatRow::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * i).cast())),
            FloatRow::BF16 => {
                let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(2 * i).cast()));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
            }
        }
    }
}

/// One float weight element as f32.
pub(super) fn load1(kind: FloatRow, w: &[u8], i: usize) -> f32 {
    match kind {
        FloatRow::F32 => f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]),
        FloatRow::F16 => half::f16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32(),
        FloatRow::BF16 => half::bf16::from_le_bytes([w[2 * i], w[2 * i + 1]]).to_f32(),
    }
}

/// Float weight rows dotted with f32 activation rows: four 16-lane fused
/// multiply-add chains over 64-element steps, a fixed sum of the chains and
/// lanes, then the tail in order. The same steps for every (row, token),
/// so results do not depend on the batch.
#[target_feature(enable = "avx512f,avx512bw")]
fn dot_float(kind: FloatRow, ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    let wbytes = if kind == FloatRow::F32 { 4 } else { 2 };
    for (ri, w) in ws.iter().enumerate() {
        for (t, x) in xs.iter().enumerate() {
            assert!(
                w.len() >= wbytes * n && x.len() >= 4 * n,
                "float row too short"
            );
            let xp = x.as_ptr().cast::<f32>();
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            // SAFETY (loads): i + 16 <= n, and both rows hold n values
            // (asserted above); unaligned loads.
            while i + 64 <= n {
                for (k, a) in acc.iter_mut().enumerate() {
                    let (wv, xv) = unsafe {
                        (
                            load16(kind, w.as_ptr(), i + 16 * k),
                            _mm512_loadu_ps(xp.add(i + 16 * k)),
                        )
                    };
                    *a = _mm512_fmadd_ps(wv, xv, *a);
                }
                i += 64;
            }
            while i + 16 <= n {
                let (wv, xv) = unsafe { (load16(kind, w.as_ptr(), i), _mm512_loadu_ps(xp.add(i))) };
                acc[0] = _mm512_fmadd_ps(wv, xv, acc[0]);
                i += 16;
            }
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            let mut s = _mm512_reduce_add_ps(sum);
            while i < n {
                let xi = f32::from_le_bytes([x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]]);
                s += load1(kind, w, i) * xi;
                i += 1;
            }
            out[ri * xs.len() + t] = s;
        }
    }
}

/// f32 weight rows (the MoE routers) dotted with f32 activation rows; see
/// `dot_float`.
///
/// # Safety
/// The CPU must support AVX-512 F and BW. Every row must hold `n` values;
/// `out.len() >= ws.len() * xs.len()`.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dot_f32(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    dot_float(FloatRow::F32, ws, xs, n, out)
}

/// f16 weight rows dotted with f32 activation rows, as [`dot_f32`].
///
/// # Safety
/// As for [`dot_f32`].
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dot_f16(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    dot_float(FloatRow::F16, ws, xs, n, out)
}

/// bf16 weight rows dotted with f32 activation rows, as [`dot_f32`].
///
/// # Safety
/// As for [`dot_f32`].
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn dot_bf16(ws: &[&[u8]], xs: &[&[u8]], n: usize, out: &mut [f32]) {
    dot_float(FloatRow::BF16, ws, xs, n, out)
}

/// `roundf` (half away from zero) of each lane, NaN and infinities kept.
#[inline]
#[target_feature(enable = "avx512f")]
fn round_away(y: __m512) -> __m512 {
    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
    // Exact: y - trunc(y) is representable.
    let frac = _mm512_sub_ps(y, t);
    let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(abs_ps(frac), _mm512_set1_ps(0.5));
    // copysign(1, y)
    let one = _mm512_or_si512(
        _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(i32::MIN)),
        _mm512_castps_si512(_mm512_set1_ps(1.0)),
    );
    _mm512_mask_add_ps(t, up, t, _mm512_castsi512_ps(one))
}

/// `|v|` of each lane (the sign bit cleared; NaN stays NaN).
#[inline]
#[target_feature(enable = "avx512f")]
fn abs_ps(v: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_and_si512(
        _mm512_castps_si512(v),
        _mm512_set1_epi32(0x7fff_ffff),
    ))
}

/// Q8_0 activation blocks of `x` (a multiple of 32 values) into `out`,
/// byte-identical to `scalar::quantize_acts` (ggml's reference
/// quantizer): the scale from the largest magnitude (NaN ignored),
/// `roundf`, and C's truncating `(int8_t)` cast.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
///
/// # Panics
/// If `out` is not 34 bytes per 32 values.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    assert!(
        x.len().is_multiple_of(32) && out.len() == x.len() / 32 * Q8_0_BYTES,
        "q8_0: bad row sizes"
    );
    for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        // SAFETY: xb holds 32 f32 values.
        let (a, b) = unsafe {
            (
                _mm512_loadu_ps(xb.as_ptr()),
                _mm512_loadu_ps(xb.as_ptr().add(16)),
            )
        };
        // max(|v|, m) keeps m when |v| is NaN, as the scalar fold does.
        let m = _mm512_max_ps(abs_ps(b), _mm512_max_ps(abs_ps(a), _mm512_setzero_ps()));
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: __m512| {
            let r = round_away(_mm512_mul_ps(v, _mm512_set1_ps(id)));
            // Truncating conversion: NaN / out of range give i32::MIN, whose
            // low byte is what C's (int8_t) keeps.
            _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r))
        };
        ob[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        // SAFETY: ob[2..34] is 32 writable bytes.
        unsafe {
            _mm_storeu_si128(ob.as_mut_ptr().add(2).cast(), q(a));
            _mm_storeu_si128(ob.as_mut_ptr().add(18).cast(), q(b));
        }
    }
}

/// Q8_K activation blocks of `x` (a multiple of 256 values) into `out`,
/// byte-identical to `scalar::quantize_acts`: the signed value of largest
/// magnitude (first one), `nearest_int` by the same float trick, and the
/// 16-element sums.
///
/// # Safety
/// The CPU must support AVX-512 F and BW.
///
/// # Panics
/// If `out` is not 292 bytes per 256 values.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn quantize_q8k(x: &[f32], out: &mut [u8]) {
    const Q8K: usize = 292;
    assert!(
        x.len().is_multiple_of(256) && out.len() == x.len() / 256 * Q8K,
        "q8_k: bad row sizes"
    );
    for (xb, ob) in x.chunks_exact(256).zip(out.chunks_exact_mut(Q8K)) {
        // SAFETY: xb holds 256 f32 values (16 loads of 16).
        let v: [__m512; 16] =
            std::array::from_fn(|k| unsafe { _mm512_loadu_ps(xb.as_ptr().add(16 * k)) });
        let mut m = _mm512_setzero_ps();
        for vk in &v {
            m = _mm512_max_ps(abs_ps(*vk), m);
        }
        // NaN is ignored above, so amax is a number >= 0.
        let amax = _mm512_reduce_max_ps(m);
        ob.fill(0);
        if amax == 0.0 {
            continue;
        }
        // The first element of that magnitude, as the scalar scan keeps.
        let max = xb.iter().copied().find(|f| f.abs() == amax).unwrap_or(amax);
        let iscale = -127.0 / max;
        for (k, vk) in v.iter().enumerate() {
            // nearest_int: the bits of (x + 1.5 * 2^23), as the scalar does.
            let f = _mm512_add_ps(
                _mm512_mul_ps(_mm512_set1_ps(iscale), *vk),
                _mm512_set1_ps(12_582_912.0),
            );
            let i = _mm512_sub_epi32(
                _mm512_and_si512(_mm512_castps_si512(f), _mm512_set1_epi32(0x007f_ffff)),
                _mm512_set1_epi32(0x0040_0000),
            );
            let q = _mm512_cvtepi32_epi8(_mm512_min_epi32(i, _mm512_set1_epi32(127)));
            let sum = _mm512_reduce_add_epi32(_mm512_cvtepi8_epi32(q)) as i16;
            ob[260 + 2 * k..262 + 2 * k].copy_from_slice(&sum.to_le_bytes());
            // SAFETY: ob[4 + 16k..4 + 16k + 16] is in the block.
            unsafe { _mm_storeu_si128(ob.as_mut_ptr().add(4 + 16 * k).cast(), q) };
        }
        ob[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

// The panels, float dots and quantizers run in `tests/isa_paths.rs`, whose
// AVX-512 trials report themselves ignored on a CPU without AVX-512 VNNI.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_undo_to_the_signed_sum() {
        let mut s = 3u64;
        let x: Vec<u8> = (0..2 * Q8_0_BYTES)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Moderate f16 scales at each block's start, then quants.
                match i % Q8_0_BYTES {
                    0 => 0x00,
                    1 => 0x20,
                    _ => (s >> 33) as u8,
                }
            })
            .collect();
        let sums = ActSums::new(Format::Q8_0, &[&x], 2);
        let s0: i32 = x[2..34].iter().map(|&b| i32::from(b as i8)).sum();
        assert_eq!(sums.s[0], 128 * s0);
        assert_eq!(sums.d[1], half::f16::from_le_bytes([x[34], x[35]]).to_f32());
    }
}
