"""The whole engine under a memory limit: the default pair, greedy, modes ar / sd / tree /
llmcad side by side, each run in its own process inside a memory cgroup of the budget, the
target's store dropped from the page cache before every run.

Per run: decode tokens/s, speedup over `ar` at the same budget and prompt, tokens per
verification (accepted + the target's own), bytes streamed per verification, and
efficiency = tokens/s / (tokens per verification x raw read bandwidth / bytes per
verification), i.e. against a pipeline that only reads the streamed bytes at the disk's raw
speed (measured in the same run). `ar` is the target alone (no draft loaded, so the whole
budget is its own: more resident layers) and decodes fewer tokens (--ar-tokens): one full
pass per token, its rate does not change with length.

    python bench/e2e.py                                   # 1000 MB and 2000 MB, code + chat
    python bench/e2e.py --budgets 1300MB --kinds code --limit 2
    python bench/e2e.py --modes ar,tree,llmcad,llmcad/llmcad,llmcad/fixed,llmcad/pipeline
    python bench/e2e.py --budgets 1000MB --modes ar@q4,llmcad@q4,llama.cpp
    python bench/e2e.py --budgets 800MB,1000MB,1300MB,1600MB,2000MB,none \
        --modes llama.cpp,llama.cpp+draft,ar,default --out bench/results/sweep.json   # the budget sweep

A mode may carry a variant after "/": a fallback policy (llmcad, cost, fixed; else the
engine's default) or pipeline (drafting on during verification); and a precision after "@"
for both models (the engine's defaults when absent: the target in gguf, the draft in q4_0;
speedups are over `ar` in the target's precision). `llama.cpp` is llama.cpp's plain decoding of the target's GGUF, `llama.cpp+draft`
its own speculative decoding with the same draft GGUF (llama-server -md, found as
bench/llamacpp.py says), in the same cgroup, its server started by a standard-library-only
wrapper. Budget `none` runs without a cgroup or a memory budget (everything resident). `default` is
the engine with its own choices, as `llmcad generate --target TARGET` makes them: the
target's paired draft (none for a target that is not an alias with one), left out where the
budget holds the target alone whole but the pair only by streaming; the mode that follows.

Writes bench/results/e2e.json and e2e.png (--out); with more than two budgets the figure
adds tokens/s against the budget, one line per mode and kind.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from common import RESULTS, load_prompts, machine_info, md_table, pair_parser, write_json
from stream import evict, raw_read_gbps, run_in_budget, run_peer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmcad.budget import MB, parse_size  # noqa: E402
from llmcad.engine import DEFAULT_FALLBACK, DEFAULT_PRECISION  # noqa: E402
from llmcad.fallback import FALLBACKS  # noqa: E402
from llmcad.timeline import TIMELINE  # noqa: E402
from llmcad.hub import resolve_model  # noqa: E402
from llmcad.store import ensure_store  # noqa: E402
from llmcad.weights import open_checkpoint  # noqa: E402
from tests.cgroup import cgroup_unavailable  # noqa: E402

MODES = ("llama.cpp", "llama.cpp+draft", "ar", "sd", "tree", "llmcad", "llmcad/llmcad", "llmcad/pipeline", "default")
PEER = "llama.cpp"
PEERS = (PEER, "llama.cpp+draft")  # llama.cpp alone, and with the draft


def parse_mode(spec: str) -> tuple[str, str, str]:
    """"llmcad/cost@q4" -> ("llmcad", "cost", "q4"); the precision defaults to the engine's."""
    rest, _, precision = spec.partition("@")
    mode, _, variant = rest.partition("/")
    return mode, variant, precision or DEFAULT_PRECISION


def parse_budget(text: str) -> int | None:
    return None if text == "none" else parse_size(text)


def one_run(args: argparse.Namespace) -> None:
    """In the child process: one generation, printed as JSON (stats, per-step figures)."""
    from llmcad.engine import AUTO, Engine

    mode, variant, precision = parse_mode(args.mode)
    fallback = variant if variant in FALLBACKS else DEFAULT_FALLBACK
    draft = None if mode == "ar" else AUTO if mode == "default" else args.draft  # ar: the target alone, with the whole budget
    with Engine.load(args.target, draft=draft, memory_budget=parse_budget(args.budget), fallback=fallback, precision=precision,
                     draft_precision=precision if "@" in args.mode else AUTO, max_context=args.max_context, progress=False) as engine:
        ids = engine.chat_prompt([{"role": "user", "content": args.prompt}])
        steps, tokens, final = [], [], None
        pipeline = variant == "pipeline"
        TIMELINE.start()
        for piece in engine.stream(ids, max_tokens=args.tokens, ignore_eos=True, mode=None if mode == "default" else mode, pipeline=pipeline):
            tokens += piece.token_ids
            if piece.step is not None:
                steps.append(piece.step)
            final = piece.stats or final
        plan = engine.plan
        spans = TIMELINE.stop()
        print(json.dumps({"stats": final.to_dict(), "steps": steps, "tokens": tokens, "timeline": one_verification(spans),
                          "plan": {"resident_layers": len(plan.resident_layers), "bytes_per_pass": plan.bytes_per_pass,
                                   "max_context": engine.max_context, "mode": engine.mode, "draft_note": engine.draft_note}}))


def one_verification(spans: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The spans from the end of the middle verification's predecessor to its own end (the
    drafting of its tree, then its verification), in seconds from that start."""
    passes = sorted(end for lane, _, end in spans if lane == "target pass")
    if len(passes) < 3:
        return []
    k = len(passes) // 2
    start, end = passes[k - 1], passes[k]
    return [(lane, round(max(a, start) - start, 4), round(min(b, end) - start, 4)) for lane, a, b in spans if b > start and a < end]


def run(target: str | Path, draft: Path, store: Path, mode: str, budget: int | None, prompt: str, tokens: int, context: int | None) -> dict:
    evict(store.iterdir())
    cmd = [sys.executable, __file__, "--one", "--mode", mode, "--budget", str(budget or "none"), "--tokens", str(tokens),
           "--target", str(target), "--draft", str(draft), "--prompt", prompt] + (["--max-context", str(context)] if context else [])
    out, facts = run_in_budget(budget, cmd)
    if out is None:
        return facts
    s = out["stats"]
    return {
        "tokens_per_s": s["decode_tokens_per_s"],
        "tokens_per_verification": s.get("tokens_per_verification", 1.0),
        "accepted_per_verification": s.get("accepted_per_verification", 0.0),
        "tree_nodes": s.get("tree_nodes"),
        "extensions_kept": s.get("extensions_kept"),
        "carried_nodes": s.get("carried_nodes"),
        "verifications": s.get("verifications", s["new_tokens"]),
        "bytes_per_verification": s["bytes_read"] / max(1, s["target_passes"]),
        "io_wait_s": s["io_wait_s"],
        "peak_rss_mb": s["peak_rss_mb"],
        **facts,
        "accepted_over_time": [step["accepted"] for step in out["steps"]],
        "timeline": out["timeline"],
        "tokens": out["tokens"],
        "resident_layers": out["plan"]["resident_layers"],
        "max_context": out["plan"]["max_context"],
        "engine_mode": out["plan"]["mode"],
        "draft_note": out["plan"]["draft_note"],
    }


def add_speedups(runs: list[dict]) -> None:
    """Each run's rate over `ar` in its precision and over llama.cpp, at the same budget and prompt."""
    rate = {(r["budget_mb"], r["prompt_id"], r["mode"]): r["tokens_per_s"] for r in runs if "error" not in r}
    for r in runs:
        if "error" in r:
            continue
        ar = rate.get((r["budget_mb"], r["prompt_id"], "ar" if r["precision"] == DEFAULT_PRECISION else f"ar@{r['precision']}"))
        peer = rate.get((r["budget_mb"], r["prompt_id"], PEER))
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar if ar and r["mode"] not in PEERS else None
        r["speedup_vs_llamacpp"] = r["tokens_per_s"] / peer if peer else None


def main() -> None:
    p = pair_parser(__doc__)
    p.add_argument("--budgets", default="1000MB,2000MB")
    p.add_argument("--limit", type=int, default=1, help="prompts per kind (default %(default)s)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--ar-tokens", type=int, default=32)
    p.add_argument("--max-context", type=int, default=None, help="every run's context window (default: the prompt plus --tokens, as `llmcad generate` sizes it under a budget)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", type=Path, default=RESULTS / "e2e.json")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--budget", help=argparse.SUPPRESS)
    p.add_argument("--prompt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one_run(args)
    target, draft = resolve_model(args.target), resolve_model(args.draft)
    modes = args.modes.split(",")
    precisions = {parse_mode(m)[2] for m in modes if m not in PEERS} or {DEFAULT_PRECISION}
    stores = {p: ensure_store(open_checkpoint(target), p, progress=True) for p in sorted(precisions)}
    tokenizer = next(iter(stores.values())).tokenizer
    results = {"benchmark": "e2e", "machine": machine_info(), "settings": {k: str(v) for k, v in vars(args).items()},
               "cgroup": cgroup_unavailable() or "each run in a memory cgroup of its budget",
               "peers": {"llama.cpp": "mode llama.cpp: plain decoding with llama-server (bench/llamacpp.py), same cgroup",
                         "airllm": "not installed", "transformers assisted generation": "not run (no disk-offload setup here)"},
               "runs": []}
    for budget in [parse_budget(b) for b in args.budgets.split(",")]:
        for prompt in load_prompts(args.kinds.split(","), args.limit):
            for mode in modes:
                name, _, precision = parse_mode(mode)
                precision = None if mode in PEERS else precision
                store = stores.get(precision) or next(iter(stores.values()))
                raw = raw_read_gbps([store.layer_path(i) for i in range(store.config.num_layers)])
                n = args.ar_tokens if name in ("ar", *PEERS) else args.tokens
                ids = tokenizer.encode_chat([{"role": "user", "content": prompt["prompt"]}])
                context = args.max_context or len(ids) + args.tokens  # the job's, as `llmcad generate` sizes it
                if mode in PEERS:
                    row = run_peer(target, ids, budget, n, context, draft if mode != PEER else None)
                else:
                    row = run(args.target if name == "default" else target, draft, store.path, mode, budget, prompt["prompt"], n, context)
                row.update(budget_mb=budget / MB if budget else results["machine"]["memory_mb"], unconstrained=budget is None, kind=prompt["kind"], prompt_id=prompt["id"], mode=mode, precision=precision, raw_read_gbps=raw)
                if "error" not in row:
                    per_token_read_s = row["bytes_per_verification"] / (raw * 1e9) / row["tokens_per_verification"]
                    row["efficiency"] = row["tokens_per_s"] * per_token_read_s if row["bytes_per_verification"] else None
                results["runs"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("tokens", "accepted_over_time", "timeline")}), flush=True)
                write_json(args.out, results)
    add_speedups(results["runs"])
    ok = [r for r in results["runs"] if "error" not in r]
    groups = sorted({(r["budget_mb"], r["kind"], r["mode"]) for r in ok}, key=lambda g: (g[0], g[1], modes.index(g[2])))
    summary = []
    for budget_mb, kind, mode in groups:
        rs = [r for r in ok if (r["budget_mb"], r["kind"], r["mode"]) == (budget_mb, kind, mode)]
        med = lambda key: statistics.median(r[key] for r in rs) if all(r.get(key) is not None for r in rs) else None  # noqa: E731
        summary.append({"budget_mb": budget_mb, "kind": kind, "mode": mode, "runs": len(rs), "tokens_per_s": med("tokens_per_s"),
                        "speedup_vs_ar": med("speedup_vs_ar"), "speedup_vs_llamacpp": med("speedup_vs_llamacpp"),
                        "tokens_per_verification": med("tokens_per_verification"), "efficiency": med("efficiency"),
                        "peak_rss_mb": med("peak_rss_mb"), "cgroup_peak_mb": med("cgroup_peak_mb")})
    results["summary"] = summary
    results["refused"] = [{k: r[k] for k in ("budget_mb", "kind", "mode", "error")} for r in results["runs"] if "error" in r]
    same_as_ar = lambda r, a: (a["budget_mb"], a["prompt_id"], a["precision"], parse_mode(a["mode"])[0]) == (r["budget_mb"], r["prompt_id"], r["precision"], "ar")  # noqa: E731
    results["tokens_identical_to_ar_prefix"] = all(
        r["tokens"][: len(a["tokens"])] == a["tokens"]
        for r in ok if r["mode"] not in PEERS and parse_mode(r["mode"])[0] != "ar" for a in ok if same_as_ar(r, a)
    )
    write_json(args.out, results)
    print(md_table(["budget MB", "kind", "mode", "tok/s", "x ar", "x llama.cpp", "tokens/verification", "efficiency", "peak RSS MB", "cgroup peak MB"],
                   [[budget_label(s["budget_mb"], results), s["kind"], s["mode"], s["tokens_per_s"], s["speedup_vs_ar"], s["speedup_vs_llamacpp"],
                     s["tokens_per_verification"], s["efficiency"], s["peak_rss_mb"], s["cgroup_peak_mb"]] for s in summary]))
    plot(results, modes, args.out.with_suffix(".png"))


def budget_label(budget_mb: float, results: dict) -> str:
    return "none" if budget_mb == results["machine"]["memory_mb"] else f"{round(budget_mb)} MB"


def plot(results: dict, modes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({s["budget_mb"] for s in results["summary"]})
    sweep = len(budgets) > 2
    fig, axes = plt.subplots(1, 4 if sweep else 3, figsize=(25 if sweep else 19, 4.5))
    a, b, c = axes[:3]
    if sweep:  # tokens/s against the budget, evenly spaced, "none" last
        d = axes[3]
        for i, mode in enumerate(modes):
            for kind, style in zip(sorted({s["kind"] for s in results["summary"]}), ("-", "--", ":", "-.")):
                ys = [next((s["tokens_per_s"] for s in results["summary"] if (s["budget_mb"], s["kind"], s["mode"]) == (m, kind, mode)), None) for m in budgets]
                d.plot(range(len(budgets)), ys, style, marker="o", color=f"C{i}", label=f"{mode} ({kind})")
        d.set_xticks(range(len(budgets)), [budget_label(m, results) for m in budgets])
        d.set(title="decode tokens/s against the memory budget", xlabel="budget", ylabel="tokens/s", yscale="log")
        d.legend(fontsize=7)
    cells = sorted({(s["budget_mb"], s["kind"]) for s in results["summary"]})
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [next((s["tokens_per_s"] for s in results["summary"] if (s["budget_mb"], s["kind"], s["mode"]) == (*c, mode)), 0) for c in cells]
        a.bar([x + i * width for x in range(len(cells))], values, width, label=mode)
    a.set_xticks([x + 0.4 - width / 2 for x in range(len(cells))], [f"{budget_label(m, results)}\n{k}" for m, k in cells], fontsize=7)
    a.set(title="decode tokens/s (median)", ylabel="tokens/s")
    a.legend()
    for r in results["runs"]:
        if parse_mode(r.get("mode", ""))[:2] in (("tree", ""), ("llmcad", ""), ("default", "")) and r.get("accepted_over_time"):  # the default variants
            b.plot(r["accepted_over_time"], label=f"{r['mode']} {budget_label(r['budget_mb'], results)} {r['kind']}", alpha=0.8)
    b.set(title="accepted tokens per verification", xlabel="verification")
    b.legend(fontsize=7)
    # the pipeline's run shows drafting overlapping verification; else the default llmcad
    llmcad_runs = [r for r in results["runs"] if parse_mode(r.get("mode", ""))[0] in ("llmcad", "default") and r.get("timeline")]
    shown = next((r for r in llmcad_runs if parse_mode(r["mode"])[1] == "pipeline"), None) or next((r for r in llmcad_runs if not parse_mode(r["mode"])[1]), None)
    if shown:
        lanes = ["read", "target waits for a read", "target pass", "draft", "draft, in the background"]
        for y, lane in enumerate(lanes):
            c.broken_barh([(a0, a1 - a0) for name, a0, a1 in shown["timeline"] if name == lane], (y - 0.4, 0.8), color=f"C{y}")
        c.set_yticks(range(len(lanes)), lanes, fontsize=8)
        c.set(title=f"one step of {shown['mode']} ({budget_label(shown['budget_mb'], results)}, {shown['kind']})",
              xlabel="seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
