//! Arbitrary bytes as the body of `POST /v1/chat/completions` or
//! `POST /v1/completions`, decoded and validated exactly as the HTTP edge
//! does before a request reaches the scheduler (`http::openai::chat_call`
//! / `completion_call`, then `scheduler::validate`). No panics; every
//! refusal is a 400 in OpenAI's error shape with a message; an accepted
//! chat holds only the roles the decoder documents.
//!
//! The first byte picks the route; the rest is the body.
#![no_main]

use lfmd::http::openai::{self, ApiError};
use lfmd::scheduler::{self, Input};
use libfuzzer_sys::fuzz_target;

fn refused(e: &ApiError) {
    assert_eq!(e.status.as_u16(), 400, "{e:?}");
    let body = e.body();
    let msg = body["error"]["message"].as_str().expect("a message");
    assert!(!msg.is_empty());
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // The body is what the client reads: it must serialize.
    serde_json::to_string(&body).expect("serializable");
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let decoded = if route & 1 == 0 {
        openai::chat_call(body)
    } else {
        openai::completion_call(body)
    };
    let call = match decoded {
        Ok(c) => c,
        Err(e) => return refused(&e),
    };
    if let Input::Chat { messages, .. } = &call.input {
        for m in messages {
            assert!(
                ["system", "user", "assistant", "tool"].contains(&m.role.as_str()),
                "{:?}",
                m.role
            );
        }
    }
    if let Err(e) = scheduler::validate(&call.input, &call.options) {
        refused(&ApiError::from_submit(e));
    }
});
