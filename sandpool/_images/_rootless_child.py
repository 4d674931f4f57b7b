"""The child of ``rootless``: enter a user namespace mapped as the template's, then unpack one
layer or remove trees, and print the answer as one JSON line. Run as ``python -I -S`` with the
request as its argument: it loads this package's ``extract`` on its own, not sandpool's (which
would import the whole client)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import types


def _images_package() -> types.ModuleType:
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_sandpool_images", os.path.join(here, "__init__.py"),
                                                  submodule_search_locations=[here])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the images package from {here}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    return importlib.import_module("_sandpool_images.extract")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def main() -> None:
    request = json.loads(sys.argv[1])
    sys.path.insert(0, request["path"])
    from _sandpool_agent.confine import userns

    userns.enter()
    extract = _images_package()
    try:
        if request["op"] == "extract":
            setattr(extract, "MAX_LAYER_BYTES", int(request["max_bytes"]))  # the client's bound
            size, diff_id = extract.extract(request["blob"], request["compression"], request["dest"], rootless=True)
            answer = {"size": size, "diff_id": diff_id}
        else:
            for path in request["paths"]:
                _remove(path)
            answer = {}
    except extract.ImageError as exc:
        answer = {"error": str(exc), "refused": isinstance(exc, extract.Refused)}
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
