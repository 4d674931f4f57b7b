"""secrets=[Secret(...)]: values read in the client, injected as environment variables, never dropped."""

import json

import pytest

from sandpool import SandboxDefaults, Secret, Session
from sandpool._config import resolve_spec
from sandpool._options_cw import SECRETS_FILE_ENV


def _env_of(sb, name):
    return sb.exec(["sh", "-c", f'printf %s "${name}"']).result().stdout


def test_env_store_secret_reaches_the_sandbox(monkeypatch):
    """store='env' reads the client's variable ``name`` and sets ``env_var`` in the sandbox."""
    monkeypatch.setenv("CLIENT_TOKEN", "t0k3n")
    with Session() as s:
        sb = s.sandbox(secrets=[Secret(store="env", name="CLIENT_TOKEN", env_var="API_TOKEN")])
        assert _env_of(sb, "API_TOKEN") == "t0k3n"
        assert sb.spec.secrets[0]["env_var"] == "API_TOKEN"


def test_file_store_secret_with_and_without_field(monkeypatch, tmp_path):
    """Other stores come from $SANDPOOL_SECRETS_FILE: {store: {name: value}} or {store: {name: {field: value}}}."""
    book = tmp_path / "secrets.json"
    book.write_text(json.dumps({"vault": {"db": {"password": "pw"}, "plain": "v"}}))
    monkeypatch.setenv(SECRETS_FILE_ENV, str(book))
    spec = resolve_spec(None, secrets=[Secret(store="vault", name="db", field="password", env_var="DB_PW"),
                                       {"store": "vault", "name": "plain"}])
    assert spec.environment_variables == {"DB_PW": "pw", "plain": "v"}


def test_missing_secret_is_an_error_naming_it(monkeypatch, tmp_path):
    """A secret that cannot be found raises ValueError naming it and where it was looked for."""
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    with pytest.raises(ValueError, match="NOPE_NOT_SET"):
        resolve_spec(None, secrets=[Secret(store="env", name="NOPE_NOT_SET")])
    monkeypatch.setenv(SECRETS_FILE_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="absent.json"):
        resolve_spec(None, secrets=[Secret(store="vault", name="x")])


def test_defaults_and_overrides_merge_by_env_var(monkeypatch):
    """Secrets of the defaults come first, one per env_var; two different ones for one variable, or a
    secret and environment_variables setting the same variable, are refused."""
    monkeypatch.setenv("A", "1")
    monkeypatch.setenv("B", "2")
    defaults = SandboxDefaults(secrets=[Secret(store="env", name="A")])
    spec = resolve_spec(defaults, secrets=[Secret(store="env", name="B"), Secret(store="env", name="A")])
    assert spec.environment_variables == {"A": "1", "B": "2"} and len(spec.secrets) == 2
    with pytest.raises(ValueError, match="two different secrets"):
        resolve_spec(defaults, secrets=[Secret(store="env", name="B", env_var="A")])
    with pytest.raises(ValueError, match="both by environment_variables"):
        resolve_spec(defaults, environment_variables={"A": "x"})


def test_bad_secret_values_are_type_errors():
    """A bare string or an unknown key is refused with the fix, not dropped."""
    with pytest.raises(TypeError, match="list of Secret"):
        resolve_spec(None, secrets="API_KEY")
    with pytest.raises(TypeError, match="unknown key"):
        resolve_spec(None, secrets=[{"store": "env", "nam": "X"}])
