#!/usr/bin/env python3
"""Ask lfmd over D-Bus from Python and print the answer as it streams in:
the `Ask` protocol of org.lfm.Daemon1 (subscribe to the request signals,
call Ask, follow Token until Finished for the returned request path).

    pip install jeepney                    # pure Python, no GLib needed
    python3 lfm_dbus.py "What is a mixture of experts?"          # session bus
    python3 lfm_dbus.py --bus SYSTEM --max-tokens 64 "Hello"
    python3 lfm_dbus.py --bus unix:path=/tmp/bus.sock --cancel-after 5 "Count"

Options go as plain integers and doubles: lfmd takes any D-Bus integer type
for an integer option, so no 'u'/'t' annotations are needed.
"""

import argparse
import sys

from jeepney import DBusAddress, HeaderFields, MatchRule, message_bus, new_method_call
from jeepney.io.blocking import open_dbus_connection

DAEMON = DBusAddress("/org/lfm/Daemon1", bus_name="org.lfm.Daemon1", interface="org.lfm.Daemon1")
REQUESTS = MatchRule(
    type="signal", interface="org.lfm.Request1", path_namespace="/org/lfm/Daemon1/requests"
)


def ask(conn, prompt, options, cancel_after=None, out=sys.stdout, timeout=120):
    """Streams the answer to `prompt` to `out`; returns (finish_reason, info)."""
    conn.send_and_get_reply(message_bus.AddMatch(REQUESTS))
    with conn.filter(REQUESTS, bufsize=10_000) as signals:
        reply = conn.send_and_get_reply(new_method_call(DAEMON, "Ask", "sa{sv}", (prompt, options)))
        if reply.header.message_type.name == "error":
            raise RuntimeError(f"{reply.header.fields[HeaderFields.error_name]}: {reply.body[0]}")
        (path,) = reply.body
        tokens = 0
        while True:
            msg = conn.recv_until_filtered(signals, timeout=timeout)
            if msg.header.fields[HeaderFields.path] != path:
                continue  # another request of this connection
            member = msg.header.fields[HeaderFields.member]
            if member == "Token":
                out.write(msg.body[0])
                out.flush()
                tokens += 1
                if cancel_after is not None and tokens == cancel_after:
                    request = DBusAddress(path, bus_name=DAEMON.bus_name, interface="org.lfm.Request1")
                    conn.send_and_get_reply(new_method_call(request, "Cancel"))
            elif member == "Finished":
                out.write("\n")
                reason, info = msg.body
                return reason, {k: v[1] for k, v in info.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt")
    ap.add_argument("--bus", default="SESSION", help="SESSION, SYSTEM or a bus address")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--cancel-after", type=int, help="cancel after this many tokens")
    args = ap.parse_args()
    options = {
        "max_tokens": ("i", args.max_tokens),  # a plain int32, as most bindings send
        "temperature": ("d", args.temperature),
    }
    with open_dbus_connection(bus=args.bus) as conn:
        reason, info = ask(conn, args.prompt, options, args.cancel_after)
    print(f"# {reason}: {info.get('generated_tokens')} tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
