"""The `llmcad` fallback's parameters, chosen by measurement.

`ConfidenceFallback` verifies once the tree's cumulative confidence falls below its
threshold; after a rejection it moves the threshold toward the confidence of the rejected
depth (`rate`, in log space), after a fully accepted path it multiplies it by `relax`.
This runs the default pair in q4 under a budget (each run in a memory cgroup of it, the
target's store dropped from the page cache first, the context sized to the job) with a
`ConfidenceFallback` for every (rate, relax) of a grid, on code and chat prompts,
interleaved, and reports per setting the median tokens/s, tokens per verification and
drafted nodes per verification. The policy reads no clock, so under greedy decoding its
trees, and so tokens per verification, do not vary from run to run; tokens/s does.

    python bench/confidence.py                                   # 1000 MB, code + chat
    python bench/confidence.py --rates 0.05,0.25 --relaxes 0.8 --repeats 3

Writes bench/results/confidence.json and confidence.png (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import RESULTS, load_prompts, machine_info, md_table, pair_parser, write_json
from stream import evict, run_in_budget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmcad.budget import MB, parse_size  # noqa: E402
from llmcad.fallback import ConfidenceFallback  # noqa: E402
from tests.cgroup import cgroup_unavailable  # noqa: E402

PRECISION = "q4"  # the only pair that fits the tight budget


def one_run(args: argparse.Namespace) -> None:
    """In the child process: one generation with the given rate and relax, printed as JSON."""
    from llmcad.engine import Engine, default_limits, open_store

    store = open_store(args.target, PRECISION, progress=False)
    ids = store.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    with Engine.load(store, draft=args.draft, memory_budget=args.budget, precision=PRECISION, draft_precision=PRECISION,
                     max_context=len(ids) + args.tokens, progress=False) as engine:
        policy = ConfidenceFallback(default_limits("llmcad", engine.tree_slots), rate=args.rate, relax=args.relax)
        result = engine.generate(ids, max_tokens=args.tokens, ignore_eos=True, mode="llmcad", fallback=policy)
    s = result.stats
    print(json.dumps({"tokens_per_s": s.decode_tokens_per_s, "tokens_per_verification": s.extra["tokens_per_verification"],
                      "tree_nodes": s.extra["tree_nodes"], "final_threshold": policy.threshold, "tokens": result.tokens}))


def main() -> None:
    p = pair_parser(__doc__)
    p.add_argument("--budget", default="1000MB")
    p.add_argument("--rates", default="0.1,0.5,1.0")
    p.add_argument("--relaxes", default="0.5,1.0")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=RESULTS / "confidence.json")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    p.add_argument("--relax", type=float, help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one_run(args)
    from llmcad.engine import open_store

    store = open_store(args.target, PRECISION, progress=True)
    budget = parse_size(args.budget)
    grid = [(float(rate), float(relax)) for rate in args.rates.split(",") for relax in args.relaxes.split(",")]
    results = {"benchmark": "confidence", "machine": machine_info(), "settings": {k: str(v) for k, v in vars(args).items()},
               "cgroup": cgroup_unavailable() or "each run in a memory cgroup of its budget", "runs": []}
    for repeat in range(args.repeats):
        for prompt in load_prompts(args.kinds.split(","), 1):
            for rate, relax in grid:
                evict(store.path.iterdir())
                cmd = [sys.executable, __file__, "--one", "--target", str(args.target), "--draft", str(args.draft), "--budget", str(budget),
                       "--tokens", str(args.tokens), "--rate", str(rate), "--relax", str(relax), "--prompt", prompt["prompt"]]
                out, facts = run_in_budget(budget, cmd)
                row = {"kind": prompt["kind"], "prompt_id": prompt["id"], "rate": rate, "relax": relax, "repeat": repeat, **facts, **(out or {})}
                results["runs"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
                write_json(args.out, results)
    ok = [r for r in results["runs"] if "tokens_per_s" in r]
    summary = []
    for kind in args.kinds.split(","):
        for rate, relax in grid:
            rs = [r for r in ok if (r["kind"], r["rate"], r["relax"]) == (kind, rate, relax)]
            if rs:
                summary.append({"kind": kind, "rate": rate, "relax": relax, "runs": len(rs),
                                **{key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "tokens_per_verification", "tree_nodes")}})
    results["summary"] = summary
    results["budget_mb"] = budget / MB
    # greedy speculation is lossless: every setting gives a prompt the same tokens
    results["tokens_identical_across_settings"] = all(len({tuple(r["tokens"]) for r in ok if r["prompt_id"] == i}) == 1 for i in {r["prompt_id"] for r in ok})
    write_json(args.out, results)
    print(md_table(["kind", "rate", "relax", "tok/s", "tokens/verification", "nodes/verification"],
                   [[s["kind"], s["rate"], s["relax"], s["tokens_per_s"], s["tokens_per_verification"], s["tree_nodes"]] for s in summary]))
    plot(summary, grid, args.out.with_suffix(".png"))


def plot(summary: list[dict], grid: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({s["kind"] for s in summary})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(grid)
    for i, (rate, relax) in enumerate(grid):
        cells = [next((s for s in summary if (s["kind"], s["rate"], s["relax"]) == (k, rate, relax)), None) for k in kinds]
        for ax, key in zip(axes, ("tokens_per_s", "tree_nodes")):
            ax.bar([x + i * width for x in range(len(kinds))], [c[key] if c else 0 for c in cells], width, label=f"rate {rate}, relax {relax}")
    for ax, title in zip(axes, ("decode tokens/s (median)", "drafted nodes per verification")):
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(kinds))], kinds)
        ax.set(title=title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
