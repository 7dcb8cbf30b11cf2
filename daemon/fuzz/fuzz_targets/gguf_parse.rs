//! Arbitrary bytes through the GGUF reader and everything that reads a
//! header: the model description, the expert index, `inspect` and the
//! tokenizer. Errors are fine; panics and out-of-bounds reads are not, and
//! after `from_bytes` succeeds every tensor slice is in bounds and exactly
//! the tensor's size.
#![no_main]

use lfmd::gguf::Gguf;
use lfmd::model::{ExpertIndex, ModelDesc};
use lfmd::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::from_bytes(data.to_vec()) else {
        return;
    };
    let len = g.bytes().len() as u64;
    for t in &g.tensors {
        let range = g.file_range(t);
        assert!(range.start <= range.end && range.end <= len, "{range:?}");
        let slice = g.tensor_data(t);
        assert_eq!(slice.len() as u64, t.size);
        // Touch the first and last byte: in bounds by construction.
        let _ = (slice.first(), slice.last());
    }
    if let Ok(d) = ModelDesc::from_header(&g) {
        if d.validate_tensors(&g).is_ok() {
            let index = ExpertIndex::build(&g, &d);
            for e in index.layers.iter().flatten() {
                for r in [&e.gate, &e.up, &e.down] {
                    assert!(r.start <= r.end && r.end <= len, "expert slab {r:?}");
                }
            }
            let _ = index.total_bytes();
        }
    }
    let _ = lfmd::inspect::inspect(&g, "fuzz");
    if let Ok(tok) = Tokenizer::from_gguf(&g) {
        let ids = tok.encode("Hello <|im_start|>wörld 123", true, true);
        assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
        let _ = tok.decode(&ids);
    }
});
