//! Arbitrary bytes as a client's HTTP/2 stream on a Unix socket, through the
//! `:authority` rewriter (`lfmd::authority::Rewriter`) that sits between the
//! socket and h2: no panics, bounded memory, and the same output (or the
//! same error) whether the bytes arrive at once or in pieces.
//!
//! The first byte picks the piece size; the stream starts with the HTTP/2
//! preface unless the second byte is odd (so both the frame parser and the
//! pass-through of non-HTTP/2 bytes are reached).
#![no_main]

use lfmd::authority::Rewriter;
use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn run(input: &[u8], step: usize) -> (Vec<u8>, Option<String>) {
    let mut rw = Rewriter::new();
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        if let Err(e) = rw.feed(piece, &mut out) {
            return (out, Some(e.to_string()));
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let [step, mode, rest @ ..] = data else {
        return;
    };
    let mut input = Vec::with_capacity(rest.len() + PREFACE.len());
    if mode % 2 == 0 {
        input.extend_from_slice(PREFACE);
    }
    input.extend_from_slice(rest);
    let whole = run(&input, input.len().max(1));
    let pieces = run(&input, usize::from(*step).max(1));
    match (&whole.1, &pieces.1) {
        // The same error, and the same bytes before it.
        (Some(a), Some(b)) => assert_eq!(a, b),
        (None, None) => assert_eq!(whole.0, pieces.0),
        _ => panic!("chunking changed the outcome: {:?} vs {:?}", whole.1, pieces.1),
    }
});
