//! `lfmd synth`: synthetic models with random weights in the exact layout of
//! LiquidAI's GGUFs (names, shapes, metadata, F32 norms / conv kernels /
//! router / expert bias), with a BPE vocabulary and the LFM2 chat template.
//! Output is a pure function of (preset, quant, seed), written as a stream.

mod presets;
mod vocab;

#[cfg(test)]
mod tests;

pub use presets::{PRESETS, Preset, find as find_preset, names as preset_names};

use crate::gguf::{Array, GgmlType, GgufError, GgufWriter, TensorSpec, Value};
use crate::model::{Arch, GatingFunc};
use crate::rng::Rng;
use half::f16;
use lfm_kernels::{QK, scalar};
use std::io::{BufWriter, Write};
use std::path::Path;

/// The LFM2 chat template shipped in LiquidAI's GGUFs.
pub const LFM2_CHAT_TEMPLATE: &str = include_str!("../../assets/lfm2-chat-template.jinja");

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown preset {0:?}; choose one of {list}", list = preset_names().join(", "))]
    UnknownPreset(String),
    #[error(
        "lfmd synth writes f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q4_k_m and q5_k_m, not {0:?}; make other types with llama-quantize from an f32 file"
    )]
    UnsupportedQuant(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What `lfmd synth --quant` can write: one weight type for every matrix,
/// or one of llama.cpp's mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthQuant {
    Uniform(GgmlType),
    /// llama-quantize's Q4_K_M choices for these tensor shapes: Q4_K with
    /// Q6_K for the output head and some attn_v / ffn_down, Q8_0 attn_k/v and
    /// Q5_K attn_output in models of 8+ experts.
    Q4KM,
    /// The same with Q5_K as the base type.
    Q5KM,
}

/// Weight types `lfmd synth` writes for every matrix: all the engine runs.
pub const SYNTH_QUANTS: &[GgmlType] = crate::engine::SUPPORTED_TYPES;

impl From<GgmlType> for SynthQuant {
    fn from(t: GgmlType) -> Self {
        SynthQuant::Uniform(t)
    }
}

impl SynthQuant {
    /// `f32`, `q8_0`, `q4_k`, `q4_k_m`, ... (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q4_k_m" => Some(SynthQuant::Q4KM),
            "q5_k_m" => Some(SynthQuant::Q5KM),
            other => GgmlType::from_name(other)
                .filter(|t| SYNTH_QUANTS.contains(t))
                .map(SynthQuant::Uniform),
        }
    }

    pub fn name(self) -> String {
        match self {
            SynthQuant::Uniform(t) => t.name().to_lowercase(),
            SynthQuant::Q4KM => "q4_k_m".into(),
            SynthQuant::Q5KM => "q5_k_m".into(),
        }
    }

    /// llama.cpp's `llama_ftype` for the file.
    pub fn file_type(self) -> u32 {
        match self {
            SynthQuant::Q4KM => 15,
            SynthQuant::Q5KM => 17,
            SynthQuant::Uniform(t) => match t {
                GgmlType::F32 => 0,
                GgmlType::F16 => 1,
                GgmlType::Q4_0 => 2,
                GgmlType::Q4_1 => 3,
                GgmlType::Q8_0 => 7,
                GgmlType::Q5_0 => 8,
                GgmlType::Q5_1 => 9,
                GgmlType::Q4K => 14,
                GgmlType::Q5K => 16,
                GgmlType::Q6K => 18,
                GgmlType::BF16 => 32,
                _ => unreachable!("SynthQuant::parse admits only SYNTH_QUANTS"),
            },
        }
    }

    /// The type of one weight matrix.
    fn type_for(self, role: Role, p: &Preset) -> GgmlType {
        let base = match self {
            SynthQuant::Uniform(t) => return t,
            SynthQuant::Q4KM => GgmlType::Q4K,
            SynthQuant::Q5KM => GgmlType::Q5K,
        };
        // llama.cpp's use_more_bits(i, n).
        let more_bits = |i: usize, n: usize| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
        let many_experts = p.n_expert >= 8;
        match role {
            Role::Output => GgmlType::Q6K,
            Role::AttnK | Role::AttnV { .. } if many_experts => GgmlType::Q8_0,
            Role::AttnV { i, n } if more_bits(i, n) => GgmlType::Q6K,
            Role::AttnOut if many_experts => GgmlType::Q5K,
            Role::FfnDown { i, n } if more_bits(i, n) => GgmlType::Q6K,
            _ => base,
        }
    }
}

/// What a weight matrix is, for the type rules of the mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// `output.weight`, or `token_embd.weight` when it doubles as the head.
    Output,
    AttnK,
    AttnV {
        i: usize,
        n: usize,
    },
    AttnOut,
    FfnDown {
        i: usize,
        n: usize,
    },
    Other,
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    /// 1 + uniform noise: RMSNorm gains.
    Gain,
    /// Zero-mean uniform with this standard deviation.
    Uniform { std: f32 },
    /// Skewed expert bias (see `Preset::router_skew`).
    SkewedBias { skew: f32 },
}

struct Planned {
    spec: TensorSpec,
    init: Init,
}

/// What `write_model` produced.
#[derive(Clone, Debug)]
pub struct SynthSummary {
    pub tensors: usize,
    pub bytes: u64,
    pub n_params: u64,
}

fn plan(p: &Preset, q: SynthQuant) -> Vec<Planned> {
    let wt = |role: Role| q.type_for(role, p);
    let n_attn = p.attention_layers.len();
    let e = p.n_embd as u64;
    let v = p.n_vocab as u64;
    let hd = (p.n_embd / p.n_head) as u64;
    // Scales chosen so random models are neither chaotic nor degenerate: the
    // embedding (rms 1) carries the residual stream, each block adds about
    // half of that, the router spreads its logits, and a tied head gives
    // logits of standard deviation ~4. With these, llama.cpp's logits for an
    // F16 copy of tiny-moe agree with the F32 original to cosine 0.99999 and
    // Q8_0 to 0.995, while 32 positions give ~30 distinct argmaxes.
    const EMBED_STD: f32 = 1.0;
    const OUT_GAIN: f32 = 0.5;
    const ROUTER_GAIN: f32 = 2.0;
    const HEAD_GAIN: f32 = 4.0;
    let lin = |fan_in: u64| Init::Uniform {
        std: 1.0 / (fan_in as f32).sqrt(),
    };
    // Output-side projections (back into the residual stream).
    let out_proj = |fan_in: u64| Init::Uniform {
        std: OUT_GAIN / (fan_in as f32).sqrt(),
    };
    let router = Init::Uniform {
        std: ROUTER_GAIN / (e as f32).sqrt(),
    };
    let mut out = Vec::new();
    let mut push = |name: String, dims: &[u64], ty: GgmlType, init: Init| {
        out.push(Planned {
            spec: TensorSpec::new(name, dims, ty),
            init,
        })
    };
    let head = Init::Uniform {
        std: HEAD_GAIN / (e as f32).sqrt(),
    };
    let embd = if p.tied_output {
        head
    } else {
        Init::Uniform { std: EMBED_STD }
    };
    let embd_role = if p.tied_output {
        Role::Output
    } else {
        Role::Other
    };
    push("token_embd.weight".into(), &[e, v], wt(embd_role), embd);
    push(
        "token_embd_norm.weight".into(),
        &[e],
        GgmlType::F32,
        Init::Gain,
    );
    if !p.tied_output {
        push("output.weight".into(), &[e, v], wt(Role::Output), head);
    }
    for i in 0..p.n_layer {
        let b = |s: &str| format!("blk.{i}.{s}");
        push(b("attn_norm.weight"), &[e], GgmlType::F32, Init::Gain);
        if p.attention_layers.contains(&i) {
            let kv = p.n_head_kv as u64 * hd;
            let ia = p
                .attention_layers
                .iter()
                .position(|&l| l == i)
                .expect("attention layer");
            push(b("attn_q.weight"), &[e, e], wt(Role::Other), lin(e));
            push(b("attn_k.weight"), &[e, kv], wt(Role::AttnK), lin(e));
            push(
                b("attn_v.weight"),
                &[e, kv],
                wt(Role::AttnV { i: ia, n: n_attn }),
                lin(e),
            );
            push(
                b("attn_output.weight"),
                &[e, e],
                wt(Role::AttnOut),
                out_proj(e),
            );
            push(b("attn_q_norm.weight"), &[hd], GgmlType::F32, Init::Gain);
            push(b("attn_k_norm.weight"), &[hd], GgmlType::F32, Init::Gain);
        } else {
            let l = p.conv_l_cache as u64;
            push(
                b("shortconv.conv.weight"),
                &[l, e],
                GgmlType::F32,
                Init::Uniform { std: 0.5 },
            );
            push(
                b("shortconv.in_proj.weight"),
                &[e, 3 * e],
                wt(Role::Other),
                lin(e),
            );
            push(
                b("shortconv.out_proj.weight"),
                &[e, e],
                wt(Role::Other),
                out_proj(e),
            );
        }
        push(b("ffn_norm.weight"), &[e], GgmlType::F32, Init::Gain);
        if p.arch == Arch::Lfm2Moe && i >= p.n_layer_dense_lead {
            let (x, f) = (p.n_expert as u64, p.n_ff_exp as u64);
            push(b("ffn_gate_inp.weight"), &[e, x], GgmlType::F32, router);
            let bias = if p.router_skew > 0.0 {
                Init::SkewedBias {
                    skew: p.router_skew,
                }
            } else {
                Init::Uniform { std: 0.05 }
            };
            push(b("exp_probs_b.bias"), &[x], GgmlType::F32, bias);
            let down = Role::FfnDown { i, n: p.n_layer };
            push(
                b("ffn_gate_exps.weight"),
                &[e, f, x],
                wt(Role::Other),
                lin(e),
            );
            push(b("ffn_up_exps.weight"), &[e, f, x], wt(Role::Other), lin(e));
            push(b("ffn_down_exps.weight"), &[f, e, x], wt(down), out_proj(f));
        } else {
            let f = p.n_ff as u64;
            let down = Role::FfnDown { i, n: p.n_layer };
            push(b("ffn_gate.weight"), &[e, f], wt(Role::Other), lin(e));
            push(b("ffn_up.weight"), &[e, f], wt(Role::Other), lin(e));
            push(b("ffn_down.weight"), &[f, e], wt(down), out_proj(f));
        }
    }
    out
}

fn metadata(p: &Preset, q: SynthQuant, seed: u64) -> Vec<(String, Value)> {
    let a = p.arch.as_str();
    let k = |s: &str| format!("{a}.{s}");
    let u32v = |n: usize| Value::U32(n as u32);
    let head_kv: Vec<i32> = (0..p.n_layer)
        .map(|i| {
            if p.attention_layers.contains(&i) {
                p.n_head_kv as i32
            } else {
                0
            }
        })
        .collect();
    let mut m = vec![
        ("general.architecture".to_owned(), Value::String(a.into())),
        ("general.name".into(), Value::String(p.display_name.into())),
        ("general.file_type".into(), Value::U32(q.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        ("lfmd.synthetic.preset".into(), Value::String(p.name.into())),
        ("lfmd.synthetic.seed".into(), Value::U64(seed)),
        (k("block_count"), u32v(p.n_layer)),
        (k("context_length"), u32v(p.n_ctx)),
        (k("embedding_length"), u32v(p.n_embd)),
        (k("feed_forward_length"), u32v(p.n_ff)),
        (k("attention.head_count"), u32v(p.n_head)),
        (
            k("attention.head_count_kv"),
            Value::Array(Array::I32(head_kv)),
        ),
        (k("rope.freq_base"), Value::F32(p.rope_freq_base)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(p.norm_eps),
        ),
        (k("vocab_size"), u32v(p.n_vocab)),
        (k("shortconv.l_cache"), u32v(p.conv_l_cache)),
    ];
    if p.arch == Arch::Lfm2Moe {
        m.extend([
            (k("expert_count"), u32v(p.n_expert)),
            (k("expert_used_count"), u32v(p.n_expert_used)),
            (k("expert_feed_forward_length"), u32v(p.n_ff_exp)),
            (k("leading_dense_block_count"), u32v(p.n_layer_dense_lead)),
            (
                k("expert_gating_func"),
                Value::U32(GatingFunc::Sigmoid.id()),
            ),
        ]);
    }
    m.extend(vocab::lfm2_vocab_metadata(p.n_vocab));
    m.push((
        "tokenizer.chat_template".into(),
        Value::String(LFM2_CHAT_TEMPLATE.into()),
    ));
    m
}

/// Elements generated per chunk: bounded memory whatever the tensor size.
const CHUNK_ELEMS: usize = 1 << 20;

fn draw(init: Init, rng: &mut Rng, out: &mut [f32]) {
    match init {
        Init::Gain => out
            .iter_mut()
            .for_each(|x| *x = 1.0 + 0.2 * rng.next_signed()),
        Init::Uniform { std } => {
            let a = std * 3f32.sqrt();
            out.iter_mut().for_each(|x| *x = a * rng.next_signed());
        }
        Init::SkewedBias { skew } => {
            let n = out.len();
            let mut rank: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                rank.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let span = (n.max(2) - 1) as f32;
            for (x, &r) in out.iter_mut().zip(&rank) {
                let t = 1.0 - r as f32 / span;
                *x = skew * t * t;
            }
        }
    }
}

/// Encodes f32 values as `ty` with ggml's reference quantizers (the bytes
/// llama-quantize writes for the same values without an importance matrix).
fn encode(values: &[f32], ty: GgmlType, out: &mut Vec<u8>) {
    let wt = crate::engine::weight_type(ty);
    out.clear();
    out.resize(wt.row_bytes(values.len()), 0);
    scalar::quantize_row(wt, values, out);
}

/// Random but valid quantized blocks with the weights' standard deviation:
/// each block's scale is drawn around `std / std(q)`, its codes uniformly and
/// symmetrically around zero. (Plain random nibbles would give every weight a
/// mean of -0.5 steps, a bias that makes every row of a matrix point the same
/// way and the model degenerate.)
fn random_blocks(ty: GgmlType, std: f32, n_elems: usize, rng: &mut Rng, out: &mut Vec<u8>) {
    // Codes: Q4_0 nibbles 1..=15 with 0 remapped to 8 (weights -7..=7 steps);
    // Q8_0 bytes with -128 remapped to 0 (ggml's quantizer never emits -128).
    let (q_std, block_bytes) = match ty {
        GgmlType::Q4_0 => (4.18f32, 18usize),
        GgmlType::Q8_0 => (73.3, 34),
        _ => unreachable!("random blocks only for q4_0 / q8_0"),
    };
    let n_blocks = n_elems / QK;
    out.clear();
    out.resize(n_blocks * block_bytes, 0);
    rng.fill_bytes(out);
    for b in out.chunks_exact_mut(block_bytes) {
        let d = std / q_std * (0.75 + 0.5 * rng.next_f32());
        b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for q in &mut b[2..] {
            *q = match ty {
                GgmlType::Q8_0 if *q == 0x80 => 0,
                GgmlType::Q8_0 => *q,
                _ => {
                    let lo = if *q & 0x0f == 0 { 8 } else { *q & 0x0f };
                    let hi = if *q >> 4 == 0 { 8 } else { *q >> 4 };
                    lo | (hi << 4)
                }
            };
        }
    }
}

/// Writes a synthetic model to `out` (via a temporary file and a rename, so
/// a reader never sees a half-written model).
pub fn write_model(
    preset: &Preset,
    quant: impl Into<SynthQuant>,
    seed: u64,
    out: &Path,
) -> Result<SynthSummary, SynthError> {
    let io = |source| SynthError::Io {
        path: out.display().to_string(),
        source,
    };
    let tmp = out.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let result = write_to(preset, quant, seed, BufWriter::with_capacity(8 << 20, file));
    match result {
        Ok(summary) => {
            std::fs::rename(&tmp, out).map_err(io)?;
            Ok(summary)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Streams a synthetic model into any writer.
pub fn write_to<W: Write>(
    preset: &Preset,
    quant: impl Into<SynthQuant>,
    seed: u64,
    w: W,
) -> Result<SynthSummary, SynthError> {
    let q = quant.into();
    if let SynthQuant::Uniform(t) = q
        && !SYNTH_QUANTS.contains(&t)
    {
        return Err(SynthError::UnsupportedQuant(t.name().to_lowercase()));
    }
    let plan = plan(preset, q);
    let specs: Vec<TensorSpec> = plan.iter().map(|t| t.spec.clone()).collect();
    let mut writer = GgufWriter::new(w, &metadata(preset, q, seed), specs)?;
    let mut values = Vec::new();
    let mut bytes = Vec::new();
    let mut n_params = 0;
    for t in &plan {
        let mut rng = Rng::for_item(seed, &t.spec.name);
        let n = t.spec.n_elements() as usize;
        n_params += n as u64;
        let row = t.spec.dims[0] as usize;
        let chunk = (CHUNK_ELEMS / row).max(1) * row;
        let mut done = 0;
        while done < n {
            let len = chunk.min(n - done);
            match (t.init, t.spec.ty) {
                (Init::Uniform { std }, GgmlType::Q4_0 | GgmlType::Q8_0) if !preset.exact => {
                    random_blocks(t.spec.ty, std, len, &mut rng, &mut bytes);
                }
                _ => {
                    values.resize(len, 0.0);
                    draw(t.init, &mut rng, &mut values);
                    encode(&values, t.spec.ty, &mut bytes);
                }
            }
            writer.write_data(&bytes)?;
            done += len;
        }
    }
    let bytes = writer.bytes_written();
    writer.finish()?;
    Ok(SynthSummary {
        tensors: plan.len(),
        bytes,
        n_params,
    })
}
