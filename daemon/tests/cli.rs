//! The `lfmd` binary end to end: synth writes a model, inspect describes it,
//! and bad files get one clear line and a failing exit code, never a panic.

use std::path::Path;
use std::process::{Command, Output};

fn lfmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lfmd"))
        .args(args)
        .output()
        .expect("run lfmd")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "lfmd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn synth(dir: &Path, preset: &str, quant: &str) -> String {
    let path = dir.join(format!("{preset}-{quant}.gguf"));
    let p = path.to_str().unwrap().to_owned();
    ok(&lfmd(&[
        "synth", "--preset", preset, "--quant", quant, "--seed", "3", &p,
    ]));
    p
}

#[test]
fn synth_then_inspect_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path(), "tiny-moe", "q8_0");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&lfmd(&["inspect", "--json", &path]))).unwrap();
    assert_eq!(v["architecture"], "lfm2moe");
    assert_eq!(v["file_type"], "Q8_0");
    assert_eq!(v["synthetic"]["preset"], "tiny-moe");
    assert_eq!(v["synthetic"]["seed"], 3);
    assert_eq!(v["model"]["n_expert"], 8);
    assert_eq!(v["model"]["n_layer_dense_lead"], 2);
    assert_eq!(v["model"]["gating"], "sigmoid");
    assert_eq!(v["layers"][2]["mixer"], "attention");
    assert_eq!(v["layers"][3]["ffn"], "moe");
    assert_eq!(v["experts"].as_array().unwrap().len(), 4 * 8);
    assert_eq!(v["tokenizer"]["pre"], "lfm2");
    assert_eq!(v["tokenizer"]["bos"], 1);
    assert_eq!(v["tokenizer"]["eos"], 7);
    assert!(v["chat_template_bytes"].as_u64().unwrap() > 100);
    assert!(v["model_error"].is_null());
    assert!(!v["isa"].as_str().unwrap().is_empty());
    let total = v["total_params"].as_u64().unwrap();
    let active = v["active_params"].as_u64().unwrap();
    assert!(active < total && active > total / 3, "{active} of {total}");
    // Expert slabs lie inside the file and do not overlap.
    let len = v["file_bytes"].as_u64().unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v["experts"].as_array().unwrap() {
        for part in ["gate", "up", "down"] {
            ranges.push((
                e[part]["start"].as_u64().unwrap(),
                e[part]["end"].as_u64().unwrap(),
            ));
        }
    }
    ranges.sort_unstable();
    assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
    assert!(ranges.last().unwrap().1 <= len);
}

#[test]
fn inspect_text_shows_layers_and_experts() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path(), "tiny-dense", "f16");
    let text = ok(&lfmd(&["inspect", &path]));
    assert!(text.contains("architecture   lfm2"), "{text}");
    assert!(text.contains("5: 3 short-conv + 2 attention"), "{text}");
    assert!(text.contains("attention (kv 2)"), "{text}");
    assert!(
        !text.contains("experts ("),
        "a dense model has no expert table"
    );
}

#[test]
fn corrupt_and_missing_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path(), "tiny-dense", "q4_0");
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"PK\x03\x04 definitely a zip").unwrap();
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    for (file, needle) in [
        (cut.to_str().unwrap(), "past the end of the file"),
        (junk.to_str().unwrap(), "not a GGUF file"),
        (empty.to_str().unwrap(), "not a GGUF file"),
        ("/nonexistent/model.gguf", "cannot open"),
        (dir.path().to_str().unwrap(), "not a regular file"),
    ] {
        let out = lfmd(&["inspect", file]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {err}");
        assert!(err.contains(needle), "{file}: {err}");
        assert!(!err.contains("panicked"), "{file}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn synth_rejects_unknown_presets_and_types() {
    let dir = tempfile::tempdir().unwrap();
    let never = dir.path().join("never.gguf");
    let never = never.to_str().unwrap();
    let out = lfmd(&["synth", "--preset", "70b", never]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("choose one of 8b-a1b"));
    let out = lfmd(&["synth", "--preset", "tiny-moe", "--quant", "iq2_xxs", never]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("llama-quantize"));
    assert!(!Path::new(never).exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no partial file left behind"
    );
}

#[test]
fn tokenize_logits_and_generate_commands() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path(), "tiny-dense", "q8_0");
    let ids: Vec<u32> = serde_json::from_str(&ok(&lfmd(&[
        "tokenize",
        "--model",
        &path,
        "<|im_start|>user\nHi",
    ])))
    .unwrap();
    assert_eq!(
        &ids[..2],
        &[1, 6],
        "BOS then <|im_start|> parsed as one token"
    );
    let plain: Vec<u32> = serde_json::from_str(&ok(&lfmd(&[
        "tokenize",
        "--model",
        &path,
        "--no-bos",
        "--no-special",
        "<|im_start|>",
    ])))
    .unwrap();
    assert!(plain.len() > 1 && !plain.contains(&6) && plain[0] != 1);

    let list = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let rows: Vec<Vec<f32>> =
        serde_json::from_str(&ok(&lfmd(&["logits", "--model", &path, "--tokens", &list]))).unwrap();
    assert_eq!(rows.len(), ids.len());
    assert!(
        rows.iter()
            .all(|r| r.len() == 512 && r.iter().all(|v| v.is_finite()))
    );

    let generate = |seed: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&lfmd(&[
            "generate",
            "--model",
            &path,
            "--chat",
            "--system",
            "Be brief.",
            "--temperature",
            "0.8",
            "--seed",
            seed,
            "--max-tokens",
            "6",
            "--json",
            "Hello there",
        ])))
        .unwrap()
    };
    let (a, b) = (generate("5"), generate("5"));
    assert_eq!(a["ids"], b["ids"]);
    assert_eq!(a["text"], b["text"]);
    assert_eq!(a["generated_tokens"], 6);
    assert_eq!(a["finish_reason"], "length");
    // The chat template rendered the system prompt as its own turn before
    // the user's, then opened the assistant's: the prompt is exactly the
    // tokens of that text (BOS from the template, not added twice).
    let want: serde_json::Value = serde_json::from_str(&ok(&lfmd(&[
        "tokenize",
        "--model",
        &path,
        "--no-bos",
        "<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n\
         <|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n",
    ])))
    .unwrap();
    assert_eq!(a["prompt_ids"], want, "{a}");
    assert!(a["time_to_first_token_s"].as_f64().unwrap() > 0.0);

    let out = lfmd(&["generate", "--model", &path, "--temperature=-1", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("temperature must be between 0 and 100"));
    let out = lfmd(&["generate", "--model", &path, ""]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("prompt is empty"));
}

#[test]
fn bench_reports_every_figure_it_promises() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path(), "tiny-moe", "q4_0");
    let v: serde_json::Value = serde_json::from_str(&ok(&lfmd(&[
        "bench",
        "--model",
        &path,
        "--threads",
        "1",
        "-p",
        "16",
        "-n",
        "8",
        "-r",
        "2",
        "--memory-budget",
        "unlimited",
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["threads"], 1);
    assert_eq!(v["prefill_tokens"], 16);
    assert_eq!(v["decode_tokens"], 8);
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(!v["isa"].as_str().unwrap().is_empty());
    let model_bytes = std::fs::metadata(&path).unwrap().len();
    assert_eq!(v["model_bytes"], model_bytes);
    let reps = v["decode_tokens_per_s_reps"].as_array().unwrap();
    assert_eq!(reps.len(), 2);
    assert!(reps.iter().all(|r| r.as_f64().unwrap() > 0.0));
    assert_eq!(v["paging"]["budget_mode"], "unlimited");
    // Weight bytes per token, counted from the file: every matrix once, the
    // stacked experts at k / n_expert, the embedding only as the tied
    // output; norms, conv kernels and expert biases left out.
    let g = lfmd::gguf::Gguf::open(&path).unwrap();
    let h = g.header();
    let desc = lfmd::model::ModelDesc::from_header(h).unwrap();
    let tied = h.tensor("output.weight").is_none();
    let per_token: u64 = h
        .tensors
        .iter()
        .filter(|t| {
            !(t.name.ends_with("norm.weight")
                || t.name.ends_with("shortconv.conv.weight")
                || t.name.ends_with("exp_probs_b.bias")
                || (t.name == "token_embd.weight" && !tied))
        })
        .map(|t| {
            if t.name.contains("_exps.") {
                t.size * desc.n_expert_used as u64 / desc.n_expert as u64
            } else {
                t.size
            }
        })
        .sum();
    assert_eq!(v["decode_weight_bytes"], per_token, "{v}");
    let (stream, read) = (
        v["decode_weight_gb_per_s"].as_f64().unwrap(),
        v["read_gb_per_s"].as_f64().unwrap(),
    );
    let decode = v["decode_tokens_per_s"].as_f64().unwrap();
    assert!(
        (stream - per_token as f64 * decode / 1e9).abs() <= 1e-9 * stream.max(1.0),
        "{v}"
    );
    assert!(read > 0.0, "{v}");
    // Under a budget that holds a third of the experts, decode pages: the
    // pager's bytes per token are the loads' (`paging.bytes_in` over the
    // tokens, warm-up excluded, so at most that), and the rest is in range.
    let (fixed, experts) = (
        v["paging"]["fixed_bytes"].as_u64().unwrap(),
        v["paging"]["expert_total_bytes"].as_u64().unwrap(),
    );
    let budget = (fixed + experts / 3).to_string();
    let p: serde_json::Value = serde_json::from_str(&ok(&lfmd(&[
        "bench",
        "--model",
        &path,
        "--threads",
        "1",
        "-p",
        "0",
        "-n",
        "16",
        "--memory-budget",
        &budget,
        "--io-threads",
        "2",
        "--json",
    ])))
    .unwrap();
    let io = &p["decode_io"];
    let pager = io["pager_bytes_per_token"].as_f64().unwrap();
    assert!(pager > 0.0, "{p}");
    assert!(
        pager * 16.0 <= p["paging"]["bytes_in"].as_f64().unwrap() + 1.0,
        "{p}"
    );
    assert!(
        io["storage_bytes_per_token"].as_f64().unwrap() >= 0.0,
        "{p}"
    );
    let wait = io["wait_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&wait), "{p}");
    assert!(p["paging"]["wait_seconds"].as_f64().unwrap() >= 0.0, "{p}");
    assert!(io["major_faults_per_token"].as_f64().unwrap() >= 0.0, "{p}");
    let text = ok(&lfmd(&[
        "bench",
        "--model",
        &path,
        "--threads",
        "1",
        "-p",
        "0",
        "-n",
        "4",
        "-r",
        "2",
    ]));
    assert!(
        text.contains("decode      4 tokens") && text.contains("(each run: "),
        "{text}"
    );
    assert!(text.contains("paging  budget"), "{text}");
    assert!(text.contains("GB per step: decode streams"), "{text}");
    // One sequence: a step reads what one token does, k experts a layer.
    assert_eq!(v["sequences"], 1);
    let k = desc.n_expert_used as f64;
    assert_eq!(
        v["decode_step_weight_bytes"].as_f64().unwrap(),
        per_token as f64,
        "{v}"
    );
    assert_eq!(v["decode_experts_per_layer"].as_f64().unwrap(), k, "{v}");
    // Several sequences together: their tokens, one step each, share the
    // fixed matrices, and each MoE layer reads between k and min(s*k,
    // n_expert) distinct experts; the rate counts every sequence's tokens.
    let v: serde_json::Value = serde_json::from_str(&ok(&lfmd(&[
        "bench", "--model", &path, "-t", "1", "-p", "0", "-n", "3", "-s", "4", "--json",
    ])))
    .unwrap();
    assert_eq!(
        (v["sequences"].as_u64(), v["decode_tokens"].as_u64()),
        (Some(4), Some(3))
    );
    let experts = v["decode_experts_per_layer"].as_f64().unwrap();
    let most = (4.0 * k).min(desc.n_expert as f64);
    assert!(experts > k && experts <= most, "{v}");
    let expert_bytes: u64 = h
        .tensors
        .iter()
        .filter(|t| t.name.contains("_exps."))
        .map(|t| t.size / desc.n_expert as u64)
        .sum();
    let fixed = per_token - expert_bytes * desc.n_expert_used as u64;
    let step = v["decode_step_weight_bytes"].as_f64().unwrap();
    // Every MoE layer's experts are the same size: a step reads each
    // layer's distinct experts at expert_bytes / (MoE layers), which sums
    // to the mean distinct count times expert_bytes.
    let want = fixed as f64 + experts * expert_bytes as f64;
    assert!(
        (step - want).abs() <= 1e-6 * want,
        "step bytes {step}, want {want}: {v}"
    );
    let per_gb = v["decode_tokens_per_gb"].as_f64().unwrap();
    assert!((per_gb - 4e9 / step).abs() <= 1e-9 * per_gb, "{v}");
    let stream = v["decode_weight_gb_per_s"].as_f64().unwrap();
    let rate = v["decode_tokens_per_s"].as_f64().unwrap();
    assert!(
        (stream - step * rate / 4.0 / 1e9).abs() <= 1e-9 * stream.max(1.0),
        "{v}"
    );
    let text = ok(&lfmd(&[
        "bench", "--model", &path, "-t", "1", "-p", "0", "-n", "2", "-s", "3",
    ]));
    assert!(
        text.contains("(3 sequences together") && text.contains("tokens per GB"),
        "{text}"
    );
    // Depth: the tests start after that many tokens, which really enter the
    // context: 4090 of tiny-moe's 4096 leave room for 6, not for 8 more.
    let v: serde_json::Value = serde_json::from_str(&ok(&lfmd(&[
        "bench", "--model", &path, "-t", "1", "-p", "4", "-n", "2", "-d", "64", "--json",
    ])))
    .unwrap();
    assert_eq!(v["depth"], 64);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
    let out = lfmd(&[
        "bench", "--model", &path, "-t", "1", "-p", "8", "-n", "0", "-d", "4090",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("position 4098") && err.contains("4096-token limit"),
        "{err}"
    );
}
