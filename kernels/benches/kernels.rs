//! Per-kernel benchmarks (figures, never assertions): activation
//! quantization, the row dot of every weight type on every ISA this CPU runs
//! (through `dispatch::dot_fn`), and the `matmul` driver for a decode-shaped
//! (1 token), few-token (2 to 16: `fewN`) and prefill-shaped (64 tokens)
//! product through each ISA's own kernel family (`dispatch::family_kernel`:
//! AVX-512 panels where there are some) and through the one the engine
//! picks for that size on this CPU (`matmul/<type>/default/...`:
//! `dispatch::kernel`, which runs AVX2 kernels for few tokens on AVX-512),
//! attention over an f16 KV cache (`attn/scores`, `attn/mix`), and the
//! activations (`act/swiglu`, `act/softmax`).
//!
//! `cargo bench -p lfm-kernels --bench kernels [-- [--exact] [--list] FILTER...]`
//! runs the benchmarks whose name contains any FILTER (all by default), as
//! libtest benches do. Each benchmark reports its best pass (other load on
//! the machine only ever slows a pass down); `LFM_BENCH_MS` sets the time
//! spent per benchmark (default 150 ms, at least 3 passes) and
//! `LFM_BENCH_THREADS` the matmul pool's threads (default: every CPU).

use lfm_kernels::dispatch::{dot_fn, family_kernel, kernel, kernel_name, quantize_activations};
use lfm_kernels::isa::Isa;
use lfm_kernels::matmul::{DotFn, Kernel, matmul};
use lfm_kernels::pool::ThreadPool;
use lfm_kernels::scalar;
use lfm_kernels::types::{ActType, WeightType};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Columns of every matrix: the hidden size of the LFM2 models.
const COLS: usize = 2048;
/// Weight rows of the row-dot and matmul matrices.
const ROWS: usize = 2048;
/// Tokens of the prefill-shaped product and of the activation quantization.
const PREFILL: usize = 64;
/// Token counts of the few-token products (continuous batching of a few
/// decoding sequences, an expert's share of a small batch): where the AVX2
/// and AVX-512 families cross (`dispatch::avx2_up_to_tokens`).
const FEW: [usize; 7] = [2, 4, 6, 8, 10, 12, 16];
/// Matrices of the DRAM-streaming decode benchmark (Q4_0: 144 MiB).
const DRAM_MATRICES: usize = 64;
/// Token counts of the few-token DRAM benchmarks: an expert's share of a
/// serving step (2, 4: with 8 sequences most experts meet one to three
/// tokens) and the step's dense matrices (8).
const DRAM_FEW: [usize; 3] = [2, 4, 8];
/// Distinct quantized rows; the matrix repeats them (quantizing k-quants is slow).
const TEMPLATE_ROWS: usize = 64;

struct Runner {
    filters: Vec<String>,
    exact: bool,
    list: bool,
    budget: Duration,
}

impl Runner {
    fn from_args() -> Runner {
        let (mut filters, mut exact, mut list) = (Vec::new(), false, false);
        for a in std::env::args().skip(1) {
            match a.as_str() {
                "--exact" => exact = true,
                "--list" => list = true,
                // `--bench` (added by cargo) and other libtest flags.
                s if s.starts_with('-') => {}
                s => filters.push(s.to_owned()),
            }
        }
        let ms = std::env::var("LFM_BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(150);
        Runner {
            filters,
            exact,
            list,
            budget: Duration::from_millis(ms),
        }
    }

    fn wants(&self, name: &str) -> bool {
        self.filters.is_empty()
            || self.filters.iter().any(|f| {
                if self.exact {
                    name == f
                } else {
                    name.contains(f.as_str())
                }
            })
    }

    /// Times `pass` (which moves `bytes` of the measured data and handles
    /// `rows` rows) and prints GB/s and ns per row of its best pass.
    fn bench(&self, name: &str, bytes: usize, rows: usize, mut pass: impl FnMut()) {
        if !self.wants(name) {
            return;
        }
        if self.list {
            println!("{name}: bench");
            return;
        }
        pass(); // warm caches, page in the buffers
        let start = Instant::now();
        let (mut best, mut passes) = (f64::MAX, 0u32);
        while passes < 3 || start.elapsed() < self.budget {
            let t = Instant::now();
            pass();
            best = best.min(t.elapsed().as_secs_f64());
            passes += 1;
        }
        println!(
            "{name:<34} {:>8.2} GB/s {:>11.1} ns/row  ({passes} passes)",
            bytes as f64 / best / 1e9,
            best / rows as f64 * 1e9,
        );
    }
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// Deterministic values in about [-1, 1] with an occasional outlier.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0;
            if i % 61 == 0 { v * 6.0 } else { v }
        })
        .collect()
}

/// A `ROWS x COLS` weight matrix of `ty` (the template rows, repeated).
fn weights(ty: WeightType) -> Vec<u8> {
    let row = ty.row_bytes(COLS);
    let mut template = vec![0u8; TEMPLATE_ROWS * row];
    let x = values(TEMPLATE_ROWS * COLS, 1);
    for (xr, wr) in x.chunks_exact(COLS).zip(template.chunks_exact_mut(row)) {
        scalar::quantize_row(ty, xr, wr);
    }
    template.repeat(ROWS / TEMPLATE_ROWS)
}

fn main() {
    let run = Runner::from_args();
    let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
    let threads = std::env::var("LFM_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if !run.list {
        println!(
            "# {} (best: {}), {threads} threads, {ROWS}x{COLS} weights, prefill {PREFILL} tokens",
            isas.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            Isa::detect(),
        );
    }

    let x = values(PREFILL * COLS, 2);
    for act in [ActType::Q8_0, ActType::Q8_1, ActType::Q8K] {
        let mut out = vec![0u8; PREFILL * act.row_bytes(COLS)];
        run.bench(
            &format!("quantize/{}", lower(act.name())),
            x.len() * 4,
            PREFILL,
            || {
                for (xr, or) in x
                    .chunks_exact(COLS)
                    .zip(out.chunks_exact_mut(act.row_bytes(COLS)))
                {
                    scalar::quantize_acts(act, black_box(xr), or);
                }
                black_box(&out);
            },
        );
    }

    // The weight quantizers (what `lfmd synth` spends its time in).
    let xw = &x[..16 * COLS];
    for ty in WeightType::ALL.into_iter().filter(|t| t.block_size() > 1) {
        let mut out = vec![0u8; ty.row_bytes(xw.len())];
        run.bench(
            &format!("quantize_weights/{}", lower(ty.name())),
            xw.len() * 4,
            16,
            || {
                scalar::quantize_row(ty, black_box(xw), &mut out);
                black_box(&out);
            },
        );
    }

    // The activations: one token's experts' SwiGLU (4 x 1792 in LFM2-8B)
    // and a softmax over 2048 scores. GB/s of the f32 inputs; "rows" are
    // elements.
    let (gate, up, scores) = (values(4 * 1792, 5), values(4 * 1792, 6), values(2048, 7));
    for &isa in &isas {
        let f = lfm_kernels::act::act_fns(isa);
        let mut g = gate.clone();
        run.bench(
            &format!("act/swiglu/{isa}/7168"),
            g.len() * 8,
            g.len(),
            || {
                g.copy_from_slice(&gate);
                (f.swiglu)(black_box(&mut g), &up);
                black_box(&g);
            },
        );
        let mut p = scores.clone();
        run.bench(
            &format!("act/softmax/{isa}/2048"),
            p.len() * 4,
            p.len(),
            || {
                p.copy_from_slice(&scores);
                (f.softmax)(black_box(&mut p));
                black_box(&p);
            },
        );
    }

    // Attention of one token's 4 query heads sharing a KV head (LFM2-8B:
    // head size 64) over 2048 cached positions: the scores, then the
    // weighted values. GB/s of the KV head read; "rows" are positions.
    let (hd, g, n) = (64, 4, 2048);
    let cache: Vec<half::f16> = values(n * hd, 3)
        .into_iter()
        .map(half::f16::from_f32)
        .collect();
    let q = values(g * hd, 4);
    for &isa in &isas {
        let f = lfm_kernels::attn::attention_fns(isa, hd);
        let kv = lfm_kernels::attn::KvHead::new(&cache, hd);
        let mut p = vec![0.0f32; g * n];
        run.bench(&format!("attn/scores/{isa}/4x{n}"), n * hd * 2, n, || {
            (f.scores)(black_box(&q), kv, 0.125, &mut p);
            black_box(&p);
        });
        let mut out = vec![0.0f32; g * hd];
        run.bench(&format!("attn/mix/{isa}/4x{n}"), n * hd * 2, n, || {
            (f.mix)(black_box(&p), kv, &mut out);
            black_box(&out);
        });
    }

    let pool = ThreadPool::new(threads);
    let best = Isa::detect();
    for ty in WeightType::ALL {
        let name = lower(ty.name());
        // Per kernel family (an ISA this CPU runs), plus "default": what the
        // engine runs on this CPU's best path for each size.
        let sizes = |fam: &str| {
            let mut v = vec![(1, format!("matmul/{name}/{fam}/decode"))];
            v.extend(FEW.map(|n| (n, format!("matmul/{name}/{fam}/few{n}"))));
            v.push((PREFILL, format!("matmul/{name}/{fam}/prefill{PREFILL}")));
            v
        };
        let names = |isa: Isa| {
            let isa = isa.name();
            let mut v = vec![
                format!("dot/{name}/{isa}/2x1"),
                format!("dot/{name}/{isa}/2x4"),
                format!("matmul/{name}/{isa}/decode-dram"),
                format!("matmul/{name}/default/decode-dram"),
            ];
            for n in DRAM_FEW {
                v.push(format!("matmul/{name}/{isa}/few{n}-dram"));
                v.push(format!("matmul/{name}/default/few{n}-dram"));
            }
            v.extend(sizes(isa).into_iter().map(|(_, n)| n));
            v.extend(sizes("default").into_iter().map(|(_, n)| n));
            v
        };
        let stream_names = || {
            let mut v = vec![format!("matmul/{name}/avx512s/decode-dram")];
            v.extend(DRAM_FEW.map(|n| format!("matmul/{name}/avx512s/few{n}-dram")));
            v.extend(sizes("avx512s").into_iter().map(|(_, n)| n));
            v
        };
        if !isas.iter().any(|&i| names(i).iter().any(|n| run.wants(n)))
            && !stream_names().iter().any(|n| run.wants(n))
            && !stream_names()
                .iter()
                .any(|n| run.wants(&n.replace("avx512s", "avx512r")))
            && !run.wants(&format!("read/{name}/dram"))
        {
            continue; // skip quantizing weights nobody asked for
        }
        let w = weights(ty);
        let row = ty.row_bytes(COLS);
        let mut acts = Vec::new();
        let act_row = quantize_activations(ty, &x, COLS, &mut acts);
        let act_rows: Vec<&[u8]> = acts.chunks_exact(act_row).collect();
        // `n` tokens against the ROWS x COLS matrix `m`, into `y`, by the
        // kernel `pick(n)` gives.
        let product = |pick: &dyn Fn(usize) -> Kernel, m: &[u8], n: usize, y: &mut [f32]| {
            matmul(&pool, pick(n), m, ROWS, COLS, row, &acts, act_row, n, y);
            black_box(y);
        };
        // The rate these threads read the DRAM-sized set of matrices with
        // no compute (`stream::read_all`): the `-dram` benches' ceiling.
        if run.wants(&format!("read/{name}/dram")) {
            let big = w.repeat(DRAM_MATRICES);
            run.bench(
                &format!("read/{name}/dram"),
                big.len(),
                ROWS * DRAM_MATRICES,
                || {
                    black_box(lfm_kernels::stream::read_all(&pool, &[&big]));
                },
            );
        }
        // Decode as the model meets it: `n` tokens (one, or a serving
        // step's 8) against a run of distinct matrices far larger than the
        // last-level cache, each its own product (and pool barrier), so the
        // weights stream from DRAM as they do per step.
        let dram = |bench: &str, pick: &dyn Fn(usize) -> Kernel, n: usize| {
            if run.wants(bench) {
                let big = w.repeat(DRAM_MATRICES);
                let mut y = vec![0.0f32; n * ROWS];
                run.bench(bench, big.len(), ROWS * DRAM_MATRICES, || {
                    for m in big.chunks_exact(w.len()) {
                        product(pick, m, n, &mut y);
                    }
                });
            }
        };
        for &isa in &isas {
            let f: DotFn = dot_fn(isa, ty);
            let isa_name = isa.name();
            // The register tiles matmul hands out: two weight rows against
            // one token (decode) or four (prefill).
            for tokens in [1, 4] {
                let xs = &act_rows[..tokens];
                run.bench(
                    &format!("dot/{name}/{isa_name}/2x{tokens}"),
                    w.len(),
                    ROWS,
                    || {
                        let mut out = [0.0f32; 8];
                        for pair in w.chunks_exact(2 * row) {
                            let (a, b) = pair.split_at(row);
                            f(&[a, b], xs, COLS, &mut out[..2 * tokens]);
                            black_box(&out);
                        }
                    },
                );
            }
            let own = |_: usize| family_kernel(isa, ty);
            for (n, bench) in sizes(isa_name) {
                let mut y = vec![0.0f32; n * ROWS];
                run.bench(&bench, w.len(), ROWS, || product(&own, &w, n, &mut y));
            }
            dram(&format!("matmul/{name}/{isa_name}/decode-dram"), &own, 1);
            for n in DRAM_FEW {
                dram(&format!("matmul/{name}/{isa_name}/few{n}-dram"), &own, n);
            }
        }
        // The AVX-512 stream family, where this CPU and type have one.
        if let Some(k) = lfm_kernels::dispatch::stream_kernel(ty) {
            let own = |_: usize| k;
            for (n, bench) in sizes("avx512s") {
                let mut y = vec![0.0f32; n * ROWS];
                run.bench(&bench, w.len(), ROWS, || product(&own, &w, n, &mut y));
            }
            dram(&format!("matmul/{name}/avx512s/decode-dram"), &own, 1);
            for n in DRAM_FEW {
                dram(&format!("matmul/{name}/avx512s/few{n}-dram"), &own, n);
            }
        }
        // Repacked at load (`lfm_kernels::repack`), where this CPU and type
        // have it: the engine's kernel for its dense matrices.
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = lfm_kernels::dispatch::repacked_kernel(best, ty) {
            use lfm_kernels::repack::Repacked;
            let own = |_: usize| k;
            let repack = || lfm_kernels::dispatch::repack(ty, &w, ROWS, COLS, row).unwrap();
            let packed = repack();
            for (n, bench) in sizes("avx512r") {
                let mut y = vec![0.0f32; n * ROWS];
                run.bench(&bench, w.len(), ROWS, || {
                    product(&own, packed.bytes(), n, &mut y)
                });
            }
            let dram_names = std::iter::once((1, format!("matmul/{name}/avx512r/decode-dram")))
                .chain(DRAM_FEW.map(|n| (n, format!("matmul/{name}/avx512r/few{n}-dram"))));
            for (n, bench) in dram_names {
                if run.wants(&bench) {
                    let big: Vec<Repacked> = (0..DRAM_MATRICES).map(|_| repack()).collect();
                    let mut y = vec![0.0f32; n * ROWS];
                    run.bench(
                        &bench,
                        w.len() * DRAM_MATRICES,
                        ROWS * DRAM_MATRICES,
                        || {
                            for m in &big {
                                product(&own, m.bytes(), n, &mut y);
                            }
                        },
                    );
                }
            }
        }
        let engine = |n: usize| kernel(best, ty, n);
        for (n, bench) in sizes("default") {
            if run.wants(&bench) && !run.list {
                println!("# {bench}: {}", kernel_name(best, ty, n));
            }
            let mut y = vec![0.0f32; n * ROWS];
            run.bench(&bench, w.len(), ROWS, || product(&engine, &w, n, &mut y));
        }
        dram(&format!("matmul/{name}/default/decode-dram"), &engine, 1);
        for n in DRAM_FEW {
            dram(&format!("matmul/{name}/default/few{n}-dram"), &engine, n);
        }
    }
}
