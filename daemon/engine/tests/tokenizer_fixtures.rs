//! Conformance with llama.cpp's tokenizer: the test vectors of its
//! `test-tokenizer-0` (inputs in `<vocab>.inp`, expected ids in `<vocab>.out`)
//! must encode to exactly the same ids with our tokenizer.
//!
//! Needs files that are not in the repository, so it runs only when both are
//! given: `LFM_VOCAB_GGUF` (e.g. llama.cpp's `models/ggml-vocab-llama-bpe.gguf`)
//! and `LFM_TOKENIZER_FIXTURES` (the folder holding
//! `ggml-vocab-llama-bpe.gguf.inp` and `.out`, named after the vocab file).
//! Without them the trial is reported ignored (skipped), not passed
//! (libtest-mimic: libtest has no run-time skip), and with
//! `LFM_REQUIRE_TOKENIZER_FIXTURES=1` (set by `.ci/run` where it provides
//! them) their absence fails the run.

use std::path::{Path, PathBuf};

use lfm_engine::gguf::Gguf;
use lfm_engine::tokenizer::Tokenizer;

/// Splits `.inp` and `.out` as `read_tests` in llama.cpp's
/// `tests/test-tokenizer-0.cpp`: inputs are separated by
/// `"\n__ggml_vocab_test__\n"` (so the last input ends at the last separator,
/// and an input may be empty); each output line is stripped and split on
/// single spaces.
fn read_vectors(inp: &str, out: &str) -> Vec<(String, Vec<u32>)> {
    const SEP: &str = "\n__ggml_vocab_test__\n";
    let mut inputs = Vec::new();
    let mut pos = 0;
    while pos < inp.len() {
        match inp[pos..].find(SEP) {
            Some(at) => {
                inputs.push(inp[pos..pos + at].to_owned());
                pos += at + SEP.len();
            }
            None => {
                inputs.push(inp[pos..].to_owned());
                break;
            }
        }
    }
    let outputs: Vec<Vec<u32>> = out
        .lines()
        .map(|line| {
            let line = line.trim();
            if line.is_empty() {
                return Vec::new();
            }
            line.split(' ')
                .map(|t| t.parse().unwrap_or_else(|e| panic!("bad id {t:?}: {e}")))
                .collect()
        })
        .collect();
    assert_eq!(
        inputs.len(),
        outputs.len(),
        "the .inp file has {} inputs but the .out file {} lines",
        inputs.len(),
        outputs.len()
    );
    inputs.into_iter().zip(outputs).collect()
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let fixtures = env_path("LFM_VOCAB_GGUF").zip(env_path("LFM_TOKENIZER_FIXTURES"));
    let required = std::env::var("LFM_REQUIRE_TOKENIZER_FIXTURES").is_ok_and(|v| v == "1");
    let trial = match fixtures {
        Some((vocab, dir)) => libtest_mimic::Trial::test("llama_cpp_test_vectors", move || {
            llama_cpp_test_vectors(&vocab, &dir);
            Ok(())
        }),
        None if required => libtest_mimic::Trial::test("llama_cpp_test_vectors", || {
            Err("LFM_REQUIRE_TOKENIZER_FIXTURES=1 but LFM_VOCAB_GGUF or LFM_TOKENIZER_FIXTURES is unset".into())
        }),
        None => {
            eprintln!(
                "*** SKIPPED: set LFM_VOCAB_GGUF to a vocab GGUF (llama.cpp's models/ggml-vocab-llama-bpe.gguf) \
                 and LFM_TOKENIZER_FIXTURES to the folder with its .inp/.out test vectors ***"
            );
            libtest_mimic::Trial::test("llama_cpp_test_vectors", || Ok(())).with_ignored_flag(true)
        }
    };
    libtest_mimic::run(&args, vec![trial]).exit();
}

fn llama_cpp_test_vectors(vocab: &Path, dir: &Path) {
    let gguf = Gguf::open(vocab).unwrap_or_else(|e| panic!("{}: {e}", vocab.display()));
    let tok =
        Tokenizer::from_gguf(gguf.header()).unwrap_or_else(|e| panic!("{}: {e}", vocab.display()));
    let name = vocab
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let read = |ext: &str| {
        let path: PathBuf = dir.join(format!("{name}.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let vectors = read_vectors(&read("inp"), &read("out"));
    assert!(!vectors.is_empty(), "no test vectors");

    let mut failures = Vec::new();
    for (text, want) in &vectors {
        // test-tokenizer-0 encodes with add_special = false, parse_special = false.
        let got = tok.encode(text, false, false);
        if &got != want {
            failures.push(format!("{text:?}\n    want {want:?}\n    got  {got:?}"));
        }
        // Every vector also round-trips through decode.
        assert_eq!(&tok.decode(&got), text, "decode of {text:?}");
    }
    println!(
        "{} of {} llama.cpp test vectors match",
        vectors.len() - failures.len(),
        vectors.len()
    );
    assert!(
        failures.is_empty(),
        "{} vectors differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
