//! `lfmd serve` end to end: the real binary on a temporary socket with a
//! synthesized tiny model, driven over gRPC. Concurrency does not change
//! answers, cancellation and deadlines free slots, a full queue and bad
//! requests get their codes, sessions prefill only new tokens, health and
//! reflection answer, and shutdown is clean.

use lfm_proto::client::{Target, channel, connect};
use lfm_proto::v1 as pb;
use lfm_proto::v1::lfm_client::LfmClient;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

mod common;
use common::Lfmd as Daemon;

fn greedy(max_tokens: u32) -> pb::SamplingOptions {
    pb::SamplingOptions {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

fn long_run() -> pb::SamplingOptions {
    pb::SamplingOptions {
        ignore_eos: Some(true),
        ..greedy(4000)
    }
}

fn user(text: &str) -> pb::ChatMessage {
    pb::ChatMessage {
        role: "user".into(),
        content: text.into(),
        ..Default::default()
    }
}

#[derive(Debug, PartialEq)]
struct Answer {
    text: String,
    ids: Vec<u32>,
    reason: i32,
    stats: pb::GenerationStats,
}

async fn collect(mut s: tonic::Streaming<pb::GenerateResponse>) -> Result<Answer, tonic::Status> {
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(m) = s.message().await? {
        match m.event.unwrap() {
            pb::generate_response::Event::Delta(d) => {
                text.push_str(&d.text);
                ids.extend(d.token_ids);
            }
            pb::generate_response::Event::Done(d) => {
                assert!(s.message().await?.is_none(), "nothing follows Done");
                return Ok(Answer {
                    text,
                    ids,
                    reason: d.finish_reason,
                    stats: d.stats.unwrap(),
                });
            }
        }
    }
    panic!("the stream ended without Done");
}

/// Either a raw prompt or a chat turn, so both paths run under load.
#[derive(Clone)]
enum Ask {
    Raw(String),
    Chat(String),
}

async fn ask(c: &mut LfmClient<Channel>, q: &Ask, opts: pb::SamplingOptions) -> Answer {
    let s = match q {
        Ask::Raw(p) => {
            c.generate(pb::GenerateRequest {
                prompt: p.clone(),
                options: Some(opts),
                ..Default::default()
            })
            .await
        }
        Ask::Chat(p) => {
            c.chat(pb::ChatRequest {
                messages: vec![user(p)],
                options: Some(opts),
                ..Default::default()
            })
            .await
        }
    }
    .unwrap()
    .into_inner();
    collect(s).await.unwrap()
}

async fn wait_status(
    c: &mut LfmClient<Channel>,
    what: &str,
    ok: impl Fn(&pb::DaemonStatus) -> bool,
) -> pb::DaemonStatus {
    let t0 = Instant::now();
    loop {
        let s = c
            .get_status(pb::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        if ok(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn sixteen_concurrent_clients_get_the_answers_they_get_alone() {
    // Small prefill chunks so long prompts are split across steps while
    // other sequences decode.
    let d = Daemon::start(&["--max-concurrent", "16", "--prefill-chunk", "24"]).await;
    let questions: Vec<Ask> = (0..16)
        .map(|i| {
            let body = format!(
                "Question {i}: {}",
                "tell me about the sea. ".repeat(i % 5 * 6)
            );
            if i % 2 == 0 {
                Ask::Chat(body)
            } else {
                Ask::Raw(body)
            }
        })
        .collect();
    // Mixed sampling: greedy, and seeded draws with the defaults, top-k
    // with min-p, top-p at a high temperature, penalties.
    let opts = |i: usize| -> pb::SamplingOptions {
        let seeded = |o: pb::SamplingOptions| pb::SamplingOptions {
            seed: Some(1000 + i as u64),
            max_tokens: Some(24),
            ..o
        };
        match i % 4 {
            0 => greedy(24),
            1 => seeded(Default::default()),
            2 => seeded(pb::SamplingOptions {
                temperature: Some(0.8),
                top_k: Some(40),
                min_p: Some(0.05),
                ..Default::default()
            }),
            _ => seeded(pb::SamplingOptions {
                temperature: Some(1.2),
                top_p: Some(0.9),
                min_p: Some(0.0),
                presence_penalty: Some(0.5),
                ..Default::default()
            }),
        }
    };
    let mut c = d.client().await;
    let mut alone = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        alone.push(ask(&mut c, q, opts(i)).await);
    }
    let tasks: Vec<_> = questions
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, q)| {
            let target = d.target.clone();
            let o = opts(i);
            tokio::spawn(async move {
                let mut c = connect(&target).await.unwrap();
                ask(&mut c, &q, o).await
            })
        })
        .collect();
    for (i, (t, solo)) in tasks.into_iter().zip(&alone).enumerate() {
        let loaded = t.await.unwrap();
        assert_eq!(
            (&loaded.text, &loaded.ids, loaded.reason),
            (&solo.text, &solo.ids, solo.reason),
            "answer {i} changed under load"
        );
        assert!(!loaded.ids.is_empty());
        assert_eq!(loaded.stats.prompt_tokens, solo.stats.prompt_tokens);
        assert_eq!(loaded.stats.generated_tokens as usize, loaded.ids.len());
    }
    let s = wait_status(&mut c, "an idle daemon", |s| s.active_requests == 0).await;
    assert_eq!(s.requests_total, 32);
    assert_eq!(s.queued_requests, 0);
    assert!(s.generated_tokens_total > 0 && s.rss_bytes > 0 && !s.isa.is_empty());
}

#[tokio::test]
async fn a_dropped_stream_or_a_passed_deadline_frees_the_slot() {
    let d = Daemon::start(&["--max-concurrent", "1"]).await;
    let mut c = d.client().await;
    let mut s = c
        .generate(pb::GenerateRequest {
            prompt: "Once upon a time".into(),
            options: Some(long_run()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        assert!(s.message().await.unwrap().is_some());
    }
    let busy = c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(busy.active_requests, 1);
    drop(s);
    wait_status(&mut c, "the cancelled request's slot", |s| {
        s.active_requests == 0
    })
    .await;
    // The one slot is free again: a new request runs to completion.
    let a = ask(&mut c, &Ask::Raw("Hello".into()), greedy(4)).await;
    assert_eq!(a.stats.generated_tokens, 4);

    // A deadline stops a request the client still waits for.
    let mut req = tonic::Request::new(pb::GenerateRequest {
        prompt: "Once upon a time".into(),
        options: Some(long_run()),
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(300));
    let s = c.generate(req).await.unwrap().into_inner();
    let err = collect(s).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    wait_status(&mut c, "the expired request's slot", |s| {
        s.active_requests == 0
    })
    .await;
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_with_a_retry_hint() {
    let d = Daemon::start(&["--max-concurrent", "1", "--queue", "1"]).await;
    let mut c = d.client().await;
    let req = || pb::GenerateRequest {
        prompt: "Once upon a time".into(),
        options: Some(long_run()),
        ..Default::default()
    };
    let mut running = c.generate(req()).await.unwrap().into_inner();
    assert!(running.message().await.unwrap().is_some());
    let waiting = c.generate(req()).await.unwrap().into_inner();
    wait_status(&mut c, "one queued request", |s| s.queued_requests == 1).await;
    let err = c.generate(req()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--queue"), "{}", err.message());
    let ms: u64 = err
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("a retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms >= 100, "{ms}");
    // Cancelling the queued one frees its place in line.
    drop(waiting);
    wait_status(&mut c, "an empty queue", |s| s.queued_requests == 0).await;
    let _again = c.generate(req()).await.unwrap();
    drop(running);
}

#[tokio::test]
async fn a_session_follow_up_prefills_only_its_new_tokens() {
    let d = Daemon::start(&[]).await;
    let mut c = d.client().await;
    let turn = |c: &mut LfmClient<Channel>, text: &str, session: Option<&str>| {
        let req = pb::ChatRequest {
            messages: vec![user(text)],
            options: Some(greedy(8)),
            session_id: session.map(str::to_owned),
            ..Default::default()
        };
        let mut c = c.clone();
        async move {
            collect(c.chat(req).await.unwrap().into_inner())
                .await
                .unwrap()
        }
    };
    let first = turn(&mut c, "Hello, who are you?", Some("s1")).await;
    let s1 = &first.stats;
    assert_eq!(s1.prefilled_tokens, s1.prompt_tokens);
    let second = turn(&mut c, "Tell me more.", Some("s1")).await;
    let s2 = &second.stats;
    // The state after turn one holds its prompt and all generated tokens but
    // the last (sampled, never fed); only the rest is prefilled.
    let kept = s1.prompt_tokens + s1.generated_tokens - 1;
    assert_eq!(s2.prompt_tokens, kept + s2.prefilled_tokens);
    // New tokens: at most the last reply token plus the template's
    // "<|im_end|>\n<|im_start|>user\nTell me more.<|im_end|>\n<|im_start|>assistant\n".
    let frame = c
        .tokenize(pb::TokenizeRequest {
            text: "<|im_end|>\n<|im_start|>user\nTell me more.<|im_end|>\n<|im_start|>assistant\n"
                .into(),
            add_bos: Some(false),
            parse_special: Some(true),
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids
        .len() as u32;
    assert!(
        s2.prefilled_tokens <= frame + 2 && s2.prefilled_tokens >= frame - 1,
        "prefilled {} for a {frame}-token turn",
        s2.prefilled_tokens
    );
    let status = c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.sessions, 1);
    // Without the session the same follow-up resumes from the prefix cache
    // (turn one's prompt), so it also prefills turn one's reply.
    let req = pb::ChatRequest {
        messages: vec![
            user("Hello, who are you?"),
            pb::ChatMessage {
                role: "assistant".into(),
                content: first.text.clone(),
                ..Default::default()
            },
            user("Tell me more."),
        ],
        options: Some(greedy(8)),
        ..Default::default()
    };
    let stateless = collect(c.chat(req).await.unwrap().into_inner())
        .await
        .unwrap();
    let st = &stateless.stats;
    assert!(st.prefilled_tokens < st.prompt_tokens, "{st:?}");
    assert!(
        st.prefilled_tokens >= s2.prefilled_tokens + s1.generated_tokens - 1,
        "{st:?}"
    );
}

/// `GenerateRequest` with the prompt as bytes, to send what a `string`
/// field cannot hold.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGenerateRequest {
    #[prost(bytes = "vec", tag = "1")]
    prompt: Vec<u8>,
}

async fn generate_raw_bytes(d: &Daemon, prompt: &[u8]) -> Result<(), tonic::Status> {
    let channel = channel(&d.target).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<RawGenerateRequest, pb::GenerateResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/lfm.v1.Lfm/Generate");
    let req = tonic::Request::new(RawGenerateRequest {
        prompt: prompt.to_vec(),
    });
    let mut stream = grpc.server_streaming(req, path, codec).await?.into_inner();
    while stream.message().await?.is_some() {}
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_invalid_argument_or_out_of_range_and_the_daemon_serves_on() {
    let d = Daemon::start(&["--ctx", "64"]).await;
    let mut c = d.client().await;
    let raw = |prompt: &str, o: pb::SamplingOptions| pb::GenerateRequest {
        prompt: prompt.into(),
        options: Some(o),
        ..Default::default()
    };
    let cases = [
        (
            raw(
                "hi",
                pb::SamplingOptions {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
            ),
            "temperature",
        ),
        (
            raw(
                "hi",
                pb::SamplingOptions {
                    top_p: Some(0.0),
                    ..Default::default()
                },
            ),
            "top_p",
        ),
        (
            raw(
                "hi",
                pb::SamplingOptions {
                    min_p: Some(f32::NAN),
                    ..Default::default()
                },
            ),
            "min_p",
        ),
        (
            raw(
                "hi",
                pb::SamplingOptions {
                    max_tokens: Some(0),
                    ..Default::default()
                },
            ),
            "max_tokens",
        ),
        (
            raw(
                "hi",
                pb::SamplingOptions {
                    stop: vec!["x".into(); 17],
                    ..Default::default()
                },
            ),
            "stop strings",
        ),
        (
            raw(
                "hi",
                pb::SamplingOptions {
                    stop: (0..5000).map(|i| i.to_string()).collect(),
                    ..Default::default()
                },
            ),
            "stop strings",
        ),
        (
            raw(
                "hi",
                pb::SamplingOptions {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                },
            ),
            "temperature",
        ),
        (
            raw(
                "hi",
                pb::SamplingOptions {
                    top_p: Some(f32::INFINITY),
                    ..Default::default()
                },
            ),
            "top_p",
        ),
        (raw("", Default::default()), "prompt is empty"),
        (
            pb::GenerateRequest {
                prompt: "hi".into(),
                priority: 7,
                ..Default::default()
            },
            "priority",
        ),
    ];
    for (req, what) in cases {
        let e = c.generate(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(what), "{what}: {}", e.message());
    }
    let e = c.chat(pb::ChatRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("no messages"), "{}", e.message());
    for id in [String::new(), "s".repeat(129)] {
        let e = c
            .chat(pb::ChatRequest {
                messages: vec![user("hi")],
                session_id: Some(id),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("session_id"), "{}", e.message());
    }
    // A prompt that is not UTF-8 never reaches lfmd: the decoder refuses it.
    let e = generate_raw_bytes(&d, b"caf\xc3(").await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(
        e.message().contains("invalid string value"),
        "{}",
        e.message()
    );
    let e = c
        .detokenize(pb::DetokenizeRequest {
            token_ids: vec![1, 100_000],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("token_ids[1]"), "{}", e.message());

    let long = "word ".repeat(200);
    let e = c
        .generate(raw(&long, Default::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(
        e.message().contains("--ctx") && e.message().contains("shorten the prompt"),
        "{}",
        e.message()
    );
    // 10 MB is refused by its size alone, without seconds of tokenizing;
    // beyond the transport's limit the message is not even decoded.
    for (bytes, what) in [(10 << 20, "shorten the prompt"), (20 << 20, "too large")] {
        let e = c
            .generate(raw(&"x".repeat(bytes), Default::default()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::OutOfRange, "{bytes} bytes: {e:?}");
        assert!(e.message().contains(what), "{bytes} bytes: {}", e.message());
    }
    let e = c
        .chat(pb::ChatRequest {
            messages: vec![user(&"y".repeat(10 << 20))],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    // A prompt that fits runs until the context is full, whatever max_tokens.
    let a = ask(
        &mut c,
        &Ask::Raw("Hi".into()),
        pb::SamplingOptions {
            ignore_eos: Some(true),
            ..greedy(1_000_000_000)
        },
    )
    .await;
    assert_eq!(a.reason, pb::FinishReason::ContextFull as i32);
    assert_eq!(a.stats.prompt_tokens + a.stats.generated_tokens, 64);

    let info = c
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.architecture.as_str(), info.context_tokens),
        ("lfm2moe", 64)
    );
    let ids = c
        .tokenize(pb::TokenizeRequest {
            text: "Hello".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids;
    let text = c
        .detokenize(pb::DetokenizeRequest { token_ids: ids })
        .await
        .unwrap()
        .into_inner()
        .text;
    assert_eq!(text, "<|startoftext|>Hello");
}

#[tokio::test]
async fn health_and_reflection_answer_generic_clients() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let d = Daemon::start(&[]).await;
    let ch = channel(&d.target).await.unwrap();
    let mut h = HealthClient::new(ch.clone());
    for service in ["", "lfm.v1.Lfm"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut r = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = r
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"lfm.v1.Lfm".to_owned()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero_and_a_second_daemon_is_refused() {
    let mut d = Daemon::start(&["--shutdown-grace", "0.2"]).await;
    let Target::Unix(socket) = d.target.clone() else {
        unreachable!()
    };
    // Another daemon on the same socket refuses to start.
    let model = d.dir.join(common::MODEL_FILE);
    let out = Command::new(env!("CARGO_BIN_EXE_lfmd"))
        .arg("serve")
        .arg("--model")
        .arg(&model)
        .arg("--grpc")
        .arg(format!("unix:{}", socket.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serving"), "{err}");

    let mut c = d.client().await;
    let mut s = c
        .generate(pb::GenerateRequest {
            prompt: "Once upon a time".into(),
            options: Some(long_run()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some());
    d.signal("TERM");
    // The running request is stopped after the grace period, with a reason.
    let end = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    let e = end.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{}", e.message());
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    assert!(!socket.exists(), "the socket is removed");
    assert!(d.log().contains("lfmd: stopped"), "{}", d.log());
}

/// `lfmd serve` on `model`, its socket and log in `dir`, once it answers.
async fn start_on(model: &Path, dir: &Path) -> Daemon {
    let socket = dir.join("run/lfmd.sock");
    let d = Daemon::spawn(common::serve_command(model, &socket), dir, socket);
    d.answering().await;
    d
}

#[tokio::test]
async fn a_model_replaced_by_rename_leaves_requests_alone_and_a_restart_serves_the_new_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = common::synth_model(dir);
    let mut d = start_on(&model, dir).await;
    let mut c = d.client().await;
    let request = pb::GenerateRequest {
        prompt: "Once upon a time".into(),
        options: Some(pb::SamplingOptions {
            ignore_eos: Some(true),
            ..greedy(64)
        }),
        ..Default::default()
    };
    let alone = collect(c.generate(request.clone()).await.unwrap().into_inner())
        .await
        .unwrap();

    // The same request again; once it streams, another model (seed 2) is
    // written beside the file and renamed over it, as the README says to.
    let mut s = c.generate(request.clone()).await.unwrap().into_inner();
    let Some(pb::generate_response::Event::Delta(first)) =
        s.message().await.unwrap().unwrap().event
    else {
        panic!("no first token");
    };
    let staged = dir.join(".incoming.gguf");
    common::synth_model_at(&staged, 2);
    std::fs::rename(&staged, &model).unwrap();
    let rest = collect(s).await.unwrap();
    assert_eq!(format!("{}{}", first.text, rest.text), alone.text);
    assert_eq!([first.token_ids, rest.ids].concat(), alone.ids);
    // The old mapping stays in use until a restart, also after SIGHUP,
    // which says so; a new request gets the old model's answer.
    d.signal("HUP");
    let t0 = Instant::now();
    while !d.log().contains("was replaced on disk") {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = collect(c.generate(request.clone()).await.unwrap().into_inner())
        .await
        .unwrap();
    assert_eq!(again.ids, alone.ids);

    // After a restart the new file is served.
    d.signal("TERM");
    assert_eq!(d.wait(), Some(0), "{}", d.log());
    let d = start_on(&model, dir).await;
    let mut c = d.client().await;
    let info = c
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Path::new(&info.path), model);
    let new = collect(c.generate(request).await.unwrap().into_inner())
        .await
        .unwrap();
    assert_eq!(new.ids.len(), alone.ids.len());
    assert_ne!(new.ids, alone.ids, "the seed-2 weights answer differently");
}

/// Reads from `s` until the daemon closes it (EOF or a reset); fails after
/// 10 s. Bytes the server sends first (its SETTINGS, a GOAWAY) are skipped.
async fn closed_by_the_daemon(s: &mut tokio::net::UnixStream, what: &str) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let t0 = Instant::now();
    loop {
        let left = Duration::from_secs(10).saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("{what}: the connection is still open after 10 s"),
        }
    }
}

/// A raw HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Bad bytes on the Unix socket, below gRPC: garbage instead of the HTTP/2
/// preface, a header block announced past the limit, an undecodable HPACK
/// block, a CONTINUATION that never comes — each connection is closed, and a
/// half-open one (half a preface, then nothing) holds nothing up: the daemon
/// answers other clients throughout.
#[tokio::test]
async fn malformed_http2_closes_only_that_connection() {
    use tokio::io::AsyncWriteExt;
    let d = Daemon::start(&[]).await;
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let settings = h2_frame(0x4, 0, 0, &[]);
    let with = |frames: &[Vec<u8>]| {
        let mut v = preface.clone();
        v.extend_from_slice(&settings);
        for f in frames {
            v.extend_from_slice(f);
        }
        v
    };
    // Half a preface, held open for the whole test.
    let mut half_open = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    half_open.write_all(&preface[..10]).await.unwrap();
    let oversized = {
        let mut v = with(&[]);
        v.extend_from_slice(&[0x02, 0x00, 0x00, 0x1, 0x4, 0, 0, 0, 1]);
        v.extend_from_slice(&[0x82; 4096]);
        v
    };
    let cases: [(&str, Vec<u8>); 4] = [
        (
            "garbage instead of the preface",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff".to_vec(),
        ),
        ("a 128 KiB header block", oversized),
        (
            "an undecodable HPACK block",
            with(&[h2_frame(0x1, 0x4, 1, &[0xff, 0xff, 0xff, 0xff, 0x0f])]),
        ),
        (
            "a DATA frame where a CONTINUATION was due",
            with(&[h2_frame(0x1, 0, 1, &[0x82]), h2_frame(0x0, 0, 1, b"x")]),
        ),
    ];
    for (what, bytes) in cases {
        let mut s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        // The daemon may close before it has read everything.
        let _ = s.write_all(&bytes).await;
        closed_by_the_daemon(&mut s, what).await;
        let status = d
            .client()
            .await
            .get_status(pb::GetStatusRequest::default())
            .await;
        assert!(
            status.is_ok(),
            "{what}: the daemon stopped answering: {}",
            d.log()
        );
    }
    // A whole request still works beside the half-open connection.
    let mut c = d.client().await;
    let a = ask(&mut c, &Ask::Raw("Hello".into()), greedy(3)).await;
    assert_eq!(a.stats.generated_tokens, 3);
    drop(half_open);
    assert!(
        d.client()
            .await
            .get_status(pb::GetStatusRequest::default())
            .await
            .is_ok()
    );
}
