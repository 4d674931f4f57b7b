"""The ``sandpool`` command line: ``serve`` and the sandbox commands, in cwsandbox's shape.

Each module registers its subcommands on the dispatcher in ``sandpool/__main__.py``; heavy
imports (trio, grpc) happen when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol


class Subcommands(Protocol):
    """What ``ArgumentParser.add_subparsers()`` returns, as a module's ``register`` uses it (argparse
    names its class privately)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...
