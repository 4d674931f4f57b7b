import dataclasses
import json
import pickle

import pytest

from sandpool._config import (
    CLOUD_ONLY_OPTIONS,
    ResourceOptions,
    SandboxDefaults,
    SandboxSpec,
    SandboxStatus,
    parse_cpu,
    parse_memory,
    resolve_spec,
)

# --- quantities ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "cores"), [
    (2, 2.0), (1.5, 1.5), ("2", 2.0), ("500m", 0.5), ("1.5", 1.5), ("0.25", 0.25),
    ("100m", 0.1), (" 3 ", 3.0), ("2e-3", 0.002), ("0", 0.0),
])
def test_parse_cpu_accepts_numbers_and_quantities(value, cores):
    """parse_cpu returns cores for numbers, plain strings and milli-cpu strings."""
    assert parse_cpu(value) == pytest.approx(cores)


@pytest.mark.parametrize(("value", "nbytes"), [
    (1024, 1024), ("512Mi", 512 * 2**20), ("1Gi", 2**30), ("1G", 10**9), ("100M", 10**8),
    ("1k", 1000), ("1Ki", 1024), ("1e9", 10**9), ("1E3", 1000), (1e9, 10**9), ("1.5Gi", 3 * 2**29),
    ("1.5", 2), ("1Ti", 2**40), ("2E", 2 * 10**18),
])
def test_parse_memory_accepts_kubernetes_quantities(value, nbytes):
    """parse_memory returns bytes for binary, decimal and exponent quantities, rounding up."""
    assert parse_memory(value) == nbytes
    assert isinstance(parse_memory(value), int)


@pytest.mark.parametrize("value", ["", "abc", "2 cores", "1KB", "1K", "1e", "--1", "1.2.3", "Mi", "1e3Mi", "1e1000"])
def test_bad_quantity_names_the_value_and_an_example(value):
    """A malformed quantity raises ValueError naming the value and a valid example."""
    with pytest.raises(ValueError) as info:
        parse_memory(value)
    assert repr(value) in str(info.value) and "'512Mi'" in str(info.value)
    with pytest.raises(ValueError, match=r"use e\.g\. cpu='500m'"):
        parse_cpu(value)


@pytest.mark.parametrize("value", [-1, "-2", float("nan"), float("inf")])
def test_negative_or_non_finite_quantity_is_rejected(value):
    """Negative and non-finite quantities raise ValueError."""
    with pytest.raises(ValueError, match="cpu"):
        parse_cpu(value)


@pytest.mark.parametrize("value", [None, True, [1], {"cpu": 1}])
def test_quantity_of_wrong_type_is_a_type_error(value):
    """A quantity that is neither a number nor a string raises TypeError."""
    with pytest.raises(TypeError, match="memory"):
        parse_memory(value)


def test_milli_memory_is_rejected_as_a_typo_for_mebibytes():
    """memory='512m' (half a byte) raises ValueError suggesting '512Mi'."""
    with pytest.raises(ValueError, match=r"memory='512m'.*use memory='512Mi'"):
        parse_memory("512m")


# --- status -------------------------------------------------------------------------------


def test_status_values_are_lowercase_and_helpers_classify():
    """Statuses are lowercase strings; is_terminal and is_running classify them."""
    assert SandboxStatus.RUNNING == "running"
    assert {s for s in SandboxStatus if s.is_terminal} == {"completed", "failed", "terminated"}
    assert {s for s in SandboxStatus if s.is_running} == {"running", "paused"}


def test_status_parse_accepts_members_and_lowercase_strings():
    """parse returns the member for a member or its lowercase value."""
    assert SandboxStatus.parse("paused") is SandboxStatus.PAUSED
    assert SandboxStatus.parse(SandboxStatus.FAILED) is SandboxStatus.FAILED


def test_status_parse_rejects_uppercase_with_the_fix():
    """An uppercase status raises ValueError saying to use the lowercase value."""
    with pytest.raises(ValueError, match=r"'RUNNING'.*use \"running\".*'pending'"):
        SandboxStatus.parse("RUNNING")


def test_status_parse_rejects_unknown_listing_valid_values():
    """An unknown status raises ValueError listing the valid values."""
    with pytest.raises(ValueError, match=r"'sleeping'.*'running'.*'terminated'"):
        SandboxStatus.parse("sleeping")
    with pytest.raises(TypeError, match="status"):
        SandboxStatus.parse(3)  # type: ignore[arg-type]


# --- ResourceOptions ----------------------------------------------------------------------


def test_flat_resources_mean_equal_requests_and_limits():
    """The flat dict form sets requests and limits to the same quantities."""
    res = ResourceOptions.coerce({"cpu": "2", "memory": "1Gi", "gpu": 1})
    assert res.requests == res.limits == {"cpu": "2", "memory": "1Gi"}
    assert (res.cpu_request, res.cpu_limit) == (2.0, 2.0)
    assert (res.memory_request, res.memory_limit) == (2**30, 2**30)
    assert res.gpu == {"count": 1} and res.gpu_count == 1


def test_nested_resources_are_kept_side_by_side():
    """The nested dict form keeps distinct requests, limits and gpu."""
    res = ResourceOptions.coerce({
        "requests": {"cpu": "500m", "memory": "256Mi"},
        "limits": {"cpu": 2, "memory": "1Gi", "pids": "128"},
        "gpu": {"count": 2, "type": "A100"},
    })
    assert (res.cpu_request, res.cpu_limit) == (0.5, 2.0)
    assert (res.memory_request, res.memory_limit) == (256 * 2**20, 2**30)
    assert res.pids_limit == 128
    assert res.gpu == {"count": 2, "type": "A100"} and res.gpu_count == 2


def test_gpu_int_becomes_count_dict_and_zero_is_none():
    """gpu=n normalises to {'count': n}; gpu=0 means no gpu."""
    assert ResourceOptions(gpu=3).gpu == {"count": 3}
    assert ResourceOptions(gpu=3) == ResourceOptions(gpu={"count": 3})
    assert ResourceOptions(gpu=0).gpu is None and ResourceOptions().gpu_count == 0


def test_one_side_is_copied_to_the_other():
    """Given only requests or only limits, the other side is the same."""
    assert ResourceOptions(requests={"cpu": 1}).limits == {"cpu": 1}
    assert ResourceOptions(limits={"memory": "1Gi"}).requests == {"memory": "1Gi"}


def test_empty_dicts_become_none():
    """Empty requests, limits and resources dicts normalise to None."""
    res = ResourceOptions(requests={}, limits={}, gpu={"count": 0})
    assert (res.requests, res.limits, res.gpu) == (None, None, None)
    assert res.cpu_request is None and res.pids_limit is None
    assert ResourceOptions.coerce({}) is None and ResourceOptions.coerce(None) is None


def test_unknown_resource_key_is_named_with_a_suggestion():
    """An unknown resource key raises ValueError naming it and the closest valid key."""
    with pytest.raises(ValueError, match=r"'cpus'.*did you mean 'cpu'\?.*ephemeral-storage"):
        ResourceOptions(requests={"cpus": 2})
    with pytest.raises(ValueError, match=r"'nvidia.com/gpu'.*use gpu=N"):
        ResourceOptions.coerce({"nvidia.com/gpu": 1})


def test_bad_quantity_inside_resources_names_the_side_and_key():
    """An invalid quantity names requests/limits, the key and the value."""
    with pytest.raises(ValueError, match=r"limits\['memory'\]='lots'"):
        ResourceOptions(limits={"memory": "lots"})


def test_request_above_limit_is_rejected():
    """A request larger than its limit raises ValueError naming both."""
    with pytest.raises(ValueError, match=r"requests\['cpu'\]='4' exceeds limits\['cpu'\]='2'"):
        ResourceOptions(requests={"cpu": "4"}, limits={"cpu": "2"})


def test_coerce_rejects_other_types_naming_resources():
    """coerce raises TypeError naming the field resources and the accepted forms."""
    with pytest.raises(TypeError, match=r"resources must be None, a ResourceOptions.*'cpu'.*'requests'"):
        ResourceOptions.coerce("2 cpus")


def test_coerce_rejects_mixed_nested_and_flat_forms():
    """A dict mixing requests/limits with flat keys raises ValueError naming the stray key."""
    with pytest.raises(ValueError, match=r"'cpu'"):
        ResourceOptions.coerce({"requests": {"cpu": 1}, "cpu": 2})


def test_resource_options_round_trip_through_to_dict_json_and_pickle():
    """to_dict gives plain JSON-able dicts that coerce back; the object hashes and pickles."""
    res = ResourceOptions(requests={"cpu": "1"}, limits={"cpu": "2"}, gpu=1)
    assert ResourceOptions.coerce(json.loads(json.dumps(res.to_dict()))) == res
    assert pickle.loads(pickle.dumps(res)) == res
    assert hash(res) == hash(ResourceOptions.coerce(res.to_dict()))


def test_resource_dicts_are_read_only():
    """The normalised dicts of a frozen ResourceOptions cannot be mutated."""
    res = ResourceOptions(requests={"cpu": 1})
    with pytest.raises(TypeError, match="read-only"):
        res.requests["cpu"] = 64  # type: ignore[index]


# --- SandboxDefaults ----------------------------------------------------------------------


def test_defaults_have_the_documented_values():
    """SandboxDefaults() has the documented defaults."""
    d = SandboxDefaults()
    assert (d.container_image, d.command, d.args, d.tags) == ("host", None, None, ())
    assert d.environment_variables == {} and d.annotations == {} and d.resources is None
    assert (d.request_timeout_seconds, d.isolation, d.max_output_bytes) == (300.0, "auto", 2**26)


def test_defaults_normalise_lists_dicts_and_resources():
    """Lists become tuples, dicts become read-only equal copies, resource dicts are coerced."""
    env = {"A": "1"}
    d = SandboxDefaults(tags=["a", "b"], command="python", args=["-c", "pass"],
                        environment_variables=env, resources={"cpu": 1})
    env["A"] = "changed"
    assert d.tags == ("a", "b") and d.args == ("-c", "pass")
    assert d.environment_variables == {"A": "1"}
    assert d.resources == ResourceOptions(requests={"cpu": 1})
    with pytest.raises(TypeError):
        d.environment_variables["B"] = "2"  # type: ignore[index]
    assert hash(d) == hash(dataclasses.replace(d))


@pytest.mark.parametrize(("kwargs", "exc", "pattern"), [
    ({"tags": "x"}, TypeError, r"tags must be a list of strings, not a string: got 'x'; use tags=\['x'\]"),
    ({"tags": ["a", 1]}, TypeError, r"tags\[1\] must be a str, got int 1; use '1'"),
    ({"command": "python", "args": "-V"}, TypeError, r"args .*not a string: got '-V'; use args=\['-V'\]"),
    ({"args": ["-V"]}, ValueError, r"args=\('-V',\) needs a command; set command too"),
    ({"environment_variables": {"PORT": 8080}}, TypeError, r"'PORT': 8080; use 'PORT': '8080'"),
    ({"environment_variables": {"A=B": "x"}}, ValueError, r"environment_variables .*'A=B'.*without '='"),
    ({"annotations": ["a"]}, TypeError, r"annotations must be a dict .*\['a'\]; use e\.g\."),
    ({"request_timeout_seconds": -1}, ValueError, r"request_timeout_seconds .*> 0, got int -1; use e\.g\. request_timeout_seconds=300\.0"),
    ({"request_timeout_seconds": float("inf")}, ValueError, r"finite.*got float inf"),
    ({"max_lifetime_seconds": 0}, ValueError, r"max_lifetime_seconds .*got int 0; use e\.g\. max_lifetime_seconds=3600"),
    ({"max_lifetime_seconds": "1h"}, TypeError, r"max_lifetime_seconds must be a finite number of seconds > 0, got str '1h'"),
    ({"isolation": "vm"}, ValueError, r"isolation must be one of 'auto', 'process', 'namespaces', 'oci', got 'vm'; use isolation='auto'"),
    ({"max_output_bytes": 0}, ValueError, r"max_output_bytes must be an int > 0, got 0; use e\.g\."),
    ({"container_image": ""}, ValueError, r"container_image must be a non-empty str, got ''; use e\.g\. container_image='host'"),
    ({"working_dir": 3}, TypeError, r"working_dir must be a non-empty str or None, got 3; use e\.g\."),
    ({"resources": 2}, TypeError, r"resources must be"),
])
def test_defaults_validation_names_field_value_and_fix(kwargs, exc, pattern):
    """Invalid defaults raise with a message naming the field, the bad value and the fix."""
    with pytest.raises(exc, match=pattern):
        SandboxDefaults(**kwargs)


def test_defaults_coerce_accepts_defaults_mappings_and_none():
    """SandboxDefaults.coerce passes defaults through, builds from a mapping, and None is the default."""
    d = SandboxDefaults(tags=("a",))
    assert SandboxDefaults.coerce(d) is d
    assert SandboxDefaults.coerce({"tags": ["a"]}) == d
    assert SandboxDefaults.coerce(None) == SandboxDefaults()
    with pytest.raises(TypeError, match=r"defaults must be a SandboxDefaults.*got list \['a'\]"):
        SandboxDefaults.coerce(["a"])


def test_with_overrides_replaces_whole_and_checks_names():
    """with_overrides replaces fields whole, ignores cloud-only names, rejects unknown ones."""
    d = SandboxDefaults(tags=("a",))
    assert d.with_overrides(tags=["b"], base_url="https://x").tags == ("b",)
    with pytest.raises(TypeError, match=r"'tag'; did you mean 'tags'\?"):
        d.with_overrides(tag=["b"])


def test_merge_helpers_follow_the_cwsandbox_rules():
    """merge_tags concatenates without dedup; env and annotation merges let the extra win."""
    d = SandboxDefaults(tags=("a", "b"), environment_variables={"A": "1", "B": "1"},
                        annotations={"x": "1"})
    assert d.merge_tags(["c", "a"]) == ("a", "b", "c", "a")
    assert d.merge_environment_variables({"B": "2"}) == {"A": "1", "B": "2"}
    assert d.merge_annotations({"x": "2"}) == {"x": "2"}
    with pytest.raises(TypeError, match="not a string"):
        d.merge_tags("c")


def test_from_dict_builds_and_coerces():
    """from_dict builds defaults from a plain mapping, coercing lists and resource dicts."""
    d = SandboxDefaults.from_dict({"container_image": "python:3.11", "tags": ["a"],
                                   "resources": {"cpu": "1"}, "request_timeout_seconds": None})
    assert d.container_image == "python:3.11" and d.tags == ("a",)
    assert d.resources.cpu_limit == 1.0 and d.request_timeout_seconds == 300.0


def test_from_dict_rejects_unknown_key_with_suggestion():
    """An unknown key raises TypeError naming it, the close match and the valid fields."""
    with pytest.raises(TypeError, match=r"'enviroment_variables'; did you mean "
                                        r"'environment_variables'\? Valid fields: container_image"):
        SandboxDefaults.from_dict({"enviroment_variables": {}})
    with pytest.raises(TypeError, match=r"'profile_ids'\. Valid fields"):
        SandboxDefaults.from_dict({"profile_ids": ["p"]})


def test_from_dict_checks_cloud_only_options():
    """Cloud-only cwsandbox keys are fields of the defaults: a wrong value is refused, not dropped."""
    assert "base_url" in CLOUD_ONLY_OPTIONS and "image_pull_credentials" in CLOUD_ONLY_OPTIONS
    d = SandboxDefaults.from_dict({"base_url": "https://api", "temp_dir": "/tmp", "tags": ["a"]})
    assert (d.base_url, d.temp_dir, d.tags) == ("https://api", "/tmp", ("a",))
    for key in CLOUD_ONLY_OPTIONS:
        with pytest.raises((TypeError, ValueError, NotImplementedError)):
            SandboxDefaults.from_dict({key: object()})


# --- resolve_spec -------------------------------------------------------------------------


def test_resolve_without_overrides_copies_the_defaults():
    """With no overrides the spec has the defaults' values; None defaults mean SandboxDefaults()."""
    d = SandboxDefaults(container_image="python:3.11", tags=("a",), command="python")
    spec = resolve_spec(d)
    assert isinstance(spec, SandboxSpec)
    assert dataclasses.asdict(spec) == dataclasses.asdict(d)
    assert dataclasses.asdict(resolve_spec(None)) == dataclasses.asdict(SandboxDefaults())


def test_resolve_concatenates_tags_without_dedup():
    """Tags are the defaults' followed by the overrides', duplicates kept."""
    spec = resolve_spec(SandboxDefaults(tags=("a", "b")), tags=["c", "a"])
    assert spec.tags == ("a", "b", "c", "a")


def test_resolve_rejects_a_bare_string_tag():
    """A bare string for tags raises TypeError instead of being split into characters."""
    with pytest.raises(TypeError, match=r"use tags=\['abc'\]"):
        resolve_spec(SandboxDefaults(tags=("a",)), tags="abc")


def test_resolve_merges_env_and_annotations_with_override_winning():
    """Environment variables and annotations are dict-merged, the override winning."""
    d = SandboxDefaults(environment_variables={"A": "1", "B": "1"}, annotations={"k": "v"})
    spec = resolve_spec(d, environment_variables={"B": "2", "C": "3"}, annotations={"j": "w"})
    assert spec.environment_variables == {"A": "1", "B": "2", "C": "3"}
    assert spec.annotations == {"k": "v", "j": "w"}


def test_resolve_replaces_resources_whole():
    """An override of resources replaces the default whole, with no per-key merge."""
    d = SandboxDefaults(resources={"cpu": "2", "memory": "1Gi"})
    spec = resolve_spec(d, resources={"cpu": "1"})
    assert spec.resources == ResourceOptions(requests={"cpu": "1"})
    assert spec.resources.memory_limit is None


def test_resolve_command_without_args_means_no_args():
    """An overridden command without args gets no args (cwsandbox would inherit the default's)."""
    d = SandboxDefaults(command="/bin/sh", args=("-c", "sleep infinity"))
    spec = resolve_spec(d, command="sleep")
    assert spec.args is None and spec.argv() == ["sleep"]
    assert resolve_spec(d, command="sleep", args=["5"]).argv() == ["sleep", "5"]
    assert resolve_spec(d, args=["-c", "true"]).argv() == ["/bin/sh", "-c", "true"]
    assert resolve_spec(d).argv() == ["/bin/sh", "-c", "sleep infinity"]


def test_argv_is_none_without_a_command():
    """A spec with no command has argv() None: the agent just stays alive."""
    assert resolve_spec(None).argv() is None


def test_resolve_none_and_falsy_image_fall_back_to_defaults():
    """None overrides keep the default; a falsy container_image falls back to the default."""
    d = SandboxDefaults(container_image="python:3.11", max_lifetime_seconds=60)
    spec = resolve_spec(d, container_image="", max_lifetime_seconds=None, working_dir="/w")
    assert (spec.container_image, spec.max_lifetime_seconds, spec.working_dir) == (
        "python:3.11", 60.0, "/w")


def test_resolve_rejects_unknown_override_with_suggestion():
    """An unknown override raises TypeError naming it, the close match and the valid options."""
    with pytest.raises(TypeError, match=r"^unknown sandbox option 'tgas'; did you mean 'tags'\? "
                                        r"Valid options: container_image, command, args, tags"):
        resolve_spec(None, tgas=["x"])


def test_resolve_keeps_cloud_only_overrides_without_other_effect():
    """Cloud-only options without local effect are kept on the spec; the local options are unchanged."""
    spec = resolve_spec(None, runner_ids=["r1"], secrets=[], base_url="https://api", tags=["a"])
    plain = resolve_spec(None, tags=["a"])
    assert (spec.runner_ids, spec.base_url, spec.secrets) == (("r1",), "https://api", None)
    assert dataclasses.replace(spec, runner_ids=None, base_url=None) == plain


def test_resolve_accepts_mapping_defaults():
    """Mapping defaults are coerced with SandboxDefaults.from_dict, unknown keys rejected."""
    assert resolve_spec({"tags": ["a"], "temp_dir": "/tmp"}, tags=["b"]).tags == ("a", "b")
    with pytest.raises(TypeError, match="did you mean 'tags'"):
        resolve_spec({"tag": ["a"]})
    with pytest.raises(TypeError, match="defaults must be"):
        resolve_spec(42)  # type: ignore[arg-type]


def test_resolve_validates_the_result():
    """Invalid override values raise the same clear errors as SandboxDefaults."""
    with pytest.raises(ValueError, match="isolation must be one of"):
        resolve_spec(None, isolation="vm")
    with pytest.raises(ValueError, match="needs a command"):
        resolve_spec(None, args=["x"])


def test_spec_hashes_pickles_and_round_trips_through_json():
    """A spec hashes by content, pickles, and rebuilds from its JSON-encoded asdict()."""
    spec = resolve_spec(SandboxDefaults(tags=("a",), resources={"cpu": "1", "gpu": 1}),
                        environment_variables={"A": "1"}, command="python", args=["-V"])
    same = resolve_spec(None, tags=["a"], resources={"cpu": "1", "gpu": 1},
                        environment_variables={"A": "1"}, command="python", args=("-V",))
    assert spec == same and hash(spec) == hash(same) and len({spec, same}) == 1
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert SandboxSpec.from_dict(json.loads(json.dumps(dataclasses.asdict(spec)))) == spec


def test_config_module_imports_only_the_stdlib():
    """_config imports nothing outside the standard library."""
    import ast
    import sys

    import sandpool._config as config

    tree = ast.parse(open(config.__file__).read())
    roots = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0] for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }
    assert roots <= set(sys.stdlib_module_names) | {"__future__"}


def test_a_misspelt_function_option_suggests_the_right_one():
    """session.function(retires=3) reaches the option check as an unknown name: it names 'retries'."""
    import sandpool

    with sandpool.Session() as session:
        with pytest.raises(TypeError, match=r"'retires'; did you mean 'retries' \(an option of session.function\)"):
            session.function(retires=3)
        with pytest.raises(TypeError, match="did you mean 'container_image'"):
            session.function(container_imge="host")
