"""The official `openai` package (PyPI) against `lfmd serve --http`, as a user
points it at a local server by base URL, and `/metrics` read by
`prometheus_client`'s OpenMetrics parser.

Usage: openai_interop.py full BASE_URL UNIX_SOCKET
       openai_interop.py basic UNIX_SOCKET

`full`: models, a non-streamed and a streamed chat (equal at temperature 0,
also over the Unix socket), a raw completion, a json_schema answer that
validates, a tool call round trip, OpenAI-shaped errors, cancellation by
closing a stream, 16 concurrent clients answering as they do alone, and the
metrics' counters checked against what this script sent. `basic`: models
and one chat over the Unix socket (a socket passed by socket activation).
Prints "all checks passed" at the end.
"""

import asyncio
import collections
import json
import sys
import threading
import time
import urllib.request

import jsonschema
import openai
from prometheus_client.openmetrics.parser import text_string_to_metric_families

try:  # the HTTP client the openai package is built on (httpx2 from 3.x)
    import httpx2 as httpx
except ImportError:
    import httpx

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)


def unix_client(sock):
    transport = httpx.HTTPTransport(uds=sock)
    return openai.OpenAI(
        base_url="http://lfmd/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport, timeout=60),
    )


def user(text):
    return [{"role": "user", "content": text}]


def basic(sock):
    c = unix_client(sock)
    models = c.models.list()
    check(len(models.data) == 1, f"one model: {models}")
    r = c.chat.completions.create(
        model=models.data[0].id, messages=user("hi"), temperature=0, max_tokens=6
    )
    check(r.choices[0].finish_reason == "length", f"finish: {r}")
    check(r.usage.completion_tokens == 6, f"usage: {r.usage}")


def metrics(base):
    """The exposition parsed: {(name, frozenset(labels)): value}."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def http_requests(m):
    """lfmd_requests_total of the http edge by finish reason."""
    got = collections.Counter()
    for (name, labels), v in m.items():
        labels = dict(labels)
        if name == "lfmd_requests_total" and labels.get("edge") == "http":
            got[labels["finish_reason"]] += int(v)
    return got


def full(base, sock):
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    u = unix_client(sock)
    sent = collections.Counter()

    models = c.models.list()
    check(len(models.data) == 1, f"one model: {models}")
    model = models.data[0].id
    check(c.models.retrieve(model).id == model, "models.retrieve")

    # Non-streamed and streamed: the same answer at temperature 0, on TCP
    # and on the Unix socket.
    msgs = user("Tell me about the lights in the kitchen.")
    r = c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=16)
    sent["length"] += 1
    text = r.choices[0].message.content
    check(isinstance(text, str) and text, f"content: {r}")
    check(r.choices[0].finish_reason == "length", f"finish: {r.choices[0]}")
    check(r.usage.completion_tokens == 16, f"usage: {r.usage}")
    check(r.usage.total_tokens == r.usage.prompt_tokens + 16, f"usage: {r.usage}")
    r2 = u.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=16)
    sent["length"] += 1
    check(r2.choices[0].message.content == text, "the Unix socket answers as TCP does")

    stream = c.chat.completions.create(
        model=model,
        messages=msgs,
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    sent["length"] += 1
    streamed, finish, usage, roles = "", None, None, []
    for chunk in stream:
        check(chunk.object == "chat.completion.chunk", f"chunk object: {chunk}")
        if chunk.choices:
            d = chunk.choices[0].delta
            if d.role:
                roles.append(d.role)
            streamed += d.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    check(streamed == text, f"streamed {streamed!r} != {text!r}")
    check(roles == ["assistant"], f"roles: {roles}")
    check(finish == "length", f"stream finish: {finish}")
    check(usage is not None and usage.completion_tokens == 16, f"stream usage: {usage}")

    # A raw completion.
    comp = c.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    sent["length"] += 1
    check(comp.object == "text_completion", f"completion: {comp}")
    check(comp.usage.completion_tokens == 8, f"completion usage: {comp.usage}")
    pieces = c.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
    )
    sent["length"] += 1
    check("".join(p.choices[0].text for p in pieces) == comp.choices[0].text, "streamed completion")

    # A json_schema answer validates; lfmd's extras go in extra_body.
    schema = {
        "type": "object",
        "properties": {
            "room": {"type": "string", "maxLength": 12},
            "level": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["room", "level"],
        "additionalProperties": False,
    }
    for seed in range(3):
        r = c.chat.completions.create(
            model=model,
            messages=user("Which room, and how bright?"),
            temperature=0.8,
            seed=seed,
            max_tokens=200,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "light", "schema": schema, "strict": True},
            },
            extra_body={"min_p": 0.05, "top_k": 40},
        )
        sent["stop"] += 1
        check(r.choices[0].finish_reason == "stop", f"json finish: {r.choices[0]}")
        try:
            jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        except Exception as e:  # noqa: BLE001 - any failure is the check's
            check(False, f"json_schema answer does not validate: {e}: {r.choices[0].message.content!r}")

    # A tool call round trip.
    params = {
        "type": "object",
        "properties": {
            "room": {"type": "string", "maxLength": 10},
            "level": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["room", "level"],
    }
    tools = [
        {
            "type": "function",
            "function": {"name": "set_light", "description": "Set a light's level", "parameters": params},
        }
    ]
    msgs = user("Dim the kitchen lights to 30%.")
    r = c.chat.completions.create(
        model=model,
        messages=msgs,
        tools=tools,
        tool_choice="required",
        temperature=1.0,
        seed=11,
        max_tokens=400,
        extra_body={"min_p": 0.0},
    )
    sent["tool_calls"] += 1
    choice = r.choices[0]
    check(choice.finish_reason == "tool_calls", f"tool finish: {choice}")
    calls = choice.message.tool_calls or []
    check(len(calls) >= 1, f"tool calls: {choice.message}")
    if calls:
        call = calls[0]
        check(call.type == "function" and call.function.name == "set_light", f"call: {call}")
        check(call.id.startswith("call_"), f"call id: {call.id}")
        try:
            jsonschema.validate(json.loads(call.function.arguments), params)
        except Exception as e:  # noqa: BLE001
            check(False, f"arguments do not validate: {e}: {call.function.arguments!r}")
        follow = msgs + [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "done"},
        ]
        r = c.chat.completions.create(
            model=model, messages=follow, tools=tools, tool_choice="none", temperature=0, max_tokens=8
        )
        sent["length"] += 1
        check(r.choices[0].finish_reason == "length", f"after the call: {r.choices[0]}")
        check(not r.choices[0].message.tool_calls, f"none means none: {r.choices[0].message}")

    # The same call streamed, as assistants that stream tool calls read it
    # (index, id, name, argument fragments accumulated per index).
    stream = c.chat.completions.create(
        model=model,
        messages=msgs,
        tools=tools,
        tool_choice="required",
        temperature=1.0,
        seed=11,
        max_tokens=400,
        extra_body={"min_p": 0.0},
        stream=True,
    )
    sent["tool_calls"] += 1
    acc, finish = {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        for d in chunk.choices[0].delta.tool_calls or []:
            slot = acc.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += d.id or ""
            slot["name"] += (d.function.name or "") if d.function else ""
            slot["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = chunk.choices[0].finish_reason or finish
    check(finish == "tool_calls", f"streamed tool finish: {finish}")
    check(sorted(acc) == list(range(len(acc))) and acc, f"streamed call indexes: {acc}")
    if calls:
        first = acc.get(0, {})
        check(first.get("name") == calls[0].function.name, f"streamed call {first} != {calls[0]}")
        check(
            json.loads(first.get("arguments") or "null") == json.loads(calls[0].function.arguments),
            f"streamed arguments {first} != {calls[0].function.arguments}",
        )

    # The async client streams the same answer.
    async def streamed_async():
        ac = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = ""
        s = await ac.chat.completions.create(
            model=model, messages=user("Tell me about the lights in the kitchen."),
            temperature=0, max_tokens=16, stream=True,
        )
        async for chunk in s:
            if chunk.choices:
                out += chunk.choices[0].delta.content or ""
        await ac.close()
        return out

    sent["length"] += 1
    check(asyncio.run(streamed_async()) == text, "the async client's stream differs")

    # Errors in OpenAI's shape: the package raises its own exceptions.
    try:
        c.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}])
        check(False, "an unknown role was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "messages[0].role" in str(e), f"bad role: {e}")
    try:
        c.chat.completions.create(model=model, messages=user("x"), n=2)
        check(False, "n=2 was accepted")
    except openai.BadRequestError as e:
        check("n must be 1" in str(e), f"n=2: {e}")
    try:
        c.models.retrieve("gpt-4")
        check(False, "an unknown model was found")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"unknown model: {e}")

    # Closing a stream cancels its request before the next engine step.
    stream = c.chat.completions.create(
        model=model,
        messages=user("Go on and on."),
        max_tokens=3000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    sent["cancelled"] += 1
    it = iter(stream)
    next(it)
    next(it)
    stream.close()
    deadline = time.time() + 10
    while True:
        m = metrics(base)
        running = m.get(("lfmd_requests_running", frozenset()), -1)
        cancelled = http_requests(m)["cancelled"]
        if running == 0 and cancelled == 1:
            break
        if time.time() > deadline:
            check(False, f"the closed stream was not cancelled: running {running}, cancelled {cancelled}")
            break
        time.sleep(0.05)

    # 16 clients at once answer as each does alone (temperature 0).
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(16)]
    solo = []
    for p in prompts:
        solo.append(
            c.chat.completions.create(model=model, messages=user(p), temperature=0, max_tokens=12)
            .choices[0]
            .message.content
        )
    sent["length"] += 16
    together = [None] * 16

    def one(i):
        own = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        together[i] = (
            own.chat.completions.create(model=model, messages=user(prompts[i]), temperature=0, max_tokens=12)
            .choices[0]
            .message.content
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent["length"] += 16
    check(together == solo, f"concurrent answers differ from solo: {together} vs {solo}")

    # The counters say exactly what this script sent.
    m = metrics(base)
    got = http_requests(m)
    check(got == sent, f"lfmd_requests_total by finish_reason {dict(got)} != sent {dict(sent)}")
    check(m.get(("lfmd_requests_running", frozenset()), -1) == 0, "nothing running at the end")
    ttft = m.get(("lfmd_time_to_first_token_seconds_count", frozenset()), 0)
    check(ttft == sum(sent.values()), f"time-to-first-token observations {ttft} != {sum(sent.values())}")
    gen = m.get(("lfmd_generated_tokens_total", frozenset()), 0)
    check(gen >= 16 * 3 + 8 * 2 + 32 * 12, f"generated tokens: {gen}")


def main():
    mode = sys.argv[1]
    if mode == "full":
        full(sys.argv[2], sys.argv[3])
    else:
        basic(sys.argv[2])
    if failures:
        print(f"{len(failures)} checks failed")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
