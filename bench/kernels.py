"""Quantized matmul kernels: ms per call against rows, per format and dispatch path, beside
PyTorch's own int4 and int8 kernels.

One 8960 x 1536 matrix (the default target's FFN gate/up shape; every format takes 1536
columns) in each GGUF block format the native kernels compute (q4_k, q6_k, q8_0, q5_0,
q4_0, random codes), for rows 1, 2, 4, 8, 16, 32, 64 and every dispatch path this CPU runs;
beside it PyTorch's `_weight_int4pack_mm_for_cpu` (llmcad's q4: bf16 activations, group
32) and `_int_mm` with per-row int8 activations (llmcad's int8) on the same shape. Calls are
interleaved round-robin (every kernel once per round) so machine noise hits all alike; the
median of the rounds is reported, with the ratio to the same kernel's one-row time. Each
native row count is checked bit-identical, row by row, with the 64-row call, and every path's
64 rows with the portable path's. The matrix (7.7 MB in q4_k) stays in this machine's cache
between calls, unlike a whole model's weights: one-row times are the kernel's compute, not
memory bandwidth (see bench/resident.py for whole passes).

    python bench/kernels.py                    # writes bench/results/kernels.json and .png
    python bench/kernels.py --rounds 5         # quicker
"""

from __future__ import annotations

from pathlib import Path

import argparse
import time

import numpy as np
import torch

from common import RESULTS, machine_info, md_table, write_json
from llmcad import kernels
from llmcad.quant import Q4_GROUP, int8_matmul, quantize_q4, quantize_rows

ROWS = (1, 2, 4, 8, 16, 32, 64)
SHAPE = (8960, 1536)


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    """Random codes; every scale a small positive fp16 (a real matrix's magnitude)."""
    block, nbytes, _ = kernels.QTYPES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    scale = lambda: (rng.random((rows, cols // block)) * 0.01 + 0.001).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    at = {"q4_k": (0, 2), "q6_k": (208,), "q8_0": (0,), "q5_0": (0,), "q4_0": (0,)}[qtype]
    for offset in at:
        raw[..., offset : offset + 2] = scale()
    return torch.from_numpy(raw.reshape(rows, -1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--out", type=Path, default=RESULTS / "kernels.json")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    out_features, in_features = SHAPE
    weight = torch.randn(SHAPE) * 0.02
    int4, int4_scales = quantize_q4(weight)
    int8, int8_scales = quantize_rows(weight)
    x = torch.randn(max(ROWS), in_features)
    calls, identical = {}, {}
    for qtype in kernels.QTYPES:
        packed = kernels.pack(random_blocks(qtype, out_features, in_features, rng), qtype, in_features)
        portable = kernels.matmul(x, packed, qtype, "portable")
        for path in kernels.supported_paths():
            name = f"{qtype}/{path}"
            full = kernels.matmul(x, packed, qtype, path)
            identical[name] = torch.equal(full, portable) and all(torch.equal(kernels.matmul(x[:r], packed, qtype, path), full[:r]) for r in ROWS)
            calls[name] = lambda r, b=packed, q=qtype, pa=path: kernels.matmul(x[:r], b, q, pa)
    calls["torch-int4pack"] = lambda r: torch.ops.aten._weight_int4pack_mm_for_cpu(x[:r].bfloat16(), int4, Q4_GROUP, int4_scales)
    calls["torch-int8"] = lambda r: int8_matmul(x[:r], int8, int8_scales)
    times = {(name, r): [] for name in calls for r in ROWS}
    for _ in range(args.rounds):
        for r in ROWS:
            for name, fn in calls.items():
                start = time.perf_counter()
                fn(r)
                times[name, r].append(time.perf_counter() - start)
    results = {
        name: {
            "ms": {r: 1e3 * float(np.median(times[name, r][1:])) for r in ROWS},  # round 0 warms up
            "bit_identical_across_rows_and_paths": identical.get(name),
        }
        for name in calls
    }
    for rec in results.values():
        rec["x_one_row"] = {r: rec["ms"][r] / rec["ms"][1] for r in ROWS}
    write_json(
        args.out,
        {"machine": machine_info(), "shape": SHAPE, "rows": ROWS, "rounds": args.rounds, "threads": torch.get_num_threads(), "kernels": results},
    )
    print(md_table(["kernel", *[f"{r} rows ms" for r in ROWS], "16/1", "64/1", "bit-identical"],
                   [[n, *[v["ms"][r] for r in ROWS], v["x_one_row"][16], v["x_one_row"][64], v["bit_identical_across_rows_and_paths"]] for n, v in results.items()]))
    plot(results, args.out)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {q: f"C{i}" for i, q in enumerate([*kernels.QTYPES, "torch-int4pack", "torch-int8"])}
    styles = {"avx512": "-", "avxvnni": (0, (5, 1, 1, 1)), "avx2": "--", "portable": ":"}
    for name, rec in results.items():
        fmt, _, path = name.partition("/")  # format and path; PyTorch's kernels have no path
        ax.plot(ROWS, [rec["ms"][r] for r in ROWS], linestyle=styles.get(path, "-."), color=colors[fmt], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows (tokens in the pass)")
    ax.set_ylabel("ms per call (median)")
    ax.set_title(f"{SHAPE[0]} x {SHAPE[1]} matmul, {torch.get_num_threads()} threads")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
