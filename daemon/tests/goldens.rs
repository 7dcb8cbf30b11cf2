//! Goldens from llama.cpp (`scripts/goldens.sh`): each records the sha256 of a
//! synthetic model llama.cpp loaded and ran, with its outputs. Here we check
//! that `lfmd synth` still writes exactly those bytes, so every golden stays
//! proof that llama.cpp runs our presets. The full-size presets are hashed as
//! they stream (a few seconds for the 4.7 GB 8b-a1b; nothing is stored).

use lfmd::gguf::GgmlType;
use lfmd::synth;
use sha2::{Digest, Sha256};
use std::io;
use std::path::PathBuf;

struct HashSink(Sha256, u64);

impl io::Write for HashSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        self.1 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/llama")
}

fn goldens() -> Vec<(String, serde_json::Value)> {
    let mut out: Vec<_> = std::fs::read_dir(golden_dir())
        .expect("golden dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn synth_writes_the_exact_files_llama_cpp_ran() {
    let all = goldens();
    assert!(
        all.len() >= 8,
        "expected goldens for both small presets at several types"
    );
    let mut checked = 0;
    for (name, g) in &all {
        let preset = synth::find_preset(g["preset"].as_str().unwrap()).unwrap();
        let ty = GgmlType::from_name(g["quant"].as_str().unwrap()).unwrap();
        let mut sink = HashSink(Sha256::new(), 0);
        synth::write_to(preset, ty, g["seed"].as_u64().unwrap(), &mut sink).unwrap();
        let digest: String = sink
            .0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sink.1, g["file_bytes"].as_u64().unwrap(), "{name}: size");
        assert_eq!(
            digest,
            g["sha256"].as_str().unwrap(),
            "{name}: lfmd synth no longer writes the file llama.cpp ran; rerun scripts/goldens.sh"
        );
        checked += 1;
    }
    assert_eq!(checked, all.len());
    for big in ["8b-a1b-q4_0.json", "350m-q8_0.json"] {
        assert!(all.iter().any(|(n, _)| n == big), "missing golden {big}");
    }
}

#[test]
fn small_presets_are_not_degenerate_under_llama_cpp() {
    // A random model whose predictions hardly depend on the input would make
    // every logit comparison meaningless: teacher-forced on 32 positions,
    // llama.cpp's argmax must vary. (Greedy continuations of random models
    // may well fall into loops; that is recorded, not judged.)
    for (name, g) in goldens() {
        if !synth::find_preset(g["preset"].as_str().unwrap())
            .unwrap()
            .exact
        {
            continue;
        }
        let ids = |k: &str| -> Vec<u64> {
            g[k].as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        };
        let (forced, mut argmax) = (ids("forced_ids"), ids("forced_argmax"));
        assert_eq!(forced.len(), argmax.len(), "{name}");
        assert_eq!(ids("greedy_ids").len(), 16, "{name}");
        argmax.sort_unstable();
        argmax.dedup();
        assert!(
            argmax.len() * 2 >= forced.len(),
            "{name}: only {} distinct argmaxes over {} positions",
            argmax.len(),
            forced.len()
        );
    }
}
