#!/usr/bin/env python3
"""Renders daemon/engine/tests/data/chat-cases.json through every template in
daemon/engine/tests/data/chat-templates/ with Python's jinja2, configured as Hugging
Face's apply_chat_template does, and writes daemon/engine/tests/goldens/chat/.
Run with a Python that has jinja2 (e.g. the reference venv:
/tmp/lfm-ref/venv/bin/python scripts/chat-goldens.py)."""
import json, os, sys
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "daemon", "engine", "tests")
out_dir = os.path.join(root, "goldens", "chat")
os.makedirs(out_dir, exist_ok=True)

def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

class AssistantTracker(Extension):
    # As in transformers: {% generation %}...{% endgeneration %} renders its body.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()

env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception

cases = json.load(open(os.path.join(root, "data", "chat-cases.json"), encoding="utf-8"))
tdir = os.path.join(root, "data", "chat-templates")
for tname in sorted(os.listdir(tdir)):
    tmpl = env.from_string(open(os.path.join(tdir, tname), encoding="utf-8").read())
    for case in cases:
        try:
            text = tmpl.render(messages=case["messages"], tools=case.get("tools"),
                               add_generation_prompt=case["add_generation_prompt"],
                               bos_token="<|startoftext|>", eos_token="<|im_end|>")
        except Exception as e:  # recorded: our renderer must fail too
            text = "!ERROR " + type(e).__name__
        name = f"{tname.removesuffix('.jinja')}__{case['name']}.txt"
        with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="") as f:
            f.write(text)
print(f"wrote {len(cases)} cases x {len(os.listdir(tdir))} templates to {out_dir}")
