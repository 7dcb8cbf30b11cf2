//! `lfmd bench`: prefill and decode speed on a model, measured the way
//! llama-bench measures pp/tg (each test from a context holding `depth`
//! tokens, empty by default, prompt and decode tokens drawn at random,
//! decode fed one token at a time, after an untimed warm-up as llama-bench's:
//! a whole prompt when there is a prefill test, then one token), so
//! the two can be compared side by side (scripts/bench-vs-llama.sh).
//! With `sequences` > 1 the decode test runs that many sequences, one token
//! each per forward step, as the daemon serves that many clients (llama's
//! batched-bench), and reports what a step reads: the fixed matrices once
//! and each distinct expert the tokens chose once.

use crate::engine::{BatchItem, EngineError, ForwardStats, LogitsWanted, Model, SeqState};
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
    /// Sequences decoded together, a token each per step.
    pub sequences: usize,
    /// Tokens each sequence decodes.
    pub decode_tokens: usize,
    pub decode_seconds: f64,
    /// All sequences' tokens per second.
    pub decode_tokens_per_s: f64,
    /// Each repetition's decode rate, in order (the first from a cold
    /// cache when experts are paged, the later ones steady state).
    pub decode_tokens_per_s_reps: Vec<f64>,
    /// Weight bytes one sequence's decoded token reads alone (see
    /// `Model::decode_weight_bytes`).
    pub decode_weight_bytes: u64,
    /// Weight bytes a decode step read, on average (`Model::step_weight_bytes`
    /// of the experts the step's tokens chose): `decode_weight_bytes` for one
    /// sequence, less than `sequences` times it for several.
    pub decode_step_weight_bytes: f64,
    /// Distinct experts a MoE layer ran per decode step, on average
    /// (`n_expert_used` for one sequence).
    pub decode_experts_per_layer: f64,
    /// Decoded tokens per GB of weights read: what batching buys.
    pub decode_tokens_per_gb: f64,
    /// The step bytes at the step rate: the weight stream decode sustains.
    pub decode_weight_gb_per_s: f64,
    /// What the same threads read per second from the same mapping with no
    /// compute at all (`Model::read_rate`, measured after decode): the
    /// ceiling of `decode_weight_gb_per_s`. 0 when no decode ran.
    pub read_gb_per_s: f64,
    /// Expert paging's figures at the end (per-expert tables left out).
    pub paging: Option<crate::engine::PagingStats>,
    /// What the timed decode runs cost in I/O, when experts are paged.
    pub decode_io: Option<DecodeIo>,
    /// What constraining the decode test cost, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<FormatCost>,
}

/// The I/O of the timed decode runs (all repetitions): what the disk really
/// read against what the pager believes it brought in, and how long compute
/// stalled on it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DecodeIo {
    /// Bytes the block layer read for the process (`/proc/self/io`
    /// `read_bytes`; readahead beyond the experts' slabs counts), per
    /// decoded token (all sequences' tokens).
    pub storage_bytes_per_token: f64,
    /// The pager's own count of bytes brought in, per token.
    pub pager_bytes_per_token: f64,
    /// Storage bytes over the decode time: the read rate achieved.
    pub storage_gb_per_s: f64,
    /// Share of decode time the engine waited for chosen experts' loads.
    pub wait_share: f64,
    /// Major page faults of the compute threads (all but the pager's I/O
    /// threads, whose loads are faults by design) per token: pages compute
    /// had to read itself.
    pub major_faults_per_token: f64,
}

/// The I/O counters at a moment, or their growth over the timed runs.
#[derive(Clone, Copy, Default)]
struct IoCounters {
    storage: u64,
    pager: u64,
    wait: f64,
    faults: u64,
}

impl IoCounters {
    fn now(model: &Model) -> Option<IoCounters> {
        let p = model.pager()?.monitor().believed();
        Some(IoCounters {
            storage: crate::procstat::storage_read_bytes().unwrap_or(0),
            pager: p.bytes_in,
            wait: p.wait_seconds,
            faults: crate::procstat::major_faults_except(crate::engine::paging::IO_THREAD_NAME)
                .unwrap_or(0),
        })
    }

    /// Adds what grew from `from` to `to`.
    fn add_growth(&mut self, from: IoCounters, to: IoCounters) {
        self.storage += to.storage.saturating_sub(from.storage);
        self.pager += to.pager.saturating_sub(from.pager);
        self.wait += to.wait - from.wait;
        self.faults += to.faults.saturating_sub(from.faults);
    }

    /// These counts' growth as rates over `tokens` tokens in `seconds` of
    /// decode.
    fn report(self, tokens: usize, seconds: f64) -> DecodeIo {
        let per = |x: u64| x as f64 / tokens.max(1) as f64;
        DecodeIo {
            storage_bytes_per_token: per(self.storage),
            pager_bytes_per_token: per(self.pager),
            storage_gb_per_s: self.storage as f64 / seconds.max(1e-9) / 1e9,
            wait_share: self.wait / seconds.max(1e-9),
            major_faults_per_token: per(self.faults),
        }
    }
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
pub struct BenchParams {
    pub prompt: usize,
    pub n_gen: usize,
    pub reps: usize,
    pub depth: usize,
    /// Sequences decoded together (at least 1).
    pub sequences: usize,
    /// Each decode step also samples every sequence's next token under this
    /// response format (mask, draw, accept: what the daemon does for a
    /// constrained request), to measure what constraining costs.
    pub format: Option<BenchFormat>,
}

/// A response format to constrain the decode test with.
pub struct BenchFormat {
    pub grammars: std::sync::Arc<crate::constraint::Grammars>,
    pub format: crate::constraint::ResponseFormat,
}

/// What constraining the decode test cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FormatCost {
    /// The format's kind (`json_schema`, ...).
    pub kind: String,
    /// Mask and accept per token, one thread (the daemon spreads the
    /// sequences of a step over the pool).
    pub mask_us_per_token: f64,
    /// That time's share of the decode test's time (which includes it).
    pub share_of_decode: f64,
    /// Mean compile time of the format (a new one each time an output
    /// completed).
    pub compile_ms: f64,
    pub compiles: usize,
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
        sequences,
        format,
    } = params;
    let sequences = sequences.max(1);
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
    // The decode runs' I/O growth, summed over repetitions (untimed parts
    // left out).
    let mut io_sum: Option<IoCounters> = None;
    // Decode steps run, and the sums of their weight bytes and mean
    // distinct experts per MoE layer.
    let (mut steps, mut step_bytes, mut experts) = (0usize, 0.0f64, 0.0f64);
    // What constraining cost (seconds, counts).
    #[derive(Default)]
    struct Cost {
        mask: f64,
        tokens: usize,
        compile: f64,
        compiles: usize,
    }
    let mut cost = Cost::default();
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
            let mut states = (0..sequences)
                .map(|_| context(&mut rng))
                .collect::<Result<Vec<_>, _>>()?;
            // Random tokens, as llama-bench feeds: a synthetic model's own
            // argmax can fall into a loop of one token, whose routing then
            // repeats and flatters any expert cache.
            let toks: Vec<u32> = (0..n_gen * sequences)
                .map(|_| rng.below(nv) as u32)
                .collect();
            let mut stats = ForwardStats::default();
            let mut constrained = match &format {
                Some(f) => {
                    let t = Instant::now();
                    let cs = (0..sequences)
                        .map(|_| f.grammars.compile(&f.format))
                        .collect::<Result<Vec<_>, _>>()?;
                    cost.compile += t.elapsed().as_secs_f64();
                    cost.compiles += sequences;
                    let samplers = (0..sequences as u64)
                        .map(|seed| {
                            crate::sampler::Sampler::new(crate::sampler::SamplingParams {
                                seed,
                                ..Default::default()
                            })
                        })
                        .collect();
                    Some((cs, samplers))
                }
                None => None,
            };
            let io0 = IoCounters::now(model);
            let t0 = Instant::now();
            for step in toks.chunks(sequences) {
                let mut items: Vec<BatchItem<'_>> = states
                    .iter_mut()
                    .zip(step)
                    .map(|(state, tok)| BatchItem {
                        state,
                        tokens: std::slice::from_ref(tok),
                        logits: LogitsWanted::Last,
                    })
                    .collect();
                let out = model.forward_with_stats(&mut items, Some(&mut stats))?;
                if let (Some((cs, samplers)), Some(f)) = (&mut constrained, &format) {
                    let samplers: &mut Vec<crate::sampler::Sampler> = samplers;
                    for ((c, s), row) in cs.iter_mut().zip(samplers.iter_mut()).zip(&out) {
                        if c.is_complete() {
                            let t = Instant::now();
                            *c = f.grammars.compile(&f.format)?;
                            cost.compile += t.elapsed().as_secs_f64();
                            cost.compiles += 1;
                        }
                        let t = Instant::now();
                        let allowed = c.allowed()?;
                        let mask = t.elapsed().as_secs_f64();
                        let tok = s.sample_allowed(row, &[], Some(&allowed));
                        let t = Instant::now();
                        c.accept(tok)?;
                        cost.mask += mask + t.elapsed().as_secs_f64();
                        cost.tokens += 1;
                    }
                }
                std::hint::black_box(out);
                step_bytes += model.step_weight_bytes(&stats.experts) as f64;
                let moe: Vec<usize> = stats.experts.iter().copied().filter(|&x| x > 0).collect();
                experts += moe.iter().sum::<usize>() as f64 / moe.len().max(1) as f64;
                steps += 1;
            }
            let t = t0.elapsed().as_secs_f64();
            if let (Some(from), Some(to)) = (io0, IoCounters::now(model)) {
                io_sum.get_or_insert_default().add_growth(from, to);
            }
            t_tg += t;
            tg_reps.push((n_gen * sequences) as f64 / t.max(1e-9));
        }
    }
    let (t_pp, t_tg) = (t_pp / reps as f64, t_tg / reps as f64);
    let rate = |n: usize, t: f64| if n > 0 && t > 0.0 { n as f64 / t } else { 0.0 };
    let decode_rate = rate(n_gen * sequences, t_tg);
    let weight_bytes = model.decode_weight_bytes();
    let per_step = |sum: f64| if steps > 0 { sum / steps as f64 } else { 0.0 };
    let (step_bytes, experts) = (per_step(step_bytes), per_step(experts));
    let decode_io = io_sum
        .filter(|_| n_gen > 0)
        .map(|io| io.report(n_gen * sequences * reps, t_tg * reps as f64));
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
        sequences,
        decode_tokens: n_gen,
        decode_seconds: t_tg,
        decode_tokens_per_s: decode_rate,
        decode_tokens_per_s_reps: tg_reps,
        decode_weight_bytes: weight_bytes,
        decode_step_weight_bytes: step_bytes,
        decode_experts_per_layer: experts,
        decode_tokens_per_gb: if step_bytes > 0.0 {
            sequences as f64 * 1e9 / step_bytes
        } else {
            0.0
        },
        decode_weight_gb_per_s: step_bytes * decode_rate / sequences as f64 / 1e9,
        read_gb_per_s: read / 1e9,
        decode_io,
        format: format.map(|f| FormatCost {
            kind: f.format.kind().into(),
            mask_us_per_token: cost.mask * 1e6 / cost.tokens.max(1) as f64,
            share_of_decode: cost.mask / (t_tg * reps as f64).max(1e-9),
            compile_ms: cost.compile * 1e3 / cost.compiles.max(1) as f64,
            compiles: cost.compiles,
        }),
    })
}

impl BenchReport {
    /// The report for a terminal: rates, the weight stream against the
    /// read ceiling, what batching saved, paging.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{}: {} threads, isa {}{}{}\n",
            self.model,
            self.threads,
            self.isa,
            kernel_note(&self.kernels),
            if self.depth > 0 {
                format!(", tests after {} tokens of context", self.depth)
            } else {
                String::new()
            },
        );
        out += &format!(
            "prefill {:>5} tokens {:>9.2} tok/s\n",
            self.prefill_tokens, self.prefill_tokens_per_s
        );
        let seqs = if self.sequences > 1 {
            format!(" ({} sequences together, all their tokens)", self.sequences)
        } else {
            String::new()
        };
        let each = if self.decode_tokens_per_s_reps.len() > 1 {
            let each: Vec<String> = self
                .decode_tokens_per_s_reps
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect();
            format!(" (each run: {})", each.join(", "))
        } else {
            String::new()
        };
        out += &format!(
            "decode  {:>5} tokens {:>9.2} tok/s{seqs}{each}\n",
            self.decode_tokens, self.decode_tokens_per_s
        );
        if self.read_gb_per_s > 0.0 {
            out += &format!(
                "weights {:.3} GB per step: decode streams {:.2} GB/s, {:.0}% of the {:.2} GB/s these threads read from the mapping\n",
                self.decode_step_weight_bytes / 1e9,
                self.decode_weight_gb_per_s,
                100.0 * self.decode_weight_gb_per_s / self.read_gb_per_s,
                self.read_gb_per_s,
            );
        }
        if self.sequences > 1 && self.decode_step_weight_bytes > 0.0 {
            out += &format!(
                "batching {} tokens per step read {:.1} distinct experts per MoE layer: {:.2} tokens per GB of weights, {:.2}x one sequence's {:.2}\n",
                self.sequences,
                self.decode_experts_per_layer,
                self.decode_tokens_per_gb,
                self.decode_tokens_per_gb * self.decode_weight_bytes as f64 / 1e9,
                1e9 / self.decode_weight_bytes as f64,
            );
        }
        if let Some(p) = &self.paging {
            out += &format!(
                "paging  budget {} ({}), {} loads, {:.2} GB in ({:.1} s loading, {:.2} GB/s), {} evictions, {} major faults\n",
                p.budget_bytes
                    .map_or("none".into(), |b| format!("{:.2} GB", b as f64 / 1e9)),
                p.budget_mode,
                p.loads,
                p.bytes_in as f64 / 1e9,
                p.load_seconds,
                p.bytes_in as f64 / 1e9 / p.load_seconds.max(1e-9),
                p.evictions,
                p.major_faults.map_or("?".into(), |f| f.to_string()),
            );
        }
        // Only when decode read anything: with every expert in memory the
        // line would be all zeros.
        if let Some(io) = self
            .decode_io
            .as_ref()
            .filter(|io| io.storage_bytes_per_token > 0.0 || io.pager_bytes_per_token > 0.0)
        {
            out += &format!(
                "decode io {:.1} MB read from storage per token ({:.1} MB by the pager's count), {:.2} GB/s while decoding, {:.0}% of decode waiting for loads, {:.2} compute-thread major faults per token\n",
                io.storage_bytes_per_token / 1e6,
                io.pager_bytes_per_token / 1e6,
                io.storage_gb_per_s,
                100.0 * io.wait_share,
                io.major_faults_per_token,
            );
        }
        if let Some(f) = &self.format {
            out += &format!(
                "{} constraint {:.1} µs per token (mask and accept, one thread), {:.2}% of decode time; compile {:.2} ms ({} compiles)\n",
                f.kind,
                f.mask_us_per_token,
                100.0 * f.share_of_decode,
                f.compile_ms,
                f.compiles,
            );
        }
        out
    }
}

/// The note on kernel families that differ from the ISA's own (AVX-512
/// CPUs run few-token products on AVX2 kernels): empty otherwise.
fn kernel_note(kernels: &[KernelChoice]) -> String {
    let mixed: Vec<String> = kernels
        .iter()
        .filter(|k| k.decode != k.prefill || k.decode.ends_with("repacked"))
        .map(|k| {
            if k.decode == k.prefill {
                format!("{} {}", k.weight_type, k.decode)
            } else {
                format!(
                    "{} decode {}, prefill {}",
                    k.weight_type, k.decode, k.prefill
                )
            }
        })
        .collect();
    if mixed.is_empty() {
        String::new()
    } else {
        format!(" ({})", mixed.join("; "))
    }
}
