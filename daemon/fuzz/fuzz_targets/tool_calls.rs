//! Tool-call text and tool lists from clients and models: `parse_calls` on
//! any text never panics, and what it parses renders back (`render_calls`)
//! to text that parses to the same calls; a JSON tool list (the bytes after
//! the first NUL) is refused by `check_tools` or gives a call grammar.
#![no_main]

use lfmd::tools::{CALL_END, CALL_START, Tool, call_grammar, check_tools, parse_calls, render_calls};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (calls_text, tools_text) = text.split_once('\0').unwrap_or((&text, ""));
    if let Ok(calls) = parse_calls(calls_text) {
        let rendered = render_calls(&calls);
        let body = &rendered[CALL_START.len()..rendered.len() - CALL_END.len()];
        let again = parse_calls(body).expect("rendered calls parse");
        assert_eq!(calls.len(), again.len());
        for (a, b) in calls.iter().zip(&again) {
            assert_eq!((&a.name, &a.arguments), (&b.name, &b.arguments));
        }
    }
    let Ok(serde_json::Value::Array(list)) = serde_json::from_str::<serde_json::Value>(tools_text)
    else {
        return;
    };
    let tools: Vec<Tool> = list
        .iter()
        .map(|t| Tool {
            name: t.get("name").and_then(|n| n.as_str()).unwrap_or_default().into(),
            description: String::new(),
            parameters: t.get("parameters").cloned().unwrap_or_default(),
        })
        .collect();
    if check_tools(&tools).is_ok() {
        for opening in [false, true] {
            call_grammar(&tools, None, opening).expect("checked tools give a grammar");
        }
    }
});
