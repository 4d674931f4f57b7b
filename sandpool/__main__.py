"""``python -m sandpool`` / ``sandpool``: a small dispatcher over the subcommand modules.

Each module in ``_cli`` (and any other feature that adds commands) has a ``register(subparsers)``
that adds its subcommands with ``set_defaults(run=function)``; ``run(args)`` returns the exit code.
"""

from __future__ import annotations

import argparse
import sys

from ._cli import image, sandboxes, serve, snapshots, templates, terminal, volumes

REGISTRARS = [serve.register, sandboxes.register, terminal.register, image.register, snapshots.register,
              volumes.register, templates.register]
#: Printed under the error when no server answered: what to do about it.
NO_SERVER_HINT = ("hint: no sandpool server answered; start one with 'sandpool serve' (it listens on this user's "
                  "socket), or point --address / $SANDPOOL_ADDRESS at a running one")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sandpool", description="Pools of sandboxes: serve them, look at them.")
    parser.add_argument("--version", action="version", version=f"sandpool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ._errors import SandboxUnavailableError, SandpoolError

    try:
        code: int = args.run(args)  # the subcommand's function (set_defaults(run=...))
        return code
    except (SandpoolError, ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        if isinstance(exc, SandboxUnavailableError) and args.command != "serve":
            print(NO_SERVER_HINT, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
