"""Basic usage: a session with shared defaults, a sandbox, a command.

The code is written against cwsandbox's Session API; only the import differs. The session owns
its sandboxes: leaving the ``with`` block stops every one of them, whatever ends the block.
"""

from sandpool import SandboxDefaults, Session

defaults = SandboxDefaults(tags=("examples", "basic-usage"))

with Session(defaults=defaults) as session:
    sandbox = session.sandbox()  # lazy: nothing runs yet
    print(f"created: {sandbox!r}")

    result = sandbox.exec(["echo", "hello from a sandbox"]).result()  # the first use starts it
    print(result.stdout, end="")
    print(f"exit code {result.returncode}; {sandbox.sandbox_id} is {sandbox.status}")

print(f"after the block: {sandbox.sandbox_id} is {sandbox.status}")
