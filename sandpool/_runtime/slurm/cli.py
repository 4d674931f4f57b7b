"""Slurm's command line, for the Slurm runtime: what to ask (plain functions) and asking it (one boundary).

Decisions are pure: the ``sbatch`` arguments for a spec, the job comment that carries a sandbox's
key and tags, the parsing of ``squeue``, and what a Slurm job state means for a sandbox. The only
I/O is :func:`run`, where a failing Slurm command becomes a sandpool error, and only there.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import trio

from ..._config import SandboxSpec, SandboxStatus
from ..._errors import SandboxResourceExhaustedError, SandboxUnavailableError

#: The comment's prefix: it marks a job as a sandpool sandbox (``squeue`` shows it as ``%k``).
COMMENT_PREFIX = "sandpool:"
JOB_NAME = "sandpool"
#: squeue's output: one line per job, fields split by "|" (no field holds one: tags are %-quoted).
SQUEUE_FORMAT = "%i|%T|%N|%r|%j|%k|%u"
#: Slurm job states by what they mean for the sandbox in the job.
WAITING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED",
                     "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT"})
ACTIVE = frozenset({"RUNNING"})
ENDING = frozenset({"COMPLETING", "STOPPED"})
#: Ends that are the cluster's doing, not the sandbox's: infrastructure failures.
INFRASTRUCTURE = frozenset({"NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "CANCELLED", "DEADLINE", "TIMEOUT",
                            "REVOKED", "SPECIAL_EXIT", "LAUNCH_FAILED"})
#: sbatch refusals that mean "no node can ever run this", not "Slurm is unreachable".
NEVER_FITS = ("Requested node configuration is not available", "Invalid generic resource",
              "More processors requested than permitted", "Memory required by task is not available",
              "Invalid Trackable RESource", "Node count specification invalid",
              "Requested partition configuration not available")


@dataclass(frozen=True)
class Job:
    """One line of ``squeue``: a job's id, state, node(s), reason, name, comment and user."""

    job_id: str
    state: str
    nodes: str
    reason: str
    name: str = ""
    comment: str = ""
    user: str = ""

    @property
    def key(self) -> str | None:
        """The sandpool key in the comment (None for jobs that are not sandpool sandboxes)."""
        return decode_comment(self.comment).get("key")

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(decode_comment(self.comment).get("tags", ()))


# -- what to ask ---------------------------------------------------------------------------------


def encode_comment(key: str, owner: str, tags: tuple[str, ...]) -> str:
    """``sandpool:key=K;owner=O;tags=a,b`` with each tag %-quoted (so commas and bars survive)."""
    quoted = ",".join(quote(t, safe="") for t in tags)
    return f"{COMMENT_PREFIX}key={key};owner={owner};tags={quoted}"


def decode_comment(comment: str) -> dict[str, Any]:
    """The fields of a sandpool comment ({} for any other comment); ``tags`` as a list."""
    if not comment.startswith(COMMENT_PREFIX):
        return {}
    fields: dict[str, Any] = {}
    for part in comment[len(COMMENT_PREFIX):].split(";"):
        name, _, value = part.partition("=")
        fields[name] = value
    fields["tags"] = [unquote(t) for t in fields.get("tags", "").split(",") if t]
    return fields


def time_limit(seconds: float | None) -> str | None:
    """sbatch's ``--time`` (whole minutes, rounded up) for ``max_lifetime_seconds``; None for none."""
    return None if seconds is None else str(max(1, math.ceil(seconds / 60)))


def sbatch_argv(spec: SandboxSpec, *, key: str, owner: str, job_dir: str, command: list[str],
                partition: str | None = None, account: str | None = None, qos: str | None = None,
                exclude: tuple[str, ...] = (), extra: tuple[str, ...] = (), slots: int = 1) -> list[str]:
    """The ``sbatch`` command line of an allocation for ``slots`` sandboxes of ``spec`` on one node.

    Per slot: cpu request -> ``--cpus-per-task`` (rounded up), memory request -> ``--mem`` (MiB,
    rounded up), gpu count -> ``--gres=gpu[:type]:N``; ``max_lifetime_seconds`` -> ``--time``, tags
    -> job name and comment. Requests default to limits (see ResourceOptions). ``extra`` goes last,
    so a site's own options win.
    """
    res = spec.resources
    argv = ["sbatch", "--parsable", "--no-requeue", f"--job-name={job_name(spec.tags)}",
            f"--comment={encode_comment(key, owner, spec.tags)}", f"--chdir={job_dir}",
            f"--output={os.path.join(job_dir, 'job.log')}", "--ntasks=1", "--nodes=1"]
    cpus, memory, gpus = slot_size(spec)
    argv.append(f"--cpus-per-task={max(1, math.ceil(cpus * slots - 1e-9))}")
    if memory:
        argv.append(f"--mem={max(1, math.ceil(memory * slots / 2**20))}M")
    if gpus:
        kind = res.gpu.get("type") if res is not None and res.gpu else None
        argv.append(f"--gres=gpu:{kind}:{gpus * slots}" if kind else f"--gres=gpu:{gpus * slots}")
    limit = time_limit(spec.max_lifetime_seconds)
    if limit is not None:
        argv.append(f"--time={limit}")
    for flag, value in (("--partition", partition), ("--account", account), ("--qos", qos)):
        if value:
            argv.append(f"{flag}={value}")
    if exclude:
        argv.append(f"--exclude={','.join(sorted(exclude))}")
    argv += list(extra)
    argv.append("--wrap=exec " + " ".join(_shell_quote(a) for a in command))
    return argv


def slot_size(spec: SandboxSpec) -> tuple[float, int | None, int]:
    """What one sandbox of ``spec`` takes of an allocation: ``(cpus, memory bytes or None, gpus)``;
    a sandbox without a cpu request counts as one cpu, without a memory request as Slurm's default."""
    res = spec.resources
    cpus = (res.cpu_request if res is not None else None) or 1.0
    memory = (res.memory_request if res is not None else None) or None
    gpus = (res.gpu_count if res is not None else None) or 0
    return float(cpus), memory, int(gpus)


def job_name(tags: tuple[str, ...]) -> str:
    """``sandpool`` plus the tags, for people reading ``squeue`` (the comment is what sandpool reads)."""
    name = JOB_NAME + (":" + ",".join(tags) if tags else "")
    return "".join(c if c.isprintable() and c not in "|\n" else "_" for c in name)[:120]


def _shell_quote(word: str) -> str:
    return "'" + word.replace("'", "'\"'\"'") + "'"


@dataclass(frozen=True)
class Node:
    """One line of ``sinfo --Node``: a node's name, cpus, memory (MiB), gpus and state, and what
    of them its jobs hold now."""

    name: str
    cpus: int
    memory_mib: int
    gpus: int
    state: str
    cpus_used: int = 0
    memory_used_mib: int = 0
    gpus_used: int = 0


#: sinfo's fields for nodes (``--Format``, each ended by "|"): name, cpus, memory (MiB), generic
#: resources, state (long form), cpus allocated/idle/other/total, memory allocated, gres in use.
SINFO_FIELDS = ("NodeList", "CPUs", "Memory", "Gres", "StateLong", "CPUsState", "AllocMem", "GresUsed")


def sinfo_argv(partition: str | None) -> list[str]:
    """``sinfo`` describing each node of a partition (all partitions' for None), one a line."""
    return ["sinfo", "--noheader", "--Node", "--Format=" + ",".join(f"{f}:0|" for f in SINFO_FIELDS),
            *([f"--partition={partition}"] if partition else [])]


def parse_sinfo(text: str) -> list[Node]:
    """The nodes of ``sinfo_argv``'s output, each once, by name; lines that do not parse are skipped."""
    nodes: dict[str, Node] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < len(SINFO_FIELDS) or not parts[0] or not parts[1].isdigit():
            continue
        name, cpus, memory, gres, state, cpu_states, alloc_mem, gres_used = parts[:len(SINFO_FIELDS)]
        used = cpu_states.split("/")[0]
        nodes.setdefault(name, Node(name, int(cpus), _int(memory), gres_gpus(gres),
                                    state.lower().rstrip("*~#!%$@^-+"), _int(used), _int(alloc_mem),
                                    gres_gpus(gres_used)))
    return sorted(nodes.values(), key=lambda n: n.name)


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def gres_gpus(gres: str) -> int:
    """The gpu count of an sinfo gres field (``gpu:2``, ``gpu:a100:4(S:0)``, ``(null)``)."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit() and len(fields) > 1:
            total += int(fields[-1])
    return total


def squeue_argv(job_ids: list[str] | None = None) -> list[str]:
    """``squeue`` for these jobs (any state Slurm still remembers), or for this user's sandpool jobs."""
    argv = ["squeue", "--noheader", f"--format={SQUEUE_FORMAT}", "--states=all"]
    if job_ids:
        argv.append(f"--jobs={','.join(job_ids)}")
    else:
        argv.append("--me")  # sandpool's jobs are those whose comment says so (see parse_squeue)
    return argv


def parse_squeue(text: str) -> list[Job]:
    """Jobs of ``squeue --format=SQUEUE_FORMAT`` output; lines that do not parse are skipped."""
    jobs = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) == 7 and parts[0].strip():
            jobs.append(Job(*(p.strip() for p in parts)))
    return jobs


def base_state(state: str) -> str:
    """A state without Slurm's decorations (``CANCELLED by 0`` -> ``CANCELLED``)."""
    return state.split()[0].rstrip("+") if state else "UNKNOWN"


def sandbox_status(state: str, reachable: bool) -> SandboxStatus:
    """The sandbox status a job state stands for (``reachable``: its agent reported an address)."""
    state = base_state(state)
    if state in WAITING:
        return SandboxStatus.PENDING
    if state in ACTIVE:
        return SandboxStatus.RUNNING if reachable else SandboxStatus.CREATING
    if state in ENDING:
        return SandboxStatus.TERMINATING
    if state == "COMPLETED":
        return SandboxStatus.COMPLETED
    if state == "CANCELLED":
        return SandboxStatus.TERMINATED
    return SandboxStatus.FAILED


def describe(job: Job) -> str:
    """``slurm job 12 on n2: NODE_FAIL`` (with Slurm's reason when it gives one)."""
    where = f" on {job.nodes}" if job.nodes and job.nodes != "(null)" else ""
    why = f" ({job.reason})" if job.reason and job.reason not in ("None", "(null)") else ""
    return f"slurm job {job.job_id}{where}: {base_state(job.state)}{why}"


# -- asking ------------------------------------------------------------------------------------


def have_slurm() -> str | None:
    """None when Slurm's client commands are on PATH; else what is missing, as a message with the fix."""
    missing = [c for c in ("sbatch", "squeue", "scancel") if shutil.which(c) is None]
    if missing:
        return (f"Slurm's {', '.join(missing)} not found on PATH; install Slurm's client commands "
                f"(Debian: apt-get install slurm-client) and point SLURM_CONF at the cluster's slurm.conf")
    return None


async def query(argv: list[str], *, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run a Slurm command: ``(exit status, stdout, stderr)``. A command that cannot run or does not
    answer in ``timeout`` seconds is SandboxUnavailableError."""
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    except trio.TooSlowError:
        raise SandboxUnavailableError(f"{argv[0]} did not answer within {timeout:g} s; is slurmctld up?") from None
    except OSError as exc:
        raise SandboxUnavailableError(f"cannot run {argv[0]}: {exc}") from exc
    return done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")


async def run(argv: list[str], *, check: bool = True, timeout: float = 30.0) -> str:
    """Run a Slurm command; its stdout. Failures become sandpool errors here and only here:
    an sbatch refusal that no node can satisfy is SandboxResourceExhaustedError; any other failure
    (controller down, timeout, command missing) is SandboxUnavailableError with Slurm's message."""
    code, out, err = await query(argv, timeout=timeout)
    if check and code != 0:
        err = " ".join(err.split()) or f"exit status {code}"
        if argv[0] == "sbatch" and any(s in err for s in NEVER_FITS):
            raise SandboxResourceExhaustedError(
                f"Slurm cannot place this sandbox on any node: {err}; lower its resources "
                f"(cpu, memory, gpu) or choose a partition whose nodes have them", reason="Unschedulable")
        raise SandboxUnavailableError(f"{argv[0]} failed: {err}")
    return out
