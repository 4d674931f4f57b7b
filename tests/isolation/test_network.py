"""The bridge network: a namespace of its own with a veth, NAT, nft rules and exposed ports.

Traffic goes only to loopback, to sandboxes' addresses, or to a network namespace the test makes
itself (``peer``); every request is one bounded connect.
"""

import ipaddress
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
import trio

from sandpool import SandboxFailedError, Session, testing
from sandpool._isolation import netns, network, nft
from sandpool._runtime.local import LocalRuntime

from network_helpers import (CONNECT, NEEDS_BRIDGE, SERVE, address, assert_chains_and_veth_go_with,  # noqa: F401
                             connect, host_connect, serve, session)  # (session: a fixture)

pytestmark = NEEDS_BRIDGE


@pytest.fixture
def peer():
    """A network namespace the test makes, with a veth to the host and a TCP server on port 7070
    that answers "from-peer:<what it got>": (its address, the port)."""
    name, link = f"sptest-{secrets.token_hex(3)}", f"spt{secrets.token_hex(3)}"
    sub = secrets.randbelow(60) * 4
    host_addr, peer_addr = f"10.214.{sub}.1", f"10.214.{sub}.2"
    subprocess.run(["ip", "netns", "add", name], check=True)
    server = None
    try:
        subprocess.run(["ip", "-b", "-"], text=True, check=True, input=(
            f"link add {link} type veth peer name eth0 netns {name}\n"
            f"addr add {host_addr}/30 dev {link}\nlink set {link} up\n"))
        subprocess.run(["ip", "-n", name, "-b", "-"], text=True, check=True, input=(
            f"link set lo up\naddr add {peer_addr}/30 dev eth0\nlink set eth0 up\n"))
        server = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", SERVE.replace("from-sandbox", "from-peer"), "7070"],
            stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        yield peer_addr, 7070
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", name], check=False)  # (the veth goes with it)


def test_bridge_sandbox_has_its_own_interface_address_and_route(session):
    """network='bridge': eth0 with an address of sandpool's range, a default route via the host end,
    only lo and eth0 in /sys/class/net, and the host's resolver in /etc/resolv.conf."""
    sb = session.sandbox(network="bridge")
    out = sb.exec(["sh", "-c", "ls /sys/class/net; ip route show default; cat /etc/resolv.conf"]).result().stdout
    assert out.split()[:2] == ["eth0", "lo"]
    mine = ipaddress.IPv4Address(address(sb))
    gateway = ipaddress.IPv4Address(out.split("default via ")[1].split()[0])
    assert mine in network.sandbox_range() and gateway == mine - 1
    assert any(line.startswith("nameserver") for line in out.splitlines()) == bool(netns.nameservers())


def test_server_reached_from_host_through_exposed_port_and_refused_from_another_sandbox(session):
    """An ingress port maps to 127.0.0.1:<host port> (sb.service_urls, sb.exposed_ports): the host
    reaches the sandbox's server there; a second sandbox connecting to the first's address is refused."""
    server = session.sandbox(network={"ingress": [{"cidr": "192.0.2.99/32", "ports": [{"port": 8000}]}]})
    serve(server, 8000)
    [(port, name, url)] = server.service_urls
    assert (port, name) == (8000, "") and server.exposed_ports == ((8000, ""),) and url.startswith("tcp://127.0.0.1:")
    hostport = url.removeprefix("tcp://")
    assert host_connect(hostport) == b"from-sandbox:host"
    other = session.sandbox(network="bridge")
    assert connect(other, address(server), 8000) == "refused"
    assert host_connect(hostport) == b"from-sandbox:host"  # still serving


def test_an_ingress_rule_lets_other_sandboxes_in(session):
    """An ingress rule naming sandpool's range (or tenant) admits the other sandboxes on its port."""
    server = session.sandbox(network={"ingress": [{"tenant": "same_user", "ports": [{"port": 8001}]}]})
    serve(server, 8001)
    other = session.sandbox(network="bridge")
    assert connect(other, address(server), 8001) == "ok from-sandbox:ping"


def test_egress_to_a_test_made_namespace_allowed_and_refused_by_rules(session, peer):
    """Egress rules name a CIDR and ports: the peer's port is reached when a rule allows it, refused
    when the rule names another port or another network; with no rules all egress goes (NAT)."""
    addr, port = peer
    allowed = session.sandbox(network={"egress": [{"cidr": f"{addr}/32", "ports": [{"port": port}]}]})
    wrong_port = session.sandbox(network={"egress": [{"cidr": f"{addr}/32", "ports": [{"port": port + 1}]}]})
    wrong_net = session.sandbox(network={"egress": [{"cidr": "192.0.2.128/25"}]})
    open_ = session.sandbox(network="bridge")
    assert connect(allowed, addr, port) == "ok from-peer:ping"
    assert connect(wrong_port, addr, port) == "refused"
    assert connect(wrong_net, addr, port) == "refused"
    assert connect(open_, addr, port) == "ok from-peer:ping"
    assert connect(allowed, addr, port) == "ok from-peer:ping"  # the refusals changed nothing


def test_deny_egress_with_ingress_refuses_every_connection_out(session, peer):
    """deny_egress=True with an ingress rule: a bridge sandbox that serves but reaches nothing."""
    addr, port = peer
    sb = session.sandbox(network={"deny_egress": True, "ingress": [{"any": True, "ports": [{"port": 8002}]}]})
    assert connect(sb, addr, port) == "refused"
    serve(sb, 8002)
    assert host_connect(sb.service_urls[0][2].removeprefix("tcp://")) == b"from-sandbox:host"


def test_chains_and_veth_go_with_the_sandbox(session):
    """Stopping a bridge sandbox removes its three nft chains and its veth."""
    assert_chains_and_veth_go_with(session.sandbox(network="bridge"))


CLIENT = textwrap.dedent("""
    import sys, time, sandpool
    with sandpool.Session(defaults={"isolation": "namespaces"}) as s:
        sbs = [s.sandbox(network={"ingress": [{"any": True, "ports": [{"port": 9000}]}]}) for _ in range(3)]
        for sb in sbs:
            sb.wait()
        print("ready", flush=True)
        time.sleep(300)
""")


def test_nothing_left_after_sigkill_of_the_client(tmp_path):
    """SIGKILL a client with 3 bridge sandboxes: their veths, nft chains and processes all go."""
    state_dir = str(tmp_path / "state")
    client = subprocess.Popen([sys.executable, "-c", CLIENT], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "SANDPOOL_STATE_DIR": state_dir})
    assert client.stdout.readline().strip() == "ready"
    before = testing.leftovers(state_dir)
    assert len(before.links) == 3 and len(before.nft) == 9
    client.send_signal(signal.SIGKILL)
    client.wait()
    report = testing.wait_for_no_leftovers(state_dir, timeout=10)
    testing.kill_leftovers(report)
    assert not report, report


def test_chains_of_a_dead_owner_are_swept_on_the_next_start(tmp_path):
    """Chains whose owner directory's template is dead (a template SIGKILLed) go when a runtime opens."""
    state_dir = str(tmp_path / "state")
    from _sandpool_agent.confine.cgroups import state_key

    tag = f"{state_key(state_dir)}-o-999999-abcdef-sb-dead0001"
    netns.ensure_base()
    nft.run(nft.sandbox_script(tag, "spn0", network.Policy()))
    assert len(testing.leftovers(state_dir).nft) == 3
    trio.run(_open_and_close, state_dir)
    assert not testing.leftovers(state_dir).nft


async def _open_and_close(state_dir: str) -> None:
    runtime = LocalRuntime(state_dir)
    async with trio.open_nursery() as nursery:
        await runtime.open(nursery)  # (sweeps)
        await runtime.aclose()


def test_bridge_rules_without_local_meaning_fail_the_start_clearly(session):
    """A selector rule has no local meaning: the start fails naming it; a bad CIDR names the fix."""
    with pytest.raises(SandboxFailedError, match="selector"):
        session.sandbox(network={"egress": [{"selector": {"pod_labels": {"a": "b"}}}]}).wait()
    with pytest.raises(SandboxFailedError, match="not a CIDR"):
        session.sandbox(network={"egress": [{"cidr": "10.0.0.300/8"}]}).wait()


def test_public_and_private_services(session, peer):
    """services=[...]: a public service is mapped to the host's 127.0.0.1 (service_urls, and an
    HTTPS endpoint's url is plain http locally); a private one is reachable from the same client's
    other sandboxes at the sandbox's address, and from no other client's; both are in exposed_ports."""
    sb = session.sandbox(services=[{"port": 8100, "name": "web", "visibility": "public",
                                    "endpoint": {"kind": "https"}},
                                   {"port": 8101, "name": "db", "visibility": "private"}])
    serve(sb, 8100)
    serve(sb, 8101)
    assert sb.exposed_ports == ((8100, "web"), (8101, "db"))
    urls = {name: url for _port, name, url in sb.service_urls}
    assert urls["web"].startswith("http://127.0.0.1:") and sb.service_endpoints[0].url == urls["web"]
    assert urls["db"] == f"tcp://{address(sb)}:8101"
    assert host_connect(urls["web"].removeprefix("http://")) == b"from-sandbox:host"
    neighbour = session.sandbox(network="bridge")
    assert connect(neighbour, address(sb), 8101) == "ok from-sandbox:ping"  # the same client: private ok
    assert connect(neighbour, address(sb), 8100) == "refused"  # public means the host's mapped port
    assert connect(sb, *peer) == "refused"  # services alone: no egress


def test_a_private_service_is_refused_to_another_clients_sandbox(session, tmp_path):
    """Another client (its own runtime, so its own owner) cannot reach a private service."""
    sb = session.sandbox(services=[{"port": 8102, "visibility": "private"}])
    serve(sb, 8102)
    other = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sandpool
            with sandpool.Session(defaults={{"isolation": "namespaces"}}) as s:
                sb = s.sandbox(network="bridge")
                print(sb.exec(["python3", "-c", {CONNECT!r}, {address(sb)!r}, "8102"]).result().stdout.strip())
        """)], capture_output=True, text=True, timeout=60, env={**os.environ, "SANDPOOL_STATE_DIR": str(tmp_path / "st")})
    assert other.stdout.strip() == "refused", other.stderr[-2000:]
    assert connect(session.sandbox(network="bridge"), address(sb), 8102) == "ok from-sandbox:ping"


def test_services_refused_as_cwsandbox_refuses_them(session):
    """An endpoint on a private service (cwsandbox's rule), a share token, a public udp service and
    services on network='host' are refused, naming the fix."""
    from sandpool import Service

    with pytest.raises(ValueError, match="endpoint needs visibility='public'"):
        session.sandbox(services=[{"port": 1, "visibility": "private", "endpoint": {"kind": "https"}}])
    with pytest.raises(ValueError, match="share-token"):
        session.sandbox(services=[Service(port=1, visibility="public",
                                          endpoint={"kind": "https", "auth": "share_token"})])
    with pytest.raises(ValueError, match="only tcp ports are mapped"):
        session.sandbox(services=[{"port": 53, "protocol": "udp", "visibility": "public"}])
    with pytest.raises(SandboxFailedError, match="services need a network"):
        session.sandbox(network="host", services=[{"port": 80, "visibility": "public"}]).wait()


ROOTLESS_CLIENT = textwrap.dedent("""
    import sys, sandpool
    with sandpool.Session() as s:
        sb = s.sandbox(network="bridge")
        try:
            sb.wait()
        except sandpool.SandboxFailedError as exc:
            print("failed", exc)
            sys.exit(0)
        print(sb.isolation, sb.exec(["ls", "/sys/class/net"]).result().stdout.split())
        print(sb.exec(["python3", "-c", sys.argv[1], sys.argv[2], sys.argv[3]]).result().stdout.strip())
""")


@pytest.fixture
def user_dir(unprivileged_user):
    """A directory under /tmp that the user owns (pytest's own are root's, 0700); removed afterwards."""
    path = tempfile.mkdtemp(prefix="sandpool-netns-", dir="/tmp")
    os.chown(path, unprivileged_user[1], unprivileged_user[2])
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_rootless_bridge_gets_egress_through_slirp4netns_or_says_why_not(unprivileged_user, user_dir, peer):
    """An ordinary user's bridge sandbox reaches the test's namespace through slirp4netns (tap0);
    where the user cannot open /dev/net/tun the start fails naming it and the fix. Nothing is left."""
    from sandpool._isolation import slirp

    _name, uid, gid, home = unprivileged_user
    state = user_dir
    site = __import__("sysconfig").get_paths()["purelib"]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "/usr/bin/python3", "-c", ROOTLESS_CLIENT,
         CONNECT, *map(str, peer)], capture_output=True, text=True, timeout=120, cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": home, "PYTHONPATH": f"{repo}:{site}",
             "SANDPOOL_STATE_DIR": str(state / "state")})
    out = done.stdout.splitlines()
    assert done.returncode == 0 and out, done.stderr[-3000:]
    if slirp.tun_mode() == "0o666":
        assert out == ["namespaces ['lo', 'tap0']", "ok from-peer:ping"], done.stdout
    else:
        assert out[0].startswith("failed") and "/dev/net/tun" in out[0] and "chmod 0666" in out[0], out
    report = testing.wait_for_no_leftovers(str(state / "state"), timeout=10)
    testing.kill_leftovers(report)
    assert not report, report
