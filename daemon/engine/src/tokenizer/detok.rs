//! Streaming detokenization: generated tokens arrive one at a time and a
//! character may be split across several of them, so bytes are held back
//! until they form complete UTF-8.
//!
//! The text a `StreamDecoder` yields over a whole stream, `finish` included,
//! equals `Tokenizer::decode` of the same ids (with the same `special`).

use std::ops::Deref;

use super::Tokenizer;

/// Turns token ids into text as they arrive. Holds the tokenizer by any
/// pointer to it (`&Tokenizer`, `Arc<Tokenizer>`).
#[derive(Clone, Debug)]
pub struct StreamDecoder<T> {
    tokenizer: T,
    special: bool,
    /// Bytes of an incomplete character, at most 3.
    pending: Vec<u8>,
}

impl<T: Deref<Target = Tokenizer>> StreamDecoder<T> {
    /// A decoder that renders special tokens as their text.
    pub fn new(tokenizer: T) -> Self {
        Self::with_special(tokenizer, true)
    }

    /// With `special` false, control tokens render as nothing (llama.cpp's
    /// `token_to_piece(.., special = false)`).
    pub fn with_special(tokenizer: T, special: bool) -> Self {
        StreamDecoder {
            tokenizer,
            special,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text it completes, possibly empty. Never
    /// returns part of a character. Ids outside the vocab add nothing.
    pub fn push(&mut self, id: u32) -> String {
        let piece = self.tokenizer.piece(id, self.special).unwrap_or_default();
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        let mut rest = &self.pending[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    // Valid by `valid_up_to`; the fallback is never taken.
                    out.push_str(std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        // Bytes that can never start a character: replaced
                        // now, exactly as `from_utf8_lossy` would.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &bad[n..];
                        }
                        // The start of a character whose end has not come.
                        None => {
                            rest = bad;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let drop = self.pending.len() - keep;
        self.pending.drain(..drop);
        out
    }

    /// Ends the stream: an incomplete character left over becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Whether bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}
