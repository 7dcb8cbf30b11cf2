//! Arbitrary bytes through the GGUF reader, the model description and
//! `inspect`: errors are fine, panics and out-of-bounds reads are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lfmd::gguf::Gguf;
use lfmd::model::ModelDesc;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::from_bytes(data.to_vec()) else {
        return;
    };
    for t in &g.tensors {
        assert_eq!(g.tensor_data(t).len() as u64, t.size);
    }
    if let Ok(d) = ModelDesc::from_header(&g) {
        let _ = d.validate_tensors(&g);
    }
    let _ = lfmd::inspect::inspect(&g, "fuzz");
});
