//! `lfmctl … --dbus`: the commands over the daemon's D-Bus API. `ask` and
//! `chat` follow the Ask protocol (`org.lfm.Daemon1.Ask`/`AskChat`):
//! subscribe to the daemon's `org.lfm.Request1` signals first, then ask,
//! then keep the signals of the returned path (buffered until the path is
//! known). `status`, `info` and `stats` read `Status`, `ModelInfo` and
//! `ExpertStats` into the same `lfm.v1` messages gRPC gives, so the
//! output is the same whatever the transport.

use crate::{AskArgs, Failure, Result, Sampling, out};
use lfm_proto::dbus::{
    BUS_NAME, Bus, ERROR_PREFIX, INTERFACE, OBJECT_PATH, REQUEST_INTERFACE, REQUESTS_PATH,
};
use lfm_proto::v1 as pb;
use std::collections::HashMap;
use std::io::IsTerminal;
use tokio_stream::StreamExt;
use zbus::fdo::DBusProxy;
use zbus::message::Type as MessageType;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, MatchRule, MessageStream};

/// What `--dbus` named, or the bus from `LFMD_DBUS`.
pub fn parse_bus(s: &str) -> Result<Bus> {
    s.parse()
        .map_err(|e| Failure::Usage(format!("--dbus: {e}")))
}

fn unreachable(bus: &Bus, why: impl std::fmt::Display) -> Failure {
    Failure::Unreachable(format!(
        "no lfmd answers on {bus} ({why}). Start one with:\n  lfmd serve --model FILE.gguf --dbus {}\n(scripts/quickstart.sh builds lfmd and makes a small test model), or point --dbus / LFMD_DBUS at the bus it serves on",
        bus.flag()
    ))
}

async fn connect(bus: &Bus) -> zbus::Result<Connection> {
    let b = match bus {
        Bus::Session => zbus::connection::Builder::session()?,
        Bus::System => zbus::connection::Builder::system()?,
        Bus::Address(a) => zbus::connection::Builder::address(a.as_str())?,
    };
    b.build().await
}

type Options = HashMap<&'static str, Value<'static>>;

/// The request options of `ask` as `Ask` takes them.
fn options(a: &AskArgs) -> Result<Options> {
    let mut o = sampling_options(&a.sampling)?;
    if let Some(s) = &a.system {
        o.insert("system", Value::from(s.clone()));
    }
    if a.raw {
        o.insert("raw", Value::Bool(true));
    }
    if let Some(t) = a.tools_text()? {
        o.insert("tools", Value::from(t));
    }
    if let Some(c) = &a.tool_choice {
        o.insert("tool_choice", Value::from(c.clone()));
    }
    Ok(o)
}

/// The sampling flags as D-Bus options.
fn sampling_options(s: &Sampling) -> Result<Options> {
    let mut o: HashMap<&'static str, Value<'static>> = HashMap::new();
    let mut put = |k, v: Option<Value<'static>>| {
        if let Some(v) = v {
            o.insert(k, v);
        }
    };
    put("temperature", s.temperature.map(|x| Value::F64(x.into())));
    put("top_k", s.top_k.map(Value::U32));
    put("top_p", s.top_p.map(|x| Value::F64(x.into())));
    put("min_p", s.min_p.map(|x| Value::F64(x.into())));
    put(
        "repeat_penalty",
        s.repeat_penalty.map(|x| Value::F64(x.into())),
    );
    put(
        "presence_penalty",
        s.presence_penalty.map(|x| Value::F64(x.into())),
    );
    put(
        "frequency_penalty",
        s.frequency_penalty.map(|x| Value::F64(x.into())),
    );
    put("seed", s.seed.map(Value::U64));
    put("max_tokens", s.max_tokens.map(Value::U32));
    put(
        "stop",
        (!s.stop.is_empty()).then(|| Value::from(s.stop.clone())),
    );
    put("ignore_eos", s.ignore_eos.then_some(Value::Bool(true)));
    {
        use lfm_proto::v1::response_format::Format as F;
        match s.format()? {
            Some(F::JsonSchema(t)) => put("json_schema", Some(Value::from(t))),
            Some(F::JsonObject(b)) => put("json_object", Some(Value::Bool(b))),
            Some(F::Regex(r)) => put("regex", Some(Value::from(r))),
            Some(F::Lark(g)) => put("grammar", Some(Value::from(g))),
            None => {}
        }
    }
    match s.priority.as_str() {
        "interactive" | "background" => put("priority", Some(Value::from(s.priority.clone()))),
        other => {
            return Err(Failure::Usage(format!(
                "--priority {other:?}: use interactive or background"
            )));
        }
    }
    if let Some(t) = s.timeout {
        if !(t.is_finite() && t > 0.0) {
            return Err(Failure::Usage(format!(
                "--timeout {t}: give a positive number of seconds"
            )));
        }
        put("timeout", Some(Value::F64(t)));
    }
    Ok(o)
}

/// A failed method call: the daemon refused (4) or is not there (3).
fn call_failure(bus: &Bus, e: zbus::Error) -> Failure {
    match e {
        zbus::Error::MethodError(name, msg, _) if name.starts_with(ERROR_PREFIX) => {
            let kind = name
                .trim_start_matches(ERROR_PREFIX)
                .trim_start_matches('.');
            Failure::Refused(format!("{} ({kind})", msg.unwrap_or_default()))
        }
        e => unreachable(bus, e),
    }
}

fn json_value(v: &Value<'_>) -> serde_json::Value {
    match v {
        Value::U32(n) => (*n).into(),
        Value::U64(n) => (*n).into(),
        Value::F64(x) => (*x).into(),
        Value::Str(s) => s.as_str().into(),
        Value::Bool(b) => (*b).into(),
        other => other.to_string().into(),
    }
}

/// A connection to the daemon on `bus`, and the unique name that owns
/// `org.lfm.Daemon1` now (signals are taken only from it).
struct Daemon {
    bus: Bus,
    conn: Connection,
    owner: zbus::names::OwnedUniqueName,
}

impl Daemon {
    async fn connect(bus: &Bus) -> Result<Daemon> {
        let conn = connect(bus).await.map_err(|e| unreachable(bus, e))?;
        let dbus = DBusProxy::new(&conn)
            .await
            .map_err(|e| unreachable(bus, e))?;
        let owner = dbus
            .get_name_owner(BUS_NAME.try_into().map_err(|e| unreachable(bus, e))?)
            .await
            .map_err(|_| unreachable(bus, format_args!("{BUS_NAME} has no owner")))?;
        Ok(Daemon {
            bus: bus.clone(),
            conn,
            owner,
        })
    }

    /// Calls `method` on the daemon object; its reply's body.
    async fn call<B, R>(&self, method: &str, body: &B) -> Result<R>
    where
        B: zbus::export::serde::Serialize + zbus::zvariant::DynamicType,
        R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
    {
        let reply = self
            .conn
            .call_method(
                Some(self.owner.clone()),
                OBJECT_PATH,
                Some(INTERFACE),
                method,
                body,
            )
            .await
            .map_err(|e| call_failure(&self.bus, e))?;
        reply
            .body()
            .deserialize()
            .map_err(|e| Failure::Other(format!("the daemon's {method} reply: {e}")))
    }

    /// Runs `method` (`Ask` or `AskChat`) with `body` by the Ask protocol,
    /// printing each token unless `quiet`; the text, finish reason and info.
    async fn stream<B>(&self, method: &str, body: &B, quiet: bool) -> Result<Answer>
    where
        B: zbus::export::serde::Serialize + zbus::zvariant::DynamicType,
    {
        let bus = &self.bus;
        let rule = MatchRule::builder()
            .msg_type(MessageType::Signal)
            .sender(self.owner.clone())
            .and_then(|b| b.interface(REQUEST_INTERFACE))
            .and_then(|b| b.path_namespace(REQUESTS_PATH))
            .map(|b| b.build())
            .map_err(|e| Failure::Other(format!("D-Bus match rule: {e}")))?;
        // Subscribed before asking: no signal of ours can be missed.
        let mut signals = MessageStream::for_match_rule(rule, &self.conn, None)
            .await
            .map_err(|e| unreachable(bus, e))?;
        let dbus = DBusProxy::new(&self.conn)
            .await
            .map_err(|e| unreachable(bus, e))?;
        let mut gone = dbus
            .receive_name_owner_changed_with_args(&[(0, BUS_NAME)])
            .await
            .map_err(|e| unreachable(bus, e))?;
        let path: OwnedObjectPath = self.call(method, body).await?;
        let tty = std::io::stdout().is_terminal();
        let mut text = String::new();
        let (reason, info) = loop {
            tokio::select! {
                m = signals.next() => {
                    let m = match m {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return Err(unreachable(bus, e)),
                        None => return Err(unreachable(bus, "the bus connection closed")),
                    };
                    let h = m.header();
                    if h.path().is_none_or(|p| p.as_str() != path.as_str()) {
                        continue;
                    }
                    match h.member().map(|m| m.as_str()) {
                        Some("Token") => {
                            let t: String = m.body().deserialize().map_err(|e| Failure::Other(format!("a Token signal: {e}")))?;
                            if !quiet {
                                out(&crate::for_terminal(&t, tty))?;
                            }
                            text.push_str(&t);
                        }
                        Some("Finished") => {
                            let (reason, info): (String, HashMap<String, OwnedValue>) = m.body().deserialize().map_err(|e| Failure::Other(format!("a Finished signal: {e}")))?;
                            break (reason, info);
                        }
                        _ => {}
                    }
                }
                _ = gone.next() => {
                    return Err(Failure::Unreachable("lost the daemon: it left the bus mid-answer".into()));
                }
            }
        };
        Ok(Answer { text, reason, info })
    }
}

/// A finished `Ask`.
struct Answer {
    text: String,
    reason: String,
    info: HashMap<String, OwnedValue>,
}

impl Answer {
    /// The daemon's refusal, if the request ended in an error.
    fn failure(&self) -> Option<Failure> {
        if self.reason != "error" {
            return None;
        }
        let msg = |k: &str| {
            self.info
                .get(k)
                .and_then(|v| match &**v {
                    Value::Str(s) => Some(s.as_str().to_owned()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        Some(Failure::Refused(format!(
            "{} ({})",
            msg("error_message"),
            msg("error_name")
                .trim_start_matches(ERROR_PREFIX)
                .trim_start_matches('.')
        )))
    }
}

pub async fn ask(bus: &Bus, a: &AskArgs, prompt: String) -> Result<()> {
    let opts = options(a)?;
    let d = Daemon::connect(bus).await?;
    let Answer { text, reason, info } = d.stream("Ask", &(prompt, opts), a.json).await?;
    let answer = Answer { text, reason, info };
    if let Some(f) = answer.failure() {
        if !a.json {
            out("\n")?;
        }
        return Err(f);
    }
    let Answer { text, reason, info } = answer;
    // info's tool_calls: a JSON array as text.
    let calls: serde_json::Value = info
        .get("tool_calls")
        .and_then(|v| serde_json::from_str(json_value(v).as_str()?).ok())
        .unwrap_or_else(|| serde_json::json!([]));
    if a.json {
        let mut stats = serde_json::Map::new();
        for (k, v) in &info {
            if !matches!(
                k.as_str(),
                "finish_reason" | "session_id" | "output_incomplete" | "tool_calls"
            ) {
                stats.insert(k.clone(), json_value(v));
            }
        }
        out(&format!(
            "{:#}\n",
            serde_json::json!({
                "text": text,
                "finish_reason": reason,
                "output_incomplete": info.get("output_incomplete").map(|v| json_value(v)).unwrap_or(false.into()),
                "tool_calls": calls,
                "session_id": info.get("session_id").map(|v| json_value(v)),
                "stats": stats,
            })
        ))
    } else {
        out("\n")?;
        // Each tool call on its own line, as JSON.
        for c in calls.as_array().into_iter().flatten() {
            out(&format!("{c}\n"))?;
        }
        Ok(())
    }
}

/// One turn of `lfmctl chat --dbus`: `messages` added to `session`,
/// streamed to stdout.
pub struct ChatOverDbus {
    daemon: Daemon,
    options: Options,
}

impl ChatOverDbus {
    pub async fn new(bus: &Bus, sampling: &Sampling, session: &str) -> Result<ChatOverDbus> {
        let mut options = sampling_options(sampling)?;
        options.insert("session", Value::from(session.to_owned()));
        Ok(ChatOverDbus {
            daemon: Daemon::connect(bus).await?,
            options,
        })
    }

    /// Sends `messages` (role, content) as the next turn; streams the answer.
    pub async fn turn(&self, messages: &[(String, String)]) -> Result<()> {
        let msgs: Vec<HashMap<&str, Value<'_>>> = messages
            .iter()
            .map(|(role, content)| {
                HashMap::from([
                    ("role", Value::from(role.as_str())),
                    ("content", Value::from(content.as_str())),
                ])
            })
            .collect();
        let answer = self
            .daemon
            .stream("AskChat", &(msgs, self.options.clone()), false)
            .await?;
        match answer.failure() {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }
}

/// A dictionary value as `T`, or `T::default()` if absent or of another type.
fn get<T>(m: &HashMap<String, OwnedValue>, k: &str) -> T
where
    T: TryFrom<OwnedValue> + Default,
{
    m.get(k)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| T::try_from(v).ok())
        .unwrap_or_default()
}

fn opt<T>(m: &HashMap<String, OwnedValue>, k: &str) -> Option<T>
where
    T: TryFrom<OwnedValue>,
{
    m.get(k)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| T::try_from(v).ok())
}

/// `Status`/`ExpertStats` totals as gRPC's `ExpertPaging` (no layers).
fn paging_of(t: &HashMap<String, OwnedValue>) -> pb::ExpertPaging {
    pb::ExpertPaging {
        budget_mode: get(t, "budget_mode"),
        budget_bytes: opt(t, "budget_bytes"),
        fixed_bytes: get(t, "fixed_bytes"),
        expert_resident_bytes: get(t, "expert_resident_bytes"),
        expert_cap_bytes: opt(t, "expert_cap_bytes"),
        expert_total_bytes: get(t, "expert_total_bytes"),
        locked_bytes: get(t, "locked_bytes"),
        loads: get(t, "loads"),
        bytes_in: get(t, "bytes_in"),
        evictions: get(t, "evictions"),
        predictions: get(t, "predictions"),
        predictions_used: get(t, "predictions_used"),
        major_faults: opt(t, "major_faults"),
        memory_pressure: opt::<f64>(t, "memory_pressure").map(|x| x as f32),
        layers: Vec::new(),
        load_seconds: get(t, "load_seconds"),
    }
}

/// `Status()` as gRPC's `DaemonStatus`.
pub async fn status(bus: &Bus) -> Result<pb::DaemonStatus> {
    let d = Daemon::connect(bus).await?;
    let (s,): (HashMap<String, OwnedValue>,) = d.call("Status", &()).await?;
    let paging = s
        .get("paging")
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| HashMap::<String, OwnedValue>::try_from(v).ok())
        .map(|t| paging_of(&t));
    Ok(pb::DaemonStatus {
        active_requests: get(&s, "active_requests"),
        queued_requests: get(&s, "queued_requests"),
        max_concurrent: get(&s, "max_concurrent"),
        queue_capacity: get(&s, "queue_capacity"),
        sessions: get(&s, "sessions"),
        requests_total: get(&s, "requests_total"),
        prompt_tokens_total: get(&s, "prompt_tokens_total"),
        generated_tokens_total: get(&s, "generated_tokens_total"),
        generated_tokens_per_second: get(&s, "generated_tokens_per_second"),
        prefill_tokens_per_second: get(&s, "prefill_tokens_per_second"),
        isa: get(&s, "isa"),
        threads: get(&s, "threads"),
        uptime_seconds: get(&s, "uptime_seconds"),
        rss_bytes: get(&s, "rss_bytes"),
        rss_anon_bytes: get(&s, "rss_anon_bytes"),
        rss_file_bytes: get(&s, "rss_file_bytes"),
        peak_rss_bytes: get(&s, "peak_rss_bytes"),
        version: get(&s, "version"),
        paging,
        prefix_cache: s
            .get("prefix_cache")
            .and_then(|v| v.try_clone().ok())
            .and_then(|v| HashMap::<String, OwnedValue>::try_from(v).ok())
            .map(|t| pb::PrefixCache {
                entries: get(&t, "entries"),
                bytes: get(&t, "bytes"),
                limit_bytes: get(&t, "limit_bytes"),
                hits: get(&t, "hits"),
                misses: get(&t, "misses"),
                tokens_saved: get(&t, "tokens_saved"),
            }),
    })
}

/// `ModelInfo()` as gRPC's `ModelInfo`.
pub async fn model_info(bus: &Bus) -> Result<pb::ModelInfo> {
    let d = Daemon::connect(bus).await?;
    let (m,): (HashMap<String, OwnedValue>,) = d.call("ModelInfo", &()).await?;
    Ok(pb::ModelInfo {
        path: get(&m, "path"),
        architecture: get(&m, "architecture"),
        name: get(&m, "name"),
        file_type: get(&m, "file_type"),
        file_bytes: get(&m, "file_bytes"),
        n_params: get(&m, "n_params"),
        n_layer: get(&m, "n_layer"),
        n_embd: get(&m, "n_embd"),
        n_vocab: get(&m, "n_vocab"),
        n_expert: get(&m, "n_expert"),
        n_expert_used: get(&m, "n_expert_used"),
        n_ctx_train: get(&m, "n_ctx_train"),
        context_tokens: get(&m, "context_tokens"),
        has_chat_template: get(&m, "has_chat_template"),
        isa: get(&m, "isa"),
        threads: get(&m, "threads"),
    })
}

/// `ExpertStats()` as gRPC's `ExpertPaging` (with its per-expert layers
/// when `experts`); `None` for a model without paged experts.
pub async fn paging(bus: &Bus, experts: bool) -> Result<Option<pb::ExpertPaging>> {
    type Row = (u32, u32, u64, u64, u64, u64, bool, bool);
    let d = Daemon::connect(bus).await?;
    let (totals, rows): (HashMap<String, OwnedValue>, Vec<Row>) =
        match d.call("ExpertStats", &()).await {
            Ok(r) => r,
            Err(Failure::Refused(m)) if m.ends_with("(FailedPrecondition)") => return Ok(None),
            Err(f) => return Err(f),
        };
    let mut p = paging_of(&totals);
    if experts {
        for (layer, expert, hits, loads, bytes_in, evictions, resident, locked) in rows {
            if p.layers.last().is_none_or(|l| l.layer != layer) {
                p.layers.push(pb::ExpertLayer {
                    layer,
                    experts: Vec::new(),
                });
            }
            let l = p.layers.last_mut().expect("pushed above");
            let _ = expert; // rows come in expert order
            l.experts.push(pb::ExpertCounters {
                hits,
                resident,
                locked,
                loads,
                bytes_in,
                evictions,
            });
        }
    }
    Ok(Some(p))
}
