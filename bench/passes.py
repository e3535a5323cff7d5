"""Whole model passes against rows: what verifying a token tree of R nodes costs.

The default pair, fully resident (gguf, 2 threads): after a code prompt, one forward pass of
a token tree of R nodes (R = 1, 2, 4, 8, 16, 32, 64; a chain of three under the root, the
rest the root's children) through the target and through the draft, as the decoder runs
them. Per model and R: ms per pass (median of the rounds, R interleaved round-robin), the
ratio to one row, and the ms of it spent in native calls (a whole Llama-family layer,
`kernels.Layer`: its products, attention, norms and rotary; and `kernels.Product`: the head,
and the products of layers computed module by module), timed in a separate round so the
timing does not slow the measured passes; the rest is PyTorch's small operations and Python. The weights (1 GB target, 0.4 GB draft) do
not fit this machine's cache: unlike bench/kernels.py, one row is partly bound by memory.

    python bench/passes.py                  # writes bench/results/passes.json and .png
    python bench/passes.py --rounds 3       # quicker
"""

from __future__ import annotations

from pathlib import Path

import argparse
import json
import statistics
import time

import torch

from common import PROMPTS, RESULTS, machine_info, md_table, write_json
from llmcad import kernels
from llmcad.engine import Engine
from llmcad.tree import TokenTree

ROWS = (1, 2, 4, 8, 16, 32, 64)


def tree_of(root: int, rows: int) -> TokenTree:
    tree = TokenTree(root, rows)
    for i in range(1, rows):
        tree.add(i - 1 if i < 4 else 0, 1000 + i, 0.5)
    return tree


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", type=Path, default=RESULTS / "passes.json")
    args = p.parse_args()
    engine = Engine.load(memory_budget=None, progress=False)
    prompt = json.loads((PROMPTS / "code.jsonl").read_text().splitlines()[0])["prompt"]
    ids = engine.chat_prompt([{"role": "user", "content": prompt}])
    engine.generate(ids, max_tokens=1, mode="ar")  # the prompt's keys and values in both caches
    engine.draft.cache.tokens = []
    engine.draft.model(torch.tensor(ids), torch.arange(len(ids)), engine.draft.cache, 0, last_only=True)
    start = len(ids)
    models = {"target": (engine.model, engine.cache), "draft": (engine.draft.model, engine.draft.cache)}

    def run(name: str, rows: int) -> float:
        model, cache = models[name]
        tree = tree_of(ids[-1], rows)
        began = time.perf_counter()
        model(tree.tokens[:rows], start + tree.depths[:rows], cache, start, tree.attention_mask(start, slice(0, rows)))
        return time.perf_counter() - began

    times = {(name, r): [] for name in models for r in ROWS}
    for _ in range(args.rounds + 1):  # round 0 warms up
        for r in ROWS:
            for name in models:
                times[name, r].append(run(name, r))
    native_s, seconds = {}, [0.0]
    plain = {cls: cls.__call__ for cls in (kernels.Product, kernels.Layer)}

    def timed(call):
        def wrapper(*a, **kw):
            began = time.perf_counter()
            try:
                return call(*a, **kw)
            finally:
                seconds[0] += time.perf_counter() - began
        return wrapper

    for cls, call in plain.items():
        cls.__call__ = timed(call)
    try:
        for name in models:
            for r in ROWS:
                seconds[0] = 0.0
                run(name, r)
                native_s[name, r] = seconds[0]
    finally:
        for cls, call in plain.items():
            cls.__call__ = call
    results = {}
    for name in models:
        ms = {r: 1e3 * statistics.median(times[name, r][1:]) for r in ROWS}
        results[name] = {"ms": ms, "x_one_row": {r: ms[r] / ms[1] for r in ROWS}, "native_ms": {r: 1e3 * native_s[name, r] for r in ROWS}}
    write_json(args.out, {"machine": machine_info(), "rows": ROWS, "rounds": args.rounds, "prompt_tokens": start,
                          "precision": engine.precision, "passes": results})
    print(md_table(["model", *[f"{r} rows ms" for r in ROWS], "16/1", "64/1", "native calls at 1 row ms"],
                   [[n, *[v["ms"][r] for r in ROWS], v["x_one_row"][16], v["x_one_row"][64], v["native_ms"][1]] for n, v in results.items()]))
    plot(results, args.out)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rec) in enumerate(results.items()):
        ax.plot(ROWS, [rec["ms"][r] for r in ROWS], marker="o", color=f"C{i}", label=f"{name}: whole pass")
        ax.plot(ROWS, [rec["native_ms"][r] for r in ROWS], linestyle="--", color=f"C{i}", label=f"{name}: in native calls")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows (token tree nodes in the pass)")
    ax.set_ylabel("ms per pass (median)")
    ax.set_title(f"resident passes of the default pair, {torch.get_num_threads()} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
