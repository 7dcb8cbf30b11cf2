//! `lfmctl`: the command-line client of the lfmd daemon, over gRPC (the
//! `lfm.v1` API of `lfm-proto`), or D-Bus with `--dbus` (`ask`, `chat`, `status`, `info`,
//! `stats`). `ask` streams an answer, `chat` holds a
//! conversation on a daemon session, `status`, `info` and `tokenize` query,
//! `load` generates load.
//!
//! Exit codes: 0 ok, 2 usage, 3 daemon unreachable, 4 request rejected,
//! 1 anything else (such as a failed write to stdout).

mod dbus;
mod load;
mod stats;

use clap::{Args, CommandFactory, Parser, Subcommand};
use lfm_proto::client::{Target, connect};
use lfm_proto::v1 as pb;
use lfm_proto::v1::lfm_client::LfmClient;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Talk to a running lfmd daemon.
#[derive(Parser)]
#[command(name = "lfmctl", version, about)]
struct Cli {
    /// The daemon's socket: unix:PATH, tcp:HOST:PORT or a path. Default: the
    /// user daemon's $XDG_RUNTIME_DIR/lfmd/lfmd.sock if present, else the
    /// system daemon's /run/lfmd/lfmd.sock.
    #[arg(long, global = true, env = "LFMD_SOCKET")]
    socket: Option<String>,
    /// Talk over D-Bus instead of gRPC: --dbus (the session bus),
    /// --dbus=system, or --dbus=ADDRESS (unix:path=/run/x/bus). For ask,
    /// chat, status, info and stats, which also take it after their name.
    #[arg(
        long,
        value_name = "BUS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "session"
    )]
    dbus: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ask one question; the answer streams to stdout.
    Ask(AskArgs),
    /// An interactive conversation, one line per turn, kept on the daemon.
    Chat(ChatArgs),
    /// The daemon's load, throughput and memory.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        transport: Transport,
    },
    /// The expert pager: memory budget, experts in memory, loads and
    /// evictions; --experts adds a per-layer heat map of expert use.
    Stats {
        /// One row per MoE layer: hits per expert and which are in memory.
        #[arg(long)]
        experts: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        transport: Transport,
    },
    /// The model the daemon serves.
    Info {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        transport: Transport,
    },
    /// Load generator: N concurrent clients, random cancels and
    /// disconnects; reports outcomes, time to first token, RSS over time.
    Load(load::LoadArgs),
    /// Token ids of TEXT as a JSON array.
    Tokenize {
        /// Do not add the BOS token.
        #[arg(long)]
        no_bos: bool,
        /// Treat special-token text like `<|im_start|>` as plain text.
        #[arg(long)]
        no_special: bool,
        text: String,
    },
    /// Write man pages (lfmctl.1 and one per subcommand) into DIR; used by
    /// packaging/build-deb.sh.
    #[command(hide = true)]
    Man {
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

/// The transport flag of the commands that work over D-Bus too.
#[derive(Args, Clone, Default)]
struct Transport {
    /// Talk over D-Bus instead of gRPC: --dbus (the session bus),
    /// --dbus=system, or --dbus=ADDRESS (unix:path=/run/x/bus).
    #[arg(
        long,
        env = "LFMD_DBUS",
        value_name = "BUS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "session"
    )]
    dbus: Option<String>,
}

/// Sampling flags: unset ones take the daemon's defaults.
#[derive(Args, Clone, Default)]
struct Sampling {
    /// Default 0.3; 0 is greedy.
    #[arg(long)]
    temperature: Option<f32>,
    /// Default 0 (off).
    #[arg(long)]
    top_k: Option<u32>,
    /// Default 1.0 (off).
    #[arg(long)]
    top_p: Option<f32>,
    /// Default 0.15.
    #[arg(long)]
    min_p: Option<f32>,
    /// Default 1.05.
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// Default 0; negative values encourage repetition.
    #[arg(long, allow_negative_numbers = true)]
    presence_penalty: Option<f32>,
    /// Default 0.
    #[arg(long, allow_negative_numbers = true)]
    frequency_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Default: the daemon's (256 unless configured).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// interactive or background.
    #[arg(long, default_value = "interactive")]
    priority: String,
    /// Give up (and cancel on the daemon) after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// The answer is JSON valid against the JSON Schema in FILE ("-": stdin
    /// is not allowed here; give a path).
    #[arg(long, value_name = "FILE", group = "format")]
    json_schema: Option<std::path::PathBuf>,
    /// The answer is a JSON object.
    #[arg(long, group = "format")]
    json_object: bool,
    /// The answer matches this regular expression.
    #[arg(long, value_name = "REGEX", group = "format")]
    regex: Option<String>,
    /// The answer follows the Lark grammar in FILE (llguidance's dialect).
    #[arg(long, value_name = "FILE", group = "format")]
    grammar: Option<std::path::PathBuf>,
}

impl Sampling {
    /// The response format the flags ask for, files read.
    fn format(&self) -> Result<Option<pb::response_format::Format>> {
        use pb::response_format::Format as F;
        let read = |flag: &str, p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| Failure::Usage(format!("{flag} {}: {e}", p.display())))
        };
        Ok(if let Some(p) = &self.json_schema {
            Some(F::JsonSchema(read("--json-schema", p)?))
        } else if let Some(p) = &self.grammar {
            Some(F::Lark(read("--grammar", p)?))
        } else if let Some(r) = &self.regex {
            Some(F::Regex(r.clone()))
        } else if self.json_object {
            Some(F::JsonObject(true))
        } else {
            None
        })
    }
}

#[derive(Args)]
struct AskArgs {
    #[command(flatten)]
    sampling: Sampling,
    #[command(flatten)]
    transport: Transport,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Continue the prompt as raw text instead of a chat turn.
    #[arg(long, conflicts_with = "system")]
    raw: bool,
    /// Print one JSON object at the end (text, token ids, finish reason, stats).
    #[arg(long)]
    json: bool,
    /// Tools the model may call: a JSON array of {"name", "description",
    /// "parameters"} (or OpenAI's {"type": "function", "function": {...}})
    /// in FILE. Calls are printed as JSON, one per line (in --json:
    /// "tool_calls").
    #[arg(long, value_name = "FILE", conflicts_with = "raw")]
    tools: Option<std::path::PathBuf>,
    /// auto, none, required, or a tool's name.
    #[arg(long, value_name = "CHOICE", requires = "tools")]
    tool_choice: Option<String>,
    /// The question (default: read from stdin; "-" also reads stdin).
    prompt: Vec<String>,
}

impl AskArgs {
    /// The `--tools` file's tools, as gRPC's `Tool`s.
    fn tools(&self) -> Result<Vec<pb::Tool>> {
        let Some(p) = &self.tools else {
            return Ok(Vec::new());
        };
        let bad = |why: String| Failure::Usage(format!("--tools {}: {why}", p.display()));
        let text = std::fs::read_to_string(p).map_err(|e| bad(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let list = v
            .as_array()
            .ok_or_else(|| bad("not a JSON array of tools".into()))?;
        list.iter()
            .enumerate()
            .map(|(i, t)| {
                let t = t.get("function").unwrap_or(t);
                let name = t.get("name").and_then(|n| n.as_str());
                Ok(pb::Tool {
                    name: name
                        .ok_or_else(|| bad(format!("tool {i} has no \"name\"")))?
                        .into(),
                    description: t
                        .get("description")
                        .and_then(|d| d.as_str())
                        .unwrap_or_default()
                        .into(),
                    parameters: t
                        .get("parameters")
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    /// The `--tools` file as the D-Bus `tools` option (its JSON text).
    fn tools_text(&self) -> Result<Option<String>> {
        self.tools
            .as_ref()
            .map(|p| {
                std::fs::read_to_string(p)
                    .map_err(|e| Failure::Usage(format!("--tools {}: {e}", p.display())))
            })
            .transpose()
    }
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    sampling: Sampling,
    #[command(flatten)]
    transport: Transport,
    #[arg(long)]
    system: Option<String>,
    /// Continue (or name) a daemon session; default: a new one.
    #[arg(long)]
    session: Option<String>,
}

/// How a command failed, which decides the exit code.
enum Failure {
    Usage(String),
    Unreachable(String),
    Rejected(Status),
    /// Refused over D-Bus: the daemon's message and error name.
    Refused(String),
    Other(String),
}

impl Failure {
    fn exit(self) -> ExitCode {
        let (code, msg) = match self {
            Failure::Usage(m) => (2, m),
            Failure::Unreachable(m) => (3, m),
            Failure::Rejected(s) => (
                4,
                format!("the daemon refused: {} ({:?})", s.message(), s.code()),
            ),
            Failure::Refused(m) => (4, format!("the daemon refused: {m}")),
            Failure::Other(m) => (1, m),
        };
        eprintln!("lfmctl: {msg}");
        ExitCode::from(code)
    }
}

type Result<T> = std::result::Result<T, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Failure::Other(format!("starting the runtime: {e}")).exit(),
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => f.exit(),
    }
}

/// The socket to use when none is given: the user daemon's if it exists,
/// else the system daemon's if it exists, else the one the user would start.
fn default_target() -> Target {
    let user = lfm_proto::socket::user_socket(|k| std::env::var(k).ok());
    let system = std::path::PathBuf::from(lfm_proto::socket::SYSTEM_SOCKET);
    match user {
        Some(u) if u.exists() || !system.exists() => Target::Unix(u),
        _ => Target::Unix(system),
    }
}

async fn client(cli: &Cli) -> Result<(LfmClient<Channel>, Target)> {
    if cli.bus().is_some() {
        return Err(Failure::Usage(
            "--dbus works with ask, chat, status, info and stats; drop it (and unset LFMD_DBUS) to use gRPC".into(),
        ));
    }
    let target = match &cli.socket {
        Some(s) if !s.is_empty() => Target::parse(s),
        _ => default_target(),
    };
    match connect(&target).await {
        Ok(c) => Ok((c.max_decoding_message_size(64 << 20), target)),
        Err(e) => {
            let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
            let listen = match &target {
                Target::Unix(p) => format!("unix:{}", p.display()),
                Target::Tcp(a) => format!("tcp:{a}"),
            };
            Err(Failure::Unreachable(format!(
                "no lfmd answers on {target} ({why}). Start one with:\n  lfmd serve --model FILE.gguf --grpc {listen}\n(scripts/quickstart.sh builds lfmd and makes a small test model), or point --socket / LFMD_SOCKET at a running daemon"
            )))
        }
    }
}

/// A failed RPC: the daemon vanished (3) or refused the request (4).
fn rpc_failure(s: Status) -> Failure {
    // The daemon's own UNAVAILABLE answers (shutting down) name it; others
    // come from the transport.
    if s.code() == Code::Unavailable && !s.message().starts_with("lfmd") {
        Failure::Unreachable(format!("lost the daemon: {}", s.message()))
    } else {
        Failure::Rejected(s)
    }
}

fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::Other(format!("writing to stdout: {e}")))
        }
        _ => Ok(()),
    }
}

fn options(s: &Sampling) -> Result<(pb::SamplingOptions, pb::Priority)> {
    let priority = match s.priority.as_str() {
        "interactive" => pb::Priority::Interactive,
        "background" => pb::Priority::Background,
        other => {
            return Err(Failure::Usage(format!(
                "--priority {other:?}: use interactive or background"
            )));
        }
    };
    Ok((
        pb::SamplingOptions {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            seed: s.seed,
            max_tokens: s.max_tokens,
            stop: s.stop.clone(),
            ignore_eos: s.ignore_eos.then_some(true),
            response_format: s.format()?.map(|f| pb::ResponseFormat { format: Some(f) }),
        },
        priority,
    ))
}

fn with_timeout<T>(msg: T, s: &Sampling) -> Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = s.timeout {
        if !(t.is_finite() && t > 0.0) {
            return Err(Failure::Usage(format!(
                "--timeout {t}: give a positive number of seconds"
            )));
        }
        req.set_timeout(Duration::from_secs_f64(t));
    }
    Ok(req)
}

/// What a streamed answer came to.
#[derive(Default)]
struct Answer {
    text: String,
    token_ids: Vec<u32>,
    done: Option<pb::Done>,
}

/// Text for a terminal: control characters other than newline and tab (a
/// model's output could hold escape sequences that drive the terminal)
/// become U+FFFD. Pipes and files get the text as generated.
fn for_terminal(text: &str, tty: bool) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| c.is_control() && c != '\n' && c != '\t';
    if tty && text.contains(bad) {
        text.chars()
            .map(|c| if bad(c) { '\u{fffd}' } else { c })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// Reads a response stream, echoing text as it arrives when `echo`.
async fn read_answer(
    mut stream: tonic::Streaming<pb::GenerateResponse>,
    echo: bool,
) -> Result<Answer> {
    let mut a = Answer::default();
    let tty = std::io::stdout().is_terminal();
    while let Some(msg) = stream.message().await.map_err(rpc_failure)? {
        match msg.event {
            Some(pb::generate_response::Event::Delta(d)) => {
                if echo {
                    out(&for_terminal(&d.text, tty))?;
                }
                a.text.push_str(&d.text);
                a.token_ids.extend(d.token_ids);
            }
            Some(pb::generate_response::Event::Done(d)) => a.done = Some(d),
            None => {}
        }
    }
    Ok(a)
}

fn answer_json(a: &Answer) -> serde_json::Value {
    let done = a.done.clone().unwrap_or_default();
    let reason = pb::FinishReason::try_from(done.finish_reason)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("FINISH_REASON_")
                .to_lowercase()
        })
        .unwrap_or_default();
    let s = done.stats.unwrap_or_default();
    serde_json::json!({
        "text": a.text,
        "token_ids": a.token_ids,
        "finish_reason": reason,
        "output_incomplete": done.output_incomplete,
        "tool_calls": done.tool_calls.iter().map(call_json).collect::<Vec<_>>(),
        "session_id": done.session_id,
        "stats": {
            "prompt_tokens": s.prompt_tokens,
            "prefilled_tokens": s.prefilled_tokens,
            "generated_tokens": s.generated_tokens,
            "queue_seconds": s.queue_seconds,
            "time_to_first_token_seconds": s.time_to_first_token_seconds,
            "total_seconds": s.total_seconds,
            "decode_tokens_per_second": s.decode_tokens_per_second,
            "prefill_tokens_per_second": s.prefill_tokens_per_second,
        },
    })
}

fn read_prompt(words: &[String]) -> Result<String> {
    let prompt = if words.is_empty() || words == ["-"] {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::Usage(format!("reading the prompt from stdin: {e}")))?;
        s.trim_end_matches('\n').to_owned()
    } else {
        words.join(" ")
    };
    if prompt.trim().is_empty() {
        return Err(Failure::Usage(
            "the prompt is empty: give it as arguments or on stdin".into(),
        ));
    }
    Ok(prompt)
}

impl Cli {
    /// The bus of `--dbus` / `LFMD_DBUS` (empty means unset): the
    /// command's own flag, else the one before the command's name.
    fn bus(&self) -> Option<&str> {
        let own = match &self.cmd {
            Cmd::Ask(a) => &a.transport,
            Cmd::Chat(a) => &a.transport,
            Cmd::Status { transport, .. }
            | Cmd::Stats { transport, .. }
            | Cmd::Info { transport, .. } => transport,
            Cmd::Load(_) | Cmd::Tokenize { .. } | Cmd::Man { .. } => &Transport { dbus: None },
        };
        own.dbus
            .as_deref()
            .or(self.dbus.as_deref())
            .filter(|b| !b.is_empty())
    }
}

async fn ask(cli: &Cli, a: &AskArgs) -> Result<()> {
    if let Some(bus) = cli.bus() {
        let bus = dbus::parse_bus(bus)?;
        let prompt = read_prompt(&a.prompt)?;
        return dbus::ask(&bus, a, prompt).await;
    }
    let (opts, priority) = options(&a.sampling)?;
    let prompt = read_prompt(&a.prompt)?;
    let (mut c, _) = client(cli).await?;
    let stream = if a.raw {
        let req = pb::GenerateRequest {
            prompt,
            options: Some(opts),
            priority: priority.into(),
            add_bos: None,
        };
        c.generate(with_timeout(req, &a.sampling)?).await
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(pb::ChatMessage {
                role: "system".into(),
                content: s.clone(),
                ..Default::default()
            });
        }
        messages.push(pb::ChatMessage {
            role: "user".into(),
            content: prompt,
            ..Default::default()
        });
        let req = pb::ChatRequest {
            messages,
            options: Some(opts),
            priority: priority.into(),
            session_id: None,
            tools: a.tools()?,
            tool_choice: a.tool_choice.clone(),
        };
        c.chat(with_timeout(req, &a.sampling)?).await
    }
    .map_err(rpc_failure)?
    .into_inner();
    let answer = read_answer(stream, !a.json).await?;
    if a.json {
        out(&format!("{:#}\n", answer_json(&answer)))?;
    } else {
        out("\n")?;
        // Each tool call on its own line, as JSON.
        for c in answer.done.iter().flat_map(|d| &d.tool_calls) {
            out(&format!("{}\n", call_json(c)))?;
        }
    }
    Ok(())
}

/// A tool call as lfmctl prints it: `{"id", "name", "arguments"}`.
fn call_json(c: &pb::ToolCall) -> serde_json::Value {
    let arguments: serde_json::Value = serde_json::from_str(&c.arguments)
        .unwrap_or(serde_json::Value::String(c.arguments.clone()));
    serde_json::json!({"id": c.id, "name": c.name, "arguments": arguments})
}

/// Where `chat` sends its turns.
enum ChatLink {
    Grpc(LfmClient<Channel>, Box<pb::SamplingOptions>, pb::Priority),
    Dbus(dbus::ChatOverDbus),
}

async fn chat(cli: &Cli, a: &ChatArgs) -> Result<()> {
    let session = a.session.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!("lfmctl-{}-{}", std::process::id(), t.as_nanos())
    });
    let mut link = match cli.bus() {
        Some(bus) => ChatLink::Dbus(
            dbus::ChatOverDbus::new(&dbus::parse_bus(bus)?, &a.sampling, &session).await?,
        ),
        None => {
            let (opts, priority) = options(&a.sampling)?;
            let (c, _) = client(cli).await?;
            ChatLink::Grpc(c, Box::new(opts), priority)
        }
    };
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("session {session}; an empty line or /exit ends it");
    }
    let mut system = a.system.clone();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| Failure::Other(format!("reading stdin: {e}")))?;
        let line = line.trim_end();
        if line == "/exit" || line == "/quit" || (interactive && line.is_empty()) {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let mut messages = Vec::new();
        if let Some(s) = system.take() {
            messages.push(("system".to_owned(), s));
        }
        messages.push(("user".to_owned(), line.to_owned()));
        let result = match &mut link {
            ChatLink::Dbus(d) => d.turn(&messages).await,
            ChatLink::Grpc(c, opts, priority) => {
                let req = pb::ChatRequest {
                    messages: messages
                        .into_iter()
                        .map(|(role, content)| pb::ChatMessage {
                            role,
                            content,
                            ..Default::default()
                        })
                        .collect(),
                    options: Some((**opts).clone()),
                    priority: (*priority).into(),
                    session_id: Some(session.clone()),
                    ..Default::default()
                };
                match c.chat(with_timeout(req, &a.sampling)?).await {
                    Ok(r) => read_answer(r.into_inner(), true).await.map(|_| ()),
                    Err(s) => Err(rpc_failure(s)),
                }
            }
        };
        out("\n")?;
        match result {
            Ok(()) => {}
            // A person at the keyboard can rephrase; a script gets the exit code.
            Err(Failure::Rejected(s)) if interactive => {
                eprintln!("lfmctl: the daemon refused: {}", s.message());
            }
            Err(f) => return Err(f),
        }
    }
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::Ask(a) => ask(&cli, a).await,
        Cmd::Chat(a) => chat(&cli, a).await,
        Cmd::Load(a) => load::run(&cli, a).await,
        Cmd::Man { out } => std::fs::create_dir_all(out)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), out))
            .map_err(|e| Failure::Other(format!("writing man pages to {}: {e}", out.display()))),
        Cmd::Status { json, .. } => {
            let (s, target) = match cli.bus() {
                Some(bus) => {
                    let bus = dbus::parse_bus(bus)?;
                    (dbus::status(&bus).await?, bus.to_string())
                }
                None => {
                    let (mut c, target) = client(&cli).await?;
                    let s = c
                        .get_status(pb::GetStatusRequest::default())
                        .await
                        .map_err(rpc_failure)?
                        .into_inner();
                    (s, target.to_string())
                }
            };
            if *json {
                out(&format!(
                    "{:#}\n",
                    serde_json::json!({
                        "socket": target,
                        "version": s.version,
                        "active_requests": s.active_requests,
                        "queued_requests": s.queued_requests,
                        "max_concurrent": s.max_concurrent,
                        "queue_capacity": s.queue_capacity,
                        "sessions": s.sessions,
                        "requests_total": s.requests_total,
                        "prompt_tokens_total": s.prompt_tokens_total,
                        "generated_tokens_total": s.generated_tokens_total,
                        "generated_tokens_per_second": s.generated_tokens_per_second,
                        "prefill_tokens_per_second": s.prefill_tokens_per_second,
                        "isa": s.isa,
                        "threads": s.threads,
                        "uptime_seconds": s.uptime_seconds,
                        "rss_bytes": s.rss_bytes,
                        "rss_anon_bytes": s.rss_anon_bytes,
                        "rss_file_bytes": s.rss_file_bytes,
                        "peak_rss_bytes": s.peak_rss_bytes,
                        "paging": s.paging.as_ref().map(|p| stats::to_json(p, false)),
                        "prefix_cache": s.prefix_cache.as_ref().map(|c| serde_json::json!({
                            "entries": c.entries,
                            "bytes": c.bytes,
                            "limit_bytes": c.limit_bytes,
                            "hits": c.hits,
                            "misses": c.misses,
                            "tokens_saved": c.tokens_saved,
                        })),
                    })
                ))
            } else {
                let paging = s.paging.as_ref().map_or_else(String::new, |p| {
                    format!(
                        "experts: {} of {} in memory (budget {}), {} loads, {} evictions; lfmctl stats --experts for more\n",
                        gib(p.expert_resident_bytes),
                        gib(p.expert_total_bytes),
                        p.budget_mode,
                        p.loads,
                        p.evictions
                    )
                });
                let prefix = match &s.prefix_cache {
                    Some(c) if c.limit_bytes > 0 || c.entries > 0 => format!(
                        "prefix cache: {} entries, {} of {}, {} hits, {} misses, {} prompt tokens not prefilled\n",
                        c.entries,
                        gib(c.bytes),
                        gib(c.limit_bytes),
                        c.hits,
                        c.misses,
                        c.tokens_saved
                    ),
                    Some(_) => "prefix cache: off\n".into(),
                    None => String::new(),
                };
                out(&format!(
                    "lfmd {} on {target}, up {:.0} s\nrequests: {} running (max {}), {} queued (max {}), {} sessions, {} served\nthroughput (10 s): {:.1} generated tok/s, {:.1} prefill tok/s\ntokens: {} prompt, {} generated\ncompute: {}, {} threads\nmemory: {} resident ({} anonymous, {} model file pages), peak {}\n{prefix}{paging}",
                    s.version,
                    s.uptime_seconds,
                    s.active_requests,
                    s.max_concurrent,
                    s.queued_requests,
                    s.queue_capacity,
                    s.sessions,
                    s.requests_total,
                    s.generated_tokens_per_second,
                    s.prefill_tokens_per_second,
                    s.prompt_tokens_total,
                    s.generated_tokens_total,
                    s.isa,
                    s.threads,
                    gib(s.rss_bytes),
                    gib(s.rss_anon_bytes),
                    gib(s.rss_file_bytes),
                    gib(s.peak_rss_bytes),
                ))
            }
        }
        Cmd::Stats { experts, json, .. } => {
            let paging = match cli.bus() {
                Some(bus) => dbus::paging(&dbus::parse_bus(bus)?, *experts).await?,
                None => {
                    let (mut c, _) = client(&cli).await?;
                    c.get_status(pb::GetStatusRequest { experts: *experts })
                        .await
                        .map_err(rpc_failure)?
                        .into_inner()
                        .paging
                }
            };
            match (paging, *json) {
                (Some(p), true) => out(&format!("{:#}\n", stats::to_json(&p, *experts))),
                (None, true) => out("{\"paging\": null}\n"),
                (Some(p), false) => {
                    let mut text = stats::summary(&p);
                    if *experts {
                        let colour = std::io::stdout().is_terminal()
                            && std::env::var_os("NO_COLOR").is_none();
                        text.push('\n');
                        text.push_str(&stats::heat_map(&p, colour));
                    }
                    out(&text)
                }
                (None, false) => out(
                    "no expert paging: the model is dense, or was read into memory instead of mapped\n",
                ),
            }
        }
        Cmd::Info { json, .. } => {
            let m = match cli.bus() {
                Some(bus) => dbus::model_info(&dbus::parse_bus(bus)?).await?,
                None => {
                    let (mut c, _) = client(&cli).await?;
                    c.get_model_info(pb::GetModelInfoRequest {})
                        .await
                        .map_err(rpc_failure)?
                        .into_inner()
                }
            };
            if *json {
                out(&format!(
                    "{:#}\n",
                    serde_json::json!({
                        "path": m.path,
                        "architecture": m.architecture,
                        "name": m.name,
                        "file_type": m.file_type,
                        "file_bytes": m.file_bytes,
                        "n_params": m.n_params,
                        "n_layer": m.n_layer,
                        "n_embd": m.n_embd,
                        "n_vocab": m.n_vocab,
                        "n_expert": m.n_expert,
                        "n_expert_used": m.n_expert_used,
                        "n_ctx_train": m.n_ctx_train,
                        "context_tokens": m.context_tokens,
                        "has_chat_template": m.has_chat_template,
                        "isa": m.isa,
                        "threads": m.threads,
                    })
                ))
            } else {
                out(&format!(
                    "model: {}\n  {} {} ({}), {:.2} B params, {}\n  {} layers, embd {}, vocab {}, experts {} (top {})\n  context {} (trained {}), chat template: {}\ncompute: {}, {} threads\n",
                    m.path,
                    m.architecture,
                    m.name,
                    m.file_type,
                    m.n_params as f64 / 1e9,
                    gib(m.file_bytes),
                    m.n_layer,
                    m.n_embd,
                    m.n_vocab,
                    m.n_expert,
                    m.n_expert_used,
                    m.context_tokens,
                    m.n_ctx_train,
                    if m.has_chat_template {
                        "from the model"
                    } else {
                        "built-in LFM2"
                    },
                    m.isa,
                    m.threads,
                ))
            }
        }
        Cmd::Tokenize {
            no_bos,
            no_special,
            text,
        } => {
            let (mut c, _) = client(&cli).await?;
            let r = c
                .tokenize(pb::TokenizeRequest {
                    text: text.clone(),
                    add_bos: no_bos.then_some(false),
                    parse_special: Some(!no_special),
                })
                .await
                .map_err(rpc_failure)?
                .into_inner();
            out(&format!("{}\n", serde_json::json!(r.token_ids)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminals_get_no_control_sequences_pipes_get_everything() {
        let t = "a\u{1b}[2Jb\n\tc\u{7}";
        assert_eq!(for_terminal(t, true), "a\u{fffd}[2Jb\n\tc\u{fffd}");
        assert_eq!(for_terminal(t, false), t);
        assert!(matches!(
            for_terminal("plain\n", true),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
