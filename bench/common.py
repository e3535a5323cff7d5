"""Small helpers shared by the benchmark scripts: the prompt set, machine info, JSON, tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch
from llmcad import kernels

BENCH = Path(__file__).resolve().parent
PROMPTS = BENCH / "prompts"
RESULTS = BENCH / "results"
KINDS = ("code", "chat", "summarization", "translation")


def load_prompts(kinds=KINDS, limit: int | None = None) -> list[dict]:
    """The prompts of `kinds` ({"id", "kind", "prompt"}), kind by kind, the first `limit` of each."""
    out = []
    for kind in kinds:
        lines = (PROMPTS / f"{kind}.jsonl").read_text(encoding="utf-8").splitlines()
        out += [json.loads(line) for line in lines if line.strip()][:limit]
    return out


def pair_parser(doc: str) -> argparse.ArgumentParser:
    """A parser for a benchmark of the model pair: --target, --draft and --kinds of prompts."""
    from llmcad.hub import DEFAULT_DRAFT, DEFAULT_TARGET

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    p.add_argument("--kinds", default="code,chat")
    return p


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines() if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), None)
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_mb": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "kernel_path": kernels.active_path(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def rss_mb() -> float | None:
    """This process's current resident set size in MiB (Linux), else None."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except (OSError, ValueError, IndexError):
        return None


def median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def write_json(path: Path, obj) -> None:
    """Write `obj` atomically (a crash mid-write leaves the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows])
