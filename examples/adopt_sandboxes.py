"""Finding sandboxes by tag with ``Sandbox.list(tags=...)`` and adopting them into a session.

Here the sandboxes are standalone ones started with ``Sandbox.run``; once adopted, the session
stops them when it closes. ``tags`` must all match. The local runtime lists the sandboxes of this
process (those of all its sessions, and standalone ones), running ones unless asked otherwise.
"""

from sandpool import Sandbox, SandboxDefaults, Session

# A batch of sandboxes started earlier by some other part of the program.
batch = [Sandbox.run(tags=["nightly-batch", f"shard-{i}"]) for i in range(3)]
other = Sandbox.run(tags=["something-else"])  # not part of the batch

found = Sandbox.list(tags=["nightly-batch"]).result()
print(f"Sandbox.list(tags=['nightly-batch']) found {len(found)}: {sorted(sb.tags[1] for sb in found)}")

with Session() as session:
    for sandbox in found:
        session.adopt(sandbox)
    print(f"adopted: sandbox_count={session.sandbox_count}")
    shard = Sandbox.list(tags=["nightly-batch", "shard-1"]).result()[0]
    print(f"shard-1 says: {shard.exec(['echo', 'still here']).result().stdout.strip()}")

print("after the session closed:", [sb.status.value for sb in batch])

# The short form: session.list() filters on the session's default tags plus ``tags``, and
# adopt=True adopts what it finds.
late = [Sandbox.run(tags=["nightly-batch", "late"]) for _ in range(2)]
with Session(defaults=SandboxDefaults(tags=("nightly-batch",))) as session:
    adopted = session.list(tags=["late"], adopt=True).result()
    print(f"session.list(tags=['late'], adopt=True) adopted {len(adopted)}: sandbox_count={session.sandbox_count}")
print("late ones after that session closed:", [sb.status.value for sb in late])

print(f"still running: {[sb.tags for sb in Sandbox.list().result()]}")
other.stop().result()
