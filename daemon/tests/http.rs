//! The HTTP edge of a real `lfmd serve --http`, spoken to in raw HTTP/1.1
//! (no client library between the test and the bytes): the OpenAI routes
//! answer as gRPC does, bad requests get OpenAI-shaped errors with the
//! right status, slow and idle clients are closed without disturbing
//! anyone, `/health` follows the daemon's life and `/metrics` counts what
//! was sent. `python_http.rs` runs the official `openai` package.

mod common;

use common::Lfmd;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Where the daemon's HTTP listens.
#[derive(Clone)]
enum At {
    Unix(PathBuf),
    Tcp(String),
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl At {
    fn connect(&self) -> Box<dyn Stream> {
        match self {
            At::Unix(p) => Box::new(UnixStream::connect(p).unwrap()),
            At::Tcp(a) => Box::new(TcpStream::connect(a).unwrap()),
        }
    }
}

/// An answer: status, headers (lower-cased names), body (de-chunked).
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an event stream.
    fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    }
}

fn parse_answer(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text.split_once("\r\n\r\n").expect("a complete answer");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v == "chunked");
    let body = if chunked {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// Sends `method path` with `body` (and `Connection: close`); the answer.
fn call(at: &At, method: &str, path: &str, body: &str) -> Answer {
    let mut s = at.connect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: lfmd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_answer(&raw)
}

/// A streamed chat of `max_tokens` (end of generation ignored) whose
/// answer has begun; the connection holds it.
fn long_stream(at: &At, max_tokens: u32) -> Box<dyn Stream> {
    let mut s = at.connect();
    let body = chat_body(
        "x",
        json!({"stream": true, "max_tokens": max_tokens, "ignore_eos": true}),
    );
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: lfmd\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 256];
    let _ = s.read(&mut first).unwrap();
    s
}

fn chat_body(content: &str, extra: Value) -> String {
    let mut b = json!({
        "model": "whatever",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 12,
    });
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    b.to_string()
}

/// The daemon with `--http` on a Unix socket and on loopback TCP (port
/// chosen by the kernel, read from the log).
fn start(args: &[&str]) -> (Lfmd, At, At) {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("http.sock");
    let unix = format!("unix:{}", sock.display());
    let mut all = vec!["--http", &unix, "--http", "tcp:127.0.0.1:0"];
    all.extend_from_slice(args);
    let d = runtime().block_on(Lfmd::start_in(tmp, &all));
    let port = common::http_port(&d).unwrap();
    (d, At::Unix(sock), At::Tcp(port))
}

fn grpc_chat(d: &Lfmd, content: &str) -> String {
    runtime().block_on(common::grpc_chat(&d.target, content, 12))
}

#[test]
fn openai_routes_answer_on_unix_and_tcp_as_grpc_does() {
    let (d, unix, tcp) = start(&[]);
    for at in [&unix, &tcp] {
        let h = call(at, "GET", "/health", "");
        assert_eq!((h.status, h.json()), (200, json!({"status": "ok"})));
    }
    let models = call(&tcp, "GET", "/v1/models", "").json();
    assert_eq!(models["object"], "list");
    let id = models["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(id, "tiny-moe-q8_0");
    assert_eq!(
        call(&tcp, "GET", &format!("/v1/models/{id}"), "").status,
        200
    );
    assert_eq!(call(&tcp, "GET", "/v1/models/gpt-4", "").status, 404);

    let want = grpc_chat(&d, "Say something.");
    assert!(!want.is_empty());
    for at in [&unix, &tcp] {
        let a = call(
            at,
            "POST",
            "/v1/chat/completions",
            &chat_body("Say something.", json!({})),
        );
        assert_eq!(a.status, 200, "{}", a.body);
        let v = a.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], id.as_str());
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 12);
        let u = &v["usage"];
        assert_eq!(u["total_tokens"], u["prompt_tokens"].as_u64().unwrap() + 12);
    }

    // Streamed: the same text in chunks, a finish reason, usage, [DONE].
    let a = call(
        &unix,
        "POST",
        "/v1/chat/completions",
        &chat_body(
            "Say something.",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = a.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], 12);

    // A raw completion.
    let c = call(
        &tcp,
        "POST",
        "/v1/completions",
        &json!({"prompt": "Once upon", "max_tokens": 5, "temperature": 0}).to_string(),
    );
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.json()["object"], "text_completion");
    assert_eq!(c.json()["usage"]["completion_tokens"], 5);

    // lfmd's `session` extra: the second turn sends only its new message
    // and continues the kept state (its earlier tokens are not prefilled).
    let turn = |content: &str| {
        let a = call(
            &unix,
            "POST",
            "/v1/chat/completions",
            &chat_body(content, json!({"session": "http-s1", "max_tokens": 4})),
        );
        assert_eq!(a.status, 200, "{}", a.body);
        a.json()["usage"].clone()
    };
    let first = turn("Hello there.");
    let second = turn("And then?");
    let p1 = first["prompt_tokens"].as_u64().unwrap();
    let p2 = second["prompt_tokens"].as_u64().unwrap();
    assert!(
        p2 > p1 + 4,
        "the session's earlier turn is in the context: {first} {second}"
    );
    let cached = second["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        cached >= p1,
        "the earlier turn was not prefilled again: {second}"
    );
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let (d, _unix, tcp) = start(&[]);
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        (
            "POST",
            "/v1/chat/completions",
            "{not json",
            400,
            "not valid JSON",
        ),
        ("POST", "/v1/chat/completions", "[1, 2]", 400, "JSON object"),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            400,
            "messages[0].role",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
            400,
            "temperature",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": 500}"#,
            400,
            "temperature",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages": []}"#,
            400,
            "no messages",
        ),
        (
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "n": 3}"#,
            400,
            "n must be 1",
        ),
        ("POST", "/v1/completions", r#"{"prompt": ""}"#, 400, "empty"),
        ("GET", "/v1/nothing", "", 404, "no route"),
        ("DELETE", "/v1/models", "", 405, "not allowed"),
    ];
    for (method, path, body, status, says) in cases {
        let a = call(&tcp, method, path, body);
        assert_eq!(a.status, *status, "{method} {path} {body}: {}", a.body);
        let e = &a.json()["error"];
        assert!(e["message"].as_str().unwrap().contains(says), "{body}: {e}");
        assert!(e["type"].is_string());
    }
    // A prompt longer than the context: 400 context_length_exceeded.
    let long = "word ".repeat(6000);
    let a = call(
        &tcp,
        "POST",
        "/v1/completions",
        &json!({"prompt": long}).to_string(),
    );
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.json()["error"]["code"], "context_length_exceeded");

    // A body declared larger than the limit: 413 before it is sent.
    let mut s = tcp.connect();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: lfmd\r\nContent-Length: {}\r\n\r\n",
        64 << 20
    )
    .unwrap();
    let mut raw = vec![0u8; 4096];
    let n = s.read(&mut raw).unwrap();
    let a = parse_answer(&raw[..n]);
    assert_eq!(a.status, 413, "{}", a.body);
    assert!(a.body.contains("larger than 16 MiB"), "{}", a.body);

    // The queue full: 429 with Retry-After. One slot, no queue; a long
    // streamed request holds the slot.
    drop(d);
    let (_d, _unix, tcp) = start(&["--max-concurrent", "1", "--queue", "0"]);
    let hold = long_stream(&tcp, 3000);
    let a = call(
        &tcp,
        "POST",
        "/v1/chat/completions",
        &chat_body("y", json!({})),
    );
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.json()["error"]["type"], "rate_limit_error");
    let retry: u64 = a.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
    drop(hold);
    // The held request is cancelled with its connection; the slot frees.
    let t0 = Instant::now();
    loop {
        let a = call(
            &tcp,
            "POST",
            "/v1/chat/completions",
            &chat_body("y", json!({})),
        );
        if a.status == 200 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", a.body);
        std::thread::sleep(Duration::from_millis(50));
    }

    // The per-user limit counts HTTP requests by the peer's uid
    // (SO_PEERCRED on the Unix socket), as gRPC's and D-Bus's: 429
    // `user_limit` while this user's one request runs; TCP peers are
    // another owner.
    let (_d, unix, tcp) = start(&["--max-per-user", "1"]);
    let hold = long_stream(&unix, 3000);
    let a = call(
        &unix,
        "POST",
        "/v1/chat/completions",
        &chat_body("y", json!({})),
    );
    assert_eq!(a.status, 429, "{}", a.body);
    assert_eq!(a.json()["error"]["code"], "user_limit", "{}", a.body);
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("uid "),
        "{}",
        a.body
    );
    let b = call(
        &tcp,
        "POST",
        "/v1/chat/completions",
        &chat_body("y", json!({})),
    );
    assert_eq!(b.status, 200, "{}", b.body);
    drop(hold);
}

/// Raises this process's open-files limit for the idle connections.
fn allow_open_files(n: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let l = getrlimit(Resource::Nofile);
    if l.current.is_some_and(|c| c < n) {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(l.maximum.map_or(n, |m| m.min(n.max(4096)))),
                maximum: l.maximum,
            },
        );
    }
}

#[test]
fn slow_and_idle_clients_are_closed_and_disturb_nobody() {
    allow_open_files(4096);
    let (d, unix, tcp) = start(&[]);
    let At::Tcp(addr) = tcp.clone() else {
        unreachable!()
    };
    // A thousand connections that never send a byte.
    let idle: Vec<TcpStream> = (0..1000)
        .map(|i| TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    // A slow loris: headers begun, never finished.
    let mut loris = TcpStream::connect(&addr).unwrap();
    loris
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: lfmd\r\n")
        .unwrap();
    // A body announced and never sent in full.
    let mut slow_body = TcpStream::connect(&addr).unwrap();
    slow_body
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: lfmd\r\nContent-Length: 100\r\n\r\n{\"mess")
        .unwrap();
    let t0 = Instant::now();

    // Meanwhile everyone else is served: HTTP on both listeners, and gRPC.
    for at in [&unix, &tcp] {
        let a = call(
            at,
            "POST",
            "/v1/chat/completions",
            &chat_body("hello", json!({})),
        );
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert!(!grpc_chat(&d, "hello").is_empty());

    // The header timeout (10 s) closes the idle and the slow-header ones.
    // Closed: end of stream or a reset, not a read timeout.
    let closed = |s: &mut TcpStream, within: Duration| {
        s.set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .unwrap();
        let mut b = [0u8; 512];
        match s.read(&mut b) {
            Ok(0) => true,
            Ok(n) => String::from_utf8_lossy(&b[..n]).starts_with("HTTP/1.1 408"),
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    };
    let deadline = Duration::from_secs(10 + 5);
    assert!(
        closed(&mut loris, deadline.saturating_sub(t0.elapsed())),
        "the slow loris was not closed"
    );
    for (i, mut s) in idle.into_iter().enumerate().step_by(97) {
        assert!(
            closed(&mut s, Duration::from_secs(3)),
            "idle connection {i} is still open after {:?}",
            t0.elapsed()
        );
    }
    // The unfinished body gets 408 after the body timeout (30 s).
    slow_body
        .set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let mut raw = Vec::new();
    let _ = slow_body.read_to_end(&mut raw);
    let a = parse_answer(&raw);
    assert_eq!(a.status, 408, "{}", a.body);
    // And the daemon is still fine.
    let a = call(&tcp, "GET", "/health", "");
    assert_eq!(a.status, 200);
}

/// `name{labels} value` from an exposition.
fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[test]
fn metrics_count_what_was_sent_and_health_follows_shutdown() {
    let (mut d, _unix, tcp) = start(&["--shutdown-grace", "20"]);
    for _ in 0..3 {
        assert_eq!(
            call(
                &tcp,
                "POST",
                "/v1/chat/completions",
                &chat_body("a", json!({}))
            )
            .status,
            200
        );
    }
    assert!(!grpc_chat(&d, "b").is_empty());
    let a = call(&tcp, "GET", "/metrics", "");
    assert_eq!(a.status, 200);
    assert!(
        a.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let m = &a.body;
    assert!(m.trim_end().ends_with("# EOF"), "{m}");
    assert_eq!(
        sample(
            m,
            r#"lfmd_requests_total{edge="http",finish_reason="length"}"#
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        sample(
            m,
            r#"lfmd_requests_total{edge="grpc",finish_reason="length"}"#
        ),
        1.0,
        "{m}"
    );
    assert_eq!(sample(m, "lfmd_generated_tokens_total"), 48.0, "{m}");
    assert_eq!(
        sample(m, "lfmd_time_to_first_token_seconds_count"),
        4.0,
        "{m}"
    );
    assert_eq!(
        sample(m, "lfmd_inter_token_latency_seconds_count"),
        44.0,
        "{m}"
    );
    assert_eq!(sample(m, "lfmd_requests_running"), 0.0);
    assert!(sample(m, r#"lfmd_resident_memory_bytes{kind="anon"}"#) > 0.0);
    assert!(m.contains("lfmd_model_info{"), "{m}");
    // No prompt text, session or user in any label.
    assert!(!m.contains("uid:") && !m.contains("\"a\""), "{m}");

    // A long answer is running when SIGTERM comes: /health says stopping
    // (503), new work is refused with 503, the running answer finishes.
    let mut hold = long_stream(&tcp, 2000);
    d.signal("TERM");
    let t0 = Instant::now();
    loop {
        let h = call(&tcp, "GET", "/health", "");
        if h.status == 503 {
            assert_eq!(h.json(), json!({"status": "stopping"}));
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "health still {}",
            h.status
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused = call(
        &tcp,
        "POST",
        "/v1/chat/completions",
        &chat_body("y", json!({})),
    );
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(refused.header("retry-after").is_some());
    let mut rest = Vec::new();
    hold.read_to_end(&mut rest).unwrap();
    let all = String::from_utf8_lossy(&rest);
    assert!(
        all.contains("data: [DONE]"),
        "the running answer did not finish: {all}"
    );
    assert_eq!(d.wait(), Some(0), "{}", d.log());
}
