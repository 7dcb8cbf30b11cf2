//! Every kernel family the dispatcher hands out (AVX2, AVX-512 VNNI, NEON),
//! checked through the public dispatch API, one trial per (family, check,
//! weight type): products against the scalar reference (bit for bit where
//! the family promises it) for every token count and thread split, every
//! row-dot tile shape, extreme and raw blocks in padded rows, the activation
//! quantizers, the float dots, and the AVX-512 family against the AVX2 one,
//! whose equality the engine's size-based choice between them relies on.
//!
//! A family this CPU cannot run is reported *ignored*, with the reason, never
//! passed: a green run on an AVX2-only machine cannot be mistaken for an
//! AVX-512 check (`.ci/run` counts ignored trials as skipped in its closing
//! line). `LFM_REQUIRE_FAMILIES=avx2,avx512` makes such a skip a failure.
//!
//! A custom harness (libtest-mimic) because libtest has no run-time skip.

use lfm_kernels::dispatch::{
    act_type_for, avx2_up_to_tokens, dot_fn, family, family_kernel, kernel, quantize_activations,
    quantize_activations_on,
};
use lfm_kernels::isa::Isa;
use lfm_kernels::matmul::{Kernel, matmul};
use lfm_kernels::pool::ThreadPool;
use lfm_kernels::scalar;
use lfm_kernels::types::{ActType, WeightType};
use libtest_mimic::{Arguments, Trial};

/// A kernel family under test.
#[derive(Clone, Copy, Debug)]
struct Family {
    name: &'static str,
    isa: Isa,
    /// The AVX-512 stream kernels (`dispatch::stream_kernel`) for the types
    /// that have one, the `isa` family's for the rest.
    stream: bool,
    /// Matrices repacked at load (`dispatch::repacked_kernel`,
    /// `lfm_kernels::repack`): products of the types with a repacked
    /// layout (Q4_0, Q4_K, Q5_K).
    repacked: bool,
}

const FAMILIES: [Family; 5] = [
    Family {
        name: "avx2",
        isa: Isa::Avx2,
        stream: false,
        repacked: false,
    },
    Family {
        name: "avx512",
        isa: Isa::Avx512,
        stream: false,
        repacked: false,
    },
    Family {
        name: "avx512s",
        isa: Isa::Avx512,
        stream: true,
        repacked: false,
    },
    Family {
        name: "avx512r",
        isa: Isa::Avx512,
        stream: false,
        repacked: true,
    },
    Family {
        name: "neon",
        isa: Isa::Neon,
        stream: false,
        repacked: false,
    },
];

impl Family {
    /// Why this CPU cannot run the family's kernels, if it cannot.
    fn missing(self) -> Option<&'static str> {
        if self.isa != Isa::Neon && !cfg!(target_arch = "x86_64") {
            return Some("not an x86-64 CPU");
        }
        match self.isa {
            Isa::Avx2 if !Isa::Avx2.available() => Some("this CPU lacks AVX2/FMA/F16C"),
            // The AVX-512 family's quantized kernels (panels, VNNI tiles)
            // need VNNI; without it the AVX-512 path runs the AVX2 ones.
            Isa::Avx512 if !(Isa::Avx512.available() && has_vnni()) => {
                Some("this CPU lacks AVX-512 F/BW/VL/VNNI")
            }
            Isa::Avx512 if self.stream && !lfm_kernels::dispatch::has_stream() => {
                Some("this CPU lacks AVX-512 VBMI or GFNI")
            }
            Isa::Neon if !Isa::Neon.available() => Some("not an aarch64 CPU with NEON"),
            _ => None,
        }
    }

    /// The family's kernel for `ty`, whatever the token count (for the
    /// repacked family, of the matrix [`Family::weights`] gives).
    fn kernel(self, ty: WeightType) -> Kernel {
        if self.repacked
            && let Some(k) = lfm_kernels::dispatch::repacked_kernel(self.isa, ty)
        {
            return k;
        }
        if self.stream
            && let Some(k) = lfm_kernels::dispatch::stream_kernel(ty)
        {
            return k;
        }
        family_kernel(self.isa, ty)
    }

    /// Whether the family has a kernel of its own for `ty` (the stream
    /// family only for the types with a stream kernel).
    fn covers(self, ty: WeightType) -> bool {
        if self.repacked {
            return lfm_kernels::dispatch::repacked_kernel(Isa::Avx512, ty).is_some()
                || (!cfg!(target_arch = "x86_64") && ty == WeightType::Q4_0);
        }
        !self.stream || lfm_kernels::dispatch::stream_up_to_tokens(ty) > 0
    }

    #[cfg(target_arch = "x86_64")]
    fn is_x86(self) -> bool {
        matches!(self.isa, Isa::Avx2 | Isa::Avx512)
    }
}

fn has_vnni() -> bool {
    lfm_kernels::dispatch::has_vnni()
}

/// Our own LCG: the same cases everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = self.unit() * scale;
                if i % 61 == 0 { v * 6.0 } else { v }
            })
            .collect()
    }
}

/// Columns of most test matrices: two k-quant super-blocks, 16 legacy blocks.
const COLS: usize = 512;

/// Row lengths `products` tries for `ty`: one block, a few, many (65 legacy
/// blocks, 7 super-blocks), odd lengths for the float dots' tails.
fn widths(ty: WeightType) -> &'static [usize] {
    match ty.block_size() {
        256 => &[256, 512, 1792],
        32 => &[32, 224, 512, 2080],
        _ => &[15, 512, 1001],
    }
}
/// Weight rows: two 16-row units and a partial one (partial AVX2 groups).
const ROWS: usize = 37;
/// Activation rows available to the products.
const TOKENS: usize = 17;
/// Token counts tried: every tile remainder, both sides of the AVX2/AVX-512
/// crossover, the driver's few/many split.
const COUNTS: [usize; 11] = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17];

/// A weight matrix: quantized rows, each `stride` bytes apart (a stride
/// larger than the row, as a sub-matrix view has).
struct Matrix {
    ty: WeightType,
    cols: usize,
    bytes: Vec<u8>,
    stride: usize,
}

impl Matrix {
    fn row(&self, r: usize) -> &[u8] {
        &self.bytes[r * self.stride..r * self.stride + self.ty.row_bytes(self.cols)]
    }
}

fn quantized(ty: WeightType, rng: &mut Rng, pad: usize, cols: usize) -> Matrix {
    let row = ty.row_bytes(cols);
    let stride = row + pad;
    let mut bytes = vec![0xA5u8; ROWS * stride];
    for r in 0..ROWS {
        let x = rng.values(cols, 1.0);
        scalar::quantize_row(ty, &x, &mut bytes[r * stride..r * stride + row]);
    }
    Matrix {
        ty,
        cols,
        bytes,
        stride,
    }
}

/// Raw blocks: every bit pattern of quants and packed scales, with sane
/// f16 scales or (`extreme`, Q4_0/Q8_0 only) extreme ones (largest of both
/// signs, smallest normal, zero) and extreme quants, in padded rows.
fn raw(fam: Family, ty: WeightType, rng: &mut Rng, extreme: bool) -> Matrix {
    let cols = COLS;
    let extreme = extreme && matches!(ty, WeightType::Q4_0 | WeightType::Q8_0);
    let row = ty.row_bytes(cols);
    let panel = matches!(fam.kernel(ty), Kernel::Panel(_));
    let stride = row + if panel { ty.block_bytes() } else { 0 };
    let mut bytes: Vec<u8> = (0..ROWS * stride).map(|_| rng.byte()).collect();
    // Where each block's f16 scales sit.
    let d_at: &[usize] = match ty {
        WeightType::Q4_0 | WeightType::Q8_0 | WeightType::Q5_0 => &[0],
        WeightType::Q4_1 | WeightType::Q5_1 => &[0, 2],
        WeightType::Q4K | WeightType::Q5K => &[0, 2],
        WeightType::Q6K => &[208],
        WeightType::F32 | WeightType::F16 | WeightType::BF16 => unreachable!("no blocks"),
    };
    for r in 0..ROWS {
        for blk in bytes[r * stride..r * stride + row].chunks_exact_mut(ty.block_bytes()) {
            for &o in d_at {
                let d = if extreme {
                    [65504.0, -65504.0, 6.1e-5, 0.0][rng.next() as usize % 4]
                } else {
                    0.001 + f32::from(rng.byte()) * 1e-4
                };
                blk[o..o + 2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
            }
            if extreme {
                for b in &mut blk[2..] {
                    *b = [0x81, 0x7f, 0x00, 0xff][*b as usize % 4];
                }
            }
        }
    }
    Matrix {
        ty,
        cols,
        bytes,
        stride,
    }
}

/// Activation rows in the format `ty` pairs with, from values of `scale`.
fn activations(ty: WeightType, rng: &mut Rng, scale: f32, cols: usize) -> (Vec<u8>, usize) {
    let x = rng.values(TOKENS * cols, scale);
    let mut q = Vec::new();
    let row = quantize_activations(ty, &x, cols, &mut q);
    (q, row)
}

/// Extreme Q8_0 activation blocks (largest scales of both signs, quants
/// +-127, 0, -1), for the legacy types' extreme cases.
fn extreme_q8_0(rng: &mut Rng) -> (Vec<u8>, usize) {
    let row = ActType::Q8_0.row_bytes(COLS);
    let mut q = vec![0u8; TOKENS * row];
    for blk in q.chunks_exact_mut(34) {
        let d = [65504.0, -65504.0, 6.1e-5, 0.0][rng.next() as usize % 4];
        blk[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        for b in &mut blk[2..] {
            *b = [0x81, 0x7f, 0x00, 0xff][rng.next() as usize % 4];
        }
    }
    (q, row)
}

/// What a family's product of weight row `w` and activation row `x` must be.
enum Want {
    /// These bits (NaN matches NaN).
    Bits(f32),
    /// Within `tol` of this value.
    Near(f32, f32),
}

fn want(fam: Family, ty: WeightType, w: &[u8], x: &[u8], cols: usize) -> Want {
    if act_type_for(ty) == ActType::F32 {
        // Float weights meet f32 activations (the scalar pairing rounds
        // them to the weight type): the exact sum, to rounding.
        let mut wd = vec![0.0f32; cols];
        scalar::dequantize_row(ty, w, &mut wd);
        let exact: f64 = wd
            .iter()
            .zip(x.chunks_exact(4))
            .map(|(&a, c)| f64::from(a) * f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .sum();
        return Want::Near(exact as f32, tolerance(ty, w, x, cols));
    }
    let reference = scalar::vec_dot(ty, w, x, cols);
    // The x86 k-quant kernels all compute the panels' order.
    #[cfg(target_arch = "x86_64")]
    if fam.is_x86() {
        use lfm_kernels::x86::avx2k::panel_order_dot;
        use lfm_kernels::x86::avx512k::KFormat;
        let format = match ty {
            WeightType::Q4K => Some(KFormat::Q4K),
            WeightType::Q5K => Some(KFormat::Q5K),
            WeightType::Q6K => Some(KFormat::Q6K),
            _ => None,
        };
        if let Some(f) = format {
            return Want::Bits(panel_order_dot(f, w, x, cols / 256));
        }
    }
    match ty {
        // Promised bit for bit on every family.
        WeightType::Q4_0 | WeightType::Q8_0 => Want::Bits(reference),
        // NEON reproduces ggml's order for every quantized type.
        _ if fam.isa == Isa::Neon && act_type_for(ty) != ActType::F32 => Want::Bits(reference),
        _ => Want::Near(reference, tolerance(ty, w, x, cols)),
    }
}

/// 16 f32 epsilons of the sum of the terms' magnitudes (dequantized): what
/// a different summation order may change.
fn tolerance(ty: WeightType, w: &[u8], x: &[u8], cols: usize) -> f32 {
    let mut wd = vec![0.0f32; cols];
    scalar::dequantize_row(ty, w, &mut wd);
    let xd: Vec<f32> = match act_type_for(ty) {
        ActType::F32 => x
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        // The activation formats' largest |value| bounds each term well enough.
        _ => vec![activation_bound(act_type_for(ty), x); cols],
    };
    let mag: f64 = wd
        .iter()
        .zip(&xd)
        .map(|(a, b)| f64::from(a.abs()) * f64::from(b.abs()))
        .sum();
    (16.0 * f64::from(f32::EPSILON) * mag.max(1.0)) as f32
}

/// The largest |activation| a quantized activation row can hold.
fn activation_bound(act: ActType, x: &[u8]) -> f32 {
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32().abs();
    match act {
        ActType::Q8_0 => x
            .chunks_exact(34)
            .map(|b| f16(b) * 127.0)
            .fold(0.0, f32::max),
        ActType::Q8_1 => x
            .chunks_exact(36)
            .map(|b| f16(b) * 127.0)
            .fold(0.0, f32::max),
        ActType::Q8K => x
            .chunks_exact(292)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).abs() * 128.0)
            .fold(0.0, f32::max),
        ActType::F32 | ActType::F16 | ActType::BF16 => unreachable!("float activations"),
    }
}

fn check(got: f32, want: &Want, what: &dyn Fn() -> String) {
    match *want {
        Want::Bits(w) => assert!(
            got.to_bits() == w.to_bits() || (got.is_nan() && w.is_nan()),
            "{}: {got} vs {w} (bits)",
            what()
        ),
        Want::Near(w, tol) => assert!(
            (got - w).abs() <= tol,
            "{}: {got} vs {w} (tolerance {tol:e})",
            what()
        ),
    }
}

/// The product of the first `n` activation rows through `k`, `[t][r]`.
fn product(
    pool: &ThreadPool,
    k: Kernel,
    m: &Matrix,
    acts: &(Vec<u8>, usize),
    n: usize,
) -> Vec<f32> {
    let mut y = vec![f32::NAN; n * ROWS];
    matmul(
        pool, k, &m.bytes, ROWS, m.cols, m.stride, &acts.0, acts.1, n, &mut y,
    );
    y
}

/// [`product`] through the family: the repacked family's on the matrix
/// repacked into panel order first (its rows as far apart as the file's).
fn product_of(
    pool: &ThreadPool,
    fam: Family,
    m: &Matrix,
    acts: &(Vec<u8>, usize),
    n: usize,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if fam.repacked {
        let r = lfm_kernels::dispatch::repack(m.ty, &m.bytes, ROWS, m.cols, m.stride)
            .expect("a type with a repacked layout");
        assert_eq!((r.rows(), r.row_bytes()), (ROWS, m.stride));
        let mut y = vec![f32::NAN; n * ROWS];
        matmul(
            pool,
            fam.kernel(m.ty),
            r.bytes(),
            ROWS,
            m.cols,
            m.stride,
            &acts.0,
            acts.1,
            n,
            &mut y,
        );
        return y;
    }
    product(pool, fam.kernel(m.ty), m, acts, n)
}

fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// The family's products of `m` and `acts` for every token count and
/// thread split: each (row, token) is the wanted value, and the same bits
/// whatever else shares the product.
fn products_of(fam: Family, m: &Matrix, acts: &(Vec<u8>, usize), label: &str) {
    let ty = m.ty;
    let act = |t: usize| &acts.0[t * acts.1..(t + 1) * acts.1];
    let wants: Vec<Vec<Want>> = (0..ROWS)
        .map(|r| {
            (0..TOKENS)
                .map(|t| want(fam, ty, m.row(r), act(t), m.cols))
                .collect()
        })
        .collect();
    let alone = product_of(&ThreadPool::new(1), fam, m, acts, TOKENS);
    for threads in [1, 2, 3] {
        let pool = ThreadPool::new(threads);
        for n in COUNTS {
            let y = product_of(&pool, fam, m, acts, n);
            for t in 0..n {
                for r in 0..ROWS {
                    let got = y[t * ROWS + r];
                    let what =
                        || format!("{ty:?} {label}, {threads} threads, {n} tokens: ({r}, {t})");
                    check(got, &wants[r][t], &what);
                    assert!(
                        same_bits(got, alone[t * ROWS + r]),
                        "{}: batch changed the bits",
                        what()
                    );
                }
            }
        }
    }
}

/// `products` and `extremes` for one family and type.
fn products(fam: Family, ty: WeightType) {
    let mut rng = Rng(5 + ty as u64);
    // Rows further apart than their size (a sub-matrix view) where the
    // kernel is a panel: row dots take whole strides as rows.
    let panel = matches!(fam.kernel(ty), Kernel::Panel(_));
    let pads = if panel {
        vec![0, ty.block_bytes()]
    } else {
        vec![0]
    };
    for pad in pads {
        for &cols in widths(ty) {
            let m = quantized(ty, &mut rng, pad, cols);
            let acts = activations(ty, &mut rng, 4.0, cols);
            products_of(
                fam,
                &m,
                &acts,
                &format!("quantized, {cols} columns, pad {pad}"),
            );
        }
    }
}

fn extremes(fam: Family, ty: WeightType) {
    let mut rng = Rng(77 + ty as u64);
    let legacy = matches!(ty, WeightType::Q4_0 | WeightType::Q8_0);
    for extreme in [false, true].into_iter().filter(|&e| !e || legacy) {
        let m = raw(fam, ty, &mut rng, extreme);
        let acts = if extreme && act_type_for(ty) == ActType::Q8_0 {
            extreme_q8_0(&mut rng)
        } else {
            activations(ty, &mut rng, 6.0, COLS)
        };
        products_of(
            fam,
            &m,
            &acts,
            if extreme {
                "extreme blocks"
            } else {
                "raw blocks"
            },
        );
    }
}

/// Every row-dot tile shape (1-2 weight rows x 1-4 tokens, any choice and
/// order of them) gives the bits the family's products give.
fn row_dots(fam: Family, ty: WeightType) {
    let mut rng = Rng(31 + ty as u64);
    let m = quantized(ty, &mut rng, 0, COLS);
    let acts = activations(ty, &mut rng, 4.0, COLS);
    let y = product(
        &ThreadPool::new(1),
        family_kernel(fam.isa, ty),
        &m,
        &acts,
        4,
    );
    let dot = dot_fn(fam.isa, ty);
    let xs: Vec<&[u8]> = acts.0.chunks_exact(acts.1).take(4).collect();
    for rows in [vec![3], vec![1, 0], vec![36, 5]] {
        for toks in [vec![0], vec![2, 1], vec![3, 0, 2], vec![1, 3, 0, 2]] {
            let ws: Vec<&[u8]> = rows.iter().map(|&r| m.row(r)).collect();
            let x: Vec<&[u8]> = toks.iter().map(|&t| xs[t]).collect();
            let mut out = vec![f32::NAN; ws.len() * x.len()];
            dot(&ws, &x, COLS, &mut out);
            for (i, &r) in rows.iter().enumerate() {
                for (j, &t) in toks.iter().enumerate() {
                    assert!(
                        same_bits(out[i * x.len() + j], y[t * ROWS + r]),
                        "{ty:?}: rows {rows:?} tokens {toks:?} changed ({r}, {t})"
                    );
                }
            }
        }
    }
}

/// The family's activation quantizer writes the scalar one's bytes, on any
/// thread split, extremes included.
fn quantizers(fam: Family, ty: WeightType) {
    let mut rng = Rng(3);
    let mut x = rng.values(37 * COLS, 5.0);
    x[3] = f32::NAN;
    x[700] = f32::INFINITY;
    x[1500] = -f32::INFINITY;
    x[2000] = 0.5;
    x[2001] = -2.5;
    x[3 * COLS..4 * COLS].fill(0.0);
    x[5 * COLS..5 * COLS + 32].fill(-0.0);
    x[6 * COLS + 7] = 1e-40;
    let mut want = Vec::new();
    let row = quantize_activations(ty, &x, COLS, &mut want);
    for threads in [1, 2, 3] {
        let pool = ThreadPool::new(threads);
        for n in [1, 5, 37] {
            let mut got = vec![0xAA; 3];
            let r = quantize_activations_on(&pool, fam.isa, ty, &x[..n * COLS], COLS, &mut got);
            assert_eq!(r, row);
            assert!(
                got == want[..n * row],
                "{ty:?}: {threads} threads, {n} rows differ from the scalar bytes"
            );
        }
    }
}

/// The float row dots against f64 sums, for lengths that hit every tail.
fn float_dots(fam: Family) {
    let mut rng = Rng(99);
    for n in [1, 15, 17, 64, 70, 200] {
        let w = rng.values(n, 4.0);
        let x = rng.values(n, 2.0);
        let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        for ty in [WeightType::F32, WeightType::F16, WeightType::BF16] {
            let (wb, wf): (Vec<u8>, Vec<f32>) = match ty {
                WeightType::F32 => (w.iter().flat_map(|v| v.to_le_bytes()).collect(), w.clone()),
                WeightType::F16 => (
                    w.iter()
                        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                        .collect(),
                    w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
                ),
                _ => (
                    w.iter()
                        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                        .collect(),
                    w.iter()
                        .map(|&v| half::bf16::from_f32(v).to_f32())
                        .collect(),
                ),
            };
            let expect: f64 = wf
                .iter()
                .zip(&x)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let mag: f64 = wf
                .iter()
                .zip(&x)
                .map(|(&a, &b)| f64::from((a * b).abs()))
                .sum();
            for tokens in 1..=4 {
                let xs = vec![xb.as_slice(); tokens];
                let mut out = vec![f32::NAN; 2 * tokens];
                dot_fn(fam.isa, ty)(&[&wb, &wb], &xs, n, &mut out);
                for (i, &got) in out.iter().enumerate() {
                    assert!(
                        (f64::from(got) - expect).abs() <= 1e-6 * mag.max(1.0),
                        "{ty:?} n={n} 2x{tokens} [{i}]: {got} vs {expect}"
                    );
                }
            }
        }
    }
}

/// The AVX-512 family's products are the AVX2 family's bits, for every
/// quantized type: what lets the engine pick either by token count
/// without a sequence's logits depending on its batch.
fn same_bits_as_avx2(ty: WeightType) {
    assert!(Isa::Avx2.available(), "an AVX-512 CPU without AVX2");
    let mut rng = Rng(123 + ty as u64);
    for extreme in [false, true] {
        let m = if extreme {
            raw(FAMILIES[0], ty, &mut rng, true)
        } else {
            quantized(ty, &mut rng, 0, COLS)
        };
        let acts = activations(ty, &mut rng, 4.0, COLS);
        let pool = ThreadPool::new(2);
        for n in COUNTS {
            let a = product(&pool, family_kernel(Isa::Avx512, ty), &m, &acts, n);
            let b = product(&pool, family_kernel(Isa::Avx2, ty), &m, &acts, n);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    same_bits(*x, *y),
                    "{ty:?} extreme={extreme} {n} tokens: (row {}, token {}) {x} on AVX-512 vs {y} on AVX2",
                    i % ROWS,
                    i / ROWS
                );
            }
        }
    }
}

/// The AVX-512 VNNI row tiles that dispatch does not hand out (the k-quant
/// ones) give their AVX2 twins' bits in every tile shape.
#[cfg(target_arch = "x86_64")]
fn vnni_tiles(ty: WeightType) {
    use lfm_kernels::x86::{kquants, legacy};
    type Tile = unsafe fn(&[&[u8]], &[&[u8]], &mut [f32]);
    let (avx2, vnni): (Tile, Tile) = match ty {
        WeightType::Q4_1 => (legacy::dot_q4_1_q8_1, legacy::dot_q4_1_q8_1_vnni),
        WeightType::Q5_0 => (legacy::dot_q5_0_q8_0, legacy::dot_q5_0_q8_0_vnni),
        WeightType::Q5_1 => (legacy::dot_q5_1_q8_1, legacy::dot_q5_1_q8_1_vnni),
        WeightType::Q4K => (kquants::dot_q4k_q8k, kquants::dot_q4k_q8k_vnni),
        WeightType::Q5K => (kquants::dot_q5k_q8k, kquants::dot_q5k_q8k_vnni),
        WeightType::Q6K => (kquants::dot_q6k_q8k, kquants::dot_q6k_q8k_vnni),
        _ => unreachable!("no VNNI tile for {ty:?}"),
    };
    let mut rng = Rng(55 + ty as u64);
    for extreme in [false, true] {
        let m = if extreme {
            raw(FAMILIES[0], ty, &mut rng, true)
        } else {
            quantized(ty, &mut rng, 0, COLS)
        };
        let acts = activations(ty, &mut rng, 4.0, COLS);
        let xs: Vec<&[u8]> = acts.0.chunks_exact(acts.1).take(4).collect();
        for r in 1..=2 {
            for t in 1..=4 {
                let ws: Vec<&[u8]> = (0..r).map(|i| m.row(2 * i + 1)).collect();
                let (mut a, mut b) = (vec![f32::NAN; r * t], vec![f32::NAN; r * t]);
                // SAFETY: the AVX-512 family's trials run only where
                // `Family::missing` found AVX2/FMA/F16C and AVX-512
                // F/BW/VL/VNNI; the rows have the same length.
                unsafe {
                    avx2(&ws, &xs[..t], &mut a);
                    vnni(&ws, &xs[..t], &mut b);
                }
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        same_bits(*x, *y),
                        "{ty:?} extreme={extreme} {r}x{t}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

/// The engine's choice on this CPU (`dispatch::kernel`): each token's
/// results are its bits alone, whatever the token count (across the AVX2 /
/// AVX-512 crossover where this CPU has one), and on an AVX-512 CPU the
/// few-token sizes are the AVX2 family's products.
fn engine_choice(ty: WeightType) {
    let isa = Isa::detect();
    let mut rng = Rng(9 + ty as u64);
    let m = quantized(ty, &mut rng, 0, COLS);
    let acts = activations(ty, &mut rng, 4.0, COLS);
    let pool = ThreadPool::new(2);
    let mut alone = Vec::new();
    for t in 0..TOKENS {
        let one = (acts.0[t * acts.1..(t + 1) * acts.1].to_vec(), acts.1);
        alone.push(product(&pool, kernel(isa, ty, 1), &m, &one, 1));
    }
    for n in 1..=TOKENS {
        let y = product(&pool, kernel(isa, ty, n), &m, &acts, n);
        for t in 0..n {
            for r in 0..ROWS {
                assert!(
                    same_bits(y[t * ROWS + r], alone[t][r]),
                    "{ty:?} on {isa}: token {t} of {n} differs from its own product at row {r}"
                );
            }
        }
    }
}

/// The AVX-512 choice's few-token products, run here through the same
/// selection: what `family` picks for an AVX-512 VNNI CPU up to the
/// crossover is the AVX2 family, whose products give the reference bits.
fn simulated_avx512_choice(ty: WeightType) {
    let fam = FAMILIES[0];
    let mut rng = Rng(21 + ty as u64);
    let m = quantized(ty, &mut rng, 0, COLS);
    let acts = activations(ty, &mut rng, 4.0, COLS);
    let pool = ThreadPool::new(2);
    let up_to = avx2_up_to_tokens(ty);
    assert!(up_to > 0, "{ty:?} has no AVX2 range on AVX-512");
    for n in 1..=up_to {
        let chosen = family(Isa::Avx512, true, ty, n);
        assert_eq!(chosen, Isa::Avx2, "{ty:?} with {n} tokens");
        let y = product(&pool, family_kernel(chosen, ty), &m, &acts, n);
        for t in 0..n {
            for r in 0..ROWS {
                let w = want(
                    fam,
                    ty,
                    m.row(r),
                    &acts.0[t * acts.1..(t + 1) * acts.1],
                    COLS,
                );
                check(y[t * ROWS + r], &w, &|| {
                    format!("{ty:?} {n} tokens: ({r}, {t})")
                });
            }
        }
    }
    assert_eq!(family(Isa::Avx512, true, ty, up_to + 1), Isa::Avx512);
}

fn main() {
    let args = Arguments::from_args();
    let required: Vec<String> = std::env::var("LFM_REQUIRE_FAMILIES")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let mut trials = Vec::new();
    let quantized_types: Vec<WeightType> = WeightType::ALL
        .into_iter()
        .filter(|&t| act_type_for(t) != ActType::F32)
        .collect();
    for fam in FAMILIES {
        let missing = fam.missing();
        if !args.list {
            match missing {
                None => eprintln!("kernel family {}: runs natively on this CPU", fam.name),
                Some(why) => eprintln!("kernel family {}: SKIPPED ({why})", fam.name),
            }
        }
        if let (Some(why), true) = (missing, required.iter().any(|r| r == fam.name)) {
            let why = why.to_owned();
            trials.push(Trial::test(format!("{}::required", fam.name), move || {
                Err(format!("LFM_REQUIRE_FAMILIES names {} but {why}", fam.name).into())
            }));
        }
        let mut add = |name: String, f: Box<dyn FnOnce() + Send>| {
            let t = Trial::test(format!("{}::{name}", fam.name), move || {
                f();
                Ok(())
            });
            trials.push(match missing {
                Some(_) => t.with_ignored_flag(true),
                None => t,
            });
        };
        if fam.stream || fam.repacked {
            // Products only, of the types with a stream or repacked kernel:
            // its row dots, float dots and quantizers are the AVX-512
            // family's.
            for ty in WeightType::ALL.into_iter().filter(|&t| fam.covers(t)) {
                let n = ty.name().to_ascii_lowercase();
                add(
                    format!("products::{n}"),
                    Box::new(move || products(fam, ty)),
                );
                add(
                    format!("extremes::{n}"),
                    Box::new(move || extremes(fam, ty)),
                );
            }
            continue;
        }
        for ty in WeightType::ALL {
            let n = ty.name().to_ascii_lowercase();
            add(
                format!("products::{n}"),
                Box::new(move || products(fam, ty)),
            );
            add(
                format!("row_dots::{n}"),
                Box::new(move || row_dots(fam, ty)),
            );
            // Float weights have no blocks to make extreme.
            if quantized_types.contains(&ty) {
                add(
                    format!("extremes::{n}"),
                    Box::new(move || extremes(fam, ty)),
                );
            }
        }
        add("float_dots".into(), Box::new(move || float_dots(fam)));
        for ty in [WeightType::Q4_0, WeightType::Q4_1, WeightType::Q4K] {
            let n = act_type_for(ty).name().to_ascii_lowercase();
            add(
                format!("quantizers::{n}"),
                Box::new(move || quantizers(fam, ty)),
            );
        }
        if fam.isa == Isa::Avx512 {
            for &ty in &quantized_types {
                let n = ty.name().to_ascii_lowercase();
                add(
                    format!("same_bits_as_avx2::{n}"),
                    Box::new(move || same_bits_as_avx2(ty)),
                );
                #[cfg(target_arch = "x86_64")]
                if !matches!(ty, WeightType::Q4_0 | WeightType::Q8_0) {
                    add(format!("vnni_tiles::{n}"), Box::new(move || vnni_tiles(ty)));
                }
            }
        }
    }
    // The engine's choice on this CPU: always runnable.
    for ty in WeightType::ALL {
        let n = ty.name().to_ascii_lowercase();
        trials.push(Trial::test(
            format!("engine::batch_invariant::{n}"),
            move || {
                engine_choice(ty);
                Ok(())
            },
        ));
        if avx2_up_to_tokens(ty) > 0 {
            let t = Trial::test(
                format!("engine::avx512_few_tokens_on_avx2::{n}"),
                move || {
                    simulated_avx512_choice(ty);
                    Ok(())
                },
            );
            trials.push(t.with_ignored_flag(FAMILIES[0].missing().is_some()));
        }
    }
    libtest_mimic::run(&args, trials).exit();
}
