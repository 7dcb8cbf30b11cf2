//! Per-sequence state: the KV cache of every attention layer (f16, as
//! llama.cpp keeps it) and the rolling conv window of every short-conv layer.
//!
//! A state can be cut into [`StateSegment`]s, each the KV rows of a stretch
//! of positions and the conv windows where the stretch ends, and rebuilt from
//! a chain of them: the prefix cache keeps prompts' states this way, every
//! position's rows once however many snapshots end after it. (A conv window
//! cannot be rolled back, so a state is only ever rebuilt at a segment's
//! end.)

use super::weights::{Mixer, Model};
use half::f16;

#[derive(Clone)]
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

/// Why a chain of segments does not make a state.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StateError {
    #[error(
        "state segments must follow each other from position 0: a segment starts at {start}, after position {expected}"
    )]
    Gap { expected: usize, start: usize },
    #[error(
        "a state segment's layers ({got}) do not match this model's ({want}): it was taken from another model"
    )]
    Layout { got: String, want: String },
}

/// The KV rows of positions `start..end` of every attention layer, and the
/// conv windows as they were at `end`.
#[derive(Clone)]
pub struct StateSegment {
    start: usize,
    end: usize,
    layers: Vec<LayerState>,
}

impl StateSegment {
    /// First position whose rows it holds.
    pub fn start(&self) -> usize {
        self.start
    }

    /// The position after its last row: a state rebuilt up to here has
    /// consumed `end` tokens.
    pub fn end(&self) -> usize {
        self.end
    }

    /// Bytes it holds (rows and windows).
    pub fn memory_bytes(&self) -> usize {
        layers_bytes(&self.layers, |h| h.len())
    }
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
        layers_bytes(&self.layers, |h| h.capacity())
    }

    /// A copy of the KV rows of positions `start..` (up to the tokens
    /// consumed so far) and of the conv windows as they are now.
    ///
    /// # Panics
    /// If `start` is past the tokens consumed.
    pub fn segment(&self, start: usize) -> StateSegment {
        assert!(
            start <= self.pos,
            "segment from {start} of a state at {}",
            self.pos
        );
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                LayerState::Conv { window } => LayerState::Conv {
                    window: window.clone(),
                },
                LayerState::Attention { k, v } => {
                    // Every head holds `pos` rows of the same width.
                    let rows = |heads: &Vec<Vec<f16>>| {
                        heads
                            .iter()
                            .map(|h| {
                                let w = h.len() / self.pos.max(1);
                                h[start * w..].to_vec()
                            })
                            .collect()
                    };
                    LayerState::Attention {
                        k: rows(k),
                        v: rows(v),
                    }
                }
            })
            .collect();
        StateSegment {
            start,
            end: self.pos,
            layers,
        }
    }

    /// The state at the end of `chain`, whose segments follow each other
    /// from position 0 (the last one's conv windows are the state's).
    pub fn from_segments(model: &Model, chain: &[&StateSegment]) -> Result<SeqState, StateError> {
        let mut st = SeqState::new(model);
        let shape = |layers: &[LayerState]| {
            layers
                .iter()
                .map(|l| match l {
                    LayerState::Conv { window } => format!("conv {}", window.len()),
                    LayerState::Attention { k, .. } => format!("attention {}", k.len()),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let want = shape(&st.layers);
        for seg in chain {
            if seg.start != st.pos {
                return Err(StateError::Gap {
                    expected: st.pos,
                    start: seg.start,
                });
            }
            let got = shape(&seg.layers);
            if got != want {
                return Err(StateError::Layout { got, want });
            }
            for (mine, theirs) in st.layers.iter_mut().zip(&seg.layers) {
                match (mine, theirs) {
                    (LayerState::Conv { window }, LayerState::Conv { window: w }) => {
                        window.copy_from_slice(w);
                    }
                    (LayerState::Attention { k, v }, LayerState::Attention { k: sk, v: sv }) => {
                        for (h, s) in k.iter_mut().chain(v.iter_mut()).zip(sk.iter().chain(sv)) {
                            h.extend_from_slice(s);
                        }
                    }
                    _ => unreachable!("layouts compared above"),
                }
            }
            st.pos = seg.end;
        }
        Ok(st)
    }
}

/// Bytes of `layers`, counting a KV head's storage by `size`.
fn layers_bytes(layers: &[LayerState], size: impl Fn(&Vec<f16>) -> usize) -> usize {
    layers
        .iter()
        .map(|l| match l {
            LayerState::Conv { window } => window.len() * 4,
            LayerState::Attention { k, v } => k.iter().chain(v).map(|h| size(h) * 2).sum(),
        })
        .sum()
}
