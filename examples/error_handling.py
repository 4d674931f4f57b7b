"""Error handling: an exception inside the block stops every sandbox and propagates unchanged.

A non-zero exit is not an error unless ``check=True``; then ``SandboxExecutionError`` carries the
ProcessResult. An exec that outlives ``timeout_seconds`` has its process tree killed and raises
``SandboxTimeoutError``. Every sandpool error is a ``CWSandboxError`` (alias of ``SandpoolError``).
"""

from sandpool import (
    CWSandboxError,
    SandboxDefaults,
    SandboxExecutionError,
    SandboxTimeoutError,
    Session,
)


class JobFailed(Exception):
    """The user's own exception, raised inside the session block."""


pool = []
try:
    with Session(defaults=SandboxDefaults(tags=("examples", "error-handling"))) as session:
        pool = [session.sandbox() for _ in range(3)]
        for sandbox in pool:
            sandbox.wait()

        result = pool[0].exec(["sh", "-c", "exit 3"]).result()
        print(f"check=False: exit code {result.returncode}, no exception")

        try:
            pool[1].exec(["sh", "-c", "echo disk full >&2; exit 3"], check=True).result()
        except SandboxExecutionError as exc:
            print(f"check=True: {type(exc).__name__}: {exc}")
            print(f"  its result: returncode={exc.exec_result.returncode}, stderr={exc.exec_result.stderr.strip()!r}")
            assert isinstance(exc, CWSandboxError)

        try:
            pool[2].exec(["sleep", "30"], timeout_seconds=0.2).result()
        except SandboxTimeoutError as exc:
            print(f"timeout: {exc}")

        raise JobFailed("the job gave up halfway")  # leaves the block with an exception
except JobFailed as exc:
    print(f"propagated unchanged: {exc!r}")

print("every sandbox was stopped:", [sandbox.status.value for sandbox in pool])
