"""``session.sandbox_count``: how many sandboxes the session tracks and will stop when it closes.

A sandbox counts from ``session.sandbox()`` on, started or not, and stops counting once it is
stopped; the count is 0 after the session closes.
"""

from sandpool import SandboxDefaults, Session

with Session(defaults=SandboxDefaults(tags=("examples", "sandbox-count"))) as session:
    print(f"new session: {session.sandbox_count}")

    a, b, c = session.sandbox(), session.sandbox(), session.sandbox()
    print(f"three created (none started): {session.sandbox_count}")

    a.exec(["true"]).result()
    print(f"one started: {session.sandbox_count}")

    b.stop().result()  # never started: nothing to stop, and it is no longer tracked
    print(f"a never-started one stopped: {session.sandbox_count}")

    a.stop().result()
    print(f"a running one stopped: {session.sandbox_count}")

print(f"after close: {session.sandbox_count}")
