"""ReadFile and WriteFile, on the filesystem the sandbox's own commands see.

cwsandbox programs assume one filesystem per sandbox: write a file, then run a command that reads it
(``@session.function`` does exactly that with ``/tmp``). At the ``namespaces`` level the agent's file
operations and the sandbox's commands share the sandbox's root, so files go through the agent. At the
``process`` level commands see the host's filesystem while the agent's file operations are confined to
the sandbox directory, so files go through the sandbox's own commands (``sh`` and ``cat``), as the
client itself does above its unary size cap; their exit codes, not their messages, give the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._errors import FILE_TOO_LARGE, RpcFailure, file_failure

if TYPE_CHECKING:
    from .._session.process import ProcessResult
    from .._session.sandbox import Sandbox
    from ._pods import InContainer

#: The client's unary cap: above it the server says FILE_TOO_LARGE with the size, and the client
#: falls back to streaming the file through a command.
MAX_FILE_BYTES = 32 * 1024 * 1024
_STDIN_CHUNK = 1024 * 1024
_NOT_FOUND, _IS_DIRECTORY, _DENIED, _TOO_LARGE = 2, 3, 13, 27
_EXIT_REASONS = {_NOT_FOUND: "CWSANDBOX_FILE_NOT_FOUND", _IS_DIRECTORY: "CWSANDBOX_FILE_IS_DIRECTORY",
                 _DENIED: "CWSANDBOX_FILE_PERMISSION_DENIED", _TOO_LARGE: FILE_TOO_LARGE}
_PREAMBLE = """p=$1
[ -d "$p" ] && { echo "$p: is a directory" >&2; exit 3; }
"""
_READ = _PREAMBLE + """[ -e "$p" ] || { echo "$p: no such file" >&2; exit 2; }
[ -r "$p" ] || { echo "$p: permission denied" >&2; exit 13; }
size=$(wc -c < "$p") || exit 74
[ "$size" -le "$2" ] || { echo "$size"; exit 27; }
exec cat -- "$p"
"""
_WRITE = _PREAMBLE + """[ -e "$p" ] && [ ! -w "$p" ] && { echo "$p: permission denied" >&2; exit 13; }
mkdir -p -- "$(dirname -- "$p")" && cat > "$p" || exit 74
"""


def through_commands(sandbox: Sandbox | InContainer) -> bool:
    """True where the sandbox's commands see another filesystem than the agent's file operations."""
    return sandbox.isolation == "process"


async def read_file(sandbox: Sandbox | InContainer, path: str, timeout: float | None) -> bytes:
    """The contents of ``path`` as the sandbox's commands see it. RpcFailure for file errors."""
    if not through_commands(sandbox):
        data = await sandbox.read_file(path, timeout_seconds=timeout)
        if len(data) > MAX_FILE_BYTES:
            raise _too_large(path, len(data))
        return data
    result = await _run(sandbox, [_READ, path, str(MAX_FILE_BYTES)], None, timeout)
    if result.returncode == _TOO_LARGE:
        raise _too_large(path, int(result.stdout_bytes or b"0"))
    _check(result, path)
    return result.stdout_bytes


async def write_file(sandbox: Sandbox | InContainer, path: str, content: bytes, timeout: float | None) -> None:
    """Write ``content`` to ``path`` (creating its directory) as the sandbox's commands see it."""
    if not through_commands(sandbox):
        await sandbox.write_file(path, content, timeout_seconds=timeout)
        return
    _check(await _run(sandbox, [_WRITE, path], content, timeout), path)


def _too_large(path: str, size: int) -> RpcFailure:
    return file_failure(FILE_TOO_LARGE, f"{path}: {size} bytes is more than the {MAX_FILE_BYTES}-byte limit of "
                        f"ReadFile; use read_file_streaming", path, size_bytes=str(size),
                        max_size_bytes=str(MAX_FILE_BYTES))


def _check(result: ProcessResult, path: str) -> None:
    if result.returncode != 0:
        message = result.stderr.strip() or f"file command exited with code {result.returncode}"
        raise file_failure(_EXIT_REASONS.get(result.returncode, "CWSANDBOX_FILE_IO_FAILED"), message, path)


async def _run(sandbox: Sandbox | InContainer, script_and_args: list[str], stdin: bytes | None,
               timeout: float | None) -> ProcessResult:
    """Run a file script with ``sh -c`` in the sandbox, feeding ``stdin``; its ProcessResult."""
    script, *args = script_and_args
    proc = sandbox.exec(["/bin/sh", "-c", script, "sandpool-file", *args], stdin=stdin is not None,
                        timeout_seconds=timeout)
    try:
        if stdin is not None:
            writer = proc.stdin
            assert writer is not None  # exec'd with stdin=True
            for start in range(0, len(stdin), _STDIN_CHUNK):
                await writer.write(stdin[start:start + _STDIN_CHUNK])
            await writer.close()
        return await proc
    finally:
        if not proc.done():
            proc.cancel()
