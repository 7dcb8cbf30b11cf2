//! Chat templates render exactly as Python's jinja2 does under Hugging Face's
//! settings (goldens from scripts/chat-goldens.py), and hostile templates are
//! stopped by fuel, recursion and size limits.

use lfm_engine::chat::{ChatError, ChatMessage, ChatTemplate};
use std::path::Path;

fn data() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests"))
}

#[test]
fn every_template_renders_like_jinja2() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data().join("data/chat-cases.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(data().join("data/chat-templates")).unwrap() {
        let path = entry.unwrap().path();
        let tname = path.file_stem().unwrap().to_string_lossy().into_owned();
        let tmpl = ChatTemplate::new(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for case in cases.as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let want =
                std::fs::read_to_string(data().join(format!("goldens/chat/{tname}__{name}.txt")))
                    .unwrap();
            let got = tmpl.render_json(
                &case["messages"],
                case.get("tools"),
                case["add_generation_prompt"].as_bool().unwrap(),
                "<|startoftext|>",
            );
            match got {
                Ok(text) => assert_eq!(text, want, "{tname} / {name}"),
                Err(e) => assert!(want.starts_with("!ERROR"), "{tname} / {name}: {e}"),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 27);
}

/// Messages with tool calls given as `ChatMessage`s (as the daemon's edges
/// build them) render exactly as their JSON does through jinja2: the
/// goldens of the tool-call case, on every template.
#[test]
fn tool_call_turns_render_like_jinja2() {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data().join("data/chat-cases.json")).unwrap(),
    )
    .unwrap();
    let case = cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tool_call_and_response")
        .unwrap();
    let messages: Vec<ChatMessage> = case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let mut msg =
                ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap());
            for c in m
                .get("tool_calls")
                .and_then(|c| c.as_array())
                .into_iter()
                .flatten()
            {
                msg.tool_calls.push(lfm_engine::tools::ToolCall {
                    id: String::new(),
                    name: c["function"]["name"].as_str().unwrap().into(),
                    arguments: c["function"]["arguments"].clone(),
                });
            }
            msg
        })
        .collect();
    assert!(messages.iter().any(|m| !m.tool_calls.is_empty()));
    let mut checked = 0;
    for entry in std::fs::read_dir(data().join("data/chat-templates")).unwrap() {
        let path = entry.unwrap().path();
        let tname = path.file_stem().unwrap().to_string_lossy().into_owned();
        let tmpl = ChatTemplate::new(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let want = std::fs::read_to_string(
            data().join(format!("goldens/chat/{tname}__tool_call_and_response.txt")),
        )
        .unwrap();
        let got = tmpl
            .render(&messages, case.get("tools"), true, "<|startoftext|>")
            .unwrap();
        assert_eq!(got, want, "{tname}");
        // Which templates show the calls themselves decides whether the
        // daemon writes them into the content.
        assert_eq!(
            tmpl.renders_tool_calls(),
            want.contains("<|tool_call_start|>"),
            "{tname}"
        );
        checked += 1;
    }
    assert_eq!(checked, 3);
}

#[test]
fn builtin_template_is_lfm2() {
    let t = ChatTemplate::builtin();
    let out = t
        .render(
            &[
                ChatMessage::new("system", "S"),
                ChatMessage::new("user", "U"),
            ],
            None,
            true,
            "<|startoftext|>",
        )
        .unwrap();
    assert_eq!(
        out,
        "<|startoftext|><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn hostile_templates_are_bounded() {
    let msgs = [ChatMessage::new("user", "x")];
    let render = |src: &str| ChatTemplate::new(src).and_then(|t| t.render(&msgs, None, true, ""));
    // An endless-ish loop runs out of fuel.
    let e = render(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    )
    .unwrap_err();
    assert!(matches!(e, ChatError::Render(_)), "{e}");
    // Unbounded recursion hits the recursion limit.
    let e = render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").unwrap_err();
    assert!(matches!(e, ChatError::Render(_)), "{e}");
    // Huge output is cut off.
    let e = render("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}").unwrap_err();
    assert!(
        matches!(e, ChatError::OutputTooLarge | ChatError::Render(_)),
        "{e}"
    );
    // Syntax errors are compile errors, and raise_exception is an error.
    assert!(matches!(render("{% if %}"), Err(ChatError::Compile(_))));
    let e = render("{{ raise_exception('no system role') }}").unwrap_err();
    assert!(e.to_string().contains("no system role"), "{e}");
    assert!(matches!(
        ChatTemplate::new(&"x".repeat(300_000)),
        Err(ChatError::TooLarge(_))
    ));
}
