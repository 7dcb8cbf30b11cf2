//! Byte-level BPE training, for vocabs of synthetic test models: the corpus
//! is pre-tokenized as encoding does, and the most frequent adjacent pair is
//! merged until the vocab reaches the size asked for.
//!
//! Token order: the special tokens at ids 0.., then the 256 byte tokens in
//! byte order, then merged tokens in merge order. Ties between equally
//! frequent pairs go to the smaller (left id, right id), so training is a
//! pure function of its inputs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::{SpecialIds, TokenKind, Tokenizer, TokenizerError, bytes, keys, pretok};
use crate::gguf::{Array, Value};

/// LFM2's special tokens, at ids 0 to 13 in this order.
pub const LFM2_SPECIALS: &[&str] = &[
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|fim_pre|>",
    "<|fim_mid|>",
    "<|fim_suf|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tool_list_start|>",
    "<|tool_list_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|tool_response_start|>",
    "<|tool_response_end|>",
];

/// A small English, code and multi-script text we wrote for training test
/// vocabs (no third-party text).
pub const CORPUS: &str = include_str!("corpus.txt");

/// A trained vocab in GGUF form (`tokenizer.ggml.tokens`, `.token_type`,
/// `.merges`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainedVocab {
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
}

impl TrainedVocab {
    /// The tokenizer of this vocab.
    pub fn tokenizer(&self, special: SpecialIds) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::from_parts(
            self.tokens.clone(),
            self.token_types.clone(),
            self.merges.clone(),
            special,
        )
    }

    /// The `tokenizer.*` GGUF metadata of this vocab (model `gpt2`, pre
    /// `lfm2`), for writing it into a model file.
    pub fn gguf_metadata(&self, special: SpecialIds) -> Vec<(String, Value)> {
        let mut meta = vec![
            (keys::MODEL.to_owned(), Value::String("gpt2".into())),
            (keys::PRE.to_owned(), Value::String("lfm2".into())),
            (
                keys::TOKENS.to_owned(),
                Value::Array(Array::String(self.tokens.clone())),
            ),
            (
                keys::TOKEN_TYPE.to_owned(),
                Value::Array(Array::I32(self.token_types.clone())),
            ),
            (
                keys::MERGES.to_owned(),
                Value::Array(Array::String(self.merges.clone())),
            ),
            (keys::ADD_BOS.to_owned(), Value::Bool(special.add_bos)),
        ];
        for (key, id) in [
            (keys::BOS_ID, special.bos),
            (keys::EOS_ID, special.eos),
            (keys::PAD_ID, special.pad),
        ] {
            if let Some(id) = id {
                meta.push((key.to_owned(), Value::U32(id)));
            }
        }
        meta
    }
}

/// Trains a byte-level BPE vocab of `vocab_size` tokens on `corpus`.
///
/// The vocab is never smaller than the specials plus the 256 bytes. If the
/// corpus runs out of pairs to merge (every distinct pre-token is a single
/// token) before `vocab_size`, the rest is filled with `<|reserved_N|>`
/// tokens of type unused, which encoding never produces and decoding renders
/// as nothing. A special equal to a byte's text (or two equal specials)
/// keeps its first id; the later copy is renamed `<|reserved_N|>` too, so
/// token texts stay unique.
pub fn train_bpe(corpus: &str, vocab_size: usize, specials: &[&str]) -> TrainedVocab {
    let mut vocab = Builder::default();
    for s in specials {
        vocab.add((*s).to_owned(), TokenKind::Control);
    }
    let mut byte_ids = [0u32; 256];
    for b in 0..=255u8 {
        let text = bytes::BYTE_TO_CHAR[usize::from(b)].to_string();
        // A special that took this text is renamed so the byte keeps it.
        if let Some(owner) = vocab.by_text.remove(&text) {
            let renamed = vocab.reserved_name();
            vocab.by_text.insert(renamed.clone(), owner);
            vocab.tokens[owner as usize] = renamed;
        }
        byte_ids[usize::from(b)] = vocab.add(text, TokenKind::Normal);
    }

    let mut state = State::new(corpus, &byte_ids);
    let mut merges = Vec::new();
    while vocab.tokens.len() < vocab_size {
        let Some((left, right)) = state.best_pair() else {
            break;
        };
        let (l, r) = (&vocab.tokens[left as usize], &vocab.tokens[right as usize]);
        let text = format!("{l}{r}");
        merges.push(format!("{l} {r}"));
        // Different merge paths can reach the same text ("ab"+"c", "a"+"bc");
        // the later merge reuses the token, as Hugging Face's trainer does.
        let merged = match vocab.by_text.get(&text) {
            Some(&id) => id,
            None => vocab.add(text, TokenKind::Normal),
        };
        state.merge(left, right, merged);
    }
    while vocab.tokens.len() < vocab_size {
        let text = vocab.reserved_name();
        vocab.add(text, TokenKind::Unused);
    }
    TrainedVocab {
        tokens: vocab.tokens,
        token_types: vocab.token_types,
        merges,
    }
}

#[derive(Default)]
struct Builder {
    tokens: Vec<String>,
    token_types: Vec<i32>,
    by_text: HashMap<String, u32>,
    n_reserved: usize,
}

impl Builder {
    /// Appends a token; a text already taken is replaced by a reserved name.
    fn add(&mut self, text: String, kind: TokenKind) -> u32 {
        let id = self.tokens.len() as u32;
        let text = if self.by_text.contains_key(&text) {
            self.reserved_name()
        } else {
            text
        };
        self.by_text.insert(text.clone(), id);
        self.tokens.push(text);
        self.token_types.push(kind as i32);
        id
    }

    /// The next `<|reserved_N|>` not yet in the vocab.
    fn reserved_name(&mut self) -> String {
        loop {
            let text = format!("<|reserved_{}|>", self.n_reserved);
            self.n_reserved += 1;
            if !self.by_text.contains_key(&text) {
                return text;
            }
        }
    }
}

/// Distinct pre-tokens with their counts, and pair counts kept up to date
/// as merges rewrite the words.
struct State {
    words: Vec<Vec<u32>>,
    counts: Vec<u64>,
    pairs: HashMap<(u32, u32), u64>,
    /// Words that contained each pair when it was last counted (may be stale).
    holders: HashMap<(u32, u32), Vec<u32>>,
    /// Max-heap of (count, smaller pair first); entries go stale as counts
    /// change and are checked when popped.
    heap: BinaryHeap<(u64, Reverse<(u32, u32)>)>,
}

impl State {
    fn new(corpus: &str, byte_ids: &[u32; 256]) -> Self {
        let mut word_counts: HashMap<&str, u64> = HashMap::new();
        for word in pretok::split(corpus) {
            *word_counts.entry(word).or_default() += 1;
        }
        let mut distinct: Vec<(&str, u64)> = word_counts.into_iter().collect();
        distinct.sort_unstable();
        let mut state = State {
            words: Vec::with_capacity(distinct.len()),
            counts: Vec::with_capacity(distinct.len()),
            pairs: HashMap::new(),
            holders: HashMap::new(),
            heap: BinaryHeap::new(),
        };
        for (w, (word, count)) in distinct.into_iter().enumerate() {
            let symbols: Vec<u32> = word.bytes().map(|b| byte_ids[usize::from(b)]).collect();
            for pair in symbols.windows(2) {
                let pair = (pair[0], pair[1]);
                *state.pairs.entry(pair).or_default() += count;
                state.holders.entry(pair).or_default().push(w as u32);
            }
            state.words.push(symbols);
            state.counts.push(count);
        }
        for (&pair, &count) in &state.pairs {
            state.heap.push((count, Reverse(pair)));
        }
        state
    }

    /// The most frequent pair, ties to the smallest ids.
    fn best_pair(&mut self) -> Option<(u32, u32)> {
        while let Some((count, Reverse(pair))) = self.heap.pop() {
            let now = self.pairs.get(&pair).copied().unwrap_or(0);
            if now == count && now > 0 {
                return Some(pair);
            }
            // Counts only grow through a push, so a stale entry is high:
            // queue the true count and look again.
            if now > 0 && now < count {
                self.heap.push((now, Reverse(pair)));
            }
        }
        None
    }

    /// Replaces every occurrence of `(left, right)` by `merged`, left to
    /// right, and updates the pair counts.
    fn merge(&mut self, left: u32, right: u32, merged: u32) {
        let mut holders = self.holders.remove(&(left, right)).unwrap_or_default();
        holders.dedup();
        let mut delta: HashMap<(u32, u32), i64> = HashMap::new();
        for w in holders {
            let word = &mut self.words[w as usize];
            if !word.windows(2).any(|p| p == [left, right]) {
                continue;
            }
            let count = self.counts[w as usize] as i64;
            for p in word.windows(2) {
                *delta.entry((p[0], p[1])).or_default() -= count;
            }
            let mut rewritten = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == left && word[i + 1] == right {
                    rewritten.push(merged);
                    i += 2;
                } else {
                    rewritten.push(word[i]);
                    i += 1;
                }
            }
            for p in rewritten.windows(2) {
                let pair = (p[0], p[1]);
                *delta.entry(pair).or_default() += count;
                if p[0] == merged || p[1] == merged {
                    let list = self.holders.entry(pair).or_default();
                    if list.last() != Some(&w) {
                        list.push(w);
                    }
                }
            }
            *word = rewritten;
        }
        let mut changed: Vec<((u32, u32), i64)> =
            delta.into_iter().filter(|&(_, d)| d != 0).collect();
        changed.sort_unstable();
        for (pair, d) in changed {
            let entry = self.pairs.entry(pair).or_default();
            *entry = entry.saturating_add_signed(d);
            if d > 0 {
                self.heap.push((*entry, Reverse(pair)));
            }
            if *entry == 0 {
                self.pairs.remove(&pair);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_determinism() {
        let a = train_bpe(CORPUS, 1024, LFM2_SPECIALS);
        let b = train_bpe(CORPUS, 1024, LFM2_SPECIALS);
        assert_eq!(a, b);
        assert_eq!(a.tokens.len(), 1024);
        assert_eq!(a.token_types.len(), 1024);
        for (id, s) in LFM2_SPECIALS.iter().enumerate() {
            assert_eq!(a.tokens[id], *s);
            assert_eq!(a.token_types[id], TokenKind::Control as i32);
        }
        let n = LFM2_SPECIALS.len();
        for b in 0..256 {
            assert_eq!(a.tokens[n + b], bytes::BYTE_TO_CHAR[b].to_string());
        }
        assert!(a.merges.len() >= 1024 - 256 - n);
        // The most frequent pair of an English corpus is a space and a letter.
        assert!(a.merges[0].starts_with('Ġ'), "{}", a.merges[0]);
    }

    #[test]
    fn pads_with_reserved_tokens_when_merges_run_out() {
        let v = train_bpe("abab abab", 300, &["<s>"]);
        // Possible merges: a b, ab ab, Ġ ab, Ġab ab → 4 at most.
        assert!(v.merges.len() <= 4, "{:?}", v.merges);
        assert_eq!(v.tokens.len(), 300);
        let last = v.tokens.len() - 1;
        assert!(v.tokens[last].starts_with("<|reserved_"));
        assert_eq!(v.token_types[last], TokenKind::Unused as i32);
        let tok = v.tokenizer(SpecialIds::default()).unwrap();
        assert_eq!(tok.encode("abab abab", false, false).len(), 2);
    }

    #[test]
    fn never_smaller_than_bytes_and_specials() {
        let v = train_bpe("hello", 10, &["<a>", "<b>"]);
        assert_eq!(v.tokens.len(), 258);
        assert!(v.merges.is_empty());
    }

    #[test]
    fn colliding_specials_are_renamed() {
        let v = train_bpe("aa", 300, &["a", "<x>", "<x>"]);
        let tok = v.tokenizer(SpecialIds::default()).unwrap();
        assert_eq!(tok.n_vocab(), 300);
        assert_eq!(tok.token_id("<x>"), Some(1));
        assert_eq!(
            tok.token_kind(tok.token_id("a").unwrap()),
            Some(TokenKind::Normal)
        );
        assert_eq!(tok.decode(&tok.encode("aa a", false, true)), "aa a");
    }
}
