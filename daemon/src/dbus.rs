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
    self, Client, Done, ErrorKind, Event, Failure, Handle, Input, Load, Options, Priority,
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

/// The options `Generate` and `Ask` take: name, D-Bus signature, what to
/// call the type in an error.
const OPTIONS: &[(&str, &str, &str)] = &[
    ("max_tokens", "u", "uint32"),
    ("temperature", "d", "double"),
    ("top_k", "u", "uint32"),
    ("top_p", "d", "double"),
    ("min_p", "d", "double"),
    ("repeat_penalty", "d", "double"),
    ("presence_penalty", "d", "double"),
    ("frequency_penalty", "d", "double"),
    ("seed", "t", "uint64"),
    ("stop", "as", "array of strings"),
    ("ignore_eos", "b", "boolean"),
    ("priority", "s", "string"),
    ("system", "s", "string"),
    ("raw", "b", "boolean"),
    ("add_bos", "b", "boolean"),
    ("session", "s", "string"),
    ("timeout", "d", "double"),
];

/// A request as the scheduler takes it, less the client.
#[derive(Debug)]
struct Parsed {
    input: Input,
    options: Options,
    priority: Priority,
    deadline: Option<Instant>,
}

/// Converts `Generate`/`Ask` arguments. Ranges are the scheduler's to
/// check (as for gRPC); here only names, types and combinations.
fn parse_request(prompt: String, opts: &HashMap<String, OwnedValue>) -> Result<Parsed, ApiError> {
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
        let v: &Value<'_> = v;
        let Some(&(_, sig, ty)) = OPTIONS.iter().find(|(k, ..)| k == key) else {
            let known: Vec<_> = OPTIONS.iter().map(|(k, ..)| *k).collect();
            return bad(format!(
                "unknown option {key:?}; the options are {}",
                known.join(", ")
            ));
        };
        if v.value_signature() != sig {
            return bad(format!(
                "option {key:?} must be a {ty} (D-Bus type '{sig}'), not '{}'",
                v.value_signature()
            ));
        }
        match (key.as_str(), v) {
            ("max_tokens", Value::U32(n)) => o.max_tokens = Some(*n as usize),
            ("temperature", Value::F64(x)) => o.sampling.temperature = f32_of(*x),
            ("top_k", Value::U32(n)) => o.sampling.top_k = *n as usize,
            ("top_p", Value::F64(x)) => o.sampling.top_p = f32_of(*x),
            ("min_p", Value::F64(x)) => o.sampling.min_p = f32_of(*x),
            ("repeat_penalty", Value::F64(x)) => o.sampling.repeat_penalty = f32_of(*x),
            ("presence_penalty", Value::F64(x)) => o.sampling.presence_penalty = f32_of(*x),
            ("frequency_penalty", Value::F64(x)) => o.sampling.frequency_penalty = f32_of(*x),
            ("seed", Value::U64(n)) => o.sampling.seed = *n,
            ("stop", Value::Array(a)) => {
                o.stop = a
                    .inner()
                    .iter()
                    .filter_map(|s| match s {
                        Value::Str(s) => Some(s.as_str().to_owned()),
                        _ => None,
                    })
                    .collect();
            }
            ("ignore_eos", Value::Bool(b)) => o.ignore_eos = *b,
            ("priority", Value::Str(s)) => {
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
            ("system", Value::Str(s)) => system = Some(s.as_str().to_owned()),
            ("raw", Value::Bool(b)) => raw = *b,
            ("add_bos", Value::Bool(b)) => add_bos = Some(*b),
            ("session", Value::Str(s)) => session = Some(s.as_str().to_owned()),
            ("timeout", Value::F64(t)) => {
                if !(t.is_finite() && *t > 0.0 && *t < 1e9) {
                    return bad(format!(
                        "timeout {t} is not a positive number of seconds; leave it unset for none"
                    ));
                }
                deadline = Some(Instant::now() + Duration::from_secs_f64(*t));
            }
            // The signature matched, so the value is of the listed type.
            _ => return bad(format!("option {key:?} must be a {ty}")),
        }
    }
    let input = if raw {
        if system.is_some() || session.is_some() {
            return bad(
                "raw continues the prompt as plain text: drop system and session, or raw".into(),
            );
        }
        Input::Prompt {
            text: prompt,
            add_bos,
        }
    } else {
        if add_bos.is_some() {
            return bad("add_bos applies to raw prompts only: set raw too, or drop add_bos".into());
        }
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(crate::chat::ChatMessage::new("system", s));
        }
        if prompt.is_empty() {
            return bad("the prompt is empty: give some text to answer".into());
        }
        messages.push(crate::chat::ChatMessage::new("user", prompt));
        Input::Chat { messages, session }
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

struct Shared {
    handle: Handle,
    load: watch::Receiver<Load>,
    dbus: DBusProxy<'static>,
    callers: Callers,
    next_id: AtomicU64,
}

/// A request's place in [`Callers`]; dropped when the request ends.
struct Ticket {
    shared: Arc<Shared>,
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
struct Running {
    ticket: Ticket,
    cancel: oneshot::Receiver<()>,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
}

impl Shared {
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
                })
            }
            Err(zbus::fdo::Error::NameHasNoOwner(_)) => Err(ApiError::Cancelled(format!(
                "{caller} left the bus; its request was dropped"
            ))),
            // A bus without credentials: each connection is its own client.
            Err(_) => Ok(Client {
                id: format!("dbus:{caller}"),
                owner: format!("dbus:{caller}"),
                ..Client::default()
            }),
        }
    }

    /// Validates and queues a request of `caller` (rendering and tokenizing
    /// on a blocking thread, as gRPC does).
    async fn start(
        self: &Arc<Self>,
        caller: &str,
        prompt: String,
        options: &HashMap<String, OwnedValue>,
    ) -> Result<Running, ApiError> {
        let p = parse_request(prompt, options)?;
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
        Ok(Running {
            ticket,
            cancel,
            events: generation.into_receiver(),
        })
    }
}

/// The `org.lfm.Daemon1` object.
pub struct Daemon1 {
    shared: Arc<Shared>,
}

#[interface(name = "org.lfm.Daemon1")]
impl Daemon1 {
    /// Answers `prompt` (a chat turn, or raw text with `raw`) and returns
    /// the text and `info` when done.
    async fn generate(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        prompt: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<(String, HashMap<&'static str, Value<'static>>), ApiError> {
        let caller = Shared::caller(&hdr)?;
        let Running {
            ticket,
            mut cancel,
            mut events,
        } = self.shared.start(&caller, prompt, &options).await?;
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

    /// Starts answering `prompt`; returns the request object, whose
    /// `Token` and `Finished` signals go to the caller only. Add a match
    /// rule for them before calling (see README: the Ask protocol).
    async fn ask(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
        prompt: String,
        options: HashMap<String, OwnedValue>,
    ) -> Result<ResponseDispatchNotifier<OwnedObjectPath>, ApiError> {
        let caller = Shared::caller(&hdr)?;
        let running = self.shared.start(&caller, prompt, &options).await?;
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

    /// The expert pager's figures: totals by name (`budget_mode`,
    /// `budget_bytes` (absent: unlimited), `fixed_bytes`,
    /// `expert_resident_bytes`, `expert_cap_bytes`, `expert_total_bytes`,
    /// `locked_bytes`, `loads`, `bytes_in`, `load_seconds`, `evictions`, `predictions`,
    /// `predictions_used`, `major_faults`, `memory_pressure`), and one
    /// `(layer, expert, hits, loads, bytes_in, evictions, resident, locked)`
    /// per MoE layer and expert. `FailedPrecondition` for a model without
    /// paged experts.
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
async fn stream_request(conn: &Connection, path: &OwnedObjectPath, caller: &str, r: Running) {
    let Running {
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
    shared: Arc<Shared>,
    owner: String,
    id: u64,
}

#[interface(name = "org.lfm.Request1")]
impl Request1 {
    /// Stops the request; `Finished("cancelled", …)` follows. Only its
    /// caller may.
    async fn cancel(&self, #[zbus(header)] hdr: Header<'_>) -> Result<(), ApiError> {
        if Shared::caller(&hdr)? != self.owner {
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
    let shared = Arc::new(Shared {
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
        match parse_request("hi".into(), &opts(kv)) {
            Err(ApiError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn options_convert_with_their_documented_types() {
        let p = parse_request(
            "hi".into(),
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
        let p = parse_request("go on".into(), &opts(&[("raw", Value::Bool(true))])).unwrap();
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
        let m = err(&[("max_tokens", Value::I32(8))]);
        assert!(m.contains("max_tokens") && m.contains("uint32"), "{m}");
        let m = err(&[("stop", Value::from(vec![1u32]))]);
        assert!(m.contains("array of strings"), "{m}");
        let m = err(&[("priority", Value::from("urgent"))]);
        assert!(m.contains("background"), "{m}");
        let m = err(&[("timeout", Value::F64(f64::NAN))]);
        assert!(m.contains("timeout"), "{m}");
        err(&[("raw", Value::Bool(true)), ("system", Value::from("s"))]);
        err(&[("add_bos", Value::Bool(true))]);
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
