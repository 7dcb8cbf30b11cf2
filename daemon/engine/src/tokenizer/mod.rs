//! Byte-level BPE tokenizer, token for token what llama.cpp does for
//! `tokenizer.ggml.pre = "lfm2"` (its LLAMA3 pre-tokenizer, `ignore_merges`,
//! BOS added), plus a streaming decoder and a BPE trainer for test vocabs.
//!
//! Encoding runs in three stages: special tokens are cut out of the raw text
//! (`partition`), each remaining span is split into pre-tokens
//! ([`pretok`]), and each pre-token becomes tokens: itself if the vocab has
//! it whole, else by merges ([`bpe`]). Token texts are stored in GPT-2's
//! byte-to-unicode form ([`bytes`]); everything past loading works on raw
//! bytes.

mod bpe;
pub mod bytes;
mod detok;
pub mod pretok;
pub mod train;

use std::collections::HashMap;

pub use detok::StreamDecoder;
pub use train::{LFM2_SPECIALS, TrainedVocab, train_bpe};

use crate::gguf::{Array, GgufHeader, Value};

/// GGUF keys the tokenizer reads.
pub mod keys {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
}

/// Pre-tokenizer names that llama.cpp maps to its LLAMA3 pre-tokenizer with
/// `ignore_merges` and `add_bos`: the only kind this tokenizer implements.
pub const LLAMA3_PRE_NAMES: &[&str] = &[
    "lfm2",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "jina-v5-nano",
];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenizerError {
    #[error("GGUF key {key:?} is missing")]
    MissingKey { key: &'static str },
    #[error("GGUF key {key:?}: {reason}")]
    BadKey { key: &'static str, reason: String },
    #[error(
        "{} has {types} entries but {} has {tokens}",
        keys::TOKEN_TYPE,
        keys::TOKENS
    )]
    TypeCount { tokens: usize, types: usize },
    #[error("{}[{id}] = {value}: not a token type (0 to 6)", keys::TOKEN_TYPE)]
    BadType { id: usize, value: i32 },
    #[error("{}[{id}] {text:?} is the same text as token {first}", keys::TOKENS)]
    Duplicate { id: usize, text: String, first: u32 },
    #[error("{key} has {count} entries; token ids must fit in u32", key = keys::TOKENS)]
    TooMany { count: usize },
    #[error("{}[{index}] {text:?}: {reason}", keys::MERGES)]
    Merge {
        index: usize,
        text: String,
        reason: String,
    },
    #[error("{key} = {id} is out of range: the vocab has {n_vocab} tokens")]
    SpecialOutOfRange {
        key: &'static str,
        id: u32,
        n_vocab: usize,
    },
}

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum TokenKind {
    Undefined = 0,
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

impl TokenKind {
    pub fn from_i32(v: i32) -> Option<Self> {
        use TokenKind::*;
        Some(match v {
            0 => Undefined,
            1 => Normal,
            2 => Unknown,
            3 => Control,
            4 => UserDefined,
            5 => Unused,
            6 => Byte,
            _ => return None,
        })
    }

    /// Cut out of raw text before pre-tokenizing (llama.cpp's special-token
    /// cache). Control and unknown tokens only when special parsing is on;
    /// user-defined tokens always.
    fn is_matched_in_text(self, parse_special: bool) -> bool {
        match self {
            TokenKind::UserDefined => true,
            TokenKind::Control | TokenKind::Unknown => parse_special,
            _ => false,
        }
    }
}

/// The special token ids of a vocab and whether encoding adds BOS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
}

/// A loaded vocab. Immutable; share it behind an `Arc`.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    /// Token texts as the vocab stores them (byte-level form).
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
    /// What each token renders as with specials shown: raw bytes for normal
    /// and byte tokens, the text itself for control, unknown and
    /// user-defined ones, nothing for unused and undefined ones.
    pieces: Vec<Box<[u8]>>,
    by_text: HashMap<String, u32>,
    /// Raw bytes to id, for every token whose text is in the byte alphabet:
    /// the lookup `ignore_merges` does on whole pre-tokens.
    by_bytes: HashMap<Box<[u8]>, u32>,
    byte_ids: [Option<u32>; 256],
    merges: bpe::Merges,
    /// Tokens cut out of raw text, longest text first (llama.cpp's order;
    /// equal lengths by id).
    matched: Vec<u32>,
    special: SpecialIds,
}

impl Tokenizer {
    /// Loads the vocab of a GGUF file. Only byte-level BPE (`gpt2`) with a
    /// llama3-style pre-tokenizer is supported; anything else is an error
    /// naming the key.
    pub fn from_gguf(h: &GgufHeader) -> Result<Self, TokenizerError> {
        let model =
            string_key(h, keys::MODEL)?.ok_or(TokenizerError::MissingKey { key: keys::MODEL })?;
        if model != "gpt2" {
            return Err(bad(
                keys::MODEL,
                format!("{model:?} is not supported; lfmd reads byte-level BPE (\"gpt2\")"),
            ));
        }
        let pre = string_key(h, keys::PRE)?.ok_or(TokenizerError::MissingKey { key: keys::PRE })?;
        if !LLAMA3_PRE_NAMES.contains(&pre) {
            return Err(bad(
                keys::PRE,
                format!(
                    "{pre:?} is not supported; lfmd implements the llama3 pre-tokenizer ({})",
                    LLAMA3_PRE_NAMES.join(", ")
                ),
            ));
        }
        let tokens = match array_key(h, keys::TOKENS)? {
            Some(Array::String(v)) => v.clone(),
            Some(a) => return Err(bad_elem(keys::TOKENS, "string", a)),
            None => return Err(TokenizerError::MissingKey { key: keys::TOKENS }),
        };
        let token_types = match array_key(h, keys::TOKEN_TYPE)? {
            Some(a) => (0..a.len())
                .map(|i| {
                    a.int_at(i)
                        .and_then(|v| i32::try_from(v).ok())
                        .ok_or_else(|| bad_elem(keys::TOKEN_TYPE, "i32", a))
                })
                .collect::<Result<Vec<_>, _>>()?,
            // llama.cpp treats every token as normal without the key.
            None => vec![TokenKind::Normal as i32; tokens.len()],
        };
        let merges = match array_key(h, keys::MERGES)? {
            Some(Array::String(v)) => v.clone(),
            Some(a) => return Err(bad_elem(keys::MERGES, "string", a)),
            None => return Err(TokenizerError::MissingKey { key: keys::MERGES }),
        };
        let special = SpecialIds {
            bos: id_key(h, keys::BOS_ID)?,
            eos: id_key(h, keys::EOS_ID)?,
            pad: id_key(h, keys::PAD_ID)?,
            // The llama3 pre-tokenizer turns BOS on unless the file says no.
            add_bos: match h.get(keys::ADD_BOS) {
                None => true,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad(keys::ADD_BOS, format!("{v} is not a bool")))?,
            },
        };
        Self::from_parts(tokens, token_types, merges, special)
    }

    /// Builds a tokenizer from vocab parts as GGUF stores them: token texts in
    /// byte-level form, `tokenizer.ggml.token_type` values, and merges
    /// `"left right"` in rank order.
    pub fn from_parts(
        mut tokens: Vec<String>,
        token_types: Vec<i32>,
        merges: Vec<String>,
        special: SpecialIds,
    ) -> Result<Self, TokenizerError> {
        let n = tokens.len();
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::TooMany { count: n });
        }
        if token_types.len() != n {
            return Err(TokenizerError::TypeCount {
                tokens: n,
                types: token_types.len(),
            });
        }
        let kinds = token_types
            .iter()
            .enumerate()
            .map(|(id, &value)| {
                TokenKind::from_i32(value).ok_or(TokenizerError::BadType { id, value })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for (key, id) in [
            (keys::BOS_ID, special.bos),
            (keys::EOS_ID, special.eos),
            (keys::PAD_ID, special.pad),
        ] {
            if let Some(id) = id
                && id as usize >= n
            {
                return Err(TokenizerError::SpecialOutOfRange {
                    key,
                    id,
                    n_vocab: n,
                });
            }
        }

        let mut by_text = HashMap::with_capacity(n);
        let mut by_bytes = HashMap::with_capacity(n);
        let mut byte_ids = [None; 256];
        let mut pieces = Vec::with_capacity(n);
        for (id, text) in tokens.iter_mut().enumerate() {
            if text.is_empty() {
                // As llama.cpp does, so the token stays addressable.
                *text = format!("[EMPTY_{id}]");
            }
            let id32 = id as u32;
            if let Some(&first) = by_text.get(text.as_str()) {
                return Err(TokenizerError::Duplicate {
                    id,
                    text: text.clone(),
                    first,
                });
            }
            by_text.insert(text.clone(), id32);
            if let Some(raw) = bytes::text_to_bytes(text) {
                if let [b] = raw[..] {
                    byte_ids[usize::from(b)] = Some(id32);
                }
                by_bytes.insert(raw.into_boxed_slice(), id32);
            }
            pieces.push(render(text, kinds[id]).into_boxed_slice());
        }

        let mut table = bpe::Merges::with_capacity(merges.len());
        for (index, merge) in merges.iter().enumerate() {
            let err = |reason: String| TokenizerError::Merge {
                index,
                text: merge.clone(),
                reason,
            };
            // llama.cpp splits at the first space after the first byte.
            let split = merge
                .as_bytes()
                .get(1..)
                .and_then(|rest| rest.iter().position(|&b| b == b' '))
                .map(|p| p + 1)
                .ok_or_else(|| err("no space separating the two parts".into()))?;
            let (left, right) = (&merge[..split], &merge[split + 1..]);
            let id_of = |part: &str, what: &str| {
                by_text
                    .get(part)
                    .copied()
                    .ok_or_else(|| err(format!("{what} {part:?} is not a token")))
            };
            let l = id_of(left, "left part")?;
            let r = id_of(right, "right part")?;
            let merged = id_of(&format!("{left}{right}"), "the merged text")?;
            // The first occurrence of a pair keeps its rank, as in llama.cpp.
            table.entry((l, r)).or_insert((index as u32, merged));
        }

        let mut matched: Vec<u32> = (0..n as u32)
            .filter(|&id| kinds[id as usize].is_matched_in_text(true))
            .collect();
        matched.sort_by_key(|&id| (std::cmp::Reverse(tokens[id as usize].len()), id));

        Ok(Tokenizer {
            texts: tokens,
            kinds,
            pieces,
            by_text,
            by_bytes,
            byte_ids,
            merges: table,
            matched,
            special,
        })
    }

    /// Token ids of `text`. `add_bos` adds BOS first when the vocab asks for
    /// it (`tokenizer.ggml.add_bos_token`); `parse_special` lets control
    /// tokens written in the text (`<|im_start|>`) become their ids.
    /// User-defined tokens are always recognized, as in llama.cpp.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos
            && self.special.add_bos
            && let Some(bos) = self.special.bos
        {
            out.push(bos);
        }
        let mut scratch = bpe::Scratch::default();
        let mut bounds = Vec::new();
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(span) => {
                    pretok::split_bounds(span, &mut bounds);
                    let mut start = 0;
                    for &end in &bounds {
                        self.encode_word(&span.as_bytes()[start..end], &mut scratch, &mut out);
                        start = end;
                    }
                }
            }
        }
        out
    }

    fn encode_word(&self, word: &[u8], scratch: &mut bpe::Scratch, out: &mut Vec<u32>) {
        // ignore_merges: a pre-token the vocab has whole is that token.
        if let Some(&id) = self.by_bytes.get(word) {
            out.push(id);
            return;
        }
        bpe::merge_word(word, &self.byte_ids, &self.merges, scratch, out);
    }

    /// Cuts the tokens that are matched in raw text out of `text`, as
    /// llama.cpp's `tokenizer_st_partition`: one token at a time, longest
    /// first, each splitting every text span left by the ones before it.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = Vec::new();
        if !text.is_empty() {
            fragments.push(Fragment::Text(text));
        }
        for &id in &self.matched {
            if !self.kinds[id as usize].is_matched_in_text(parse_special) {
                continue;
            }
            let pat = self.texts[id as usize].as_str();
            let found = fragments
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(pat)));
            if !found {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    next.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(pat) {
                    if at > 0 {
                        next.push(Fragment::Text(&rest[..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[at + pat.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Bytes of the longest token: a text of `n` bytes is at least
    /// `n / longest_token_bytes()` tokens, a bound that costs no encoding.
    pub fn longest_token_bytes(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| p.len())
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// What a token renders as, raw bytes (special tokens: their text).
    /// `None` for an id outside the vocab.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(|p| &p[..])
    }

    /// What a token renders as, like llama.cpp's `token_to_piece`: with
    /// `special` false, control and unknown tokens render as nothing.
    pub fn piece(&self, id: u32, special: bool) -> Option<&[u8]> {
        let kind = *self.kinds.get(id as usize)?;
        if !special && matches!(kind, TokenKind::Control | TokenKind::Unknown) {
            return Some(&[]);
        }
        self.token_bytes(id)
    }

    /// The text of `ids`, special tokens included; bytes that are not UTF-8
    /// become U+FFFD only here, after all pieces are joined. Ids outside the
    /// vocab are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut raw = Vec::new();
        for &id in ids {
            raw.extend_from_slice(self.token_bytes(id).unwrap_or_default());
        }
        String::from_utf8_lossy(&raw).into_owned()
    }

    pub fn n_vocab(&self) -> usize {
        self.texts.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.special.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.special.eos
    }

    pub fn pad(&self) -> Option<u32> {
        self.special.pad
    }

    pub fn special_ids(&self) -> SpecialIds {
        self.special
    }

    /// The id of a token by its text as the vocab stores it (`<|im_end|>`,
    /// `Ġthe`).
    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.by_text.get(s).copied()
    }

    /// A token's text as the vocab stores it.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(String::as_str)
    }

    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    pub fn n_merges(&self) -> usize {
        self.merges.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// A token's rendering with specials shown (see `Tokenizer::pieces`).
fn render(text: &str, kind: TokenKind) -> Vec<u8> {
    match kind {
        TokenKind::Normal => bytes::text_to_bytes_lossy(text),
        TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined => {
            text.as_bytes().to_vec()
        }
        // llama.cpp reads `<0xHH>` for byte tokens of a BPE vocab.
        TokenKind::Byte => match hex_byte(text) {
            Some(b) => vec![b],
            None => bytes::text_to_bytes_lossy(text),
        },
        TokenKind::Unused | TokenKind::Undefined => Vec::new(),
    }
}

fn hex_byte(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

fn bad(key: &'static str, reason: String) -> TokenizerError {
    TokenizerError::BadKey { key, reason }
}

fn bad_elem(key: &'static str, want: &str, a: &Array) -> TokenizerError {
    bad(
        key,
        format!(
            "expected an array of {want}, found an array of {}",
            a.elem_type().name()
        ),
    )
}

fn string_key<'h>(h: &'h GgufHeader, key: &'static str) -> Result<Option<&'h str>, TokenizerError> {
    match h.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(bad(
            key,
            format!("expected a string, found {}", v.value_type().name()),
        )),
    }
}

fn array_key<'h>(
    h: &'h GgufHeader,
    key: &'static str,
) -> Result<Option<&'h Array>, TokenizerError> {
    match h.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(v) => Err(bad(
            key,
            format!("expected an array, found {}", v.value_type().name()),
        )),
    }
}

fn id_key(h: &GgufHeader, key: &'static str) -> Result<Option<u32>, TokenizerError> {
    match h.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .and_then(|i| u32::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| bad(key, format!("{v} is not a token id"))),
    }
}

#[cfg(test)]
mod tests;
