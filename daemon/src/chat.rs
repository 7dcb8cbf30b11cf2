//! Chat templates: the model's `tokenizer.chat_template` rendered with a real
//! Jinja engine (minijinja) configured like Hugging Face's `apply_chat_template`
//! (trim_blocks, lstrip_blocks, loop controls, `{% generation %}` blocks,
//! Python's `tojson` separators, Python method and `string` semantics), or a
//! built-in LFM2 format when the file has none.
//!
//! A template is untrusted input: rendering is bounded in instructions
//! (fuel), recursion depth and output size.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error as JinjaError, ErrorKind, State, Value, context};
use serde::Serialize;

/// Instruction budget of one render: generous for real templates (a few
/// dozen instructions per message), fatal for runaway loops.
pub const RENDER_FUEL: u64 = 2_000_000;
/// Largest rendered prompt.
pub const MAX_RENDER_BYTES: usize = 32 << 20;
/// Largest template source.
pub const MAX_TEMPLATE_BYTES: usize = 256 << 10;

/// The LFM2 chat template LiquidAI ships, used when a file has none.
pub const BUILTIN_LFM2_TEMPLATE: &str = include_str!("../assets/lfm2-chat-template.jinja");

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template is {0} bytes; the limit is {MAX_TEMPLATE_BYTES}")]
    TooLarge(usize),
    #[error("chat template does not compile: {0}")]
    Compile(String),
    #[error("rendering the chat template failed: {0}")]
    Render(String),
    #[error("the rendered prompt exceeds {MAX_RENDER_BYTES} bytes")]
    OutputTooLarge,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

/// Python's `json.dumps(x, ensure_ascii=False)` spacing: ", " and ": ".
fn tojson(value: &Value, indent: Option<Value>) -> Result<Value, JinjaError> {
    let v: serde_json::Value = serde_json::to_value(value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let out = match indent.and_then(|i| i.as_usize()) {
        Some(n) => {
            let ind = vec![b' '; n.min(16)];
            let mut buf = Vec::new();
            let mut ser = serde_json::Serializer::with_formatter(
                &mut buf,
                serde_json::ser::PrettyFormatter::with_indent(&ind),
            );
            v.serialize(&mut ser)
                .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8(buf).expect("serde_json writes UTF-8")
        }
        None => {
            let mut buf = Vec::new();
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, PySeparators);
            v.serialize(&mut ser)
                .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8(buf).expect("serde_json writes UTF-8")
        }
    };
    Ok(Value::from_safe_string(out))
}

struct PySeparators;

impl serde_json::ser::Formatter for PySeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// Python's `str()`: `True`, `False`, `None` where Jinja-in-Rust would say
/// `true`, `false`, `none`.
fn py_string(value: &Value) -> Value {
    match value.kind() {
        minijinja::value::ValueKind::Bool if value.is_true() => Value::from("True"),
        minijinja::value::ValueKind::Bool => Value::from("False"),
        minijinja::value::ValueKind::None | minijinja::value::ValueKind::Undefined => {
            Value::from("None")
        }
        _ => Value::from(value.to_string()),
    }
}

/// Transformers' `{% generation %}…{% endgeneration %}` marks assistant text
/// for training masks and renders its body unchanged; minijinja has no custom
/// tags, so it becomes an always-true `if` with the same whitespace control.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body, trail) = split_ws_markers(inner);
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Splits `- body -` / `+ body` style tag interiors into markers and body.
fn split_ws_markers(inner: &str) -> (&str, &str, &str) {
    let lead = if inner.starts_with(['-', '+']) {
        &inner[..1]
    } else {
        ""
    };
    let inner = &inner[lead.len()..];
    let trail = if inner.ends_with(['-', '+']) {
        &inner[inner.len() - 1..]
    } else {
        ""
    };
    (lead, &inner[..inner.len() - trail.len()], trail)
}

fn raise_exception(_: &State, msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {msg}"),
    ))
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, ChatError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(ChatError::TooLarge(source.len()));
        }
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_fuel(Some(RENDER_FUEL));
        env.set_recursion_limit(64);
        env.add_filter("tojson", tojson);
        env.add_filter("string", py_string);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", rewrite_generation_tags(source))
            .map_err(|e| ChatError::Compile(e.to_string()))?;
        Ok(ChatTemplate { env })
    }

    /// The built-in LFM2 template.
    pub fn builtin() -> Self {
        ChatTemplate::new(BUILTIN_LFM2_TEMPLATE).expect("the built-in template compiles")
    }

    /// Renders a conversation of role/content messages. `tools` is a JSON
    /// array of tool descriptions (objects or strings), shown to the model as
    /// the template decides.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        bos_token: &str,
    ) -> Result<String, ChatError> {
        let messages = serde_json::to_value(messages).expect("messages serialize");
        self.render_json(&messages, tools, add_generation_prompt, bos_token)
    }

    /// Renders messages given as JSON (with `tool_calls`, content parts and
    /// whatever else the template reads).
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        bos_token: &str,
    ) -> Result<String, ChatError> {
        let tmpl = self.env.get_template("chat").expect("added in new()");
        let tools = tools.map(|t| Value::from(Serde(t)));
        let ctx = context! {
            messages => Value::from(Serde(messages)),
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => "<|im_end|>",
        };
        let mut out = LimitedWriter { buf: Vec::new() };
        tmpl.render_captured_to(ctx, &mut out).map_err(|e| {
            if out.buf.len() > MAX_RENDER_BYTES {
                ChatError::OutputTooLarge
            } else {
                ChatError::Render(format!("{e:#}"))
            }
        })?;
        String::from_utf8(out.buf).map_err(|_| ChatError::Render("output is not UTF-8".into()))
    }
}

/// Fails the render once the output passes the size limit.
struct LimitedWriter {
    buf: Vec<u8>,
}

impl std::io::Write for LimitedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > MAX_RENDER_BYTES {
            self.buf
                .extend_from_slice(&b[..(MAX_RENDER_BYTES + 1 - self.buf.len()).min(b.len())]);
            return Err(std::io::Error::other("rendered prompt too large"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
