"""sandpool's nftables table: the bridge sandboxes' NAT and rules, as nft scripts.

One table, ``inet sandpool``, owned by sandpool and nothing else:

- base chains ``forward`` and ``input`` (filter, priority -5, policy accept: traffic that is not a
  sandbox's passes on to the host's own rules untouched) and ``postrouting`` (nat: masquerade of
  sandpool's range when it leaves through a non-sandbox interface);
- three verdict maps keyed by a sandbox's host-side interface: ``egress`` (what it sends through
  the host), ``ingress`` (what the host forwards to it) and ``tohost`` (what it sends to the host
  itself);
- per sandbox three chains, ``e-<tag>``, ``i-<tag>``, ``h-<tag>`` (tag = state key, owner, sandbox
  id): allowed traffic ``return``s to the base chain, the rest is rejected (tcp reset, else
  icmp admin-prohibited), so a refused connect fails at once instead of timing out.

Replies (``ct state established,related``) are accepted first. A sandbox's ``teardown`` script
deletes its map entries and chains in one transaction. Stdlib only; runs ``nft -f -``.
"""

from __future__ import annotations

import json
import subprocess
import zlib
from collections.abc import Callable, Iterable

from .network import Policy, Rule

TABLE = "sandpool"
FAMILY = "inet"
MAPS = ("egress", "ingress", "tohost")
IFACE_PREFIX = "spn"  # a sandbox's host-side veth: spn<index>
KINDS = {"egress": "e", "ingress": "i", "tohost": "h"}


class NftError(OSError):
    """``nft`` refused a script (its message is the text)."""


def run(script: str) -> None:
    """Apply ``script`` as one transaction; NftError with nft's message if it fails."""
    try:
        done = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True, timeout=30)
    except FileNotFoundError:
        raise NftError(2, "nft is not installed (Debian package nftables)") from None
    if done.returncode:
        raise NftError(done.returncode, done.stderr.decode(errors="replace").strip())


def start(script: str) -> subprocess.Popen[bytes]:
    """``run`` in the background: returns the process, for ``finish``."""
    try:
        proc = subprocess.Popen(["nft", "-f", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise NftError(2, "nft is not installed (Debian package nftables)") from None
    assert proc.stdin is not None  # (stdin=PIPE)
    proc.stdin.write(script.encode())
    proc.stdin.close()
    return proc


def finish(proc: subprocess.Popen[bytes]) -> None:
    """Wait for a ``start``ed script; NftError with nft's message if it failed."""
    stderr = proc.stderr
    assert stderr is not None  # (stderr=PIPE, from ``start``)
    try:
        err = stderr.read()
        code = proc.wait(timeout=30)
    finally:
        stderr.close()
    if code:
        raise NftError(code, err.decode(errors="replace").strip())


def base_script(sandbox_range: str) -> str:
    """The table, its maps and base chains, (re)made whole: safe to apply again at any time (the
    base chains are flushed and refilled in the same transaction; sandboxes' chains are kept)."""
    t = f"{FAMILY} {TABLE}"
    lines = [f"add table {t}"]
    lines += [f"add map {t} {name} {{ type ifname : verdict ; }}" for name in MAPS]
    lines += [
        f"add chain {t} forward {{ type filter hook forward priority -5 ; policy accept ; }}",
        f"add chain {t} input {{ type filter hook input priority -5 ; policy accept ; }}",
        f"add chain {t} postrouting {{ type nat hook postrouting priority 105 ; policy accept ; }}",
        f"flush chain {t} forward", f"flush chain {t} input", f"flush chain {t} postrouting",
        f"add rule {t} forward ct state established,related accept",
        f"add rule {t} forward iifname vmap @egress",
        f"add rule {t} forward oifname vmap @ingress",
        f'add rule {t} forward iifname "{IFACE_PREFIX}*" meta mark set 0',  # (an owner's mark: ours only)
        f"add rule {t} input ct state established,related accept",
        f"add rule {t} input iifname vmap @tohost",
        f'add rule {t} postrouting ip saddr {sandbox_range} oifname != "{IFACE_PREFIX}*" masquerade',
    ]
    return "\n".join(lines) + "\n"


def chain_name(kind: str, tag: str) -> str:
    return f"{KINDS[kind]}-{tag}"


def owner_mark(key: str, owner: str) -> int:
    """The packet mark of one client runtime's bridge sandboxes (``key``: state key, ``owner``: its
    owner directory's name): set by a sender's egress chain, admitted by a private service's
    ingress chain, cleared before the packet leaves the forward chain. Never 0."""
    return zlib.crc32(f"{key}/{owner}".encode()) or 1


def sandbox_script(tag: str, iface: str, policy: Policy, nameservers: Iterable[str] = (), mark: int = 1) -> str:
    """Chains and map entries of one sandbox (its host-side interface ``iface``; ``mark``: its
    owner's ``owner_mark``)."""
    t = f"{FAMILY} {TABLE}"
    lines = []
    nameservers = list(nameservers)
    for kind in MAPS:
        chain = chain_name(kind, tag)
        lines.append(f"add chain {t} {chain}")
        if kind == "egress":
            lines.append(f"add rule {t} {chain} meta mark set {mark:#x}")
            if policy.egress != () and nameservers:  # DNS to the host's resolvers, unless all egress is denied
                ns = ", ".join(nameservers)
                lines += [f"add rule {t} {chain} ip daddr {{ {ns} }} {p} dport 53 return" for p in ("udp", "tcp")]
            rules = [Rule()] if policy.egress is None else policy.egress
            lines += [f"add rule {t} {chain} {m} return" for r in rules for m in _matches(r, "daddr")]
        elif kind == "ingress":
            lines += [f"add rule {t} {chain} {m} return" for r in policy.ingress for m in _matches(r, "saddr", mark)]
        else:  # to the host itself: only rules naming its addresses explicitly, never "any"
            lines += [f"add rule {t} {chain} {m} return" for r in policy.egress or () if r.nets
                      for m in _matches(r, "daddr")]
        lines += [f"add rule {t} {chain} meta l4proto tcp reject with tcp reset",
                  f"add rule {t} {chain} reject with icmpx type admin-prohibited"]
        lines.append(f'add element {t} {kind} {{ "{iface}" : jump {chain} }}')
    return "\n".join(lines) + "\n"


def teardown_script(tag: str, iface: str) -> str:
    """Delete a sandbox's map entries, then its chains (one transaction)."""
    t = f"{FAMILY} {TABLE}"
    lines = [f'delete element {t} {kind} {{ "{iface}" }}' for kind in MAPS]
    lines += [f"delete chain {t} {chain_name(kind, tag)}" for kind in MAPS]
    return "\n".join(lines) + "\n"


def _matches(rule: Rule, field: str, mark: int = 0) -> list[str]:
    """nft match expressions for ``rule`` (one per protocol of its ports)."""
    where = [f"meta mark {mark:#x}"] if rule.peers else []
    if rule.nets:
        where.append(f"ip {field} {{ {', '.join(rule.nets)} }}")
    if rule.excepts:
        where.append(f"ip {field} != {{ {', '.join(rule.excepts)} }}")
    head = " ".join(where)
    if not rule.ports:
        return [head or "meta nfproto ipv4"]
    out = []
    for proto in ("tcp", "udp"):
        ranges = [str(a) if a == b else f"{a}-{b}" for p, a, b in rule.ports if p == proto]
        if ranges:
            out.append(f"{head} {proto} dport {{ {', '.join(ranges)} }}".strip())
    return out


def sandbox_chains() -> list[str]:
    """Names of every sandbox chain in sandpool's table (none when the table does not exist)."""
    try:
        done = subprocess.run(["nft", "-j", "list", "table", FAMILY, TABLE], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if done.returncode:
        return []
    try:
        items = json.loads(done.stdout)["nftables"]
    except (ValueError, KeyError, TypeError):
        return []
    return sorted(item["chain"]["name"] for item in items
                  if "chain" in item and item["chain"]["name"][:2] in ("e-", "i-", "h-"))


def tags_of(chains: Iterable[str], key: str) -> set[str]:
    """Tags of the chains that belong to the state key ``key``."""
    return {name[2:] for name in chains if name[2:].startswith(key + "-")}


def sweep(key: str, alive: Callable[[str], bool]) -> list[str]:
    """Delete the chains (and map entries) of state key ``key`` whose owner (``alive(owner name)``
    says False) is gone; returns the tags removed."""
    removed = []
    for tag in sorted(tags_of(sandbox_chains(), key)):
        owner = tag[len(key) + 1:].rsplit("-sb-", 1)[0]
        if alive(owner):
            continue
        remove_chains(tag)
        removed.append(tag)
    return removed


def remove_chains(tag: str) -> None:
    """Delete a tag's chains, with whatever map entries still point at them."""
    t = f"{FAMILY} {TABLE}"
    try:
        done = subprocess.run(["nft", "-j", "list", "table", FAMILY, TABLE], capture_output=True, timeout=30)
        items = json.loads(done.stdout)["nftables"] if not done.returncode else []
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        items = []
    lines = []
    for item in items:
        m = item.get("map")
        for elem in (m or {}).get("elem") or ():
            key, verdict = elem if isinstance(elem, list) else (None, None)
            target = (verdict or {}).get("jump", {}).get("target") if isinstance(verdict, dict) else None
            if target and target[2:] == tag:
                lines.append(f'delete element {t} {m["name"]} {{ "{key}" }}')
    lines += [f"delete chain {t} {chain_name(kind, tag)}" for kind in MAPS]
    for line in lines:  # one by one: a part already gone must not keep the rest
        try:
            run(line + "\n")
        except NftError:
            pass
