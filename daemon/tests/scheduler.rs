//! The scheduler through its `Handle`, with a real (tiny, in-memory) model:
//! admission order (round robin across clients, interactive first), a
//! cancelled waiting request leaves the line, and shutdown drains.

use lfmd::engine::Model;
use lfmd::gguf::{GgmlType, Gguf};
use lfmd::sampler::SamplingParams;
use lfmd::scheduler::{
    self, Client, Config, Event, Failure, Generation, Handle, Input, Options, Priority, Request,
    SubmitError,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn handle(config: Config) -> Handle {
    let mut bytes = Vec::new();
    let preset = lfmd::synth::find_preset("tiny-moe").unwrap();
    lfmd::synth::write_to(preset, GgmlType::Q8_0, 1, &mut bytes).unwrap();
    let g = Arc::new(Gguf::from_bytes(bytes).unwrap());
    let opts = lfmd::engine::EngineOptions {
        threads: Some(1),
        ..Default::default()
    };
    let model = Model::from_gguf_with(g, opts).unwrap();
    scheduler::start(model, "tiny", config).unwrap().0
}

fn request(client: &str, priority: Priority, max_tokens: usize) -> Request {
    Request {
        input: Input::Prompt {
            text: format!("Hello from {client}"),
            add_bos: None,
        },
        options: Options {
            sampling: SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            max_tokens: Some(max_tokens),
            stop: Vec::new(),
            ignore_eos: true,
            ..Default::default()
        },
        client: Client {
            id: client.into(),
            owner: "uid:1000".into(),
            ..Default::default()
        },
        priority,
        deadline: None,
    }
}

/// Waits for the end; when the request was admitted (submit time plus its
/// queueing time).
async fn admitted(g: &mut Generation, submitted: Instant) -> Instant {
    loop {
        match g.next().await.expect("a final event") {
            Event::Delta(_) => {}
            Event::Done(d) => return submitted + d.stats.queue,
            Event::Failed(f) => panic!("{f}"),
        }
    }
}

#[tokio::test]
async fn waiting_clients_take_turns_and_interactive_goes_first() {
    let h = handle(Config {
        max_concurrent: 1,
        ..Default::default()
    });
    let t = Instant::now();
    let mut first = h.submit(request("a", Priority::Interactive, 16)).unwrap();
    // Once it runs, everything else waits in line.
    assert!(matches!(first.next().await, Some(Event::Delta(_))));
    let waiting = [
        ("c", Priority::Background),
        ("a", Priority::Interactive),
        ("a", Priority::Interactive),
        ("b", Priority::Interactive),
    ];
    let mut gens: Vec<(String, Instant, Generation)> = waiting
        .iter()
        .enumerate()
        .map(|(i, (c, p))| {
            let at = Instant::now();
            let g = h.submit(request(c, *p, 6)).unwrap();
            (format!("{c}{i}"), at, g)
        })
        .collect();
    assert_eq!(h.status().queued, 4);
    admitted(&mut first, t).await;
    let mut order = Vec::new();
    for (name, at, g) in &mut gens {
        order.push((admitted(g, *at).await, name.clone()));
    }
    order.sort();
    let names: Vec<&str> = order.iter().map(|(_, n)| n.as_str()).collect();
    // a's second request waits for b's first; background goes last.
    assert_eq!(names, ["a1", "b3", "a2", "c0"]);
    let s = h.status();
    assert_eq!((s.active, s.queued, s.requests_total), (0, 0, 5));
}

#[tokio::test]
async fn a_cancelled_waiting_request_leaves_the_line_and_shutdown_drains() {
    let h = handle(Config {
        max_concurrent: 1,
        queue_capacity: 1,
        ..Default::default()
    });
    let mut running = h.submit(request("a", Priority::Interactive, 2000)).unwrap();
    assert!(matches!(running.next().await, Some(Event::Delta(_))));
    let waiting = h.submit(request("b", Priority::Interactive, 4)).unwrap();
    assert!(matches!(
        h.submit(request("c", Priority::Interactive, 4)),
        Err(SubmitError::QueueFull { .. })
    ));
    drop(waiting);
    let t0 = Instant::now();
    while h.status().queued != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "still queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut next = h.submit(request("c", Priority::Interactive, 4)).unwrap();
    h.shutdown(Duration::ZERO);
    assert!(matches!(
        h.submit(request("d", Priority::Interactive, 4)),
        Err(SubmitError::ShuttingDown)
    ));
    // The waiting request is refused, the running one stopped, both with a reason.
    for g in [&mut next, &mut running] {
        let end = loop {
            match g.next().await {
                Some(Event::Delta(_)) => continue,
                other => break other,
            }
        };
        assert_eq!(end, Some(Event::Failed(Failure::ShuttingDown)));
    }
}

/// A request's whole answer: text, tokens, the final event.
async fn answer(mut g: Generation) -> (String, Vec<u32>, scheduler::Done) {
    let (mut text, mut tokens) = (String::new(), Vec::new());
    loop {
        match g.next().await.expect("a final event") {
            Event::Delta(d) => {
                text.push_str(&d.text);
                tokens.extend(d.tokens);
            }
            Event::Done(d) => return (text, tokens, d),
            Event::Failed(f) => panic!("{f}"),
        }
    }
}

/// Sixteen requests at once, half under a JSON Schema (sampled, each its
/// own seed), half free (greedy and sampled): each answer is the one it
/// gets alone, and every constrained one parses and validates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constrained_and_free_requests_batch_and_answer_as_alone() {
    use lfmd::constraint::ResponseFormat;
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"device": {"enum": ["hall_light", "fan"]},
                       "level": {"type": "integer", "minimum": 0, "maximum": 100},
                       "note": {"type": "string", "maxLength": 8}},
        "required": ["device", "level"], "additionalProperties": false});
    let validator = jsonschema::validator_for(&schema).unwrap();
    let req = |i: u64| {
        let mut r = request(&format!("c{i}"), Priority::Interactive, 60);
        r.options.sampling = SamplingParams {
            temperature: if i.is_multiple_of(4) { 0.0 } else { 0.9 },
            min_p: 0.0,
            seed: i,
            ..Default::default()
        };
        r.options.ignore_eos = false;
        if i % 2 == 1 {
            r.options.format = Some(ResponseFormat::JsonSchema(schema.to_string()));
        }
        r
    };
    let h = handle(Config {
        max_concurrent: 16,
        ..Default::default()
    });
    let mut solo = Vec::new();
    for i in 0..16 {
        solo.push(answer(h.submit(req(i)).unwrap()).await);
    }
    let together: Vec<Generation> = (0..16).map(|i| h.submit(req(i)).unwrap()).collect();
    let mut all = Vec::new();
    for g in together {
        all.push(answer(g).await);
    }
    for (i, ((text, tokens, done), (solo_text, solo_tokens, _))) in
        all.iter().zip(&solo).enumerate()
    {
        assert_eq!(
            (text, tokens),
            (solo_text, solo_tokens),
            "request {i} changed in the batch"
        );
        if i % 2 == 1 {
            assert!(!done.output_incomplete, "{i}: {text:?}");
            let v: serde_json::Value =
                serde_json::from_str(text).unwrap_or_else(|e| panic!("{i}: {text:?}: {e}"));
            assert!(validator.is_valid(&v), "{i}: {text}");
        } else {
            assert!(!done.output_incomplete);
        }
    }
}
