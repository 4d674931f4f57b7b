"""``sandpool sh SANDBOX_ID`` (an interactive terminal) and ``sandpool delete SANDBOX_ID``.

``sh`` puts this terminal in raw mode, forwards its keystrokes and window-size changes (SIGWINCH)
to a pseudo-terminal in the sandbox, copies what that terminal shows back, restores this
terminal however it ends, and exits with the command's exit code. It needs a terminal on stdin.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from typing import TYPE_CHECKING

from .sandboxes import _connection, _target

if TYPE_CHECKING:
    from .._session.terminal import TerminalSession
    from . import Subcommands


def register(sub: Subcommands) -> None:
    p = sub.add_parser("sh", help="open an interactive terminal in a sandbox")
    p.add_argument("sandbox_id")
    p.add_argument("--cmd", default="/bin/bash", help="the command to run, shell-split (default: /bin/bash)")
    _connection(p)
    p.set_defaults(run=cmd_sh)

    p = sub.add_parser("delete", help="stop a sandbox by id (cwsandbox's name for stop)")
    p.add_argument("sandbox_id")
    p.add_argument("--missing-ok", action="store_true", help="succeed if there is no such sandbox")
    p.add_argument("-t", "--timeout", type=float, help="seconds to wait for it to end")
    p.add_argument("-q", "--quiet", action="store_true")
    _connection(p)
    p.set_defaults(run=cmd_delete)


def cmd_delete(args: argparse.Namespace) -> int:
    from .. import Sandbox

    Sandbox.delete(args.sandbox_id, missing_ok=args.missing_ok, timeout_seconds=args.timeout,
                   **_target(args)).result()
    if not args.quiet:
        print(f"Deleted {args.sandbox_id}")
    return 0


def cmd_sh(args: argparse.Namespace) -> int:
    import termios
    import tty

    from .. import Sandbox

    fd = sys.stdin.fileno()
    if not os.isatty(fd):
        print("Error: sandpool sh needs a terminal on stdin; use sandpool exec for a command without one",
              file=sys.stderr)
        return 2
    command = shlex.split(args.cmd)
    sandbox = Sandbox.from_id(args.sandbox_id, **_target(args)).result()
    width, height = _size(fd)
    term = sandbox.shell(command, width=width, height=height)
    saved = termios.tcgetattr(fd)
    previous = signal.signal(signal.SIGWINCH, lambda *_: term.resize(*_size(fd)))
    tty.setraw(fd)
    threading.Thread(target=_forward_keys, args=(fd, term), daemon=True).start()
    try:
        for chunk in term.output:
            os.write(sys.stdout.fileno(), chunk)
        return term.wait()
    except KeyboardInterrupt:  # raw mode sends ^C to the sandbox; this is a signal from elsewhere
        term.cancel()
        return 130
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, previous)


def _size(fd: int) -> tuple[int, int]:
    """This terminal's (width, height) (80 x 24 for one that reports none, as a fresh pty does)."""
    cols, rows = os.get_terminal_size(fd)
    return cols or 80, rows or 24


def _forward_keys(fd: int, term: TerminalSession) -> None:
    """Copy keystrokes to the sandbox's terminal until this terminal closes or the session ends."""
    try:
        while (data := os.read(fd, 4096)):
            term.stdin.write(data).result()
        term.stdin.close()
    except Exception:  # the session ended: nothing more to forward
        pass
