"""What happens inside a FakeRuntime sandbox: scripted commands, scripted calls, an in-memory filesystem.

A command is looked up in the runtime's ``execs`` table: an exact argv (a tuple of strings) first,
then glob patterns (a string, matched with ``fnmatch`` against the shell-quoted command line, such
as ``"git *"``) in the order given, then a few built-ins (``echo``, ``true``, ``false``, ``sleep``,
``cat``). What is found is a :class:`FakeExec`, an int (the exit code), or a handler: a function,
plain or ``async``, taking a :class:`FakeCommand` and returning one of those. Nothing found: exit
127 with the real agent's message. Every delay is in trio seconds, so under
``trio.testing.MockClock(autojump_threshold=0)`` they pass at once.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import posixpath
import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import trio


def _as_bytes(name: str, value: str | bytes) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{name} must be str or bytes, got {type(value).__name__} {value!r}")


def check_delay(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FakeExec:
    """What one scripted command does.

    ``chunks`` (``(delay, text)`` pairs) are written to stdout first, each after its delay; then
    ``stdout`` and ``stderr``; then the process waits ``delay`` seconds and exits with
    ``exit_code``. A signal ends it at once (exit code 128+N), except SIGTERM when
    ``ignore_sigterm`` (so only the stop's escalation to SIGKILL ends it). ``kill_sandbox``:
    instead of exiting, the whole sandbox dies (as if SIGKILLed or OOM-killed) after ``delay``.
    """

    stdout: str | bytes = b""
    stderr: str | bytes = b""
    exit_code: int = 0
    delay: float = 0.0
    chunks: Sequence[tuple[float, str | bytes]] = ()
    ignore_sigterm: bool = False
    kill_sandbox: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stdout", _as_bytes("stdout", self.stdout))
        object.__setattr__(self, "stderr", _as_bytes("stderr", self.stderr))
        if isinstance(self.exit_code, bool) or not isinstance(self.exit_code, int) or not 0 <= self.exit_code <= 255:
            raise ValueError(f"exit_code must be an int from 0 to 255, got {self.exit_code!r}")
        object.__setattr__(self, "delay", check_delay("delay", self.delay))
        chunks = []
        for chunk in self.chunks:
            if not (isinstance(chunk, tuple) and len(chunk) == 2):
                raise TypeError(f"each chunk is a (delay, text) pair such as (0.5, 'line\\n'), got {chunk!r}")
            chunks.append((check_delay("a chunk's delay", chunk[0]), _as_bytes("a chunk's text", chunk[1])))
        object.__setattr__(self, "chunks", tuple(chunks))


@dataclass(frozen=True)
class FakeCall:
    """What happens to one remote-function call before its function runs (the ``calls`` hook).

    ``delay``: seconds before the function runs (a call's ``timeout_seconds`` and cancellation
    apply during it). ``kill_worker``: the call's worker process dies under it (an infrastructure
    failure: the pool retries it if ``retries`` allows); ``kill_sandbox``: the whole sandbox dies.
    """

    delay: float = 0.0
    kill_worker: bool = False
    kill_sandbox: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "delay", check_delay("delay", self.delay))


class FakeCommand:
    """A running scripted command, as its handler sees it: ``argv``, ``cwd``, ``env``, ``files``
    (the sandbox's filesystem, a dict of absolute path -> bytes) and its stdin and stdout."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], files: dict[str, bytes],
                 read_stdin: Callable[[], Awaitable[bytes]], write: Callable[[bytes, int], Awaitable[None]]) -> None:
        self.argv, self.cwd, self.env, self.files = argv, cwd, env, files
        self._read_stdin, self._write = read_stdin, write

    async def read_stdin(self) -> bytes:
        """Everything written to the process's stdin, once it is closed (b"" without ``stdin=True``)."""
        return await self._read_stdin()

    async def write(self, data: str | bytes, fd: int = 1) -> None:
        """Write to stdout (``fd=1``) or stderr (``fd=2``) now: the caller's stream sees it at once."""
        if fd not in (1, 2):
            raise ValueError(f"fd must be 1 (stdout) or 2 (stderr), got {fd!r}")
        await self._write(_as_bytes("data", data), fd)

    def path(self, path: str) -> str:
        """``path`` as an absolute sandbox path (relative ones start at ``cwd``)."""
        return normalize(self.cwd, path)


Outcome = Union[FakeExec, int]
Handler = Callable[[FakeCommand], Union[Outcome, Awaitable[Outcome]]]
Script = Union[FakeExec, int, Handler]


Table = tuple[dict[tuple[str, ...], Script], list[tuple[str, Script]], Union[Handler, None]]


def check_table(execs: Mapping[Any, Script] | Handler | None) -> Table:
    """Split the ``execs`` argument into exact argvs, glob patterns and a catch-all handler."""
    if execs is None:
        return {}, [], None
    if callable(execs) and not isinstance(execs, Mapping):
        return {}, [], execs
    if not isinstance(execs, Mapping):
        raise TypeError(f"execs must be a dict or a function, got {type(execs).__name__}")
    exact, globs = {}, []
    for key, script in execs.items():
        if not (isinstance(script, (FakeExec, int)) and not isinstance(script, bool)) and not callable(script):
            raise TypeError(f"execs[{key!r}] must be a FakeExec, an exit code or a handler, got {script!r}")
        if isinstance(key, str):
            globs.append((key, script))
        elif isinstance(key, (tuple, list)) and key and all(isinstance(a, str) for a in key):
            exact[tuple(key)] = script
        else:
            raise TypeError(f"execs key {key!r} must be an argv tuple such as ('echo', 'hi') "
                            "or a glob pattern string such as 'git *'")
    return exact, globs, None


def find_script(table: Table, argv: list[str]) -> Script | None:
    exact, globs, fallback = table
    if tuple(argv) in exact:
        return exact[tuple(argv)]
    line = shlex.join(argv)
    for pattern, script in globs:
        if fnmatch.fnmatchcase(line, pattern):
            return script
    if fallback is not None:
        return fallback
    return _BUILTINS.get(argv[0])


async def play(script: Script, command: FakeCommand) -> FakeExec:
    """Run a handler (if it is one) to get the command's FakeExec."""
    outcome: object = script
    if callable(script) and not isinstance(script, FakeExec):
        outcome = script(command)
        if inspect.isawaitable(outcome):
            outcome = await outcome
    if isinstance(outcome, bool) or not isinstance(outcome, (FakeExec, int)):
        raise TypeError(f"a command handler must return a FakeExec or an exit code, got {outcome!r}")
    return FakeExec(exit_code=outcome) if isinstance(outcome, int) else outcome


# -- built-in commands ---------------------------------------------------------------------------

def _echo(cmd: FakeCommand) -> FakeExec:
    return FakeExec(stdout=" ".join(cmd.argv[1:]) + "\n")


def _sleep(cmd: FakeCommand) -> FakeExec:
    try:
        return FakeExec(delay=float(cmd.argv[1]))
    except (IndexError, ValueError):
        return FakeExec(stderr="sleep: invalid time interval\n", exit_code=1)


async def _cat(cmd: FakeCommand) -> FakeExec:
    if len(cmd.argv) == 1:
        return FakeExec(stdout=await cmd.read_stdin())
    out = b""
    for name in cmd.argv[1:]:
        data = cmd.files.get(cmd.path(name))
        if data is None:
            return FakeExec(stdout=out, stderr=f"cat: {name}: No such file or directory\n", exit_code=1)
        out += data
    return FakeExec(stdout=out)


_BUILTINS: dict[str, Script] = {"echo": _echo, "true": 0, "false": 1, "sleep": _sleep, "cat": _cat}


# -- the in-memory filesystem ------------------------------------------------------------------

def normalize(cwd: str, path: str) -> str:
    """An absolute, normalized sandbox path (``..`` stops at ``/``, as it does in a real root)."""
    joined = posixpath.normpath(posixpath.join(cwd, path))
    return "/" + joined.lstrip("/")


def seed_files(files: Mapping[str, str | bytes] | None) -> dict[str, bytes]:
    """A sandbox's starting files from the runtime's ``files`` argument (absolute paths only)."""
    out: dict[str, bytes] = {}
    for path, data in (files or {}).items():
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"files keys must be absolute paths such as '/data/in.txt', got {path!r}")
        out[normalize("/", path)] = _as_bytes(f"files[{path!r}]", data)
    return out


def is_directory(files: dict[str, bytes], path: str) -> bool:
    prefix = path.rstrip("/") + "/"
    return path == "/" or any(name.startswith(prefix) for name in files)


async def sleep(seconds: float) -> None:
    if seconds > 0:
        await trio.sleep(seconds)
