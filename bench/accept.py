"""Acceptance and speed of speculative decoding, target resident: ar, sd-k, tree-n side by side.

The default pair (Qwen2.5-Coder 0.5B drafting for 1.5B), both in memory, greedy, N new tokens
(EOS ignored) per prompt of the project's prompt set, in one Engine so every mode shares the
same loaded weights. Per prompt the configurations run back to back, so machine noise hits all
alike. Reported per configuration and prompt kind (medians over prompts): accepted drafted
tokens per verification, tokens per verification (accepted + the target's own), decode
tokens/s, and the ratio to `ar` from the same run. Every speculative output is checked
against `ar`'s tokens (greedy is lossless) and mismatches are counted in the JSON.

    python bench/accept.py                                  # all prompts, 128 tokens
    python bench/accept.py --limit 2 --max-tokens 64        # a quicker look

Writes bench/results/accept.json and accept.png (--out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common import KINDS, RESULTS, load_prompts, machine_info, md_table, median, write_json
from llmcad.engine import Engine
from llmcad.hub import DEFAULT_DRAFT, DEFAULT_TARGET
from llmcad.fallback import TreeLimits

DEFAULT_CONFIGS = "ar,sd-2,sd-4,sd-8,tree-8,tree-16,tree-32,tree-48"


def tree_limits(nodes: int) -> TreeLimits:
    """Tree limits scaled with the node budget: depth and batch grow with it."""
    return TreeLimits(max_nodes=nodes, max_depth=max(4, min(12, nodes // 2)), width=4, branch_threshold=0.1, batch=max(2, nodes // 4))


def parse_config(name: str) -> tuple[str, TreeLimits | None]:
    mode, _, size = name.partition("-")
    if mode == "ar":
        return "ar", None
    if mode == "sd":
        return "sd", TreeLimits.linear(int(size))
    if mode == "tree":
        return "tree", tree_limits(int(size))
    raise SystemExit(f"unknown configuration {name!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    p.add_argument("--precision", default="int8")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--limit", type=int, default=None, help="first K prompts of each kind")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated: ar, sd-K, tree-N")
    p.add_argument("--branch-threshold", type=float, default=None, help="override the trees' branch threshold")
    p.add_argument("--out", type=Path, default=RESULTS / "accept.json")
    args = p.parse_args()

    configs = {name: parse_config(name) for name in args.configs.split(",")}
    if args.branch_threshold is not None:
        configs = {
            n: (m, TreeLimits(l.max_nodes, l.max_depth, l.width, args.branch_threshold, l.batch) if m == "tree" else l)
            for n, (m, l) in configs.items()
        }
    engine = Engine.load(args.target, draft=args.draft, precision=args.precision, progress=sys.stderr.isatty())
    prompts = load_prompts(args.kinds.split(","), args.limit)
    engine.generate(engine.chat_prompt([{"role": "user", "content": "hi"}]), max_tokens=8, mode="tree")  # warm-up

    runs, started = [], time.time()
    for prompt in tqdm(prompts, desc="prompts", file=sys.stderr):
        ids = engine.chat_prompt([{"role": "user", "content": prompt["prompt"]}])
        reference = None
        for name, (mode, limits) in configs.items():
            result = engine.generate(ids, max_tokens=args.max_tokens, ignore_eos=True, mode=mode, limits=limits)
            if name == "ar":
                reference = result.tokens
            s = result.stats
            runs.append(
                {
                    "prompt": prompt["id"],
                    "kind": prompt["kind"],
                    "config": name,
                    "decode_tokens_per_s": s.decode_tokens_per_s,
                    "prefill_s": s.prefill_s,
                    "accepted_per_verification": s.extra.get("accepted_per_verification"),
                    "tokens_per_verification": s.extra.get("tokens_per_verification"),
                    "tree_nodes": s.extra.get("tree_nodes"),
                    "draft_passes": s.extra.get("draft_passes"),
                    "verifications": s.extra.get("verifications"),
                    "same_as_ar": None if reference is None else result.tokens == reference,
                }
            )
        write_json(args.out, report(args, configs, runs, started, complete=False))
    out = report(args, configs, runs, started, complete=True)
    write_json(args.out, out)
    plot(out, args.out.with_suffix(".png"))
    print(tables(out))


def report(args, configs, runs, started, complete: bool) -> dict:
    summary = {}
    ar = {r["prompt"]: r["decode_tokens_per_s"] for r in runs if r["config"] == "ar"}
    for name in configs:
        for kind in ("all", *KINDS):
            rows = [r for r in runs if r["config"] == name and kind in ("all", r["kind"])]
            if not rows:
                continue
            speedups = [r["decode_tokens_per_s"] / ar[r["prompt"]] for r in rows if ar.get(r["prompt"])]
            summary.setdefault(name, {})[kind] = {
                "prompts": len(rows),
                "accepted_per_verification": median(r["accepted_per_verification"] for r in rows),
                "tokens_per_verification": median(r["tokens_per_verification"] for r in rows),
                "decode_tokens_per_s": median(r["decode_tokens_per_s"] for r in rows),
                "speedup_vs_ar": median(speedups),
                "tree_nodes": median(r["tree_nodes"] for r in rows),
                "mismatches_vs_ar": sum(r["same_as_ar"] is False for r in rows),
            }
    return {
        "benchmark": "accept",
        "complete": complete,
        "machine": machine_info(),
        "settings": {
            "target": args.target,
            "draft": args.draft,
            "precision": args.precision,
            "max_tokens": args.max_tokens,
            "greedy": True,
            "ignore_eos": True,
            "configs": {n: (m, None if l is None else vars(l)) for n, (m, l) in configs.items()},
        },
        "elapsed_s": time.time() - started,
        "summary": summary,
        "runs": runs,
    }


def tables(out: dict) -> str:
    s = out["summary"]
    kinds = [k for k in ("all", *KINDS) if any(k in v for v in s.values())]
    accept = md_table(["config", *kinds], [[n, *(s[n].get(k, {}).get("accepted_per_verification") for k in kinds)] for n in s])
    speed = md_table(
        ["config", "decode tok/s (all)", "speedup vs ar (all)", *[f"speedup {k}" for k in kinds[1:]], "mismatches"],
        [[n, s[n]["all"]["decode_tokens_per_s"], s[n]["all"]["speedup_vs_ar"], *(s[n].get(k, {}).get("speedup_vs_ar") for k in kinds[1:]), s[n]["all"]["mismatches_vs_ar"]] for n in s],
    )
    return f"accepted drafted tokens per verification (median):\n{accept}\n\ndecode speed:\n{speed}"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = out["summary"]
    names = list(s)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind in [k for k in KINDS if any(k in v for v in s.values())]:
        a.plot(names, [s[n].get(kind, {}).get("accepted_per_verification") or 0 for n in names], marker="o", label=kind)
    a.set_title("accepted drafted tokens per verification")
    a.legend()
    b.bar(names, [s[n]["all"]["decode_tokens_per_s"] for n in names])
    b.set_title("decode tokens/s (median, all prompts)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{Path(out['settings']['target']).name} / draft {Path(out['settings']['draft']).name}, {out['settings']['precision']}, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
