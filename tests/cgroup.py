"""Run a command inside a memory cgroup, as a device with little RAM would run it (the
approach of ../shared/tools/memlimit: page cache counts against the limit)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cgroup_unavailable() -> str | None:
    """Why a memory cgroup cannot be made here, or None."""
    if os.geteuid() != 0:
        return "memory cgroups need root"
    if _v1_base() is None and _v2_base() is None:
        return "no cgroup memory controller (v1 or v2) on this machine"
    return None


def _v1_base() -> Path | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and Path("/sys/fs/cgroup/memory").is_dir():
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    return None


def _v2_base() -> Path | None:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").is_file() and "memory" in (root / "cgroup.controllers").read_text().split():
        line = next(l for l in Path("/proc/self/cgroup").read_text().splitlines() if l.startswith("0::"))
        return root / line.split("::", 1)[1].lstrip("/")
    return None


@contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[tuple[Callable[[], None], Callable[[], int]]]:
    """A new memory cgroup of `limit_bytes`, removed on exit (its processes must have ended):
    (a preexec_fn that moves the child into it, a function giving its peak usage in bytes,
    page cache included)."""
    v1 = _v1_base()
    group = (v1 or _v2_base()) / f"llmcad-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        if v1:
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            peak_file = group / "memory.max_usage_in_bytes"
        else:
            (group / "memory.max").write_text(str(limit_bytes))
            (group / "memory.swap.max").write_text("0")
            peak_file = group / "memory.peak"
        procs = group / "cgroup.procs"
        yield (lambda: procs.write_text(str(os.getpid()))), (lambda: int(peak_file.read_text()))
    finally:
        group.rmdir()


def run_limited(limit_bytes: int, cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, int]:
    """Run `cmd` in a new memory cgroup of `limit_bytes`; returns the result and the
    cgroup's peak usage in bytes (page cache included)."""
    with memory_cgroup(limit_bytes) as (enter, peak):
        return subprocess.run(cmd, preexec_fn=enter, **kwargs), peak()


def minimum_budget(model_options: list[str]) -> int:
    """The smallest budget in bytes that `llmcad generate` accepts with `model_options`, read
    from its refusal of a tiny one (the runtime part is measured, so it varies by machine)."""
    cmd = [sys.executable, "-m", "llmcad.cli", "generate", *model_options, "--memory-budget", "50MB", "x"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, "a 50 MB budget was accepted"
    found = re.search(r"below the minimum of (\d+) MB", result.stderr)
    assert found, result.stderr
    return int(found.group(1)) << 20
