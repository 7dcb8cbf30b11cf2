//! `lfmctl ask --dbus`: the same question over the daemon's D-Bus API
//! (`org.lfm.Daemon1.Ask`), following the Ask protocol: subscribe to the
//! daemon's `org.lfm.Request1` signals first, then ask, then keep the
//! signals of the returned path (buffered until the path is known).

use crate::{AskArgs, Failure, Result, out};
use lfm_proto::dbus::{
    BUS_NAME, Bus, ERROR_PREFIX, INTERFACE, OBJECT_PATH, REQUEST_INTERFACE, REQUESTS_PATH,
};
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

/// The request options as `Ask` takes them.
fn options(a: &AskArgs) -> Result<HashMap<&'static str, Value<'static>>> {
    let s = &a.sampling;
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
    put("system", a.system.clone().map(Value::from));
    put("raw", a.raw.then_some(Value::Bool(true)));
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

pub async fn ask(bus: &Bus, a: &AskArgs, prompt: String) -> Result<()> {
    let opts = options(a)?;
    let conn = connect(bus).await.map_err(|e| unreachable(bus, e))?;
    let dbus = DBusProxy::new(&conn)
        .await
        .map_err(|e| unreachable(bus, e))?;
    // Signals only from the daemon that owns the name now.
    let daemon = dbus
        .get_name_owner(BUS_NAME.try_into().map_err(|e| unreachable(bus, e))?)
        .await
        .map_err(|_| unreachable(bus, format_args!("{BUS_NAME} has no owner")))?;
    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender(daemon.clone())
        .and_then(|b| b.interface(REQUEST_INTERFACE))
        .and_then(|b| b.path_namespace(REQUESTS_PATH))
        .map(|b| b.build())
        .map_err(|e| Failure::Other(format!("D-Bus match rule: {e}")))?;
    // Subscribed before asking: no signal of ours can be missed.
    let mut signals = MessageStream::for_match_rule(rule, &conn, None)
        .await
        .map_err(|e| unreachable(bus, e))?;
    let mut gone = dbus
        .receive_name_owner_changed_with_args(&[(0, BUS_NAME)])
        .await
        .map_err(|e| unreachable(bus, e))?;
    let reply = conn
        .call_method(
            Some(daemon.clone()),
            OBJECT_PATH,
            Some(INTERFACE),
            "Ask",
            &(prompt, opts),
        )
        .await
        .map_err(|e| call_failure(bus, e))?;
    let path: OwnedObjectPath = reply
        .body()
        .deserialize()
        .map_err(|e| Failure::Other(format!("the daemon's Ask reply: {e}")))?;

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
                        if !a.json {
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
    if reason == "error" {
        if !a.json {
            out("\n")?;
        }
        let msg = |k: &str| {
            info.get(k)
                .and_then(|v| match &**v {
                    Value::Str(s) => Some(s.as_str().to_owned()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        return Err(Failure::Refused(format!(
            "{} ({})",
            msg("error_message"),
            msg("error_name")
                .trim_start_matches(ERROR_PREFIX)
                .trim_start_matches('.')
        )));
    }
    if a.json {
        let mut stats = serde_json::Map::new();
        for (k, v) in &info {
            if k != "finish_reason" && k != "session_id" {
                stats.insert(k.clone(), json_value(v));
            }
        }
        out(&format!(
            "{:#}\n",
            serde_json::json!({
                "text": text,
                "finish_reason": reason,
                "session_id": info.get("session_id").map(|v| json_value(v)),
                "stats": stats,
            })
        ))
    } else {
        out("\n")
    }
}
