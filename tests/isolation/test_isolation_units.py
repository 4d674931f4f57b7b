"""Plain-data parts of isolation, on any machine: network mapping, cgroup layouts, images, lifecycle."""

import os

import pytest

from sandpool import SandboxStatus
from sandpool._core import lifecycle as _lifecycle
from _sandpool_agent.confine import cgroups
from sandpool._isolation import images, network


def test_network_modes_and_defaults():
    """None is 'none' for namespaces and 'host' for the process level; bools and names map."""
    assert network.resolve(None, "namespaces") == "none"
    assert network.resolve(None, "process") == "host"
    assert network.resolve("host", "namespaces") == "host"
    assert network.resolve(True, "namespaces") == "host" and network.resolve(False, "oci") == "none"


def test_cwsandbox_network_options_map_where_they_can():
    """deny_egress is 'none'; no rules or an 'any' rule is 'host'; CIDR rules are refused clearly."""
    class NetworkOptions:  # the shape of cwsandbox's class
        def __init__(self, deny_egress=None, egress=()):
            self.deny_egress, self.egress, self.deny_ingress, self.ingress = deny_egress, egress, None, ()

    assert network.resolve(NetworkOptions(deny_egress=True), "namespaces") == "none"
    assert network.resolve(NetworkOptions(), "namespaces") == "host"
    assert network.resolve({"egress": [{"any": True}]}, "namespaces") == "host"
    assert network.resolve({"egress": [{"dns_name": "pypi.org"}]}, "namespaces") == "bridge"
    assert network.resolve({"ingress": [{"any": True, "ports": [80]}]}, "namespaces") == "bridge"
    with pytest.raises(ValueError, match="no local meaning"):
        network.resolve({"egress": [{"selector": {"pod_labels": {}}}]}, "namespaces")
    with pytest.raises(ValueError, match="needs a network namespace"):
        network.resolve("none", "process")
    with pytest.raises(ValueError, match="'none'.*'host'.*'bridge'"):
        network.resolve("nat", "namespaces")


def test_bridge_rules_compile_to_nft_matches():
    """Rules become plain data (CIDRs, except-CIDRs, port ranges per protocol, DNS names with 443 by
    default) and then nft matches; tenant means sandpool's range; tcp ingress ports are exposed."""
    from sandpool._isolation import nft

    rules = network.policy({"egress": [{"cidr": {"cidr": "10.1.0.0/16", "except_cidrs": ["10.1.2.0/24"]},
                                        "ports": [{"port": 80}, {"port": 8000, "end_port": 8010},
                                                  {"port": 53, "protocol": "udp"}]},
                                       {"dns_name": "example.org"}],
                            "ingress": [{"tenant": "same_user", "ports": [{"port": 9000}]}]})
    first, named = rules.egress
    assert first.ports == (("tcp", 80, 80), ("tcp", 8000, 8010), ("udp", 53, 53))
    assert named.dns_name == "example.org" and named.ports == (("tcp", 443, 443),)
    assert rules.ingress[0].nets == (str(network.sandbox_range()),) and rules.expose == (9000,)
    assert nft._matches(first, "daddr") == ["ip daddr { 10.1.0.0/16 } ip daddr != { 10.1.2.0/24 } "
                                            "tcp dport { 80, 8000-8010 }",
                                            "ip daddr { 10.1.0.0/16 } ip daddr != { 10.1.2.0/24 } udp dport { 53 }"]
    assert network.policy({"deny_egress": True, "ingress": [{"any": True}]}).egress == ()
    with pytest.raises(ValueError, match="IPv6"):
        network.policy({"egress": [{"cidr": "fd00::/8"}]})
    with pytest.raises(ValueError, match="at most 64"):
        network.policy({"ingress": [{"any": True, "ports": [{"port": 1000, "end_port": 2000}]}]})


def fake_layout(tmp_path, kind: str) -> cgroups.Layout:
    """A mountinfo for a pure v1, pure v2 or hybrid host, parsed by the real detector."""
    lines = []
    if kind in ("v1", "hybrid"):
        for n, c in enumerate(("memory", "cpu,cpuacct", "pids")):
            lines.append(f"{30 + n} 20 0:{30 + n} / /cg/{c} rw - cgroup cgroup rw,{c}")
    if kind in ("v2", "hybrid"):
        v2 = tmp_path / "unified"
        v2.mkdir()
        (v2 / "cgroup.controllers").write_text("cpu memory pids\n" if kind == "v2" else "hugetlb\n")
        lines.append(f"40 20 0:40 / {v2} rw - cgroup2 cgroup2 rw")
    info = tmp_path / "mountinfo"
    info.write_text("\n".join(lines) + "\n")
    return cgroups.detect(str(info))


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_limits_go_where_each_controller_lives(tmp_path, kind):
    """v2 files on a v2 host, v1 files on v1 and hybrid hosts; OOM kills the whole group on both."""
    layout = fake_layout(tmp_path, kind)
    assert layout.mode == kind
    group = cgroups.plan(layout, "skey", "o-1-aa", "sb-1")
    files = {os.path.basename(k): v for k, v in cgroups.limit_files(layout, group, 64 << 20, 0.5, 50).items()}
    if kind == "v2":
        assert files == {"memory.max": str(64 << 20), "memory.swap.max": "0", "memory.oom.group": "1",
                         "cpu.max": "50000 100000", "pids.max": "50"}
        assert group["oom"].endswith("memory.events") and group["oom_event"] is None
    else:
        assert files["memory.limit_in_bytes"] == str(64 << 20) and files["memory.oom_control"] == "1"
        assert files["cpu.cfs_quota_us"] == "50000" and files["pids.max"] == "50"
        assert group["oom"].endswith("memory.oom_control") and group["oom_event"].endswith("cgroup.event_control")
    assert (group["kill"] is not None) == (kind != "v1")
    assert all("/sandpool/skey/o-1-aa/sb-1" in d for d in group["dirs"])


@pytest.mark.parametrize("kind", ["v1", "v2", "hybrid"])
def test_a_group_without_a_memory_limit_has_no_v1_memory_cgroup(tmp_path, kind):
    """Without a memory limit a sandbox joins no v1 memory hierarchy (nothing to count its OOM kills
    in either); on the v2 tree the memory controller comes with its one group, as before."""
    layout = fake_layout(tmp_path, kind)
    full, bare = (cgroups.plan(layout, "skey", "o-1-aa", "sb-1", with_memory=m) for m in (True, False))
    if kind == "v2":
        assert bare == full
    else:
        assert [d for d in full["dirs"] if d not in bare["dirs"]] == ["/cg/memory/sandpool/skey/o-1-aa/sb-1"]
        assert bare["oom"] is None and bare["oom_event"] is None and cgroups.oom_kills(bare) == 0
        assert cgroups.limit_files(layout, bare, None, 0.5, 50) == cgroups.limit_files(layout, full, None, 0.5, 50)


def test_oom_counter_parsing():
    """Both v1 memory.oom_control and v2 memory.events carry 'oom_kill N'."""
    assert cgroups.count_from("oom_kill_disable 1\nunder_oom 0\noom_kill 3\n") == 3
    assert cgroups.count_from("low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 1\n") == 1
    assert cgroups.count_from("") == 0


def test_lifecycle_marks_an_oom_kill_failed_with_oomkilled():
    """gone(oom_killed=True) is FAILED with a reason starting 'OOMKilled'; a stop still wins."""
    running = _lifecycle.advance(_lifecycle.advance(_lifecycle.Lifecycle(), "start"), "running")
    dead = _lifecycle.advance(running, "gone", code=137, signal=9, oom_killed=True)
    assert dead.status == SandboxStatus.FAILED and dead.reason.startswith("OOMKilled")
    stopping = _lifecycle.advance(running, "stop")
    assert _lifecycle.advance(stopping, "gone", code=137, signal=9, oom_killed=True).reason == "stopped"


def test_unknown_image_says_how_to_get_it(tmp_path, monkeypatch):
    """An image no registry gives is an error naming the build and import commands and the fallback."""
    monkeypatch.setenv(images.ENV_IMAGE_DIR, str(tmp_path))
    monkeypatch.delenv(images.ENV_FALLBACK, raising=False)
    dead = "http://127.0.0.1:9"  # nothing listens: the pull fails at once, and no real registry is asked
    monkeypatch.setenv("SANDPOOL_REGISTRY_MIRRORS", f"docker.io={dead},registry.example={dead}")
    with pytest.raises(images.ImageError) as info:
        images.resolve("python:3.11")
    message = str(info.value)
    assert "image build python:3.11" in message and "image import python:3.11" in message
    assert "SANDPOOL_IMAGE_FALLBACK=host" in message
    with pytest.raises(images.ImageError) as info:
        images.resolve("registry.example/app:1")
    assert "image build" not in str(info.value) and "image import" in str(info.value)


def test_fallback_maps_unknown_images_to_host_with_a_warning(tmp_path, monkeypatch, caplog):
    """SANDPOOL_IMAGE_FALLBACK=host runs cloud image names on the host image, saying so."""
    monkeypatch.setenv(images.ENV_IMAGE_DIR, str(tmp_path))
    monkeypatch.setenv(images.ENV_FALLBACK, "host")
    assert images.resolve("python:3.11") == "/"
    assert "using the host image" in caplog.text


def test_import_list_and_remove_a_rootfs_tarball(tmp_path, monkeypatch):
    """import unpacks any rootfs tarball into the store; ls shows it; rm removes it."""
    import tarfile

    rootfs = tmp_path / "src"
    (rootfs / "usr" / "bin").mkdir(parents=True)
    (rootfs / "usr" / "bin" / "python3.11").write_text("")
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "os-release").write_text("ID=tiny\n")
    tarball = tmp_path / "rootfs.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(rootfs, arcname=".")
    store = str(tmp_path / "store")
    image = images.import_tarball("tiny/os:1", str(tarball), store)
    assert image.python == "3.11" and os.path.isfile(os.path.join(image.rootfs, "etc", "os-release"))
    assert [i.name for i in images.list_images(store)] == ["tiny/os:1"]
    assert images.resolve("tiny/os:1", store) == image.rootfs
    with pytest.raises(images.ImageError, match="already exists"):
        images.import_tarball("tiny/os:1", str(tarball), store)
    images.remove("tiny/os:1", store)
    assert images.list_images(store) == []


def test_build_recipes_cover_debian_based_names_only():
    """debian:* and python:X.Y (of a Debian release) are buildable; other names are not."""
    assert images.build_recipe("debian:bookworm") == ("bookworm", [])
    assert images.build_recipe("debian:12") == ("bookworm", [])
    assert images.build_recipe("python:3.11-slim")[0] == "bookworm"
    assert images.build_recipe("python:3.12") is None
    assert images.build_recipe("ubuntu:22.04") is None


def test_without_root_oci_is_unavailable(monkeypatch):
    """A non-root user cannot have the oci level, and the reason names root (the namespaces level
    it gets rootless: tests/isolation/test_rootless.py)."""
    from sandpool._isolation import probe

    probe.unavailable.cache_clear()
    monkeypatch.setattr(probe.os, "geteuid", lambda: 1000)
    try:
        assert "needs root" in probe.unavailable("oci")
        assert probe.unavailable("process") is None
    finally:
        monkeypatch.undo()
        probe.unavailable.cache_clear()


def test_interpreter_binds_never_reexpose_hidden_directories():
    """A client module under /tmp is bound by itself, never /tmp (that would show the state dir
    again); the host image needs no bind of what it shows (/usr); another image gets it."""
    from sandpool._isolation import hostview

    dirs = ("/root/.pyenv/versions/3.11.7", "/usr/lib/python3")
    sources = ("/tmp/project/helper.py", "/tmp/sandpool-0/o-1/x.py", "/tmp")
    binds = [s for s, _ in hostview._binds(True, "/tmp/sandpool-0", "/var/lib/sandpool/images", dirs, sources)]
    assert binds == ["/root/.pyenv/versions/3.11.7", "/tmp/project/helper.py"]
    other = [s for s, _ in hostview._binds(False, "/tmp/sandpool-0", "/var/lib/sandpool/images", dirs, sources)]
    assert other == ["/root/.pyenv/versions/3.11.7", "/usr/lib/python3", "/tmp/project/helper.py"]


def test_client_sources_follow_modules_imported_replaced_and_removed_between_starts(tmp_path, monkeypatch):
    """The client's module paths bound into a sandbox are those imported when it starts: a module
    imported, replaced (same name, another file) or removed since the last start is seen, though
    a start with nothing new answers from the last look."""
    import importlib
    import sys

    from sandpool._isolation import hostview

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sp_probe_mod.py").write_text(f"WHERE = {name!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "one"))
    monkeypatch.delitem(sys.modules, "sp_probe_mod", raising=False)
    before = hostview.client_sources()
    assert hostview.client_sources() is before  # nothing new: the last answer
    assert not any("sp_probe_mod" in p for p in before)

    first = importlib.import_module("sp_probe_mod")
    assert str((tmp_path / "one" / "sp_probe_mod.py").resolve()) in hostview.client_sources()

    del sys.modules["sp_probe_mod"]  # replaced by the same name from another file
    monkeypatch.syspath_prepend(str(tmp_path / "two"))
    second = importlib.import_module("sp_probe_mod")
    assert (first.WHERE, second.WHERE) == ("one", "two")
    found = hostview.client_sources()
    assert str((tmp_path / "two" / "sp_probe_mod.py").resolve()) in found
    assert str((tmp_path / "one" / "sp_probe_mod.py").resolve()) not in found

    del sys.modules["sp_probe_mod"]
    assert not any("sp_probe_mod" in p for p in hostview.client_sources())
