//! What the scheduler's callers send and get back: requests (`Request`,
//! `Input`, `Options`, `Client`), their events (`Event`, `Delta`, `Done`,
//! `Stats`), refusals and failures (`SubmitError`, `Failure`, `ErrorKind`),
//! the figures of `Handle::status` and `Handle::model_info`, the scheduler's
//! `Config` and reloadable `Limits`, and `validate`, the checks a request
//! needs no model for. The edges convert their wire types to and from these.

use crate::chat::ChatMessage;
use crate::constraint::ResponseFormat;
use crate::sampler::SamplingParams;
use crate::sequence::FinishReason;
use crate::stop::StopText;
use crate::tools::{Tool, ToolCall, ToolChoice};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::{Priority, SessionError};
/// Longest session id, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 128;
/// Context used when `--ctx` is not given (capped by the model's own).
pub const DEFAULT_CONTEXT: usize = 8192;

/// How the scheduler runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Sequences in the running batch.
    pub max_concurrent: usize,
    /// Requests that may wait for a slot; more are refused.
    pub queue_capacity: usize,
    /// Requests (running and waiting) one user may have; 0 is no limit.
    pub max_per_user: usize,
    /// Prompt tokens fed per engine step, over all prefilling sequences.
    pub prefill_chunk: usize,
    /// Context limit of every sequence, at most the model's.
    pub n_ctx: usize,
    pub max_sessions: usize,
    /// Idle sessions are dropped after this long.
    pub session_idle: Duration,
    /// `max_tokens` of a request that sets none.
    pub default_max_tokens: usize,
    /// Longest the engine sleeps when idle: its heartbeat
    /// ([`Handle::engine_heartbeat_age`]) is at most this old while it
    /// is healthy and idle.
    pub idle_wakeup: Duration,
    /// Bytes of prompt-prefix states kept ([`prefix`](super::prefix)); 0 is
    /// off.
    pub prefix_cache_bytes: u64,
    /// Whether all users share prefix-cache entries (by default each user
    /// sees only its own, so no one learns another's prompts by timing).
    pub prefix_cache_shared: bool,
}

/// Default size of the prefix cache: 256 MiB holds ~20,000 tokens of
/// LFM2-8B-A1B state (12 KiB of KV a token, 288 KiB of conv windows a
/// snapshot), a dozen long system prompts.
pub const DEFAULT_PREFIX_CACHE: u64 = 256 << 20;

impl Default for Config {
    fn default() -> Self {
        Config {
            max_concurrent: 8,
            queue_capacity: 64,
            max_per_user: 32,
            prefill_chunk: 256,
            n_ctx: DEFAULT_CONTEXT,
            max_sessions: 16,
            session_idle: Duration::from_secs(600),
            default_max_tokens: 256,
            idle_wakeup: Duration::from_secs(1),
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE,
            prefix_cache_shared: false,
        }
    }
}

impl Config {
    pub fn limits(&self) -> Limits {
        Limits {
            max_concurrent: self.max_concurrent,
            queue_capacity: self.queue_capacity,
            max_per_user: self.max_per_user,
            prefill_chunk: self.prefill_chunk,
            default_max_tokens: self.default_max_tokens,
        }
    }
}

/// The part of [`Config`] that can change while serving
/// ([`Handle::set_limits`], on SIGHUP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_concurrent: usize,
    pub queue_capacity: usize,
    pub max_per_user: usize,
    pub prefill_chunk: usize,
    pub default_max_tokens: usize,
}

/// Who is asking: `id` is the unit of fairness (one process), `owner` the
/// scope of its sessions and of the per-user limit (one user). `uid` and
/// `pid` are the peer's credentials on a Unix socket; `edge` the API it
/// came through (a label of the request counts).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Client {
    pub id: String,
    pub owner: String,
    pub uid: Option<u32>,
    pub pid: Option<u32>,
    pub edge: Edge,
}

impl Client {
    /// A peer known by its Unix-socket credentials: one user (`uid:N`), one
    /// process within it (`uid:N/pid:M` when the pid is known).
    pub fn peer(uid: u32, pid: Option<i32>, edge: Edge) -> Client {
        let owner = format!("uid:{uid}");
        let pid = pid.and_then(|p| u32::try_from(p).ok());
        Client {
            id: pid.map_or_else(|| owner.clone(), |p| format!("{owner}/pid:{p}")),
            owner,
            uid: Some(uid),
            pid,
            edge,
        }
    }

    /// A peer without credentials (`kind` "tcp", "unix", "unknown"; `id`
    /// its address if any): all such peers of one kind share one owner, so
    /// one per-user budget.
    pub fn anonymous(kind: &str, id: String, edge: Edge) -> Client {
        Client {
            id,
            owner: kind.into(),
            edge,
            ..Client::default()
        }
    }
}

/// The API a request came through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Edge {
    Grpc,
    Dbus,
    Http,
    /// In-process callers (tests, benchmarks).
    #[default]
    Internal,
}

impl Edge {
    pub fn as_str(self) -> &'static str {
        match self {
            Edge::Grpc => "grpc",
            Edge::Dbus => "dbus",
            Edge::Http => "http",
            Edge::Internal => "internal",
        }
    }
}

/// Sampling and stopping; `None` takes the daemon default.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// The form the output keeps to (constrained decoding).
    pub format: Option<ResponseFormat>,
    /// Tools the model may call (chat requests only), and how.
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
}

/// What to continue.
#[derive(Clone, Debug)]
pub enum Input {
    /// Raw text; BOS as the model says unless `add_bos` is given.
    Prompt { text: String, add_bos: Option<bool> },
    /// A conversation through the chat template. With a session, the
    /// messages are appended to the session's conversation.
    Chat {
        messages: Vec<ChatMessage>,
        session: Option<String>,
    },
}

#[derive(Clone, Debug)]
pub struct Request {
    pub input: Input,
    pub options: Options,
    pub client: Client,
    pub priority: Priority,
    /// The request is failed with [`Failure::DeadlineExceeded`] after this.
    pub deadline: Option<Instant>,
}

/// Why a request was not accepted; every message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A parameter is out of range or the input is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The prompt does not fit in the context.
    #[error("{0}")]
    TooLong(String),
    #[error(
        "the queue is full ({queued} requests wait for {max_concurrent} running ones); retry in about {:.1} s, or start lfmd with a larger --queue",
        retry_after.as_secs_f64()
    )]
    QueueFull {
        queued: usize,
        max_concurrent: usize,
        retry_after: Duration,
    },
    #[error(
        "{owner} already has {held} requests running or waiting, and one user may have at most {limit} (the per-user limit); wait for one to finish, or raise max_per_user in lfmd.toml (or lfmd serve --max-per-user) and reload the daemon"
    )]
    UserLimit {
        owner: String,
        held: usize,
        limit: usize,
    },
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("lfmd is shutting down; retry once it is running again")]
    ShuttingDown,
    #[error("the lfmd engine stopped ({0}); restart the daemon")]
    EngineDown(String),
    /// The daemon failed to set up what the request needs (it keeps
    /// serving others).
    #[error("{0}")]
    Internal(String),
}

impl SubmitError {
    /// The class of refusal, which each edge names its own way (gRPC status
    /// codes, D-Bus error names).
    pub fn kind(&self) -> ErrorKind {
        match self {
            SubmitError::Invalid(_) => ErrorKind::InvalidArgument,
            SubmitError::TooLong(_) => ErrorKind::OutOfRange,
            SubmitError::QueueFull { .. }
            | SubmitError::Session(SessionError::Full(_))
            | SubmitError::UserLimit { .. } => ErrorKind::ResourceExhausted,
            SubmitError::Session(SessionError::Busy(_)) => ErrorKind::FailedPrecondition,
            SubmitError::ShuttingDown | SubmitError::EngineDown(_) => ErrorKind::Unavailable,
            SubmitError::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Classes of refusals and failures, shared by the edges (the names are
/// gRPC's canonical codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
    FailedPrecondition,
    Unavailable,
    DeadlineExceeded,
    Internal,
}

/// Why a running request ended without finishing.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error(
        "the request's deadline passed before it finished; allow more time or ask for fewer tokens"
    )]
    DeadlineExceeded,
    #[error("lfmd is shutting down; the request was stopped")]
    ShuttingDown,
    #[error("the engine failed on this request ({0}); lfmd keeps serving, retry")]
    Internal(String),
}

impl Failure {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Failure::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Failure::ShuttingDown => ErrorKind::Unavailable,
            Failure::Internal(_) => ErrorKind::Internal,
        }
    }
}

/// Text that became printable and the tokens behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Tool calls completed with these tokens.
    pub tool_calls: Vec<ToolCall>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Context tokens before generation (earlier session turns included).
    pub prompt_tokens: usize,
    /// Of those, tokens fed through the model for this request.
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    pub queue: Duration,
    pub time_to_first_token: Duration,
    pub total: Duration,
}

impl Stats {
    /// Tokens after the first per second of decoding.
    pub fn decode_tokens_per_second(&self) -> f64 {
        let t = self.total.saturating_sub(self.time_to_first_token);
        if self.generated_tokens > 1 && !t.is_zero() {
            (self.generated_tokens - 1) as f64 / t.as_secs_f64()
        } else {
            0.0
        }
    }

    pub fn prefill_tokens_per_second(&self) -> f64 {
        let t = self.time_to_first_token.saturating_sub(self.queue);
        if t.is_zero() {
            0.0
        } else {
            self.prefilled_tokens as f64 / t.as_secs_f64()
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Done {
    pub reason: FinishReason,
    pub stats: Stats,
    pub session: Option<String>,
    /// A response format was given and the output ended before it was
    /// complete (it will not parse), or it ended inside a tool call.
    pub output_incomplete: bool,
    /// Every tool call of the answer.
    pub tool_calls: Vec<ToolCall>,
}

/// What a request's receiver gets: deltas, then exactly one `Done` or
/// `Failed`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Delta(Delta),
    Done(Done),
    Failed(Failure),
}

/// A submitted request. Dropping it cancels the request: the engine notices
/// before its next step and frees the slot.
pub struct Generation {
    pub id: u64,
    pub(super) events: mpsc::UnboundedReceiver<Event>,
}

impl Generation {
    /// The next event; `None` after the last one (or if the engine died).
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    pub fn into_receiver(self) -> mpsc::UnboundedReceiver<Event> {
        self.events
    }
}

/// The daemon's model, as clients see it.
#[derive(Clone, Debug, Default)]
pub struct ModelInfo {
    pub path: String,
    pub architecture: String,
    pub name: String,
    pub file_type: String,
    pub file_bytes: u64,
    pub n_params: u64,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_vocab: usize,
    pub n_expert: usize,
    pub n_expert_used: usize,
    pub n_ctx_train: usize,
    pub context: usize,
    pub has_chat_template: bool,
    pub isa: String,
    pub threads: usize,
}

/// A snapshot for `GetStatus`.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub active: usize,
    pub queued: usize,
    pub max_concurrent: usize,
    pub queue_capacity: usize,
    pub sessions: usize,
    pub requests_total: u64,
    pub prompt_tokens_total: u64,
    /// Of the prompt tokens, those fed through the model (the rest came
    /// from the prefix cache or a session's state).
    pub prefilled_tokens_total: u64,
    pub generated_tokens_total: u64,
    /// Over the last [`RATE_WINDOW`].
    pub generated_tokens_per_second: f64,
    pub prefill_tokens_per_second: f64,
    pub uptime: Duration,
    pub memory: Option<crate::procstat::Memory>,
    pub prefix_cache: super::prefix::PrefixStats,
}

/// Requests running and waiting; [`Handle::watch_load`] sees every change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    pub active: usize,
    pub queued: usize,
}

/// Window of the throughput figures in [`Status`].
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The checks of a request that need no model, in the order
/// [`Handle::submit`] makes them first: sampling ranges, `max_tokens`, stop
/// strings, an empty prompt or conversation, a message without a role, the
/// session id's length. Pure, so that the edges' conversions can be fuzzed
/// and tested without a model.
pub fn validate(input: &Input, options: &Options) -> Result<(), SubmitError> {
    let invalid = |msg: String| Err(SubmitError::Invalid(msg));
    if let Err(e) = options.sampling.validate() {
        return invalid(e.to_string());
    }
    if options.max_tokens == Some(0) {
        return invalid("max_tokens must be at least 1 (leave it unset for the default)".into());
    }
    if let Err(e) = StopText::check(&options.stop) {
        return invalid(e.to_string());
    }
    let tools = &options.tools;
    if !tools.is_empty() || options.tool_choice != ToolChoice::Auto {
        if matches!(input, Input::Prompt { .. }) {
            return invalid(
                "tools apply to chat requests: send messages (Chat), not a raw prompt".into(),
            );
        }
        if options.format.is_some() && !tools.is_empty() {
            return invalid(
                "give tools or a response_format, not both (a tool's parameters are its schema)"
                    .into(),
            );
        }
        if let Err(e) = crate::tools::check_tools(tools) {
            return invalid(e.to_string());
        }
        match &options.tool_choice {
            ToolChoice::Required if tools.is_empty() => {
                return invalid("tool_choice \"required\" needs tools".into());
            }
            ToolChoice::Named(n) if !tools.iter().any(|t| &t.name == n) => {
                return invalid(format!(
                    "tool_choice names {n:?}, which is not among the tools; use auto, none, required or a tool's name"
                ));
            }
            _ => {}
        }
    }
    match input {
        Input::Prompt { text, .. } if text.is_empty() => {
            invalid("the prompt is empty: give some text to continue".into())
        }
        Input::Prompt { .. } => Ok(()),
        Input::Chat { messages, session } => {
            if messages.is_empty() {
                return invalid("no messages: send at least one {role, content} message".into());
            }
            if let Some(i) = messages.iter().position(|m| m.role.is_empty()) {
                return invalid(format!(
                    "messages[{i}] has an empty role; use system, user, assistant or tool"
                ));
            }
            match session {
                Some(id) if id.is_empty() || id.len() > MAX_SESSION_ID_BYTES => invalid(format!(
                    "session_id must be 1 to {MAX_SESSION_ID_BYTES} bytes, got {}",
                    id.len()
                )),
                _ => Ok(()),
            }
        }
    }
}
