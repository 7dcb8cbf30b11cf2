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
use half::{bf16, f16};
use lfm_kernels::{BlockQ4_0, BlockQ8_0, QK, scalar};
use std::io::{BufWriter, Write};
use std::path::Path;

/// The LFM2 chat template shipped in LiquidAI's GGUFs.
pub const LFM2_CHAT_TEMPLATE: &str = include_str!("../../assets/lfm2-chat-template.jinja");

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown preset {0:?}; choose one of {list}", list = preset_names().join(", "))]
    UnknownPreset(String),
    #[error(
        "lfmd synth writes f32, f16, bf16, q8_0 and q4_0, not {0:?}; make other types with llama-quantize from an f32 file"
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

/// Weight types `lfmd synth` writes directly.
pub const SYNTH_QUANTS: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
];

/// llama.cpp's `llama_ftype` for a file whose weights are mostly `ty`.
pub fn file_type_for(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
        GgmlType::BF16 => 32,
        _ => unreachable!("synth writes only SYNTH_QUANTS"),
    }
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Init {
    /// 1 + uniform noise: RMSNorm gains.
    Gain,
    /// Zero-mean uniform with this standard deviation.
    Uniform { std: f32 },
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

fn plan(p: &Preset, wt: GgmlType) -> Vec<Planned> {
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
    push("token_embd.weight".into(), &[e, v], wt, embd);
    push(
        "token_embd_norm.weight".into(),
        &[e],
        GgmlType::F32,
        Init::Gain,
    );
    if !p.tied_output {
        push("output.weight".into(), &[e, v], wt, head);
    }
    for i in 0..p.n_layer {
        let b = |s: &str| format!("blk.{i}.{s}");
        push(b("attn_norm.weight"), &[e], GgmlType::F32, Init::Gain);
        if p.attention_layers.contains(&i) {
            let kv = p.n_head_kv as u64 * hd;
            push(b("attn_q.weight"), &[e, e], wt, lin(e));
            push(b("attn_k.weight"), &[e, kv], wt, lin(e));
            push(b("attn_v.weight"), &[e, kv], wt, lin(e));
            push(b("attn_output.weight"), &[e, e], wt, out_proj(e));
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
            push(b("shortconv.in_proj.weight"), &[e, 3 * e], wt, lin(e));
            push(b("shortconv.out_proj.weight"), &[e, e], wt, out_proj(e));
        }
        push(b("ffn_norm.weight"), &[e], GgmlType::F32, Init::Gain);
        if p.arch == Arch::Lfm2Moe && i >= p.n_layer_dense_lead {
            let (x, f) = (p.n_expert as u64, p.n_ff_exp as u64);
            push(b("ffn_gate_inp.weight"), &[e, x], GgmlType::F32, router);
            push(
                b("exp_probs_b.bias"),
                &[x],
                GgmlType::F32,
                Init::Uniform { std: 0.05 },
            );
            push(b("ffn_gate_exps.weight"), &[e, f, x], wt, lin(e));
            push(b("ffn_up_exps.weight"), &[e, f, x], wt, lin(e));
            push(b("ffn_down_exps.weight"), &[f, e, x], wt, out_proj(f));
        } else {
            let f = p.n_ff as u64;
            push(b("ffn_gate.weight"), &[e, f], wt, lin(e));
            push(b("ffn_up.weight"), &[e, f], wt, lin(e));
            push(b("ffn_down.weight"), &[f, e], wt, out_proj(f));
        }
    }
    out
}

fn metadata(p: &Preset, wt: GgmlType, seed: u64) -> Vec<(String, Value)> {
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
        ("general.file_type".into(), Value::U32(file_type_for(wt))),
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
    let voc = vocab::lfm2_vocab(p.n_vocab);
    m.extend([
        (
            "tokenizer.ggml.model".to_owned(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".into(), Value::String("lfm2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(voc.tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(voc.token_types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(voc.merges)),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(vocab::BOS)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(vocab::EOS)),
        (
            "tokenizer.ggml.padding_token_id".into(),
            Value::U32(vocab::PAD),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(LFM2_CHAT_TEMPLATE.into()),
        ),
    ]);
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
    }
}

fn encode(values: &[f32], ty: GgmlType, out: &mut Vec<u8>) {
    out.clear();
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => {
            let mut blocks = vec![
                BlockQ8_0 {
                    d: f16::ZERO,
                    qs: [0; QK]
                };
                values.len() / QK
            ];
            scalar::quantize_row_q8_0(values, &mut blocks);
            for b in &blocks {
                out.extend_from_slice(&b.d.to_le_bytes());
                out.extend(b.qs.iter().map(|&q| q as u8));
            }
        }
        GgmlType::Q4_0 => {
            let mut blocks = vec![
                BlockQ4_0 {
                    d: f16::ZERO,
                    qs: [0; QK / 2]
                };
                values.len() / QK
            ];
            scalar::quantize_row_q4_0(values, &mut blocks);
            for b in &blocks {
                out.extend_from_slice(&b.d.to_le_bytes());
                out.extend_from_slice(&b.qs);
            }
        }
        _ => unreachable!("synth writes only SYNTH_QUANTS"),
    }
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
    wt: GgmlType,
    seed: u64,
    out: &Path,
) -> Result<SynthSummary, SynthError> {
    let io = |source| SynthError::Io {
        path: out.display().to_string(),
        source,
    };
    let tmp = out.with_extension("gguf.partial");
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let result = write_to(preset, wt, seed, BufWriter::with_capacity(8 << 20, file));
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
    wt: GgmlType,
    seed: u64,
    w: W,
) -> Result<SynthSummary, SynthError> {
    if !SYNTH_QUANTS.contains(&wt) {
        return Err(SynthError::UnsupportedQuant(wt.name().to_lowercase()));
    }
    let plan = plan(preset, wt);
    let specs: Vec<TensorSpec> = plan.iter().map(|t| t.spec.clone()).collect();
    let mut writer = GgufWriter::new(w, &metadata(preset, wt, seed), specs)?;
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
