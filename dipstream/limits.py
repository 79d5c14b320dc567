"""Run a command inside a kernel memory limit, as a phone, a container or a small laptop enforces
one: a fresh memory cgroup (v1 or v2, where this process may create one) of a given size, swap off
for it, and a time bound, so a run that thrashes against the limit fails instead of hanging.
Used by the benchmarks and the tests of `--memory`."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


@dataclass
class LimitedRun:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int | None  # the group's peak usage (page cache included)
    limit_hits: int | None  # v1: times the limit was hit; v2: memory.events "max"
    oom_kills: int | None
    timed_out: bool


def _v2_ok() -> bool:
    try:
        return "memory" in (V2 / "cgroup.controllers").read_text().split() and \
            "memory" in (V2 / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False


def cgroup_kind() -> str | None:
    """'v1' or 'v2' where a memory cgroup can be made here, else None (see `why_not`)."""
    for kind, root in (("v1", V1), ("v2", V2)):
        if kind == "v2" and not _v2_ok():
            continue
        probe = root / f"dipstream-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
            return kind
        except OSError:
            continue
    return None


def why_not() -> str:
    return (f"no writable memory cgroup here ({V1} for v1, or {V2} with the memory controller delegated for "
            "v2); run as root or in a container that delegates cgroups")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _events(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


def run_limited(cmd: list[str], limit_bytes: int | None, timeout: float, env: dict | None = None) -> LimitedRun:
    """Run `cmd` in a fresh memory cgroup of `limit_bytes` (None: no limit, no group) for at most
    `timeout` seconds (then killed: timed_out). RuntimeError where no cgroup can be made."""
    group, kind = None, None
    if limit_bytes is not None:
        kind = cgroup_kind()
        if kind is None:
            raise RuntimeError(why_not())
        root = V1 if kind == "v1" else V2
        group = root / f"dipstream-{os.getpid()}-{time.monotonic_ns()}"
        group.mkdir()
        if kind == "v1":
            (group / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
            for name, value in (("memory.swappiness", "0"), ("memory.memsw.limit_in_bytes", str(int(limit_bytes)))):
                try:
                    (group / name).write_text(value)
                except OSError:
                    pass
        else:
            (group / "memory.max").write_text(str(int(limit_bytes)))
            try:
                (group / "memory.swap.max").write_text("0")
            except OSError:
                pass
        cmd = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    timed_out = False
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(p.pid, 9)
            out, err = p.communicate()
        peak = hits = kills = None
        if group is not None and kind == "v1":
            peak = _read_int(group / "memory.max_usage_in_bytes")
            hits = _read_int(group / "memory.failcnt")
            kills = _events(group / "memory.oom_control").get("oom_kill")
        elif group is not None:
            peak = _read_int(group / "memory.peak")
            ev = _events(group / "memory.events")
            hits, kills = ev.get("max"), ev.get("oom_kill")
        return LimitedRun(p.returncode, out, err, peak, hits, kills, timed_out)
    finally:
        if group is not None:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
