"""A cwsandbox ``SandboxSpec`` as sandpool sandbox options.

Mapped: the container's image (pulled like any other; see ``local_image``), command and args, environment, working dir,
resources, files; the spec's tags, annotations and max lifetime; its volumes (``volumes``: a
registered volume is the local named volume of that name, a scratch volume a directory of the
sandbox's own filesystem, which sandpool's snapshots capture whole, and a scratch volume restored
from a snapshot restores the sandbox from it); its network and services (``_netspec``). Everything
else (secrets, runtime class, security context, placement) has no local meaning here yet: it is
accepted, ignored, and echoed back unchanged because the server keeps the request's spec as it came.
"""

from __future__ import annotations

from typing import Any

from ._errors import invalid
from ._netspec import network_options
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
    options.update(network_options(spec))  # network and services (_netspec)
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
    named, restore = volumes(spec, container)
    if named:
        options["volumes"] = named
    if restore:
        options["restore_from_snapshot_id"] = restore
    return options


def _mounts(container: Any) -> dict[str, Any]:
    mounts: dict[str, Any] = {}
    for mount in container.volume_mounts:
        if mount.volume in mounts:
            raise invalid("sandbox.spec.containers.volume_mounts", f"volume {mount.volume!r} is mounted twice; "
                          f"mount each volume once")
        mounts[mount.volume] = mount
    return mounts


def volumes(spec: Any, container: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The named volumes to mount (sandpool's ``volumes=`` entries) and the snapshot to restore (or None)."""
    mounts = _mounts(container) if container is not None else {}
    known = {volume.name for volume in spec.volumes}
    for name in mounts:
        if name not in known:
            raise invalid("sandbox.spec.containers.volume_mounts", f"volume_mount names volume {name!r}, which "
                          f"sandbox.spec.volumes does not have")
    named: list[dict[str, Any]] = []
    restores: set[str] = set()
    for volume in spec.volumes:
        mount = mounts.get(volume.name)
        if volume.volume_id:
            if mount is None:
                raise invalid("sandbox.spec.volumes", f"registered volume {volume.name!r} has no volume_mount; "
                              f"give it a mount_path")
            named.append({"name": volume.name, "volume_id": volume.volume_id, "mount_path": mount.mount_path,
                          "sub_path": mount.sub_path, "read_only": mount.read_only})
            continue
        if mount is not None and (mount.read_only or mount.sub_path):
            raise invalid("sandbox.spec.containers.volume_mounts", f"scratch volume {volume.name!r} is a directory "
                          f"of the sandbox's own filesystem here: it cannot be mounted read-only or by sub_path")
        if volume.scratch.restore_from_snapshot_id:
            restores.add(volume.scratch.restore_from_snapshot_id)
    if len(restores) > 1:
        raise invalid("sandbox.spec.volumes", f"scratch volumes restore from {len(restores)} snapshots "
                      f"({', '.join(sorted(restores))}); a local snapshot holds the whole filesystem, so give one")
    return named, (restores.pop() if restores else None)


def scratch_dirs(spec: Any) -> list[str]:
    """Where the primary container mounts scratch volumes: directories made in the sandbox's filesystem."""
    container: Any = primary(spec)
    if container is None:
        return []
    scratch = {volume.name for volume in spec.volumes if not volume.volume_id}
    return [mount.mount_path for mount in container.volume_mounts if mount.volume in scratch]


def mounted_files(spec: Message) -> list[tuple[str, bytes]]:
    """The create-time files of the primary container, as (path, content)."""
    container = primary(spec)
    return [(f.path, bytes(f.content)) for f in container.files] if container is not None else []
