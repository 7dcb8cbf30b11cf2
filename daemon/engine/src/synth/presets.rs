//! The synthetic model presets: the real LFM2-8B-A1B and LFM2-350M shapes,
//! and two small models that still exercise every code path (short-conv and
//! attention layers, GQA, dense lead layers, experts with a biased router,
//! an untied output head) while staying small enough for golden files.

use crate::model::Arch;

#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    pub display_name: &'static str,
    pub arch: Arch,
    pub n_embd: usize,
    pub n_layer: usize,
    /// Indices of the attention layers; the others are short-conv layers.
    pub attention_layers: &'static [usize],
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub conv_l_cache: usize,
    pub rope_freq_base: f32,
    pub norm_eps: f32,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_ff_exp: usize,
    pub n_layer_dense_lead: usize,
    /// `output.weight` absent: logits come from `token_embd` (as in the real
    /// LFM2 files). The small presets carry their own head, because with tied
    /// embeddings a random model's argmax is almost always the input token.
    pub tied_output: bool,
    /// Quantized tensors are quantized from f32 weights with ggml's reference
    /// quantizers. When false (the full-size presets), blocks are drawn
    /// directly at random: valid, the same scale, and fast to write.
    pub exact: bool,
    /// Expert bias that favours a few experts per layer, as trained routers
    /// do: expert of rank r (a random order per layer) gets
    /// `skew * (1 - r / (n - 1))^2` added to its selection score. 0: the
    /// small uniform bias of the other presets.
    pub router_skew: f32,
}

/// The real LFM2-8B-A1B shape.
const LFM2_8B_A1B: Preset = Preset {
    name: "8b-a1b",
    display_name: "LFM2-8B-A1B (synthetic)",
    arch: Arch::Lfm2Moe,
    n_embd: 2048,
    n_layer: 24,
    attention_layers: &[2, 6, 10, 14, 18, 21],
    n_head: 32,
    n_head_kv: 8,
    n_ff: 7168,
    n_vocab: 65536,
    n_ctx: 32768,
    conv_l_cache: 3,
    rope_freq_base: 1_000_000.0,
    norm_eps: 1e-5,
    n_expert: 32,
    n_expert_used: 4,
    n_ff_exp: 1792,
    n_layer_dense_lead: 2,
    tied_output: true,
    exact: false,
    router_skew: 0.0,
};

pub const PRESETS: &[Preset] = &[
    LFM2_8B_A1B,
    Preset {
        name: "8b-a1b-skewed",
        display_name: "LFM2-8B-A1B (synthetic, skewed routing)",
        router_skew: 0.6,
        ..LFM2_8B_A1B
    },
    Preset {
        name: "350m",
        display_name: "LFM2-350M (synthetic)",
        arch: Arch::Lfm2,
        n_embd: 1024,
        n_layer: 16,
        attention_layers: &[2, 5, 8, 10, 12, 14],
        n_head: 16,
        n_head_kv: 8,
        n_ff: 4608,
        n_vocab: 65536,
        n_ctx: 32768,
        conv_l_cache: 3,
        rope_freq_base: 1_000_000.0,
        norm_eps: 1e-5,
        n_expert: 0,
        n_expert_used: 0,
        n_ff_exp: 0,
        n_layer_dense_lead: 16,
        tied_output: true,
        exact: false,
        router_skew: 0.0,
    },
    Preset {
        name: "tiny-moe",
        display_name: "LFM2 tiny MoE (synthetic)",
        arch: Arch::Lfm2Moe,
        n_embd: 256,
        n_layer: 6,
        attention_layers: &[2, 4],
        n_head: 4,
        n_head_kv: 2,
        n_ff: 768,
        n_vocab: 512,
        n_ctx: 4096,
        conv_l_cache: 3,
        rope_freq_base: 1_000_000.0,
        norm_eps: 1e-5,
        n_expert: 8,
        n_expert_used: 3,
        n_ff_exp: 256,
        n_layer_dense_lead: 2,
        tied_output: false,
        exact: true,
        router_skew: 0.0,
    },
    Preset {
        name: "tiny-dense",
        display_name: "LFM2 tiny dense (synthetic)",
        arch: Arch::Lfm2,
        n_embd: 256,
        n_layer: 5,
        attention_layers: &[1, 3],
        n_head: 4,
        n_head_kv: 2,
        n_ff: 768,
        n_vocab: 512,
        n_ctx: 4096,
        conv_l_cache: 3,
        rope_freq_base: 1_000_000.0,
        norm_eps: 1e-5,
        n_expert: 0,
        n_expert_used: 0,
        n_ff_exp: 0,
        n_layer_dense_lead: 5,
        tied_output: false,
        exact: true,
        router_skew: 0.0,
    },
];

pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

pub fn names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}
