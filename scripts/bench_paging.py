#!/usr/bin/env python3
"""Expert paging under memory pressure: lfmd (`--memory-budget auto`, which
follows MemAvailable) against llama.cpp's llama-bench (`--repack 0`: weights
used in place from the mapping, read on demand by page faults), same model,
threads and minutes, with a hog process leaving the stated MemAvailable.

For each level it alternates the two `--rounds` times (page cache dropped
before each run, or without root the model file's pages given back) and
prints decode tok/s (median and range), the ratio, what lfmd read from
storage per token (`/proc/self/io`, `decode_io` of `lfmd bench --json`)
and the I/O floor: the disk's parallel
read rate (measured first, O_DIRECT) over those bytes, capped by lfmd's
all-RAM decode rate. Benchmarks, not tests: figures for the notes.

Usage: scripts/bench_paging.py MODEL [--avail 3.9,1.9] [--rounds 2] [--gen 32]
       [--threads T] [--lookahead N] [--llama-bench PATH] [--lfmd PATH]
"""

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no MemAvailable in /proc/meminfo")


def drop_caches(path):
    """Empties the page cache (root), else gives the model file's clean pages
    back (`POSIX_FADV_DONTNEED`: no privilege needed, and what a cold start
    means here: none of the model in memory). False if neither worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


def disk_rate(path, streams=4, each=256 << 20):
    """GB/s of `streams` O_DIRECT readers at spread offsets of `path`."""
    size = os.path.getsize(path)
    step = max(size // streams, each)
    procs = [
        subprocess.Popen(
            ["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={each >> 20}",
             f"skip={(i * step) >> 20}", "iflag=direct"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in range(streams)
    ]
    t0 = time.time()
    for p in procs:
        p.wait()
    return streams * each / (time.time() - t0) / 1e9


def hog(nbytes):
    """A child that maps and touches `nbytes` of anonymous memory and waits."""
    code = (
        "import mmap,signal,sys\n"
        f"m=mmap.mmap(-1,{nbytes})\n"
        f"for i in range(0,{nbytes},4096): m[i]=1\n"
        "print('ready',flush=True)\n"
        "signal.pause()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    if p.stdout.readline().strip() != "ready":
        raise SystemExit("the memory hog did not start")
    return p


def lfmd_bench(lfmd, model, threads, gen, budget, reps=1, lookahead=0):
    out = subprocess.run(
        [lfmd, "bench", "--model", model, "-t", str(threads), "-p", "0", "-n", str(gen),
         "-r", str(reps), "--memory-budget", budget, "--expert-lookahead", str(lookahead),
         "--json"],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def llama_bench(llb, model, threads, gen):
    out = subprocess.run(
        [llb, "-m", model, "-t", str(threads), "-p", "0", "-n", str(gen), "--repack", "0",
         "-o", "json"],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["avg_ts"]


def fmt(xs):
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--avail", default="3.9,1.9", help="GB of MemAvailable to leave")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lookahead", type=int, default=0,
                    help="lfmd's --expert-lookahead under the budget")
    ap.add_argument("--llama-bench",
                    default=os.path.join(os.environ.get("LLB", ""), "llama-bench"))
    ap.add_argument("--lfmd", default=os.path.join(HERE, "..", "target", "release", "lfmd"))
    a = ap.parse_args()
    have_llama = os.path.exists(a.llama_bench)
    if not have_llama:
        print(f"# no llama-bench at {a.llama_bench!r} (set LLB or --llama-bench): lfmd only")
    if not drop_caches(a.model):
        print("# cannot drop the model from the page cache: runs after the first start warm")
    disk = disk_rate(a.model)
    print(f"# {a.model}, {a.threads} threads, tg{a.gen}, lookahead {a.lookahead}; "
          f"disk: {disk:.2f} GB/s (4 O_DIRECT readers)")
    # The last of two runs: the first reads the model in.
    ram = lfmd_bench(a.lfmd, a.model, a.threads, a.gen, "unlimited", reps=2)
    ram = ram["decode_tokens_per_s_reps"][-1]
    print(f"# lfmd all-RAM decode: {ram:.2f} tok/s")
    print("| available | lfmd tok/s | llama.cpp tok/s | ratio | lfmd MB read/token "
          "| I/O floor tok/s | lfmd / floor | wait share | compute major faults/token |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for target in [float(x) for x in a.avail.split(",")]:
        drop_caches(a.model)
        extra = mem_available() - int(target * 1e9)
        h = hog(extra) if extra > 0 else None
        try:
            ours, theirs, io = [], [], []
            for _ in range(a.rounds):
                drop_caches(a.model)
                r = lfmd_bench(a.lfmd, a.model, a.threads, a.gen, "auto",
                               lookahead=a.lookahead)
                ours.append(r["decode_tokens_per_s"])
                io.append(r.get("decode_io") or {})
                if have_llama:
                    drop_caches(a.model)
                    theirs.append(llama_bench(a.llama_bench, a.model, a.threads, a.gen))
            avail = mem_available() / 1e9
        finally:
            if h:
                h.kill()
                h.wait()
        per_tok = statistics.median(x.get("storage_bytes_per_token", 0.0) for x in io)
        floor = min(disk * 1e9 / per_tok, ram) if per_tok > 0 else ram
        wait = statistics.median(x.get("wait_share", 0.0) for x in io)
        faults = statistics.median(x.get("major_faults_per_token", 0.0) for x in io)
        ratio = (f"{statistics.median(ours) / statistics.median(theirs):.2f}"
                 if theirs else "-")
        print(f"| {target:.1f} GB ({avail:.2f} with the hog) | {fmt(ours)} | "
              f"{fmt(theirs) if theirs else '-'} | {ratio} | {per_tok / 1e6:.1f} | "
              f"{floor:.2f} | {statistics.median(ours) / floor:.0%} | {wait:.0%} | {faults:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
