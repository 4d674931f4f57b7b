"""CreateSandboxFromFile and CreateSandboxFromTemplate as a plain CreateSandboxRequest.

As in cwsandbox, a sandbox created from a file or a template is reported with the translated spec
(GetSandbox returns it, not the file): one ``Container`` per compose service (``sandpool._compose``
reads the file, as ``Sandbox.run_from_file`` does), or the options of a template stored on the
server's machine (``sandpool._templates``, ``sandpool templates save``) with the request's
``overrides`` laid over it, each field given replacing the template's ("replace on presence").
A template's ``network``, ``services`` and ``volumes`` become the spec's (``_template_net``: what
the listener maps back to the same sandbox). Whatever cwsandbox's spec cannot carry (a compose
``pids`` limit, a template's ``isolation``, a bind of a host directory...) is refused naming it,
never dropped. Plain sync code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import _compose, _templates
from ._errors import invalid, unimplemented
from ._proto import pb
from ._template_net import network, services, volumes

#: Template options a SandboxSpec carries (containers are mapped field by field).
_CONTAINER_KEYS = {"container_image": "image", "command": "command", "args": "args",
                   "environment_variables": "environment_variables", "working_dir": "working_dir",
                   "resources": "resources"}
_SPEC_KEYS = {"tags", "annotations", "max_lifetime_seconds", "containers", "network", "services", "volumes",
              *_CONTAINER_KEYS}
_ROW_KEYS = {"name", "image", "command", "args", "environment_variables", "working_dir", "resources", "primary"}


def from_file(request: Any) -> Any:
    """The CreateSandboxRequest a CreateSandboxFromFileRequest means; RpcFailure INVALID_ARGUMENT
    for a bad file (naming the service and key), UNIMPLEMENTED for ``control=CONTAINER_ENGINE``."""
    if request.control == pb.Control.Value("CONTROL_CONTAINER_ENGINE"):
        raise unimplemented("control=CONTAINER_ENGINE (Docker Compose in a container)")
    if request.build_contexts or request.build_context_objects:
        raise unimplemented("build contexts (images are pulled, not built; set image: in the file)")
    if not request.primary_service:
        raise invalid("primary_service", "primary_service is required: name the service that owns the sandbox")
    defaults = _resources_dict(request.default_resources) if request.HasField("default_resources") else None
    try:
        doc = _compose.parse(bytes(request.contents), "the file")
        rows = _compose.containers(doc, "the file", request.primary_service, dict(request.image_overrides), defaults)
    except ValueError as exc:
        raise invalid("contents", str(exc)) from exc
    spec = pb.SandboxSpec(tags=list(request.tags), annotations=dict(request.annotations),
                          max_lifetime_seconds=request.max_lifetime_seconds,
                          containers=[_container(row, f"service {row['name']!r}") for row in rows])
    if request.HasField("network"):
        spec.network.CopyFrom(request.network)
    return pb.CreateSandboxRequest(sandbox=pb.Sandbox(spec=spec), request_id=request.request_id)


def from_template(request: Any) -> Any:
    """The CreateSandboxRequest a CreateSandboxFromTemplateRequest means: the stored template's
    options as a spec, ``overrides`` replacing each field they set. RpcFailure INVALID_ARGUMENT for
    an unknown template or one with options the spec cannot carry."""
    try:
        options = _templates.load(_templates.check_name(request.template_id, "template_id"))
    except (TypeError, ValueError) as exc:
        raise invalid("template_id", str(exc)) from exc
    spec = _spec(options, f"template {request.template_id!r}")
    overrides = pb.SandboxSpec.FromString(request.overrides.SerializeToString())  # the same fields and numbers
    for field, value in overrides.ListFields():
        spec.ClearField(field.name)
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if repeated and field.message_type and field.message_type.GetOptions().map_entry:
            getattr(spec, field.name).update(value)
        elif repeated:
            getattr(spec, field.name).extend(value)
        elif field.message_type is not None:
            getattr(spec, field.name).CopyFrom(value)
        else:
            setattr(spec, field.name, value)
    return pb.CreateSandboxRequest(sandbox=pb.Sandbox(spec=spec), request_id=request.request_id)


def _spec(options: Mapping[str, Any], where: str) -> Any:
    unknown = sorted(k for k, v in options.items() if v is not None and k not in _SPEC_KEYS)
    if unknown:
        raise invalid("template_id", f"{where} sets {unknown[0]!r}, which cwsandbox's spec cannot carry; start it "
                                     f"with sandpool's own API (session.sandbox(template_id=...))")
    spec = pb.SandboxSpec(tags=list(options.get("tags") or ()), annotations=dict(options.get("annotations") or {}),
                          max_lifetime_seconds=int(options.get("max_lifetime_seconds") or 0))
    if options.get("containers"):
        rows = [dict(row) for row in options["containers"]]
    else:
        row = {field: options[key] for key, field in _CONTAINER_KEYS.items() if options.get(key) is not None}
        rows = [row] if row else []
    spec.containers.extend(_container(row, f"{where}: container {row.get('name') or 'main'!r}") for row in rows)
    try:
        if options.get("network") is not None:
            spec.network.CopyFrom(network(options["network"]))
        spec.services.extend(services(options.get("services") or ()))
        if options.get("volumes"):
            volumes(spec, options["volumes"])
    except (TypeError, ValueError) as exc:
        raise invalid("template_id", f"{where}: {exc}") from exc
    return spec


def _container(row: Mapping[str, Any], where: str) -> Any:
    """A compose service's or a template's container (Container's fields) as a pb.Container."""
    unknown = sorted(k for k, v in row.items() if v not in (None, False) and k not in _ROW_KEYS)
    if unknown:
        raise invalid("contents", f"{where} sets {unknown[0]!r}, which cwsandbox's spec cannot carry")
    out = pb.Container(name=row.get("name") or "", image=row.get("image") or "host",
                       command=row.get("command") or "", args=[str(a) for a in row.get("args") or ()],
                       environment_variables=dict(row.get("environment_variables") or {}),
                       working_dir=row.get("working_dir") or "")
    if row.get("primary"):
        out.primary = True
    if row.get("resources"):
        out.resource_requirements.CopyFrom(_requirements(row["resources"], where))
    return out


def _requirements(resources: Mapping[str, Any], where: str) -> Any:
    out = pb.ResourceRequirements()
    for side in ("requests", "limits"):
        given = dict(resources.get(side) or {})
        extra = sorted(set(given) - {"cpu", "memory"})
        if extra or resources.get("gpu"):
            what = f"resources.{side}.{extra[0]}" if extra else "resources.gpu"
            raise invalid("contents", f"{where} sets {what}, which cwsandbox's spec cannot carry (cpu and memory "
                                      f"only); leave it out")
        getattr(out, side).cpu = str(given.get("cpu") or "")
        getattr(out, side).memory = str(given.get("memory") or "")
    return out


def _resources_dict(requirements: Any) -> dict[str, Any] | None:
    """``default_resources`` (a ResourceRequirements) in the compose reader's form."""
    out = {side: {k: v for k, v in (("cpu", getattr(requirements, side).cpu),
                                     ("memory", getattr(requirements, side).memory)) if v}
           for side in ("requests", "limits")}
    return {k: v for k, v in out.items() if v} or None
