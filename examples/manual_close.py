"""Closing a session by hand, without a ``with`` block.

``session.close()`` stops every sandbox of the session concurrently and returns an OperationRef
that resolves once all of them are gone. It is idempotent; afterwards the session refuses new
sandboxes. Prefer ``with Session(...)``: it closes the session however the block ends.
"""

from sandpool import SandboxDefaults, SandboxError, Session

session = Session(defaults=SandboxDefaults(tags=("examples", "manual-close")))
try:
    pool = [session.sandbox() for _ in range(3)]
    for sandbox in pool:
        sandbox.exec(["true"]).result()
    print(f"open: {session!r}")
finally:
    session.close().result()  # stops all three concurrently, waits until they are gone

print(f"closed: {session!r}")
print("statuses after close:", [sandbox.status.value for sandbox in pool])

session.close().result()  # idempotent: nothing left to do
try:
    session.sandbox()
except SandboxError as exc:
    print(f"a closed session refuses new sandboxes: {exc}")
