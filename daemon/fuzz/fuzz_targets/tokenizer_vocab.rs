//! Arbitrary vocabularies: token texts, types, merges and special ids built
//! from fuzz input through `Tokenizer::from_parts`. Loading either fails
//! with a `TokenizerError` or gives a tokenizer that never panics on encode
//! or decode, only produces ids inside the vocab, and streams what it
//! decodes. When the vocab can spell every byte and each token renders as
//! the bytes its text stands for, text round-trips exactly.
#![no_main]

use lfmd::tokenizer::bytes::{BYTE_TO_CHAR, text_to_bytes};
use lfmd::tokenizer::{SpecialIds, StreamDecoder, Tokenizer};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Merge {
    /// Any text, usually not a valid merge.
    Raw(String),
    /// `"tokens[a] tokens[b]"`, and with `add` the merged token too, so
    /// that valid merges are common.
    Pair { a: u16, b: u16, add: bool },
}

#[derive(Arbitrary, Debug)]
struct Vocab {
    /// Start with the 256 byte tokens (normal), as real vocabs do.
    bytes: bool,
    tokens: Vec<(String, u8)>,
    merges: Vec<Merge>,
    bos: Option<u16>,
    eos: Option<u16>,
    pad: Option<u16>,
    add_bos: bool,
    text: String,
    ids: Vec<u16>,
}

fuzz_target!(|v: Vocab| {
    let mut tokens: Vec<String> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    if v.bytes {
        tokens.extend(BYTE_TO_CHAR.iter().map(|c| c.to_string()));
        types.resize(256, 1);
    }
    for (text, ty) in v.tokens {
        tokens.push(text);
        // Mostly valid kinds (0..=6), sometimes not.
        types.push(i32::from(ty % 8));
    }
    let mut merges = Vec::new();
    for m in v.merges {
        match m {
            Merge::Raw(s) => merges.push(s),
            Merge::Pair { a, b, add } if !tokens.is_empty() => {
                let a = tokens[usize::from(a) % tokens.len()].clone();
                let b = tokens[usize::from(b) % tokens.len()].clone();
                if add {
                    tokens.push(format!("{a}{b}"));
                    types.push(1);
                }
                merges.push(format!("{a} {b}"));
            }
            Merge::Pair { .. } => {}
        }
    }
    let special = SpecialIds {
        bos: v.bos.map(u32::from),
        eos: v.eos.map(u32::from),
        pad: v.pad.map(u32::from),
        add_bos: v.add_bos,
    };
    let Ok(tok) = Tokenizer::from_parts(tokens, types, merges, special) else {
        return;
    };
    let n = tok.n_vocab();
    for parse_special in [false, true] {
        let ids = tok.encode(&v.text, true, parse_special);
        assert!(ids.iter().all(|&id| (id as usize) < n), "{ids:?}");
        let decoded = tok.decode(&ids);
        let mut dec = StreamDecoder::new(&tok);
        let mut streamed: String = ids.iter().map(|&id| dec.push(id)).collect();
        streamed.push_str(&dec.finish());
        assert_eq!(streamed, decoded);
    }
    let ids: Vec<u32> = v.ids.iter().map(|&i| u32::from(i)).collect();
    let _ = tok.decode(&ids);
    let _ = tok.longest_token_bytes();

    // Exact round trips need every byte spelled by some token, and every
    // token reachable from raw bytes (its text in the byte alphabet) to
    // render as exactly those bytes: an unused or control token whose text
    // is `"a"` would decode to nothing or to its own text.
    let spells_every_byte = BYTE_TO_CHAR
        .iter()
        .all(|c| tok.token_id(&c.to_string()).is_some());
    let renders_its_bytes = (0..n as u32).all(|id| {
        let text = tok.token_text(id).unwrap_or_default();
        text_to_bytes(text).is_none_or(|raw| tok.token_bytes(id) == Some(&raw[..]))
    });
    if spells_every_byte && renders_its_bytes {
        for parse_special in [false, true] {
            let ids = tok.encode(&v.text, false, parse_special);
            assert_eq!(tok.decode(&ids), v.text, "parse_special {parse_special}");
        }
    }
});
