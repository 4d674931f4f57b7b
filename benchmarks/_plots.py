"""The report's charts (matplotlib, drawn off-screen to PNG): one function per figure of report.py,
each taking that figure's record (see report.py) and the path of the PNG to write."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

SANDPOOL_COLORS = ("#1f5fbf", "#5a9be6", "#9cc3f0")
PEER_COLORS = ("#888888", "#c77c2e", "#6a9a3a", "#a0527f", "#c9b33a", "#444444")


def _colors(figure: dict) -> dict:
    """A colour per series: blues for sandpool's, other hues for the peers' or floors'."""
    out = dict(zip(figure["sandpool"], SANDPOOL_COLORS))
    out.update(zip(figure["beside"], PEER_COLORS))
    return out


def _label(ax, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def percentiles(figure: dict, path: str, title: str, unit: str) -> None:
    """Grouped bars: p50, p90, p99 of each series (sandpool's first), log scale."""
    series = {**figure["sandpool"], **figure["beside"]}
    colors = _colors(figure)
    keys = ("p50", "p90", "p99")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(keys))]
        ax.bar(xs, [values[k] for k in keys], width, label=name, color=colors[name],
               hatch="" if name in figure["sandpool"] else "//", edgecolor="white")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_yscale("log")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=2)
    _save(fig, path)


def lines_by_x(figure: dict, path: str, title: str, xlabel: str, ylabel: str, log_x: bool = True) -> None:
    """One line per series over x (the series are {x: y} mappings with x as strings or numbers)."""
    colors = _colors(figure)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, points in {**figure["sandpool"], **figure["beside"]}.items():
        xs = sorted(points, key=float)
        ax.plot([float(x) for x in xs], [points[x] for x in xs], marker="o", label=name, color=colors[name],
                linestyle="-" if name in figure["sandpool"] else "--")
    if log_x:
        ax.set_xscale("log", base=2)
    _label(ax, xlabel, ylabel, title)
    _save(fig, path)


def scale(figure: dict, path: str) -> None:
    """Left: wall time for N sandboxes up (start + one exec) beside N bare interpreters started at
    once; right: private memory per sandbox beside an idle interpreter and the peers' idle workers."""
    rows, beside = figure["sandpool"]["rows"], figure["beside"]
    ns = [r["n"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(ns, [r["up_s"] for r in rows], marker="o", color=SANDPOOL_COLORS[0],
              label="sandpool: N up (start + exec)")
    left.plot(ns, [r["exec_s"] for r in rows], marker="o", color=SANDPOOL_COLORS[1], label="sandpool: an exec in each")
    left.plot(ns, [r["down_s"] for r in rows], marker="o", color=SANDPOOL_COLORS[2], label="sandpool: all stopped")
    floor = beside["N x python -S -c pass at once (s)"]
    left.plot([int(n) for n in floor], list(floor.values()), marker="s", linestyle="--", color=PEER_COLORS[0],
              label="floor: N x python -S -c pass at once")
    _label(left, "N sandboxes", "wall time (s)", "start, exec, stop vs N")
    right.plot(ns, [r["uss_median_mib"] for r in rows], marker="o", color=SANDPOOL_COLORS[0], label="sandpool: median")
    right.plot(ns, [r["uss_max_mib"] for r in rows], marker="o", color=SANDPOOL_COLORS[1], label="sandpool: max")
    for i, (name, mib) in enumerate(beside["idle worker USS (MiB)"].items()):
        right.axhline(mib, linestyle="--", color=PEER_COLORS[i % len(PEER_COLORS)], label=name)
    right.set_ylim(bottom=0)
    _label(right, "N sandboxes", "private memory (USS) per sandbox or worker, MiB", "memory per sandbox vs N", 7)
    _save(fig, path)


def remote_vs_local(figure: dict, path: str) -> None:
    """Left: exec and call round trips (p50, p99) per client; right: throughputs per client."""
    clients = {**figure["beside"], **figure["sandpool"]}  # local first
    colors = {name: c for name, c in zip(clients, (PEER_COLORS[0],) + SANDPOOL_COLORS + (PEER_COLORS[1],))}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, keys, ylabel, title in (
            (left, ("exec p50", "exec p99", "call p50", "call p99"), "ms", "round trips"),
            (right, ("calls/s", "read_file ops/s"), "per second", "throughput")):
        present = {name: v for name, v in clients.items() if any(k in v for k in keys)}
        width = 0.8 / max(1, len(present))
        for i, (name, values) in enumerate(present.items()):
            xs = [k + (i - (len(present) - 1) / 2) * width for k in range(len(keys))]
            ax.bar(xs, [values.get(k, 0) for k in keys], width, label=name, color=colors[name])
        ax.set_xticks(range(len(keys)), keys)
        if ylabel == "ms":
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
    _save(fig, path)


def map_curve(curves: dict, path: str, labels: dict) -> None:
    """Left: calls/s per window over the calls done; right: the client's RSS growth over time.
    ``curves`` and ``labels`` by API name; the peer's is ``mp_imap``."""
    palette = {"map": SANDPOOL_COLORS[0], "imap": SANDPOOL_COLORS[1], "imap_32": SANDPOOL_COLORS[2],
               "mp_imap": PEER_COLORS[0]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for api, curve in curves.items():
        style = "--" if api == "mp_imap" else "-"
        windows = curve["windows"]
        left.plot([w["calls"] for w in windows], [w["rate"] for w in windows], marker=".", linestyle=style,
                  color=palette[api], label=labels[api])
        samples = curve["rss_samples"] or [(w["t_s"], w["rss_mb"]) for w in windows]
        right.plot([t for t, _ in samples], [mb for _, mb in samples], linestyle=style, color=palette[api],
                   label=labels[api])
    left.set_ylim(bottom=0)
    _label(left, "calls done", f"calls/s over each window of {next(iter(curves.values()))['window']:,} calls",
           "rate per window")
    _label(right, "seconds since the map began", "client RSS growth (MB)", "client memory")
    _save(fig, path)
