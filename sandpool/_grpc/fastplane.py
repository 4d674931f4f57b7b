"""The same-host fast plane's handshake, as both its ends speak it (server: ``_service/fastpath.py``,
client: ``fastclient.py``): a connection's first byte says what it redeems, an attachment's ticket
(``ATTACH``) or a key for a line to a call worker (``WORKER``); the secret that follows is
``TICKET_BYTES`` long; ``ACK`` admits. ``host_id()`` names the machine, so a client knows that a
server's advert is its own machine's."""

from __future__ import annotations

TICKET_BYTES = 32
ACK = b"\x01"
#: the first byte of a connection: it redeems an attachment's ticket, or opens a worker line
ATTACH, WORKER = b"A", b"W"


def host_id() -> str:
    """This machine's identity for the fast plane: its boot id (same kernel, same machine)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""
