//! Arbitrary bytes as `lfm.v1` `GenerateRequest` / `ChatRequest` messages,
//! converted and validated exactly as the gRPC edge does before a request
//! reaches the model (`grpc::generate_parts` / `chat_parts`, then
//! `scheduler::validate`), then rendered with the built-in chat template
//! and tokenized as `Handle::submit` would. No panics; every refusal is a
//! typed error with a gRPC status.
//!
//! The first byte picks the message type; the rest is the protobuf.
#![no_main]

use std::sync::OnceLock;

use lfm_proto::v1 as pb;
use lfmd::chat::{ChatTemplate, MAX_RENDER_BYTES};
use lfmd::scheduler::{self, Input};
use lfmd::stop::{MAX_STOP_BYTES, MAX_STOP_STRINGS};
use lfmd::tokenizer::{LFM2_SPECIALS, SpecialIds, Tokenizer, train, train_bpe};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::Code;

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

fn template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(ChatTemplate::builtin)
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let parts = if kind & 1 == 0 {
        let Ok(r) = pb::GenerateRequest::decode(bytes) else {
            return;
        };
        lfmd::grpc::generate_parts(r)
    } else {
        let Ok(r) = pb::ChatRequest::decode(bytes) else {
            return;
        };
        lfmd::grpc::chat_parts(r)
    };
    let (input, options, _priority) = match parts {
        Ok(p) => p,
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument);
            return;
        }
    };
    if let Err(e) = scheduler::validate(&input, &options) {
        let status = lfmd::grpc::status_from(e);
        assert_eq!(status.code(), Code::InvalidArgument);
        return;
    }
    // Accepted options are inside their documented ranges.
    let s = &options.sampling;
    assert!((0.0..=100.0).contains(&s.temperature));
    assert!(s.top_p > 0.0 && s.top_p <= 1.0);
    assert!((0.0..=1.0).contains(&s.min_p));
    assert!(s.repeat_penalty > 0.0 && s.repeat_penalty <= 10.0);
    assert!(s.presence_penalty.abs() <= 10.0 && s.frequency_penalty.abs() <= 10.0);
    assert_ne!(options.max_tokens, Some(0));
    assert!(options.stop.len() <= MAX_STOP_STRINGS);
    assert!(
        options
            .stop
            .iter()
            .all(|s| !s.is_empty() && s.len() <= MAX_STOP_BYTES)
    );
    let tok = vocab();
    match input {
        Input::Prompt { text, add_bos } => {
            assert!(!text.is_empty());
            let ids = tok.encode(&text, add_bos.unwrap_or(true), true);
            assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
        }
        Input::Chat { messages, .. } => {
            assert!(!messages.is_empty());
            match template().render(&messages, None, true, "<|startoftext|>") {
                Ok(text) => {
                    assert!(text.len() <= MAX_RENDER_BYTES);
                    let ids = tok.encode(&text, false, true);
                    assert_eq!(tok.decode(&ids), text);
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
    }
});
