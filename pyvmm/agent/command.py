"""``pyvmm exec``: run a command in a running guest through its agent, from the shell.

This module owns the subcommand (its options and what it prints); :mod:`pyvmm.cli` only hooks
it in.  The guest must run ``pyvmm-agent`` (``pyvmm.agent=1`` on its cmdline) and have a vsock
device with a Unix socket (``pyvmm run --vsock CID,uds=PATH``)::

    pyvmm exec --uds /tmp/v.sock -- uname -r
    echo hi | pyvmm exec --uds /tmp/v.sock -i --env A=1 --cwd /tmp --timeout 10 -- sh -c 'cat; pwd'

The command's stdout and stderr are copied to ours as they arrive; the exit status is the
command's, 128 + N if signal N killed it, :data:`EXIT_TIMED_OUT` (124, as timeout(1)) if the
deadline killed it, :data:`EXIT_AGENT_ERROR` (255, as ssh) if the agent could not be reached or
broke the protocol (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from . import wire
from .client import Agent, AgentError

#: the exit status when --timeout killed the command
EXIT_TIMED_OUT = 124
#: the exit status when the agent could not be used
EXIT_AGENT_ERROR = 255


def _env_item(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name:
        raise argparse.ArgumentTypeError(f"invalid --env {text!r}: NAME=VALUE")
    return name, value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: seconds >= 0 (0: none)")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("exec", help="run a command in a running guest (its pyvmm-agent)",
                       description="Run a command in a running guest through pyvmm-agent "
                       "(the guest booted with pyvmm.agent=1, reached through the vsock "
                       "device's Unix socket).")
    p.add_argument("--uds", required=True, metavar="PATH",
                   help="the Unix socket of the guest's vsock device (--vsock CID,uds=PATH)")
    p.add_argument("--port", type=int, default=wire.AGENT_PORT,
                   help=f"the agent's vsock port (default {wire.AGENT_PORT})")
    p.add_argument("--timeout", type=_seconds, default=0.0,
                   help="kill the command's process group after S seconds (default 0: never)")
    p.add_argument("--cwd", help="working directory in the guest (default /)")
    p.add_argument("--env", type=_env_item, action="append", default=[], metavar="NAME=VALUE",
                   help="add to the command's environment; repeat for more")
    p.add_argument("-i", "--stdin", action="store_true",
                   help="read our stdin to its end and give it to the command as its stdin "
                   "(default: the command reads EOF)")
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- the command and its arguments")


def run(args) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("pyvmm exec: no command (pyvmm exec --uds PATH -- CMD ARGS...)", file=sys.stderr)
        return 2
    stdin = sys.stdin.buffer.read() if args.stdin else None
    out = {1: sys.stdout.buffer, 2: sys.stderr.buffer}

    def on_output(fd: int, data: bytes) -> None:
        out[fd].write(data)
        out[fd].flush()

    try:
        with Agent.connect_uds(args.uds, args.port) as agent:
            result = agent.run(argv, env=dict(args.env), cwd=args.cwd, stdin=stdin,
                               timeout=args.timeout or None, on_output=on_output)
    except (AgentError, OSError) as e:
        print(f"pyvmm exec: {e}", file=sys.stderr)
        return EXIT_AGENT_ERROR
    for name, dropped in (("stdout", result.stdout_dropped), ("stderr", result.stderr_dropped)):
        if dropped:
            print(f"pyvmm exec: {name} truncated: {dropped} bytes beyond "
                  f"{wire.OUTPUT_MAX} dropped by the agent", file=sys.stderr)
    if result.timed_out:
        print(f"pyvmm exec: killed after --timeout {args.timeout:g} s", file=sys.stderr)
        return EXIT_TIMED_OUT
    return result.status
