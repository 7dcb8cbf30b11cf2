//! Arbitrary response formats (a JSON Schema, a regex or a Lark grammar,
//! the kind picked by the first byte) compiled against a byte-level BPE
//! vocab: compiling never panics and is either refused with a message or
//! gives a constraint whose every mask lets some token through until it is
//! complete; following allowed tokens never errors.
#![no_main]

use std::sync::{Arc, OnceLock};

use lfmd::constraint::{Grammars, ResponseFormat};
use lfmd::tokenizer::{LFM2_SPECIALS, SpecialIds, train, train_bpe};
use libfuzzer_sys::fuzz_target;

fn grammars() -> &'static Grammars {
    static G: OnceLock<Grammars> = OnceLock::new();
    G.get_or_init(|| {
        let tok = train_bpe(train::CORPUS, 600, LFM2_SPECIALS)
            .tokenizer(SpecialIds {
                bos: Some(1),
                eos: Some(7),
                pad: Some(0),
                add_bos: true,
            })
            .expect("the trained vocab loads");
        Grammars::new(Arc::new(tok)).expect("the grammar engine indexes the vocab")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest).into_owned();
    let format = match kind % 4 {
        0 => ResponseFormat::JsonSchema(text),
        1 => ResponseFormat::Regex(text),
        2 => ResponseFormat::Lark(text),
        _ => ResponseFormat::JsonObject,
    };
    let Ok(mut c) = grammars().compile(&format) else {
        return;
    };
    // Follow the lowest allowed token, then the highest, a few steps.
    for step in 0..16 {
        if c.is_complete() {
            break;
        }
        let Ok(mask) = c.allowed() else { break };
        let allowed = (0..mask.len() * 32).filter(|&t| mask[t / 32] >> (t % 32) & 1 == 1);
        let t = if step % 2 == 0 { allowed.min() } else { allowed.max() };
        let t = t.expect("a constraint that is not complete allows some token");
        c.accept(t as u32).expect("an allowed token is accepted");
    }
});
