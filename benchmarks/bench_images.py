"""Registry images: a pull beside ``skopeo copy`` + ``umoci unpack`` of the same image, and a start
from a cached image beside a host-image start, each in the same run.

    python benchmarks/bench_images.py [--runs 3] [--starts 20] [--json PATH]     (as root)

Starts Debian's ``docker-registry`` on 127.0.0.1 (a free port), builds a ~125 MB image of six layers
from host directories (a busybox root, /usr/lib/python3.11, perl, i18n, zoneinfo) and pushes it.
Then, ``--runs`` times:

- pull: ``sandpool._images.pull.pull`` into an empty store (manifest, config, layers fetched three
  at a time, digests checked, unpacked safely, recorded); floor: ``skopeo copy docker://... oci:DIR``
  then ``umoci unpack --image DIR BUNDLE`` (the field's tools; umoci also handles whiteouts).
- start: ``--starts`` namespaces sandboxes of the cached image and of the host image, in turn, each
  from ``start()`` to its first ``exec(["true"])``; p50 of each.
- disk (``--many`` sandboxes, 50 by default, of the one pulled image, all running at once, each
  having written 1 MiB): what they cost on disk and in memory, ``du`` of the layer store plus the
  runtime's state directory (the sandboxes' directories) plus what each one's writable storage
  holds (its tmpfs, from ``df`` inside), beside ``--many`` times the image's ``du`` (a copy per
  sandbox) and one image plus the writes (the floor); and the time from starting all of them to a
  first exec in each, beside one sandbox's.

``--only disk`` runs that phase alone (it needs neither skopeo nor umoci).

Prints the ratios (median over runs); JSON goes to ``benchmarks/results/bench_images.json``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from _measure import percentile  # noqa: E402
from images_helpers import Pusher, Registry, busybox_layer, config_blob, digest  # noqa: E402
from sandpool import Session  # noqa: E402
from sandpool._images import pull  # noqa: E402
from sandpool._images.store import Store  # noqa: E402

SOURCES = ["/usr/lib/python3.11", "/usr/share/perl", "/usr/lib/x86_64-linux-gnu/perl", "/usr/share/i18n",
           "/usr/share/zoneinfo"]


def dir_layer(path: str) -> bytes:
    """A gzip layer (level 6, as docker writes) of the host directory ``path``, at the same path."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(path, arcname=path.lstrip("/"))
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(raw.getvalue()) + compressor.flush()


def build(pusher: Pusher) -> tuple[int, int]:
    layers = [busybox_layer()] + [dir_layer(p) for p in SOURCES if os.path.isdir(p)]
    diff_ids = [digest(gzip.decompress(layer)) for layer in layers]
    pusher.image("bench/big", "1", layers, config_blob(["PATH=/bin:/usr/bin"], diff_ids=diff_ids))
    return len(layers), sum(len(layer) for layer in layers)


def ours(work: str) -> float:
    store = tempfile.mkdtemp(dir=work)
    began = time.perf_counter()
    pull.pull("bench.local/bench/big:1", store)
    elapsed = time.perf_counter() - began
    shutil.rmtree(store)
    return elapsed


def floor(work: str, registry: Registry) -> tuple[float, float]:
    layout, bundle = tempfile.mkdtemp(dir=work), tempfile.mkdtemp(dir=work)
    os.rmdir(bundle)
    began = time.perf_counter()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{registry.host}/bench/big:1",
                    f"oci:{layout}:1"], check=True)
    copied = time.perf_counter()
    subprocess.run(["umoci", "--log", "error", "unpack", "--image", f"{layout}:1", bundle], check=True,
                   stdout=subprocess.DEVNULL)
    unpacked = time.perf_counter()
    shutil.rmtree(layout)
    shutil.rmtree(bundle)
    return copied - began, unpacked - copied


def starts(n: int) -> dict:
    """p50 seconds of start-to-first-exec for the cached image and the host image, taken in turn."""
    samples: dict[str, list[float]] = {"image": [], "host": []}
    with Session(defaults={"isolation": "namespaces"}) as session:
        for i in range(n + 2):
            for kind, image in (("image", "bench.local/bench/big:1"), ("host", "host")):
                sandbox = session.sandbox(container_image=image)
                began = time.perf_counter()
                sandbox.start().result()
                sandbox.exec(["true"]).result()
                if i >= 2:  # two warm-up rounds
                    samples[kind].append(time.perf_counter() - began)
                sandbox.stop(graceful_shutdown_seconds=0).result()
    return {kind: percentile(values, 50) for kind, values in samples.items()}


WRITE_BYTES = 1 << 20


def du(*paths: str) -> int:
    """Bytes of disk ``paths`` use together (``du -s -B1``, hard links counted once)."""
    done = subprocess.run(["du", "-s", "-c", "-B1", *paths], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1].split()[0])


def disk(many: int, state_dir: str) -> dict:
    """``many`` sandboxes of the cached image at once, each writing WRITE_BYTES: disk and storage
    used, beside ``many`` copies of the image; wall time to all-started-and-exec'd, beside one
    (the median of five, after a warm-up)."""
    store = os.environ["SANDPOOL_IMAGE_DIR"]
    record = pull.find("bench.local/bench/big:1", store)
    image = du(*(Store(store).layer_dir(d) for d in record.layers))
    write = ["sh", "-c", f"head -c {WRITE_BYTES} /dev/urandom > /tmp/written && df -k /tmp | tail -1"]
    with Session(defaults={"isolation": "namespaces", "container_image": "bench.local/bench/big:1"}) as session:
        singles = []
        for i in range(6):  # the first one starts the template too: a warm-up
            began = time.perf_counter()
            one = session.sandbox()
            one.start().result()
            one.exec(["true"]).result()
            singles.append(time.perf_counter() - began)
            one.stop(graceful_shutdown_seconds=0).result()
        single = statistics.median(singles[1:])
        sandboxes = [session.sandbox() for _ in range(many)]
        began = time.perf_counter()
        for ref in [sb.start() for sb in sandboxes]:
            ref.result()
        for ref in [sb.exec(["true"]) for sb in sandboxes]:
            ref.result()
        together = time.perf_counter() - began
        used = 0
        for ref in [sb.exec(write) for sb in sandboxes]:
            result = ref.result()
            used += int(result.stdout.split()[2]) * 1024  # df's "Used" column, KiB
        on_disk = du(store, state_dir)
        for ref in [sb.stop(graceful_shutdown_seconds=0) for sb in sandboxes]:
            ref.result()
    total = on_disk + used
    return {"many": many, "image_du": image, "store_and_state_du": on_disk, "sandbox_storage_used": used,
            "total": total, "copies": many * image, "floor": image + many * WRITE_BYTES,
            "start_one_s": single, "start_many_s": together}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--many", type=int, default=50)
    parser.add_argument("--only", choices=("disk",), default=None)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_images.json"))
    args = parser.parse_args()
    for tool in ("docker-registry",) + (() if args.only else ("skopeo", "umoci")):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install docker-registry skopeo umoci)", file=sys.stderr)
            return 2
    work = tempfile.mkdtemp(prefix="sandpool-bench-images-")
    registry = Registry(work, os.path.join(work, "storage"))
    try:
        count, size = build(Pusher(registry.host))
        os.environ["SANDPOOL_REGISTRY_MIRRORS"] = f"bench.local={registry.url}"
        os.environ["SANDPOOL_IMAGE_DIR"] = os.path.join(work, "images")
        os.environ["SANDPOOL_STATE_DIR"] = state_dir = os.path.join(work, "state")
        print(f"image: {count} layers, {size / 2**20:.1f} MiB compressed")
        runs = []
        if args.only == "disk":
            pull.pull("bench.local/bench/big:1", os.environ["SANDPOOL_IMAGE_DIR"], refresh=False)
            for run in range(args.runs):
                d = disk(args.many, state_dir)
                runs.append(d)
                print(f"run {run + 1}: {d['many']} sandboxes: {d['total'] / 2**20:.1f} MiB in all (store and state "
                      f"dirs {d['store_and_state_du'] / 2**20:.1f} MiB on disk, their storage "
                      f"{d['sandbox_storage_used'] / 2**20:.1f} MiB in memory) vs {d['copies'] / 2**20:.0f} MiB for "
                      f"a copy each ({d['total'] / d['copies']:.3f}x) and a floor of {d['floor'] / 2**20:.1f} MiB "
                      f"({d['total'] / d['floor']:.2f}x); start of {d['many']} at once {d['start_many_s']:.2f} s vs "
                      f"one {d['start_one_s'] * 1000:.1f} ms ({d['start_many_s'] / d['start_one_s']:.1f}x, "
                      f"{d['start_many_s'] / (d['many'] * d['start_one_s']):.2f}x {d['many']} in a row)")
            _report(args, {"layers": count, "compressed_bytes": size, "disk_runs": runs,
                           "disk_vs_copies": statistics.median(r["total"] / r["copies"] for r in runs),
                           "disk_vs_floor": statistics.median(r["total"] / r["floor"] for r in runs),
                           "start_many_vs_one": statistics.median(r["start_many_s"] / r["start_one_s"] for r in runs),
                           "start_many_vs_one_in_a_row": statistics.median(
                               r["start_many_s"] / (r["many"] * r["start_one_s"]) for r in runs)})
            return 0
        for run in range(args.runs):
            mine = ours(work)
            copy_s, unpack_s = floor(work, registry)
            pull.pull("bench.local/bench/big:1", os.environ["SANDPOOL_IMAGE_DIR"], refresh=False)
            start = starts(args.starts)
            runs.append({"pull_s": mine, "skopeo_copy_s": copy_s, "umoci_unpack_s": unpack_s,
                         "start_image_s": start["image"], "start_host_s": start["host"]})
            r = runs[-1]
            print(f"run {run + 1}: pull {mine:.2f} s vs skopeo+umoci {copy_s:.2f}+{unpack_s:.2f} s "
                  f"({mine / (copy_s + unpack_s):.2f}x); start p50 image {r['start_image_s'] * 1000:.1f} ms vs host "
                  f"{r['start_host_s'] * 1000:.1f} ms ({r['start_image_s'] / r['start_host_s']:.2f}x)")
        pull_ratio = statistics.median(r["pull_s"] / (r["skopeo_copy_s"] + r["umoci_unpack_s"]) for r in runs)
        start_ratio = statistics.median(r["start_image_s"] / r["start_host_s"] for r in runs)
        print(f"median ratio, pull / (skopeo copy + umoci unpack): {pull_ratio:.2f}x (target <= 1.5x)")
        print(f"median ratio, cached-image start / host-image start: {start_ratio:.2f}x (target <= 1.2x)")
        _report(args, {"layers": count, "compressed_bytes": size, "runs": runs, "pull_ratio": pull_ratio,
                       "start_ratio": start_ratio})
    finally:
        registry.stop()
        images = os.path.join(work, "images")
        if os.path.isdir(images):  # (a rootless store's files of subordinate ids: removed through the store)
            Store(images).remove_trees([Store(images).base])
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _report(args, record: dict) -> None:
    for key in ("disk_vs_copies", "disk_vs_floor", "start_many_vs_one", "start_many_vs_one_in_a_row"):
        if key in record:
            print(f"median {key.replace('_', ' ')}: {record[key]:.3f}x")
    if args.json == "-":
        print(json.dumps(record, indent=2))
        return
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
