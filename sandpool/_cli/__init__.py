"""The ``sandpool`` command line: ``serve`` and the sandbox commands, in cwsandbox's shape.

Each module registers its subcommands on the dispatcher in ``sandpool/__main__.py``; heavy
imports (trio, grpc) happen when a command runs, not when the parser is built.
"""
