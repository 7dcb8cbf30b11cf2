//! Arbitrary bytes as text through a byte-level BPE vocab trained on the
//! shipped corpus (specials included): encoding with and without special
//! parsing decodes back to the text exactly, streaming the ids yields the
//! same text as `decode`, and decoding arbitrary ids (in the vocab or not)
//! never panics and streams the same as it decodes.
#![no_main]

use std::sync::OnceLock;

use lfmd::tokenizer::{LFM2_SPECIALS, SpecialIds, StreamDecoder, Tokenizer, train, train_bpe};
use libfuzzer_sys::fuzz_target;

fn vocab() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        train_bpe(train::CORPUS, 600, LFM2_SPECIALS)
            .tokenizer(SpecialIds {
                bos: Some(1),
                eos: Some(7),
                pad: Some(0),
                add_bos: true,
            })
            .expect("the trained vocab loads")
    })
}

/// What a stream of `ids` shows, `finish` included.
fn streamed(tok: &Tokenizer, ids: &[u32], special: bool) -> String {
    let mut dec = StreamDecoder::with_special(tok, special);
    let mut out = String::new();
    for &id in ids {
        out.push_str(&dec.push(id));
    }
    out.push_str(&dec.finish());
    out
}

fuzz_target!(|data: &[u8]| {
    let tok = vocab();
    let text = String::from_utf8_lossy(data);
    for parse_special in [false, true] {
        let ids = tok.encode(&text, false, parse_special);
        assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
        assert_eq!(tok.decode(&ids), text, "parse_special {parse_special}");
        assert_eq!(streamed(tok, &ids, true), text);
    }
    let with_bos = tok.encode(&text, true, true);
    assert_eq!(with_bos.first(), Some(&1));

    // The same bytes as token ids, some outside the vocab.
    let ids: Vec<u32> = data
        .chunks(2)
        .map(|c| u32::from(c[0]) | c.get(1).map_or(0, |&b| u32::from(b) << 8))
        .map(|v| v % 700)
        .collect();
    let decoded = tok.decode(&ids);
    assert_eq!(streamed(tok, &ids, true), decoded);
    // Without specials shown: the pieces `piece(id, false)` joined.
    let mut raw = Vec::new();
    for &id in &ids {
        raw.extend_from_slice(tok.piece(id, false).unwrap_or_default());
    }
    assert_eq!(streamed(tok, &ids, false), String::from_utf8_lossy(&raw));
});
