//! Cross-check of the scalar reference against llama.cpp's ggml itself.
//!
//! `tests/data/ggml_fixture.bin` was written by the C program listed in
//! `tests/data/README.md`, linked against the reference build's
//! `libggml-base.so`/`libggml-cpu.so`. For every weight type it holds ggml's
//! quantized bytes (`ggml_quantize_chunk`, no imatrix), hashes of ggml's
//! dequantized rows, ggml's reference activation rows (`*_ref` quantizers) and
//! the CPU backend's (SIMD) ones, and dot products from ggml's exported
//! generic scalar kernels (`ggml_vec_dot_*_generic`; for F32/F16/BF16 the
//! non-SIMD formula, f32 products summed in double) and from the CPU backend's
//! SIMD `vec_dot`. The inputs are regenerated here by the same PRNG.

use lfm_kernels::scalar::{dequantize_row, quantize_acts, quantize_row, vec_dot};
use lfm_kernels::{ActType, WeightType};

static FIXTURE: &[u8] = include_bytes!("data/ggml_fixture.bin");

/// xorshift64*, as in the generator.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        self.0 = s;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / 16_777_216.0
    }

    fn sample(&mut self, kind: usize) -> f32 {
        match kind {
            0 => {
                let (a, b, c, d) = (self.unit(), self.unit(), self.unit(), self.unit());
                a + b + c + d - 2.0
            }
            1 => 2.0 * self.unit() - 1.0,
            2 => {
                let t = 2.0 * self.unit() - 1.0;
                t * t * t * 4.0
            }
            3 => self.unit() + 0.25,
            _ => {
                let u = self.unit();
                let v = 2.0 * self.unit() - 1.0;
                if u < 0.875 { 0.0 } else { v }
            }
        }
    }
}

fn pow2(e: i32) -> f32 {
    f32::from_bits(((127 + e) as u32) << 23)
}

fn gen_row(seed: u64, r: usize, out: &mut [f32]) {
    let mut rng = Rng(seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((r as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(1));
    let s = pow2((r % 16) as i32 - 10);
    for v in out {
        *v = rng.sample(r % 5) * s;
    }
}

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn f32_hash(v: &[f32]) -> u64 {
    fnv1a(v.iter().flat_map(|x| x.to_le_bytes()))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn u32(&mut self) -> usize {
        u32::from_le_bytes(self.take(4).try_into().unwrap()) as usize
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn f32s(&mut self, n: usize) -> Vec<f32> {
        self.take(4 * n)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn name(&mut self) -> &'a str {
        let n = self.take(1)[0] as usize;
        std::str::from_utf8(self.take(n)).unwrap()
    }
}

fn weight_type(name: &str) -> WeightType {
    *WeightType::ALL
        .iter()
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .unwrap_or_else(|| panic!("unknown ggml type {name}"))
}

/// Deviation allowed between two f32 accumulations of the same products in
/// different orders (ggml's SIMD kernels, with FMA): `rel` of the result plus
/// the rounding of partial sums, bounded relative to `magnitude` = Σ|w_i a_i|.
fn close(ours: f32, theirs: f32, magnitude: f32, rel: f32) -> bool {
    (ours - theirs).abs() <= rel * theirs.abs() + 1e-5 * magnitude
}

/// Σ|w_i a_i| over the f32 views of a weight row and an activation row.
fn magnitude(ty: WeightType, w: &[u8], a: &[u8], n: usize) -> f32 {
    let mut wf = vec![0.0; n];
    dequantize_row(ty, w, &mut wf);
    let af = act_values(ty.act_type(), a, n);
    wf.iter().zip(&af).map(|(x, y)| (x * y).abs()).sum()
}

/// The f32 values an activation row stands for (`d * q` per element).
fn act_values(ty: ActType, a: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    match ty {
        ActType::F32 => dequantize_row(WeightType::F32, a, &mut out),
        ActType::F16 => dequantize_row(WeightType::F16, a, &mut out),
        ActType::BF16 => dequantize_row(WeightType::BF16, a, &mut out),
        ActType::Q8_0 => dequantize_row(WeightType::Q8_0, a, &mut out),
        ActType::Q8_1 => {
            for (blk, o) in a.chunks_exact(36).zip(out.chunks_exact_mut(32)) {
                let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                for (v, &q) in o.iter_mut().zip(&blk[4..]) {
                    *v = d * f32::from(q as i8);
                }
            }
        }
        ActType::Q8K => {
            for (blk, o) in a.chunks_exact(292).zip(out.chunks_exact_mut(256)) {
                let d = f32::from_le_bytes(blk[..4].try_into().unwrap());
                for (v, &q) in o.iter_mut().zip(&blk[4..260]) {
                    *v = d * f32::from(q as i8);
                }
            }
        }
    }
    out
}

#[test]
fn matches_ggml() {
    let mut rd = Reader(FIXTURE);
    assert_eq!(rd.take(8), b"LFMKFIX1");
    let (rows, cols, n_act, bulk_rows, n_types) =
        (rd.u32(), rd.u32(), rd.u32(), rd.u32(), rd.u32());
    let w = rd.f32s(rows * cols);
    let x = rd.f32s(n_act * cols);

    // The generator's inputs, rebuilt: a check on the PRNG mirror.
    let mut first = vec![0.0; cols];
    gen_row(1, 0, &mut first);
    assert_eq!(first, w[..cols], "PRNG mirror diverged from the generator");
    let mut x0 = vec![0.0; cols];
    gen_row(5, 10, &mut x0);
    assert_eq!(x0, x[..cols]);
    let mut bulk = vec![0.0; bulk_rows * cols];
    for (r, row) in bulk.chunks_exact_mut(cols).enumerate() {
        gen_row(7, r, row);
    }

    let mut report = Vec::new();
    for _ in 0..n_types {
        let ty = weight_type(rd.name());
        let act = ty.act_type();
        assert!(rd.name().eq_ignore_ascii_case(act.name()));
        let (rb, arb) = (rd.u32(), rd.u32());
        assert_eq!((rb, arb), (ty.row_bytes(cols), act.row_bytes(cols)));

        // Quantized bytes, row by row.
        let q = rd.take(rows * rb);
        let mut ours = vec![0u8; rb];
        for r in 0..rows {
            quantize_row(ty, &w[r * cols..(r + 1) * cols], &mut ours);
            if let Some(i) = ours.iter().zip(&q[r * rb..]).position(|(a, b)| a != b) {
                panic!(
                    "{ty:?} row {r}: quantized byte {i} differs from ggml ({} vs {})",
                    ours[i],
                    q[r * rb + i]
                );
            }
        }
        // Dequantized values of ggml's bytes.
        let mut deq = vec![0.0f32; cols];
        for r in 0..rows {
            let want = rd.u64();
            dequantize_row(ty, &q[r * rb..(r + 1) * rb], &mut deq);
            assert_eq!(
                f32_hash(&deq),
                want,
                "{ty:?} row {r}: dequantized values differ from ggml"
            );
        }
        // Activation rows.
        let aref = rd.take(n_act * arb);
        let acpu = rd.take(n_act * arb);
        let mut a = vec![0u8; arb];
        for t in 0..n_act {
            quantize_acts(act, &x[t * cols..(t + 1) * cols], &mut a);
            assert_eq!(
                a,
                aref[t * arb..(t + 1) * arb],
                "{act:?} activations row {t} differ from ggml's reference quantizer"
            );
        }
        // ggml's x86 CPU backend converts Q8_0/Q8_1 activations with SIMD code
        // that rounds ties to even (and scales by 127/max rather than
        // 1/(max/127)); the reference rounds ties away from zero. The third
        // activation row is built of exact ties to pin that difference down.
        let simd_differs = |t: usize| aref[t * arb..(t + 1) * arb] != acpu[t * arb..(t + 1) * arb];
        assert!(
            !simd_differs(0) && !simd_differs(1),
            "{act:?}: SIMD activations differ on random data"
        );
        let ties_differ = simd_differs(2);
        assert_eq!(
            ties_differ,
            matches!(act, ActType::Q8_0 | ActType::Q8_1),
            "{act:?}: tie rounding"
        );

        // Dots: bit-identical to ggml's generic kernels, close to its SIMD ones.
        let generic = rd.f32s(rows * n_act);
        let simd = rd.f32s(rows * n_act);
        let mut worst_simd = 0.0f32;
        for r in 0..rows {
            for t in 0..n_act {
                let (wr, ar) = (&q[r * rb..(r + 1) * rb], &aref[t * arb..(t + 1) * arb]);
                let ours = vec_dot(ty, wr, ar, cols);
                let (g, s) = (generic[r * n_act + t], simd[r * n_act + t]);
                assert_eq!(
                    ours.to_bits(),
                    g.to_bits(),
                    "{ty:?} row {r} act {t}: {ours} vs ggml generic {g}"
                );
                let mag = magnitude(ty, wr, ar, cols);
                assert!(
                    close(ours, s, mag, 1e-4),
                    "{ty:?} row {r} act {t}: {ours} vs ggml SIMD {s}"
                );
                worst_simd = worst_simd.max((ours - s).abs() / mag.max(f32::MIN_POSITIVE));
            }
        }

        // Bulk rows: hashes of everything, dots per row.
        let want_q = rd.u64();
        let want_deq = rd.u64();
        let bulk_dots = rd.f32s(bulk_rows);
        let mut bq = vec![0u8; bulk_rows * rb];
        for (row, out) in bulk.chunks_exact(cols).zip(bq.chunks_exact_mut(rb)) {
            quantize_row(ty, row, out);
        }
        assert_eq!(
            fnv1a(bq.iter().copied()),
            want_q,
            "{ty:?}: bulk quantized bytes differ from ggml"
        );
        let mut bdeq = vec![0.0f32; bulk_rows * cols];
        for (src, dst) in bq.chunks_exact(rb).zip(bdeq.chunks_exact_mut(cols)) {
            dequantize_row(ty, src, dst);
        }
        assert_eq!(
            f32_hash(&bdeq),
            want_deq,
            "{ty:?}: bulk dequantized values differ from ggml"
        );
        let a0 = &aref[..arb];
        for (r, wr) in bq.chunks_exact(rb).enumerate() {
            let ours = vec_dot(ty, wr, a0, cols);
            let g = bulk_dots[r];
            assert_eq!(
                ours.to_bits(),
                g.to_bits(),
                "{ty:?} bulk row {r}: {ours} vs ggml generic {g}"
            );
        }
        report.push(format!(
            "{:5} bytes, values and {} dots identical; worst |ours - SIMD| / sum|w*a| = {worst_simd:.1e}; SIMD activations differ on ties: {ties_differ}",
            ty.name(),
            rows * n_act + bulk_rows
        ));
    }
    assert!(rd.0.is_empty(), "trailing fixture bytes");
    eprintln!("{}", report.join("\n"));
}
