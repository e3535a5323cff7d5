"""The streamed target alone (mode ar) under memory budgets, against this disk's raw reads.

For the default target's layer store in each precision, budgets run from "two layers
resident" to "fully resident". Each budget runs in its own process (`llmcad generate
--json`), inside a memory cgroup of that size where the machine allows one, with the
store's pages dropped from the page cache first. Reported per budget: resident layers,
bytes streamed per pass, seconds per pass (decode), achieved read bandwidth (bytes read /
reader time), the raw sequential read bandwidth of the same files measured just before
(page cache dropped), pure compute seconds per pass (the same tokens fully resident, one
compute thread as when streaming), the share of compute hidden under IO, and the ratio of
seconds per pass to max(pure read, pure compute). Beside them, llama.cpp's plain decoding of
the same GGUF in cgroups of --llamacpp-budgets (tokens/s).

    python bench/stream.py                       # int8, 16 new tokens per budget
    python bench/stream.py --precisions int8,q4,fp32 --tokens 8

Writes bench/results/stream.json and stream.png (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine_info, md_table, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmcad.budget import MB, parse_size  # noqa: E402
from llmcad.engine import Engine  # noqa: E402
from llmcad.hub import DEFAULT_TARGET, resolve_model  # noqa: E402
from llmcad.store import ensure_store  # noqa: E402
from llmcad.streaming import Unit, aligned_buffer, can_read_directly, open_for_reading, read_unit  # noqa: E402
from llmcad.weights import open_checkpoint  # noqa: E402
from tests.cgroup import cgroup_unavailable, run_limited  # noqa: E402

PROMPT = "def merge_sorted(a, b):"


def evict(files) -> None:
    """Drop `files` from the OS page cache."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def raw_read_gbps(files: list[Path]) -> float:
    """Sequential reads of `files`, page cache dropped first, one read per file as the engine
    does: straight from the disk (O_DIRECT) where the file system allows, else buffered."""
    buffer = aligned_buffer(max(f.stat().st_size for f in files))
    evict(files)
    total, t = 0, time.perf_counter()
    for f in files:
        unit = Unit(f, ((0, f.stat().st_size, 0),))
        fd, direct = open_for_reading(f, can_read_directly(unit, buffer))
        total += read_unit(unit, buffer, fd, drop_page_cache=True, direct=direct)
        os.close(fd)
    return total / (time.perf_counter() - t) / 1e9


def pure_compute_s_per_pass(target: Path, precision: str, tokens: int) -> tuple[float, dict]:
    """Decode compute per pass with everything resident."""
    with Engine.load(target, precision=precision, max_context=2048, progress=False) as engine:
        engine.generate(PROMPT, max_tokens=4, ignore_eos=True)  # warm up
        s = engine.generate(PROMPT, max_tokens=tokens, ignore_eos=True).stats
        return s.decode_s / (s.new_tokens - 1), engine.plan


def run_in_budget(budget: int | None, cmd: list[str]) -> tuple[dict | None, dict]:
    """Run `cmd` (with this repository importable) in a memory cgroup of `budget` bytes where
    the machine allows one (and a budget is given), else plainly. Returns its stdout parsed
    as JSON (None if it failed) and {"cgroup_peak_mb", plus "error" if it failed}."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if budget is not None and cgroup_unavailable() is None:
        result, peak = run_limited(budget, cmd, capture_output=True, text=True, env=env)
    else:
        result, peak = subprocess.run(cmd, capture_output=True, text=True, env=env), None
    facts = {"cgroup_peak_mb": peak and peak / MB}
    if result.returncode != 0:
        return None, facts | {"error": f"exit {result.returncode}: {result.stderr[-500:]}"}
    return json.loads(result.stdout), facts


def run_peer(target: Path, ids: list[int], budget: int | None, tokens: int, context: int = 2048, draft: Path | None = None) -> dict:
    """llama.cpp's decoding of the GGUF `target` (speculative with the GGUF `draft` if given) in
    a memory cgroup of `budget` (the files evicted from the page cache first): llama-server
    started by bench/llamacpp.py, which imports only the standard library (python -S), so
    the wrapper adds little memory."""
    evict([target] + ([draft] if draft else []))
    cmd = [sys.executable, "-S", str(Path(__file__).with_name("llamacpp.py")), "--model", str(target), "--ids", json.dumps(ids),
           "--tokens", str(tokens), "--context", str(context)] + (["--draft", str(draft)] if draft else [])
    out, facts = run_in_budget(budget, cmd)
    if out is None:
        return facts
    return facts | {"tokens_per_s": (out["new_tokens"] - 1) / out["decode_s"], "tokens_per_verification": 1.0, "bytes_per_verification": 0,
                    "peak_rss_mb": None, "tokens": out["tokens"], "version": out["version"]}


def run_budget(target: Path, precision: str, budget: int, tokens: int, store: Path) -> dict:
    evict(store.iterdir())
    cmd = [sys.executable, "-m", "llmcad.cli", "generate", "--target", str(target), "--precision", precision,
           "--memory-budget", str(budget), "--max-context", "2048", "--max-tokens", str(tokens), "--ignore-eos", "--json", PROMPT]
    out, facts = run_in_budget(budget, cmd)
    if out is None:
        return {"budget_mb": budget / MB} | facts
    s, plan = out["stats"], out["memory_plan"]
    decode_passes = s["new_tokens"] - 1
    return {
        "budget_mb": budget / MB,
        **facts,
        "peak_rss_mb": s["peak_rss_mb"],
        "resident_layers": len(plan["resident_layers"]),
        "head_resident": plan["head_resident"],
        "bytes_per_pass": s["bytes_read"] / s["target_passes"],
        "s_per_pass": s["decode_s"] / decode_passes,
        "tokens_per_s": s["decode_tokens_per_s"],
        "achieved_read_gbps": s["bytes_read"] / s["io_s"] / 1e9 if s["io_s"] else None,
        "io_s_per_pass": s["io_s"] / s["target_passes"],
        "io_wait_s_per_pass": s["io_wait_s"] / s["target_passes"],
        "compute_s_per_pass": s["compute_s"] / s["target_passes"],
        "tokens": out["tokens"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--precisions", default="int8")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per run (default %(default)s)")
    p.add_argument("--llamacpp-budgets", default="1000MB,2000MB,8000MB", help="llama.cpp's plain decoding at these budgets ('' skips it)")
    p.add_argument("--out", type=Path, default=RESULTS / "stream.json")
    args = p.parse_args()
    target = resolve_model(args.target)
    results = {"benchmark": "stream", "machine": machine_info(), "settings": vars(args) | {"target": str(target), "out": str(args.out)},
               "cgroup": cgroup_unavailable() or "each run in a memory cgroup of its budget",
               "peers": {"llama.cpp": "plain decoding with llama-server (bench/llamacpp.py) in a cgroup of each --llamacpp-budgets",
                         "airllm": "not installed (no model hub here to fetch its format)"},
               "runs": [], "llamacpp": []}
    ids = open_checkpoint(target).tokenizer.encode(PROMPT)
    for budget in [parse_size(b) for b in args.llamacpp_budgets.split(",") if b]:
        row = run_peer(target, ids, budget, args.tokens) | {"budget_mb": budget / MB}
        results["llamacpp"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    for precision in args.precisions.split(","):
        store = ensure_store(open_checkpoint(target), precision, progress=True)
        compute, full = pure_compute_s_per_pass(target, precision, args.tokens)
        base = full.total - full.resident_target + 2 * full.layer_bytes  # nothing resident, two buffers
        budgets = [base + 2 * full.layer_bytes, base + full.head_bytes + 8 * full.layer_bytes,
                   base + full.head_bytes + 16 * full.layer_bytes, full.total + 64 * MB]
        files = [store.layer_path(i) for i in range(store.config.num_layers)]
        for budget in budgets:
            raw = raw_read_gbps(files)
            row = run_budget(target, precision, int(budget), args.tokens, store.path)
            row.update(precision=precision, raw_read_gbps=raw, pure_compute_s_per_pass=compute)
            if "error" not in row:
                pure_read = row["bytes_per_pass"] / (raw * 1e9)
                row["pure_read_s_per_pass"] = pure_read
                row["vs_max_read_compute"] = row["s_per_pass"] / max(pure_read, compute)
                row["hidden_compute_share"] = (
                    max(0.0, min(1.0, (row["compute_s_per_pass"] + row["io_s_per_pass"] - row["s_per_pass"]) / row["compute_s_per_pass"]))
                    if row["bytes_per_pass"] else None
                )
                row["read_efficiency"] = row["achieved_read_gbps"] / raw if row["achieved_read_gbps"] else None
            results["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
            write_json(args.out, results)
    ok = [r for r in results["runs"] if "error" not in r]
    if ok:
        results["tokens_identical_across_budgets"] = all(r["tokens"] == ok[0]["tokens"] for r in ok if r["precision"] == ok[0]["precision"])
    write_json(args.out, results)
    print(md_table(
        ["precision", "budget MB", "resident layers", "MB/pass", "s/pass", "tok/s", "read GB/s", "raw GB/s", "pure compute s", "vs max(read,compute)", "hidden compute"],
        [[r["precision"], round(r["budget_mb"]), r.get("resident_layers"), r.get("bytes_per_pass", 0) / MB, r.get("s_per_pass"), r.get("tokens_per_s"),
          r.get("achieved_read_gbps"), r["raw_read_gbps"], r["pure_compute_s_per_pass"], r.get("vs_max_read_compute"), r.get("hidden_compute_share")]
         for r in results["runs"]],
    ))
    print(md_table(["llama.cpp, budget MB", "tok/s", "cgroup peak MB"],
                   [[round(r["budget_mb"]), r.get("tokens_per_s", r.get("error")), r.get("cgroup_peak_mb")] for r in results["llamacpp"]]))
    plot(results, args.out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "error" not in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for precision in sorted({r["precision"] for r in runs}):
        rs = [r for r in runs if r["precision"] == precision]
        x = [r["budget_mb"] for r in rs]
        a.plot(x, [r["s_per_pass"] for r in rs], marker="o", label=f"{precision}: s/pass")
        a.plot(x, [max(r["pure_read_s_per_pass"], r["pure_compute_s_per_pass"]) for r in rs], linestyle="--", label=f"{precision}: max(pure read, pure compute)")
        b.plot(x, [r["achieved_read_gbps"] or 0 for r in rs], marker="o", label=f"{precision}: achieved")
        b.plot(x, [r["raw_read_gbps"] for r in rs], linestyle="--", label=f"{precision}: raw sequential")
    peers = [r for r in results.get("llamacpp", []) if "error" not in r]
    if peers:
        a.plot([r["budget_mb"] for r in peers], [1 / r["tokens_per_s"] for r in peers], marker="s", linestyle=":", label="llama.cpp: s/token")
    a.set(title="seconds per target pass", xlabel="memory budget (MB)")
    b.set(title="read bandwidth (GB/s)", xlabel="memory budget (MB)")
    a.legend()
    b.legend()
    fig.suptitle(f"{Path(results['settings']['target']).name}, target alone (ar), streamed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
