"""``Sandbox.run()`` without a session: starts at once, and is cleaned up whatever happens.

Positional arguments are the main command and its args (none: the sandbox just stays alive).
As a ``with`` block it is stopped when the block ends. Unlike cwsandbox, a standalone sandbox
that is never stopped is still cleaned up: it dies with this process, even on SIGKILL.
"""

from sandpool import Sandbox

with Sandbox.run("sleep", "infinity", tags=["examples", "standalone"]) as sandbox:
    print(f"run() returned a running sandbox: {sandbox.status}")
    result = sandbox.exec(["echo", "no session needed"]).result()
    print(result.stdout, end="")

print(f"after the with block: {sandbox.status}, returncode {sandbox.returncode}")

# Without a with block, stop it when done. (Were it forgotten, it would still be stopped when
# this process exits, and killed by its agent if this process were SIGKILLed.)
other = Sandbox.run(tags=["examples", "standalone"])
sandbox_id = other.exec(["sh", "-c", "echo $SANDPOOL_SANDBOX_ID"]).result().stdout.strip()
print(f"inside, SANDPOOL_SANDBOX_ID={sandbox_id} (matches: {sandbox_id == other.sandbox_id})")
other.stop().result()
print(f"stopped by hand: {other.status}")
