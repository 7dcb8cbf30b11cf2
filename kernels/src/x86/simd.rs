//! AVX2 building blocks shared by the x86 kernels: bounds-checked unaligned
//! loads from row bytes, f16 block fields, the weight prefetch, horizontal
//! sums and the 2-row x 1..4-token tile dispatch. Every function carries the
//! kernels' base features so it inlines into them.

use std::arch::x86_64::*;

/// How far ahead of the current block weight rows are prefetched.
const PREFETCH_AHEAD: usize = 4096;

/// 32 bytes of `p` from `at`, unaligned.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn load256(p: &[u8], at: usize) -> __m256i {
    assert!(at + 32 <= p.len(), "load past the end of a block");
    // SAFETY: `at..at + 32` is inside `p` (checked above); the load is unaligned.
    unsafe { _mm256_loadu_si256(p.as_ptr().add(at).cast()) }
}

/// 16 bytes of `p` from `at`, unaligned.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn load128(p: &[u8], at: usize) -> __m128i {
    assert!(at + 16 <= p.len(), "load past the end of a block");
    // SAFETY: `at..at + 16` is inside `p` (checked above); the load is unaligned.
    unsafe { _mm_loadu_si128(p.as_ptr().add(at).cast()) }
}

/// The little-endian u32 at `p[at..at + 4]`.
#[inline]
pub(super) fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// The f16 at `p[at..at + 2]`, widened exactly.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16_at(p: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([p[at], p[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// The two consecutive f16 at `p[at..at + 4]` (a block's `d` and `m` or `s`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16_pair(p: &[u8], at: usize) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(u32_at(p, at) as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

/// Hints the cache to fetch `row` a few KiB past `at`. Rows lie back to back
/// in the mapping, so past a row's end is the next row's start; a prefetch
/// is only a hint, and an address past the mapping is harmless.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn prefetch(row: &[u8], at: usize) {
    _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().wrapping_add(at + PREFETCH_AHEAD).cast());
}

/// The sum of the 8 lanes, in a fixed order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// The 32 nibbles of 16 packed bytes as bytes 0..=15: elements 0..16 are
/// the low nibbles, 16..32 the high ones (ggml's 32-wide packing).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn nibbles(qs: __m128i) -> __m256i {
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(qs), qs);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// Byte `i` is 0xff where bit `i` of `bits` is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn bytes_from_bits(bits: u32) -> __m256i {
    // Byte i gets a copy of the source byte holding bit i ...
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    // ... with every bit but bit i % 8 forced on: all ones iff bit i is set.
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

/// Calls `$rows::<$($generic,)* R, N>($ws, $xs, $out)` for the tile shape
/// of the call: 1..=2 weight rows, 1..=4 activation rows.
macro_rules! tile {
    ($rows:ident::<$($generic:ty),*>($ws:expr, $xs:expr, $out:expr)) => {
        match ($ws.len(), $xs.len()) {
            (1, 1) => $rows::<$($generic,)* 1, 1>($ws, $xs, $out),
            (1, 2) => $rows::<$($generic,)* 1, 2>($ws, $xs, $out),
            (1, 3) => $rows::<$($generic,)* 1, 3>($ws, $xs, $out),
            (1, 4) => $rows::<$($generic,)* 1, 4>($ws, $xs, $out),
            (2, 1) => $rows::<$($generic,)* 2, 1>($ws, $xs, $out),
            (2, 2) => $rows::<$($generic,)* 2, 2>($ws, $xs, $out),
            (2, 3) => $rows::<$($generic,)* 2, 3>($ws, $xs, $out),
            (2, 4) => $rows::<$($generic,)* 2, 4>($ws, $xs, $out),
            (r, n) => panic!(
                "{} takes 1-2 weight rows and 1-4 activation rows, got {r} and {n}",
                stringify!($rows)
            ),
        }
    };
}
pub(super) use tile;

/// Checks a tile's rows: every weight row `bytes`-block aligned with the
/// first, every activation row at least as many `act_bytes` blocks, room for
/// every output. Returns the block count.
pub(super) fn check_tile(
    ws: &[&[u8]],
    xs: &[&[u8]],
    out: &[f32],
    bytes: usize,
    act_bytes: usize,
) -> usize {
    let nb = ws[0].len() / bytes;
    for w in ws {
        assert!(w.len() / bytes == nb, "weight rows differ in length");
    }
    for x in xs {
        assert!(
            x.len() >= nb * act_bytes,
            "activation row shorter than the weight row"
        );
    }
    assert!(out.len() >= ws.len() * xs.len(), "output too short");
    nb
}
