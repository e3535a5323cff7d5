"""Conversations and start-up with the whole engine's defaults: what a user of `llmcad
chat` or of `llmcad serve` behind a chat app waits for.

1. start-up: `llmcad generate --chat` (no flags but --max-tokens) run --starts times in a
   memory cgroup of --budget, the models' files and the store dropped from the page cache
   first: seconds from the command to the engine loaded (its setup block on stderr), to the
   first token on stdout, and that less the prefill (from the stats line).
2. conversation: `llmcad serve` (no model flags: the default pair, auto budget inside the
   cgroup) answers a conversation turn by turn, greedy, every answer --tokens long. Each
   turn is asked twice, streamed: first with the prompt cache (the server holds the last
   turn's prompt and answer), then with `cache_prompt: false`, which prefills the whole
   history as every turn did before the cache. Per turn: prompt tokens, tokens reused,
   time to first token both ways, and whether both answers are the same (they must be).

    python bench/conversation.py                      # 1200 MB, 4 turns
    python bench/conversation.py --budget 2000MB --turns 6

Writes bench/results/conversation.json and conversation.png (--out).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from common import RESULTS, machine_info, md_table, median, write_json
from serve import Served
from stream import evict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmcad.budget import MB, parse_size  # noqa: E402
from llmcad.engine import DEFAULT_PRECISION  # noqa: E402
from llmcad.hub import DEFAULT_DRAFT, DEFAULT_TARGET, resolve_model  # noqa: E402
from llmcad.store import store_path  # noqa: E402
from tests.cgroup import cgroup_unavailable, memory_cgroup  # noqa: E402

TURNS = [
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Now make it work for any number of sorted lists.",
    "Add type hints and a short docstring.",
    "Write three pytest tests for it.",
    "What is the time complexity of your last version, and why?",
    "Rewrite it without using heapq.",
]


def drop_cached_models() -> None:
    """Evict the default pair's files and the target's store from the page cache, as after a reboot."""
    target, draft = resolve_model(DEFAULT_TARGET), resolve_model(DEFAULT_DRAFT)
    evict([target, draft, *store_path(target, DEFAULT_PRECISION).iterdir()])


def startup(budget: int, tokens: int) -> dict:
    """`llmcad generate --chat` streaming its answer, timed from the command: when the engine
    had loaded (its two-line setup block on stderr) and when the first token arrived (the
    first byte on stdout); then the run's own figures from its stats line."""
    drop_cached_models()
    cmd = [sys.executable, "-m", "llmcad.cli", "generate", "--chat", "--max-tokens", str(tokens), TURNS[0]]
    stamps: dict[str, float] = {}
    with ExitStack() as stack:
        enter = peak = None
        if cgroup_unavailable() is None:
            enter, peak = stack.enter_context(memory_cgroup(budget))
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=enter)

        def watch_stderr(lines: list[str]) -> None:
            for line in proc.stderr:
                stamps.setdefault("loaded_s", time.perf_counter() - started) if line.startswith(b"llmcad: ") else None
                lines.append(line.decode())

        err: list[str] = []
        reader = threading.Thread(target=watch_stderr, args=(err,))
        reader.start()
        first = proc.stdout.read(1)
        stamps["first_token_s"] = time.perf_counter() - started
        first += proc.stdout.read()
        proc.wait()
        reader.join()
        stamps["exit_s"] = time.perf_counter() - started
        peak_mb = peak() / MB if peak else None
    if proc.returncode != 0 or not first:
        return {"error": "".join(err)[-2000:], "exit": proc.returncode}
    stats = err[-1]
    prefill = re.search(r"prompt: (\d+) tokens, ([0-9.]+) tok/s", stats)
    prompt_tokens, rate = int(prefill.group(1)), float(prefill.group(2))
    return {**stamps, "prompt_tokens": prompt_tokens, "prefill_s": prompt_tokens / rate,
            "before_prefill_s": stamps["first_token_s"] - prompt_tokens / rate, "setup": err[0].strip() + " " + err[1].strip(),
            "cgroup_peak_mb": peak_mb}


def ask(served: Served, client, messages: list[dict], tokens: int, cache: bool) -> dict:
    start = time.perf_counter()
    first, parts, usage = None, [], None
    stream = client.chat.completions.create(model=served.model, messages=messages, max_tokens=tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "cache_prompt": cache})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    return {"first_token_s": first, "seconds": time.perf_counter() - start, "text": "".join(parts),
            "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.prompt_tokens_details.cached_tokens}


def conversation(served: Served, turns: int, tokens: int) -> list[dict]:
    client, messages, rows = served.client(), [], []
    for i, text in enumerate(TURNS[:turns]):
        messages.append({"role": "user", "content": text})
        cached = ask(served, client, messages, tokens, cache=True)
        uncached = ask(served, client, messages, tokens, cache=False)
        messages.append({"role": "assistant", "content": cached["text"]})
        rows.append({"turn": i + 1, "prompt_tokens": cached["prompt_tokens"], "cached_tokens": cached["cached_tokens"],
                     "first_token_s_cached": cached["first_token_s"], "first_token_s_uncached": uncached["first_token_s"],
                     "same_answer": cached["text"] == uncached["text"]})
        print(json.dumps(rows[-1]), flush=True)
    client.close()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", default="1200MB", help="the memory cgroup's limit (default %(default)s)")
    p.add_argument("--turns", type=int, default=4, help=f"turns of the conversation, at most {len(TURNS)} (default %(default)s)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per answer (default %(default)s)")
    p.add_argument("--starts", type=int, default=3, help="start-up runs (default %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS / "conversation.json")
    args = p.parse_args()
    budget = parse_size(args.budget)
    results = {"benchmark": "conversation", "machine": machine_info(), "settings": {k: str(v) for k, v in vars(args).items()},
               "cgroup": cgroup_unavailable() or "each run in a memory cgroup of the budget", "budget_mb": budget / MB}
    results["startup"] = [startup(budget, 8) for _ in range(args.starts)]
    for row in results["startup"]:
        print(json.dumps({k: v for k, v in row.items() if k != "setup"}), flush=True)
    with ExitStack() as stack:
        enter = None
        if cgroup_unavailable() is None:
            enter, _ = stack.enter_context(memory_cgroup(budget))
        drop_cached_models()
        served = Served([], DEFAULT_TARGET, enter)
        try:
            results["server"] = served.started_line
            results["turns"] = conversation(served, args.turns, args.tokens)
            results["metrics"] = served.metrics()
        finally:
            results["server_log"] = served.stop()[:2000]
    write_json(args.out, results)
    plot(results, args.out.with_suffix(".png"))
    ok = [r for r in results["startup"] if "error" not in r]
    print(md_table(["start-up (median)", "loaded s", "first token s", "prefill s", "first token less prefill s"],
                   [[f"{len(ok)} runs", median([r["loaded_s"] for r in ok]), median([r["first_token_s"] for r in ok]),
                     median([r["prefill_s"] for r in ok]), median([r["before_prefill_s"] for r in ok])]]))
    print(md_table(["turn", "prompt tokens", "reused", "first token s (cache)", "first token s (no cache)", "same answer"],
                   [[r["turn"], r["prompt_tokens"], r["cached_tokens"], r["first_token_s_cached"], r["first_token_s_uncached"], r["same_answer"]]
                    for r in results["turns"]]))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = results["turns"]
    x = [r["turn"] for r in turns]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r["first_token_s_uncached"] for r in turns], "o-", label="whole history prefilled (cache_prompt: false)")
    ax.plot(x, [r["first_token_s_cached"] for r in turns], "o-", label="prompt cache (default)")
    for r in turns:
        ax.annotate(f"{r['cached_tokens']}/{r['prompt_tokens']}", (r["turn"], r["first_token_s_cached"]), textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    ax.set(xlabel="turn (labels: prompt tokens reused / prompt tokens)", ylabel="time to first token, s",
           title=f"llmcad serve, default pair, {results['budget_mb']:.0f} MB cgroup")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
