#!/usr/bin/env python3
"""A short lfmd client in Python: streams a chat answer, asks a follow-up in
the same session (the daemon keeps the conversation and the model state, so
the follow-up prefills only its new tokens), and reads the daemon's status.

    pip install grpcio grpcio-tools
    python3 lfm_client.py "What is a mixture of experts?"
    python3 lfm_client.py --socket /run/lfmd/lfmd.sock --follow-up "Shorter." "Hi"

The stubs are built at run time from lfmd's proto file (`grpc.protos_and_services`,
which needs grpcio-tools); `--proto DIR` names the directory holding
`lfm/v1/lfm.proto` (default: the repository's `proto/`). To generate them once
instead: `python3 -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=.
lfm/v1/lfm.proto`, then `from lfm.v1 import lfm_pb2, lfm_pb2_grpc`.

The channel is a plain grpcio one: lfmd accepts whatever `:authority` a gRPC
client sends on a Unix socket, so no channel options are needed.
"""

import argparse
import os
import sys

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))


def default_socket():
    """Where `lfmd serve` listens: the user's runtime directory, else the
    system service's socket."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    user = os.path.join(runtime, "lfmd", "lfmd.sock") if runtime else None
    if user and os.path.exists(user):
        return user
    return "/run/lfmd/lfmd.sock"


def load_stubs(proto_dir):
    """The `lfm.v1` messages and service stubs, compiled from the .proto."""
    sys.path.insert(0, proto_dir)
    return grpc.protos_and_services("lfm/v1/lfm.proto")


def chat(stub, pb, messages, session, max_tokens, out):
    """Streams one chat turn to `out`; returns the final `Done` message."""
    request = pb.ChatRequest(
        messages=[pb.ChatMessage(role=r, content=c) for r, c in messages],
        options=pb.SamplingOptions(max_tokens=max_tokens),
        session_id=session,
    )
    done = None
    for event in stub.Chat(request):
        if event.HasField("delta"):
            out.write(event.delta.text)
            out.flush()
        elif event.HasField("done"):
            done = event.done
    out.write("\n")
    return done


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("question")
    ap.add_argument("--socket", default=default_socket())
    ap.add_argument("--proto", default=os.path.join(HERE, "..", "..", "proto"))
    ap.add_argument("--follow-up", default="Now say it in one sentence.")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    pb, services = load_stubs(args.proto)
    with grpc.insecure_channel("unix:" + args.socket) as channel:
        stub = services.LfmStub(channel)
        status = stub.GetStatus(pb.GetStatusRequest())
        print(f"# lfmd {status.version}: {status.isa}, {status.threads} threads, "
              f"{status.active_requests} running, {status.queued_requests} waiting")

        session = f"example-{os.getpid()}"
        first = chat(stub, pb, [("user", args.question)], session, args.max_tokens, sys.stdout)
        second = chat(stub, pb, [("user", args.follow_up)], session, args.max_tokens, sys.stdout)
        for name, done in (("first", first), ("follow-up", second)):
            s = done.stats
            print(f"# {name}: {pb.FinishReason.Name(done.finish_reason)}, "
                  f"{s.prefilled_tokens} of {s.prompt_tokens} prompt tokens prefilled, "
                  f"{s.generated_tokens} generated at {s.decode_tokens_per_second:.1f} tok/s")


if __name__ == "__main__":
    main()
