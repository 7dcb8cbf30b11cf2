#!/usr/bin/env python3
"""Serving benchmark: lfmd (gRPC, through lfmctl; and its OpenAI-compatible
HTTP edge) against llama-server -np N on the same model and threads, with 1,
4, 8 and 16 concurrent clients.

Each client sends REQS requests one after another: a distinct raw prompt of
about PROMPT words, GEN tokens generated (end-of-generation ignored, greedy),
so both servers do the same work. lfmd over gRPC is driven by `lfmctl load`
(one process, a connection per client); lfmd over HTTP (`lfmd-http`:
streamed `/v1/completions`) and llama-server (`/completion`) by threads
here. Reported
per server and client count: aggregate generated tokens/s over the wall
time, p50/p99 time to first token as the client sees it (request sent to
first streamed token), and fairness: the spread (fastest / slowest) of the
clients' own rates (tokens over each client's busy time).

Before the servers, `lfmd bench` measures the same file and threads with
one sequence (prefill of the prompt's token count, GEN decoded tokens): the
rate one client would see with no serving overhead at all, printed as the
"bench" row of the 1-client table (the lfmd row's ratio to it is the
serving path's cost); and for N clients, `lfmd bench -s N`: what one decode
step of N sequences reads (weight GB, distinct experts per MoE layer) and
its tokens per GB against one sequence's.

Usage: scripts/bench_serve.py MODEL [--threads T] [--clients 1,4,8,16]
       [--reqs 3] [--gen 128] [--prompt 56] [--llama-server PATH]
       [--servers lfmd,lfmd-http,llama-server] [--rounds R]
Figures only: nothing here asserts a speed.
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the quick brown fox jumps over the lazy dog while a small robot "
         "reads the weather report and counts the clouds above the hills").split()


def prompt(client, req, words):
    body = " ".join(WORDS[(client * 7 + req * 3 + i) % len(WORDS)] for i in range(words))
    return f"Request {client}-{req}: {body}"


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def wait_for(check, what, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up within {timeout} s")


def unix_socket_up(path):
    """Whether a server accepts connections on the Unix socket `path`."""
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def http_health_up(port):
    """Whether llama-server on 127.0.0.1:`port` answers /health with 200."""
    try:
        h = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        h.request("GET", "/health")
        return h.getresponse().status == 200
    except OSError:
        return False


def run_clients(n, reqs, one):
    """Runs n client threads of reqs requests each; returns (wall, results,
    per-client rates)."""
    results, rates, lock = [], [], threading.Lock()

    def client(c):
        t0, got = time.time(), 0
        for r in range(reqs):
            res = one(c, r)
            got += res[0]
            with lock:
                results.append(res)
        with lock:
            rates.append(got / max(time.time() - t0, 1e-9))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.time() - t0, results, rates


def spread(rates):
    rates = [r for r in rates if r > 0]
    return max(rates) / min(rates) if rates else float("nan")


def lfmd_bench(args, prompt_tokens):
    """lfmd's own single-sequence figures on the file: prefill of the
    prompt's length, then GEN decoded tokens; returns (pp, tg, predicted
    tokens/s of one client that sends such requests back to back)."""
    lfmd = os.path.join(ROOT, "target/release/lfmd")
    out = subprocess.run(
        [lfmd, "bench", "--model", args.model, "-t", str(args.threads),
         "-p", str(prompt_tokens), "-n", str(args.gen), "--json"],
        capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    pp, tg = r["prefill_tokens_per_s"], r["decode_tokens_per_s"]
    return pp, tg, args.gen / (prompt_tokens / pp + args.gen / tg)


def lfmd_batched(args, n):
    """`lfmd bench -s n`: what a decode step of n sequences reads (weight
    GB, distinct experts per MoE layer) and its tokens per GB."""
    lfmd = os.path.join(ROOT, "target/release/lfmd")
    out = subprocess.run(
        [lfmd, "bench", "--model", args.model, "-t", str(args.threads),
         "-p", "0", "-n", "16", "-s", str(n), "--json"],
        capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    return (r["decode_step_weight_bytes"] / 1e9, r["decode_experts_per_layer"],
            r["decode_tokens_per_gb"], r["decode_tokens_per_s"])


def prompt_tokens(args):
    """Tokens of a typical prompt of the run, by the model's tokenizer."""
    lfmd = os.path.join(ROOT, "target/release/lfmd")
    out = subprocess.run([lfmd, "tokenize", "--model", args.model, prompt(0, 0, args.prompt)],
                         capture_output=True, text=True, check=True)
    return len(json.loads(out.stdout))


def bench_lfmd(args, n):
    lfmd = os.path.join(ROOT, "target/release/lfmd")
    lfmctl = os.path.join(ROOT, "target/release/lfmctl")
    tmp = tempfile.mkdtemp(prefix="lfmd-bench.")
    sock = os.path.join(tmp, "lfmd.sock")
    daemon = subprocess.Popen(
        [lfmd, "serve", "--model", args.model, "--threads", str(args.threads),
         "--grpc", f"unix:{sock}", "--max-concurrent", str(n), "--queue", "256",
         "--ctx", "2048"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: unix_socket_up(sock), "lfmd serve")
        # Warm-up, untimed: the first request faults the model's pages in
        # (llama-server does the same with its warm-up run at load).
        subprocess.run(
            [lfmctl, "--socket", f"unix:{sock}", "load", "--clients", "1", "--requests", "1",
             "--temperature", "0", "--ignore-eos", "--max-tokens", "4",
             "--prompt-words", str(args.prompt), "--json"],
            capture_output=True, text=True, check=True)

        out = subprocess.run(
            [lfmctl, "--socket", f"unix:{sock}", "load", "--clients", str(n),
             "--requests", str(args.reqs), "--temperature", "0", "--ignore-eos",
             "--max-tokens", str(args.gen), "--prompt-words", str(args.prompt), "--json"],
            capture_output=True, text=True, check=True)
        r = json.loads(out.stdout)
        return (r["tokens_per_second"], r["ttft_p50_seconds"], r["ttft_p99_seconds"],
                r["client_spread"] or float("nan"))
    finally:
        daemon.terminate()
        daemon.wait()


def bench_lfmd_http(args, n, port=18182):
    """lfmd's HTTP edge: streamed /v1/completions, one thread per client."""
    lfmd = os.path.join(ROOT, "target/release/lfmd")
    tmp = tempfile.mkdtemp(prefix="lfmd-bench.")
    daemon = subprocess.Popen(
        [lfmd, "serve", "--model", args.model, "--threads", str(args.threads),
         "--grpc", f"unix:{os.path.join(tmp, 'lfmd.sock')}", "--http", f"tcp:127.0.0.1:{port}",
         "--max-concurrent", str(n), "--queue", "256", "--ctx", "2048"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: http_health_up(port), "lfmd serve --http")

        def one(c, r):
            h = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            body = json.dumps({"prompt": prompt(c, r, args.prompt), "max_tokens": args.gen,
                               "temperature": 0, "ignore_eos": True, "stream": True,
                               "stream_options": {"include_usage": True}})
            t0 = time.time()
            h.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = h.getresponse()
            ttft, tokens = None, 0
            for line in resp:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[5:])
                # The first chunk comes with the first token (as lfmctl
                # load counts its first delta), even if its text is held
                # back as an incomplete UTF-8 sequence.
                if ev.get("choices") and ttft is None:
                    ttft = time.time() - t0
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
            return tokens, ttft if ttft is not None else float("nan")
        one(n, 0)  # warm-up, untimed, as for the others
        wall, res, rates = run_clients(n, args.reqs, one)
        ttfts = [f for _, f in res]
        return sum(t for t, _ in res) / wall, pct(ttfts, 50), pct(ttfts, 99), spread(rates)
    finally:
        daemon.terminate()
        daemon.wait()


def bench_llama(args, n, port=18181):
    server = subprocess.Popen(
        [args.llama_server, "-m", args.model, "-t", str(args.threads), "-np", str(n),
         "-c", str(2048 * n), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: http_health_up(port), "llama-server")

        def one(c, r):
            h = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            body = json.dumps({"prompt": prompt(c, r, args.prompt), "n_predict": args.gen,
                               "temperature": 0, "ignore_eos": True, "stream": True,
                               "cache_prompt": False})
            t0 = time.time()
            h.request("POST", "/completion", body, {"Content-Type": "application/json"})
            resp = h.getresponse()
            ttft, tokens = None, 0
            for line in resp:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                ev = json.loads(line[5:])
                if ev.get("content") and ttft is None:
                    ttft = time.time() - t0
                if ev.get("stop"):
                    tokens = ev.get("tokens_predicted", tokens)
                    break
            return tokens, ttft if ttft is not None else float("nan")
        one(n, 0)  # warm-up, untimed, as for lfmd
        wall, res, rates = run_clients(n, args.reqs, one)
        ttfts = [f for _, f in res]
        return sum(t for t, _ in res) / wall, pct(ttfts, 50), pct(ttfts, 99), spread(rates)
    finally:
        server.terminate()
        server.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--reqs", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=56, help="prompt words (56: ~100 tokens of the synthetic 8B)")
    ap.add_argument("--llama-server", default=os.path.join(os.environ.get("LLB", ""), "llama-server"))
    ap.add_argument("--servers", default="lfmd,lfmd-http,llama-server",
                    help="which to run, in this order each round")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per client count (servers alternate)")
    args = ap.parse_args()
    have_llama = os.path.exists(args.llama_server)
    ptoks = prompt_tokens(args)
    print(f"model {args.model}, {args.threads} threads, {args.reqs} requests per client, "
          f"{args.gen} tokens each, prompts of ~{args.prompt} words ({ptoks} tokens)")
    pp, tg, one = lfmd_bench(args, ptoks)
    single = lfmd_batched(args, 1)
    print(f"lfmd bench, one sequence: prefill {pp:.2f} tok/s, decode {tg:.2f} tok/s: "
          f"one client at most {one:.2f} tok/s")
    print(f"{'clients':>7} {'server':<12} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} "
          f"{'spread':>7} {'ratio':>6}")
    servers = {"lfmd": bench_lfmd, "lfmd-http": bench_lfmd_http, "llama-server": bench_llama}
    chosen = [s for s in args.servers.split(",") if s in servers
              and (s != "llama-server" or have_llama)]
    for n in [int(x) for x in args.clients.split(",")]:
        for rnd in range(args.rounds):
            rows = [(name, *servers[name](args, n)) for name in chosen]
            peer = [r for r in rows if r[0] == "llama-server"]
            for name, tps, p50, p99, spr in rows:
                # lfmd rows against llama-server of the same round.
                ratio = tps / peer[0][1] if peer and name != "llama-server" else float("nan")
                tag = f"{name}" if args.rounds == 1 else f"{name} r{rnd + 1}"
                print(f"{n:>7} {tag:<12} {tps:>8.2f} {p50:>8.2f}s {p99:>8.2f}s {spr:>7.2f} {ratio:>6.2f}")
            sys.stdout.flush()
        if n == 1:
            print(f"{n:>7} {'bench':<12} {one:>8.2f} {'':>9} {'':>9} {'':>7} "
                  f"{rows[0][1] / one:>6.2f}  (lfmd serving / lfmd bench)")
        else:
            gb, experts, per_gb, tps = lfmd_batched(args, n)
            print(f"{'':>7} lfmd bench -s {n}: a decode step reads {gb:.3f} GB ({experts:.1f} "
                  f"distinct experts per MoE layer): {per_gb:.2f} tokens/GB, "
                  f"{per_gb / single[2]:.2f}x one sequence's {single[2]:.2f}; "
                  f"decode alone {tps:.2f} tok/s")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
