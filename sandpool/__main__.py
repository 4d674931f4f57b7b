"""``python -m sandpool`` / ``sandpool``: a small dispatcher over the subcommand modules.

Each module in ``_cli`` (and any other feature that adds commands) has a ``register(subparsers)``
that adds its subcommands with ``set_defaults(run=function)``; ``run(args)`` returns the exit code.
"""

from __future__ import annotations

import argparse
import sys

from ._cli import image, sandboxes, serve

REGISTRARS = [serve.register, sandboxes.register, image.register]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sandpool", description="Pools of sandboxes: serve them, look at them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ._errors import SandpoolError

    try:
        return args.run(args)
    except (SandpoolError, ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
