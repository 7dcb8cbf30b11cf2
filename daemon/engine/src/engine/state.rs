//! Per-sequence state: the KV cache of every attention layer (f16, as
//! llama.cpp keeps it) and the rolling conv window of every short-conv layer.

use super::weights::{Mixer, Model};
use half::f16;

pub(crate) enum LayerState {
    Conv {
        /// The last `l_cache - 1` inputs of the conv, per channel, oldest
        /// first: `[n_embd][l_cache - 1]` (a block of channels is one run).
        window: Vec<f32>,
    },
    Attention {
        /// Per KV head, `[pos][head_dim]`: a head's rows are contiguous,
        /// so attending to them is one stream.
        k: Vec<Vec<f16>>,
        v: Vec<Vec<f16>>,
    },
}

/// One sequence's memory between forward calls.
pub struct SeqState {
    pub(crate) layers: Vec<LayerState>,
    /// Tokens consumed so far (the position of the next token).
    pub(crate) pos: usize,
}

impl SeqState {
    pub fn new(model: &Model) -> Self {
        let d = &model.desc;
        let layers = model
            .layers
            .iter()
            .map(|l| match l.mixer {
                Mixer::Conv(_) => LayerState::Conv {
                    window: vec![0.0; (d.conv_l_cache - 1) * d.n_embd],
                },
                Mixer::Attention(ref a) => LayerState::Attention {
                    k: vec![Vec::new(); a.n_head_kv],
                    v: vec![Vec::new(); a.n_head_kv],
                },
            })
            .collect();
        SeqState { layers, pos: 0 }
    }

    /// Tokens consumed so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Bytes held by caches.
    pub fn memory_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l {
                LayerState::Conv { window } => window.len() * 4,
                LayerState::Attention { k, v } => k.iter().chain(v).map(|h| h.capacity() * 2).sum(),
            })
            .sum()
    }
}
