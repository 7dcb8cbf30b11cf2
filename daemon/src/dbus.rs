//! The D-Bus edge: `org.lfm.Daemon1` at `/org/lfm/Daemon1` over the
//! scheduler, on the session or system bus or any bus address. Like
//! `grpc.rs` it only converts (an `a{sv}` of options to scheduler types,
//! events to replies and signals, errors to D-Bus error names); the only
//! module that knows zbus types.
//!
//! `Generate` blocks until the answer is complete. `Ask` returns a request
//! object that streams `Token` signals, then `Finished`, unicast to the
//! caller, starting only once the method return is on its way (so the
//! caller sees its path first). A caller that leaves the bus has all its
//! requests cancelled: dropping a request's event receiver frees its slot
//! before the engine's next step.

use crate::sampler::SamplingParams;
use crate::scheduler::{
    self, Client, Done, Edge, ErrorKind, Event, Failure, Handle, Input, Load, Options, Priority,
    SubmitError,
};
use lfm_proto::dbus::{BUS_NAME, Bus, OBJECT_PATH, REQUESTS_PATH};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use zbus::fdo::{DBusProxy, RequestNameFlags, RequestNameReply};
use zbus::message::Header;
use zbus::names::{BusName, UniqueName};
use zbus::object_server::{ResponseDispatchNotifier, SignalEmitter};
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, ObjectServer, interface};

/// Errors of the D-Bus API, named `org.lfm.Daemon1.Error.<Variant>`; the
/// classes are gRPC's, and every message says what to change.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.lfm.Daemon1.Error")]
pub enum ApiError {
    #[zbus(error)]
    ZBus(zbus::Error),
    InvalidArgument(String),
    OutOfRange(String),
    ResourceExhausted(String),
    FailedPrecondition(String),
    Unavailable(String),
    DeadlineExceeded(String),
    Internal(String),
    AccessDenied(String),
    Cancelled(String),
}

impl ApiError {
    fn of(kind: ErrorKind, msg: String) -> ApiError {
        match kind {
            ErrorKind::InvalidArgument => ApiError::InvalidArgument(msg),
            ErrorKind::OutOfRange => ApiError::OutOfRange(msg),
            ErrorKind::ResourceExhausted => ApiError::ResourceExhausted(msg),
            ErrorKind::FailedPrecondition => ApiError::FailedPrecondition(msg),
            ErrorKind::Unavailable => ApiError::Unavailable(msg),
            ErrorKind::DeadlineExceeded => ApiError::DeadlineExceeded(msg),
            ErrorKind::Internal => ApiError::Internal(msg),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        ApiError::of(e.kind(), e.to_string())
    }
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> ApiError {
        ApiError::of(f.kind(), f.to_string())
    }
}

fn engine_gone() -> ApiError {
    ApiError::Internal(
        "the lfmd engine stopped before finishing this request; see the daemon's log".into(),
    )
}

/// Why `lfmd serve --dbus` could not start.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    #[error("connecting to {bus}: {source}")]
    Connect { bus: String, source: zbus::Error },
    #[error(
        "another process owns {BUS_NAME} on {0}: stop the other lfmd, or serve on another bus with --dbus"
    )]
    NameTaken(String),
    #[error("D-Bus on {bus}: {source}")]
    Bus { bus: String, source: zbus::Error },
}

/// What an option's value may be. Numbers take whatever D-Bus number type
/// the caller's binding picked (a bare `6` is `i` in GVariant text, GJS,
/// Qt and most Python bindings), checked against the option's range;
/// strings and booleans are strict.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// An integer from 0 to the bound, of any integer type (`y n q i u x t`).
    Uint(u64),
    /// A double (`d`), or any integer type.
    Float,
    Bool,
    Str,
    Strs,
}

/// The options `Generate`, `Ask`, `Chat` and `AskChat` take.
const OPTIONS: &[(&str, Kind)] = &[
    ("max_tokens", Kind::Uint(u32::MAX as u64)),
    ("temperature", Kind::Float),
    ("top_k", Kind::Uint(u32::MAX as u64)),
    ("top_p", Kind::Float),
    ("min_p", Kind::Float),
    ("repeat_penalty", Kind::Float),
    ("presence_penalty", Kind::Float),
    ("frequency_penalty", Kind::Float),
    ("seed", Kind::Uint(u64::MAX)),
    ("stop", Kind::Strs),
    ("ignore_eos", Kind::Bool),
    ("priority", Kind::Str),
    ("system", Kind::Str),
    ("raw", Kind::Bool),
    ("add_bos", Kind::Bool),
    ("session", Kind::Str),
    ("timeout", Kind::Float),
    ("json_schema", Kind::Str),
    ("json_object", Kind::Bool),
    ("regex", Kind::Str),
    ("grammar", Kind::Str),
    ("tools", Kind::Str),
    ("tool_choice", Kind::Str),
];

/// An option's value, checked against its kind.
#[derive(Debug)]
enum OptValue {
    Uint(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
}

/// The integer a D-Bus integer value holds.
fn integer(v: &Value<'_>) -> Option<i128> {
    Some(match v {
        Value::U8(n) => i128::from(*n),
        Value::I16(n) => i128::from(*n),
        Value::U16(n) => i128::from(*n),
        Value::I32(n) => i128::from(*n),
        Value::U32(n) => i128::from(*n),
        Value::I64(n) => i128::from(*n),
        Value::U64(n) => i128::from(*n),
        _ => return None,
    })
}

/// Checks option `key`'s value `v` against `kind`. A variant inside the
/// variant (`<<6>>`) is looked through.
fn option_value(key: &str, kind: Kind, v: &Value<'_>) -> Result<OptValue, ApiError> {
    if let Value::Value(inner) = v {
        return option_value(key, kind, inner);
    }
    let sig = v.value_signature().to_string();
    let bad = |m: String| Err(ApiError::InvalidArgument(m));
    match kind {
        Kind::Uint(max) => match integer(v) {
            Some(n) if n >= 0 && n <= i128::from(max) => Ok(OptValue::Uint(n as u64)),
            Some(n) => bad(format!("option {key:?} is {n}; it must be from 0 to {max}")),
            None => bad(format!(
                "option {key:?} must be an integer from 0 to {max} (D-Bus types y n q i u x t), not '{sig}'"
            )),
        },
        Kind::Float => match (v, integer(v)) {
            (Value::F64(x), _) => Ok(OptValue::Float(*x)),
            (_, Some(n)) => Ok(OptValue::Float(n as f64)),
            _ => bad(format!(
                "option {key:?} must be a number (D-Bus type 'd', or an integer type), not '{sig}'"
            )),
        },
        Kind::Bool => match v {
            Value::Bool(b) => Ok(OptValue::Bool(*b)),
            _ => bad(format!(
                "option {key:?} must be a boolean (D-Bus type 'b'), not '{sig}'"
            )),
        },
        Kind::Str => match v {
            Value::Str(s) => Ok(OptValue::Str(s.as_str().to_owned())),
            _ => bad(format!(
                "option {key:?} must be a string (D-Bus type 's'), not '{sig}'"
            )),
        },
        Kind::Strs => match v {
            Value::Array(a) if sig == "as" => Ok(OptValue::Strs(
                a.inner()
                    .iter()
                    .filter_map(|s| match s {
                        Value::Str(s) => Some(s.as_str().to_owned()),
                        _ => None,
                    })
                    .collect(),
            )),
            _ => bad(format!(
                "option {key:?} must be an array of strings (D-Bus type 'as'), not '{sig}'"
            )),
        },
    }
}

/// A request as the scheduler takes it, less the client.
#[derive(Debug)]
struct Parsed {
    input: Input,
    options: Options,
    priority: Priority,
    deadline: Option<Instant>,
}

/// What a request asks: a prompt (`Generate`, `Ask`) or a conversation
/// (`Chat`, `AskChat`).
#[derive(Debug)]
enum Asking {
    Prompt(String),
    Messages(Vec<crate::chat::ChatMessage>),
}

/// Tool calls as `info`'s `tool_calls` gives them (a JSON array of
/// `{"id", "name", "arguments"}`, arguments an object; OpenAI's shape too),
/// or `None`.
fn calls_of(text: &str) -> Option<Vec<crate::tools::ToolCall>> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.as_array()?
        .iter()
        .map(|c| crate::tools::call_from_json(c).ok())
        .collect()
}

/// The `tools` option: a JSON array of `{"name", "description",
/// "parameters"}` (or OpenAI's `{"type": "function", "function": {...}}`).
fn tools_of(text: &str) -> Result<Vec<crate::tools::Tool>, ApiError> {
    let bad = |why: String| {
        ApiError::InvalidArgument(format!(
            "option \"tools\" {why}; give a JSON array of {{\"name\": s, \"description\": s, \"parameters\": JSON Schema}}"
        ))
    };
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("is not JSON ({e})")))?;
    let list = v.as_array().ok_or_else(|| bad("is not an array".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| crate::tools::tool_from_json(t).map_err(|why| bad(format!("item {i} {why}"))))
        .collect()
}

/// The JSON of tool calls for `info`'s `tool_calls`.
fn calls_json(calls: &[crate::tools::ToolCall]) -> String {
    serde_json::Value::Array(
        calls
            .iter()
            .map(|c| serde_json::json!({"id": c.id, "name": c.name, "arguments": c.arguments}))
            .collect(),
    )
    .to_string()
}

/// `Chat`'s `aa{sv}` messages: each `role` and `content`, strings (and an
/// assistant's `tool_calls`, a tool's `tool_call_id`).
fn messages_of(
    messages: Vec<HashMap<String, OwnedValue>>,
) -> Result<Vec<crate::chat::ChatMessage>, ApiError> {
    let bad = |m: String| ApiError::InvalidArgument(m);
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |k: &str| -> Result<String, ApiError> {
                match m.get(k).map(|v| option_value(k, Kind::Str, v)) {
                    Some(Ok(OptValue::Str(s))) => Ok(s),
                    Some(Err(ApiError::InvalidArgument(e))) => Err(bad(format!("message {i}: {e}"))),
                    _ => Err(bad(format!(
                        "message {i} has no {k:?}: each message is {{\"role\": <s>, \"content\": <s>}}"
                    ))),
                }
            };
            let (role, content) = (field("role")?, field("content")?);
            let mut message = crate::chat::ChatMessage::new(role, content);
            if let Some(k) = m
                .keys()
                .find(|k| !matches!(k.as_str(), "role" | "content" | "tool_calls" | "tool_call_id"))
            {
                return Err(bad(format!(
                    "message {i} has an unknown key {k:?}; a message has \"role\" and \"content\" (and \"tool_calls\", \"tool_call_id\": s)"
                )));
            }
            if m.contains_key("tool_call_id") {
                field("tool_call_id")?;
            }
            if m.contains_key("tool_calls") {
                let text = field("tool_calls")?;
                let calls = calls_of(&text).ok_or_else(|| {
                    bad(format!(
                        "message {i}: tool_calls is not a JSON array of {{\"name\": s, \"arguments\": object}} (as info's tool_calls gave them)"
                    ))
                })?;
                message.tool_calls = calls;
            }
            Ok(message)
        })
        .collect()
}

/// Converts `Generate`/`Ask`/`Chat`/`AskChat` arguments. Ranges are the
/// scheduler's to check (as for gRPC); here only names, types and
/// combinations.
fn parse_request(asking: Asking, opts: &HashMap<String, OwnedValue>) -> Result<Parsed, ApiError> {
    let bad = |m: String| Err(ApiError::InvalidArgument(m));
    let d = SamplingParams::default();
    let mut o = Options {
        sampling: d.clone(),
        ..Default::default()
    };
    let (mut priority, mut deadline) = (Priority::Interactive, None);
    let (mut system, mut raw, mut add_bos, mut session) = (None, false, None, None);
    let f32_of = |x: f64| x as f32;
    for (key, v) in opts {
        let Some(&(_, kind)) = OPTIONS.iter().find(|(k, _)| k == key) else {
            let known: Vec<_> = OPTIONS.iter().map(|(k, _)| *k).collect();
            return bad(format!(
                "unknown option {key:?}; the options are {}",
                known.join(", ")
            ));
        };
        match (key.as_str(), option_value(key, kind, v)?) {
            ("max_tokens", OptValue::Uint(n)) => o.max_tokens = Some(n as usize),
            ("temperature", OptValue::Float(x)) => o.sampling.temperature = f32_of(x),
            ("top_k", OptValue::Uint(n)) => o.sampling.top_k = n as usize,
            ("top_p", OptValue::Float(x)) => o.sampling.top_p = f32_of(x),
            ("min_p", OptValue::Float(x)) => o.sampling.min_p = f32_of(x),
            ("repeat_penalty", OptValue::Float(x)) => o.sampling.repeat_penalty = f32_of(x),
            ("presence_penalty", OptValue::Float(x)) => o.sampling.presence_penalty = f32_of(x),
            ("frequency_penalty", OptValue::Float(x)) => o.sampling.frequency_penalty = f32_of(x),
            ("seed", OptValue::Uint(n)) => o.sampling.seed = n,
            ("stop", OptValue::Strs(v)) => o.stop = v,
            ("ignore_eos", OptValue::Bool(b)) => o.ignore_eos = b,
            ("priority", OptValue::Str(s)) => {
                priority = match s.as_str() {
                    "interactive" => Priority::Interactive,
                    "background" => Priority::Background,
                    other => {
                        return bad(format!(
                            "priority {other:?} is unknown; use \"interactive\" or \"background\""
                        ));
                    }
                }
            }
            ("system", OptValue::Str(s)) => system = Some(s),
            ("raw", OptValue::Bool(b)) => raw = b,
            ("json_schema" | "json_object" | "regex" | "grammar", v) => {
                use crate::constraint::ResponseFormat as F;
                let f = match v {
                    OptValue::Str(t) if key == "json_schema" => Some(F::JsonSchema(t)),
                    OptValue::Str(r) if key == "regex" => Some(F::Regex(r)),
                    OptValue::Str(g) => Some(F::Lark(g)),
                    OptValue::Bool(b) => b.then_some(F::JsonObject),
                    v => {
                        return Err(ApiError::Internal(format!(
                            "option {key:?} checked as {kind:?} gave {v:?}"
                        )));
                    }
                };
                if f.is_some() && o.format.is_some() {
                    return bad(
                        "give one response format: json_schema, json_object, regex or grammar"
                            .into(),
                    );
                }
                o.format = o.format.take().or(f);
            }
            ("tools", OptValue::Str(t)) => o.tools = tools_of(&t)?,
            ("tool_choice", OptValue::Str(c)) => o.tool_choice = c.parse().unwrap_or_default(),
            ("add_bos", OptValue::Bool(b)) => add_bos = Some(b),
            ("session", OptValue::Str(s)) => session = Some(s),
            ("timeout", OptValue::Float(t)) => {
                if !(t.is_finite() && t > 0.0 && t < 1e9) {
                    return bad(format!(
                        "timeout {t} is not a positive number of seconds; leave it unset for none"
                    ));
                }
                deadline = Some(Instant::now() + Duration::from_secs_f64(t));
            }
            (_, v) => {
                return Err(ApiError::Internal(format!(
                    "option {key:?} checked as {kind:?} gave {v:?}"
                )));
            }
        }
    }
    let input = match asking {
        Asking::Prompt(text) if raw => {
            if system.is_some() || session.is_some() {
                return bad(
                    "raw continues the prompt as plain text: drop system and session, or raw"
                        .into(),
                );
            }
            Input::Prompt { text, add_bos }
        }
        Asking::Messages(_) if raw => {
            return bad(
                "raw applies to Generate and Ask: Chat's messages go through the chat template"
                    .into(),
            );
        }
        _ if add_bos.is_some() => {
            return bad("add_bos applies to raw prompts only: set raw too, or drop add_bos".into());
        }
        Asking::Prompt(prompt) => {
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(crate::chat::ChatMessage::new("system", s));
            }
            if prompt.is_empty() {
                return bad("the prompt is empty: give some text to answer".into());
            }
            messages.push(crate::chat::ChatMessage::new("user", prompt));
            Input::Chat { messages, session }
        }
        Asking::Messages(mut messages) => {
            if let Some(s) = system {
                messages.insert(0, crate::chat::ChatMessage::new("system", s));
            }
            Input::Chat { messages, session }
        }
    };
    Ok(Parsed {
        input,
        options: o,
        priority,
        deadline,
    })
}

/// `info` of a finished request (`Generate`'s second value, `Finished`'s).
fn info_of(d: &Done) -> HashMap<&'static str, Value<'static>> {
    let s = &d.stats;
    let mut m: HashMap<&'static str, Value<'static>> = HashMap::from([
        ("finish_reason", Value::from(d.reason.as_str())),
        ("output_incomplete", Value::from(d.output_incomplete)),
        ("prompt_tokens", Value::from(s.prompt_tokens as u32)),
        ("prefilled_tokens", Value::from(s.prefilled_tokens as u32)),
        ("generated_tokens", Value::from(s.generated_tokens as u32)),
        ("queue_seconds", Value::from(s.queue.as_secs_f64())),
        (
            "time_to_first_token_seconds",
            Value::from(s.time_to_first_token.as_secs_f64()),
        ),
        ("total_seconds", Value::from(s.total.as_secs_f64())),
        (
            "decode_tokens_per_second",
            Value::from(s.decode_tokens_per_second()),
        ),
        (
            "prefill_tokens_per_second",
            Value::from(s.prefill_tokens_per_second()),
        ),
    ]);
    if let Some(id) = &d.session {
        m.insert("session_id", Value::from(id.clone()));
    }
    if !d.tool_calls.is_empty() {
        m.insert("tool_calls", Value::from(calls_json(&d.tool_calls)));
        if matches!(
            d.reason,
            crate::sequence::FinishReason::Eos | crate::sequence::FinishReason::Complete
        ) {
            m.insert("finish_reason", Value::from("tool_calls"));
        }
    }
    m
}

/// Requests in flight, by caller: the sender side of each one's cancel
/// signal. Dropping a sender (the caller left) or sending (Cancel) stops it.
#[derive(Default)]
struct Callers(Mutex<HashMap<String, HashMap<u64, oneshot::Sender<()>>>>);

impl Callers {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u64, oneshot::Sender<()>>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct ServiceState {
    handle: Handle,
    load: watch::Receiver<Load>,
    dbus: DBusProxy<'static>,
    callers: Callers,
    next_id: AtomicU64,
}

/// A request's place in [`Callers`]; dropped when the request ends.
struct Ticket {
    shared: Arc<ServiceState>,
    caller: String,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut m = self.shared.callers.lock();
        if let Some(reqs) = m.get_mut(&self.caller) {
            reqs.remove(&self.id);
            if reqs.is_empty() {
                m.remove(&self.caller);
            }
        }
    }
}

/// A request the scheduler took, with what stops it.
struct CallRequest {
    ticket: Ticket,
    cancel: oneshot::Receiver<()>,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
}

impl ServiceState {
    /// The caller that sent `hdr`.
    fn caller(hdr: &Header<'_>) -> Result<String, ApiError> {
        hdr.sender().map(|s| s.to_string()).ok_or_else(|| {
            ApiError::InvalidArgument("the call has no sender; call through a message bus".into())
        })
    }

    fn register(self: &Arc<Self>, caller: &str) -> (Ticket, oneshot::Receiver<()>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.callers
            .lock()
            .entry(caller.to_owned())
            .or_default()
            .insert(id, tx);
        let ticket = Ticket {
            shared: self.clone(),
            caller: caller.to_owned(),
            id,
        };
        (ticket, rx)
    }

    /// Cancels every request of a caller that left the bus.
    fn caller_left(&self, name: &str) {
        self.callers.lock().remove(name);
    }

    fn cancel(&self, caller: &str, id: u64) {
        let tx = self
            .callers
            .lock()
            .get_mut(caller)
            .and_then(|r| r.remove(&id));
        if let Some(tx) = tx {
            let _ = tx.send(());
        }
    }

    /// Who `caller` is for fairness and sessions: the same `uid:U/pid:P` a
    /// gRPC client on the Unix socket gets, so one process is one unit
    /// whatever transport it uses. Fails if the caller has left already
    /// (after its requests were registered: none can be missed).
    async fn client_of(&self, caller: &str) -> Result<Client, ApiError> {
        let name = UniqueName::try_from(caller)
            .map_err(|e| ApiError::InvalidArgument(format!("caller {caller:?}: {e}")))?;
        match self
            .dbus
            .get_connection_credentials(BusName::Unique(name))
            .await
        {
            Ok(c) => {
                let owner = match c.unix_user_id() {
                    Some(uid) => format!("uid:{uid}"),
                    None => format!("dbus:{caller}"),
                };
                let id = match c.process_id() {
                    Some(pid) => format!("{owner}/pid:{pid}"),
                    None => format!("{owner}/dbus:{caller}"),
                };
                Ok(Client {
                    id,
                    owner,
                    uid: c.unix_user_id(),
                    pid: c.process_id(),
                    edge: Edge::Dbus,
                })
            }
            Err(zbus::fdo::Error::NameHasNoOwner(_)) => Err(ApiError::Cancelled(format!(
                "{caller} left the bus; its request was dropped"
            ))),
            // A bus without credentials: each connection is its own client.
            Err(_) => Ok(Client {
                id: format!("dbus:{caller}"),
                owner: format!("dbus:{caller}"),
                edge: Edge::Dbus,
                ..Client::default()
            }),
        }
    }

    /// Validates and queues a request of `caller` (rendering and tokenizing
    /// on a blocking thread, as gRPC does).
    async fn start(
        self: &Arc<Self>,
        caller: &str,
        asking: Asking,
        options: &HashMap<String, OwnedValue>,
    ) -> Result<CallRequest, ApiError> {
        let p = parse_request(asking, options)?;
        let (ticket, cancel) = self.register(caller);
        let client = self.client_of(caller).await?;
        let handle = self.handle.clone();
        let req = scheduler::Request {
            input: p.input,
            options: p.options,
            client,
            priority: p.priority,
            deadline: p.deadline,
        };
        let generation = tokio::task::spawn_blocking(move || handle.submit(req))
            .await
            .map_err(|e| ApiError::Internal(format!("preparing the request failed: {e}")))??;
        Ok(CallRequest {
            ticket,
            cancel,
            events: generation.into_receiver(),
        })
    }
}

/// The `org.lfm.Daemon1` object.
pub struct Daemon1 {
    shared: Arc<ServiceState>,
}

#[interface(name = "org.lfm.Daemon1")]
impl Daemon1 {
    /// Answers `prompt` (a chat turn, or raw text with `raw`) and returns
    /// the text and `info` when done.
    #[zbus(out_args("text", "info"))]
    async fn generate(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        prompt: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<(String, Info), ApiError> {
        let caller = ServiceState::caller(&hdr)?;
        self.complete(caller, Asking::Prompt(prompt), options).await
    }

    /// Answers a conversation: `messages` are `{"role": s, "content": s}`
    /// dicts, rendered by the model's chat template (with `session`, the
    /// messages to add to the session's conversation). Returns the text and
    /// `info` when done.
    #[zbus(out_args("text", "info"))]
    async fn chat(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        messages: Vec<HashMap<String, OwnedValue>>,
        options: HashMap<String, OwnedValue>,
    ) -> Result<(String, Info), ApiError> {
        let caller = ServiceState::caller(&hdr)?;
        let messages = messages_of(messages)?;
        self.complete(caller, Asking::Messages(messages), options)
            .await
    }

    /// Starts answering `prompt`; returns the request object, whose
    /// `Token` and `Finished` signals go to the caller only. Add a match
    /// rule for them before calling (see README: the Ask protocol).
    #[zbus(out_args("request"))]
    async fn ask(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
        prompt: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<ResponseDispatchNotifier<OwnedObjectPath>, ApiError> {
        let caller = ServiceState::caller(&hdr)?;
        self.start_streaming(caller, conn, server, Asking::Prompt(prompt), options)
            .await
    }

    /// `Ask` for a conversation: `messages` as `Chat` takes them.
    #[zbus(out_args("request"))]
    async fn ask_chat(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
        messages: Vec<HashMap<String, OwnedValue>>,
        options: HashMap<String, OwnedValue>,
    ) -> Result<ResponseDispatchNotifier<OwnedObjectPath>, ApiError> {
        let caller = ServiceState::caller(&hdr)?;
        let messages = messages_of(messages)?;
        self.start_streaming(caller, conn, server, Asking::Messages(messages), options)
            .await
    }

    /// What gRPC's `GetModelInfo` gives, by the same names: `path`,
    /// `architecture`, `name`, `file_type`, `file_bytes`, `n_params`,
    /// `n_layer`, `n_embd`, `n_vocab`, `n_expert`, `n_expert_used`,
    /// `n_ctx_train`, `context_tokens`, `has_chat_template`, `isa`, `threads`.
    #[zbus(out_args("info"))]
    async fn model_info(&self) -> Info {
        let m = self.shared.handle.model_info();
        HashMap::from([
            ("path", Value::from(m.path.clone())),
            ("architecture", Value::from(m.architecture.clone())),
            ("name", Value::from(m.name.clone())),
            ("file_type", Value::from(m.file_type.clone())),
            ("file_bytes", Value::U64(m.file_bytes)),
            ("n_params", Value::U64(m.n_params)),
            ("n_layer", Value::U32(m.n_layer as u32)),
            ("n_embd", Value::U32(m.n_embd as u32)),
            ("n_vocab", Value::U32(m.n_vocab as u32)),
            ("n_expert", Value::U32(m.n_expert as u32)),
            ("n_expert_used", Value::U32(m.n_expert_used as u32)),
            ("n_ctx_train", Value::U32(m.n_ctx_train as u32)),
            ("context_tokens", Value::U32(m.context as u32)),
            ("has_chat_template", Value::Bool(m.has_chat_template)),
            ("isa", Value::from(m.isa.clone())),
            ("threads", Value::U32(m.threads as u32)),
        ])
    }

    /// What gRPC's `GetStatus` gives, by the same names: requests
    /// (`active_requests`, `queued_requests`, `requests_total`, …), limits
    /// (`max_concurrent`, `queue_capacity`), `sessions`, throughput over the
    /// last 10 s, `isa`, `threads`, memory (`rss_bytes`, `rss_anon_bytes`,
    /// `rss_file_bytes`, `peak_rss_bytes`), `uptime_seconds`, `version`,
    /// `model`, `prefix_cache` (an `a{sv}`: `entries`, `bytes`,
    /// `limit_bytes`, `hits`, `misses`, `tokens_saved`), and `paging` (an
    /// `a{sv}` of `ExpertStats`' totals) when the model's experts are paged.
    #[zbus(out_args("status"))]
    async fn status(&self) -> Result<Info, ApiError> {
        let h = &self.shared.handle;
        let s = h.status();
        let m = h.model_info();
        let mem = s.memory.unwrap_or_default();
        let mut out: Info = HashMap::from([
            ("active_requests", Value::U32(s.active as u32)),
            ("queued_requests", Value::U32(s.queued as u32)),
            ("max_concurrent", Value::U32(s.max_concurrent as u32)),
            ("queue_capacity", Value::U32(s.queue_capacity as u32)),
            ("sessions", Value::U32(s.sessions as u32)),
            ("requests_total", Value::U64(s.requests_total)),
            ("prompt_tokens_total", Value::U64(s.prompt_tokens_total)),
            (
                "generated_tokens_total",
                Value::U64(s.generated_tokens_total),
            ),
            (
                "generated_tokens_per_second",
                Value::F64(s.generated_tokens_per_second),
            ),
            (
                "prefill_tokens_per_second",
                Value::F64(s.prefill_tokens_per_second),
            ),
            ("isa", Value::from(m.isa.clone())),
            ("threads", Value::U32(m.threads as u32)),
            ("uptime_seconds", Value::F64(s.uptime.as_secs_f64())),
            ("rss_bytes", Value::U64(mem.rss_bytes)),
            ("rss_anon_bytes", Value::U64(mem.rss_anon_bytes)),
            ("rss_file_bytes", Value::U64(mem.rss_file_bytes)),
            ("peak_rss_bytes", Value::U64(mem.peak_rss_bytes)),
            ("version", Value::from(env!("CARGO_PKG_VERSION"))),
            ("model", Value::from(m.name.clone())),
        ]);
        let pc = &s.prefix_cache;
        let prefix: HashMap<&str, Value<'_>> = HashMap::from([
            ("entries", Value::U64(pc.entries as u64)),
            ("bytes", Value::U64(pc.bytes)),
            ("limit_bytes", Value::U64(pc.limit_bytes)),
            ("hits", Value::U64(pc.hits)),
            ("misses", Value::U64(pc.misses)),
            ("tokens_saved", Value::U64(pc.tokens_saved)),
        ]);
        out.insert("prefix_cache", Value::from(prefix));
        let handle = h.clone();
        let paging = tokio::task::spawn_blocking(move || handle.paging_stats(false))
            .await
            .map_err(|e| ApiError::Internal(format!("reading the pager's figures: {e}")))?;
        if let Some(p) = paging {
            out.insert("paging", Value::from(expert_stats_of(p).0));
        }
        Ok(out)
    }

    /// The expert pager's figures: totals by name (`budget_mode`,
    /// `budget_bytes` (absent: unlimited), `fixed_bytes`,
    /// `expert_resident_bytes`, `expert_cap_bytes`, `expert_total_bytes`,
    /// `locked_bytes`, `loads`, `bytes_in`, `load_seconds`, `evictions`, `predictions`,
    /// `predictions_used`, `major_faults`, `memory_pressure`), and one
    /// `(layer, expert, hits, loads, bytes_in, evictions, resident, locked)`
    /// per MoE layer and expert. `FailedPrecondition` for a model without
    /// paged experts.
    #[zbus(out_args("totals", "experts"))]
    async fn expert_stats(&self) -> Result<(ExpertTotals, Vec<ExpertRow>), ApiError> {
        let handle = self.shared.handle.clone();
        let p = tokio::task::spawn_blocking(move || handle.paging_stats(true))
            .await
            .map_err(|e| ApiError::Internal(format!("measuring expert residency: {e}")))?
            .ok_or_else(|| {
                ApiError::FailedPrecondition(
                    "this model's experts are not paged (a dense model, or one read into memory instead of mapped)".into(),
                )
            })?;
        Ok(expert_stats_of(p))
    }

    /// The model's name (`general.name`), or its file name if it has none.
    #[zbus(property(emits_changed_signal = "const"))]
    fn model(&self) -> String {
        let m = self.shared.handle.model_info();
        if m.name.is_empty() {
            std::path::Path::new(&m.path)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| m.path.clone())
        } else {
            m.name.clone()
        }
    }

    /// The model file's path.
    #[zbus(property(emits_changed_signal = "const"))]
    fn model_path(&self) -> String {
        self.shared.handle.model_info().path.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn architecture(&self) -> String {
        self.shared.handle.model_info().architecture.clone()
    }

    /// The kernels' instruction set (`avx512-vnni`, `avx2`, `neon`, …).
    #[zbus(property(emits_changed_signal = "const"))]
    fn isa(&self) -> String {
        self.shared.handle.model_info().isa.clone()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }

    #[zbus(property)]
    fn active_requests(&self) -> u32 {
        self.shared.load.borrow().active as u32
    }

    #[zbus(property)]
    fn queued_requests(&self) -> u32 {
        self.shared.load.borrow().queued as u32
    }
}

/// `info` and `status` dictionaries.
type Info = HashMap<&'static str, Value<'static>>;

impl Daemon1 {
    /// Runs a request to its end (`Generate`, `Chat`).
    async fn complete(
        &self,
        caller: String,
        asking: Asking,
        options: HashMap<String, OwnedValue>,
    ) -> Result<(String, Info), ApiError> {
        let CallRequest {
            ticket,
            mut cancel,
            mut events,
        } = self.shared.start(&caller, asking, &options).await?;
        let mut text = String::new();
        let result = loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Event::Delta(d)) => text.push_str(&d.text),
                    Some(Event::Done(d)) => break Ok((text, info_of(&d))),
                    Some(Event::Failed(f)) => break Err(f.into()),
                    None => break Err(engine_gone()),
                },
                _ = &mut cancel => {
                    break Err(ApiError::Cancelled(format!("{caller} left the bus")));
                }
            }
        };
        // The receiver goes first: a cancelled request's slot is freed.
        drop(events);
        drop(ticket);
        result
    }

    /// Starts a request whose events go out as signals (`Ask`, `AskChat`).
    async fn start_streaming(
        &self,
        caller: String,
        conn: &Connection,
        server: &ObjectServer,
        asking: Asking,
        options: HashMap<String, OwnedValue>,
    ) -> Result<ResponseDispatchNotifier<OwnedObjectPath>, ApiError> {
        let running = self.shared.start(&caller, asking, &options).await?;
        let path = OwnedObjectPath::try_from(format!("{REQUESTS_PATH}/{}", running.ticket.id))
            .map_err(|e| ApiError::Internal(format!("request path: {e}")))?;
        let object = Request1 {
            shared: self.shared.clone(),
            owner: caller.clone(),
            id: running.ticket.id,
        };
        server.at(&path, object).await?;
        let (reply, sent) = ResponseDispatchNotifier::new(path.clone());
        let conn = conn.clone();
        tokio::spawn(async move {
            // Nothing is emitted before the caller has its path.
            sent.await;
            stream_request(&conn, &path, &caller, running).await;
            let _ = conn
                .object_server()
                .remove::<Request1, _>(path.as_ref())
                .await;
        });
        Ok(reply)
    }
}

type ExpertTotals = HashMap<&'static str, Value<'static>>;
/// `(layer, expert, hits, loads, bytes_in, evictions, resident, locked)`.
type ExpertRow = (u32, u32, u64, u64, u64, u64, bool, bool);

fn expert_stats_of(p: crate::engine::PagingStats) -> (ExpertTotals, Vec<ExpertRow>) {
    let mut t: ExpertTotals = HashMap::new();
    t.insert("budget_mode", Value::from(p.budget_mode));
    if let Some(b) = p.budget_bytes {
        t.insert("budget_bytes", Value::U64(b));
    }
    if let Some(c) = p.expert_cap_bytes {
        t.insert("expert_cap_bytes", Value::U64(c));
    }
    if let Some(f) = p.major_faults {
        t.insert("major_faults", Value::U64(f));
    }
    t.insert("load_seconds", Value::F64(p.load_seconds));
    if let Some(x) = p.memory_pressure {
        t.insert("memory_pressure", Value::F64(x.into()));
    }
    for (k, v) in [
        ("fixed_bytes", p.fixed_bytes),
        ("expert_resident_bytes", p.expert_resident_bytes),
        ("expert_total_bytes", p.expert_total_bytes),
        ("locked_bytes", p.locked_bytes),
        ("loads", p.loads),
        ("bytes_in", p.bytes_in),
        ("evictions", p.evictions),
        ("predictions", p.predictions),
        ("predictions_used", p.predictions_used),
    ] {
        t.insert(k, Value::U64(v));
    }
    let rows = p
        .layer_ids
        .iter()
        .zip(&p.experts)
        .flat_map(|(&layer, ex)| {
            ex.iter().enumerate().map(move |(i, e)| {
                (
                    layer as u32,
                    i as u32,
                    e.hits,
                    e.loads,
                    e.bytes_in,
                    e.evictions,
                    e.resident,
                    e.locked,
                )
            })
        })
        .collect();
    (t, rows)
}

/// Forwards a request's events as signals to `caller` until it ends (or is
/// cancelled: then `Finished("cancelled", …)` with the tokens so far).
async fn stream_request(conn: &Connection, path: &OwnedObjectPath, caller: &str, r: CallRequest) {
    let CallRequest {
        ticket,
        mut cancel,
        mut events,
    } = r;
    let Ok(emitter) = SignalEmitter::new(conn, path.as_ref()) else {
        return;
    };
    let emitter = match UniqueName::try_from(caller) {
        Ok(n) => emitter.set_destination(BusName::Unique(n)),
        Err(_) => return,
    };
    let mut generated = 0u32;
    let (reason, info) = loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Delta(d)) => {
                    generated += d.tokens.len() as u32;
                    if Request1::token(&emitter, &d.text).await.is_err() {
                        // The caller is gone; its departure cancels the rest.
                    }
                }
                Some(Event::Done(d)) => break (d.reason.as_str(), info_of(&d)),
                Some(Event::Failed(f)) => break ("error", error_info(f.into())),
                None => break ("error", error_info(engine_gone())),
            },
            _ = &mut cancel => {
                drop(events);
                break (
                    crate::sequence::FinishReason::Cancelled.as_str(),
                    HashMap::from([
                        ("finish_reason", Value::from("cancelled")),
                        ("generated_tokens", Value::from(generated)),
                    ]),
                );
            }
        }
    };
    let _ = Request1::finished(&emitter, reason, info).await;
    drop(ticket);
}

/// `info` of a request that failed: the error's name and message.
fn error_info(e: ApiError) -> HashMap<&'static str, Value<'static>> {
    use zbus::DBusError;
    HashMap::from([
        ("finish_reason", Value::from("error")),
        ("error_name", Value::from(e.name().to_string())),
        (
            "error_message",
            Value::from(e.description().unwrap_or("").to_owned()),
        ),
    ])
}

/// An `Ask` in progress: `/org/lfm/Daemon1/requests/N`.
struct Request1 {
    shared: Arc<ServiceState>,
    owner: String,
    id: u64,
}

#[interface(name = "org.lfm.Request1")]
impl Request1 {
    /// Stops the request; `Finished("cancelled", …)` follows. Only its
    /// caller may.
    async fn cancel(&self, #[zbus(header)] hdr: Header<'_>) -> Result<(), ApiError> {
        if ServiceState::caller(&hdr)? != self.owner {
            return Err(ApiError::AccessDenied(
                "only the connection that asked may cancel a request".into(),
            ));
        }
        self.shared.cancel(&self.owner, self.id);
        Ok(())
    }

    /// Text that became printable.
    #[zbus(signal)]
    async fn token(emitter: &SignalEmitter<'_>, text: &str) -> zbus::Result<()>;

    /// The last signal of a request: why it ended (`stop`, `stop_string`,
    /// `length`, `context_full`, `cancelled`, `error`) and its figures.
    #[zbus(signal)]
    async fn finished(
        emitter: &SignalEmitter<'_>,
        reason: &str,
        info: HashMap<&str, Value<'_>>,
    ) -> zbus::Result<()>;
}

/// The D-Bus service while it runs; dropping it stops its tasks (the
/// connection closes with the last clone).
pub struct DbusServer {
    conn: Connection,
    tasks: Vec<JoinHandle<()>>,
}

impl DbusServer {
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

impl Drop for DbusServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Connects to `bus`, serves `org.lfm.Daemon1` and takes its name (a bus
/// where another process owns it is an error). Runs until dropped.
pub async fn serve(handle: Handle, bus: &Bus) -> Result<DbusServer, DbusError> {
    let on = |source| DbusError::Bus {
        bus: bus.to_string(),
        source,
    };
    let builder = match bus {
        Bus::Session => zbus::connection::Builder::session(),
        Bus::System => zbus::connection::Builder::system(),
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str()),
    };
    let conn = builder
        .map_err(|source| DbusError::Connect {
            bus: bus.to_string(),
            source,
        })?
        .build()
        .await
        .map_err(|source| DbusError::Connect {
            bus: bus.to_string(),
            source,
        })?;
    let dbus = DBusProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(on)?;
    let shared = Arc::new(ServiceState {
        load: handle.watch_load(),
        handle,
        dbus: dbus.clone(),
        callers: Callers::default(),
        next_id: AtomicU64::new(1),
    });
    let mut tasks = Vec::new();

    // Callers that leave the bus: their requests stop.
    let mut departures = dbus.receive_name_owner_changed().await.map_err(on)?;
    let s = shared.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(sig) = departures.next().await {
            if let Ok(a) = sig.args()
                && a.new_owner().is_none()
                && a.name().starts_with(':')
            {
                s.caller_left(a.name());
            }
        }
    }));

    conn.object_server()
        .at(
            OBJECT_PATH,
            Daemon1 {
                shared: shared.clone(),
            },
        )
        .await
        .map_err(on)?;
    let iface = conn
        .object_server()
        .interface::<_, Daemon1>(OBJECT_PATH)
        .await
        .map_err(on)?;
    // Load changes become PropertiesChanged.
    let mut load = shared.handle.watch_load();
    tasks.push(tokio::spawn(async move {
        let mut last = *load.borrow_and_update();
        while load.changed().await.is_ok() {
            let now = *load.borrow_and_update();
            let d = iface.get().await;
            let em = iface.signal_emitter();
            if now.active != last.active {
                let _ = d.active_requests_changed(em).await;
            }
            if now.queued != last.queued {
                let _ = d.queued_requests_changed(em).await;
            }
            last = now;
        }
    }));

    let reply = conn
        .request_name_with_flags(BUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await
        .map_err(on)?;
    if reply == RequestNameReply::Exists {
        return Err(DbusError::NameTaken(bus.to_string()));
    }
    Ok(DbusServer { conn, tasks })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, Value<'_>)]) -> HashMap<String, OwnedValue> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
            .collect()
    }

    fn err(kv: &[(&str, Value<'_>)]) -> String {
        match parse_request(Asking::Prompt("hi".into()), &opts(kv)) {
            Err(ApiError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn options_convert_with_their_documented_types() {
        let p = parse_request(
            Asking::Prompt("hi".into()),
            &opts(&[
                ("max_tokens", Value::U32(8)),
                ("temperature", Value::F64(0.0)),
                ("top_k", Value::U32(5)),
                ("seed", Value::U64(7)),
                ("stop", Value::from(vec!["\n\n".to_owned()])),
                ("priority", Value::from("background")),
                ("system", Value::from("be brief")),
            ]),
        )
        .unwrap();
        assert_eq!(p.options.max_tokens, Some(8));
        assert_eq!(
            (p.options.sampling.temperature, p.options.sampling.top_k),
            (0.0, 5)
        );
        assert_eq!(p.options.sampling.seed, 7);
        assert_eq!(p.options.stop, ["\n\n"]);
        assert_eq!(p.priority, Priority::Background);
        let Input::Chat { messages, session } = p.input else {
            panic!("a chat turn by default");
        };
        assert_eq!((messages.len(), session), (2, None));
        let p = parse_request(
            Asking::Prompt("go on".into()),
            &opts(&[("raw", Value::Bool(true))]),
        )
        .unwrap();
        assert!(matches!(p.input, Input::Prompt { .. }));
        assert_eq!(p.options.sampling, SamplingParams::default());
    }

    #[test]
    fn bad_options_name_the_option_and_the_type() {
        let m = err(&[("temprature", Value::F64(0.0))]);
        assert!(
            m.contains("\"temprature\"") && m.contains("temperature"),
            "{m}"
        );
        let m = err(&[("max_tokens", Value::from("8"))]);
        assert!(
            m.contains("max_tokens") && m.contains("integer from 0 to 4294967295"),
            "{m}"
        );
        let m = err(&[("max_tokens", Value::I32(-8))]);
        assert!(
            m.contains("max_tokens") && m.contains("-8") && m.contains("from 0 to"),
            "{m}"
        );
        let m = err(&[("max_tokens", Value::I64(1 << 32))]);
        assert!(m.contains("4294967296") && m.contains("4294967295"), "{m}");
        let m = err(&[("seed", Value::I64(-1))]);
        assert!(
            m.contains("seed") && m.contains("18446744073709551615"),
            "{m}"
        );
        let m = err(&[("temperature", Value::from("hot"))]);
        assert!(m.contains("temperature") && m.contains("number"), "{m}");
        let m = err(&[("ignore_eos", Value::I32(1))]);
        assert!(m.contains("boolean"), "{m}");
        let m = err(&[("system", Value::I32(1))]);
        assert!(m.contains("string"), "{m}");
        let m = err(&[("stop", Value::from(vec![1u32]))]);
        assert!(m.contains("array of strings"), "{m}");
        let m = err(&[("priority", Value::from("urgent"))]);
        assert!(m.contains("background"), "{m}");
        let m = err(&[("timeout", Value::F64(f64::NAN))]);
        assert!(m.contains("timeout"), "{m}");
        err(&[("raw", Value::Bool(true)), ("system", Value::from("s"))]);
        err(&[("add_bos", Value::Bool(true))]);
    }

    /// What bindings send for a bare number: every integer type for an
    /// integer option within its range, and integers for a double one.
    #[test]
    fn numbers_take_any_integer_type_in_range() {
        let ints: [Value<'_>; 7] = [
            Value::U8(6),
            Value::I16(6),
            Value::U16(6),
            Value::I32(6),
            Value::U32(6),
            Value::I64(6),
            Value::U64(6),
        ];
        for v in ints {
            let sig = v.value_signature().to_string();
            let p = parse_request(
                Asking::Prompt("hi".into()),
                &opts(&[
                    ("max_tokens", v.try_clone().unwrap()),
                    ("top_k", v.try_clone().unwrap()),
                    ("seed", v.try_clone().unwrap()),
                    ("temperature", v.try_clone().unwrap()),
                    ("top_p", Value::Value(Box::new(Value::F64(0.5)))),
                ]),
            )
            .unwrap_or_else(|e| panic!("{sig}: {e:?}"));
            assert_eq!(p.options.max_tokens, Some(6), "{sig}");
            assert_eq!(p.options.sampling.top_k, 6, "{sig}");
            assert_eq!(p.options.sampling.seed, 6, "{sig}");
            assert_eq!(p.options.sampling.temperature, 6.0, "{sig}");
            // A variant in the variant is looked through.
            assert_eq!(p.options.sampling.top_p, 0.5, "{sig}");
        }
        let p = parse_request(
            Asking::Prompt("hi".into()),
            &opts(&[
                ("max_tokens", Value::U64(u64::from(u32::MAX))),
                ("seed", Value::U64(u64::MAX)),
            ]),
        )
        .unwrap();
        assert_eq!(p.options.max_tokens, Some(u32::MAX as usize));
        assert_eq!(p.options.sampling.seed, u64::MAX);
    }

    #[test]
    fn chat_messages_are_role_and_content() {
        let msg = |kv: &[(&str, Value<'_>)]| opts(kv);
        let m = messages_of(vec![
            msg(&[
                ("role", Value::from("user")),
                ("content", Value::from("Hi")),
            ]),
            msg(&[
                ("role", Value::from("assistant")),
                ("content", Value::from("Hello")),
            ]),
        ])
        .unwrap();
        assert_eq!(m.len(), 2);
        let p = parse_request(
            Asking::Messages(m),
            &opts(&[
                ("system", Value::from("be brief")),
                ("session", Value::from("s")),
            ]),
        )
        .unwrap();
        let Input::Chat { messages, session } = p.input else {
            panic!("a chat");
        };
        assert_eq!(messages.len(), 3, "the system message goes first");
        assert_eq!(session.as_deref(), Some("s"));
        let bad = |m: Vec<HashMap<String, OwnedValue>>| match messages_of(m) {
            Err(ApiError::InvalidArgument(e)) => e,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        let e = bad(vec![msg(&[("role", Value::from("user"))])]);
        assert!(e.contains("message 0") && e.contains("\"content\""), "{e}");
        let e = bad(vec![msg(&[
            ("role", Value::from("user")),
            ("content", Value::from("x")),
            ("name", Value::from("y")),
        ])]);
        assert!(e.contains("unknown key \"name\""), "{e}");
        let e = bad(vec![msg(&[
            ("role", Value::U32(1)),
            ("content", Value::from("x")),
        ])]);
        assert!(e.contains("role") && e.contains("string"), "{e}");
        let e = match parse_request(
            Asking::Messages(vec![]),
            &opts(&[("raw", Value::Bool(true))]),
        ) {
            Err(ApiError::InvalidArgument(e)) => e,
            other => panic!("{other:?}"),
        };
        assert!(e.contains("raw applies to Generate and Ask"), "{e}");
    }

    #[test]
    fn errors_get_the_documented_names() {
        use zbus::DBusError;
        let e = ApiError::from(SubmitError::QueueFull {
            queued: 4,
            max_concurrent: 2,
            retry_after: Duration::from_millis(1500),
        });
        assert_eq!(e.name(), "org.lfm.Daemon1.Error.ResourceExhausted");
        assert!(e.description().unwrap().contains("retry in about 1.5 s"));
        let e = ApiError::from(SubmitError::TooLong("long".into()));
        assert_eq!(e.name(), "org.lfm.Daemon1.Error.OutOfRange");
        let e = ApiError::from(Failure::ShuttingDown);
        assert_eq!(e.name(), "org.lfm.Daemon1.Error.Unavailable");
        assert_eq!(
            ApiError::InvalidArgument(String::new()).name().as_str(),
            format!("{}.InvalidArgument", lfm_proto::dbus::ERROR_PREFIX)
        );
    }
}
