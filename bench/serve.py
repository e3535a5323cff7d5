"""`llmcad serve` under load with real models: the default pair in 4 bits, the target
streamed under a memory budget, the server in a memory cgroup of the budget (its store
dropped from the page cache first), driven by the official openai client.

Three phases against one server process, greedy, every answer --tokens long:
1. alone: each prompt once, streamed, one request at a time: time to first token, and the
   decode rate the client sees (first chunk to last) against the engine's own (/metrics);
   the answer becomes the prompt's reference.
2. load: --rounds rounds of --clients requests sent at once (whole answers). Each one
   completes with its prompt's reference text (nobody else's output, the same as streamed)
   or gets 429 with Retry-After. Per request: the latency, and per round: the server's
   RSS afterwards, /health, the queue depth.
3. disconnect: a long stream closed after a few chunks: how long until the engine is free
   (the cancelled generation stops at its next step), and how long the next one-token
   request then takes.

    python bench/serve.py                                  # 1000 MB, 2 code + 2 chat prompts
    python bench/serve.py --budget 2000MB --clients 50 --rounds 2 --tokens 32

Writes bench/results/serve.json and serve.png (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import openai
from common import RESULTS, load_prompts, machine_info, md_table, median, pair_parser, write_json
from stream import evict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmcad.budget import MB, parse_size  # noqa: E402
from llmcad.hub import resolve_model  # noqa: E402
from llmcad.store import ensure_store  # noqa: E402
from llmcad.weights import open_checkpoint  # noqa: E402
from tests.cgroup import cgroup_unavailable, memory_cgroup  # noqa: E402

PRECISION = "q4"  # the precision the default pair fits 1000 MB in


class Served:
    """`llmcad serve` in a subprocess (in a memory cgroup when `enter` is given)."""

    def __init__(self, options: list[str], model: str, enter=None):
        cmd = [sys.executable, "-m", "llmcad.cli", "serve", *options, "--port", "0"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=enter)
        line = self.proc.stdout.readline().decode()
        found = re.search(r"at (http://\S+/v1)", line)
        if not found:
            self.proc.kill()
            raise RuntimeError(f"the server did not start: {line}{self.proc.stderr.read().decode()[-2000:]}")
        self.base_url, self.model = found.group(1), model
        self.started_line = line.strip()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="none", max_retries=0, timeout=3600)

    def get(self, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(self.base_url.removesuffix("/v1") + path, timeout=60) as r:
            return r.status, r.read().decode()

    def metrics(self) -> dict[str, float]:
        _, text = self.get("/metrics")
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> str:
        """Ends the server; its stderr (the memory plan, the request log)."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=60)
        return err.decode()


def chat(served: Served, client: openai.OpenAI, prompt: str, tokens: int, **options):
    return client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": prompt}], max_tokens=tokens,
                                          temperature=0, extra_body={"ignore_eos": True}, **options)


def alone(served: Served, prompt: dict, tokens: int) -> dict:
    """One streamed request with the server otherwise idle."""
    client = served.client()
    start = time.perf_counter()
    chunks, stamps = [], []
    for chunk in chat(served, client, prompt["prompt"], tokens, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(chunk.choices[0].delta.content)
            stamps.append(time.perf_counter() - start)
        if chunk.usage:
            usage = chunk.usage
    client.close()
    engine_rate = served.metrics()["llmcad_decode_tokens_per_second"]
    client_rate = (usage.completion_tokens - 1) / (stamps[-1] - stamps[0])
    return {"prompt_id": prompt["id"], "kind": prompt["kind"], "first_token_s": stamps[0], "seconds": stamps[-1],
            "completion_tokens": usage.completion_tokens, "engine_decode_tokens_per_s": engine_rate,
            "client_decode_tokens_per_s": client_rate, "client_over_engine": client_rate / engine_rate, "text": "".join(chunks)}


def load_round(served: Served, prompts: list[dict], references: dict[str, str], clients: int, tokens: int) -> dict:
    """`clients` whole-answer requests sent at once."""
    client = served.client()
    start = time.perf_counter()

    def one(i: int) -> dict:
        prompt = prompts[i % len(prompts)]
        sent = time.perf_counter() - start
        try:
            answer = chat(served, client, prompt["prompt"], tokens)
        except openai.RateLimitError as e:
            return {"status": 429, "sent_s": sent, "answered_s": time.perf_counter() - start, "retry_after": int(e.response.headers["retry-after"])}
        return {"status": 200, "sent_s": sent, "answered_s": time.perf_counter() - start, "prompt_id": prompt["id"],
                "own_output": answer.choices[0].message.content == references[prompt["id"]],
                "usage_right": answer.usage.completion_tokens == tokens}

    with ThreadPoolExecutor(max_workers=clients) as pool:
        requests = list(pool.map(one, range(clients)))
    client.close()
    done = [r for r in requests if r["status"] == 200]
    health, _ = served.get("/health")
    return {"seconds": time.perf_counter() - start, "completed": len(done), "rejected": sum(r["status"] == 429 for r in requests),
            "all_own_output": all(r["own_output"] for r in done), "all_usage_right": all(r["usage_right"] for r in done),
            "median_latency_s": median(r["answered_s"] - r["sent_s"] for r in done),
            "max_latency_s": max((r["answered_s"] - r["sent_s"] for r in done), default=None),
            "completed_tokens_per_s": len(done) * tokens / (max(r["answered_s"] for r in done) if done else 1),
            "health": health, "queue_depth_after": served.metrics()["llmcad_queue_depth"], "rss_mb_after": served.rss_mb(),
            "requests": requests}


def disconnect(served: Served, prompt: dict) -> dict:
    """A long stream dropped after 3 chunks: how long until the engine is free (/metrics,
    polled), and how long the next one-token request takes."""
    before = served.metrics().get('llmcad_cancelled_total{reason="disconnect"}', 0)
    client = served.client()
    stream = chat(served, client, prompt["prompt"], 512, stream=True)
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()
    start = time.perf_counter()
    while served.metrics()["llmcad_generating"]:
        time.sleep(0.01)
    freed = time.perf_counter() - start
    chat(served, client, prompt["prompt"], 1)
    client.close()
    after = served.metrics()
    return {"engine_free_after_s": freed, "next_request_s": time.perf_counter() - start - freed,
            "cancelled": after['llmcad_cancelled_total{reason="disconnect"}'] - before}


def main() -> None:
    p = pair_parser(__doc__)
    p.add_argument("--budget", default="1000MB")
    p.add_argument("--limit", type=int, default=2, help="prompts per kind (default %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per answer (default %(default)s)")
    p.add_argument("--clients", type=int, default=50, help="requests sent at once in a load round (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--queue-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = p.parse_args()
    target, draft = resolve_model(args.target), resolve_model(args.draft)
    store = ensure_store(open_checkpoint(target), PRECISION, progress=True)
    prompts = load_prompts(args.kinds.split(","), args.limit)
    budget = parse_size(args.budget)
    results = {"benchmark": "serve", "machine": machine_info(), "settings": {k: str(v) for k, v in vars(args).items()},
               "cgroup": cgroup_unavailable() or "the server in a memory cgroup of its budget", "budget_mb": budget / MB}
    with ExitStack() as stack:
        enter = peak = None
        if cgroup_unavailable() is None:
            enter, peak = stack.enter_context(memory_cgroup(budget))
        evict(store.path.iterdir())
        options = ["--target", str(target), "--draft", str(draft), "--precision", PRECISION, "--draft-precision", PRECISION,
                   "--memory-budget", args.budget, "--queue-size", str(args.queue_size)]
        served = Served(options, target.name, enter)
        try:
            results["server"] = served.started_line
            results["rss_mb_loaded"] = served.rss_mb()
            results["alone"] = [alone(served, prompt, args.tokens) for prompt in prompts]
            for row in results["alone"]:
                print(json.dumps({k: v for k, v in row.items() if k != "text"}), flush=True)
            references = {row["prompt_id"]: row["text"] for row in results["alone"]}
            results["rss_mb_alone"] = served.rss_mb()
            results["rounds"] = []
            for _ in range(args.rounds):
                results["rounds"].append(load_round(served, prompts, references, args.clients, args.tokens))
                print(json.dumps({k: v for k, v in results["rounds"][-1].items() if k != "requests"}), flush=True)
                write_json(args.out, results)
            results["disconnect"] = disconnect(served, prompts[0])
            results["metrics"] = served.metrics()
        finally:
            log = served.stop()
        results["memory_plan"] = log[log.find("memory plan"):].split("\n127.0.0.1", 1)[0].strip()
        results["cgroup_peak_mb"] = peak and peak() / MB
    rss = [r["rss_mb_after"] for r in results["rounds"]]
    results["rss_growth_mb_between_rounds"] = rss[-1] - rss[0] if len(rss) > 1 else None
    write_json(args.out, results)
    plot(results, args.out.with_suffix(".png"))
    print(md_table(["prompt", "first token s", "engine tok/s", "client tok/s"],
                   [[r["prompt_id"], r["first_token_s"], r["engine_decode_tokens_per_s"], r["client_decode_tokens_per_s"]] for r in results["alone"]]))
    print(md_table(["round", "completed", "429", "seconds", "median latency s", "own output", "RSS MB after"],
                   [[i + 1, r["completed"], r["rejected"], r["seconds"], r["median_latency_s"], r["all_own_output"], r["rss_mb_after"]]
                    for i, r in enumerate(results["rounds"])]))
    cut = results["disconnect"]
    print(f"disconnect: engine free {cut['engine_free_after_s']:.2f} s later, the next one-token request took {cut['next_request_s']:.2f} s; RSS growth between rounds "
          f"{results['rss_growth_mb_between_rounds']} MB; cgroup peak {results['cgroup_peak_mb']} MB of {budget / MB:.0f}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    requests = results["rounds"][0]["requests"]
    for i, r in enumerate(sorted(requests, key=lambda r: r["sent_s"])):
        if r["status"] == 200:
            left.plot([r["sent_s"], r["answered_s"]], [i, i], color="tab:blue", lw=2)
        else:
            left.plot([r["answered_s"]], [i], "x", color="tab:red", ms=4)
    left.set(xlabel="seconds since the round began", ylabel="request (in sending order)",
             title=f"round 1: {len(requests)} requests at once; line = waiting + generating, x = 429")
    labels = ["loaded", "alone"] + [f"round {i + 1}" for i in range(len(results["rounds"]))]
    values = [results["rss_mb_loaded"], results["rss_mb_alone"]] + [r["rss_mb_after"] for r in results["rounds"]]
    right.bar(labels, values, color="tab:gray")
    right.axhline(results["budget_mb"], color="tab:red", ls="--", label="budget")
    if results.get("cgroup_peak_mb"):
        right.axhline(results["cgroup_peak_mb"], color="tab:orange", ls=":", label="cgroup peak (page cache too)")
    right.set(ylabel="MB", title="server RSS")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
