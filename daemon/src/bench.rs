//! `lfmd bench`: prefill and decode speed on a model, measured the way
//! llama-bench measures pp/tg (each test from a context holding `depth`
//! tokens, empty by default, prompt and decode tokens drawn at random,
//! decode fed one token at a time, after an untimed warm-up as llama-bench's:
//! a whole prompt when there is a prefill test, then one token), so
//! the two can be compared side by side (scripts/bench-vs-llama.sh).

use crate::engine::{BatchItem, EngineError, LogitsWanted, Model, SeqState};
use crate::rng::Rng;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub model_bytes: u64,
    pub isa: String,
    /// Which kernel family ran each of the model's weight types, for decode
    /// (one token) and for the prefill test's size: on AVX-512 CPUs
    /// few-token products run on the AVX2 kernels.
    pub kernels: Vec<KernelChoice>,
    pub threads: usize,
    /// Tokens already in the context when each test starts (untimed).
    pub depth: usize,
    pub prefill_tokens: usize,
    pub prefill_seconds: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_seconds: f64,
    pub decode_tokens_per_s: f64,
    /// Each repetition's decode rate, in order (the first from a cold
    /// cache when experts are paged, the later ones steady state).
    pub decode_tokens_per_s_reps: Vec<f64>,
    /// Weight bytes each decoded token reads (see `Model::decode_weight_bytes`).
    pub decode_weight_bytes: u64,
    /// Those bytes at the decode rate: the weight stream decode sustains.
    pub decode_weight_gb_per_s: f64,
    /// What the same threads read per second from the same mapping with no
    /// compute at all (`Model::read_rate`, measured after decode): the
    /// ceiling of `decode_weight_gb_per_s`. 0 when no decode ran.
    pub read_gb_per_s: f64,
    /// Expert paging's figures at the end (per-expert tables left out).
    pub paging: Option<crate::engine::PagingStats>,
}

/// The kernel family a weight type's products ran on.
#[derive(Clone, Debug, Serialize)]
pub struct KernelChoice {
    pub weight_type: String,
    pub decode: String,
    pub prefill: String,
}

/// What to measure: a `prompt`-token prefill and a `n_gen`-token decode,
/// `reps` times each, each from a context already holding `depth` tokens.
#[derive(Clone, Copy, Debug)]
pub struct BenchParams {
    pub prompt: usize,
    pub n_gen: usize,
    pub reps: usize,
    pub depth: usize,
}

/// Tokens per forward call when filling the context to `depth`: bounds the
/// activations' memory however deep.
const DEPTH_CHUNK: usize = 512;

/// Runs the tests of `params` and reports the mean rates.
pub fn run(model: &Model, name: &str, params: BenchParams) -> Result<BenchReport, EngineError> {
    let BenchParams {
        prompt,
        n_gen,
        reps,
        depth,
    } = params;
    let nv = model.n_vocab() as u64;
    let mut rng = Rng::new(0x1f2e3d);
    let reps = reps.max(1);
    // A fresh sequence holding `depth` random tokens (untimed).
    let context = |rng: &mut Rng| -> Result<SeqState, EngineError> {
        let mut st = SeqState::new(model);
        let toks: Vec<u32> = (0..depth).map(|_| rng.below(nv) as u32).collect();
        for chunk in toks.chunks(DEPTH_CHUNK) {
            model.forward(&mut [BatchItem {
                state: &mut st,
                tokens: chunk,
                logits: LogitsWanted::None,
            }])?;
        }
        Ok(st)
    };
    let (mut t_pp, mut t_tg) = (0.0, 0.0);
    let mut tg_reps = Vec::new();
    // Untimed warm-up runs first, as llama-bench's: a whole prompt when there
    // is a prefill test (it touches nearly every expert, as the timed one
    // would for the first time), then one token. The timed tests then
    // measure steady state, not the first touches of the mapping.
    for n in [prompt, 1] {
        let toks: Vec<u32> = (0..n).map(|_| rng.below(nv) as u32).collect();
        if !toks.is_empty() {
            model.forward(&mut [BatchItem {
                state: &mut SeqState::new(model),
                tokens: &toks,
                logits: LogitsWanted::Last,
            }])?;
        }
    }
    for _ in 0..reps {
        if prompt > 0 {
            let mut st = context(&mut rng)?;
            let toks: Vec<u32> = (0..prompt).map(|_| rng.below(nv) as u32).collect();
            let t0 = Instant::now();
            model.forward(&mut [BatchItem {
                state: &mut st,
                tokens: &toks,
                logits: LogitsWanted::Last,
            }])?;
            t_pp += t0.elapsed().as_secs_f64();
        }
        if n_gen > 0 {
            let mut st = context(&mut rng)?;
            // Random tokens, as llama-bench feeds: a synthetic model's own
            // argmax can fall into a loop of one token, whose routing then
            // repeats and flatters any expert cache.
            let toks: Vec<u32> = (0..n_gen).map(|_| rng.below(nv) as u32).collect();
            let t0 = Instant::now();
            for tok in &toks {
                let out = model.forward(&mut [BatchItem {
                    state: &mut st,
                    tokens: std::slice::from_ref(tok),
                    logits: LogitsWanted::Last,
                }])?;
                std::hint::black_box(out);
            }
            let t = t0.elapsed().as_secs_f64();
            t_tg += t;
            tg_reps.push(n_gen as f64 / t.max(1e-9));
        }
    }
    let (t_pp, t_tg) = (t_pp / reps as f64, t_tg / reps as f64);
    let rate = |n: usize, t: f64| if n > 0 && t > 0.0 { n as f64 / t } else { 0.0 };
    let decode_rate = rate(n_gen, t_tg);
    let weight_bytes = model.decode_weight_bytes();
    let read = if n_gen > 0 { model.read_rate(3) } else { 0.0 };
    Ok(BenchReport {
        model: name.to_owned(),
        model_bytes: model.gguf().file_len,
        isa: model.isa_name(),
        kernels: model
            .kernel_families(1)
            .into_iter()
            .zip(model.kernel_families(prompt.max(1)))
            .map(|((weight_type, decode), (_, prefill))| KernelChoice {
                weight_type,
                decode,
                prefill,
            })
            .collect(),
        threads: model.n_threads(),
        depth,
        prefill_tokens: prompt,
        prefill_seconds: t_pp,
        prefill_tokens_per_s: rate(prompt, t_pp),
        paging: model.paging_stats().map(|mut p| {
            p.experts.clear();
            p.layer_ids.clear();
            p
        }),
        decode_tokens: n_gen,
        decode_seconds: t_tg,
        decode_tokens_per_s: decode_rate,
        decode_tokens_per_s_reps: tg_reps,
        decode_weight_bytes: weight_bytes,
        decode_weight_gb_per_s: weight_bytes as f64 * decode_rate / 1e9,
        read_gb_per_s: read / 1e9,
    })
}
