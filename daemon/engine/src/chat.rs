//! Chat templates: the model's `tokenizer.chat_template` rendered with a real
//! Jinja engine (minijinja) configured like Hugging Face's `apply_chat_template`
//! (trim_blocks, lstrip_blocks, loop controls, `{% generation %}` blocks,
//! Python's `tojson` separators, Python method and `string` semantics), or a
//! built-in LFM2 format when the file has none.
//!
//! A template is untrusted input: rendering is bounded in instructions
//! (fuel), recursion depth and output size.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest, Serde, ValueOrKwargs};
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
    /// An assistant turn's tool calls, shown to the template as
    /// `message.tool_calls` (OpenAI's shape: `{"id", "type": "function",
    /// "function": {"name", "arguments"}}`) for templates that render them
    /// ([`ChatTemplate::renders_tool_calls`]).
    #[serde(skip)]
    pub tool_calls: Vec<crate::tools::ToolCall>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
        }
    }

    /// The message as the template sees it.
    fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::json!({"role": self.role, "content": self.content});
        if !self.tool_calls.is_empty() {
            m["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| {
                    serde_json::json!({"id": c.id, "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments}})
                })
                .collect();
        }
        m
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Its source reads `tool_calls` (LFM2.5's do; LFM2-8B-A1B's does not,
    /// and drops an assistant turn's calls).
    tool_calls: bool,
}

/// Python's `json.dumps(x, ensure_ascii=False)` spacing: ", " and ": ".
///
/// Serializes straight into a buffer capped by the fuel left (one fuel per
/// 64 bytes, as the engine charges for data): a lazily repeated list
/// (`[[0] * 10**8] * 10**8`) fails after the cap instead of walking 10^16
/// items.
fn tojson(
    state: &State,
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, JinjaError> {
    // `tojson(4)` or, as templates written for transformers say, `tojson(indent=4)`.
    let indent = match indent {
        Some(i) => Some(i),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    kwargs.assert_all_used()?;
    pay_for_items(state, value, "tojson")?;
    let mut out = Capped::new(byte_budget(state));
    let done = match indent.and_then(|i| i.as_usize()) {
        Some(n) => {
            let ind = vec![b' '; n.min(16)];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&ind),
            );
            value.serialize(&mut ser)
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PySeparators,
        )),
    };
    if out.overflowed {
        return Err(out_of_budget("tojson"));
    }
    done.map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    charge_bytes(state, out.buf.len())?;
    let text = String::from_utf8(out.buf)
        .map_err(|_| JinjaError::new(ErrorKind::InvalidOperation, "tojson: not UTF-8"))?;
    Ok(Value::from_safe_string(text))
}

/// One fuel pays for this many bytes of data (minijinja's own rate).
const BYTES_PER_FUEL: u64 = 64;

/// Bytes a custom filter or method may produce: what the fuel left pays for,
/// and never more than a whole prompt.
fn byte_budget(state: &State) -> usize {
    let left = state.fuel_levels().map_or(u64::MAX, |(_, left)| left);
    usize::try_from(left.saturating_mul(BYTES_PER_FUEL))
        .unwrap_or(usize::MAX)
        .min(MAX_RENDER_BYTES)
}

fn charge_bytes(state: &State, bytes: usize) -> Result<(), JinjaError> {
    state.consume_fuel((bytes as u64).div_ceil(BYTES_PER_FUEL))
}

fn out_of_budget(what: &str) -> JinjaError {
    JinjaError::new(
        ErrorKind::OutOfFuel,
        format!("{what}: the result is larger than the fuel left pays for"),
    )
}

/// A buffer that refuses to grow past `cap` bytes, as an `io::Write` (for
/// serde_json) and a `fmt::Write` (for `Display`), so that producing a value
/// stops at the cap rather than after the whole value was walked.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
    overflowed: bool,
}

impl Capped {
    fn new(cap: usize) -> Self {
        Capped {
            buf: Vec::new(),
            cap,
            overflowed: false,
        }
    }

    fn push(&mut self, b: &[u8]) -> bool {
        if self.overflowed || self.buf.len() + b.len() > self.cap {
            self.overflowed = true;
            return false;
        }
        self.buf.extend_from_slice(b);
        true
    }
}

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.push(b) {
            Ok(b.len())
        } else {
            Err(std::io::Error::other("over the byte budget"))
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Write for Capped {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.push(s.as_bytes()) {
            Ok(())
        } else {
            Err(std::fmt::Error)
        }
    }
}

/// `value`'s `Display` text, bounded by the fuel left and charged for.
fn bounded_display(state: &State, value: &Value, what: &str) -> Result<String, JinjaError> {
    use std::fmt::Write;
    let mut out = Capped::new(byte_budget(state));
    if write!(out, "{value}").is_err() {
        return Err(out_of_budget(what));
    }
    charge_bytes(state, out.buf.len())?;
    // Only `&str`s went in.
    Ok(String::from_utf8(out.buf).unwrap_or_default())
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
/// `true`, `false`, `none`. Containers are formatted within the fuel left.
fn py_string(state: &State, value: &Value) -> Result<Value, JinjaError> {
    Ok(match value.kind() {
        minijinja::value::ValueKind::Bool if value.is_true() => Value::from("True"),
        minijinja::value::ValueKind::Bool => Value::from("False"),
        minijinja::value::ValueKind::None | minijinja::value::ValueKind::Undefined => {
            Value::from("None")
        }
        minijinja::value::ValueKind::String => value.clone(),
        _ => {
            pay_for_items(state, value, "string")?;
            Value::from(bounded_display(state, value, "string")?)
        }
    })
}

/// Python methods on values (`"-".join(xs)`, `"{:>4}".format(x)`,
/// `xs.count(x)`) as minijinja-contrib's `pycompat` implements them, with
/// the ones whose cost their arguments decide bounded by fuel first:
/// `format` pays for every width and precision it is asked for, `join`
/// builds its string within the fuel left, `count` on a list pays per item.
fn py_method(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, JinjaError> {
    use minijinja::value::ValueKind;
    match (value.kind(), method) {
        (ValueKind::String, "format") => {
            charge_bytes(state, format_spec_bytes(value.as_str().unwrap_or_default()))?;
        }
        (ValueKind::String, "join") => {
            use std::fmt::Write;
            let sep = value.as_str().unwrap_or_default();
            let (items,): (&Value,) = minijinja::value::from_args(args)?;
            let mut out = Capped::new(byte_budget(state));
            for (i, item) in items.try_iter()?.enumerate() {
                state.consume_fuel(1)?;
                let fits = (i == 0 || out.write_str(sep).is_ok()) && write!(out, "{item}").is_ok();
                if !fits {
                    return Err(out_of_budget("join"));
                }
            }
            charge_bytes(state, out.buf.len())?;
            return Ok(Value::from(String::from_utf8(out.buf).unwrap_or_default()));
        }
        (ValueKind::Seq, "count") => {
            // Each comparison is paid for: a byte per 64 of a string needle,
            // and containers (whose comparison walks them) are refused.
            let (needle,): (&Value,) = minijinja::value::from_args(args)?;
            let per_item = match needle.kind() {
                ValueKind::Seq | ValueKind::Map | ValueKind::Iterable | ValueKind::Plain => {
                    return Err(JinjaError::new(
                        ErrorKind::InvalidOperation,
                        "count() of a container is not supported in chat templates",
                    ));
                }
                _ => {
                    1 + needle
                        .as_str()
                        .map_or(0, |s| s.len() as u64 / BYTES_PER_FUEL)
                }
            };
            let mut n = 0usize;
            for item in value.try_iter()? {
                state.consume_fuel(per_item)?;
                n += usize::from(&item == needle);
            }
            return Ok(Value::from(n));
        }
        _ => {}
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// An upper bound on the bytes `str.format` may pad to: the sum of every
/// number written inside a replacement field (widths, precisions, and
/// harmlessly, field indices).
fn format_spec_bytes(fmt: &str) -> usize {
    let mut total = 0usize;
    let mut in_field = false;
    let mut number = 0usize;
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // `{{` and `}}` outside a field are literal braces.
            '{' | '}' if !in_field && chars.peek() == Some(&c) => {
                chars.next();
            }
            '{' => in_field = true,
            '}' => in_field = false,
            _ => {}
        }
        match c.to_digit(10) {
            Some(d) if in_field => number = number.saturating_mul(10).saturating_add(d as usize),
            _ => {
                total = total.saturating_add(number);
                number = 0;
            }
        }
    }
    total.saturating_add(number)
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

/// Built-in filters that visit every item of their input (or, for `first`,
/// of its iterator). minijinja charges them per item as they go, so a lazily
/// repeated list (`[0] * 10**8`: 10^8 items for free) used to run for
/// millions of items before the fuel ran out. In front of each we pay for
/// the input's length up front.
const ITEM_WALKING_FILTERS: &[&str] = &[
    "join",
    "list",
    "sort",
    "unique",
    "reverse",
    "sum",
    "min",
    "max",
    "last",
    "map",
    "select",
    "reject",
    "selectattr",
    "rejectattr",
    "batch",
    "slice",
    "groupby",
    "items",
    "dictsort",
    "pprint",
    "escape",
    "e",
    "format",
];

/// The built-in filter `name` as a callable value.
fn builtin_filter(name: &str) -> Option<Value> {
    use minijinja::filters as f;
    Some(match name {
        "join" => Value::from_function(f::join),
        "list" => Value::from_function(f::list),
        "sort" => Value::from_function(f::sort),
        "unique" => Value::from_function(f::unique),
        "reverse" => Value::from_function(f::reverse),
        "sum" => Value::from_function(f::sum),
        "min" => Value::from_function(f::min),
        "max" => Value::from_function(f::max),
        "last" => Value::from_function(f::last),
        "map" => Value::from_function(f::map),
        "select" => Value::from_function(f::select),
        "reject" => Value::from_function(f::reject),
        "selectattr" => Value::from_function(f::selectattr),
        "rejectattr" => Value::from_function(f::rejectattr),
        "batch" => Value::from_function(f::batch),
        "slice" => Value::from_function(f::slice),
        "groupby" => Value::from_function(f::groupby),
        "items" => Value::from_function(f::items),
        "dictsort" => Value::from_function(f::dictsort),
        "pprint" => Value::from_function(f::pprint),
        "escape" | "e" => Value::from_function(f::escape),
        "format" => Value::from_function(f::format),
        _ => return None,
    })
}

/// Fails unless the fuel left pays for one fuel per item of `value` (a
/// sequence, map or sized iterable; strings and scalars pass).
fn pay_for_items(state: &State, value: &Value, what: &str) -> Result<(), JinjaError> {
    use minijinja::value::ValueKind;
    if !matches!(
        value.kind(),
        ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
    ) {
        return Ok(());
    }
    let items = value.len().unwrap_or(0) as u64;
    let left = state.fuel_levels().map_or(u64::MAX, |(_, left)| left);
    if items >= left {
        return Err(JinjaError::new(
            ErrorKind::OutOfFuel,
            format!("{what}: {items} items are more than the fuel left ({left}) pays for"),
        ));
    }
    Ok(())
}

/// Prints `{{ value }}`: containers through [`bounded_display`] (their
/// items paid for first), everything else as minijinja does.
fn bounded_formatter(
    out: &mut minijinja::Output,
    state: &mut State,
    value: &Value,
) -> Result<(), JinjaError> {
    use minijinja::value::ValueKind;
    if matches!(
        value.kind(),
        ValueKind::Seq | ValueKind::Map | ValueKind::Iterable
    ) {
        pay_for_items(state, value, "printing")?;
        let text = bounded_display(state, value, "printing")?;
        return std::fmt::Write::write_str(out, &text)
            .map_err(|_| JinjaError::new(ErrorKind::WriteFailure, "writing the prompt failed"));
    }
    minijinja::escape_formatter(out, state, value)
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
        for &name in ITEM_WALKING_FILTERS {
            let Some(builtin) = builtin_filter(name) else {
                continue;
            };
            env.add_filter(name, move |state: &mut State, args: Rest<ValueOrKwargs>| {
                let args = args.into_values();
                for arg in &args {
                    pay_for_items(state, arg, name)?;
                }
                builtin.call(state, &args)
            });
        }
        env.set_formatter(bounded_formatter);
        env.add_filter("tojson", tojson);
        env.add_filter("string", py_string);
        env.set_unknown_method_callback(py_method);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", rewrite_generation_tags(source))
            .map_err(|e| ChatError::Compile(e.to_string()))?;
        Ok(ChatTemplate {
            env,
            tool_calls: source.contains("tool_calls"),
        })
    }

    /// Whether the template renders an assistant turn's `tool_calls` (else
    /// they must be in its content, as the model writes them).
    pub fn renders_tool_calls(&self) -> bool {
        self.tool_calls
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
        let messages =
            serde_json::Value::Array(messages.iter().map(ChatMessage::to_json).collect());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders `src` over one short message; it must fail, with an error
    /// that names the limit that stopped it. Every limit here is reached
    /// within `RENDER_FUEL` instructions and `MAX_RENDER_BYTES` (or, for
    /// fuel, an allocation budget of `RENDER_FUEL * 64` bytes), so each case
    /// ends in bounded time and memory by construction, not by a timer.
    #[track_caller]
    fn stopped_by(src: &str, limit: &str) {
        let msgs = [ChatMessage::new("user", "hi")];
        let e = ChatTemplate::new(src)
            .and_then(|t| t.render(&msgs, None, true, ""))
            .expect_err(src);
        let text = format!("{e:#}");
        assert!(text.contains(limit), "{src}\n  stopped by: {text}");
    }

    const FUEL: &str = "ran out of fuel";

    #[test]
    fn huge_loops_are_refused_or_run_out_of_fuel() {
        stopped_by(
            "{% for i in range(10**9) %}x{% endfor %}",
            "too many elements",
        );
        stopped_by(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            FUEL,
        );
        // Found by the fuzzer (a 10 s timeout under ASan).
        stopped_by(
            "{]%\u{fe} for i in{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %})%  rangendfe(10**9or %}) s%}x{% endfor %}",
            FUEL,
        );
        // Lazily repeated lists have no range cap: fuel per iteration.
        stopped_by("{% for x in [0] * 10**8 %}{% endfor %}", FUEL);
        stopped_by(
            "{% for x in [[0] * 10**8] * 10**8 %}{% for y in x %}{% endfor %}{% endfor %}",
            FUEL,
        );
        // A loop that calls itself without end.
        stopped_by(
            "{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}",
            "recursion limit",
        );
    }

    #[test]
    fn recursion_hits_the_limit() {
        stopped_by(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion limit",
        );
        stopped_by(
            "{% macro f(n) %}{{ f(n) ~ f(n) }}{% endmacro %}{{ f(0) }}",
            "recursion limit",
        );
        // Mutual recursion, and a macro doubling its output at every level
        // (2^64 bytes if unbounded).
        stopped_by(
            "{% macro a() %}{{ b() }}{% endmacro %}{% macro b() %}{{ a() }}{% endmacro %}{{ a() }}",
            "recursion limit",
        );
        stopped_by(
            "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% else %}x{% endif %}{% endmacro %}{{ f(0) }}",
            "",
        );
    }

    #[test]
    fn huge_strings_are_refused_before_they_exist() {
        stopped_by("{{ 'x' * 10**9 }}", FUEL);
        stopped_by("{{ 'x' * 10**18 }}", FUEL);
        // 10^8 bytes may be built, but not written out nor built twice.
        stopped_by("{{ 'x' * 10**8 }}", "");
        stopped_by("{% set a = 'x' * 10**8 %}{% set b = a ~ a %}", FUEL);
        // Doubling a string in a loop.
        stopped_by(
            "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            FUEL,
        );
        // Nested loops building output.
        stopped_by(
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'abcdefgh' * 1000 }}{% endfor %}{% endfor %}",
            "",
        );
    }

    #[test]
    fn filters_and_methods_of_ours_are_bounded() {
        // Our `tojson` and `string` walk lazily repeated lists: 10^16 items.
        stopped_by("{{ ([[0] * 10**8] * 10**8)|tojson }}", FUEL);
        stopped_by("{{ ([[0] * 10**8] * 10**8)|tojson(indent=4) }}", FUEL);
        stopped_by("{{ ([[0] * 10**8] * 10**8)|string }}", FUEL);
        // pycompat's methods, bounded by ours in front of them.
        stopped_by("{{ ''.join([[0] * 10**8] * 10**8) }}", FUEL);
        stopped_by("{{ ''.join([''] * 10**8) }}", FUEL);
        stopped_by("{{ '{:>99999999999999}'.format(1) }}", FUEL);
        stopped_by("{{ '{0:.99999999999f}'.format(1.5) }}", FUEL);
        // 10^5 counts over 10^5 items: 10^10 comparisons unless paid for.
        stopped_by(
            "{% set t = (0,) * 10**5 %}{% for i in range(10**5) %}{{ t.count(1) }}{% endfor %}",
            FUEL,
        );
        stopped_by("{{ [[0]].count([0] * 10**8) }}", "container");
        // Built-ins of minijinja itself that size their output up front.
        stopped_by("{{ 'x'|indent(10**12) }}", "");
        stopped_by("{{ 'ab'|replace('', 'x' * 10**6) * 1000 }}", "");
    }

    /// minijinja's own filters charge per item as they walk, and printing a
    /// container charged nothing until it was written: on a lazily repeated
    /// list (10^8 items, free to make) each ran for millions of items first.
    /// Now they pay for the input's length before walking it, so each of
    /// these fails at once with the fuel error that names the filter.
    #[test]
    fn walking_a_huge_lazy_list_is_paid_for_up_front() {
        let items = "100000000 items are more than the fuel left";
        for f in [
            "join",
            "join(',')",
            "list",
            "sort",
            "unique",
            "reverse",
            "sum",
            "min",
            "max",
            "last",
            "map('string')",
            "select",
            "reject",
            "selectattr('x')",
            "batch(3)",
            "slice(3)",
            "groupby('x')",
            "items",
            "pprint",
            "e",
            "tojson",
            "string",
            "sort(attribute='x', reverse=true)",
        ] {
            let name = f.split('(').next().unwrap();
            stopped_by(
                &format!("{{{{ ([0] * 10**8)|{f} }}}}"),
                &format!("{name}: {items}"),
            );
        }
        stopped_by("{{ [0] * 10**8 }}", &format!("printing: {items}"));
        stopped_by("{{ ([0] * 10**8) + [1] }}", "printing: 100000001 items");
        stopped_by(
            "{{ '%s'|format([0] * 10**8) }}",
            &format!("format: {items}"),
        );
        stopped_by("{{ [[0] * 10**8] * 10**8 }}", "printing: 100000000 items");
        // Not covered (operators, which a template cannot override):
        // `1 in [0] * 10**8`, `([0] * 10**8) == ([0] * 10**8)` and
        // `([0] * 10**8) ~ 'x'` walk the 10^8 items (tens of seconds)
        // before the fuel stops them; see fuzz/README.md.
    }

    #[test]
    fn ordinary_use_of_the_bounded_filters_is_unchanged() {
        let t = ChatTemplate::new(concat!(
            "{{ tools|tojson }}|{{ tools|tojson(indent=2) }}|{{ [1, none, true]|string }}|",
            "{{ true|string }}|{{ '-'.join(['a', 1, [2]]) }}|{{ '{:>4}|{:.2f}|{{x}}'.format(7, 1.5) }}|",
            "{{ [1, 2, 1].count(1) }}|{{ 'aXbXc'.split('X')|length }}|",
            "{{ [3, 1, 2]|sort(reverse=true)|join(',') }}|{{ [{'a': 2}, {'a': 1}]|sort(attribute='a')|map(attribute='a')|join }}|",
            "{{ [1, 2] }}|{{ {'k': 'v'} }}|{{ [1, 2, 3]|sum(start=10) }}|{{ '%s-%d'|format('a', 3) }}"
        ))
        .unwrap();
        let tools = serde_json::json!([{"name": "f", "b": [1, 2], "a": null}]);
        let out = t.render(&[], Some(&tools), false, "").unwrap();
        assert_eq!(
            out,
            "[{\"name\": \"f\", \"b\": [1, 2], \"a\": null}]|[\n  {\n    \"name\": \"f\",\n    \"b\": [\n      1,\n      2\n    ],\n    \"a\": null\n  }\n]|[1, None, True]|True|a-1-[2]|   7|1.50|{x}|2|3|3,2,1|12|[1, 2]|{'k': 'v'}|16|a-3"
        );
    }

    #[test]
    fn format_spec_bytes_counts_widths_in_fields_only() {
        assert_eq!(format_spec_bytes("{:>10}{0:.5f}"), 15);
        assert_eq!(format_spec_bytes("123 {{456}} {}"), 0);
        assert_eq!(format_spec_bytes("{:99999999999999999999999}"), usize::MAX);
    }

    /// Pieces of templates, hostile and ordinary, glued at random: most
    /// glue does not compile, the rest renders or stops at a limit.
    fn template_piece() -> impl proptest::strategy::Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            "{% for m in messages %}",
            "{% for i in range(10**5) %}",
            "{% for x in [0] * 10**8 %}",
            "{% endfor %}",
            "{% macro f(n) %}",
            "{% endmacro %}",
            "{{ f(1) }}",
            "{{ f(n) ~ f(n) }}",
            "{% if m.role == 'user' %}",
            "{% endif %}",
            "{{ m.content }}",
            "{{ m.content * 10**6 }}",
            "{{ 'x' * 10**7 }}",
            "{{ messages|tojson }}",
            "{{ ([[0] * 10**4] * 10**4)|tojson }}",
            "{{ ([0] * 10**6)|string }}",
            "{{ ''.join(['ab'] * 10**6) }}",
            "{{ '{:>9999999}'.format(1) }}",
            "{% set ns = namespace(s='ab') %}",
            "{% set ns.s = ns.s ~ ns.s %}",
            "{{ ns.s }}",
            "{{ loop.index }}",
            "{{ raise_exception('no') }}",
            "<|im_start|>",
            "text\n",
        ])
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 16, ..Default::default() })]

        #[test]
        fn glued_templates_end_in_an_error_or_a_bounded_prompt(
            pieces in proptest::collection::vec(template_piece(), 1..10),
            content in "[a-z<|> ]{0,12}",
        ) {
            let src = pieces.concat();
            let msgs = [ChatMessage::new("user", content)];
            if let Ok(t) = ChatTemplate::new(&src)
                && let Ok(out) = t.render(&msgs, None, true, "<s>")
            {
                proptest::prop_assert!(out.len() <= MAX_RENDER_BYTES);
            }
        }
    }
}
