"""The runtime's side of the ``bridge`` network (runs in its trio loop): set up before the spawn,
hand over after the handshake, take down when the agent is gone; sweep what dead owners left.

``prepare`` resolves the rules' DNS names (once, now: later changes of the name are not followed),
makes the namespace, veth and nft chains (``netns.make``, in a thread) and opens the exposed ports'
listeners; it adds to the spawn config the namespace's path (the agent joins it) and the nft
teardown script (the template runs it when it reaps the agent, so the rules go with the sandbox
even after a SIGKILL of the client). ``started`` lets go of the namespace (the agent holds it) and
starts relaying the exposed ports. ``release`` stops the relays, and when the agent never ran
removes the chains itself.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .._errors import SandboxFailedError
from .. import _services as services
from . import netns, network, nft, probe, slirp
from .ports import Forwarder

if TYPE_CHECKING:
    from .._runtime.contract import SandboxRecord


def tag(key: str, owner_dir: str, sandbox_id: str) -> str:
    """The name of a sandbox's chains: its state key, owner directory and id (sweeps parse it)."""
    return f"{key}-{os.path.basename(owner_dir)}-{sandbox_id}"


async def prepare(record: SandboxRecord, config: dict[str, Any], plan: dict[str, Any], key: str,
                  owner_dir: str) -> None:
    """Set up ``record``'s bridge network; SandboxFailedError (status reason ``NetworkError``) if
    it cannot be, saying why."""
    sandbox_id = record.sandbox_id
    if probe.rootless():
        _prepare_rootless(record, plan, config)
        return
    try:
        rules = network.policy(record.spec.network, record.spec.services)
        rules = await trio.to_thread.run_sync(_resolve_names, rules)
        servers = netns.nameservers()
        mark = nft.owner_mark(key, os.path.basename(owner_dir))
        lease = await trio.to_thread.run_sync(netns.make, tag(key, owner_dir, sandbox_id), rules, servers, mark)
    except (OSError, ValueError) as exc:
        raise SandboxFailedError(f"cannot set up the bridge network of {sandbox_id}: {exc}", sandbox_id=sandbox_id,
                                 status_reason="NetworkError") from exc
    record.extra["bridge"] = lease
    record.extra["dns_egress_names"] = rules.dns_names
    plan["netns"] = lease.path
    config["net_teardown"] = lease.teardown
    if servers and os.path.exists("/etc/resolv.conf"):
        plan["binds"] = [*plan["binds"], [os.path.realpath("/etc/resolv.conf"), "/etc/resolv.conf"]]
    config["env"].setdefault("SANDPOOL_SANDBOX_ADDRESS", lease.address)
    mapped: dict[int, str] = {}
    if rules.expose:
        forwarder = Forwarder(lease.address, rules.expose)
        record.extra["forwarder"] = forwarder
        try:
            await forwarder.open()
        except OSError as exc:
            raise SandboxFailedError(f"cannot open the exposed ports of {sandbox_id}: {exc}", sandbox_id=sandbox_id,
                                     status_reason="NetworkError") from exc
        mapped = dict(forwarder.mapped)
    record.extra.update(services.surfaces(rules.services, mapped, lease.address))


def _prepare_rootless(record: SandboxRecord, plan: dict[str, Any], config: dict[str, Any]) -> None:
    """An ordinary user's bridge: the sandbox makes its namespace as a ``none`` one does (so spares
    serve it), and ``started`` gives it egress through slirp4netns. Rules need root (nftables)."""
    rules = network.policy(record.spec.network, record.spec.services)
    if rules != network.Policy():
        raise SandboxFailedError(
            "network rules, exposed ports and services need root (nftables and a veth on the host); an "
            "ordinary user's bridge sandbox gets plain egress through slirp4netns: use network='bridge' "
            "without rules, or run as root", sandbox_id=record.sandbox_id, status_reason="NetworkError")
    binary = slirp.find()
    if binary is None:
        raise SandboxFailedError(
            f"network 'bridge' for an ordinary user needs a user-mode network stack: install {slirp.PACKAGES}, "
            f"or use network='none' or 'host'", sandbox_id=record.sandbox_id, status_reason="NetworkError")
    if not os.access(slirp.TUN, os.R_OK | os.W_OK):
        raise SandboxFailedError(
            f"network 'bridge' for an ordinary user needs {slirp.TUN}, which uid {os.geteuid()} cannot open "
            f"(Debian makes it mode 0666; here it is {slirp.tun_mode()}): ask root for 'chmod 0666 {slirp.TUN}', "
            f"or use network='none' or 'host'", sandbox_id=record.sandbox_id, status_reason="NetworkError")
    plan["network"] = "none"  # its own namespace with lo; tap0 comes from slirp4netns
    record.extra["slirp"] = slirp.Slirp(binary, 0, os.path.join(config["dir"], "slirp.sock"))


async def started(record: SandboxRecord, nursery: trio.Nursery) -> None:
    """The agent is in its namespaces (its handshake came): let go of the namespace and relay the
    exposed ports, or (rootless) start slirp4netns; SandboxFailedError if that fails."""
    user_mode = record.extra.get("slirp")
    if user_mode is not None:
        user_mode.pid = record.agent_pid
        try:
            await trio.to_thread.run_sync(user_mode.start)
        except OSError as exc:
            if record.channel is not None:  # (set before ``started``)
                await record.channel.aclose()  # the agent sees EOF and ends
            raise SandboxFailedError(f"cannot give {record.sandbox_id} its network: {exc}",
                                     sandbox_id=record.sandbox_id, status_reason="NetworkError") from exc
    lease = record.extra.get("bridge")
    if lease is not None:
        lease.close_fd()
    forwarder = record.extra.get("forwarder")
    if forwarder is not None:
        nursery.start_soon(forwarder.serve)


def release(record: SandboxRecord, spawned: bool) -> None:
    """The agent is gone (``spawned``: the template removed the chains) or never started."""
    forwarder = record.extra.pop("forwarder", None)
    if forwarder is not None:
        forwarder.close()
    user_mode = record.extra.pop("slirp", None)
    if user_mode is not None:
        user_mode.close()
    lease = record.extra.pop("bridge", None)
    if lease is not None:
        lease.close_fd()
        if not spawned:
            netns.nft_teardown_quietly(lease.teardown)


def sweep(state_dir: str, alive: Callable[[str], bool]) -> list[str]:
    """Remove the nft chains of ``state_dir``'s dead owners (``alive(owner dir path)``)."""
    from _sandpool_agent.confine.cgroups import state_key

    return nft.sweep(state_key(state_dir), lambda owner: alive(os.path.join(state_dir, owner)))


def _resolve_names(rules: network.Policy) -> network.Policy:
    """``rules`` with each DNS name's IPv4 addresses (resolved now, once) as the rule's networks."""
    if not rules.dns_names:
        return rules
    egress = []
    for rule in rules.egress or ():
        if rule.dns_name:
            try:
                infos = socket.getaddrinfo(rule.dns_name, None, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                raise ValueError(f"egress dns_name {rule.dns_name!r} does not resolve ({exc}); names are "
                                 f"resolved once, when the sandbox starts") from exc
            rule = dataclasses.replace(rule, nets=tuple(sorted({f"{i[4][0]}/32" for i in infos})))
        egress.append(rule)
    return dataclasses.replace(rules, egress=tuple(egress))
