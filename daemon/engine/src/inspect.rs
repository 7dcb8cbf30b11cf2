//! `lfmd inspect`: what a GGUF holds, for people (text) and scripts (JSON).
//! The JSON field names are documented in README.md and are a stable API.

use crate::gguf::{GgufHeader, Value};
use crate::model::{ExpertIndex, ExpertSlices, LayerKind, ModelDesc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Serialize)]
pub struct TypeBytes {
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct LayerRow {
    pub index: usize,
    /// "conv" or "attention".
    pub mixer: &'static str,
    pub n_head_kv: u32,
    /// "dense" or "moe".
    pub ffn: &'static str,
}

#[derive(Debug, Serialize)]
pub struct TokenizerSummary {
    pub model: Option<String>,
    pub pre: Option<String>,
    pub n_tokens: usize,
    pub n_merges: usize,
    pub bos: Option<i64>,
    pub eos: Option<i64>,
    pub pad: Option<i64>,
    pub add_bos: Option<bool>,
    pub n_control_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct Synthetic {
    pub preset: String,
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub path: String,
    pub file_bytes: u64,
    pub gguf_version: u32,
    pub architecture: Option<String>,
    pub name: Option<String>,
    pub file_type: Option<String>,
    pub file_type_id: Option<i64>,
    pub synthetic: Option<Synthetic>,
    pub n_tensors: usize,
    pub n_metadata: usize,
    pub total_params: u64,
    pub active_params: u64,
    pub bytes_by_type: BTreeMap<String, TypeBytes>,
    /// `None` when the file is not a loadable lfm2/lfm2moe model; see `model_error`.
    pub model: Option<ModelDesc>,
    pub model_error: Option<String>,
    pub layers: Vec<LayerRow>,
    pub experts: Vec<ExpertSlices>,
    pub expert_bytes: u64,
    pub tokenizer: TokenizerSummary,
    pub chat_template_bytes: Option<usize>,
    pub unexpected_tensors: Vec<String>,
    /// The kernel path this machine would run the model with (`LFM_ISA`
    /// honoured), e.g. `avx512+vnni`; an invalid `LFM_ISA` shows its error.
    pub isa: String,
}

/// llama.cpp's `llama_ftype` names.
pub fn file_type_name(id: i64) -> Option<&'static str> {
    Some(match id & !1024 {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

fn is_expert_tensor(name: &str) -> bool {
    name.ends_with("_exps.weight")
}

/// Describes a parsed file; `path` is only echoed back.
pub fn inspect(g: &GgufHeader, path: &str) -> InspectReport {
    let str_of = |k: &str| g.get(k).and_then(Value::as_str).map(str::to_owned);
    let int_of = |k: &str| g.get(k).and_then(Value::as_i64);
    let arr_len = |k: &str| g.get(k).and_then(Value::as_array).map_or(0, |a| a.len());

    let (model, model_error) =
        match ModelDesc::from_header(g).and_then(|d| d.validate_tensors(g).map(|()| d)) {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e.to_string())),
        };
    let used_fraction = model
        .as_ref()
        .filter(|d| d.n_expert > 0)
        .map_or(1.0, |d| d.n_expert_used as f64 / d.n_expert as f64);

    let mut bytes_by_type: BTreeMap<String, TypeBytes> = BTreeMap::new();
    let (mut total, mut active) = (0u64, 0f64);
    for t in &g.tensors {
        let n = t.n_elements();
        total += n;
        active += if is_expert_tensor(&t.name) {
            n as f64 * used_fraction
        } else {
            n as f64
        };
        let e = bytes_by_type
            .entry(t.ty.name().to_owned())
            .or_insert(TypeBytes {
                tensors: 0,
                params: 0,
                bytes: 0,
            });
        e.tensors += 1;
        e.params += n;
        e.bytes += t.size;
    }

    let (layers, experts, unexpected) = match &model {
        Some(d) => {
            let layers = d
                .layers
                .iter()
                .enumerate()
                .map(|(index, l)| LayerRow {
                    index,
                    mixer: match l.kind {
                        LayerKind::ShortConv => "conv",
                        LayerKind::Attention { .. } => "attention",
                    },
                    n_head_kv: match l.kind {
                        LayerKind::ShortConv => 0,
                        LayerKind::Attention { n_head_kv } => n_head_kv,
                    },
                    ffn: if l.moe { "moe" } else { "dense" },
                })
                .collect();
            let experts: Vec<ExpertSlices> = ExpertIndex::build(g, d)
                .layers
                .into_iter()
                .flatten()
                .collect();
            let expected: std::collections::HashSet<String> =
                d.expected_tensors().into_iter().map(|t| t.name).collect();
            let unexpected = g
                .tensors
                .iter()
                .filter(|t| !expected.contains(&t.name))
                .map(|t| t.name.clone())
                .collect();
            (layers, experts, unexpected)
        }
        None => (Vec::new(), Vec::new(), Vec::new()),
    };

    let n_control = g
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map_or(0, |a| {
            (0..a.len()).filter(|&i| a.int_at(i) == Some(3)).count()
        });
    let file_type_id = int_of("general.file_type");
    InspectReport {
        path: path.to_owned(),
        file_bytes: g.file_len,
        gguf_version: g.version,
        architecture: str_of("general.architecture"),
        name: str_of("general.name"),
        file_type: file_type_id.and_then(file_type_name).map(str::to_owned),
        file_type_id,
        synthetic: str_of("lfmd.synthetic.preset").map(|preset| Synthetic {
            preset,
            seed: int_of("lfmd.synthetic.seed").unwrap_or(0) as u64,
        }),
        n_tensors: g.tensors.len(),
        n_metadata: g.metadata.len(),
        total_params: total,
        active_params: active.round() as u64,
        bytes_by_type,
        expert_bytes: experts.iter().map(ExpertSlices::bytes).sum(),
        model,
        model_error,
        layers,
        experts,
        tokenizer: TokenizerSummary {
            model: str_of("tokenizer.ggml.model"),
            pre: str_of("tokenizer.ggml.pre"),
            n_tokens: arr_len("tokenizer.ggml.tokens"),
            n_merges: arr_len("tokenizer.ggml.merges"),
            bos: int_of("tokenizer.ggml.bos_token_id"),
            eos: int_of("tokenizer.ggml.eos_token_id"),
            pad: int_of("tokenizer.ggml.padding_token_id"),
            add_bos: g
                .get("tokenizer.ggml.add_bos_token")
                .and_then(Value::as_bool),
            n_control_tokens: n_control,
        },
        chat_template_bytes: str_of("tokenizer.chat_template").map(|s| s.len()),
        unexpected_tensors: unexpected,
        isa: lfm_kernels::isa::Isa::from_env()
            .map_or_else(|e| format!("error: {e}"), |i| i.to_string()),
    }
}

/// Human units: 8.34 B, 1.56 B, 350.1 M.
pub fn fmt_count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} K", n / 1e3)
    } else {
        format!("{n}")
    }
}

pub fn fmt_bytes(n: u64) -> String {
    let n = n as f64;
    const K: f64 = 1024.0;
    if n >= K * K * K {
        format!("{:.2} GiB", n / (K * K * K))
    } else if n >= K * K {
        format!("{:.1} MiB", n / (K * K))
    } else if n >= K {
        format!("{:.1} KiB", n / K)
    } else {
        format!("{n} B")
    }
}

pub fn render_text(r: &InspectReport) -> String {
    let mut s = String::new();
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(
        s,
        "file           {} ({}, GGUF v{})",
        r.path,
        fmt_bytes(r.file_bytes),
        r.gguf_version
    );
    let _ = writeln!(s, "architecture   {}", opt(&r.architecture));
    let _ = writeln!(s, "name           {}", opt(&r.name));
    if let Some(syn) = &r.synthetic {
        let _ = writeln!(s, "synthetic      preset {}, seed {}", syn.preset, syn.seed);
    }
    let _ = writeln!(
        s,
        "file type      {}",
        match (&r.file_type, r.file_type_id) {
            (Some(n), Some(id)) => format!("{n} ({id})"),
            (None, Some(id)) => format!("unknown ({id})"),
            _ => "-".into(),
        }
    );
    let _ = writeln!(
        s,
        "parameters     {} total, {} active per token",
        fmt_count(r.total_params),
        fmt_count(r.active_params)
    );
    match (&r.model, &r.model_error) {
        (Some(d), _) => {
            let n_attn = d.n_attention_layers();
            let mut layers = format!(
                "{}: {} short-conv + {} attention",
                d.n_layer,
                d.n_layer - n_attn,
                n_attn
            );
            if d.n_expert > 0 {
                let _ = write!(
                    layers,
                    "; {} dense + {} MoE ({} experts, top {}, {:?} gating)",
                    d.n_layer - d.n_moe_layers(),
                    d.n_moe_layers(),
                    d.n_expert,
                    d.n_expert_used,
                    d.gating.expect("MoE models have gating")
                );
            }
            let _ = writeln!(s, "layers         {layers}");
            let _ = writeln!(
                s,
                "dimensions     embd {}, heads {} x {}, ffn {}{}, vocab {}, context {}",
                d.n_embd,
                d.n_head,
                d.head_dim,
                d.n_ff,
                if d.n_expert > 0 {
                    format!(", expert ffn {}", d.n_ff_exp)
                } else {
                    String::new()
                },
                d.n_vocab,
                d.n_ctx_train
            );
            let _ = writeln!(
                s,
                "               rope base {}, rms eps {:e}, conv kernel {}",
                d.rope_freq_base, d.norm_eps, d.conv_l_cache
            );
            let _ = writeln!(
                s,
                "output         {}",
                if d.tied_output {
                    "tied to token_embd"
                } else {
                    "output.weight"
                }
            );
        }
        (None, Some(e)) => {
            let _ = writeln!(s, "model          NOT LOADABLE: {e}");
        }
        (None, None) => {}
    }
    let t = &r.tokenizer;
    let _ = writeln!(
        s,
        "tokenizer      {} / {}, {} tokens ({} control), {} merges, bos {}, eos {}, add_bos {}",
        opt(&t.model),
        opt(&t.pre),
        t.n_tokens,
        t.n_control_tokens,
        t.n_merges,
        t.bos.map_or("-".into(), |v| v.to_string()),
        t.eos.map_or("-".into(), |v| v.to_string()),
        t.add_bos.map_or("-".into(), |v| v.to_string())
    );
    let _ = writeln!(s, "kernels        {}", r.isa);
    let _ = writeln!(
        s,
        "chat template  {}",
        r.chat_template_bytes.map_or(
            "absent (lfmd uses its built-in LFM2 format)".into(),
            |b| format!("present ({b} bytes)")
        )
    );
    let _ = writeln!(s, "\nbytes by type");
    for (ty, b) in &r.bytes_by_type {
        let _ = writeln!(
            s,
            "  {ty:<8} {:>5} tensors {:>12} params {:>12}",
            b.tensors,
            fmt_count(b.params),
            fmt_bytes(b.bytes)
        );
    }
    if !r.layers.is_empty() {
        let _ = writeln!(s, "\nlayers\n  #   mixer              ffn");
        for l in &r.layers {
            let mixer = if l.mixer == "attention" {
                format!("attention (kv {})", l.n_head_kv)
            } else {
                l.mixer.to_owned()
            };
            let _ = writeln!(s, "  {:<3} {mixer:<18} {}", l.index, l.ffn);
        }
    }
    if !r.experts.is_empty() {
        let _ = writeln!(
            s,
            "\nexperts ({} in all), absolute byte ranges [start, end) in the file",
            fmt_bytes(r.expert_bytes)
        );
        let _ = writeln!(
            s,
            "  layer expert  gate                      up                        down"
        );
        for e in &r.experts {
            let rg = |x: &std::ops::Range<u64>| format!("[{}, {})", x.start, x.end);
            let _ = writeln!(
                s,
                "  {:<5} {:<6}  {:<25} {:<25} {}",
                e.layer,
                e.expert,
                rg(&e.gate),
                rg(&e.up),
                rg(&e.down)
            );
        }
    }
    if !r.unexpected_tensors.is_empty() {
        let _ = writeln!(
            s,
            "\nunexpected tensors (ignored): {}",
            r.unexpected_tensors.join(", ")
        );
    }
    s
}
