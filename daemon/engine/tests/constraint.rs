//! Constrained decoding on a random-weight model, whose free output is
//! gibberish: under a response format every output must still be complete
//! and valid (checked by an independent validator, the `jsonschema` crate),
//! alone and 16 sequences to a batch, greedy and sampled; a sequence without
//! a format in the same batch is unchanged; bad formats are refused saying
//! what is wrong.

use lfm_engine::constraint::{FormatError, Grammars, MAX_FORMAT_BYTES, ResponseFormat};
use lfm_engine::engine::{BatchItem, LogitsWanted, Model};
use lfm_engine::gguf::{GgmlType, Gguf};
use lfm_engine::sampler::SamplingParams;
use lfm_engine::sequence::{FinishReason, Sequence};
use lfm_engine::stop::StopText;
use lfm_engine::synth;
use lfm_engine::tokenizer::Tokenizer;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn setup() -> (Model, Arc<Tokenizer>, Grammars) {
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
    let grammars = Grammars::new(tok.clone()).unwrap();
    (Model::from_gguf(g).unwrap(), tok, grammars)
}

/// Schemas of every kind the issue names, each bounded so that a complete
/// output fits in the token budget.
fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object",
               "properties": {"device": {"enum": ["hall_light", "kitchen_light", "fan"]},
                              "level": {"type": "integer", "minimum": 0, "maximum": 100}},
               "required": ["device", "level"], "additionalProperties": false}),
        json!({"type": "object",
               "properties": {"user": {"type": "object",
                                       "properties": {"name": {"type": "string", "maxLength": 10},
                                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                                       "required": ["name", "age"], "additionalProperties": false},
                              "active": {"type": "boolean"}},
               "required": ["user", "active"], "additionalProperties": false}),
        json!({"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
               "minItems": 1, "maxItems": 4}),
        json!({"type": "object",
               "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
                              "y": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5}},
               "required": ["x", "y"], "additionalProperties": false}),
        json!({"type": "string", "pattern": "^[a-z]{2,5}-[0-9]{3}$"}),
        json!({"type": "object",
               "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                              "b": {"type": "string", "maxLength": 4},
                              "c": {"type": "boolean"}},
               "required": ["a"], "additionalProperties": false}),
        json!({"enum": ["red", 1, null, true, {"k": [1, 2]}]}),
        json!({"type": "array", "maxItems": 3,
               "items": {"type": "object",
                         "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                        "tag": {"enum": ["new", "old"]}},
                         "required": ["id"], "additionalProperties": false}}),
        json!({"$defs": {"pt": {"type": "object",
                                "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                                "required": ["x", "y"], "additionalProperties": false}},
               "type": "object",
               "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
               "required": ["from", "to"], "additionalProperties": false}),
        json!({"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                         {"type": "string", "maxLength": 5}]}),
        json!({"type": "object",
               "properties": {"ok": {"const": "yes"},
                              "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 3}},
               "required": ["ok", "n"], "additionalProperties": false}),
        json!({"type": "object",
               "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                       "minItems": 2, "maxItems": 3}},
               "required": ["tags"], "additionalProperties": false}),
    ]
}

fn prompt(tok: &Tokenizer, i: usize) -> Vec<u32> {
    let q = ["Turn on the light", "Who is there?", "List some numbers"][i % 3];
    tok.encode(
        &format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"),
        true,
        true,
    )
}

/// Runs `seqs` together, a chunk of each per forward pass, to the end.
fn run_batch(m: &Model, seqs: &mut [Sequence]) {
    loop {
        let live: Vec<usize> = (0..seqs.len())
            .filter(|&i| !seqs[i].is_finished())
            .collect();
        if live.is_empty() {
            return;
        }
        let chunks: Vec<Vec<u32>> = live
            .iter()
            .map(|&i| seqs[i].next_input(8).to_vec())
            .collect();
        let wants: Vec<bool> = live
            .iter()
            .zip(&chunks)
            .map(|(&i, c)| seqs[i].needs_logits(c.len()))
            .collect();
        let mut picked: Vec<&mut Sequence> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| live.contains(i))
            .map(|(_, s)| s)
            .collect();
        let mut items: Vec<BatchItem<'_>> = picked
            .iter_mut()
            .zip(&chunks)
            .zip(&wants)
            .map(|((s, c), &w)| BatchItem {
                state: &mut s.state,
                tokens: c,
                logits: if w {
                    LogitsWanted::Last
                } else {
                    LogitsWanted::None
                },
            })
            .collect();
        let out = m.forward(&mut items).unwrap();
        drop(items);
        let mut k = 0;
        for ((s, c), &w) in picked.iter_mut().zip(&chunks).zip(&wants) {
            let row = w.then(|| {
                k += 1;
                &out[k - 1][..]
            });
            s.advance(c.len(), row).unwrap();
        }
    }
}

fn params(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        min_p: if temperature > 1.0 { 0.0 } else { 0.05 },
        seed,
        ..Default::default()
    }
}

/// The output's text: an end-of-generation token that ended it is not part
/// of it.
fn text(tok: &Tokenizer, s: &Sequence) -> String {
    let mut ids = s.generated().to_vec();
    if s.finish_reason() == Some(&FinishReason::Eos) {
        ids.pop();
    }
    tok.decode(&ids)
}

/// Every output, over ~1,000 generations (12 schemas; greedy and two
/// temperatures; 16 sequences to a batch), is complete JSON that validates;
/// the unconstrained sequence riding in each batch is what it is alone.
#[test]
fn every_constrained_output_is_complete_and_valid() {
    let (m, tok, grammars) = setup();
    let solo = {
        let mut s = [Sequence::new(
            &m,
            tok.clone(),
            prompt(&tok, 0),
            params(0.0, 0),
            24,
            StopText::default(),
        )];
        run_batch(&m, &mut s);
        s[0].generated().to_vec()
    };
    let mut checked = 0;
    let mut compile = Duration::ZERO;
    for (si, schema) in schemas().iter().enumerate() {
        let validator = jsonschema::validator_for(schema).unwrap();
        let format = ResponseFormat::JsonSchema(schema.to_string());
        // Greedy over three prompts, then 42 seeds at each of two temperatures.
        let mut runs: Vec<(f32, u64, usize)> = (0..3).map(|p| (0.0, 0, p)).collect();
        runs.extend((0..42).map(|seed| (0.8, seed, seed as usize)));
        runs.extend((0..42).map(|seed| (1.5, seed, seed as usize)));
        for batch in runs.chunks(15) {
            let mut seqs = vec![Sequence::new(
                &m,
                tok.clone(),
                prompt(&tok, 0),
                params(0.0, 0),
                24,
                StopText::default(),
            )];
            for &(t, seed, p) in batch {
                let mut s = Sequence::new(
                    &m,
                    tok.clone(),
                    prompt(&tok, p),
                    params(t, seed),
                    200,
                    StopText::default(),
                );
                let t0 = Instant::now();
                s.constrain(grammars.compile(&format).unwrap());
                compile += t0.elapsed();
                seqs.push(s);
            }
            run_batch(&m, &mut seqs);
            assert_eq!(
                seqs[0].generated(),
                &solo[..],
                "an unconstrained sequence changed beside constrained ones"
            );
            for (s, &(t, seed, _)) in seqs[1..].iter_mut().zip(batch) {
                let out = text(&tok, s);
                let why = format!(
                    "schema {si} at temperature {t} seed {seed}: {out:?} ({:?})",
                    s.finish_reason()
                );
                assert!(
                    matches!(
                        s.finish_reason(),
                        Some(FinishReason::Complete | FinishReason::Eos)
                    ),
                    "did not complete: {why}"
                );
                assert!(!s.output_incomplete(), "{why}");
                let v: Value =
                    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {why}"));
                let errors: Vec<String> =
                    validator.iter_errors(&v).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "invalid ({errors:?}): {why}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 1000, "{checked}");
    eprintln!(
        "{checked} constrained outputs valid; compile {:?} each on average",
        compile / checked as u32
    );
}

/// A regular expression and a Lark grammar hold too (checked by hand).
#[test]
fn regex_and_grammar_outputs_match() {
    let (m, tok, grammars) = setup();
    let rx = ResponseFormat::Regex("(yes|no|maybe)-[0-9]{2,4}".into());
    let lark = ResponseFormat::Lark(
        "start: cmd\ncmd: \"set \" KEY \"=\" VAL | \"get \" KEY\nKEY: /[a-z]{1,5}/\nVAL: /[0-9]{1,3}/ | \"true\"\n".into(),
    );
    for format in [&rx, &lark] {
        let mut seqs: Vec<Sequence> = (0..16)
            .map(|seed| {
                let mut s = Sequence::new(
                    &m,
                    tok.clone(),
                    prompt(&tok, seed as usize),
                    params(1.0, seed),
                    64,
                    StopText::default(),
                );
                s.constrain(grammars.compile(format).unwrap());
                s
            })
            .collect();
        run_batch(&m, &mut seqs);
        for s in &mut seqs {
            let out = text(&tok, s);
            assert!(!s.output_incomplete(), "{out:?}");
            let ok = match format {
                ResponseFormat::Regex(_) => {
                    let (word, num) = out.split_once('-').unwrap_or_default();
                    ["yes", "no", "maybe"].contains(&word)
                        && (2..=4).contains(&num.len())
                        && num.bytes().all(|b| b.is_ascii_digit())
                }
                _ => {
                    let key_ok = |k: &str| {
                        (1..=5).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_lowercase())
                    };
                    if let Some(rest) = out.strip_prefix("set ") {
                        rest.split_once('=').is_some_and(|(k, v)| {
                            key_ok(k)
                                && (v == "true"
                                    || (1..=3).contains(&v.len())
                                        && v.bytes().all(|b| b.is_ascii_digit()))
                        })
                    } else {
                        out.strip_prefix("get ").is_some_and(key_ok)
                    }
                }
            };
            assert!(ok, "{:?} gave {out:?}", format.kind());
        }
    }
}

/// Ended by max_tokens before the format is complete: said so.
#[test]
fn an_output_cut_short_is_flagged_incomplete() {
    let (m, tok, grammars) = setup();
    let format = ResponseFormat::JsonSchema(schemas()[1].to_string());
    let mut seqs = vec![
        Sequence::new(
            &m,
            tok.clone(),
            prompt(&tok, 0),
            params(0.0, 0),
            3,
            StopText::default(),
        ),
        Sequence::new(
            &m,
            tok.clone(),
            prompt(&tok, 0),
            params(0.0, 0),
            200,
            StopText::default(),
        ),
    ];
    for s in &mut seqs {
        s.constrain(grammars.compile(&format).unwrap());
    }
    run_batch(&m, &mut seqs);
    assert_eq!(seqs[0].finish_reason(), Some(&FinishReason::Length));
    assert!(seqs[0].output_incomplete());
    assert!(!seqs[1].output_incomplete());
    // A free-text sequence is never "incomplete".
    let mut free = [Sequence::new(
        &m,
        tok.clone(),
        prompt(&tok, 0),
        params(0.0, 0),
        3,
        StopText::default(),
    )];
    run_batch(&m, &mut free);
    assert!(!free[0].output_incomplete());
}

/// Each bad format is refused with what is wrong and where.
#[test]
fn bad_formats_are_refused_saying_what_is_wrong() {
    let (_m, _tok, grammars) = setup();
    let err = |f: ResponseFormat| grammars.compile(&f).err().expect("refused").to_string();
    let schema = |s: &str| ResponseFormat::JsonSchema(s.into());
    let cases: Vec<(ResponseFormat, &str)> = vec![
        (schema("{\"type\": "), "not valid JSON"),
        (schema("{\"type\": \"strin\"}"), "strin"),
        (
            schema("{\"type\": \"integer\", \"minimum\": 5, \"maximum\": 1}"),
            "minimum",
        ),
        (schema("{\"$ref\": \"#/$defs/nope\"}"), "nope"),
        (
            schema("{\"type\": \"array\", \"uniqueItems\": true}"),
            "uniqueItems",
        ),
        (schema(""), "empty"),
        (ResponseFormat::Regex("a(b".into()), "regex"),
        (ResponseFormat::Regex(String::new()), "empty"),
        (ResponseFormat::Lark("start: foo\n".into()), "foo"),
        (
            ResponseFormat::Lark("x".repeat(MAX_FORMAT_BYTES + 1)),
            "over the limit",
        ),
    ];
    for (f, want) in cases {
        let e = err(f.clone());
        assert!(e.contains(want) && e.contains(f.kind()), "{f:?}: {e}");
    }
    // Nested past the limit: refused naming the path.
    let mut deep = json!({"type": "integer"});
    for _ in 0..40 {
        deep = json!({"type": "array", "items": deep});
    }
    let e = grammars.compile(&schema(&deep.to_string())).err().unwrap();
    assert!(
        matches!(&e, FormatError::TooDeep { at } if at.starts_with("#/items/items")),
        "{e}"
    );
}

/// A format made to explode (a regex whose automaton has 2^n states) is
/// refused or compiled within the fuel, never stalls: bounded time.
#[test]
fn a_hostile_format_is_bounded() {
    let (_m, _tok, grammars) = setup();
    for f in [
        ResponseFormat::Regex("(a|b)*a(a|b){24}".into()),
        ResponseFormat::Lark(format!(
            "start: {}\n",
            (0..2000)
                .map(|i| format!("\"t{i}\""))
                .collect::<Vec<_>>()
                .join(" | ")
        )),
        ResponseFormat::JsonSchema(
            json!({"type": "string", "pattern": "^(x+x+)+y$", "minLength": 1000}).to_string(),
        ),
    ] {
        let t0 = Instant::now();
        let _ = grammars.compile(&f);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{:?} took {:?}",
            f.kind(),
            t0.elapsed()
        );
    }
}

/// Tool calls as LFM2 writes them after `<|tool_call_start|>`: under the
/// call grammar every output, sampled from gibberish, is a call list that
/// parses, names an offered tool (the named one when one is forced), and
/// whose arguments validate against that tool's schema.
#[test]
fn every_constrained_tool_call_parses_and_validates() {
    use lfm_engine::tools::{Tool, call_grammar, parse_calls};
    let (m, tok, grammars) = setup();
    let tools = vec![
        Tool {
            name: "set_light".into(),
            description: "Set a light's level".into(),
            parameters: json!({"type": "object",
                "properties": {"device": {"enum": ["hall_light", "kitchen_light"]},
                               "level": {"type": "integer", "minimum": 0, "maximum": 100},
                               "fade": {"type": "boolean"}},
                "required": ["device", "level"]}),
        },
        Tool {
            name: "get_time".into(),
            description: String::new(),
            parameters: Value::Null,
        },
        Tool {
            name: "note".into(),
            description: String::new(),
            parameters: json!({"type": "object",
                "properties": {"text": {"type": "string", "maxLength": 12},
                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
                "required": ["text"]}),
        },
    ];
    let validators: Vec<_> = tools
        .iter()
        .map(|t| {
            let schema = if t.parameters.is_null() {
                json!({"type": "object", "maxProperties": 0})
            } else {
                t.parameters.clone()
            };
            jsonschema::validator_for(&schema).unwrap()
        })
        .collect();
    let end = tok
        .token_id("<|tool_call_end|>")
        .expect("the vocab has the tool-call tokens");
    let mut checked = 0;
    for only in [None, Some("set_light"), Some("note")] {
        let format = ResponseFormat::Lark(call_grammar(&tools, only, false).unwrap());
        let mut seqs: Vec<Sequence> = (0..16u64)
            .map(|seed| {
                let mut s = Sequence::new(
                    &m,
                    tok.clone(),
                    prompt(&tok, seed as usize),
                    params(if seed == 0 { 0.0 } else { 1.0 }, seed),
                    400,
                    StopText::default(),
                );
                s.constrain(grammars.compile(&format).unwrap());
                s
            })
            .collect();
        run_batch(&m, &mut seqs);
        for s in &mut seqs {
            let mut ids = s.generated().to_vec();
            assert_eq!(ids.pop(), Some(end), "{:?}", tok.decode(s.generated()));
            assert!(!s.output_incomplete());
            let text = tok.decode(&ids);
            let calls = parse_calls(&text).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                (1..=lfm_engine::tools::MAX_CALLS).contains(&calls.len()),
                "{text}"
            );
            for c in calls {
                let i = tools
                    .iter()
                    .position(|t| t.name == c.name)
                    .unwrap_or_else(|| panic!("{text}"));
                assert!(only.is_none_or(|n| n == c.name), "{only:?}: {text}");
                let errors: Vec<String> = validators[i]
                    .iter_errors(&c.arguments)
                    .map(|e| e.to_string())
                    .collect();
                assert!(errors.is_empty(), "{text}: {errors:?}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 48, "{checked}");
}

/// `auto`: free text until the model opens a call; the call is then held to
/// the grammar, kept out of the text and given parsed (with an id); after
/// it, text is free again. `none`: the opening token is never sampled, even
/// when it is the model's favourite.
#[test]
fn a_call_the_model_opens_is_held_to_the_grammar_and_parsed() {
    use lfm_engine::sequence::ToolUse;
    use lfm_engine::tools::{Tool, call_grammar};
    let (m, tok, grammars) = setup();
    let tools = vec![Tool {
        name: "set_light".into(),
        description: String::new(),
        parameters: json!({"type": "object",
            "properties": {"device": {"enum": ["hall", "den"]},
                           "level": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["device", "level"]}),
    }];
    let (start, end) = (
        tok.token_id("<|tool_call_start|>").unwrap(),
        tok.token_id("<|tool_call_end|>").unwrap(),
    );
    let im_end = tok.token_id("<|im_end|>").unwrap();
    let nv = m.n_vocab();
    let lazy = grammars
        .compile(&ResponseFormat::Lark(
            call_grammar(&tools, None, false).unwrap(),
        ))
        .unwrap();
    let favour = |id: u32, noise: u64| -> Vec<f32> {
        // Noise over everything, the favourite far ahead.
        let mut r = lfm_engine::rng::Rng::new(noise);
        let mut l: Vec<f32> = (0..nv).map(|_| r.next_f32() * 4.0).collect();
        l[id as usize] = 50.0;
        l
    };
    let hi = tok.encode("hi", false, false)[0];
    for banned in [false, true] {
        let mut s = Sequence::new(
            &m,
            tok.clone(),
            vec![1],
            params(1.0, 7),
            400,
            StopText::default(),
        );
        s.use_tools(ToolUse {
            start,
            end,
            lazy: Some(lazy.clone()),
            banned,
            id_prefix: "call_t".into(),
        });
        let (mut text, mut markup, mut calls) = (String::new(), String::new(), Vec::new());
        // "hi", then the model's favourite is the opening token, then noise
        // (the grammar decides), then <|im_end|> is favoured.
        let mut step = 0;
        while !s.is_finished() {
            let n = s.next_input(usize::MAX).len();
            let logits = match step {
                0 => favour(hi, 0),
                1 => favour(start, 1),
                _ if s.tool_calls().is_empty() && step < 300 => vec![0.0; nv],
                _ => favour(im_end, 2),
            };
            let st = s.advance(n, Some(&logits)).unwrap().unwrap();
            text.push_str(&st.text);
            markup.push_str(&st.markup);
            calls.extend(st.tool_calls);
            step += 1;
        }
        assert_eq!(
            s.finish_reason(),
            Some(&FinishReason::Eos),
            "{text:?} {markup:?}"
        );
        if banned {
            assert!(calls.is_empty() && markup.is_empty(), "{markup:?}");
            assert_ne!(
                s.generated()[1],
                start,
                "the banned opening token was sampled"
            );
            continue;
        }
        assert_eq!(
            text,
            tok.decode(&[hi]),
            "the call's text leaked into the content"
        );
        assert_eq!(calls.len(), s.tool_calls().len());
        assert!(!calls.is_empty() && calls.len() <= 8, "{markup}");
        for (i, c) in calls.iter().enumerate() {
            assert_eq!(c.id, format!("call_t_{i}"));
            assert_eq!(c.name, "set_light");
            let a = c.arguments.as_object().unwrap();
            assert!(
                ["hall", "den"].contains(&a["device"].as_str().unwrap()),
                "{markup}"
            );
            assert!(a["level"].as_u64().unwrap() <= 9, "{markup}");
        }
        assert!(
            markup.starts_with("<|tool_call_start|>[set_light(")
                && markup.ends_with(")]<|tool_call_end|>"),
            "{markup}"
        );
        assert!(!s.output_incomplete());
    }
}
