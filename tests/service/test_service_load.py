"""Load through one server: client processes x sandboxes x execs streaming output, every byte
checked against a checksum computed in the sandbox, nothing left once the clients exit.

The default size (6 clients x 4 sandboxes x 20 execs) suits a shared 2-core machine; set
``SANDPOOL_LOAD=20x10x50`` (the issue's size) or any ``CxSxE`` for more. Run with ``-s`` to see
the throughput and latency figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from service_helpers import REPO, ServerProcess

from sandpool import Sandbox

SIZE = os.environ.get("SANDPOOL_LOAD", "6x4x20")
CLIENTS, SANDBOXES, EXECS = (int(x) for x in SIZE.split("x"))
OUTPUT_BYTES = 24_000  # random bytes, base64-encoded in the sandbox: ~32 KB of streamed output per exec

CLIENT = r"""
import hashlib, json, sys, time
import trio
import sandpool

address, sandboxes, execs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
command = ["sh", "-c", "head -c %d /dev/urandom | base64 > out; cat out; sha256sum < out >&2"]
latencies, streamed, mismatches = [], 0, []

async def worker(sb):
    global streamed
    for _ in range(execs):
        began = time.perf_counter()
        proc = sb.exec(command)
        digest = hashlib.sha256()
        async for chunk in proc.stdout:
            data = chunk.encode()
            digest.update(data)
            streamed += len(data)
        result = await proc
        latencies.append(time.perf_counter() - began)
        expected = result.stderr.split()[0]
        if result.returncode != 0 or digest.hexdigest() != expected or hashlib.sha256(
                result.stdout_bytes).hexdigest() != expected:
            mismatches.append((sb.sandbox_id, result.returncode, result.stderr[:200]))

async def main():
    async with sandpool.Session(address=address, defaults={"tags": ["load"]}) as session:
        async with trio.open_nursery() as nursery:
            for _ in range(sandboxes):
                nursery.start_soon(worker, session.sandbox())

trio.run(main)
print(json.dumps({"latencies": latencies, "bytes": streamed, "mismatches": mismatches}))
""" % OUTPUT_BYTES


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]


@pytest.mark.timeout(1800)
def test_many_clients_stream_checked_output_and_leave_nothing(tmp_path):
    """Every exec of every client streams exactly the bytes the sandbox hashed; the figures are
    printed; after the clients exit, the server holds no running sandbox of theirs."""
    with ServerProcess(str(tmp_path), "--max-streams", str(max(512, CLIENTS * (SANDBOXES + 2) + 64))) as srv:
        env = {**os.environ, "SANDPOOL_ADDRESS": srv.address}
        began = time.perf_counter()
        clients = [subprocess.Popen([sys.executable, "-c", CLIENT, srv.address, str(SANDBOXES), str(EXECS)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
                   for _ in range(CLIENTS)]
        reports = []
        for client in clients:
            out, err = client.communicate(timeout=1700)
            assert client.returncode == 0, err[-2000:]
            reports.append(json.loads(out.splitlines()[-1]))
        wall = time.perf_counter() - began
        latencies = [x for r in reports for x in r["latencies"]]
        assert [m for r in reports for m in r["mismatches"]] == []
        assert len(latencies) == CLIENTS * SANDBOXES * EXECS
        total_bytes = sum(r["bytes"] for r in reports)
        assert total_bytes == len(latencies) * (4 * OUTPUT_BYTES // 3 + OUTPUT_BYTES // 57 + 1)  # base64 lines
        print(f"\nload {SIZE}: {len(latencies)} execs in {wall:.1f} s (client start-up included): "
              f"{len(latencies) / wall:.0f} execs/s, {total_bytes / wall / 1e6:.1f} MB/s streamed and checked; "
              f"latency p50 {percentile(latencies, 50) * 1000:.1f} ms, p99 {percentile(latencies, 99) * 1000:.1f} ms")
        assert Sandbox.list(tags=["load"], address=srv.address).result() == []
