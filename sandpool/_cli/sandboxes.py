"""``sandpool ls | get | exec | logs | files | stop``: existing sandboxes of a sandpool server.

The server is ``--address``, else ``$SANDPOOL_ADDRESS``, else the local default (the unix socket
``<run dir>/serve.sock`` where a plain ``sandpool serve`` of this user listens); the token is read
from ``--token-file``, else ``$SANDPOOL_TOKEN``, else the listener record of a server of this user
on that address (which a TCP listener without ``--token-file`` writes its token to). Like cwsandbox's CLI there is no create command:
sandboxes come from programs; the CLI looks at them, runs commands in them and stops them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .._session.sandbox import Sandbox
    from . import Subcommands

ENV_ADDRESS, ENV_TOKEN = "SANDPOOL_ADDRESS", "SANDPOOL_TOKEN"


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the server: HOST:PORT, tls://HOST:PORT or unix:/PATH "
                                          "(default: $SANDPOOL_ADDRESS, else this user's sandpool serve socket, "
                                          "e.g. unix:/run/sandpool/serve.sock for root)")
    parser.add_argument("--token-file", help="file holding the server's token (default: $SANDPOOL_TOKEN)")


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table")


def register(sub: Subcommands) -> None:
    p = sub.add_parser("ls", help="list sandboxes")
    p.add_argument("-t", "--tag", action="append", default=[], help="only sandboxes with this tag (repeatable)")
    p.add_argument("-s", "--status", help="only sandboxes in this status (lowercase, e.g. running)")
    p.add_argument("-a", "--all", action="store_true", help="include terminated sandboxes")
    _output(p)
    _connection(p)
    p.set_defaults(run=cmd_ls)

    p = sub.add_parser("get", help="show one sandbox")
    p.add_argument("sandbox_id")
    _output(p)
    _connection(p)
    p.set_defaults(run=cmd_get)

    p = sub.add_parser("exec", help="run a command in a sandbox; exits with its exit code",
                       usage="sandpool exec [options] SANDBOX_ID -- COMMAND [ARG...]")
    p.add_argument("sandbox_id")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.add_argument("-w", "--cwd", help="working directory inside the sandbox (absolute)")
    p.add_argument("-t", "--timeout", type=float, help="seconds before the command is killed")
    p.add_argument("-o", "--output", choices=("stream", "json"), default="stream",
                   help="stream: copy the output live (default); json: print one JSON object with "
                        "returncode, stdout, stderr and truncated once the command ends")
    _connection(p)
    p.set_defaults(run=cmd_exec)

    p = sub.add_parser("logs", help="print a sandbox's main-command output (stdout and stderr)")
    p.add_argument("sandbox_id")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the sandbox ends")
    p.add_argument("-n", "--tail", type=_count, metavar="N", help="only the last N lines")
    p.add_argument("--timestamps", action="store_true", help="prefix each line with when it was written (UTC)")
    _connection(p)
    p.set_defaults(run=cmd_logs)

    files = sub.add_parser("files", help="read or write a file in a sandbox")
    fsub = files.add_subparsers(dest="files_command", required=True)
    p = fsub.add_parser("read", help="copy a sandbox file to stdout or --output")
    p.add_argument("sandbox_id")
    p.add_argument("remote_path")
    p.add_argument("-o", "--output", help="local file to write (default: stdout)")
    _connection(p)
    p.set_defaults(run=cmd_files_read)
    p = fsub.add_parser("write", help="copy a local file (or - for stdin) into a sandbox")
    p.add_argument("sandbox_id")
    p.add_argument("remote_path")
    p.add_argument("local_path")
    p.add_argument("-q", "--quiet", action="store_true")
    _connection(p)
    p.set_defaults(run=cmd_files_write)

    p = sub.add_parser("stop", help="stop a sandbox")
    p.add_argument("sandbox_id")
    p.add_argument("--missing-ok", action="store_true", help="succeed if there is no such sandbox")
    p.add_argument("--graceful-shutdown-seconds", type=float, default=10.0)
    p.add_argument("-q", "--quiet", action="store_true")
    _connection(p)
    p.set_defaults(run=cmd_stop)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


def _target(args: argparse.Namespace) -> dict[str, str | None]:
    from .._grpc.endpoint import default_address

    token = None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    return {"address": args.address or os.environ.get(ENV_ADDRESS) or default_address(),
            "token": token or os.environ.get(ENV_TOKEN)}


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


def describe(sandbox: Sandbox) -> dict[str, Any]:
    """The fields ``ls``/``get`` show, as plain data."""
    record = sandbox.link.record()
    return {
        "sandbox_id": sandbox.sandbox_id,
        "status": sandbox.status.value if sandbox.status else None,
        "status_reason": sandbox.status_reason,
        "returncode": sandbox.returncode,
        "tags": list(sandbox.tags),
        "isolation": sandbox.isolation,
        "runtime_class": sandbox.spec.runtime_class,  # asked for, not honoured: isolation is what it got
        "placement_mode": sandbox.spec.placement_mode,
        "created_at": sandbox.created_at,
        "started_at": sandbox.started_at,
        "orphaned_for": record.orphaned_for if record else None,
    }


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def cmd_ls(args: argparse.Namespace) -> int:
    from .. import Sandbox

    found = Sandbox.list(tags=args.tag, status=args.status, show_terminated=args.all, **_target(args)).result()
    infos = [describe(sb) for sb in found]
    if args.output == "json":
        print(json.dumps(infos, indent=2))
        return 0
    rows = [["SANDBOX ID", "STATUS", "TAGS", "CREATED AT", "REASON"]]
    for i in infos:
        reason = i["status_reason"] or ""
        if i["orphaned_for"] is not None and i["status"] == "running":
            reason = f"orphaned {i['orphaned_for']:.0f} s"
        rows.append([i["sandbox_id"], i["status"] or "-", ",".join(i["tags"]), _when(i["created_at"]), reason[:60]])
    print(_table(rows))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from .. import Sandbox

    info = describe(Sandbox.from_id(args.sandbox_id, **_target(args)).result())
    if args.output == "json":
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key in ("created_at", "started_at"):
            value = _when(value)
        elif isinstance(value, list):
            value = ",".join(value)
        print(f"{key + ':':16}{'-' if value is None else value}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from .. import Sandbox

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("Error: no command given; use: sandpool exec SANDBOX_ID -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    sandbox = Sandbox.from_id(args.sandbox_id, **_target(args)).result()
    proc = sandbox.exec(command, cwd=args.cwd, timeout_seconds=args.timeout)
    if args.output == "json":
        result = proc.result()
        print(json.dumps({"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr,
                          "truncated": result.truncated, "command": result.command}))
        return result.returncode

    def copy(reader: Iterable[str], out: TextIO) -> None:
        for chunk in reader:
            out.write(chunk)
            out.flush()

    def copy_errors() -> None:
        try:
            copy(proc.stderr, sys.stderr)
        except Exception:  # the stream ended with the command's failure, which stdout's copy reports once
            pass

    errors = threading.Thread(target=copy_errors, daemon=True)
    errors.start()
    try:
        copy(proc.stdout, sys.stdout)
        errors.join()
        return proc.result().returncode
    except KeyboardInterrupt:
        proc.cancel()
        return 130


def cmd_logs(args: argparse.Namespace) -> int:
    from .. import Sandbox

    sandbox = Sandbox.from_id(args.sandbox_id, **_target(args)).result()
    try:
        for line in sandbox.stream_logs(follow=args.follow, tail_lines=args.tail, timestamps=args.timestamps):
            sys.stdout.write(line)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_files_read(args: argparse.Namespace) -> int:
    from .. import Sandbox

    data = Sandbox.from_id(args.sandbox_id, **_target(args)).result().read_file(args.remote_path).result()
    if args.output:
        with open(args.output, "wb") as f:
            f.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


def cmd_files_write(args: argparse.Namespace) -> int:
    from .. import Sandbox

    if args.local_path == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(args.local_path, "rb") as f:
            data = f.read()
    sandbox = Sandbox.from_id(args.sandbox_id, **_target(args)).result()
    sandbox.write_file(args.remote_path, data).result()
    if not args.quiet:
        print(f"Wrote {len(data)} bytes to {args.sandbox_id}:{args.remote_path}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from .. import Sandbox, SandboxNotFoundError

    try:
        sandbox = Sandbox.from_id(args.sandbox_id, **_target(args)).result()
    except SandboxNotFoundError:
        if args.missing_ok:
            return 0
        raise
    sandbox.stop(graceful_shutdown_seconds=args.graceful_shutdown_seconds).result()
    if not args.quiet:
        print(f"Stopped {args.sandbox_id}: {sandbox.status.value if sandbox.status else '-'}")
    return 0
