//! Goldens from llama.cpp (`scripts/goldens.sh`): each records the sha256 of a
//! synthetic model llama.cpp loaded and ran, with its outputs. Here we check
//! that `lfmd synth` still writes exactly those bytes, so every golden stays
//! proof that llama.cpp runs our presets. The full-size presets are hashed as
//! they stream (a few seconds for the 4.7 GB 8b-a1b; nothing is stored).

use lfm_engine::gguf::GgmlType;
use lfm_engine::synth;
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
        let ty = synth::SynthQuant::parse(g["quant"].as_str().unwrap()).unwrap();
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

fn read_f32(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        d += x as f64 * y as f64;
        na += x as f64 * x as f64;
        nb += y as f64 * y as f64;
    }
    d / (na.sqrt() * nb.sqrt())
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

/// Selection-score gap below which a routing decision counts as a tie: a few
/// times the difference rounding makes between two engines (~5e-4 here).
const ROUTE_TIE: f32 = 2e-3;

/// Teacher-forced logits against llama.cpp's on the very same files, with
/// the thresholds: F32 to 1e-3 of the logit range with the same
/// argmax everywhere; F16/BF16 cosine >= 0.9999 with the same argmax;
/// quantized cosine >= 0.995 and at least as close to the F32 model's
/// logits as llama.cpp is (minus 0.001). Prints the conformance table.
#[test]
fn logits_match_llama_cpp() {
    use lfm_engine::engine::{BatchItem, ForwardStats, LogitsWanted, Model, SeqState};
    let all = goldens();
    let by_name: std::collections::HashMap<&str, &serde_json::Value> =
        all.iter().map(|(n, g)| (n.as_str(), g)).collect();
    println!(
        "{:<22} {:>10} {:>12} {:>8} {:>12} {:>12} {:>10} ties",
        "model", "cos min", "max|d|/rng", "argmax", "cos->f32", "llama->f32", "cos all"
    );
    let mut checked = 0;
    for (name, g) in &all {
        let Some(file) = g["forced_logits"].as_str() else {
            continue;
        };
        let preset_name = g["preset"].as_str().unwrap();
        let preset = synth::find_preset(preset_name).unwrap();
        let quant = g["quant"].as_str().unwrap();
        let q = synth::SynthQuant::parse(quant).unwrap();
        let mut bytes = Vec::new();
        synth::write_to(preset, q, g["seed"].as_u64().unwrap(), &mut bytes).unwrap();
        let model = Model::from_gguf(std::sync::Arc::new(
            lfm_engine::gguf::Gguf::from_bytes(bytes).unwrap(),
        ))
        .unwrap();
        let ids: Vec<u32> = g["forced_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut st = SeqState::new(&model);
        let mut stats = ForwardStats::default();
        let ours = model
            .forward_with_stats(
                &mut [BatchItem {
                    state: &mut st,
                    tokens: &ids,
                    logits: LogitsWanted::All,
                }],
                Some(&mut stats),
            )
            .unwrap()
            .pop()
            .unwrap();
        let theirs = read_f32(&golden_dir().join(file));
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let f32_ref = by_name
            .get(format!("{preset_name}-f32.json").as_str())
            .map(|f| read_f32(&golden_dir().join(f["forced_logits"].as_str().unwrap())));
        let nv = model.n_vocab();
        let (mut cos_min, mut rel_max, mut agree) = (1f64, 0f64, 0usize);
        let mut ties = Vec::new();
        let (mut ours_f32, mut theirs_f32) = (0f64, 0f64);
        for (p, (o, t)) in ours.chunks(nv).zip(theirs.chunks(nv)).enumerate() {
            let range = t.iter().cloned().fold(f32::MIN, f32::max)
                - t.iter().cloned().fold(f32::MAX, f32::min);
            let md = o
                .iter()
                .zip(t)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // A routing decision within rounding noise of a tie can go either
            // way in either engine; such positions (and only those) are held
            // to the whole-sequence cosine below instead of their own.
            if stats.route_margin[p] < ROUTE_TIE {
                ties.push(p);
            } else {
                cos_min = cos_min.min(cosine(o, t));
            }
            rel_max = rel_max.max((md / range) as f64);
            agree += usize::from(argmax(o) == argmax(t));
            if let Some(r) = &f32_ref {
                let rp = &r[p * nv..(p + 1) * nv];
                ours_f32 += cosine(o, rp);
                theirs_f32 += cosine(t, rp);
            }
        }
        let npos = ours.len() / nv;
        let (ours_f32, theirs_f32) = (ours_f32 / npos as f64, theirs_f32 / npos as f64);
        let cos_all = cosine(&ours, &theirs);
        println!(
            "{:<22} {:>10.6} {:>12.2e} {:>5}/{:<2} {:>12.6} {:>12.6} {:>10.6} {:?}",
            name.trim_end_matches(".json"),
            cos_min,
            rel_max,
            agree,
            npos,
            ours_f32,
            theirs_f32,
            cos_all,
            ties
        );
        // 4 MoE layers x 32 positions make 128 routing decisions; with these
        // random routers a few percent of them fall within the tie band, so a
        // handful of tie positions is expected. Many more would mean the
        // margins are computed wrong.
        assert!(
            ties.len() * 4 <= npos,
            "{name}: {} of {npos} positions are routing ties",
            ties.len()
        );
        assert!(cos_all >= 0.995, "{name}: whole-sequence cosine {cos_all}");
        match q {
            synth::SynthQuant::Uniform(GgmlType::F32) => {
                assert!(rel_max <= 1e-3, "{name}: max |d| {rel_max} of the range");
                assert_eq!(agree, npos, "{name}: argmax");
            }
            synth::SynthQuant::Uniform(GgmlType::F16 | GgmlType::BF16) => {
                assert!(cos_min >= 0.9999, "{name}: cosine {cos_min}");
                assert_eq!(agree, npos, "{name}: argmax");
            }
            _ => {
                assert!(cos_min >= 0.995, "{name}: cosine {cos_min}");
                assert!(
                    ours_f32 >= theirs_f32 - 0.001,
                    "{name}: ours to F32 {ours_f32} vs llama.cpp {theirs_f32}"
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 19, "conformance ran on {checked} goldens");
}

/// Our tokenizer gives llama.cpp's ids on the synthetic vocabularies (BOS
/// added, special tokens parsed), for every golden file.
#[test]
fn tokenizer_matches_llama_cpp_on_synthetic_vocabularies() {
    let mut checked = 0;
    for (name, g) in goldens() {
        let preset = synth::find_preset(g["preset"].as_str().unwrap()).unwrap();
        let q = synth::SynthQuant::parse(g["quant"].as_str().unwrap()).unwrap();
        // Only the header matters: write the model into a sink that keeps it.
        let mut bytes = Vec::new();
        if !preset.exact {
            continue;
        }
        synth::write_to(preset, q, 0, &mut bytes).unwrap();
        let header = lfm_engine::gguf::parse_header(&bytes).unwrap();
        let tok = lfm_engine::tokenizer::Tokenizer::from_gguf(&header).unwrap();
        for case in g["tokenize"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(tok.encode(text, true, true), want, "{name}: {text:?}");
            checked += 1;
        }
    }
    assert!(checked >= 19 * 5, "{checked}");
}
