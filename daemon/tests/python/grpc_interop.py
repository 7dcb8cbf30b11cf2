#!/usr/bin/env python3
"""lfmd's gRPC API through grpcio, the Python client from PyPI, written as
its documentation says and with default channel options: health, reflection,
a streamed chat with a session follow-up, the prefix cache, structured output
(a JSON Schema, validated with `jsonschema`), a tool-calling round trip,
tokenize/detokenize, a cancelled
stream, and the shipped example client. Run by daemon/tests/python_grpc.rs
against a real `lfmd serve`; prints `ok NAME` per check and exits non-zero on
the first failure.

    grpc_interop.py SOCKET PROTO_DIR EXAMPLE full|basic
"""

import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

socket, proto_dir, example, mode = sys.argv[1:5]
sys.path.insert(0, proto_dir)
pb, services = grpc.protos_and_services("lfm/v1/lfm.proto")
channel = grpc.insecure_channel("unix:" + socket)
lfm = services.LfmStub(channel)
TIMEOUT = 60


def check(name, fn):
    fn()
    print("ok", name, flush=True)


def health():
    h = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lfm.v1.Lfm"):
        r = h.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert r.status == health_pb2.HealthCheckResponse.SERVING, (service, r)


def reflection():
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    names = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "lfm.v1.Lfm" in names, names
    assert "grpc.health.v1.Health" in names, names
    # The descriptors are usable: a method of lfm.v1.Lfm resolves.
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    chat = pool.FindServiceByName("lfm.v1.Lfm").FindMethodByName("Chat")
    assert chat.output_type.full_name == "lfm.v1.GenerateResponse", chat.output_type.full_name


def turn(content, session):
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=content)],
        options=pb.SamplingOptions(temperature=0.0, max_tokens=6),
        session_id=session,
    )
    text, done = "", None
    for event in lfm.Chat(request, timeout=TIMEOUT):
        if event.HasField("delta"):
            assert done is None, "a delta after Done"
            text += event.delta.text
        else:
            done = event.done
    assert done is not None, "the stream ended without Done"
    return text, done


def chat_session():
    _, first = turn("Hello there", "py-session")
    assert first.stats.generated_tokens == 6, first
    assert first.finish_reason == pb.FINISH_REASON_LENGTH, first
    assert first.session_id == "py-session", first
    _, second = turn("And again?", "py-session")
    s = second.stats
    # The follow-up carries the first turn in its context but prefills only
    # its own new tokens.
    assert s.prompt_tokens > first.stats.prompt_tokens, (first.stats, s)
    assert 0 < s.prefilled_tokens < s.prompt_tokens, s


def prefix_cache():
    system = pb.ChatMessage(
        role="system",
        content=" ".join(f"Rule {i}: keep answers about room {i % 9} short." for i in range(40)),
    )

    def ask(question):
        request = pb.ChatRequest(
            messages=[system, pb.ChatMessage(role="user", content=question)],
            options=pb.SamplingOptions(temperature=0.0, max_tokens=4),
        )
        done = [e.done for e in lfm.Chat(request, timeout=TIMEOUT) if e.HasField("done")]
        assert len(done) == 1, done
        return done[0].stats

    before = lfm.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT).prefix_cache
    assert before.limit_bytes > 0, before
    ask("Is the hall light on?")
    s = ask("Open the garage.")
    # The second question resumes after the cached system prompt.
    assert s.prefilled_tokens < s.prompt_tokens // 4, s
    after = lfm.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT).prefix_cache
    assert after.hits >= before.hits + 1, (before, after)
    assert after.tokens_saved - before.tokens_saved >= s.prompt_tokens - s.prefilled_tokens, after
    assert after.entries > 0 and 0 < after.bytes <= after.limit_bytes, after


LIGHT = {
    "type": "object",
    "properties": {
        "device": {"enum": ["hall_light", "kitchen_light"]},
        "level": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
    },
    "required": ["device", "level"],
    "additionalProperties": False,
}


def response_format():
    """Structured output as a Python program asks for it: a JSON Schema on
    Chat, sampled, 8 requests at once; every answer parses and validates
    (jsonschema, from PyPI); a bad schema is INVALID_ARGUMENT saying why."""
    import concurrent.futures
    import json

    import jsonschema

    def ask(seed):
        request = pb.ChatRequest(
            messages=[pb.ChatMessage(role="user", content="Dim the hall light to 30%")],
            options=pb.SamplingOptions(
                temperature=1.0, min_p=0.0, seed=seed, max_tokens=120,
                response_format=pb.ResponseFormat(json_schema=json.dumps(LIGHT)),
            ),
        )
        text, done = "", None
        for event in lfm.Chat(request, timeout=TIMEOUT):
            if event.HasField("delta"):
                text += event.delta.text
            else:
                done = event.done
        return text, done

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for text, done in answers:
        assert done.finish_reason == pb.FINISH_REASON_STOP, (text, done)
        assert not done.output_incomplete, (text, done)
        jsonschema.validate(json.loads(text), LIGHT)
    # Cut short by max_tokens: said so.
    request = pb.GenerateRequest(
        prompt="Hi",
        options=pb.SamplingOptions(max_tokens=2, response_format=pb.ResponseFormat(json_schema=json.dumps(LIGHT))),
    )
    done = [e.done for e in lfm.Generate(request, timeout=TIMEOUT) if e.HasField("done")][0]
    assert done.finish_reason == pb.FINISH_REASON_LENGTH and done.output_incomplete, done
    # A regular expression.
    request = pb.GenerateRequest(
        prompt="Answer:",
        options=pb.SamplingOptions(temperature=1.0, response_format=pb.ResponseFormat(regex="(yes|no)-[0-9]{2}")),
    )
    text = "".join(e.delta.text for e in lfm.Generate(request, timeout=TIMEOUT) if e.HasField("delta"))
    import re

    assert re.fullmatch("(yes|no)-[0-9]{2}", text), text
    # A schema that is not one.
    bad = pb.GenerateRequest(
        prompt="Hi",
        options=pb.SamplingOptions(response_format=pb.ResponseFormat(json_schema='{"type": "strin"}')),
    )
    try:
        list(lfm.Generate(bad, timeout=TIMEOUT))
        raise AssertionError("a bad schema was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        assert "strin" in e.details(), e.details()


def tool_calls():
    """A tool-calling round trip as a Python program writes it: tools on a
    Chat, the parsed calls (each names a given tool, its arguments validate),
    the results sent back as a tool message in the same session, whose turn
    continues the kept state; bad tools are INVALID_ARGUMENT."""
    import json

    import jsonschema

    tools = [
        pb.Tool(name="set_light", description="Set a light's level", parameters=json.dumps(LIGHT)),
        pb.Tool(name="get_time", description="The time of day"),
    ]
    schemas = {"set_light": LIGHT, "get_time": {"type": "object", "maxProperties": 0}}

    def chat(messages, session, **kw):
        request = pb.ChatRequest(
            messages=messages, tools=tools, session_id=session,
            options=pb.SamplingOptions(temperature=1.0, min_p=0.0, seed=11, max_tokens=400), **kw,
        )
        text, streamed, done = "", [], None
        for event in lfm.Chat(request, timeout=TIMEOUT):
            if event.HasField("delta"):
                text += event.delta.text
                streamed.extend(event.delta.tool_calls)
            else:
                done = event.done
        return text, streamed, done

    text, streamed, done = chat(
        [pb.ChatMessage(role="user", content="Dim the hall light to 30%")], "py-tools",
        tool_choice="required",
    )
    assert done.finish_reason == pb.FINISH_REASON_TOOL_CALLS, (text, done)
    assert len(done.tool_calls) >= 1 and list(streamed) == list(done.tool_calls), (streamed, done)
    assert "tool_call" not in text, text
    for call in done.tool_calls:
        assert call.id and call.name in schemas, call
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    first = done.stats
    # The results go back as tool messages; the session continues its state.
    results = [
        pb.ChatMessage(role="tool", content=json.dumps({"ok": True}), tool_call_id=c.id)
        for c in done.tool_calls
    ]
    text, streamed, done = chat(results, "py-tools", tool_choice="none")
    assert not done.tool_calls and not streamed, done
    s = done.stats
    assert s.prompt_tokens > first.prompt_tokens and 0 < s.prefilled_tokens < s.prompt_tokens, (first, s)
    # Statelessly, the whole conversation with the assistant's calls.
    conversation = [
        pb.ChatMessage(role="user", content="Dim the hall light to 30%"),
        pb.ChatMessage(role="assistant", content="", tool_calls=[
            pb.ToolCall(id="call_a", name="set_light", arguments='{"device": "hall_light", "level": 30}')]),
        pb.ChatMessage(role="tool", content='{"ok": true}', tool_call_id="call_a"),
    ]
    _, _, done = chat(conversation, None, tool_choice="set_light")
    assert [c.name for c in done.tool_calls] and all(c.name == "set_light" for c in done.tool_calls), done
    # Tools a grammar cannot serve, a choice that names none of them.
    for bad, says in [
        (pb.ChatRequest(messages=conversation[:1], tools=[pb.Tool(name="set light")]), "identifier"),
        (pb.ChatRequest(messages=conversation[:1], tools=tools, tool_choice="fly"), "fly"),
        (pb.ChatRequest(messages=conversation[:1], tools=[pb.Tool(name="f", parameters="{")]), "not JSON"),
    ]:
        try:
            list(lfm.Chat(bad, timeout=TIMEOUT))
            raise AssertionError(f"accepted: {bad}")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and says in e.details(), e


def tokenize():
    ids = lfm.Tokenize(pb.TokenizeRequest(text="Hello world", add_bos=False), timeout=TIMEOUT).token_ids
    assert len(ids) > 0
    text = lfm.Detokenize(pb.DetokenizeRequest(token_ids=ids), timeout=TIMEOUT).text
    assert text == "Hello world", text
    with_bos = lfm.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=TIMEOUT).token_ids
    assert list(with_bos) == [1] + list(ids), (list(with_bos), list(ids))


def cancelled_stream():
    call = lfm.Generate(
        pb.GenerateRequest(
            prompt="Count:",
            options=pb.SamplingOptions(max_tokens=100000, ignore_eos=True),
        ),
        timeout=TIMEOUT,
    )
    first = next(call)
    assert first.HasField("delta"), first
    busy = lfm.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT)
    assert busy.active_requests == 1, busy
    call.cancel()
    try:
        for _ in call:
            pass
        raise AssertionError("the cancelled stream went on")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.CANCELLED, e
    # The daemon stops the request and frees its slot.
    t0 = time.monotonic()
    while lfm.GetStatus(pb.GetStatusRequest(), timeout=TIMEOUT).active_requests != 0:
        assert time.monotonic() - t0 < 20, "the cancelled request is still running"
        time.sleep(0.05)
    # And serves the next one.
    _, done = turn("Still there?", None)
    assert done.stats.generated_tokens == 6, done


def example_client():
    out = subprocess.run(
        [sys.executable, example, "--socket", socket, "--proto", proto_dir,
         "--max-tokens", "5", "Hi"],
        capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    assert "# lfmd " in out.stdout, out.stdout
    assert "# first: FINISH_REASON_" in out.stdout, out.stdout
    assert "# follow-up: FINISH_REASON_" in out.stdout, out.stdout


check("health", health)
check("chat_session", chat_session)
if mode == "full":
    check("reflection", reflection)
    check("tokenize", tokenize)
    check("prefix_cache", prefix_cache)
    check("response_format", response_format)
    check("tool_calls", tool_calls)
    check("cancelled_stream", cancelled_stream)
    check("example_client", example_client)
print("all checks passed", flush=True)
