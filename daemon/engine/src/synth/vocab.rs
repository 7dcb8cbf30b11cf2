//! The vocabulary of synthetic models: a byte-level BPE trained by us on the
//! corpus we ship, with the LFM2 special tokens at their real ids. The corpus
//! yields a few thousand merges; larger vocabularies are filled with unused
//! `<|reserved_N|>` tokens (llama.cpp loads them; encoding never makes them).

use crate::gguf::Value;
use crate::tokenizer::SpecialIds;
use crate::tokenizer::train::{CORPUS, LFM2_SPECIALS, train_bpe};

pub const PAD: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 7;

/// The `tokenizer.*` metadata of an `n_vocab`-token synthetic vocabulary.
pub fn lfm2_vocab_metadata(n_vocab: usize) -> Vec<(String, Value)> {
    let special = SpecialIds {
        bos: Some(BOS),
        eos: Some(EOS),
        pad: Some(PAD),
        add_bos: true,
    };
    let mut meta = train_bpe(CORPUS, n_vocab, LFM2_SPECIALS).gguf_metadata(special);
    meta.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)));
    meta
}
