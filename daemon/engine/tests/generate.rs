//! Generation: every stop rule (end-of-generation tokens, stop strings,
//! max tokens, context end), seeded sampling, and the CLI commands.

use lfm_engine::engine::{BatchItem, LogitsWanted, Model};
use lfm_engine::gguf::{GgmlType, Gguf};
use lfm_engine::sampler::SamplingParams;
use lfm_engine::sequence::{FinishReason, Sequence};
use lfm_engine::stop::StopText;
use lfm_engine::synth;
use lfm_engine::tokenizer::Tokenizer;
use std::sync::Arc;

fn setup() -> (Model, Arc<Tokenizer>) {
    let mut bytes = Vec::new();
    synth::write_to(
        synth::find_preset("tiny-moe").unwrap(),
        GgmlType::Q8_0,
        1,
        &mut bytes,
    )
    .unwrap();
    let g = Arc::new(Gguf::from_bytes(bytes).unwrap());
    let tok = Arc::new(Tokenizer::from_gguf(&g).unwrap());
    (Model::from_gguf(g).unwrap(), tok)
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        ..Default::default()
    }
}

/// Logits that make greedy sampling pick `id`.
fn pick(n_vocab: usize, id: u32) -> Vec<f32> {
    let mut l = vec![0.0; n_vocab];
    l[id as usize] = 10.0;
    l
}

fn seq(m: &Model, tok: &Arc<Tokenizer>, max: usize, stops: &[&str]) -> Sequence {
    let prompt = tok.encode("Hello", true, true);
    let stop = StopText::new(stops.iter().map(|s| s.to_string()).collect()).unwrap();
    let s = Sequence::new(m, tok.clone(), prompt, greedy(), max, stop);
    let n = s.next_input(usize::MAX).len();
    assert!(s.needs_logits(n));
    s
}

#[test]
fn end_of_generation_tokens_stop_without_text() {
    let (m, tok) = setup();
    let nv = m.n_vocab();
    for eog in ["<|im_end|>", "<|endoftext|>"] {
        let id = tok.token_id(eog).unwrap();
        let mut s = seq(&m, &tok, 10, &[]);
        let n = s.next_input(usize::MAX).len();
        let a = tok.encode("a", false, false)[0];
        let step = s.advance(n, Some(&pick(nv, a))).unwrap().unwrap();
        assert_eq!((step.text.as_str(), step.finished), ("a", None));
        let step = s.advance(1, Some(&pick(nv, id))).unwrap().unwrap();
        assert_eq!(step.finished, Some(FinishReason::Eos), "{eog}");
        assert_eq!(step.text, "");
        assert!(s.is_finished());
    }
}

#[test]
fn stop_strings_cut_the_text_and_max_tokens_ends_it() {
    let (m, tok) = setup();
    let nv = m.n_vocab();
    let ids: Vec<u32> = "xyzSTOPq"
        .chars()
        .map(|c| tok.encode(&c.to_string(), false, false)[0])
        .collect();
    let mut s = seq(&m, &tok, 100, &["STOP"]);
    let mut n = s.next_input(usize::MAX).len();
    let mut text = String::new();
    let mut end = None;
    for &id in &ids {
        let step = s.advance(n, Some(&pick(nv, id))).unwrap().unwrap();
        text += &step.text;
        n = 1;
        if step.finished.is_some() {
            end = step.finished;
            break;
        }
    }
    assert_eq!(end, Some(FinishReason::StopString));
    assert_eq!(text, "xyz");

    let mut s = seq(&m, &tok, 3, &[]);
    let mut n = s.next_input(usize::MAX).len();
    let mut steps = Vec::new();
    while !s.is_finished() {
        steps.push(
            s.advance(n, Some(&pick(nv, ids[steps.len()])))
                .unwrap()
                .unwrap(),
        );
        n = 1;
    }
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[2].finished, Some(FinishReason::Length));
    assert_eq!(
        steps.iter().map(|s| s.text.as_str()).collect::<String>(),
        "xyz"
    );
}

fn run(
    m: &Model,
    tok: &Arc<Tokenizer>,
    params: SamplingParams,
    max: usize,
) -> (Vec<u32>, FinishReason) {
    let prompt = tok.encode(
        "<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\n",
        true,
        true,
    );
    let mut s = Sequence::new(m, tok.clone(), prompt, params, max, StopText::default());
    while !s.is_finished() {
        let chunk = s.next_input(4).to_vec();
        let want = s.needs_logits(chunk.len());
        let out = m
            .forward(&mut [BatchItem {
                state: &mut s.state,
                tokens: &chunk,
                logits: if want {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
            }])
            .unwrap();
        s.advance(chunk.len(), want.then(|| &out[0][..])).unwrap();
    }
    (s.generated().to_vec(), s.finish_reason().unwrap().clone())
}

#[test]
fn same_seed_same_tokens() {
    let (m, tok) = setup();
    let hot = |seed| SamplingParams {
        temperature: 1.5,
        min_p: 0.0,
        seed,
        ..Default::default()
    };
    let a = run(&m, &tok, hot(9), 24);
    let b = run(&m, &tok, hot(9), 24);
    let c = run(&m, &tok, hot(10), 24);
    assert_eq!(a, b);
    assert_ne!(a.0, c.0, "another seed should sample differently");
    assert!(matches!(a.1, FinishReason::Length | FinishReason::Eos));
}

#[test]
fn context_end_is_a_finish_reason() {
    let (m, tok) = setup();
    let prompt = vec![1u32; 12];
    let mut s = Sequence::new(&m, tok.clone(), prompt, greedy(), 1000, StopText::default());
    s.set_context_limit(16);
    let mut steps = 0;
    while !s.is_finished() {
        let chunk = s.next_input(usize::MAX).to_vec();
        let out = m
            .forward(&mut [BatchItem {
                state: &mut s.state,
                tokens: &chunk,
                logits: LogitsWanted::Last,
            }])
            .unwrap();
        s.advance(chunk.len(), Some(&out[0])).unwrap();
        steps += 1;
    }
    assert_eq!(s.finish_reason(), Some(&FinishReason::ContextFull));
    assert!(
        steps <= 5 && s.state.len() < 16,
        "{steps} steps, {} positions",
        s.state.len()
    );
}
