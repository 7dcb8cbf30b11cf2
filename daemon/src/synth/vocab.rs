//! The vocabulary of synthetic models: the LFM2 special tokens at their real
//! ids, the 256 byte tokens of byte-level BPE, then learned merges.

pub const PAD: u32 = 0;
pub const BOS: u32 = 1;
pub const EOS: u32 = 7;

/// LFM2's special tokens, at ids 0.. in this order (all control tokens).
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

pub struct SynthVocab {
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
}

/// GPT-2's byte-to-unicode map: printable bytes stand for themselves, the
/// rest are shifted to code points from U+0100 up.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    if printable(b) {
        char::from(b)
    } else {
        let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + rank).expect("below U+0200")
    }
}

/// A vocabulary of `n_vocab` tokens: specials, bytes, then reserved slots.
pub fn lfm2_vocab(n_vocab: usize) -> SynthVocab {
    let mut tokens: Vec<String> = LFM2_SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut token_types = vec![3; tokens.len()];
    for b in 0..=255u8 {
        tokens.push(byte_char(b).to_string());
        token_types.push(1);
    }
    let mut r = 0;
    while tokens.len() < n_vocab {
        tokens.push(format!("<|reserved_{r}|>"));
        token_types.push(5);
        r += 1;
    }
    tokens.truncate(n_vocab);
    token_types.truncate(n_vocab);
    SynthVocab {
        tokens,
        token_types,
        merges: Vec::new(),
    }
}
