"""A cwsandbox ``SandboxSpec`` as sandpool sandbox options.

Mapped: the container's image (pulled like any other; see ``local_image``), command and args, environment, working dir,
resources, files; the spec's tags, annotations and max lifetime. Everything else (volumes, services,
network, secrets, runtime class, security context, placement) has no local meaning yet: it is accepted,
ignored, and echoed back unchanged because the server keeps the request's spec as it came.
"""

from __future__ import annotations

from typing import Any

from ._errors import invalid
from ._proto import Message

HOST_IMAGE = "host"
#: Output kept per exec stream: ReadFile through commands must fit (the client's unary cap is 32 MiB).
MAX_OUTPUT_BYTES = 33 * 1024 * 1024
#: The name cwsandbox gives its single container; exec and file calls may name it.
PRIMARY_CONTAINER = "main"


def local_image(name: str) -> str:
    """The sandpool image for a cwsandbox image name: the name itself (pulled from its registry when
    the store lacks it, like any other sandbox's image), or the host image for an empty name. Nothing
    is mapped to the host silently: ``SANDPOOL_IMAGE_FALLBACK=host`` is the explicit, warned opt-in."""
    return name or HOST_IMAGE


def primary(spec: Message) -> Message | None:
    """The container that runs locally: the only one, or the one marked primary."""
    containers = list(spec.containers)
    if len(containers) <= 1:
        return containers[0] if containers else None
    marked = [c for c in containers if c.HasField("primary") and c.primary]
    if len(marked) != 1:
        raise invalid("sandbox.spec.containers", "with more than one container, exactly one must be primary")
    return marked[0]  # a pod: _pods.sandbox_options adds the others


def _quantities(resources: Message) -> dict[str, str]:
    return {key: value for key, value in (("cpu", resources.cpu), ("memory", resources.memory)) if value}


def _gpu(resources: Message) -> dict[str, Any] | None:
    if not resources.HasField("gpu") or resources.gpu.count <= 0:
        return None
    gpu = resources.gpu
    kind = gpu.WhichOneof("selector")
    return {"count": gpu.count, **({kind: getattr(gpu, kind)} if kind else {})}


def resources(container: Message) -> dict[str, Any] | None:
    """sandpool's nested resources form from ``resource_requirements`` (or the flat ``resources``)."""
    if container.HasField("resource_requirements"):
        req = container.resource_requirements
        return {"requests": _quantities(req.requests) or None, "limits": _quantities(req.limits) or None,
                "gpu": _gpu(req.limits) or _gpu(req.requests)}
    if container.HasField("resources"):
        flat = _quantities(container.resources) or None
        return {"requests": flat, "limits": flat, "gpu": _gpu(container.resources)}
    return None


def sandbox_options(spec: Message, isolation: str = "auto") -> dict[str, Any]:
    """Keyword options for ``Session.sandbox`` from a SandboxSpec, for sandboxes at ``isolation``.
    RpcFailure if it cannot run here."""
    options: dict[str, Any] = {"tags": list(spec.tags), "annotations": dict(spec.annotations),
                     "max_output_bytes": MAX_OUTPUT_BYTES}
    if spec.max_lifetime_seconds > 0:
        options["max_lifetime_seconds"] = spec.max_lifetime_seconds
    container = primary(spec)
    if container is None:
        return options
    options["container_image"] = local_image(container.image)
    command, args = container.command or None, list(container.args)
    if command is None and args:  # args alone would go to the image's entrypoint; locally args[0] is it
        command, args = args[0], args[1:]
    if command is not None:
        options.update(command=command, args=args)
    options["environment_variables"] = dict(container.environment_variables)
    if container.working_dir:
        options["working_dir"] = container.working_dir
    options["resources"] = resources(container)
    return options


def mounted_files(spec: Message) -> list[tuple[str, bytes]]:
    """The create-time files of the primary container, as (path, content)."""
    container = primary(spec)
    return [(f.path, bytes(f.content)) for f in container.files] if container is not None else []
