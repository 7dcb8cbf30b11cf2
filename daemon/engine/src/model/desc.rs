//! [`ModelDesc`]: the hyper-parameters of an `lfm2` or `lfm2moe` model, taken
//! from GGUF metadata the way llama.cpp reads them, and the check that the
//! file holds every tensor the architecture needs, in the right shape.

use crate::gguf::{GgufHeader, Value};
use serde::Serialize;
use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("metadata key {key:?} is missing; {hint}")]
    MissingKey { key: String, hint: &'static str },
    #[error("metadata key {key:?} (at offset {offset}): expected {expected}, found {found}")]
    BadValue {
        key: String,
        offset: u64,
        expected: String,
        found: String,
    },
    #[error("architecture {0:?} is not supported: lfmd runs `lfm2` and `lfm2moe` models")]
    UnsupportedArch(String),
    #[error("no general.architecture key: this GGUF does not say what model it holds")]
    NoArch,
    #[error("{0}")]
    Inconsistent(String),
    #[error("tensor {name} is missing (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<u64> },
    #[error(
        "tensor {name} has type {ty}, which lfmd cannot compute yet (supported: {supported}); requantize it to one of those with llama-quantize"
    )]
    UnsupportedType {
        name: String,
        ty: crate::gguf::GgmlType,
        supported: String,
    },
    #[error("{name}: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<u64>,
        found: Vec<u64>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Lfm2,
    Lfm2Moe,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Lfm2 => "lfm2",
            Arch::Lfm2Moe => "lfm2moe",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How router logits become expert weights (llama.cpp's
/// `llama_expert_gating_func_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GatingFunc {
    Softmax,
    Sigmoid,
    SoftmaxWeight,
}

impl GatingFunc {
    pub fn from_id(id: i64) -> Option<Self> {
        match id {
            1 => Some(GatingFunc::Softmax),
            2 => Some(GatingFunc::Sigmoid),
            3 => Some(GatingFunc::SoftmaxWeight),
            _ => None,
        }
    }

    pub fn id(self) -> u32 {
        match self {
            GatingFunc::Softmax => 1,
            GatingFunc::Sigmoid => 2,
            GatingFunc::SoftmaxWeight => 3,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LayerKind {
    /// Gated short convolution (`attention.head_count_kv` = 0 for the layer).
    ShortConv,
    /// Grouped-query attention with this many KV heads.
    Attention { n_head_kv: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LayerDesc {
    #[serde(flatten)]
    pub kind: LayerKind,
    /// Mixture-of-experts FFN (else dense SwiGLU).
    pub moe: bool,
}

/// The hyper-parameters of one model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelDesc {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    /// Dense FFN width.
    pub n_ff: usize,
    pub n_head: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rope_freq_base: f32,
    pub norm_eps: f32,
    /// Conv kernel length (`shortconv.l_cache`); the rolling state keeps
    /// `conv_l_cache - 1` past positions.
    pub conv_l_cache: usize,
    /// MoE only: experts, experts per token, expert FFN width, dense lead.
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_ff_exp: usize,
    pub n_layer_dense_lead: usize,
    pub gating: Option<GatingFunc>,
    /// Logits come from `token_embd` (no `output.weight` in the file).
    pub tied_output: bool,
    pub layers: Vec<LayerDesc>,
}

/// A tensor the architecture requires, with its ggml-order shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpectedTensor {
    pub name: String,
    pub dims: Vec<u64>,
}

struct Meta<'a> {
    h: &'a GgufHeader,
    arch: &'static str,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{}", self.arch, k)
    }

    fn bad(&self, key: &str, expected: &str) -> ModelError {
        let e = self.h.entry(key).expect("bad() is called for present keys");
        ModelError::BadValue {
            key: key.to_owned(),
            offset: e.offset,
            expected: expected.to_owned(),
            found: format!("{} {}", e.value.value_type().name(), e.value),
        }
    }

    fn opt_uint(&self, k: &str) -> Result<Option<usize>, ModelError> {
        let key = self.key(k);
        match self.h.get(&key) {
            None => Ok(None),
            Some(v) => match v.as_i64() {
                Some(n) if (0..=u32::MAX as i64).contains(&n) && !matches!(v, Value::Bool(_)) => {
                    Ok(Some(n as usize))
                }
                _ => Err(self.bad(&key, "an unsigned integer")),
            },
        }
    }

    fn uint(&self, k: &str, hint: &'static str) -> Result<usize, ModelError> {
        self.opt_uint(k)?.ok_or_else(|| ModelError::MissingKey {
            key: self.key(k),
            hint,
        })
    }

    fn opt_f32(&self, k: &str) -> Result<Option<f32>, ModelError> {
        let key = self.key(k);
        match self.h.get(&key) {
            None => Ok(None),
            Some(Value::F32(x)) if x.is_finite() => Ok(Some(*x)),
            Some(Value::F64(x)) if x.is_finite() => Ok(Some(*x as f32)),
            Some(_) => Err(self.bad(&key, "a finite float")),
        }
    }

    /// A per-layer value stored either as one integer or as an array with
    /// one entry per layer (llama.cpp's `get_key_or_arr`).
    fn per_layer(
        &self,
        k: &str,
        n_layer: usize,
        hint: &'static str,
    ) -> Result<Vec<usize>, ModelError> {
        let key = self.key(k);
        let Some(v) = self.h.get(&key) else {
            return Err(ModelError::MissingKey { key, hint });
        };
        if let Some(a) = v.as_array() {
            if a.len() != n_layer {
                return Err(self.bad(
                    &key,
                    &format!("an array of {n_layer} integers (one per layer)"),
                ));
            }
            (0..n_layer)
                .map(|i| match a.int_at(i) {
                    Some(n) if (0..=u32::MAX as i64).contains(&n) => Ok(n as usize),
                    _ => Err(self.bad(&key, "non-negative integers")),
                })
                .collect()
        } else {
            let n = self.uint(k, hint)?;
            Ok(vec![n; n_layer])
        }
    }
}

impl ModelDesc {
    /// Reads the description from metadata. The tensor set is checked
    /// separately by [`ModelDesc::validate_tensors`].
    pub fn from_header(h: &GgufHeader) -> Result<Self, ModelError> {
        let arch = match h.get("general.architecture") {
            None => return Err(ModelError::NoArch),
            Some(Value::String(s)) if s == "lfm2" => Arch::Lfm2,
            Some(Value::String(s)) if s == "lfm2moe" => Arch::Lfm2Moe,
            Some(Value::String(s)) => return Err(ModelError::UnsupportedArch(s.clone())),
            Some(v) => return Err(ModelError::UnsupportedArch(v.to_string())),
        };
        let m = Meta {
            h,
            arch: arch.as_str(),
        };
        const HP: &str =
            "every LFM2 GGUF written by llama.cpp's converter has it; is the file complete?";
        let n_layer = m.uint("block_count", HP)?;
        let n_embd = m.uint("embedding_length", HP)?;
        let n_head = m.uint("attention.head_count", HP)?;
        let n_ff = m.uint("feed_forward_length", HP)?;
        let head_kv = m.per_layer("attention.head_count_kv", n_layer, HP)?;
        let conv_l_cache = m.uint("shortconv.l_cache", HP)?;
        let norm_eps = m
            .opt_f32("attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| ModelError::MissingKey {
                key: m.key("attention.layer_norm_rms_epsilon"),
                hint: HP,
            })?;
        let rope_freq_base = m.opt_f32("rope.freq_base")?.unwrap_or(10_000.0);
        let n_ctx_train = m.uint("context_length", HP)?;

        let n_vocab = match m.opt_uint("vocab_size")? {
            Some(n) => n,
            None => match h.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
                Some(a) => a.len(),
                None => match h.tensor("token_embd.weight") {
                    Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
                    _ => {
                        return Err(ModelError::MissingKey {
                            key: m.key("vocab_size"),
                            hint: "nor are there tokenizer.ggml.tokens or a 2-D token_embd.weight to take it from",
                        });
                    }
                },
            },
        };

        let (n_expert, n_expert_used, n_ff_exp, n_layer_dense_lead, gating) = match arch {
            Arch::Lfm2 => (0, 0, 0, n_layer, None),
            Arch::Lfm2Moe => {
                const MOE: &str = "lfm2moe models need it; is the file complete?";
                let n_expert = m.uint("expert_count", MOE)?;
                let n_expert_used = m.uint("expert_used_count", MOE)?;
                let ff_exp = m.per_layer("expert_feed_forward_length", n_layer, MOE)?;
                if ff_exp.iter().any(|&f| f != ff_exp[0]) {
                    return Err(ModelError::Inconsistent(format!(
                        "{}: per-layer expert widths {ff_exp:?} differ; lfmd supports one width",
                        m.key("expert_feed_forward_length")
                    )));
                }
                let lead = m.opt_uint("leading_dense_block_count")?.unwrap_or(0);
                let gkey = m.key("expert_gating_func");
                let gating = match h.get(&gkey) {
                    None => {
                        return Err(ModelError::MissingKey {
                            key: gkey,
                            hint: MOE,
                        });
                    }
                    Some(v) => v.as_i64().and_then(GatingFunc::from_id).ok_or_else(|| {
                        m.bad(&gkey, "1 (softmax), 2 (sigmoid) or 3 (softmax_weight)")
                    })?,
                };
                (n_expert, n_expert_used, ff_exp[0], lead, Some(gating))
            }
        };

        let check = |ok: bool, what: String| {
            if ok {
                Ok(())
            } else {
                Err(ModelError::Inconsistent(what))
            }
        };
        check(n_layer > 0, format!("{}: no layers", m.key("block_count")))?;
        check(
            n_embd > 0 && n_head > 0 && n_embd % n_head == 0,
            format!(
                "embedding length {n_embd} is not a positive multiple of the head count {n_head}"
            ),
        )?;
        check(
            conv_l_cache >= 2,
            format!(
                "{}: {conv_l_cache} must be at least 2",
                m.key("shortconv.l_cache")
            ),
        )?;
        check(n_vocab > 0, "vocabulary is empty".into())?;
        for (i, &kv) in head_kv.iter().enumerate() {
            check(
                kv == 0 || n_head % kv == 0,
                format!("layer {i}: {n_head} heads do not divide into {kv} KV heads"),
            )?;
        }
        if arch == Arch::Lfm2Moe {
            check(
                n_expert > 0 && n_expert_used > 0 && n_expert_used <= n_expert,
                format!(
                    "experts per token {n_expert_used} must be between 1 and the expert count {n_expert}"
                ),
            )?;
            check(
                n_layer_dense_lead <= n_layer,
                format!(
                    "{} dense lead layers but only {n_layer} layers",
                    n_layer_dense_lead
                ),
            )?;
        }

        let layers = (0..n_layer)
            .map(|i| LayerDesc {
                kind: match head_kv[i] {
                    0 => LayerKind::ShortConv,
                    n => LayerKind::Attention {
                        n_head_kv: n as u32,
                    },
                },
                moe: arch == Arch::Lfm2Moe && i >= n_layer_dense_lead,
            })
            .collect();
        Ok(ModelDesc {
            arch,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            head_dim: n_embd / n_head,
            n_vocab,
            n_ctx_train,
            rope_freq_base,
            norm_eps,
            conv_l_cache,
            n_expert,
            n_expert_used,
            n_ff_exp,
            n_layer_dense_lead,
            gating,
            tied_output: h.tensor("output.weight").is_none(),
            layers,
        })
    }

    /// Every tensor the architecture needs, in the order our writer emits
    /// them (llama.cpp does not care about order).
    pub fn expected_tensors(&self) -> Vec<ExpectedTensor> {
        let (e, v) = (self.n_embd as u64, self.n_vocab as u64);
        let mut out = Vec::new();
        let mut push = |name: String, dims: &[u64]| {
            out.push(ExpectedTensor {
                name,
                dims: dims.to_vec(),
            })
        };
        push("token_embd.weight".into(), &[e, v]);
        push("token_embd_norm.weight".into(), &[e]);
        if !self.tied_output {
            push("output.weight".into(), &[e, v]);
        }
        for (i, l) in self.layers.iter().enumerate() {
            let b = |s: &str| format!("blk.{i}.{s}");
            push(b("attn_norm.weight"), &[e]);
            match l.kind {
                LayerKind::ShortConv => {
                    push(b("shortconv.conv.weight"), &[self.conv_l_cache as u64, e]);
                    push(b("shortconv.in_proj.weight"), &[e, 3 * e]);
                    push(b("shortconv.out_proj.weight"), &[e, e]);
                }
                LayerKind::Attention { n_head_kv } => {
                    let hd = self.head_dim as u64;
                    let kv = u64::from(n_head_kv) * hd;
                    push(b("attn_q.weight"), &[e, e]);
                    push(b("attn_k.weight"), &[e, kv]);
                    push(b("attn_v.weight"), &[e, kv]);
                    push(b("attn_output.weight"), &[e, e]);
                    push(b("attn_q_norm.weight"), &[hd]);
                    push(b("attn_k_norm.weight"), &[hd]);
                }
            }
            push(b("ffn_norm.weight"), &[e]);
            if l.moe {
                let (x, f) = (self.n_expert as u64, self.n_ff_exp as u64);
                push(b("ffn_gate_inp.weight"), &[e, x]);
                push(b("exp_probs_b.bias"), &[x]);
                push(b("ffn_gate_exps.weight"), &[e, f, x]);
                push(b("ffn_up_exps.weight"), &[e, f, x]);
                push(b("ffn_down_exps.weight"), &[f, e, x]);
            } else {
                let f = self.n_ff as u64;
                push(b("ffn_gate.weight"), &[e, f]);
                push(b("ffn_up.weight"), &[e, f]);
                push(b("ffn_down.weight"), &[f, e]);
            }
        }
        out
    }

    /// Checks that every expected tensor exists with the expected shape.
    pub fn validate_tensors(&self, h: &GgufHeader) -> Result<(), ModelError> {
        for t in self.expected_tensors() {
            match h.tensor(&t.name) {
                None => {
                    return Err(ModelError::MissingTensor {
                        name: t.name,
                        expected: t.dims,
                    });
                }
                Some(info) if info.dims != t.dims => {
                    return Err(ModelError::ShapeMismatch {
                        name: t.name,
                        expected: t.dims,
                        found: info.dims.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Checks that every tensor the model uses has a type in `supported`.
    pub fn check_types(
        &self,
        h: &GgufHeader,
        supported: &[crate::gguf::GgmlType],
    ) -> Result<(), ModelError> {
        for t in self.expected_tensors() {
            if let Some(info) = h.tensor(&t.name)
                && !supported.contains(&info.ty)
            {
                return Err(ModelError::UnsupportedType {
                    name: t.name,
                    ty: info.ty,
                    supported: supported
                        .iter()
                        .map(|t| t.name())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        Ok(())
    }

    pub fn n_attention_layers(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| matches!(l.kind, LayerKind::Attention { .. }))
            .count()
    }

    pub fn n_moe_layers(&self) -> usize {
        self.layers.iter().filter(|l| l.moe).count()
    }
}
