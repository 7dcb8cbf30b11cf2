//! The D-Bus API end to end: a private `dbus-daemon` on a temporary socket
//! and the real `lfmd serve --dbus ADDRESS` (plus its gRPC socket) on a
//! synthesized tiny model, driven by `busctl` and by zbus clients.
//!
//! Without `dbus-daemon` the tests say so loudly and pass, unless
//! `LFM_REQUIRE_DBUS=1` (CI), which makes them fail.

use lfm_proto::client::{Target, connect};
use lfm_proto::dbus::{BUS_NAME, INTERFACE, OBJECT_PATH, REQUEST_INTERFACE, REQUESTS_PATH};
use lfm_proto::v1 as pb;
use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, MatchRule, MessageStream};

/// A private session bus; killed when dropped.
struct PrivateBus {
    child: Child,
    address: String,
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Starts a bus in `dir`, or `None` (after a loud message) when
/// `dbus-daemon` or `busctl` is missing and `LFM_REQUIRE_DBUS` is not 1.
fn private_bus(dir: &Path) -> Option<PrivateBus> {
    if !(have("dbus-daemon") && have("busctl")) {
        let required = std::env::var("LFM_REQUIRE_DBUS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "LFM_REQUIRE_DBUS=1 but dbus-daemon or busctl is missing: apt-get install dbus-daemon systemd"
        );
        eprintln!(
            "\n*** SKIPPED: dbus-daemon or busctl is not installed, so the D-Bus tests did not run \
             (apt-get install dbus-daemon systemd; LFM_REQUIRE_DBUS=1 makes this a failure) ***\n"
        );
        return None;
    }
    let mut child = Command::new("dbus-daemon")
        .arg("--session")
        .arg("--nofork")
        .arg("--print-address=1")
        .arg(format!(
            "--address=unix:path={}",
            dir.join("bus.sock").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting dbus-daemon");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line.trim().to_owned();
    assert!(address.starts_with("unix:"), "dbus-daemon said {line:?}");
    Some(PrivateBus { child, address })
}

/// The real `lfmd serve` on a private bus and a gRPC socket.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    target: Target,
    bus: PrivateBus,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// `None` when D-Bus is not available here (see [`private_bus`]).
    async fn start(args: &[&str]) -> Option<Daemon> {
        let dir = tempfile::tempdir().unwrap();
        let bus = private_bus(dir.path())?;
        let model = dir.path().join("tiny-moe-q8_0.gguf");
        let preset = lfmd::synth::find_preset("tiny-moe").unwrap();
        let ty = lfmd::synth::SynthQuant::parse("q8_0").unwrap();
        lfmd::synth::write_model(preset, ty, 1, &model).unwrap();
        let socket = dir.path().join("lfmd.sock");
        let log = std::fs::File::create(dir.path().join("lfmd.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lfmd"))
            .arg("serve")
            .arg("--model")
            .arg(&model)
            .arg("--grpc")
            .arg(format!("unix:{}", socket.display()))
            .args(["--dbus", &bus.address, "--threads", "1"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            dir,
            target: Target::Unix(socket),
            bus,
        };
        // gRPC answers only after D-Bus is up (lfmd starts D-Bus first).
        let t0 = Instant::now();
        loop {
            if let Ok(mut c) = connect(&d.target).await
                && c.get_status(pb::GetStatusRequest {}).await.is_ok()
            {
                return Some(d);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "lfmd did not come up: {}",
                d.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lfmd.log")).unwrap_or_default()
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
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(isa, status.isa);
    // Introspection lists the interface (busctl introspect works).
    let out = d.busctl(&["introspect", BUS_NAME, OBJECT_PATH, INTERFACE]);
    let text = String::from_utf8_lossy(&out.stdout);
    for member in ["Generate", "Ask", "ActiveRequests", "QueuedRequests"] {
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

async fn grpc_chat(target: &Target, prompt: &str) -> String {
    let mut c = connect(target).await.unwrap();
    let mut s = c
        .chat(pb::ChatRequest {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: prompt.into(),
            }],
            options: Some(pb::SamplingOptions {
                temperature: Some(0.0),
                max_tokens: Some(4),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(m) = s.message().await.unwrap() {
        if let Some(pb::generate_response::Event::Delta(d)) = m.event {
            text.push_str(&d.text);
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_over_both_transports_get_their_solo_answers() {
    let Some(d) = Daemon::start(&[]).await else {
        return;
    };
    // Generous: a loaded 2-core CI machine decodes the tiny model slowly.
    within(300, async {
        let mut solo = Vec::new();
        for p in PROMPTS {
            solo.push(grpc_chat(&d.target, p).await);
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
            tasks.push(tokio::spawn(
                async move { (i, grpc_chat(&target, p).await) },
            ));
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
            .get_status(pb::GetStatusRequest {})
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
                HashMap::from([("max_tokens", Value::I32(8))]),
                "InvalidArgument",
                "uint32",
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
