//! The D-Bus API end to end: a private `dbus-daemon` on a temporary socket
//! and the real `lfmd serve --dbus ADDRESS` (plus its gRPC socket) on a
//! synthesized tiny model, driven by `busctl` and by zbus clients.
//!
//! Without `dbus-daemon` the tests say so loudly and pass, unless
//! `LFM_REQUIRE_DBUS=1` (CI), which makes them fail.

use lfm_proto::client::connect;

mod common;
use common::{Lfmd, PrivateBus, private_bus};
use lfm_proto::dbus::{BUS_NAME, INTERFACE, OBJECT_PATH, REQUEST_INTERFACE, REQUESTS_PATH};
use lfm_proto::v1 as pb;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, MatchRule, MessageStream};

/// The real `lfmd serve` on a private bus and a gRPC socket (the daemon
/// drops first, then the bus).
struct Daemon {
    lfmd: Lfmd,
    bus: PrivateBus,
}

impl std::ops::Deref for Daemon {
    type Target = Lfmd;
    fn deref(&self) -> &Lfmd {
        &self.lfmd
    }
}

impl Daemon {
    /// `None` when D-Bus is not available here (see [`private_bus`]).
    /// gRPC answers only after D-Bus is up (lfmd starts D-Bus first).
    async fn start(args: &[&str]) -> Option<Daemon> {
        let tmp = tempfile::tempdir().unwrap();
        let bus = private_bus(tmp.path())?;
        let mut all = vec!["--dbus", bus.address.as_str()];
        all.extend_from_slice(args);
        let lfmd = Lfmd::start_in(tmp, &all).await;
        Some(Daemon { lfmd, bus })
    }

    async fn conn(&self) -> Connection {
        zbus::connection::Builder::address(self.bus.address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap()
    }

    fn busctl(&self, args: &[&str]) -> std::process::Output {
        Command::new("busctl")
            .arg(format!("--address={}", self.bus.address))
            .args(args)
            .output()
            .unwrap()
    }
}

/// Runs `f` with a deadline, so a hang fails instead of blocking.
async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("the test timed out")
}

type Info = HashMap<String, OwnedValue>;

fn greedy(max_tokens: u32) -> HashMap<&'static str, Value<'static>> {
    HashMap::from([
        ("max_tokens", Value::U32(max_tokens)),
        ("temperature", Value::F64(0.0)),
    ])
}

fn long_run() -> HashMap<&'static str, Value<'static>> {
    let mut o = greedy(4000);
    o.insert("ignore_eos", Value::Bool(true));
    o
}

async fn generate(
    conn: &Connection,
    prompt: &str,
    opts: HashMap<&str, Value<'_>>,
) -> zbus::Result<(String, Info)> {
    let reply = conn
        .call_method(
            Some(BUS_NAME),
            OBJECT_PATH,
            Some(INTERFACE),
            "Generate",
            &(prompt, opts),
        )
        .await?;
    reply.body().deserialize()
}

/// An `Ask` that follows the protocol: subscribed before asking.
struct Asked {
    path: OwnedObjectPath,
    signals: MessageStream,
}

async fn ask(
    conn: &Connection,
    prompt: &str,
    opts: HashMap<&str, Value<'_>>,
) -> zbus::Result<Asked> {
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(REQUEST_INTERFACE)?
        .path_namespace(REQUESTS_PATH)?
        .build();
    let signals = MessageStream::for_match_rule(rule, conn, None).await?;
    let reply = conn
        .call_method(
            Some(BUS_NAME),
            OBJECT_PATH,
            Some(INTERFACE),
            "Ask",
            &(prompt, opts),
        )
        .await?;
    Ok(Asked {
        path: reply.body().deserialize()?,
        signals,
    })
}

enum Signal {
    Token(String),
    Finished(String, Info),
}

impl Asked {
    async fn next(&mut self) -> Signal {
        loop {
            let m = self.signals.next().await.unwrap().unwrap();
            let h = m.header();
            if h.path().map(|p| p.as_str()) != Some(self.path.as_str()) {
                continue;
            }
            match h.member().unwrap().as_str() {
                "Token" => return Signal::Token(m.body().deserialize().unwrap()),
                "Finished" => {
                    let (r, i) = m.body().deserialize().unwrap();
                    return Signal::Finished(r, i);
                }
                other => panic!("unexpected signal {other}"),
            }
        }
    }

    async fn collect(mut self) -> (String, String, Info) {
        let mut text = String::new();
        loop {
            match self.next().await {
                Signal::Token(t) => text.push_str(&t),
                Signal::Finished(r, i) => return (text, r, i),
            }
        }
    }
}

fn u32_of(info: &Info, k: &str) -> u32 {
    u32::try_from(info[k].try_clone().unwrap()).unwrap()
}

fn str_of(info: &Info, k: &str) -> String {
    String::try_from(info[k].try_clone().unwrap()).unwrap()
}

async fn property_u32(conn: &Connection, name: &str) -> u32 {
    let p = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(BUS_NAME)
        .unwrap()
        .path(OBJECT_PATH)
        .unwrap()
        .build()
        .await
        .unwrap();
    let v = p.get(INTERFACE.try_into().unwrap(), name).await.unwrap();
    u32::try_from(v).unwrap()
}

async fn wait_idle(conn: &Connection, what: &str) {
    let t0 = Instant::now();
    while property_u32(conn, "ActiveRequests").await != 0
        || property_u32(conn, "QueuedRequests").await != 0
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}: still busy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_active(conn: &Connection, n: u32) {
    let t0 = Instant::now();
    while property_u32(conn, "ActiveRequests").await != n {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "never {n} active requests"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "busctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busctl_generates_and_reads_properties() {
    let Some(d) = Daemon::start(&[]).await else {
        return;
    };
    let out = d.busctl(&[
        "--json=short",
        "call",
        BUS_NAME,
        OBJECT_PATH,
        INTERFACE,
        "Generate",
        "sa{sv}",
        "hello",
        "2",
        "max_tokens",
        "u",
        "8",
        "temperature",
        "d",
        "0",
    ]);
    let v = json(&out);
    assert_eq!(v["type"], "sa{sv}");
    let info = &v["data"][1];
    assert_eq!(info["generated_tokens"]["data"], 8, "{v}");
    assert_eq!(info["finish_reason"]["data"], "length", "{v}");
    assert!(info["prompt_tokens"]["data"].as_u64().unwrap() > 0);
    assert!(
        info["time_to_first_token_seconds"]["data"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(info.get("decode_tokens_per_second").is_some());
    assert!(!v["data"][0].as_str().unwrap().is_empty(), "{v}");

    // The same answer as gRPC's for the same chat turn.
    let mut c = connect(&d.target).await.unwrap();
    let s = c
        .chat(pb::ChatRequest {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "hello".into(),
                ..Default::default()
            }],
            options: Some(pb::SamplingOptions {
                temperature: Some(0.0),
                max_tokens: Some(8),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut s = s.into_inner();
    let mut text = String::new();
    while let Some(m) = s.message().await.unwrap() {
        if let Some(pb::generate_response::Event::Delta(d)) = m.event {
            text.push_str(&d.text);
        }
    }
    assert_eq!(v["data"][0].as_str().unwrap(), text);

    let get = |p: &str| {
        let v = json(&d.busctl(&[
            "--json=short",
            "get-property",
            BUS_NAME,
            OBJECT_PATH,
            INTERFACE,
            p,
        ]));
        assert_eq!(v["type"], "s");
        v["data"].as_str().unwrap().to_owned()
    };
    assert_eq!(get("Architecture"), "lfm2moe");
    assert!(!get("Model").is_empty());
    let isa = get("Isa");
    let mut c = connect(&d.target).await.unwrap();
    let status = c
        .get_status(pb::GetStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(isa, status.isa);

    // Expert statistics: the same counters as gRPC's, one row per MoE layer
    // and expert, hits from the two requests above.
    let v = json(&d.busctl(&[
        "--json=short",
        "call",
        BUS_NAME,
        OBJECT_PATH,
        INTERFACE,
        "ExpertStats",
    ]));
    assert_eq!(v["type"], "a{sv}a(uuttttbb)", "{v}");
    let totals = &v["data"][0];
    assert_eq!(totals["budget_mode"]["data"], "auto", "{v}");
    let rows = v["data"][1].as_array().unwrap();
    let detail = c
        .get_status(pb::GetStatusRequest { experts: true })
        .await
        .unwrap()
        .into_inner()
        .paging
        .expect("a MoE model on a mapping is paged");
    let n: usize = detail.layers.iter().map(|l| l.experts.len()).sum();
    assert_eq!(rows.len(), n);
    for r in rows {
        let (layer, expert) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap() as usize);
        let l = detail
            .layers
            .iter()
            .find(|l| u64::from(l.layer) == layer)
            .unwrap();
        assert_eq!(r[2].as_u64().unwrap(), l.experts[expert].hits, "{r}");
    }
    let hits: u64 = rows.iter().map(|r| r[2].as_u64().unwrap()).sum();
    assert!(hits > 0, "two requests ran: {v}");
    assert!(
        status.paging.as_ref().is_some_and(|p| p.layers.is_empty()),
        "per-expert rows only when asked"
    );

    // Introspection lists the interface (busctl introspect works).
    let out = d.busctl(&["introspect", BUS_NAME, OBJECT_PATH, INTERFACE]);
    let text = String::from_utf8_lossy(&out.stdout);
    for member in [
        "Generate",
        "Ask",
        "ExpertStats",
        "ActiveRequests",
        "QueuedRequests",
    ] {
        assert!(text.contains(member), "{text}");
    }
}

/// Prompts of the concurrency test.
const PROMPTS: [&str; 8] = [
    "hello",
    "What is a mixture of experts?",
    "Count to five.",
    "Name a colour.",
    "Write one word.",
    "The quick brown fox",
    "Why is the sky blue?",
    "Say something nice.",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_over_both_transports_get_their_solo_answers() {
    let Some(d) = Daemon::start(&[]).await else {
        return;
    };
    // Generous: a loaded 2-core CI machine decodes the tiny model slowly.
    within(300, async {
        let mut solo = Vec::new();
        for p in PROMPTS {
            solo.push(common::grpc_chat(&d.target, p, 4).await);
        }
        let mut tasks = Vec::new();
        for (i, p) in PROMPTS.iter().enumerate() {
            let conn = d.conn().await;
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    let (text, reason, info) =
                        ask(&conn, p, greedy(4)).await.unwrap().collect().await;
                    assert_ne!(reason, "error", "{info:?}");
                    (i, text)
                } else {
                    (i, generate(&conn, p, greedy(4)).await.unwrap().0)
                }
            }));
            let target = d.target.clone();
            tasks.push(tokio::spawn(async move {
                (i, common::grpc_chat(&target, p, 4).await)
            }));
        }
        for t in tasks {
            let (i, text) = t.await.unwrap();
            assert_eq!(text, solo[i], "prompt {i} under load");
        }
        wait_idle(&d.conn().await, "after the load").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_departures_free_the_slots() {
    let Some(d) = Daemon::start(&[]).await else {
        return;
    };
    within(60, async {
        let conn = d.conn().await;
        // Ask, a few tokens, Cancel: Finished says cancelled.
        let mut a = ask(&conn, "tell a long story", long_run()).await.unwrap();
        for _ in 0..2 {
            assert!(matches!(a.next().await, Signal::Token(_)));
        }
        // Only the asker may cancel.
        let other = d.conn().await;
        let e = other
            .call_method(
                Some(BUS_NAME),
                a.path.as_str(),
                Some(REQUEST_INTERFACE),
                "Cancel",
                &(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&e, zbus::Error::MethodError(n, ..) if n.as_str() == "org.lfm.Daemon1.Error.AccessDenied"),
            "{e}"
        );
        conn.call_method(
            Some(BUS_NAME),
            a.path.as_str(),
            Some(REQUEST_INTERFACE),
            "Cancel",
            &(),
        )
        .await
        .unwrap();
        let (reason, info) = loop {
            if let Signal::Finished(r, i) = a.next().await {
                break (r, i);
            }
        };
        assert_eq!(reason, "cancelled");
        assert!(u32_of(&info, "generated_tokens") >= 2);
        wait_idle(&conn, "after Cancel").await;
        // The request object is gone.
        let e = conn
            .call_method(
                Some(BUS_NAME),
                a.path.as_str(),
                Some(REQUEST_INTERFACE),
                "Cancel",
                &(),
            )
            .await;
        assert!(e.is_err());

        // A busctl running a long Generate is killed; an Ask's connection
        // closes: both requests stop.
        let mut busctl = Command::new("busctl")
            .arg(format!("--address={}", d.bus.address))
            .args(["--timeout=60", "call", BUS_NAME, OBJECT_PATH, INTERFACE])
            .args(["Generate", "sa{sv}", "a long story", "3"])
            .args(["max_tokens", "u", "4000", "temperature", "d", "0"])
            .args(["ignore_eos", "b", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let leaving = d.conn().await;
        let asked = ask(&leaving, "another long story", long_run())
            .await
            .unwrap();
        wait_active(&conn, 2).await;
        drop(asked);
        leaving.graceful_shutdown().await;
        wait_active(&conn, 1).await;
        busctl.kill().unwrap();
        busctl.wait().unwrap();
        wait_idle(&conn, "after the clients left").await;
        let mut c = connect(&d.target).await.unwrap();
        let s = c
            .get_status(pb::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!((s.active_requests, s.queued_requests), (0, 0));
    })
    .await;
}

fn error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(n, m, _) => {
            format!("{} {}", n.as_str(), m.clone().unwrap_or_default())
        }
        other => panic!("not a method error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_documented_error_names() {
    let Some(d) = Daemon::start(&["--ctx", "64", "--max-concurrent", "1", "--queue", "1"]).await
    else {
        return;
    };
    within(60, async {
        let conn = d.conn().await;
        let cases: Vec<(&str, HashMap<&str, Value<'_>>, &str, &str)> = vec![
            (
                "hi",
                HashMap::from([("temprature", Value::F64(0.0))]),
                "InvalidArgument",
                "temprature",
            ),
            (
                "hi",
                HashMap::from([("max_tokens", Value::I32(-8))]),
                "InvalidArgument",
                "\"max_tokens\" is -8; it must be from 0 to 4294967295",
            ),
            (
                "hi",
                HashMap::from([("max_tokens", Value::from("8"))]),
                "InvalidArgument",
                "integer from 0 to 4294967295",
            ),
            (
                "hi",
                HashMap::from([("temperature", Value::F64(f64::NAN))]),
                "InvalidArgument",
                "temperature",
            ),
            (
                "hi",
                HashMap::from([("max_tokens", Value::U32(0))]),
                "InvalidArgument",
                "max_tokens",
            ),
            ("", HashMap::new(), "InvalidArgument", "empty"),
            (
                "hi",
                HashMap::from([("json_schema", Value::from("{\"type\": \"strin\"}"))]),
                "InvalidArgument",
                "strin",
            ),
            (
                "hi",
                HashMap::from([
                    ("json_object", Value::Bool(true)),
                    ("regex", Value::from("[a-z]+")),
                ]),
                "InvalidArgument",
                "give one response format",
            ),
            (
                "hi",
                HashMap::from([("tools", Value::from("[{\"name\": \"set light\"}]"))]),
                "InvalidArgument",
                "identifier",
            ),
            (
                "hi",
                HashMap::from([("tools", Value::from("{"))]),
                "InvalidArgument",
                "not JSON",
            ),
        ];
        let long = "word ".repeat(200);
        let mut cases = cases;
        cases.push((&long, HashMap::new(), "OutOfRange", "--ctx"));
        for (prompt, opts, name, says) in cases {
            for method in ["Generate", "Ask"] {
                let e = conn
                    .call_method(
                        Some(BUS_NAME),
                        OBJECT_PATH,
                        Some(INTERFACE),
                        method,
                        &(prompt, opts.clone()),
                    )
                    .await
                    .unwrap_err();
                let got = error_name(&e);
                assert!(
                    got.starts_with(&format!("org.lfm.Daemon1.Error.{name} "))
                        && got.contains(says),
                    "{method} {opts:?}: {got}"
                );
            }
        }
        // One running, one queued, the next is refused with a retry hint.
        let _a = ask(&conn, "one", long_run()).await.unwrap();
        let _b = ask(&conn, "two", long_run()).await.unwrap();
        let e = ask(&conn, "three", long_run()).await.err().unwrap();
        let got = error_name(&e);
        assert!(
            got.starts_with("org.lfm.Daemon1.Error.ResourceExhausted ") && got.contains("retry in"),
            "{got}"
        );
    })
    .await;
}

/// Structured output from busctl, as a shell script on a hub would ask for
/// it: the answer parses and keeps to the schema, and `info` says it is
/// complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busctl_gets_answers_that_keep_to_a_json_schema() {
    let Some(d) = Daemon::start(&[]).await else {
        return;
    };
    let schema = r#"{"type": "object", "properties": {"device": {"enum": ["hall_light", "fan"]}, "level": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["device", "level"], "additionalProperties": false}"#;
    for seed in ["1", "2", "3"] {
        let v = json(&d.busctl(&[
            "--json=short",
            "call",
            BUS_NAME,
            OBJECT_PATH,
            INTERFACE,
            "Generate",
            "sa{sv}",
            "Dim the hall light",
            "4",
            "json_schema",
            "s",
            schema,
            "temperature",
            "d",
            "1.0",
            "seed",
            "t",
            seed,
            "max_tokens",
            "u",
            "100",
        ]));
        let info = &v["data"][1];
        assert_eq!(info["finish_reason"]["data"], "stop", "{v}");
        assert_eq!(info["output_incomplete"]["data"], false, "{v}");
        let answer: serde_json::Value =
            serde_json::from_str(v["data"][0].as_str().unwrap()).expect("the answer is JSON");
        let obj = answer.as_object().unwrap();
        assert!(
            ["hall_light", "fan"].contains(&obj["device"].as_str().unwrap()),
            "{answer}"
        );
        assert!(obj["level"].as_u64().unwrap() <= 100, "{answer}");
        assert_eq!(obj.len(), 2, "{answer}");
    }
}

/// Tool calls from busctl, as a hub's script would ask: `tools` and
/// `tool_choice` options, the calls parsed in `info`'s `tool_calls`; the
/// results go back as a `tool` message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busctl_gets_tool_calls_that_keep_to_their_schemas() {
    let Some(d) = Daemon::start(&[]).await else {
        return;
    };
    let tools = r#"[{"name": "set_light", "description": "Set a light", "parameters": {"type": "object", "properties": {"device": {"enum": ["hall_light", "fan"]}, "level": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["device", "level"]}}]"#;
    let v = json(&d.busctl(&[
        "--json=short",
        "call",
        BUS_NAME,
        OBJECT_PATH,
        INTERFACE,
        "Generate",
        "sa{sv}",
        "Dim the hall light",
        "4",
        "tools",
        "s",
        tools,
        "tool_choice",
        "s",
        "required",
        "temperature",
        "d",
        "1.0",
        "max_tokens",
        "u",
        "200",
    ]));
    let info = &v["data"][1];
    assert_eq!(info["finish_reason"]["data"], "tool_calls", "{v}");
    let calls: serde_json::Value =
        serde_json::from_str(info["tool_calls"]["data"].as_str().unwrap()).unwrap();
    let calls = calls.as_array().unwrap();
    assert!(!calls.is_empty(), "{v}");
    for c in calls {
        assert_eq!(c["name"], "set_light", "{c}");
        assert!(c["id"].as_str().is_some_and(|s| !s.is_empty()), "{c}");
        let a = c["arguments"].as_object().unwrap();
        assert!(
            ["hall_light", "fan"].contains(&a["device"].as_str().unwrap()),
            "{c}"
        );
        assert!(a["level"].as_u64().unwrap() <= 100, "{c}");
    }
    assert!(!v["data"][0].as_str().unwrap().contains("tool_call"), "{v}");
    // The conversation back, with the calls and a tool result.
    let conn = d.conn().await;
    let msg = |pairs: &[(&str, &str)]| -> HashMap<String, Value<'static>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(v.to_string())))
            .collect()
    };
    let calls_text = serde_json::Value::Array(calls.clone()).to_string();
    let messages = vec![
        msg(&[("role", "user"), ("content", "Dim the hall light")]),
        msg(&[
            ("role", "assistant"),
            ("content", ""),
            ("tool_calls", &calls_text),
        ]),
        msg(&[
            ("role", "tool"),
            ("content", "{\"ok\": true}"),
            ("tool_call_id", "x"),
        ]),
    ];
    let opts: HashMap<&str, Value<'_>> = HashMap::from([
        ("tools", Value::from(tools)),
        ("tool_choice", Value::from("none")),
        ("max_tokens", Value::U32(4)),
    ]);
    let reply = conn
        .call_method(
            Some(BUS_NAME),
            OBJECT_PATH,
            Some(INTERFACE),
            "Chat",
            &(messages, opts),
        )
        .await
        .unwrap();
    let (_, info): (String, HashMap<String, zbus::zvariant::OwnedValue>) =
        reply.body().deserialize().unwrap();
    assert!(!info.contains_key("tool_calls"), "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_requests_changes_are_signalled() {
    let Some(d) = Daemon::start(&[]).await else {
        return;
    };
    within(60, async {
        let conn = d.conn().await;
        let props = zbus::fdo::PropertiesProxy::builder(&conn)
            .destination(BUS_NAME)
            .unwrap()
            .path(OBJECT_PATH)
            .unwrap()
            .build()
            .await
            .unwrap();
        let mut changes = props.receive_properties_changed().await.unwrap();
        let (_, info) = generate(&conn, "hello", greedy(4)).await.unwrap();
        assert_eq!(u32_of(&info, "generated_tokens"), 4);
        assert_eq!(str_of(&info, "finish_reason"), "length");
        let mut seen = Vec::new();
        while seen.last() != Some(&0) || !seen.contains(&1) {
            let sig = changes.next().await.unwrap();
            let args = sig.args().unwrap();
            assert_eq!(args.interface_name().as_str(), INTERFACE);
            if let Some(v) = args.changed_properties().get("ActiveRequests") {
                seen.push(u32::try_from(v).unwrap());
            }
        }
        assert_eq!(seen.first(), Some(&1), "{seen:?}");
    })
    .await;
}

/// What a bare connection to the bus saw.
#[derive(Debug)]
enum Raw {
    /// The bus closed the connection before sending the awaited bytes.
    Closed,
    /// The awaited bytes arrived.
    Found,
}

/// Talks to the bus at `address` over a bare socket: authenticates (EXTERNAL,
/// the socket's credentials), sends `messages` (serialized D-Bus messages,
/// `Hello` first) and reads until the bus closes the connection or sends
/// `until`; fails after 30 s of neither.
fn raw_bus_exchange(address: &str, messages: &[Vec<u8>], until: &[u8]) -> Raw {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let path = address
        .strip_prefix("unix:path=")
        .and_then(|a| a.split(',').next())
        .expect("a unix:path= address");
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let line = |s: &mut UnixStream| {
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n") {
            s.read_exact(&mut b).unwrap();
            got.push(b[0]);
        }
        String::from_utf8(got).unwrap()
    };
    s.write_all(b"\0AUTH EXTERNAL\r\n").unwrap();
    assert_eq!(line(&mut s), "DATA\r\n");
    s.write_all(b"DATA\r\n").unwrap();
    assert!(line(&mut s).starts_with("OK "));
    s.write_all(b"BEGIN\r\n").unwrap();
    for m in messages {
        s.write_all(m).unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Raw::Closed,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Raw::Closed,
            Err(e) => panic!("the bus neither answered nor closed: {e}"),
        }
        if got.windows(until.len()).any(|w| w == until) {
            return Raw::Found;
        }
    }
}

/// `Generate(prompt, {})` as bytes on the wire.
fn generate_message(prompt: &str) -> Vec<u8> {
    zbus::Message::method_call(OBJECT_PATH, "Generate")
        .unwrap()
        .destination(BUS_NAME)
        .unwrap()
        .interface(INTERFACE)
        .unwrap()
        .build(&(prompt, HashMap::<&str, Value<'_>>::new()))
        .unwrap()
        .data()
        .to_vec()
}

/// A `Generate` call whose prompt's `MARK` is turned into bytes that are
/// not UTF-8 (D-Bus has no checksum; the lengths stay right).
fn generate_with_invalid_utf8() -> Vec<u8> {
    let mut bytes = generate_message("say MARK twice");
    let at = bytes.windows(4).position(|w| w == b"MARK").unwrap();
    bytes[at..at + 4].copy_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    assert!(std::str::from_utf8(&bytes[at - 4..at + 10]).is_err());
    bytes
}

fn hello() -> Vec<u8> {
    zbus::Message::method_call("/org/freedesktop/DBus", "Hello")
        .unwrap()
        .destination("org.freedesktop.DBus")
        .unwrap()
        .interface("org.freedesktop.DBus")
        .unwrap()
        .build(&())
        .unwrap()
        .data()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_their_errors_and_the_daemon_serves_on() {
    let Some(d) = Daemon::start(&["--ctx", "64"]).await else {
        return;
    };
    within(120, async {
        let conn = d.conn().await;
        // Another client's generation runs through all of it.
        let mut o = greedy(40);
        o.insert("ignore_eos", Value::Bool(true));
        let bystander = ask(&conn, "meanwhile", o).await.unwrap();
        let stops: Vec<String> = (0..5000).map(|i| format!("stop{i}")).collect();
        let ten_mb = "a".repeat(10 << 20);
        let cases: Vec<(&str, HashMap<&str, Value<'_>>, &str, &str)> = vec![
            (
                "hi",
                HashMap::from([("temperature", Value::F64(-1.0))]),
                "InvalidArgument",
                "temperature",
            ),
            (
                "hi",
                HashMap::from([("temperature", Value::F64(f64::INFINITY))]),
                "InvalidArgument",
                "temperature",
            ),
            (
                "hi",
                HashMap::from([("top_p", Value::F64(f64::NAN))]),
                "InvalidArgument",
                "top_p",
            ),
            (
                "hi",
                HashMap::from([("top_p", Value::F64(-0.5))]),
                "InvalidArgument",
                "top_p",
            ),
            (
                "hi",
                HashMap::from([("min_p", Value::F64(f64::NAN))]),
                "InvalidArgument",
                "min_p",
            ),
            (
                "hi",
                HashMap::from([("temperature", Value::from("hot"))]),
                "InvalidArgument",
                "must be a number",
            ),
            (
                "hi",
                HashMap::from([("stop", Value::from("\n"))]),
                "InvalidArgument",
                "array of strings",
            ),
            (
                "hi",
                HashMap::from([("priority", Value::from("urgent"))]),
                "InvalidArgument",
                "priority",
            ),
            (
                "hi",
                HashMap::from([("stop", Value::from(stops.clone()))]),
                "InvalidArgument",
                "at most 16 stop strings",
            ),
            (
                "hi",
                HashMap::from([("stop", Value::from(vec!["x".repeat(300)]))]),
                "InvalidArgument",
                "256",
            ),
            (
                &ten_mb,
                HashMap::new(),
                "OutOfRange",
                "context of 64 tokens",
            ),
            (
                &ten_mb,
                HashMap::from([("raw", Value::Bool(true))]),
                "OutOfRange",
                "context of 64 tokens",
            ),
        ];
        for (prompt, opts, name, says) in cases {
            for method in ["Generate", "Ask"] {
                let e = conn
                    .call_method(
                        Some(BUS_NAME),
                        OBJECT_PATH,
                        Some(INTERFACE),
                        method,
                        &(prompt, opts.clone()),
                    )
                    .await
                    .unwrap_err();
                let got = error_name(&e);
                assert!(
                    got.starts_with(&format!("org.lfm.Daemon1.Error.{name} "))
                        && got.contains(says),
                    "{method} {} bytes {:?}: {got}",
                    prompt.len(),
                    opts.keys()
                );
            }
        }

        // max_tokens 10^9 is accepted and ends when the context is full.
        let mut o = greedy(1_000_000_000);
        o.insert("ignore_eos", Value::Bool(true));
        let (_, info) = generate(&conn, "hi", o).await.unwrap();
        assert_eq!(str_of(&info, "finish_reason"), "context_full", "{info:?}");
        assert!(u32_of(&info, "prompt_tokens") + u32_of(&info, "generated_tokens") <= 64);

        // Invalid UTF-8 in a string never reaches lfmd: the bus daemon
        // validates every message and drops the connection that sent it.
        let address = d.bus.address.clone();
        let error = b"org.lfm.Daemon1.Error".as_slice();
        let bad = tokio::task::spawn_blocking(move || {
            raw_bus_exchange(&address, &[hello(), generate_with_invalid_utf8()], error)
        })
        .await
        .unwrap();
        assert!(matches!(bad, Raw::Closed), "{bad:?}");
        // The same bytes with a valid (empty) prompt do reach lfmd, which
        // answers with its error.
        let address = d.bus.address.clone();
        let good = tokio::task::spawn_blocking(move || {
            raw_bus_exchange(&address, &[hello(), generate_message("")], error)
        })
        .await
        .unwrap();
        assert!(matches!(good, Raw::Found), "{good:?}");

        // Everyone else was served throughout.
        let (text, reason, info) = bystander.collect().await;
        assert_eq!(reason, "length", "{info:?}");
        assert!(!text.is_empty());
        let (_, info) = generate(&conn, "hello", greedy(4)).await.unwrap();
        assert_eq!(u32_of(&info, "generated_tokens"), 4);
        wait_idle(&conn, "after the hostile requests").await;
        assert!(!d.log().contains("panicked"), "{}", d.log());
    })
    .await;
}

/// A tool a desktop developer would use, or a loud skip (a failure under
/// `LFM_REQUIRE_DBUS=1`, as in CI).
fn tool_or_skip(ok: bool, what: &str, install: &str) -> bool {
    if !ok {
        assert!(
            !std::env::var("LFM_REQUIRE_DBUS").is_ok_and(|v| v == "1"),
            "LFM_REQUIRE_DBUS=1 but {what} is missing: {install}"
        );
        eprintln!("*** SKIPPED: {what} is missing ({install}) ***");
    }
    ok
}

/// Clients nobody here wrote, called as their documentation says: `gdbus`
/// with GVariant text's plain integers (`i`), busctl reading the named
/// introspection, `Status` and `Chat`, and a Python script on jeepney
/// (`examples/python/lfm_dbus.py`: `Ask`, its signals, a cancel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desktop_clients_work_with_plain_integers_and_named_arguments() {
    let Some(d) = Daemon::start(&[]).await else {
        return;
    };
    let gdbus = |args: &[&str]| {
        Command::new("gdbus")
            .args(["call", "--address", &d.bus.address, "--dest", BUS_NAME])
            .args(["--object-path", OBJECT_PATH])
            .args(args)
            .output()
            .unwrap()
    };
    if tool_or_skip(
        Command::new("gdbus").arg("help").output().is_ok(),
        "gdbus",
        "apt-get install libglib2.0-bin",
    ) {
        // A call that must succeed: its output.
        let gdbus_ok = |args: &[&str]| {
            let out = gdbus(args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "gdbus {args:?}: {err}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let method = format!("{INTERFACE}.Generate");
        let text = gdbus_ok(&[
            "--method",
            &method,
            "hello",
            "{'max_tokens': <6>, 'temperature': <0>}",
        ]);
        assert!(text.contains("'generated_tokens': <uint32 6>"), "{text}");
        let out = gdbus(&["--method", &method, "hello", "{'max_tokens': <-6>}"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("org.lfm.Daemon1.Error.InvalidArgument")
                && err.contains("\"max_tokens\" is -6; it must be from 0 to 4294967295"),
            "{err}"
        );
        let chat = format!("{INTERFACE}.Chat");
        let text = gdbus_ok(&[
            "--method",
            &chat,
            "[{'role': <'system'>, 'content': <'Be brief.'>}, {'role': <'user'>, 'content': <'Hi'>}]",
            "{'max_tokens': <3>, 'temperature': <0>}",
        ]);
        assert!(text.contains("'generated_tokens': <uint32 3>"), "{text}");
    }

    // Every argument of our interfaces is named.
    for (path, iface) in [(OBJECT_PATH, INTERFACE)] {
        let out = d.busctl(&["introspect", "--xml-interface", BUS_NAME, path]);
        assert!(out.status.success());
        let xml = String::from_utf8_lossy(&out.stdout);
        let ours = &xml[xml.find(&format!("<interface name=\"{iface}\"")).unwrap()..];
        let ours = &ours[..ours.find("</interface>").unwrap()];
        assert!(!ours.contains("name=\"arg_"), "{ours}");
        for name in [
            "prompt", "options", "text", "info", "request", "messages", "status", "totals",
            "experts",
        ] {
            assert!(ours.contains(&format!("name=\"{name}\"")), "{name}: {ours}");
        }
        for method in [
            "Generate",
            "Chat",
            "Ask",
            "AskChat",
            "Status",
            "ExpertStats",
        ] {
            assert!(
                ours.contains(&format!("<method name=\"{method}\">")),
                "{method}: {ours}"
            );
        }
    }

    // Status: what gRPC's GetStatus gives.
    let v = json(&d.busctl(&[
        "--json=short",
        "call",
        BUS_NAME,
        OBJECT_PATH,
        INTERFACE,
        "Status",
    ]));
    let st = &v["data"][0];
    for k in [
        "active_requests",
        "queued_requests",
        "max_concurrent",
        "queue_capacity",
        "sessions",
        "requests_total",
        "generated_tokens_total",
        "generated_tokens_per_second",
        "isa",
        "threads",
        "rss_bytes",
        "uptime_seconds",
        "version",
        "paging",
        "prefix_cache",
    ] {
        assert!(st.get(k).is_some(), "Status lacks {k}: {v}");
    }
    assert!(
        st["prefix_cache"]["data"]["limit_bytes"]["data"]
            .as_u64()
            .is_some_and(|b| b > 0),
        "{v}"
    );
    assert_eq!(st["max_concurrent"]["data"], 8, "{v}");
    assert!(
        st["paging"]["data"].get("expert_total_bytes").is_some(),
        "{v}"
    );

    // Python on jeepney, from PyPI: the example script, whole and cancelled.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/lfm_dbus.py"
    );
    let has_jeepney = Command::new("python3")
        .args(["-c", "import jeepney"])
        .status()
        .is_ok_and(|s| s.success());
    if tool_or_skip(has_jeepney, "Python's jeepney", "pip install jeepney") {
        let run = |extra: &[&str]| {
            Command::new("python3")
                .arg(example)
                .args(["--bus", &d.bus.address, "--temperature", "0"])
                .args(extra)
                .arg("Hello")
                .output()
                .unwrap()
        };
        let out = run(&["--max-tokens", "7"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("# length: 7 tokens"), "{err}");
        let out = run(&["--max-tokens", "4000", "--cancel-after", "3"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        // Cancelled after the third token (a fast engine may have sent
        // another before the Cancel arrived).
        let n: u32 = err
            .split("# cancelled: ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not cancelled: {err}"));
        assert!((3..100).contains(&n), "{err}");
        wait_idle(&d.conn().await, "after the cancelled Ask").await;
    }
}
