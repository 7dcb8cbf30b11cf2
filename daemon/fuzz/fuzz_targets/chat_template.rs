//! Hostile chat templates: fuzzed template source rendered over fuzzed
//! messages. Loops, recursion and huge values must end in a `ChatError` or
//! an output within `MAX_RENDER_BYTES`, within the render's fuel: run with
//! `-timeout=10` so a render that escapes its fuel is reported as a hang.
//!
//! Input: template source, then a NUL byte, then messages as
//! `role \x01 content \x01 role \x01 content ...`. Without a NUL the whole
//! input is the template and the messages are a fixed short conversation.
#![no_main]

use lfmd::chat::{ChatMessage, ChatTemplate, MAX_RENDER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (source, rest) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let source = String::from_utf8_lossy(source);
    let messages: Vec<ChatMessage> = match rest {
        Some(rest) => {
            let rest = String::from_utf8_lossy(rest);
            let parts: Vec<&str> = rest.split('\x01').collect();
            parts
                .chunks(2)
                .map(|c| ChatMessage::new(c[0], c.get(1).copied().unwrap_or_default()))
                .collect()
        }
        None => vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi <|im_end|> {{ there }}"),
            ChatMessage::new("assistant", "Hello!"),
        ],
    };
    let Ok(t) = ChatTemplate::new(&source) else {
        return;
    };
    for add_generation_prompt in [false, true] {
        if let Ok(out) = t.render(&messages, None, add_generation_prompt, "<|startoftext|>") {
            assert!(out.len() <= MAX_RENDER_BYTES);
        }
    }
});
