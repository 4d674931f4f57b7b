"""benchmarks/report.py end to end, with tiny sizes: the report, its charts and its raw data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(REPO, "benchmarks", "report.py")
FIGURES = {"call_latency", "throughput", "exec_latency", "start_latency", "scale", "remote", "map_curve"}
TINY = ["--quick", "--peers", "ppe,sandpool", "--reps", "1", "--conc", "1,2", "--scale-n", "2,4", "--exec-n", "30",
        "--service-n", "5", "--calls", "3000", "--window", "1000"]


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_quick_report_draws_every_figure_beside_its_peer(tmp_path):
    """A --quick run writes REPORT.md, a PNG and a JSON per figure, each figure holding sandpool's
    series and its peer's or floor's from the same run, and leaves no sandbox behind."""
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, REPORT, *TINY, "--out", str(out)], capture_output=True, text=True,
                          timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]

    record = json.loads((out / "report.json").read_text())
    assert set(record["figures"]) == FIGURES
    markdown = (out / "REPORT.md").read_text()
    for name, fig in record["figures"].items():
        assert fig["sandpool"] and fig["beside"], name
        assert fig["ratios"], name
        png = out / fig["png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({fig['png']})" in markdown, name
        assert json.loads((out / f"{name}.json").read_text())["beside"] == fig["beside"], name

    figures = record["figures"]
    assert set(figures["call_latency"]["sandpool"]) == {"sandpool (sync)"}
    assert set(figures["call_latency"]["beside"]["ProcessPoolExecutor (fork)"]) == {"p50", "p90", "p99"}
    assert set(figures["throughput"]["beside"]["ProcessPoolExecutor (fork)"]) == {"1", "2"}
    assert figures["exec_latency"]["beside"]["subprocess.run(['true'])"]["p50"] > 0
    rows = figures["scale"]["sandpool"]["rows"]
    assert [r["n"] for r in rows] == [2, 4] and all(r["leftovers"] == "" for r in rows)
    assert set(figures["scale"]["beside"]["N x python -S -c pass at once (s)"]) == {"2", "4"}
    assert figures["remote"]["beside"]["local Session"]["calls/s"] > 0
    assert "serve, same host (fast plane)" in figures["remote"]["sandpool"]
    curves = {**figures["map_curve"]["sandpool"], **figures["map_curve"]["beside"]}
    assert {c["api"] for c in curves.values()} == {"map", "imap", "imap_32", "mp_imap"}
    assert all([w["calls"] for w in c["windows"]] == [1000, 2000, 3000] for c in curves.values())


def test_bad_sizes_are_refused_naming_the_flag(tmp_path):
    """A size that is not a positive whole number stops the run before anything starts, naming the
    flag and the value."""
    done = subprocess.run([sys.executable, REPORT, "--scale-n", "10,0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--scale-n" in done.stderr and "'10,0'" in done.stderr
    assert not os.listdir(tmp_path)
