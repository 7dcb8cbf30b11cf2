//! Attention over an f16 KV cache for the query heads that share one KV
//! head: their scaled scores against every cached position, and the
//! probability-weighted sums of the cached values. Scalar and AVX2 (F16C
//! converts eight halves per instruction; the heads of a group share each
//! conversion, and independent accumulators hide the FMA latency). Every
//! score and output element is computed by the same operations in the same
//! order whatever the group or batch, so a sequence's attention does not
//! depend on what else is decoded with it.

use crate::isa::Isa;
use half::f16;

/// One KV head's cached rows, position after position: row `j` is the
/// `hd` halves at `j * hd` (the engine's cache layout, `[pos][hd]` per KV
/// head, so a head's positions are one contiguous stream).
#[derive(Clone, Copy, Debug)]
pub struct KvHead<'a> {
    rows: &'a [f16],
    hd: usize,
    n: usize,
}

impl<'a> KvHead<'a> {
    /// The rows of `rows`, `hd` halves each.
    ///
    /// # Panics
    /// If `hd` is 0 or `rows` is not whole rows.
    pub fn new(rows: &'a [f16], hd: usize) -> Self {
        assert!(
            hd > 0 && rows.len().is_multiple_of(hd),
            "KV rows of {hd} halves do not tile {} halves",
            rows.len()
        );
        KvHead {
            rows,
            hd,
            n: rows.len() / hd,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn row(&self, j: usize) -> &[f16] {
        &self.rows[j * self.hd..][..self.hd]
    }
}

/// `scores[h * n + j] = (q_h . k_j) * scale` for the `q.len() / hd` query
/// heads `q_h` (consecutive `hd` floats) and the rows `k_j` of `k`.
pub type ScoresF16 = fn(q: &[f32], k: KvHead<'_>, scale: f32, scores: &mut [f32]);
/// `out_h = sum over j of p[h * n + j] * v_j`, summed in position order
/// from zero, for the `out.len() / hd` heads.
pub type MixF16 = fn(p: &[f32], v: KvHead<'_>, out: &mut [f32]);

/// The two halves of attention for one ISA.
#[derive(Clone, Copy)]
pub struct AttnFns {
    pub scores: ScoresF16,
    pub mix: MixF16,
}

/// The group's heads, checked against each other and the buffers (the
/// cache's rows are whole by construction: [`KvHead::new`]).
fn heads(q_len: usize, kv: &KvHead<'_>, per_head: usize, other: usize) -> usize {
    assert!(
        kv.hd > 0 && q_len.is_multiple_of(kv.hd),
        "head sizes differ"
    );
    let g = q_len / kv.hd;
    assert_eq!(other, g * per_head, "buffer does not fit the heads");
    g
}

fn scores_scalar(q: &[f32], k: KvHead<'_>, scale: f32, scores: &mut [f32]) {
    heads(q.len(), &k, k.n, scores.len());
    for (qh, sh) in q
        .chunks_exact(k.hd)
        .zip(scores.chunks_exact_mut(k.n.max(1)))
    {
        for (j, s) in sh.iter_mut().enumerate().take(k.n) {
            *s = qh
                .iter()
                .zip(k.row(j))
                .map(|(a, b)| a * b.to_f32())
                .sum::<f32>()
                * scale;
        }
    }
}

fn mix_scalar(p: &[f32], v: KvHead<'_>, out: &mut [f32]) {
    heads(out.len(), &v, v.n, p.len());
    for (h, oh) in out.chunks_exact_mut(v.hd).enumerate() {
        oh.fill(0.0);
        for j in 0..v.n {
            let s = p[h * v.n + j];
            for (o, x) in oh.iter_mut().zip(v.row(j)) {
                *o += s * x.to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn scores_avx2(q: &[f32], k: KvHead<'_>, scale: f32, scores: &mut [f32]) {
    assert!(k.hd.is_multiple_of(8), "head size not a multiple of 8");
    let g = heads(q.len(), &k, k.n, scores.len());
    // SAFETY: handed out by `attention_fns` only when AVX2/FMA/F16C are
    // present; `heads` checked the buffers, every row is inside the
    // cache (`KvHead::new`), and hd is a multiple of 8.
    unsafe { x86::scores(q.as_ptr(), &k, g, scale, scores.as_mut_ptr()) }
}

#[cfg(target_arch = "x86_64")]
fn mix_avx2(p: &[f32], v: KvHead<'_>, out: &mut [f32]) {
    assert!(v.hd.is_multiple_of(8), "head size not a multiple of 8");
    let g = heads(out.len(), &v, v.n, p.len());
    // SAFETY: as above.
    unsafe { x86::mix(p.as_ptr(), &v, g, out.as_mut_ptr()) }
}

/// The attention pieces for `isa` and a head size (SIMD needs multiples of 8).
pub fn attention_fns(isa: Isa, head_dim: usize) -> AttnFns {
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && isa.available() && head_dim.is_multiple_of(8) {
        return AttnFns {
            scores: scores_avx2,
            mix: mix_avx2,
        };
    }
    let _ = (isa, head_dim);
    AttnFns {
        scores: scores_scalar,
        mix: mix_scalar,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::KvHead;
    use std::arch::x86_64::*;

    /// The lanes of `acc` summed: halves, then pairs, then the last two.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// [`hsum`] of four accumulators at once: lane h is `hsum(a[h])`, by
    /// the same additions in the same order (halves, then lanes 0 + 2 and
    /// 1 + 3, then those two), with the four heads' lanes transposed so
    /// each step serves all four.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum4(a: &[__m256; 4]) -> __m128 {
        // Written out: a closure here can be compiled out of line.
        let s0 = _mm_add_ps(
            _mm256_castps256_ps128(a[0]),
            _mm256_extractf128_ps::<1>(a[0]),
        );
        let s1 = _mm_add_ps(
            _mm256_castps256_ps128(a[1]),
            _mm256_extractf128_ps::<1>(a[1]),
        );
        let s2 = _mm_add_ps(
            _mm256_castps256_ps128(a[2]),
            _mm256_extractf128_ps::<1>(a[2]),
        );
        let s3 = _mm_add_ps(
            _mm256_castps256_ps128(a[3]),
            _mm256_extractf128_ps::<1>(a[3]),
        );
        let (t0, t1) = (_mm_unpacklo_ps(s0, s1), _mm_unpackhi_ps(s0, s1));
        let (t2, t3) = (_mm_unpacklo_ps(s2, s3), _mm_unpackhi_ps(s2, s3));
        // c_k: lane k of every head.
        let (c0, c1) = (_mm_movelh_ps(t0, t2), _mm_movehl_ps(t2, t0));
        let (c2, c3) = (_mm_movelh_ps(t1, t3), _mm_movehl_ps(t3, t1));
        _mm_add_ps(_mm_add_ps(c0, c2), _mm_add_ps(c1, c3))
    }

    /// Eight halves at `p` as floats.
    ///
    /// # Safety
    /// 16 bytes at `p` readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn halves(p: *const half::f16) -> __m256 {
        // SAFETY: by the caller; unaligned.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(p.cast()) })
    }

    /// Scores of `g` heads, in groups of 4, 2 and 1.
    ///
    /// # Safety
    /// AVX2/FMA/F16C present; `q` holds `g * hd` floats, `out` `g * n`;
    /// every row of `k` inside its cache; hd a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores(q: *const f32, k: &KvHead<'_>, g: usize, scale: f32, out: *mut f32) {
        let mut h = 0;
        while h < g {
            let left = g - h;
            // SAFETY: heads h.. are inside q and out (by the caller).
            unsafe {
                let (q, out) = (q.add(h * k.hd), out.add(h * k.n));
                h += match left {
                    4.. => scores_of::<4>(q, k, scale, out),
                    2 | 3 => scores_of::<2>(q, k, scale, out),
                    _ => scores_of::<1>(q, k, scale, out),
                };
            }
        }
    }

    /// `G` heads' scores, two positions at a time: per position and head
    /// one accumulator summing `q[i..i + 8] * k[i..i + 8]` over i in
    /// order, then [`hsum`], then the scale.
    ///
    /// # Safety
    /// As [`scores`], for `G` heads.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores_of<const G: usize>(
        q: *const f32,
        k: &KvHead<'_>,
        scale: f32,
        out: *mut f32,
    ) -> usize {
        let (hd, n) = (k.hd, k.n);
        let row = |j: usize| k.rows.as_ptr().wrapping_add(j * hd);
        let mut j = 0;
        while j < n {
            let two = j + 1 < n;
            let (r0, r1) = (row(j), row(if two { j + 1 } else { j }));
            let mut a0 = [_mm256_setzero_ps(); G];
            let mut a1 = [_mm256_setzero_ps(); G];
            for i in (0..hd).step_by(8) {
                // SAFETY: rows j and j + 1 (or j twice) are inside the
                // cache and i + 8 <= hd; heads < G inside q (the caller).
                unsafe {
                    let (k0, k1) = (halves(r0.add(i)), halves(r1.add(i)));
                    for h in 0..G {
                        let qv = _mm256_loadu_ps(q.add(h * hd + i));
                        a0[h] = _mm256_fmadd_ps(qv, k0, a0[h]);
                        a1[h] = _mm256_fmadd_ps(qv, k1, a1[h]);
                    }
                }
            }
            let (v0, v1) = (scaled_sums(&a0, scale), scaled_sums(&a1, scale));
            for h in 0..G {
                // SAFETY: j (and j + 1 when two) < n; heads < G in out.
                unsafe {
                    *out.add(h * n + j) = v0[h];
                    if two {
                        *out.add(h * n + j + 1) = v1[h];
                    }
                }
            }
            j += 2;
        }
        G
    }

    /// `hsum(a[h]) * scale` for each head; four heads' sums share one
    /// transposed reduction ([`hsum4`]: the same additions in the same
    /// order).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scaled_sums<const G: usize>(a: &[__m256; G], scale: f32) -> [f32; G] {
        let mut v = [0.0f32; G];
        if let Ok(a4) = <&[__m256; 4]>::try_from(&a[..]) {
            let s = _mm_mul_ps(hsum4(a4), _mm_set1_ps(scale));
            // SAFETY: stores four floats to `v`, which holds G = 4.
            unsafe { _mm_storeu_ps(v.as_mut_ptr(), s) };
        } else {
            for (vh, &ah) in v.iter_mut().zip(a) {
                *vh = hsum(ah) * scale;
            }
        }
        v
    }

    /// Weighted values of `g` heads, in groups of 4, 2 and 1.
    ///
    /// # Safety
    /// AVX2/FMA/F16C present; `p` holds `g * n` floats, `out` `g * hd`;
    /// every row of `v` inside its cache; hd a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn mix(p: *const f32, v: &KvHead<'_>, g: usize, out: *mut f32) {
        let mut h = 0;
        while h < g {
            let left = g - h;
            // SAFETY: heads h.. are inside p and out (by the caller).
            unsafe {
                let (p, out) = (p.add(h * v.n), out.add(h * v.hd));
                h += match left {
                    4.. => mix_of::<4>(p, v, out),
                    2 | 3 => mix_of::<2>(p, v, out),
                    _ => mix_of::<1>(p, v, out),
                };
            }
        }
    }

    /// `G` heads' weighted values, 16 elements at a time (8 at the end of
    /// an odd head size): per element one accumulator from zero, adding
    /// `p[j] * v_j` by FMA over the positions in order.
    ///
    /// # Safety
    /// As [`mix`], for `G` heads.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mix_of<const G: usize>(p: *const f32, v: &KvHead<'_>, out: *mut f32) -> usize {
        let (hd, n) = (v.hd, v.n);
        let row = |j: usize| v.rows.as_ptr().wrapping_add(j * hd);
        let mut i = 0;
        while i < hd {
            let wide = i + 16 <= hd;
            let mut a0 = [_mm256_setzero_ps(); G];
            let mut a1 = [_mm256_setzero_ps(); G];
            for j in 0..n {
                // SAFETY: row j is inside the cache and i + 8 (i + 16 when
                // wide) <= hd; heads < G inside p (the caller).
                unsafe {
                    let r = row(j).add(i);
                    let x0 = halves(r);
                    let x1 = if wide { halves(r.add(8)) } else { x0 };
                    for h in 0..G {
                        let s = _mm256_set1_ps(*p.add(h * n + j));
                        a0[h] = _mm256_fmadd_ps(s, x0, a0[h]);
                        a1[h] = _mm256_fmadd_ps(s, x1, a1[h]);
                    }
                }
            }
            for h in 0..G {
                // SAFETY: i + 8 (+ 8 when wide) <= hd, heads < G in out.
                unsafe {
                    _mm256_storeu_ps(out.add(h * hd + i), a0[h]);
                    if wide {
                        _mm256_storeu_ps(out.add(h * hd + i + 8), a1[h]);
                    }
                }
            }
            i += if wide { 16 } else { 8 };
        }
        G
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about -2..2.
    fn values(n: usize, seed: usize) -> impl Iterator<Item = f32> {
        (0..n).map(move |i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 250.0 - 2.0)
    }

    /// `len` halves of cache.
    fn cache(len: usize, seed: usize) -> Vec<f16> {
        values(len, seed).map(f16::from_f32).collect()
    }

    /// The per-head definitions the grouped kernels must reproduce bit for
    /// bit: on AVX2 one 8-lane FMA accumulator per dot (`dot_f16` as it
    /// was, then the scale) and `out += s * v` by FMA per position.
    #[cfg(target_arch = "x86_64")]
    mod per_head {
        use half::f16;
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn dot(q: &[f32], k: &[f16]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for i in (0..q.len()).step_by(8) {
                // SAFETY: test inputs, i + 8 <= len for both.
                let (a, b) = unsafe {
                    (
                        _mm256_loadu_ps(q.as_ptr().add(i)),
                        _mm_loadu_si128(k.as_ptr().add(i).cast()),
                    )
                };
                acc = _mm256_fmadd_ps(a, _mm256_cvtph_ps(b), acc);
            }
            let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }

        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn axpy(s: f32, v: &[f16], out: &mut [f32]) {
            let sv = _mm256_set1_ps(s);
            for i in (0..v.len()).step_by(8) {
                // SAFETY: test inputs, i + 8 <= len for both.
                unsafe {
                    let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i).cast()));
                    let o = _mm256_loadu_ps(out.as_ptr().add(i));
                    _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_fmadd_ps(sv, x, o));
                }
            }
        }
    }

    #[test]
    fn every_isa_matches_the_per_head_loops() {
        // Head sizes with and without a 16-wide tail, groups that take the
        // 4-, 2- and 1-head paths, odd and even position counts.
        for hd in [8, 64, 72] {
            for g in [1, 2, 3, 4, 5, 8] {
                for n in [0, 1, 2, 3, 17] {
                    let (kc, vc) = (cache(n * hd, 1), cache(n * hd, 2));
                    let kv = |c| KvHead::new(c, hd);
                    let q: Vec<f32> = values(g * hd, 3).collect();
                    let p: Vec<f32> = values(g * n, 4).map(|x| x * 0.25 + 0.5).collect();
                    let row = |c: &[f16], j: usize| c[j * hd..][..hd].to_vec();
                    let tag = format!("hd {hd}, {g} heads, {n} positions");
                    let mut want_s = vec![0.0f32; g * n];
                    let mut want_o = vec![0.0f32; g * hd];
                    (attention_fns(Isa::Scalar, hd).scores)(&q, kv(&kc), 0.125, &mut want_s);
                    (attention_fns(Isa::Scalar, hd).mix)(&p, kv(&vc), &mut want_o);
                    // The scalar path is the plain definition.
                    for h in 0..g {
                        for j in 0..n {
                            let d: f32 = q[h * hd..(h + 1) * hd]
                                .iter()
                                .zip(row(&kc, j))
                                .map(|(a, b)| a * b.to_f32())
                                .sum();
                            assert_eq!(want_s[h * n + j], d * 0.125, "{tag}");
                        }
                        let mut o = vec![0.0f32; hd];
                        for j in 0..n {
                            for (o, x) in o.iter_mut().zip(row(&vc, j)) {
                                *o += p[h * n + j] * x.to_f32();
                            }
                        }
                        assert_eq!(want_o[h * hd..(h + 1) * hd], o[..], "{tag}");
                    }
                    for isa in Isa::ALL.into_iter().filter(|i| i.available()) {
                        let f = attention_fns(isa, hd);
                        let mut s = vec![f32::NAN; g * n];
                        let mut o = vec![f32::NAN; g * hd];
                        (f.scores)(&q, kv(&kc), 0.125, &mut s);
                        (f.mix)(&p, kv(&vc), &mut o);
                        for (a, b) in s.iter().zip(&want_s) {
                            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{isa} {tag}");
                        }
                        for (a, b) in o.iter().zip(&want_o) {
                            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{isa} {tag}");
                        }
                        #[cfg(target_arch = "x86_64")]
                        if matches!(isa, Isa::Avx2 | Isa::Avx512) {
                            for h in 0..g {
                                let qh = &q[h * hd..(h + 1) * hd];
                                let mut oh = vec![0.0f32; hd];
                                for j in 0..n {
                                    // SAFETY: the ISA is available (filter above).
                                    let d = unsafe { per_head::dot(qh, &row(&kc, j)) };
                                    assert_eq!(
                                        s[h * n + j].to_bits(),
                                        (d * 0.125).to_bits(),
                                        "{tag}"
                                    );
                                    // SAFETY: as above.
                                    unsafe { per_head::axpy(p[h * n + j], &row(&vc, j), &mut oh) };
                                }
                                let got: Vec<u32> = o[h * hd..(h + 1) * hd]
                                    .iter()
                                    .map(|x| x.to_bits())
                                    .collect();
                                let want: Vec<u32> = oh.iter().map(|x| x.to_bits()).collect();
                                assert_eq!(got, want, "{isa} {tag}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "KV rows of 16 halves do not tile 100 halves")]
    fn partial_rows_are_refused() {
        KvHead::new(&[f16::ZERO; 100], 16);
    }

    #[test]
    fn a_view_holds_its_rows() {
        let c = cache(3 * 16, 5);
        let k = KvHead::new(&c, 16);
        assert_eq!((k.len(), k.is_empty()), (3, false));
        assert_eq!(k.row(2), &c[32..48]);
        assert!(KvHead::new(&[], 16).is_empty());
    }
}
