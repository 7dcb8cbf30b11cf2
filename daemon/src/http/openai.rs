//! OpenAI's chat-completions dialect: request bodies to scheduler types,
//! events to response bodies and stream chunks, refusals to OpenAI's error
//! shape. Pure (no I/O), so that the request decoder is fuzzed and tested
//! without a server (`fuzz/fuzz_targets/http_request.rs`).
//!
//! Fields lfmd does not know are ignored, as OpenAI-compatible servers do
//! (clients send `user`, `metadata`, `store` and the like); fields it knows
//! but cannot honour (`n` > 1, `logprobs`, `logit_bias`, `echo`, `suffix`,
//! non-text content parts) are refused, never silently dropped.

use crate::chat::ChatMessage;
use crate::constraint::ResponseFormat;
use crate::sampler::SamplingParams;
use crate::scheduler::{
    Done, ErrorKind, Failure, Input, ModelInfo, Options, Priority, Stats, SubmitError,
};
use crate::sequence::FinishReason;
use crate::tools::{Tool, ToolCall, ToolChoice};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// Largest request body read; larger ones get 413 before they are read.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// A refusal in OpenAI's shape: `{"error": {"message", "type", "param",
/// "code"}}` with its HTTP status.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The offending field, as a JSON path (`messages[2].role`).
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (429, 503).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.into()),
            ..ApiError::new(StatusCode::BAD_REQUEST, message)
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// OpenAI's error `type` for the status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 404 | 405 | 408 | 409 | 413 | 415 => "invalid_request_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            _ => "server_error",
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }

    /// A refusal of the scheduler's, with the status OpenAI clients expect
    /// (429 retries, 400 does not).
    pub fn from_submit(e: SubmitError) -> Self {
        let retry = match &e {
            SubmitError::QueueFull { retry_after, .. } => Some(*retry_after),
            SubmitError::UserLimit { .. } | SubmitError::Session(_) => Some(Duration::from_secs(1)),
            SubmitError::ShuttingDown => Some(Duration::from_secs(5)),
            _ => None,
        };
        let (status, code) = match (&e, e.kind()) {
            (SubmitError::TooLong(_), _) => {
                (StatusCode::BAD_REQUEST, Some("context_length_exceeded"))
            }
            (SubmitError::QueueFull { .. }, _) => {
                (StatusCode::TOO_MANY_REQUESTS, Some("queue_full"))
            }
            (SubmitError::UserLimit { .. }, _) => {
                (StatusCode::TOO_MANY_REQUESTS, Some("user_limit"))
            }
            (_, ErrorKind::InvalidArgument) => (StatusCode::BAD_REQUEST, None),
            (_, ErrorKind::OutOfRange) => (StatusCode::BAD_REQUEST, None),
            (_, ErrorKind::ResourceExhausted) => (StatusCode::TOO_MANY_REQUESTS, None),
            (_, ErrorKind::FailedPrecondition) => (StatusCode::CONFLICT, Some("session_busy")),
            (_, ErrorKind::Unavailable) => (StatusCode::SERVICE_UNAVAILABLE, None),
            (_, ErrorKind::DeadlineExceeded) => (StatusCode::GATEWAY_TIMEOUT, None),
            (_, ErrorKind::Internal) => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        ApiError {
            status,
            message: e.to_string(),
            param: None,
            code,
            retry_after: retry,
        }
    }

    /// A running request's failure.
    pub fn from_failure(f: Failure) -> Self {
        let status = match f.kind() {
            ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, f.to_string())
    }
}

/// `stop`: a string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// The fields the two routes share (sampling, stopping, lfmd's extras),
/// read from the same body as the route's own (not `flatten`ed: that
/// would lose the path of a field at fault).
#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    #[allow(dead_code)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    logit_bias: Option<Value>,
    // lfmd's own, as extra fields (`extra_body` in the openai package).
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    #[serde(default)]
    priority: Option<String>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<MessageBody>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    session: Option<String>,
}

#[derive(Deserialize)]
struct MessageBody {
    role: String,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Value,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    best_of: Option<u32>,
}

/// A request in scheduler terms, with how to answer it.
#[derive(Debug)]
pub struct Call {
    pub input: Input,
    pub options: Options,
    /// Answer as server-sent events.
    pub stream: bool,
    /// A last chunk with `usage` (`stream_options.include_usage`).
    pub include_usage: bool,
    pub priority: Priority,
}

/// Parses `body` as `T`, naming the field at fault.
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    // serde reads a struct from an array too; a request is an object.
    if !body.trim_ascii_start().starts_with(b"{")
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object of the request's fields",
        )
        .with_code("invalid_json"));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if !inner.is_data() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not valid JSON: {inner}"),
            )
            .with_code("invalid_json")
        } else if path == "." || path.is_empty() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body must be a JSON object of the request's fields: {inner}"),
            )
            .with_code("invalid_json")
        } else {
            ApiError::invalid(path.clone(), format!("{path}: {inner}"))
        }
    })
}

/// A `POST /v1/chat/completions` body in scheduler terms.
pub fn chat_call(body: &[u8]) -> Result<Call, ApiError> {
    let b: ChatBody = parse(body)?;
    let (mut options, how) = common(parse(body)?)?;
    let mut messages = Vec::with_capacity(b.messages.len());
    for (i, m) in b.messages.into_iter().enumerate() {
        messages.push(message(i, m)?);
    }
    if let Some(f) = b.response_format {
        options.format = response_format(&f)?;
    }
    if let Some(tools) = b.tools {
        options.tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| tool(i, t))
            .collect::<Result<_, _>>()?;
    }
    if let Some(c) = b.tool_choice {
        options.tool_choice = tool_choice(&c)?;
    }
    Ok(Call {
        input: Input::Chat {
            messages,
            session: b.session,
        },
        options,
        stream: how.stream,
        include_usage: how.include_usage,
        priority: how.priority,
    })
}

/// A `POST /v1/completions` body in scheduler terms.
pub fn completion_call(body: &[u8]) -> Result<Call, ApiError> {
    let b: CompletionBody = parse(body)?;
    if b.echo == Some(true) {
        return Err(ApiError::invalid(
            "echo",
            "echo is not supported: the answer holds only the completion; prepend the prompt yourself",
        ));
    }
    if b.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "suffix (fill in the middle) is not supported by LFM2 models",
        ));
    }
    if b.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("best_of", "best_of must be 1 (or unset)"));
    }
    let text = match b.prompt {
        Value::String(s) => s,
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_owned()
        }
        Value::Array(a) if a.iter().all(Value::is_string) => {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "prompt holds {} prompts; lfmd answers one per request: send them as separate requests (they run batched)",
                    a.len()
                ),
            ));
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt must be a string (token arrays are not supported)",
            ));
        }
    };
    let (options, how) = common(parse(body)?)?;
    Ok(Call {
        input: Input::Prompt {
            text,
            add_bos: None,
        },
        options,
        stream: how.stream,
        include_usage: how.include_usage,
        priority: how.priority,
    })
}

/// How to answer: streamed, with usage, at what priority.
struct How {
    stream: bool,
    include_usage: bool,
    priority: Priority,
}

fn common(c: Common) -> Result<(Options, How), ApiError> {
    let priority = match c.priority.as_deref() {
        None | Some("interactive") => Priority::Interactive,
        Some("background") => Priority::Background,
        Some(p) => {
            return Err(ApiError::invalid(
                "priority",
                format!("priority {p:?} is unknown; use interactive or background"),
            ));
        }
    };
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "n",
            "n must be 1: lfmd gives one choice per request; send several requests for several answers (they run batched)",
        ));
    }
    let on = |v: &Option<Value>| {
        v.as_ref()
            .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
    };
    if on(&c.logprobs) || on(&c.top_logprobs) {
        return Err(ApiError::invalid(
            "logprobs",
            "logprobs are not supported yet; leave logprobs and top_logprobs unset",
        ));
    }
    if c.logit_bias
        .as_ref()
        .is_some_and(|b| b.as_object().is_none_or(|o| !o.is_empty()))
    {
        return Err(ApiError::invalid(
            "logit_bias",
            "logit_bias is not supported; use response_format or tools to constrain the output",
        ));
    }
    let d = SamplingParams::default();
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let options = Options {
        sampling: SamplingParams {
            temperature: c.temperature.unwrap_or(d.temperature),
            top_k: c.top_k.map_or(d.top_k, |k| k as usize),
            top_p: c.top_p.unwrap_or(d.top_p),
            min_p: c.min_p.unwrap_or(d.min_p),
            repeat_penalty: c.repeat_penalty.unwrap_or(d.repeat_penalty),
            presence_penalty: c.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: c.frequency_penalty.unwrap_or(d.frequency_penalty),
            seed: c.seed.map_or(d.seed, |s| s as u64),
            ..d
        },
        max_tokens: c.max_completion_tokens.or(c.max_tokens).map(|m| m as usize),
        stop,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        ..Default::default()
    };
    let include_usage = c
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let how = How {
        stream: c.stream.unwrap_or(false),
        include_usage,
        priority,
    };
    Ok((options, how))
}

/// The roles a message may have (`developer` is OpenAI's newer name for
/// `system`).
const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

fn message(i: usize, m: MessageBody) -> Result<ChatMessage, ApiError> {
    let at = |f: &str| format!("messages[{i}].{f}");
    if !ROLES.contains(&m.role.as_str()) {
        return Err(ApiError::invalid(
            at("role"),
            format!(
                "{}: {:?} is not a role lfmd knows; use system, developer, user, assistant or tool",
                at("role"),
                m.role
            ),
        ));
    }
    let role = if m.role == "developer" {
        "system".to_owned()
    } else {
        m.role
    };
    let content = match m.content {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            at(&format!("content[{j}]")),
                            format!(
                                "{}: a content part of type {} is not supported; LFM2 models read text parts ({{\"type\": \"text\", \"text\": ...}}) only",
                                at(&format!("content[{j}]")),
                                kind.map_or("(none)".into(), |k| format!("{k:?}"))
                            ),
                        ));
                    }
                }
            }
            text
        }
        Some(_) => {
            return Err(ApiError::invalid(
                at("content"),
                format!(
                    "{}: must be a string or a list of text parts",
                    at("content")
                ),
            ));
        }
    };
    let mut out = ChatMessage::new(role, content);
    for (j, c) in m.tool_calls.unwrap_or_default().iter().enumerate() {
        let here = at(&format!("tool_calls[{j}]"));
        let call = crate::tools::call_from_json(c).map_err(|why| {
            ApiError::invalid(
                here.clone(),
                format!("{here} {why}; send the tool_calls the answer gave, e.g. {{\"id\": \"call_1\", \"type\": \"function\", \"function\": {{\"name\": \"f\", \"arguments\": \"{{}}\"}}}}"),
            )
        })?;
        out.tool_calls.push(call);
    }
    Ok(out)
}

fn response_format(f: &Value) -> Result<Option<ResponseFormat>, ApiError> {
    let bad = |msg: String| ApiError::invalid("response_format", msg);
    let kind = f.get("type").and_then(Value::as_str).ok_or_else(|| {
        bad("response_format needs a type: text, json_object or json_schema".into())
    })?;
    Ok(match kind {
        "text" => None,
        "json_object" => Some(ResponseFormat::JsonObject),
        "json_schema" => {
            let schema = f
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .filter(|s| s.is_object() || s.is_boolean())
                .ok_or_else(|| {
                    bad("response_format json_schema needs json_schema.schema, a JSON Schema object".into())
                })?;
            Some(ResponseFormat::JsonSchema(schema.to_string()))
        }
        // lfmd's own kinds, as on gRPC and D-Bus.
        "regex" => Some(ResponseFormat::Regex(
            f.get("regex")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("response_format regex needs a regex string".into()))?
                .to_owned(),
        )),
        "lark" | "grammar" => Some(ResponseFormat::Lark(
            f.get(kind)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("response_format {kind} needs a {kind} string")))?
                .to_owned(),
        )),
        other => {
            return Err(bad(format!(
                "response_format type {other:?} is unknown; use text, json_object, json_schema (or lfmd's regex, lark)"
            )));
        }
    })
}

fn tool(i: usize, t: &Value) -> Result<Tool, ApiError> {
    crate::tools::tool_from_json(t).map_err(|why| {
        let at = format!("tools[{i}]");
        ApiError::invalid(
            at.clone(),
            format!("{at} {why}; a tool is {{\"type\": \"function\", \"function\": {{\"name\", \"description\", \"parameters\"}}}}"),
        )
    })
}

fn tool_choice(c: &Value) -> Result<ToolChoice, ApiError> {
    match c {
        Value::Null => Ok(ToolChoice::Auto),
        Value::String(s) if ["auto", "none", "required"].contains(&s.as_str()) => {
            Ok(s.parse().unwrap_or_default())
        }
        Value::Object(o) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .map(|n| ToolChoice::Named(n.to_owned()))
            .ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice",
                    "tool_choice object needs function.name: {\"type\": \"function\", \"function\": {\"name\": ...}}",
                )
            }),
        _ => Err(ApiError::invalid(
            "tool_choice",
            "tool_choice is auto, none, required, or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )),
    }
}

/// The name clients call the model by: its `general.name`, else the file
/// name without `.gguf`.
pub fn model_id(m: &ModelInfo) -> String {
    let file = std::path::Path::new(&m.path)
        .file_name()
        .map_or_else(|| m.path.clone(), |f| f.to_string_lossy().into_owned());
    file.strip_suffix(".gguf").unwrap_or(&file).to_owned()
}

/// `GET /v1/models`.
pub fn models(m: &ModelInfo, created: u64) -> Value {
    json!({"object": "list", "data": [model(m, created)]})
}

/// One model object (`GET /v1/models/{id}`).
pub fn model(m: &ModelInfo, created: u64) -> Value {
    json!({
        "id": model_id(m),
        "object": "model",
        "created": created,
        "owned_by": "lfmd",
        "meta": {
            "name": m.name,
            "architecture": m.architecture,
            "file_type": m.file_type,
            "n_params": m.n_params,
            "n_ctx": m.context,
            "n_vocab": m.n_vocab,
        },
    })
}

/// OpenAI's finish reason.
pub fn finish_reason(d: &Done) -> &'static str {
    match d.reason {
        _ if !d.tool_calls.is_empty() => "tool_calls",
        FinishReason::Length | FinishReason::ContextFull => "length",
        _ => "stop",
    }
}

pub fn usage(s: &Stats) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {
            "cached_tokens": s.prompt_tokens.saturating_sub(s.prefilled_tokens),
        },
    })
}

/// Tool calls as OpenAI gives them (`arguments` a JSON string); in a
/// stream each has its `index` in the answer's list.
pub fn tool_calls(calls: &[ToolCall], first_index: Option<usize>) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut v = json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments.to_string()},
                });
                if let Some(base) = first_index {
                    v["index"] = json!(base + i);
                }
                v
            })
            .collect(),
    )
}

/// What every answer of one request shares.
#[derive(Clone, Debug)]
pub struct Answer {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Answer {
    /// An answer object: what every body and chunk of the request shares,
    /// with its `choices` (and `usage`, when given).
    fn envelope(&self, object: &str, choices: Value, usage: Option<&Stats>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": fingerprint(),
            "choices": choices,
        });
        if let Some(s) = usage {
            v["usage"] = self::usage(s);
        }
        v
    }

    /// A whole chat completion.
    pub fn chat(&self, text: &str, done: &Done) -> Value {
        let mut message = json!({"role": "assistant", "content": text, "refusal": null});
        if !done.tool_calls.is_empty() {
            message["tool_calls"] = tool_calls(&done.tool_calls, None);
            if text.is_empty() {
                message["content"] = Value::Null;
            }
        }
        let choice = json!({
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(done),
        });
        self.envelope("chat.completion", json!([choice]), Some(&done.stats))
    }

    /// A chat stream chunk with `delta` (and a finish reason on the last).
    pub fn chat_chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        let choice = json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish});
        self.envelope("chat.completion.chunk", json!([choice]), None)
    }

    /// A whole text completion.
    pub fn completion(&self, text: &str, done: &Done) -> Value {
        let choice = json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason(done)});
        self.envelope("text_completion", json!([choice]), Some(&done.stats))
    }

    /// A text completion stream chunk.
    pub fn completion_chunk(&self, text: &str, finish: Option<&str>) -> Value {
        let choice = json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish});
        self.envelope("text_completion", json!([choice]), None)
    }

    /// The last chunk of a stream with `include_usage`: no choices.
    pub fn usage_chunk(&self, object: &str, stats: &Stats) -> Value {
        self.envelope(object, json!([]), Some(stats))
    }
}

/// Which build answered (OpenAI's `system_fingerprint`).
fn fingerprint() -> String {
    format!("lfmd-{}", env!("CARGO_PKG_VERSION"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Call, ApiError> {
        chat_call(body.as_bytes())
    }

    #[test]
    fn a_plain_chat_request_takes_the_defaults() {
        let c = chat(r#"{"model": "x", "messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
        assert!(!c.stream && !c.include_usage);
        assert_eq!(c.options.sampling, SamplingParams::default());
        assert_eq!(c.options.max_tokens, None);
        let Input::Chat { messages, session } = c.input else {
            panic!()
        };
        assert_eq!(
            (messages[0].role.as_str(), messages[0].content.as_str()),
            ("user", "hi")
        );
        assert_eq!(session, None);
    }

    #[test]
    fn openai_fields_and_lfmd_extras_map_to_options() {
        let c = chat(
            r#"{"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                "stream": true, "stream_options": {"include_usage": true},
                "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5,
                "stop": "END", "seed": 42, "presence_penalty": 0.1, "frequency_penalty": 0.2,
                "n": 1, "logprobs": false, "user": "u", "metadata": {"k": "v"},
                "min_p": 0.05, "repeat_penalty": 1.1, "top_k": 40, "session": "s1", "priority": "background",
                "response_format": {"type": "json_object"}}"#,
        )
        .unwrap();
        assert!(c.stream && c.include_usage);
        assert_eq!(c.priority, Priority::Background);
        let s = &c.options.sampling;
        assert_eq!(
            (s.temperature, s.top_p, s.seed, s.top_k),
            (0.0, 0.5, 42, 40)
        );
        assert_eq!((s.min_p, s.repeat_penalty), (0.05, 1.1));
        assert_eq!((s.presence_penalty, s.frequency_penalty), (0.1, 0.2));
        assert_eq!(c.options.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(c.options.stop, vec!["END".to_owned()]);
        assert_eq!(c.options.format, Some(ResponseFormat::JsonObject));
        let Input::Chat { messages, session } = c.input else {
            panic!()
        };
        assert_eq!(
            (messages[0].role.as_str(), messages[0].content.as_str()),
            ("system", "ab")
        );
        assert_eq!(session.as_deref(), Some("s1"));
    }

    #[test]
    fn tools_and_tool_turns_map_to_the_engines_types() {
        let c = chat(
            r#"{"messages": [
                  {"role": "user", "content": "dim the lights"},
                  {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "set_light", "arguments": "{\"level\": 30}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
                "tools": [{"type": "function", "function": {"name": "set_light", "description": "d", "parameters": {"type": "object", "properties": {"level": {"type": "integer"}}}}}],
                "tool_choice": {"type": "function", "function": {"name": "set_light"}}}"#,
        )
        .unwrap();
        assert_eq!(c.options.tools.len(), 1);
        assert_eq!(c.options.tools[0].name, "set_light");
        assert_eq!(c.options.tool_choice, ToolChoice::Named("set_light".into()));
        let Input::Chat { messages, .. } = c.input else {
            panic!()
        };
        assert_eq!(messages[1].tool_calls[0].arguments, json!({"level": 30}));
        assert_eq!(messages[1].content, "");
        assert_eq!(messages[2].role, "tool");
        for choice in ["\"none\"", "\"required\"", "\"auto\"", "null"] {
            let body = format!(
                r#"{{"messages": [{{"role": "user", "content": "x"}}], "tool_choice": {choice}}}"#
            );
            assert!(chat(&body).is_ok(), "{choice}");
        }
    }

    #[test]
    fn response_formats_map_and_bad_ones_name_the_field() {
        let schema = r#"{"type": "object", "properties": {"a": {"type": "integer"}}}"#;
        let body = format!(
            r#"{{"messages": [{{"role": "user", "content": "x"}}], "response_format": {{"type": "json_schema", "json_schema": {{"name": "n", "strict": true, "schema": {schema}}}}}}}"#
        );
        let c = chat(&body).unwrap();
        let Some(ResponseFormat::JsonSchema(s)) = c.options.format else {
            panic!()
        };
        assert_eq!(
            serde_json::from_str::<Value>(&s).unwrap(),
            serde_json::from_str::<Value>(schema).unwrap()
        );
        let text = chat(r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "text"}}"#).unwrap();
        assert_eq!(text.options.format, None);
        for bad in [
            r#"{"type": "json_schema"}"#,
            r#"{"type": "xml"}"#,
            r#"{"json_schema": {}}"#,
            r#""json""#,
        ] {
            let body = format!(
                r#"{{"messages": [{{"role": "user", "content": "x"}}], "response_format": {bad}}}"#
            );
            let e = chat(&body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e.param.as_deref(), Some("response_format"), "{bad}");
        }
    }

    #[test]
    fn bad_requests_get_400_naming_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("not json", "invalid_json"),
            ("[]", "invalid_json"),
            (r#"{"messages": "hi"}"#, "messages"),
            (r#"{}"#, "missing field `messages`"),
            (r#"{"messages": [{"content": "hi"}]}"#, "role"),
            (
                r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages": [{"role": "user", "content": 5}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}"#,
                "messages[0].content[0]",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
                "temperature",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}"#,
                "max_tokens",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "n": 2}"#,
                "n must be 1",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true}"#,
                "logprobs",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}}"#,
                "logit_bias",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "stop": 5}"#,
                "stop",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "tool_choice": 5}"#,
                "tool_choice",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "priority": "urgent"}"#,
                "priority",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval"}]}"#,
                "tools[0]",
            ),
            (
                r#"{"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]}"#,
                "messages[0].tool_calls[0]",
            ),
        ];
        for (body, says) in cases {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            let all = format!("{} {:?} {:?}", e.message, e.param, e.code);
            assert!(all.contains(says), "{body}: {all}");
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
    }

    #[test]
    fn completions_take_one_string_prompt() {
        let c = completion_call(br#"{"model": "m", "prompt": "Once", "max_tokens": 3}"#).unwrap();
        assert!(matches!(c.input, Input::Prompt { ref text, .. } if text == "Once"));
        assert_eq!(c.options.max_tokens, Some(3));
        assert!(completion_call(br#"{"prompt": ["Once"]}"#).is_ok());
        for (body, says) in [
            (r#"{"prompt": ["a", "b"]}"#, "separate requests"),
            (r#"{"prompt": [1, 2]}"#, "token arrays"),
            (r#"{"prompt": "a", "echo": true}"#, "echo"),
            (r#"{"prompt": "a", "suffix": "z"}"#, "suffix"),
            (r#"{"prompt": "a", "best_of": 3}"#, "best_of"),
            (r#"{"max_tokens": 3}"#, "prompt"),
        ] {
            let e = completion_call(body.as_bytes()).unwrap_err();
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
    }

    #[test]
    fn scheduler_refusals_get_the_status_openai_clients_expect() {
        use crate::scheduler::SessionError;
        let q = ApiError::from_submit(SubmitError::QueueFull {
            queued: 3,
            max_concurrent: 2,
            retry_after: Duration::from_millis(2500),
        });
        assert_eq!(q.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(q.retry_after, Some(Duration::from_millis(2500)));
        assert_eq!(q.body()["error"]["type"], "rate_limit_error");
        let long = ApiError::from_submit(SubmitError::TooLong("x".into()));
        assert_eq!(
            (long.status, long.code),
            (StatusCode::BAD_REQUEST, Some("context_length_exceeded"))
        );
        assert_eq!(
            ApiError::from_submit(SubmitError::ShuttingDown).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            ApiError::from_submit(SubmitError::Session(SessionError::Busy("s".into()))).status,
            StatusCode::CONFLICT
        );
        assert_eq!(
            ApiError::from_submit(SubmitError::Invalid("x".into())).status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ApiError::from_failure(Failure::Internal("x".into())).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
