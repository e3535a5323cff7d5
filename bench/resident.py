"""Resident decoding: the whole target in memory, one forward per new token, engines side by side.

Greedy generation of exactly N new tokens (EOS ignored) for every prompt of the project's
prompt set (bench/prompts/*.jsonl, one user message in the model's chat template), by:

  llmcad-gguf, llmcad-q4,   llmcad.Engine.load(target, precision=...), Engine.generate
  llmcad-int8, llmcad-fp32
  transformers-fp32         AutoModelForCausalLM on the same GGUF (dequantized to fp32), generate()
  llama.cpp                 llama-server (per prompt, same token ids) or llama-bench (one synthetic
                            run), when found in $LLAMACPP_BIN (file or folder), PATH, or the folder
                            shared/tools/build-llamacpp installs to; else recorded as unavailable

Each engine is loaded once and warmed up (8 tokens), then engines are interleaved per prompt
(gguf, q4, int8, fp32, transformers, llama.cpp) so machine noise hits them alike. Per run: prompt tokens,
prefill s (prompt in -> first new token out), decode s (first -> last new token: N-1 forwards)
and decode tok/s = (N-1) / decode s, timed the same way for every engine. Summary: medians per
engine and per kind, and each engine's median decode tok/s over transformers' (same run).

Each quantized precision (gguf, q4, int8) against fp32, per prompt: greedy agreement
teacher-forced on fp32's continuation (one forward over prompt + fp32's N tokens, argmax at
each position vs fp32's token), the identical prefix of the free-running outputs, and the
mean log-likelihood per token of fp32's continuation under fp32 and under the precision
(teacher-forced). "Self-agreement" (the one-forward argmax vs the engine's own free-running
tokens) checks that one batched forward computes what step-by-step decoding does (1: it
does, as speculation needs).

Memory: with every engine, two fp32 copies of the 1.5B target plus int8 peak near 20 GB
(transformers is loaded first, while its GGUF conversion needs a second copy); --no-hf halves it.

    python bench/resident.py                                   # full: 48 prompts x 128 tokens
    python bench/resident.py --limit 1 --max-tokens 8 --kinds code,chat   # smoke test

Writes bench/results/resident.json (--out) and a .png beside it; prints a markdown summary.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common import KINDS, RESULTS, load_prompts, machine_info, md_table, median, rss_mb, write_json
from llamacpp import LlamaServer, find_llamacpp, llama_bench
from llmcad.engine import Engine
from llmcad.generate import peak_rss_mb
from llmcad.hub import DEFAULT_TARGET, resolve_model
from llmcad.weights import open_checkpoint

ENGINES = ("llmcad-gguf", "llmcad-q4", "llmcad-int8", "llmcad-fp32", "transformers-fp32", "llama.cpp")
QUANTIZED = ("gguf", "q4", "int8")  # compared with fp32
BASELINE = "transformers-fp32"
WARMUP_TOKENS = 8


# ---- engines: run(ids, n) -> {"prefill_s", "decode_s", "tokens"} ------------------------------


class Llmcad:
    def __init__(self, path: Path, precision: str):
        self.engine = Engine.load(path, precision=precision, progress=False)
        self.method = "Engine.generate(ids, temperature=0, ignore_eos=True); timings from GenerationStats"

    def run(self, ids: list[int], n: int) -> dict:
        g = self.engine.generate(ids, max_tokens=n, temperature=0.0, ignore_eos=True)
        return {"prefill_s": g.stats.prefill_s, "decode_s": g.stats.decode_s, "tokens": g.tokens}

    def teacher_forced(self, ids: list[int], continuation: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(argmax, log-prob of `continuation`) at each continuation position, in one forward."""
        seq = ids + continuation
        logits = self.engine.model(torch.tensor(seq), torch.arange(len(seq)), self.engine.cache, 0)[len(ids) - 1 : -1]
        logp = logits.log_softmax(-1).gather(1, torch.tensor(continuation)[:, None])[:, 0]
        return logits.argmax(-1), logp


class Transformers:
    def __init__(self, path: Path):
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.pad = eos[0] if isinstance(eos, list) else eos
        self.version = transformers.__version__
        self.method = (
            "generate(max_new_tokens=N, min_new_tokens=N, do_sample=False) with a streamer that timestamps each put(): "
            "prefill = first new token - call start, decode = last - first new token (N-1 forwards); "
            "min_new_tokens masks EOS rather than ignoring it, so outputs may differ after an EOS"
        )

    def run(self, ids: list[int], n: int) -> dict:
        clock = Clock()
        start = time.perf_counter()
        out = self.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
            min_new_tokens=n, do_sample=False, streamer=clock, pad_token_id=self.pad,
        )  # fmt: skip
        t = clock.times
        return {"prefill_s": t[1] - start, "decode_s": t[-1] - t[1], "tokens": out[0, len(ids) :].tolist()}


class Clock:
    """A generate() streamer that only timestamps: put() gets the prompt, then each new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


# ---- the benchmark ----------------------------------------------------------------------------


def chat_prompts(prompts: list[dict], engines: dict, path: Path) -> dict[str, list[int]]:
    """Each prompt's ids in the chat template: Engine.chat_prompt, or the same from the bare tokenizer."""
    engine = next((e.engine for e in engines.values() if isinstance(e, Llmcad)), None)
    tok = engine.tokenizer if engine else open_checkpoint(path).tokenizer
    chat = engine.chat_prompt if engine else tok.encode_chat
    return {q["id"]: chat([{"role": "user", "content": q["prompt"]}]) for q in prompts}


def same_prefix(a: list[int] | None, b: list[int] | None) -> int | None:
    if a is None or b is None:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def quality(precision: str, quantized: Llmcad, fp32: Llmcad, ids: list[int], runs: dict) -> dict:
    cont = runs["llmcad-fp32"]["tokens"]
    argmax, logp = quantized.teacher_forced(ids, cont)
    a32, lp32 = fp32.teacher_forced(ids, cont)
    own = runs[f"llmcad-{precision}"]["tokens"]
    own_argmax, _ = quantized.teacher_forced(ids, own)
    return {
        "precision": precision,
        "greedy_agreement": (argmax == torch.tensor(cont)).float().mean().item(),
        # one batched forward vs the step-by-step decode that produced the tokens; 1 = same numerics
        "fp32_self_agreement": (a32 == torch.tensor(cont)).float().mean().item(),
        "self_agreement": (own_argmax == torch.tensor(own)).float().mean().item(),
        "identical_prefix": same_prefix(own, cont),
        "loglik_fp32": lp32.mean().item(),
        "loglik": logp.mean().item(),
    }


def summarize(runs: list[dict], quality_rows: list[dict], extra: dict) -> dict:
    def stats(rs: list[dict]) -> dict:
        return {
            "runs": len(rs),
            "median_prompt_tokens": median(r["prompt_tokens"] for r in rs),
            "median_prefill_s": median(r["prefill_s"] for r in rs),
            "median_prefill_tokens_per_s": median(r["prefill_tokens_per_s"] for r in rs),
            "median_decode_s": median(r["decode_s"] for r in rs),
            "median_decode_tokens_per_s": median(r["decode_tokens_per_s"] for r in rs),
        }

    def with_ratio(table: dict) -> dict:
        base = table.get(BASELINE, {}).get("median_decode_tokens_per_s")
        for s in table.values():
            tps = s.get("median_decode_tokens_per_s")
            s["decode_vs_transformers"] = tps / base if base and tps else None
        return table

    engines = list(dict.fromkeys(r["engine"] for r in runs))
    kinds = list(dict.fromkeys(r["kind"] for r in runs))
    overall = {e: stats([r for r in runs if r["engine"] == e]) for e in engines}
    overall.update(extra)
    by_kind = {k: with_ratio({e: stats([r for r in runs if r["engine"] == e and r["kind"] == k]) for e in engines}) for k in kinds}

    def q(rows: list[dict]) -> dict:
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        return {
            "prompts": len(rows), "mean_greedy_agreement": mean("greedy_agreement"),
            "median_greedy_agreement": median(r["greedy_agreement"] for r in rows),
            "mean_fp32_self_agreement": mean("fp32_self_agreement"), "mean_self_agreement": mean("self_agreement"),
            "median_identical_prefix": median(r["identical_prefix"] for r in rows),
            "mean_loglik_fp32": mean("loglik_fp32"), "mean_loglik": mean("loglik"),
        }  # fmt: skip

    qual = {}
    for precision in dict.fromkeys(r["precision"] for r in quality_rows):
        rows = [r for r in quality_rows if r["precision"] == precision]
        qual[precision] = {"all": q(rows)} | {k: q([r for r in rows if r["kind"] == k]) for k in kinds if any(r["kind"] == k for r in rows)}
    return {"engines": with_ratio(overall), "by_kind": by_kind, "quality_vs_fp32": qual}


def markdown(summary: dict) -> str:
    eng = summary["engines"]
    out = [md_table(
        ["engine", "runs", "prompt tok", "prefill s", "decode tok/s", "vs transformers"],
        [[e, s["runs"], s["median_prompt_tokens"], s["median_prefill_s"], s["median_decode_tokens_per_s"], s["decode_vs_transformers"]]
         for e, s in eng.items()],
    )]  # fmt: skip
    names = [e for e in eng if e in next(iter(summary["by_kind"].values()), {})]
    rows = [[k] + [t[e]["median_decode_tokens_per_s"] for e in names] for k, t in summary["by_kind"].items()]
    out.append(md_table(["median decode tok/s"] + names, rows))
    keys = ["median_greedy_agreement", "median_identical_prefix", "mean_loglik_fp32", "mean_loglik",
            "mean_fp32_self_agreement", "mean_self_agreement"]  # fmt: skip
    for precision, q in summary["quality_vs_fp32"].items():
        out.append(md_table([f"{precision} vs fp32", "greedy agreement", "identical prefix", "loglik fp32", f"loglik {precision}",
                             "fp32 self-agr.", f"{precision} self-agr."],
                            [[k] + [v[x] for x in keys] for k, v in q.items()]))  # fmt: skip
    return "\n\n".join(out)


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng = {e: s for e, s in summary["engines"].items() if s.get("median_decode_tokens_per_s")}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    bars = ax1.bar(list(eng), [s["median_decode_tokens_per_s"] for s in eng.values()], color=[f"C{i}" for i in range(len(eng))])
    labels = [f"{s['median_decode_tokens_per_s']:.2f}" + (f"\n{s['decode_vs_transformers']:.2f}x" if s.get("decode_vs_transformers") else "") for s in eng.values()]
    ax1.bar_label(bars, labels, fontsize=8)
    ax1.margins(y=0.15)
    ax1.set_ylabel("median decode tokens/s")
    ax1.set_title("all prompts")
    ax1.tick_params(axis="x", labelrotation=20, labelsize=8)
    kinds = list(summary["by_kind"])
    names = [e for e in eng if e in summary["by_kind"][kinds[0]]]
    width = 0.8 / max(len(names), 1)
    for i, e in enumerate(names):
        xs = [k + i * width for k in range(len(kinds))]
        ax2.bar(xs, [summary["by_kind"][k][e]["median_decode_tokens_per_s"] or 0 for k in kinds], width, label=e, color=f"C{list(eng).index(e)}")
    ax2.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(kinds))], kinds)
    ax2.set_title("per kind")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default=DEFAULT_TARGET, help="GGUF file or alias (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per run (default %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="first K prompts of each kind")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated (default %(default)s)")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of %(default)s")
    p.add_argument("--no-hf", action="store_true", help=f"skip {BASELINE}")
    p.add_argument("--threads", type=int, default=None, help="torch (and llama.cpp) threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS / "resident.json")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    threads, n = torch.get_num_threads(), args.max_tokens
    names = [e for e in args.engines.split(",") if e and not (args.no_hf and e == BASELINE)]
    if unknown := set(names) - set(ENGINES):
        p.error(f"unknown engines {sorted(unknown)} (choose from {', '.join(ENGINES)})")
    names = [e for e in ENGINES if e in names]  # the fixed interleaving order
    prompts = load_prompts(args.kinds.split(","), args.limit)
    path = resolve_model(args.target)

    result = {
        "benchmark": "resident",
        "machine": machine_info(),
        "settings": {
            "target": args.target, "target_path": str(path), "max_new_tokens": n, "decoding": "greedy",
            "ignore_eos": True, "exactly_n_tokens": "every run generates exactly max_new_tokens tokens: EOS is ignored",
            "kinds": args.kinds.split(","), "limit_per_kind": args.limit, "prompts": len(prompts), "engines": names,
            "threads": threads, "warmup_tokens": WARMUP_TOKENS, "order": "per prompt, engines in the order of 'engines'",
            "chat_template": "engine.chat_prompt([{'role': 'user', 'content': prompt}])",
            "decode_tokens_per_s": "(N-1) / decode_s; decode_s runs from the first new token to the last",
            "quality": (
                "per prompt, each llmcad precision in (gguf, q4, int8) vs fp32, teacher-forced on fp32's greedy continuation "
                "in ONE forward over prompt + N tokens (engine.model(ids, arange(T), cache, 0)): greedy_agreement = "
                "fraction of the N positions where the precision's argmax equals fp32's token; loglik_fp32 / loglik = "
                "mean log p(fp32 token) per token under fp32 / the precision; identical_prefix = leading tokens shared "
                "by the free-running outputs; *self_agreement = one-forward argmax vs the engine's own free-running "
                "tokens (1 = a batched forward computes what step-by-step decoding does)"
            ),
        },  # fmt: skip
        "engines": {}, "runs": [], "quality": [], "summary": None, "complete": False,
    }  # fmt: skip
    engines, bench_binary = {}, None
    # transformers first: its GGUF load holds a second fp32 copy for a while, better before the rest is resident
    for name in sorted(names, key=lambda e: e != BASELINE):
        start = time.perf_counter()
        try:
            if name.startswith("llmcad-"):
                engines[name] = Llmcad(path, name.removeprefix("llmcad-"))
            elif name == BASELINE:
                engines[name] = Transformers(path)
            else:
                binary, reason = find_llamacpp()
                if binary is None:
                    result["engines"][name] = {"available": False, "reason": reason}
                    continue
                if "bench" in binary.name:
                    bench_binary = binary
                    result["engines"][name] = {"available": True, "binary": str(binary), "per_prompt": False}
                    continue
                engines[name] = LlamaServer(binary, path, threads, 4096)
        except Exception as e:  # noqa: BLE001 -- record the reason, benchmark the rest
            result["engines"][name] = {"available": False, "reason": f"{type(e).__name__}: {e}"}
            print(f"{name}: unavailable ({e})", file=sys.stderr)
            continue
        e = engines[name]
        gc.collect()
        result["engines"][name] = {"available": True, "load_s": time.perf_counter() - start, "rss_mb_after": rss_mb(), "method": e.method}
        if hasattr(e, "version"):
            result["engines"][name]["version"] = e.version

    engines = {e: engines[e] for e in names if e in engines}  # back to the interleaving order
    ids_of = chat_prompts(prompts, engines, path)
    for e in engines.values():  # warm-up, untimed
        e.run(ids_of[prompts[0]["id"]], min(WARMUP_TOKENS, n))
    for q in tqdm(prompts, desc="prompts", unit="prompt", file=sys.stderr):
        ids, out = ids_of[q["id"]], {}
        for name, e in engines.items():
            r = out[name] = e.run(ids, n)
            new = r.pop("new_tokens", None) or len(r["tokens"])
            result["runs"].append({
                "engine": name, "id": q["id"], "kind": q["kind"], "prompt_tokens": len(ids), "new_tokens": new,
                "prefill_s": r["prefill_s"], "decode_s": r["decode_s"],
                "prefill_tokens_per_s": len(ids) / r["prefill_s"],
                "decode_tokens_per_s": (new - 1) / r["decode_s"] if new > 1 else None,
                **{k: v for k, v in r.items() if k not in ("prefill_s", "decode_s")},
            })  # fmt: skip
        if "llmcad-fp32" in out:
            for rec in result["runs"][-len(out) :]:
                rec["identical_prefix_vs_llmcad_fp32"] = same_prefix(rec["tokens"], out["llmcad-fp32"]["tokens"])
            for precision in QUANTIZED:
                if f"llmcad-{precision}" in out:
                    qual = quality(precision, engines[f"llmcad-{precision}"], engines["llmcad-fp32"], ids, out)
                    result["quality"].append({"id": q["id"], "kind": q["kind"], **qual})
        write_json(args.out, result)  # partial results survive an interrupted run

    extra = {}
    if bench_binary is not None:  # llama-bench: one synthetic run at the median prompt length
        median_prompt = int(median(len(ids) for ids in ids_of.values()))
        lb = llama_bench(bench_binary, path, threads, median_prompt, n)
        result["engines"]["llama.cpp"].update(lb)
        extra["llama.cpp"] = {"runs": 0, "median_prompt_tokens": median_prompt, "median_prefill_s": lb["prefill_s"],
                              "median_decode_tokens_per_s": lb["decode_tokens_per_s"]}  # fmt: skip
    result["summary"] = summarize(result["runs"], result["quality"], extra)
    result["machine"].update(load_average_end=os.getloadavg(), peak_rss_mb=peak_rss_mb())
    result["complete"] = True
    write_json(args.out, result)
    title = f"{path.name}: {n} new tokens, greedy, {len(prompts)} prompts, {threads} threads"
    plot(result["summary"], args.out.with_suffix(".png"), title)
    print(f"\n{title}\n\n{markdown(result['summary'])}\n\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
