#!/usr/bin/env python3
"""Prefix-cache benchmark: time to first token of chat requests that share a
long system + tools prefix, lfmd (its prefix cache) against llama-server
(`cache_prompt: true`, `-np CLIENTS`), same model, threads and minutes.

Each round uses a prefix of its own (so its first request is cold on both
servers): a system prompt with a dozen tools' JSON schemas, ~PREFIX tokens.
The round sends it once alone (cold), then CLIENTS clients at once each ask
QUESTIONS different questions after the same prefix (warm: the prefix was
seen, the question is new). Rounds alternate between the servers. Reported
per server: cold TTFT (median, range), warm TTFT p50/p99, warm / cold, and
for lfmd the prompt tokens it actually prefilled per warm request
(`Done.stats`), the cache's bytes per cached token, and the decode rate of
the warm requests (the cache must not slow decoding).

Usage: scripts/bench_prefix.py MODEL [--threads T] [--clients 4]
       [--questions 2] [--rounds 2] [--prefix 1500] [--gen 16]
       [--llama-server PATH]
Figures only: nothing here asserts a speed.
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_serve import http_health_up, pct, unix_socket_up, wait_for  # noqa: E402
LFMD = os.path.join(ROOT, "target/release/lfmd")
LFMCTL = os.path.join(ROOT, "target/release/lfmctl")
ROOMS = ["kitchen", "hall", "bedroom", "garage", "office", "garden", "attic", "cellar"]
QUESTIONS = [
    "Is the kitchen light on?", "Turn the heating down two degrees.",
    "What is on my calendar tomorrow?", "Lock the front door.",
    "Play something calm in the office.", "How much power did we use today?",
    "Open the garage for the car.", "Remind me to water the plants at six.",
]


def tool(i):
    room = ROOMS[i % len(ROOMS)]
    return {
        "name": f"set_{room}_{i}",
        "description": f"Sets a device in the {room}: lights, blinds, heating or "
                       f"the speaker; answers with the device's new state.",
        "parameters": {
            "type": "object",
            "properties": {
                "device": {"type": "string", "enum": ["light", "blind", "heater", "speaker"]},
                "level": {"type": "integer", "minimum": 0, "maximum": 100,
                          "description": "brightness, opening, temperature step or volume"},
                "when": {"type": "string", "description": "ISO 8601 time, or now"},
            },
            "required": ["device", "level"],
        },
    }


def prefix(round_, tokens_wanted, count):
    """A system prompt with tools, unique to the round, of about
    `tokens_wanted` tokens (`count` tokenizes)."""
    head = (f"Household {round_}. You are the assistant of a home hub. Answer in one "
            f"short sentence, or call one of these tools:\n")
    tools = []
    text = head
    while True:
        tools.append(json.dumps(tool(len(tools))))
        text = head + "\n".join(tools)
        if count(text) >= tokens_wanted:
            return text


def at_once(n, one):
    out, lock = [], threading.Lock()

    def run(i):
        r = one(i)
        with lock:
            out.append(r)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


class Lfmd:
    def __init__(self, args):
        self.tmp = tempfile.mkdtemp(prefix="lfmd-prefix.")
        self.sock = os.path.join(self.tmp, "lfmd.sock")
        self.args = args
        self.proc = subprocess.Popen(
            [LFMD, "serve", "--model", args.model, "--threads", str(args.threads),
             "--grpc", f"unix:{self.sock}", "--max-concurrent", str(args.clients),
             "--ctx", "4096"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: unix_socket_up(self.sock), "lfmd serve")

    def ask(self, system, question):
        out = subprocess.run(
            [LFMCTL, "--socket", f"unix:{self.sock}", "ask", "--system", system,
             "--temperature", "0", "--ignore-eos", "--max-tokens", str(self.args.gen),
             "--json", question],
            capture_output=True, text=True, check=True)
        s = json.loads(out.stdout)["stats"]
        return {"ttft": s["time_to_first_token_seconds"], "prefilled": s["prefilled_tokens"],
                "prompt": s["prompt_tokens"], "decode": s["decode_tokens_per_second"]}

    def status(self):
        out = subprocess.run([LFMCTL, "--socket", f"unix:{self.sock}", "status", "--json"],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def close(self):
        self.proc.terminate()
        self.proc.wait()


class Llama:
    def __init__(self, args, port=18182):
        self.port, self.args = port, args
        self.proc = subprocess.Popen(
            [args.llama_server, "-m", args.model, "-t", str(args.threads),
             "-np", str(args.clients), "-c", str(4096 * args.clients), "--jinja",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: http_health_up(port), "llama-server")

    def ask(self, system, question):
        h = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        body = json.dumps({
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}],
            "max_tokens": self.args.gen, "temperature": 0, "ignore_eos": True,
            "stream": True, "cache_prompt": True, "timings_per_token": True,
        })
        t0 = time.time()
        h.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = h.getresponse()
        ttft, timings = None, {}
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[5:])
            delta = (ev.get("choices") or [{}])[0].get("delta", {})
            if delta.get("content") and ttft is None:
                ttft = time.time() - t0
            timings = ev.get("timings", timings)
        return {"ttft": ttft if ttft is not None else float("nan"),
                "prefilled": timings.get("prompt_n"),
                "prompt": None, "decode": timings.get("predicted_per_second")}

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--questions", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=1500)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--llama-server",
                    default=os.path.join(os.environ.get("LLB", ""), "llama-server"))
    a = ap.parse_args()

    def count(text):
        out = subprocess.run([LFMD, "tokenize", "--model", a.model, text],
                             capture_output=True, text=True, check=True)
        return len(json.loads(out.stdout))

    prefixes = [prefix(r, a.prefix, count) for r in range(a.rounds)]
    print(f"# {a.model}, {a.threads} threads, {a.clients} clients x {a.questions} questions "
          f"per round, {a.rounds} rounds, prefix {count(prefixes[0])} tokens, {a.gen} generated",
          flush=True)
    servers = [("lfmd", Lfmd)]
    if os.path.exists(a.llama_server):
        servers.append(("llama-server", Llama))
    else:
        print(f"# no llama-server at {a.llama_server!r} (set LLB or --llama-server): lfmd only")
    res = {name: {"cold": [], "warm": []} for name, _ in servers}
    cache = None
    for r, system in enumerate(prefixes):
        for name, kind in servers:
            srv = kind(a)
            try:
                srv.ask("You are terse.", "Warm up.")  # pages in, untimed
                res[name]["cold"].append(srv.ask(system, "Which rooms can you control?"))
                for q in range(a.questions):
                    res[name]["warm"] += at_once(a.clients, lambda c: srv.ask(
                        system, QUESTIONS[(c + q * a.clients) % len(QUESTIONS)] + f" ({c}.{q})"))
                if name == "lfmd":
                    cache = srv.status().get("prefix_cache")
            finally:
                srv.close()
            print(f"# round {r + 1} {name} done", flush=True)
    print("| server | cold TTFT s | warm TTFT p50 / p99 s | warm / cold | prompt tokens "
          "prefilled warm (of) | decode tok/s warm |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, _ in servers:
        cold = [x["ttft"] for x in res[name]["cold"]]
        warm = [x["ttft"] for x in res[name]["warm"]]
        pre = [x["prefilled"] for x in res[name]["warm"] if x["prefilled"] is not None]
        of = [x["prompt"] for x in res[name]["warm"] if x["prompt"]]
        dec = [x["decode"] for x in res[name]["warm"] if x["decode"]]
        c50 = statistics.median(cold)
        prefilled = (f"{statistics.median(pre):.0f}" if pre else "-") + (
            f" ({statistics.median(of):.0f})" if of else "")
        decode = f"{statistics.median(dec):.1f}" if dec else "-"
        print(f"| {name} | {c50:.2f} ({min(cold):.2f}-{max(cold):.2f}) | "
              f"{pct(warm, 50):.2f} / {pct(warm, 99):.2f} | {pct(warm, 50) / c50:.1%} | "
              f"{prefilled} | {decode} |", flush=True)
    if cache:
        print(f"# lfmd prefix cache at the end of a round: {json.dumps(cache)}")


if __name__ == "__main__":
    sys.exit(main())
