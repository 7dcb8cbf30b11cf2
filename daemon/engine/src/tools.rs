//! LFM2 tool calls: the tools a request offers (checked), the grammar of a
//! call list as the model writes it after `<|tool_call_start|>` —
//! `[name(arg=value, ...), ...]<|tool_call_end|>`, Python call syntax, each
//! value a JSON value valid against that argument's schema — and the parser
//! that turns such text back into calls with JSON arguments.

use serde_json::{Map, Value};

/// A tool the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: String,
    /// A JSON Schema of type object: the call's keyword arguments.
    pub parameters: Value,
}

/// A call the model made.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// Names the call for the `tool` message that answers it (unique in
    /// the daemon's lifetime; empty from [`parse_calls`]).
    pub id: String,
    pub name: String,
    /// The keyword arguments as a JSON object.
    pub arguments: Value,
}

/// Whether and how the model may call tools.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// As it decides; a call it opens keeps to the tools' schemas.
    #[default]
    Auto,
    /// Never (the tools are still shown to it).
    None,
    /// At least one call, from the first token.
    Required,
    /// A call of this tool, from the first token.
    Named(String),
}

impl std::str::FromStr for ToolChoice {
    type Err = std::convert::Infallible;
    /// `auto`, `none`, `required`, or a tool's name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "" | "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            name => ToolChoice::Named(name.to_owned()),
        })
    }
}

/// The tokens LFM2 writes around a call list.
pub const CALL_START: &str = "<|tool_call_start|>";
pub const CALL_END: &str = "<|tool_call_end|>";

/// The tools as the chat template shows them to the model: the JSON of
/// OpenAI-style function descriptions, as Hugging Face's
/// `apply_chat_template(tools=...)` passes them.
pub fn tools_json(tools: &[Tool]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| {
                let mut f = Map::new();
                f.insert("name".into(), Value::String(t.name.clone()));
                if !t.description.is_empty() {
                    f.insert("description".into(), Value::String(t.description.clone()));
                }
                let params = if t.parameters.is_null() {
                    serde_json::json!({"type": "object", "properties": {}})
                } else {
                    t.parameters.clone()
                };
                f.insert("parameters".into(), params);
                serde_json::json!({"type": "function", "function": Value::Object(f)})
            })
            .collect(),
    )
}

/// Calls as the model writes them, markers included
/// (`<|tool_call_start|>[f(a=1, b="x")]<|tool_call_end|>`): an assistant
/// turn's calls in a conversation sent back. Arguments that are not an
/// object are refused by the caller's checks before this.
pub fn render_calls(calls: &[ToolCall]) -> String {
    let list: Vec<String> = calls
        .iter()
        .map(|c| {
            let args: Vec<String> = c
                .arguments
                .as_object()
                .map(|o| o.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            format!("{}({})", c.name, args.join(", "))
        })
        .collect();
    format!("{CALL_START}[{}]{CALL_END}", list.join(", "))
}

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 64;
/// Most calls in one list the grammar lets the model write.
pub const MAX_CALLS: usize = 8;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ToolError {
    #[error(
        "tool {index} is named {name:?}: a tool name is an identifier (letters, digits, _; not starting with a digit), up to 64 bytes"
    )]
    BadName { index: usize, name: String },
    #[error("two tools are named {0:?}: give each tool its own name")]
    Duplicate(String),
    #[error(
        "tool {name:?}: parameters must be a JSON Schema of type \"object\" (or absent), got {got}"
    )]
    NotObject { name: String, got: String },
    #[error(
        "tool {name:?}: parameter {param:?} is not an identifier, so it cannot be a keyword argument in LFM2's call syntax"
    )]
    BadParameter { name: String, param: String },
    #[error("{0} tools offered; at most {MAX_TOOLS}")]
    TooMany(usize),
    #[error("tool_choice names {0:?}, which is not among the tools")]
    UnknownChoice(String),
    #[error("the tool call {text:?} does not parse at byte {at}: {why}")]
    Parse {
        text: String,
        at: usize,
        why: &'static str,
    },
}

fn is_identifier(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c == b'_' || c.is_ascii_alphabetic())
        && b.all(|c| c == b'_' || c.is_ascii_alphanumeric())
        && s.len() <= 64
}

/// Refuses tools a call grammar cannot be built for: names that are not
/// identifiers or repeat, parameters that are not an object schema or have
/// names that cannot be keyword arguments.
/// A tool as the edges' JSON gives it: `{"name", "description",
/// "parameters"}`, or OpenAI's `{"type": "function", "function": {...}}`.
/// `Err` says what is wrong (checked further by [`check_tools`]).
pub fn tool_from_json(v: &Value) -> Result<Tool, String> {
    match v.get("type").and_then(Value::as_str) {
        None | Some("function") => {}
        Some(k) => return Err(format!("has type {k:?}; only function tools exist")),
    }
    let f = v.get("function").unwrap_or(v);
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or("has no \"name\" string")?;
    Ok(Tool {
        name: name.to_owned(),
        description: f
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        parameters: f.get("parameters").cloned().unwrap_or(Value::Null),
    })
}

/// A call as the edges' JSON gives it back: `{"id", "name", "arguments"}`,
/// or OpenAI's `{"id", "type": "function", "function": {"name",
/// "arguments"}}`; `arguments` a JSON object or a string holding one
/// (OpenAI's), absent, null or empty for none.
pub fn call_from_json(v: &Value) -> Result<ToolCall, String> {
    let f = v.get("function").unwrap_or(v);
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or("has no \"name\" string")?;
    let arguments = match f.get("arguments") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) if s.trim().is_empty() => Value::Object(Map::new()),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(Value::is_object)
            .ok_or("has arguments that are not a JSON object")?,
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => return Err("has arguments that are not a JSON object".into()),
    };
    Ok(ToolCall {
        id: v
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        name: name.to_owned(),
        arguments,
    })
}

pub fn check_tools(tools: &[Tool]) -> Result<(), ToolError> {
    if tools.len() > MAX_TOOLS {
        return Err(ToolError::TooMany(tools.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for (index, t) in tools.iter().enumerate() {
        if !is_identifier(&t.name) {
            return Err(ToolError::BadName {
                index,
                name: t.name.clone(),
            });
        }
        if !seen.insert(&t.name) {
            return Err(ToolError::Duplicate(t.name.clone()));
        }
        let not_object = |got: String| ToolError::NotObject {
            name: t.name.clone(),
            got,
        };
        match &t.parameters {
            Value::Null => {}
            Value::Object(o) => {
                match o.get("type") {
                    None => {}
                    Some(Value::String(s)) if s == "object" => {}
                    Some(other) => return Err(not_object(format!("type {other}"))),
                }
                if let Some(props) = o.get("properties") {
                    let Some(props) = props.as_object() else {
                        return Err(not_object("\"properties\" that is not an object".into()));
                    };
                    if let Some(p) = props.keys().find(|p| !is_identifier(p)) {
                        return Err(ToolError::BadParameter {
                            name: t.name.clone(),
                            param: p.clone(),
                        });
                    }
                }
            }
            other => return Err(not_object(kind_of(other).into())),
        }
    }
    Ok(())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The Lark grammar (llguidance's dialect) of what follows
/// `<|tool_call_start|>` (with `opening`, that token first): a list of
/// calls to `tools` (only `only`, when given) and `<|tool_call_end|>`.
/// Arguments come in the schema's order, the required ones always, each
/// value JSON valid against its schema.
pub fn call_grammar(
    tools: &[Tool],
    only: Option<&str>,
    opening: bool,
) -> Result<String, ToolError> {
    check_tools(tools)?;
    if let Some(name) = only
        && !tools.iter().any(|t| t.name == name)
    {
        return Err(ToolError::UnknownChoice(name.to_owned()));
    }
    let mut g = format!(
        "start: {}\"[\" call (\", \" call){{0,{}}} \"]\" {CALL_END}\n",
        if opening {
            format!("{CALL_START} ")
        } else {
            String::new()
        },
        MAX_CALLS - 1
    );
    let chosen: Vec<(usize, &Tool)> = tools
        .iter()
        .enumerate()
        .filter(|(_, t)| only.is_none_or(|n| n == t.name))
        .collect();
    let alts: Vec<String> = chosen.iter().map(|(i, _)| format!("t{i}")).collect();
    g += &format!("call: {}\n", alts.join(" | "));
    for (i, t) in chosen {
        let props: Vec<(&String, &Value)> = t
            .parameters
            .get("properties")
            .and_then(Value::as_object)
            .map(|o| o.iter().collect())
            .unwrap_or_default();
        let required: Vec<&str> = t
            .parameters
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let n = props.len();
        g += &format!("t{i}: \"{}(\" t{i}_l0 \")\"\n", t.name);
        // l_k: arguments k.. with no comma before the first; c_k: the same
        // after at least one argument (each with its comma).
        for (k, (name, schema)) in props.iter().enumerate() {
            let schema = crate::constraint::json_layout((*schema).clone());
            g += &format!("t{i}_a{k}: \"{name}=\" %json {schema}\n");
            let next = k + 1;
            let (l, c) = (format!("t{i}_l{next}"), format!("t{i}_c{next}"));
            if required.contains(&name.as_str()) {
                g += &format!("t{i}_l{k}: t{i}_a{k} {c}\n");
                g += &format!("t{i}_c{k}: \", \" t{i}_a{k} {c}\n");
            } else {
                g += &format!("t{i}_l{k}: t{i}_a{k} {c} | {l}\n");
                g += &format!("t{i}_c{k}: \", \" t{i}_a{k} {c} | {c}\n");
            }
        }
        g += &format!("t{i}_l{n}: \"\"\nt{i}_c{n}: \"\"\n");
    }
    Ok(g)
}

/// Parses a call list as the model writes it between the tool-call tokens:
/// `[name(arg=value, ...), ...]`, values as JSON or as Python literals
/// (`True`, `False`, `None`, single-quoted strings, tuples as lists).
pub fn parse_calls(text: &str) -> Result<Vec<ToolCall>, ToolError> {
    let mut p = Parser {
        s: text.as_bytes(),
        at: 0,
        text,
    };
    let calls = p.calls()?;
    p.ws();
    if p.at != p.s.len() {
        return Err(p.fail("text after the call list"));
    }
    Ok(calls)
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
    text: &'a str,
}

impl Parser<'_> {
    fn fail(&self, why: &'static str) -> ToolError {
        ToolError::Parse {
            text: self.text.chars().take(200).collect(),
            at: self.at,
            why,
        }
    }

    fn ws(&mut self) {
        while self.s.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.at) == Some(&c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8, why: &'static str) -> Result<(), ToolError> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.fail(why))
        }
    }

    fn ident(&mut self) -> Result<String, ToolError> {
        self.ws();
        let start = self.at;
        while self
            .s
            .get(self.at)
            .is_some_and(|&c| c == b'_' || c.is_ascii_alphanumeric())
        {
            self.at += 1;
        }
        let id = &self.text[start..self.at];
        if is_identifier(id) {
            Ok(id.to_owned())
        } else {
            Err(self.fail("expected a name"))
        }
    }

    fn calls(&mut self) -> Result<Vec<ToolCall>, ToolError> {
        self.expect(b'[', "expected '[' to open the call list")?;
        let mut calls = Vec::new();
        if self.eat(b']') {
            return Ok(calls);
        }
        loop {
            let name = self.ident()?;
            self.expect(b'(', "expected '(' after the tool's name")?;
            let mut args = Map::new();
            if !self.eat(b')') {
                loop {
                    let key = self.ident()?;
                    self.expect(b'=', "expected '=' after an argument's name")?;
                    let v = self.value(0)?;
                    args.insert(key, v);
                    if self.eat(b')') {
                        break;
                    }
                    self.expect(b',', "expected ',' or ')' after an argument")?;
                }
            }
            calls.push(ToolCall {
                id: String::new(),
                name,
                arguments: Value::Object(args),
            });
            if self.eat(b']') {
                return Ok(calls);
            }
            self.expect(b',', "expected ',' or ']' after a call")?;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, ToolError> {
        if depth > 64 {
            return Err(self.fail("values nested too deep"));
        }
        self.ws();
        match self.s.get(self.at) {
            Some(b'"' | b'\'') => self.string().map(Value::String),
            Some(&open @ (b'[' | b'(')) => {
                self.at += 1;
                let close = if open == b'[' { b']' } else { b')' };
                let mut items = Vec::new();
                if self.eat(close) {
                    return Ok(Value::Array(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    if self.eat(close) {
                        return Ok(Value::Array(items));
                    }
                    self.expect(b',', "expected ',' between items")?;
                    if self.eat(close) {
                        return Ok(Value::Array(items));
                    }
                }
            }
            Some(b'{') => {
                self.at += 1;
                let mut m = Map::new();
                if self.eat(b'}') {
                    return Ok(Value::Object(m));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.expect(b':', "expected ':' after a key")?;
                    m.insert(key, self.value(depth + 1)?);
                    if self.eat(b'}') {
                        return Ok(Value::Object(m));
                    }
                    self.expect(b',', "expected ',' between entries")?;
                }
            }
            _ => {
                let start = self.at;
                while self.s.get(self.at).is_some_and(|&c| {
                    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.' | b'_')
                }) {
                    self.at += 1;
                }
                let word = &self.text[start..self.at];
                Ok(match word {
                    "true" | "True" => Value::Bool(true),
                    "false" | "False" => Value::Bool(false),
                    "null" | "None" => Value::Null,
                    _ => {
                        self.at = start;
                        let n: serde_json::Number = serde_json::from_str(word)
                            .map_err(|_| self.fail("expected a value"))?;
                        self.at += word.len();
                        Value::Number(n)
                    }
                })
            }
        }
    }

    /// A JSON string (double quotes, JSON escapes) or a Python one in
    /// single quotes (`\'` and the JSON escapes).
    fn string(&mut self) -> Result<String, ToolError> {
        let Some(&quote) = self.s.get(self.at) else {
            return Err(self.fail("expected a string"));
        };
        if quote == b'"' {
            let mut de =
                serde_json::Deserializer::from_str(&self.text[self.at..]).into_iter::<String>();
            let s = de
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| self.fail("a string that does not end or has a bad escape"))?;
            self.at += de.byte_offset();
            return Ok(s);
        }
        if quote != b'\'' {
            return Err(self.fail("expected a string"));
        }
        self.at += 1;
        let mut json = String::from("\"");
        loop {
            let Some(&c) = self.s.get(self.at) else {
                return Err(self.fail("a string that does not end"));
            };
            self.at += 1;
            match c {
                b'\'' => break,
                b'\\' if self.s.get(self.at) == Some(&b'\'') => {
                    json.push('\'');
                    self.at += 1;
                }
                b'"' => json.push_str("\\\""),
                _ => {
                    // Copy the whole UTF-8 character.
                    let start = self.at - 1;
                    let len = utf8_len(c);
                    json.push_str(self.text.get(start..start + len).unwrap_or("\u{fffd}"));
                    self.at = start + len;
                }
            }
        }
        json.push('"');
        serde_json::from_str(&json).map_err(|_| self.fail("a string with a bad escape"))
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn tools_and_calls_read_from_both_json_shapes() {
        let plain =
            serde_json::json!({"name": "f", "description": "d", "parameters": {"type": "object"}});
        let openai = serde_json::json!({"type": "function", "function": plain.clone()});
        assert_eq!(
            tool_from_json(&plain).unwrap(),
            tool_from_json(&openai).unwrap()
        );
        assert_eq!(tool_from_json(&plain).unwrap().description, "d");
        assert!(tool_from_json(&serde_json::json!({"type": "retrieval"})).is_err());
        assert!(tool_from_json(&serde_json::json!({"description": "x"})).is_err());
        let a = call_from_json(&serde_json::json!({"id": "c", "name": "f", "arguments": {"x": 1}}))
            .unwrap();
        let b = call_from_json(&serde_json::json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}})).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            call_from_json(&serde_json::json!({"name": "f"}))
                .unwrap()
                .arguments,
            serde_json::json!({})
        );
        for bad in [
            r#"{"name": "f", "arguments": "[1]"}"#,
            r#"{"name": "f", "arguments": 3}"#,
            r#"{"arguments": {}}"#,
        ] {
            assert!(
                call_from_json(&serde_json::from_str(bad).unwrap()).is_err(),
                "{bad}"
            );
        }
    }

    use super::*;
    use serde_json::json;

    fn tool(name: &str, parameters: Value) -> Tool {
        Tool {
            name: name.into(),
            description: String::new(),
            parameters,
        }
    }

    #[test]
    fn calls_parse_in_json_and_python_literals() {
        let calls = parse_calls(
            r#"[set_light(device="hall_light", level=30), get_time(), note(text='it\'s "ok"', tags=('a', 'b'), on=True, off=false, x=None, m={"k": [1.5, -2]})]"#,
        )
        .unwrap();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0].name, "set_light");
        assert_eq!(
            calls[0].arguments,
            json!({"device": "hall_light", "level": 30})
        );
        assert_eq!(calls[1].arguments, json!({}));
        assert_eq!(
            calls[2].arguments,
            json!({"text": "it's \"ok\"", "tags": ["a", "b"], "on": true, "off": false, "x": null, "m": {"k": [1.5, -2]}})
        );
    }

    #[test]
    fn rendered_calls_parse_back() {
        let calls = vec![
            ToolCall {
                id: "a".into(),
                name: "set_light".into(),
                arguments: json!({"device": "hall \"x\"", "level": 30, "tags": ["a"], "on": true}),
            },
            ToolCall {
                id: "b".into(),
                name: "get_time".into(),
                arguments: json!({}),
            },
        ];
        let text = render_calls(&calls);
        let body = text
            .strip_prefix(CALL_START)
            .unwrap()
            .strip_suffix(CALL_END)
            .unwrap();
        let back = parse_calls(body).unwrap();
        for (a, b) in calls.iter().zip(&back) {
            assert_eq!((&a.name, &a.arguments), (&b.name, &b.arguments));
        }
    }

    #[test]
    fn bad_call_text_is_refused_saying_where() {
        for (text, why) in [
            ("set_light(level=3)", "'['"),
            ("[set_light(level=3)", "',' or ']'"),
            ("[set_light(level=)]", "a value"),
            ("[1x(level=3)]", "a name"),
            ("[f(a=\"x)]", "does not end"),
            ("[f()] trailing", "after the call list"),
            // Found by the tool_calls fuzzer: a dict's key at the end.
            ("[f(a={", "expected a string"),
            ("[f(a={'k': 1,", "expected a string"),
        ] {
            let e = parse_calls(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn tools_a_grammar_cannot_serve_are_refused() {
        let ok = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert!(check_tools(&[tool("f", ok.clone()), tool("g", Value::Null)]).is_ok());
        let cases = [
            (vec![tool("set light", ok.clone())], "identifier"),
            (vec![tool("9f", ok.clone())], "identifier"),
            (
                vec![tool("f", ok.clone()), tool("f", ok.clone())],
                "two tools",
            ),
            (vec![tool("f", json!({"type": "array"}))], "type \"object\""),
            (vec![tool("f", json!("x"))], "a string"),
            (
                vec![tool("f", json!({"properties": {"not ok": {}}}))],
                "not an identifier",
            ),
        ];
        for (tools, want) in cases {
            let e = check_tools(&tools).unwrap_err().to_string();
            assert!(e.contains(want), "{tools:?}: {e}");
        }
        let many: Vec<Tool> = (0..=MAX_TOOLS)
            .map(|i| tool(&format!("f{i}"), Value::Null))
            .collect();
        assert!(matches!(check_tools(&many), Err(ToolError::TooMany(_))));
        assert_eq!(
            call_grammar(&[tool("f", ok)], Some("g"), false).unwrap_err(),
            ToolError::UnknownChoice("g".into())
        );
    }
}
