"""Which spares the template forks, and when (``confine.spares``): plain decisions over plain data.
A child forked alone keeps a copy of every page the template writes in each round of its loop, so
no burst is of one child."""

from collections import Counter

from _sandpool_agent.confine import spares

PLAN_A, PLAN_B = {"root": "a"}, {"root": "b"}


def wanted_of(*keys: str) -> dict:
    wanted: dict = {}
    for key in keys:
        spares.ask(wanted, "none", key, {"root": key})
    return wanted


def test_the_spares_missing_come_newest_root_first():
    """With nothing yet: the newest root's spares, one without a root, then one per older root."""
    kinds = spares.missing(wanted_of("a", "b"), Counter(), True, set(), forking=0)
    assert kinds == [("none", "b", PLAN_B)] * spares.NEWEST_ROOT_SPARES + [("none", None, None), ("none", "a", PLAN_A)]


def test_one_spare_missing_is_forked_with_one_more_of_its_kind():
    """A spare handed a sandbox is replaced in a burst of two, the second one over the count."""
    have = Counter({("none", "a"): spares.NEWEST_ROOT_SPARES - 1, ("none", None): 1})
    assert spares.missing(wanted_of("a"), have, True, set(), forking=0) == [("none", "a", PLAN_A)] * 2


def test_an_agent_forked_alone_gets_a_spare_beside_it():
    """A round that forks one agent and misses no spare forks one spare more with it..."""
    have = Counter({("none", "a"): spares.NEWEST_ROOT_SPARES, ("none", None): 1})
    assert spares.missing(wanted_of("a"), have, True, set(), forking=1) == [("none", "a", PLAN_A)]
    assert spares.missing(wanted_of("a"), have, True, set(), forking=2) == []


def test_no_kind_goes_over_extra_times_its_count():
    """...but none once every kind has EXTRA times its count (the child is then alone)."""
    have = Counter({("none", "a"): spares.EXTRA * spares.NEWEST_ROOT_SPARES, ("none", None): spares.EXTRA})
    assert spares.missing(wanted_of("a"), have, True, set(), forking=1) == []
    assert spares.missing(wanted_of("a"), have, True, set(), forking=0) == []


def test_an_agent_that_waited_for_company_in_vain_gets_a_spare_however_many_there_are():
    """Where the template waited for a second spawn in vain (extra=None), the one more is forked."""
    have = Counter({("none", "a"): spares.EXTRA * spares.NEWEST_ROOT_SPARES, ("none", None): spares.EXTRA})
    assert spares.missing(wanted_of("a"), have, True, set(), forking=1, extra=None) == [("none", "a", PLAN_A)]


def test_roots_are_built_only_where_they_can_be():
    """Not buildable (no cgroup to keep), or a root that failed once: only spares without a root."""
    assert spares.missing(wanted_of("a"), Counter(), False, set(), forking=0) == [("none", None, None)] * 2
    assert spares.missing(wanted_of("a", "b"), Counter({("none", None): 1}), True, {"b"}, forking=0) \
        == [("none", "a", PLAN_A)] * spares.NEWEST_ROOT_SPARES


def test_only_the_last_roots_asked_for_are_wanted():
    """``ask`` keeps the last ROOTS_PER_MODE roots of a mode, the one asked for again moved last."""
    wanted = wanted_of("a", "b", "c", "a", "d")
    assert list(wanted["none"]) == ["c", "a", "d"][-spares.ROOTS_PER_MODE:]


def test_a_sandbox_is_forked_alone_only_without_a_ready_spare_or_one_to_fork_beside_it():
    """``Supervisor.alone`` (the template then waits briefly for a second spawn): false while a
    ready spare of the plan's mode can take it or a spare may be forked beside it."""
    import socket

    from _sandpool_agent.confine.supervisor import Supervisor, _Spare

    plan = {"network": "none", "lower": "/"}
    config = {"namespaces": plan}
    supervisor = Supervisor(spare_dir="/nonexistent")
    assert not supervisor.alone({"namespaces": None})  # the process level: no spare takes it, no wait
    assert not supervisor.alone({"namespaces": {**plan, "netns": "/run/netns/x"}})  # nor a bridge's
    assert not supervisor.alone(config)  # the first of its mode: a spare without a root beside it
    assert list(supervisor.wanted) == ["none"]
    ours, theirs = socket.socketpair()
    try:
        for pid in (4242, 4243):
            supervisor.spares[pid] = _Spare("none", ours, None, None)
        assert supervisor.alone(config)  # two spares without a root (EXTRA times one), neither ready
        theirs.send(b"r")
        supervisor._poll_spares()
        assert not supervisor.alone(config)  # one is ready: it takes the sandbox
    finally:
        ours.close()
        theirs.close()
