"""Changing only the import works: cwsandbox's names, classes' members and exception tree exist in sandpool."""

import dataclasses
import datetime
import inspect
import pickle
import re
from pathlib import Path

import cwsandbox
import cwsandbox.exceptions as cw_exceptions
import pytest

import sandpool
import sandpool.exceptions as sp_exceptions
from sandpool import _options_cw

DOCS = Path(__file__).resolve().parents[2] / "docs" / "differences.md"

#: Public members of cwsandbox classes that sandpool lacks, and why. Anything else missing fails.
KNOWN_GAPS = {
    ("StreamReader", "close"): "exec streams end with their process; _process.py is the asyncio host's",
    ("StreamWriter", "QUEUE_SIZE"): "flow control is by window (STDIN_WINDOW_BYTES), not a queue size",
    ("StreamWriter", "closed"): "an instance attribute in sandpool, so not in dir() of the class",
    ("StreamWriter", "set_exception"): "cwsandbox's internal hook to fail a writer; nothing to set locally",
}

CW_ERRORS = {name: cls for name, cls in vars(cw_exceptions).items()
             if isinstance(cls, type) and issubclass(cls, BaseException) and cls.__module__ == cw_exceptions.__name__}


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_every_cwsandbox_name_is_exported():
    """All 121 names of cwsandbox.__all__ are in sandpool.__all__ and importable from sandpool."""
    missing = [name for name in cwsandbox.__all__ if name not in sandpool.__all__ or not hasattr(sandpool, name)]
    assert missing == []
    assert len(cwsandbox.__all__) == 121


def test_sandpool_all_names_exist():
    """sandpool.__all__ names only things that exist, once each."""
    assert all(hasattr(sandpool, name) for name in sandpool.__all__)
    assert len(set(sandpool.__all__)) == len(sandpool.__all__)


@pytest.mark.parametrize("name", [n for n in cwsandbox.__all__ if isinstance(getattr(cwsandbox, n), type)])
def test_public_members_of_each_class_exist(name):
    """dir() of each public cwsandbox class is covered by sandpool's class of that name (gaps are listed)."""
    missing = _public(getattr(cwsandbox, name)) - _public(getattr(sandpool, name))
    assert {m for m in missing if (name, m) not in KNOWN_GAPS} == set()


def test_known_gaps_are_still_gaps():
    """A listed gap that has been filled is removed from the list (so the list stays true)."""
    filled = [key for key in KNOWN_GAPS if key[1] in _public(getattr(sandpool, key[0]))]
    assert filled == []


@pytest.mark.parametrize("name", sorted(CW_ERRORS))
def test_exception_hierarchy_matches(name):
    """Each cwsandbox exception exists in sandpool.exceptions and is a subclass of the same ancestors."""
    ours = getattr(sp_exceptions, name)
    for ancestor in CW_ERRORS[name].__mro__:
        if ancestor in CW_ERRORS.values():
            assert issubclass(ours, getattr(sp_exceptions, ancestor.__name__)), ancestor.__name__
    assert issubclass(ours, sandpool.CWSandboxError)


@pytest.mark.parametrize("name", sorted(CW_ERRORS))
def test_exception_keywords_and_attributes_match(name):
    """Every keyword cwsandbox's constructor takes is accepted by sandpool's and kept as an attribute."""
    cw_cls = CW_ERRORS[name]
    params = [p for p in inspect.signature(cw_cls.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY]
    values = {p.name: {"k": "v"} if p.name == "metadata" else (
        datetime.timedelta(seconds=2) if p.name == "retry_delay" else "x") for p in params}
    if "field_violations" in values:
        values["field_violations"] = (sp_exceptions.FieldViolation("f", "bad"),)
    theirs, ours = cw_cls("boom", **values), getattr(sp_exceptions, name)("boom", **values)
    assert str(ours) == str(theirs) == "boom"
    for key in values:
        assert getattr(ours, key) == getattr(theirs, key), key
    assert type(pickle.loads(pickle.dumps(ours))) is type(ours)


def test_every_exception_has_reason_metadata_and_retry_delay():
    """reason, metadata ({} by default) and retry_delay exist on every sandpool exception, as in cwsandbox."""
    for name in sp_exceptions.__all__:
        cls = getattr(sp_exceptions, name)
        if not (isinstance(cls, type) and issubclass(cls, BaseException)):
            continue
        exc = cls("m")
        assert exc.reason is None and exc.metadata == {} and exc.retry_delay is None, name


def test_exception_module_is_all_of_them():
    """sandpool.exceptions re-exports the very classes of sandpool, and all of cwsandbox's names."""
    assert set(CW_ERRORS) <= set(sp_exceptions.__all__)
    assert all(getattr(sp_exceptions, n) is getattr(sandpool, n) for n in sp_exceptions.__all__ if hasattr(sandpool, n))


def test_value_types_have_cwsandbox_fields():
    """Each option dataclass has cwsandbox's fields with the same defaults, keyword-only where cwsandbox's are."""
    for name in cwsandbox.__all__:
        theirs = getattr(cwsandbox, name)
        if not dataclasses.is_dataclass(theirs) or name in ("ProcessResult", "SandboxDefaults", "ResourceOptions"):
            continue
        ours = getattr(sandpool, name)
        their_fields = {f.name: f for f in dataclasses.fields(theirs) if not f.name.startswith("_")}
        our_fields = {f.name: f for f in dataclasses.fields(ours)}
        assert set(their_fields) == set(our_fields), name
        for key, field in their_fields.items():
            if field.default is not dataclasses.MISSING:
                assert our_fields[key].default == field.default, (name, key)


def test_sandbox_defaults_accepts_every_cwsandbox_field():
    """SandboxDefaults takes every field cwsandbox's takes (values of the right type)."""
    cw_fields = {f.name for f in dataclasses.fields(cwsandbox.SandboxDefaults)}
    assert cw_fields <= {f.name for f in dataclasses.fields(sandpool.SandboxDefaults)}
    d = sandpool.SandboxDefaults(base_url="https://api.example", auth=sandpool.AuthStrategy.WANDB,
                                 create_retry_budget_seconds=0.0, poll_retry_budget_seconds=30.0,
                                 poll_rpc_timeout_seconds=15.0, temp_dir="/tmp", runner_ids=("r1",),
                                 placement_mode="cks", placement_spillover=sandpool.PlacementSpillover.STRICT,
                                 data_plane_mode="auto", security_context=sandpool.SecurityContext(run_as_user=1),
                                 object_storage_access={"buckets": ["b"]}, volumes=[], services=[])
    assert (d.placement_mode, d.data_plane_mode, d.runner_ids) == ("cks", "auto", ("r1",))
    assert d.security_context["run_as_user"] == 1 and d.auth is None  # credentials are not kept


def _doc_table(marker: str) -> set[str]:
    lines = DOCS.read_text()[DOCS.read_text().index(f"<!-- {marker}:"):].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| option |"))
    table = [line for line in lines[header + 2:] if line.startswith("|")][: next(
        (i for i, line in enumerate(lines[header + 2:]) if not line.startswith("|")), None)]
    return {re.match(r"\| `([a-z_]+)` \|", row).group(1) for row in table}


def test_docs_list_exactly_the_options_without_local_effect():
    """docs/differences.md's two option tables name exactly the options the code treats that way."""
    assert _doc_table("options-without-local-effect") == set(_options_cw.NO_LOCAL_MEANING)
    assert _doc_table("options-not-yet") == set(_options_cw.NOT_YET)


@pytest.mark.parametrize("option", sorted(_options_cw.NOT_YET))
def test_options_not_yet_supported_raise_clearly(option):
    """Each not-yet option raises NotSupportedLocallyError (a NotImplementedError) naming it; never dropped."""
    value = "tpl-1" if option == "template_id" else [{"name": "x"}]
    with pytest.raises(NotImplementedError, match=option):
        sandpool.SandboxDefaults(**{option: value})
    with pytest.raises(sandpool.NotSupportedLocallyError) as info:
        sandpool.SandboxDefaults.from_dict({option: value})
    assert info.value.feature == option


def test_network_ingress_rules_are_kept_in_plain_form():
    """An ingress rule is accepted (a bridge network, docs/network.md) in plain form; deny_egress too."""
    defaults = sandpool.SandboxDefaults(network=sandpool.NetworkOptions(ingress=[sandpool.IngressRule(any=True)]))
    assert defaults.network["ingress"][0]["any"] is True
    assert sandpool.SandboxDefaults(network=sandpool.NetworkOptions(deny_egress=True)).network["deny_egress"]


def test_runtime_class_is_validated_and_warned_once():
    """runtime_class must be a lowercase name; the first use of a value warns that it is not honoured."""
    with pytest.raises(ValueError, match="runtime_class"):
        sandpool.SandboxDefaults(runtime_class="Not A Name")
    with pytest.warns(UserWarning, match="effective_runtime_class"):
        sandpool.SandboxDefaults(runtime_class="kata-once")
    assert sandpool.SandboxDefaults(runtime_class="kata-once").runtime_class == "kata-once"
    with pytest.raises(ValueError, match="PlacementMode"):
        sandpool.SandboxDefaults(placement_mode="anywhere")


def test_local_runner_and_helpers():
    """list_runners is this machine; get_runner of another id raises RunnerNotFoundError; formats match."""
    [runner] = sandpool.list_runners(include_resources=True)
    assert runner.runner_id == "local" and runner.max_cpu_millicores > 0 and runner.resources is not None
    assert sandpool.get_runner("local").runner_id == "local"
    with pytest.raises(sandpool.RunnerNotFoundError) as info:
        sandpool.get_runner("elsewhere")
    assert info.value.runner_id == "elsewhere"
    for value in (0, 1000, 1536 * 2**20, 5 * 2**40):
        assert sandpool.format_bytes(value) == cwsandbox.format_bytes(value)
    for value in (500, 2000, 1500):
        assert sandpool.format_cpu(value) == cwsandbox.format_cpu(value)
    with pytest.raises(NotImplementedError):
        sandpool.Volume.get("v1")
