//! The `lfmctl` binary against a daemon served in this process (the lfmd
//! library on a temporary socket, a synthesized tiny model): answers,
//! sessions, queries, and the exit codes 0 / 2 / 3 / 4.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

struct Daemon {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        let preset = lfmd::synth::find_preset("tiny-moe").unwrap();
        let ty = lfmd::synth::SynthQuant::parse("q8_0").unwrap();
        lfmd::synth::write_model(preset, ty, 2, &model).unwrap();
        let socket = dir.path().join("lfmd.sock");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let sock = socket.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let bound = lfmd::serve::bind_unix(&sock, None).unwrap();
                let (handle, exit) = start_engine(&model);
                ready_tx.send(()).unwrap();
                let control = lfmd::serve::Control {
                    signals: lfmd::serve::Signals::install().unwrap().with_stop(stopped),
                    settings: lfmd::config::Settings {
                        shutdown_grace: 0.0,
                        ..Default::default()
                    },
                    reload: || Err("no reload here".to_owned()),
                    watchdog: None,
                    http: None,
                };
                lfmd::serve::serve(handle, exit, vec![bound], control)
                    .await
                    .unwrap();
            });
        });
        ready.recv_timeout(Duration::from_secs(60)).unwrap();
        Daemon {
            _dir: dir,
            socket,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

/// The tiny model on one thread behind a scheduler with default limits.
fn start_engine(model: &Path) -> (lfmd::scheduler::Handle, lfmd::scheduler::EngineExit) {
    let opts = lfmd::engine::EngineOptions {
        threads: Some(1),
        ..Default::default()
    };
    let m = lfmd::engine::Model::open_with(model, opts).unwrap();
    lfmd::scheduler::start(m, "tiny.gguf", Default::default()).unwrap()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lfmctl(socket: &Path, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_lfmctl"))
        .env("LFMD_SOCKET", socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn no_daemon_exits_3_and_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = lfmctl(&socket, &["status"], "");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "lfmd serve --model FILE.gguf --grpc unix:{}",
            socket.display()
        )),
        "{err}"
    );
    // --socket wins over the environment.
    let other = dir.path().join("other.sock");
    let out = lfmctl(&socket, &["--socket", other.to_str().unwrap(), "info"], "");
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("other.sock"));
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("none.sock");
    for args in [
        &["frobnicate"][..],
        &["ask", "--temperature", "warm", "hi"],
        &["ask", "--priority", "urgent", "hi"],
        &["ask", "--raw", "--system", "s", "hi"],
        &["--dbus=", "status", "--dbus=nonsense"],
        &["tokenize", "--dbus", "x"],
        &["load", "--dbus"],
    ] {
        let out = lfmctl(&s, args, "");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // An empty prompt on stdin is a usage error, found before connecting.
    let out = lfmctl(&s, &["ask"], "  \n");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("prompt is empty"));
}

#[test]
fn ask_chat_and_queries_against_a_daemon() {
    let d = Daemon::start();
    let s = &d.socket;
    let out = lfmctl(
        s,
        &[
            "ask",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--json",
            "Hello",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stats"]["generated_tokens"], 8);
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 8);
    assert_eq!(v["finish_reason"], "length");
    // The same question streamed, its prompt from stdin: the same text.
    let out = lfmctl(
        s,
        &["ask", "--temperature", "0", "--max-tokens", "8"],
        "Hello\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{}\n", v["text"].as_str().unwrap())
    );

    // Rejected by the daemon: 4, with its reason.
    let out = lfmctl(s, &["ask", "--temperature=-1", "hi"], "");
    assert_eq!(out.status.code(), Some(4));
    assert!(
        text(&out.stderr).contains("temperature"),
        "{}",
        text(&out.stderr)
    );

    // Two turns on one session.
    let out = lfmctl(
        s,
        &[
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "--session",
            "t",
        ],
        "Hi\nAnd then?\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 2);

    let out = lfmctl(s, &["status", "--json"], "");
    assert_eq!(out.status.code(), Some(0));
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["sessions"], 1);
    assert_eq!(st["requests_total"], 4);
    assert!(
        st["prefix_cache"]["limit_bytes"].as_u64().unwrap() > 0,
        "{st}"
    );
    assert!(st["prefix_cache"]["entries"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["active_requests"], 0);

    let out = lfmctl(s, &["info", "--json"], "");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["architecture"], "lfm2moe");
    let out = lfmctl(s, &["tokenize", "--no-bos", "<|im_start|>"], "");
    assert_eq!(text(&out.stdout).trim(), "[6]");
    let out = lfmctl(s, &["status"], "");
    assert!(
        text(&out.stdout).contains("1 sessions"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("prefix cache: ") && text(&out.stdout).contains(" entries, "),
        "{}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("lfmctl stats --experts"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(st["paging"]["budget_mode"], "auto");

    // Expert statistics: every token chose k experts in every MoE layer.
    let out = lfmctl(s, &["stats", "--experts", "--json"], "");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ex: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = ex["layers"].as_array().unwrap();
    let k = info["n_expert_used"].as_u64().unwrap();
    let n_expert = info["n_expert"].as_u64().unwrap() as usize;
    assert!(!layers.is_empty());
    let per_layer: Vec<u64> = layers
        .iter()
        .map(|l| {
            let e = l["experts"].as_array().unwrap();
            assert_eq!(e.len(), n_expert);
            e.iter().map(|e| e["hits"].as_u64().unwrap()).sum()
        })
        .collect();
    assert!(
        per_layer[0] > 0 && per_layer[0].is_multiple_of(k),
        "{per_layer:?}"
    );
    assert!(
        per_layer.iter().all(|&h| h == per_layer[0]),
        "{per_layer:?}"
    );
    let resident = layers
        .iter()
        .flat_map(|l| l["experts"].as_array().unwrap())
        .filter(|e| e["resident"] == true)
        .count();
    assert!(resident > 0, "the chosen experts are in memory");
    let out = lfmctl(s, &["stats", "--experts"], "");
    let t = text(&out.stdout);
    assert_eq!(
        t.lines().filter(|l| l.starts_with("blk.")).count(),
        layers.len(),
        "{t}"
    );
    assert!(t.contains("budget: auto") && t.contains("@"), "{t}");
    assert!(!t.contains('\x1b'), "no colour into a pipe: {t}");
    let out = lfmctl(s, &["stats", "--json"], "");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("layers").is_none() && v["loads"].is_u64(), "{v}");
}

/// `ask --json-schema`, `--regex` and `--tools`: the answer keeps to the
/// schema, the calls come out as JSON lines (and in `--json`), a bad schema
/// file is the daemon's refusal (4) and a missing one a usage error (2).
#[test]
fn ask_with_a_schema_or_tools_prints_what_programs_can_parse() {
    let d = Daemon::start();
    let s = &d.socket;
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("light.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"device": {"enum": ["hall_light", "fan"]}, "level": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["device", "level"], "additionalProperties": false}"#,
    )
    .unwrap();
    let path = schema.to_str().unwrap();
    let out = lfmctl(
        s,
        &[
            "ask",
            "--json-schema",
            path,
            "--temperature",
            "1",
            "--seed",
            "4",
            "Dim the light",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(text(&out.stdout).trim()).expect("the answer is JSON");
    assert!(
        ["hall_light", "fan"].contains(&v["device"].as_str().unwrap()),
        "{v}"
    );
    assert!(v["level"].as_u64().unwrap() <= 100, "{v}");
    let out = lfmctl(
        s,
        &[
            "ask",
            "--regex",
            "(yes|no)-[0-9]{2}",
            "--temperature",
            "1",
            "hi",
        ],
        "",
    );
    let answer = text(&out.stdout);
    let (word, num) = answer.trim().split_once('-').unwrap();
    assert!(["yes", "no"].contains(&word) && num.len() == 2, "{answer}");

    let tools = dir.path().join("tools.json");
    std::fs::write(
        &tools,
        format!(r#"[{{"name": "set_light", "parameters": {}}}, {{"type": "function", "function": {{"name": "get_time"}}}}]"#, std::fs::read_to_string(&schema).unwrap()),
    )
    .unwrap();
    let tools = tools.to_str().unwrap();
    let out = lfmctl(
        s,
        &[
            "ask",
            "--tools",
            tools,
            "--tool-choice",
            "required",
            "--temperature",
            "1",
            "--max-tokens",
            "400",
            "Dim the light",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let calls: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(!calls.is_empty(), "{}", text(&out.stdout));
    for c in &calls {
        assert!(c["name"] == "set_light" || c["name"] == "get_time", "{c}");
        assert!(
            c["id"].as_str().is_some_and(|i| !i.is_empty()) && c["arguments"].is_object(),
            "{c}"
        );
    }
    let out = lfmctl(
        s,
        &[
            "ask",
            "--tools",
            tools,
            "--tool-choice",
            "get_time",
            "--json",
            "What time is it?",
        ],
        "",
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["finish_reason"], "tool_calls", "{v}");
    assert!(
        v["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["name"] == "get_time"),
        "{v}"
    );

    let out = lfmctl(s, &["ask", "--json-schema", tools, "hi"], "");
    assert_eq!(
        out.status.code(),
        Some(4),
        "an array of tools is not a schema: {}",
        text(&out.stderr)
    );
    let out = lfmctl(s, &["ask", "--json-schema", "/nonexistent.json", "hi"], "");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn load_accounts_for_every_request_and_leaves_nothing_behind() {
    let d = Daemon::start();
    let out = lfmctl(
        &d.socket,
        &[
            "load",
            "--clients",
            "6",
            "--requests",
            "3",
            "--max-tokens",
            "12",
            "--ignore-eos",
            "--temperature",
            "0",
            "--cancel-rate",
            "0.3",
            "--disconnect-rate",
            "0.2",
            "--load-seed",
            "7",
            "--json",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = |k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    };
    assert_eq!(n("requests"), 18);
    // Every request ended one way or another, and none failed.
    assert_eq!(
        n("completed") + n("cancelled") + n("disconnected") + n("rejected_queue_full"),
        18,
        "{r}"
    );
    assert_eq!(n("failed"), 0, "{r}");
    assert!(
        n("cancelled") > 0 && n("disconnected") > 0,
        "the seed picks both: {r}"
    );
    // Completed requests ran to max_tokens (end-of-generation ignored).
    assert_eq!(
        r["finish_reasons"]["length"].as_u64(),
        Some(n("completed")),
        "{r}"
    );
    // The daemon let go of everything: cancellations freed their slots.
    assert_eq!((n("left_running"), n("left_queued")), (0, 0), "{r}");
    assert!(!r["rss_bytes"].as_array().unwrap().is_empty());
    // Each client's own rate, and their spread (fastest over slowest):
    // the tokens they received over their busy time add up to the total.
    let rates: Vec<f64> = r["client_tokens_per_second"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(rates.len(), 6, "{r}");
    assert!(rates.iter().all(|&x| x > 0.0), "{r}");
    let (lo, hi) = rates
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let spread = r["client_spread"].as_f64().unwrap();
    assert!((spread - hi / lo).abs() < 1e-9 * spread, "{r}");
    let wall = r["wall_seconds"].as_f64().unwrap();
    let total: f64 = rates.iter().map(|x| x * wall).sum();
    assert!(
        total >= n("generated_tokens") as f64 * (1.0 - 1e-9),
        "each client's rate is over its own time, at most the wall time: {r}"
    );
}

/// A private session bus (`dbus-daemon`) in `dir`, or `None` after a loud
/// message when it is not installed (a failure with `LFM_REQUIRE_DBUS=1`).
fn private_bus(dir: &Path) -> Option<(std::process::Child, String)> {
    use std::io::BufRead;
    let found = Command::new("dbus-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        let required = std::env::var("LFM_REQUIRE_DBUS").is_ok_and(|v| v == "1");
        assert!(!required, "LFM_REQUIRE_DBUS=1 but dbus-daemon is missing");
        eprintln!(
            "\n*** SKIPPED: dbus-daemon is not installed; lfmctl --dbus was not tested ***\n"
        );
        return None;
    }
    let mut child = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address=1"])
        .arg(format!(
            "--address=unix:path={}",
            dir.join("bus.sock").display()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    Some((child, line.trim().to_owned()))
}

#[test]
fn ask_over_dbus_streams_the_answer_grpc_gives_and_exit_3_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let Some((mut bus, address)) = private_bus(dir.path()) else {
        return;
    };
    let flag = format!("--dbus={address}");
    let greedy = ["--temperature", "0", "--max-tokens", "6", "--ignore-eos"];
    // Nobody owns org.lfm.Daemon1 on this bus yet.
    let args: Vec<&str> = [flag.as_str(), "ask"]
        .into_iter()
        .chain(greedy)
        .chain(["Hello"])
        .collect();
    let out = lfmctl(&dir.path().join("none.sock"), &args, "");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--dbus"),
        "{}",
        text(&out.stderr)
    );

    let d = Daemon::start();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let model = d._dir.path().join("tiny.gguf");
    let addr = address.clone();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let (handle, _exit) = start_engine(&model);
            let served = lfmd::dbus::serve(handle, &lfm_proto::dbus::Bus::Address(addr))
                .await
                .unwrap();
            ready_tx.send(()).unwrap();
            tokio::task::spawn_blocking(move || stopped.recv())
                .await
                .unwrap()
                .ok();
            drop(served);
        });
    });
    ready.recv_timeout(Duration::from_secs(60)).unwrap();
    let over_dbus = lfmctl(&d.socket, &args, "");
    assert_eq!(
        over_dbus.status.code(),
        Some(0),
        "{}",
        text(&over_dbus.stderr)
    );
    let grpc_args: Vec<&str> = ["ask"].into_iter().chain(greedy).chain(["Hello"]).collect();
    let over_grpc = lfmctl(&d.socket, &grpc_args, "");
    assert_eq!(
        over_grpc.status.code(),
        Some(0),
        "{}",
        text(&over_grpc.stderr)
    );
    assert!(!over_dbus.stdout.is_empty());
    assert_eq!(text(&over_dbus.stdout), text(&over_grpc.stdout));

    // The other commands that offer --dbus honour it (flag after the
    // command's name too), with the output gRPC gives.
    let both = |args: &[&str], stdin: &str| {
        let mut with: Vec<&str> = args.to_vec();
        with.push(&flag);
        let a = lfmctl(&d.socket, &with, stdin);
        let b = lfmctl(&d.socket, args, stdin);
        assert_eq!(a.status.code(), Some(0), "{with:?}: {}", text(&a.stderr));
        assert_eq!(b.status.code(), Some(0), "{args:?}: {}", text(&b.stderr));
        (text(&a.stdout), text(&b.stdout))
    };
    let (a, b) = both(&["info", "--json"], "");
    assert_eq!(a, b);
    assert!(a.contains("\"architecture\": \"lfm2moe\""), "{a}");
    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    let (a, b) = both(&["status", "--json"], "");
    let (a, b) = (json(&a), json(&b));
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&a), keys(&b));
    for k in [
        "max_concurrent",
        "queue_capacity",
        "isa",
        "threads",
        "version",
    ] {
        assert_eq!(a[k], b[k], "{k}");
    }
    // D-Bus and gRPC give the same prefix-cache figures.
    for k in ["limit_bytes", "entries", "hits"] {
        let (a, b) = (&a["prefix_cache"][k], &b["prefix_cache"][k]);
        assert!(a.is_u64(), "{k}: {a}");
        assert_eq!(a, b, "{k}");
    }
    assert!(a["socket"].as_str().unwrap().contains(&address), "{a}");
    assert!(
        a["paging"]["expert_total_bytes"].as_u64().unwrap() > 0,
        "{a}"
    );
    let (a, b) = both(&["stats", "--experts", "--json"], "");
    let (a, b) = (json(&a), json(&b));
    assert_eq!(keys(&a), keys(&b));
    assert_eq!(
        a["layers"].as_array().map(Vec::len),
        b["layers"].as_array().map(Vec::len)
    );
    assert!(!a["layers"].as_array().unwrap().is_empty(), "{a}");
    // Two turns on a daemon session: the same answers as over gRPC.
    let (a, b) = both(
        &[
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "--ignore-eos",
        ],
        "Hello\nAnd then?\n",
    );
    assert_eq!(a, b);
    assert_eq!(a.lines().count(), 2, "{a:?}");
    stop.send(()).unwrap();
    server.join().unwrap();
    let _ = bus.kill();
    let _ = bus.wait();
}

/// The daemon's status, over gRPC.
fn status(socket: &Path) -> lfm_proto::v1::DaemonStatus {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let target = lfm_proto::client::Target::Unix(socket.into());
        let mut c = lfm_proto::client::connect(&target).await.unwrap();
        c.get_status(lfm_proto::v1::GetStatusRequest::default())
            .await
            .unwrap()
            .into_inner()
    })
}

#[test]
fn a_client_killed_mid_stream_frees_its_slot_and_its_compute() {
    use std::io::Read;
    let d = Daemon::start();
    let mut asking = Command::new(env!("CARGO_BIN_EXE_lfmctl"))
        .env("LFMD_SOCKET", &d.socket)
        .args(["ask", "--raw", "--temperature", "0", "--ignore-eos"])
        .args(["--max-tokens", "100000", "Once upon a time"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The answer is streaming: its first bytes arrived.
    let mut first = [0u8; 1];
    asking
        .stdout
        .take()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(status(&d.socket).active_requests, 1);
    asking.kill().unwrap(); // SIGKILL: no goodbye on the connection
    asking.wait().unwrap();

    // The daemon notices the closed connection and stops the request.
    let t0 = std::time::Instant::now();
    let idle = loop {
        let s = status(&d.socket);
        if s.active_requests == 0 && s.queued_requests == 0 {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the killed client's request still runs: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Compute stopped too: the next request's 4 tokens are the only ones
    // generated from here on.
    let out = lfmctl(
        &d.socket,
        &[
            "ask",
            "--raw",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "--ignore-eos",
        ],
        "hello",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = status(&d.socket);
    assert_eq!(
        after.generated_tokens_total,
        idle.generated_tokens_total + 4,
        "{idle:?}\n{after:?}"
    );
    assert_eq!(after.requests_total, idle.requests_total + 1);
}
