"""The default pair (Qwen2.5-Coder 0.5B drafting for 1.5B, fetched on first use) in the
default precisions (the target in gguf, the file's own Q4_K and Q6_K blocks on the native
kernels; the draft in q4_0, its Q5_0, Q6_K and Q8_0 matrices requantized to Q4_0): greedy `sd`, `tree` and `llmcad` (both adaptive fallbacks, pipeline on) produce
exactly the target's own greedy tokens on three prompts, on every kernel dispatch path this
CPU runs; the pair runs the whole loop inside a tight memory cgroup and still reproduces
the target."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmcad import kernels
from llmcad.budget import MB
from llmcad.engine import Engine
from llmcad.hub import DEFAULT_DRAFT, DEFAULT_TARGET
from tests.cgroup import cgroup_unavailable, minimum_budget, run_limited

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain in two sentences what a hash map is.",
    "Translate into French: The library opens at nine and closes at six.",
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine.load(DEFAULT_TARGET, draft=DEFAULT_DRAFT, progress=False)
    assert (engine.precision, engine.draft.precision) == ("gguf", "q4_0")
    return engine


@pytest.mark.parametrize("prompt", PROMPTS)
def test_speculation_reproduces_the_target(engine, prompt):
    """Token for token, with no tolerance: the kernels quantize each row on its own and give
    it the same bits at any batch size, and so does attention, so a token's logits
    in a verification pass are the ones its own decode step computes."""
    ids = engine.chat_prompt([{"role": "user", "content": prompt}])
    expected = engine.generate(ids, max_tokens=32, ignore_eos=True, mode="ar").tokens
    for mode, options in (("sd", {}), ("tree", {}), ("llmcad", {"pipeline": True}), ("llmcad", {"fallback": "cost", "pipeline": True})):
        result = engine.generate(ids, max_tokens=32, ignore_eos=True, mode=mode, **options)
        assert result.stats.extra["accepted_per_verification"] > 0.5, mode  # the draft helps
        assert result.tokens == expected, mode


@pytest.mark.parametrize("mode", ["ar", "llmcad"])
def test_a_conversation_with_the_prompt_cache_answers_as_uncached(engine, mode):
    """Two turns, the second reusing the first's prompt and answer from both caches: each
    answer is the one a run with the caches emptied gives."""
    engine.forget_prompts()
    chat = engine.conversation()
    for text in PROMPTS[:2]:
        answer = chat.say(text, max_tokens=16, ignore_eos=True, mode=mode)
        assert answer.tokens == engine.generate(chat.last_prompt, max_tokens=16, ignore_eos=True, mode=mode, cache_prompt=False).tokens
    assert answer.stats.extra["prompt_tokens_reused"] > 30  # the first turn's prompt and answer


@pytest.mark.parametrize("path", [p for p in kernels.supported_paths() if p != kernels.active_path()])
def test_speculation_reproduces_the_target_on_every_kernel_path(engine, path, monkeypatch):
    """The other dispatch paths (forced by LLMCAD_KERNEL_PATH; the active one is above):
    each is bit-exact with itself across batch sizes, so trees reproduce decoding there too."""
    monkeypatch.setenv(kernels.PATH_ENV, path)
    ids = engine.chat_prompt([{"role": "user", "content": PROMPTS[0]}])
    expected = engine.generate(ids, max_tokens=12, ignore_eos=True, mode="ar").tokens
    for mode in ("tree", "llmcad"):
        assert engine.generate(ids, max_tokens=12, ignore_eos=True, mode=mode).tokens == expected, mode


@pytest.mark.slow
def test_gguf_pair_runs_llmcad_within_a_tight_budget():
    """A small device's budget: the gguf pair (target streamed, draft resident), mode llmcad,
    in a memory cgroup (where one can be made) of 1000 MB, or of the CLI's stated minimum
    plus 10 MB where that is more (the measured runtime varies: 303 MB here, 390 MB in a
    fresh virtual environment, whose library pages the kernels map more of). Not killed,
    under the budget, the target streamed, and the q4 target's own greedy tokens (computed
    fully resident in this process)."""
    prompt = "def merge_sorted(a, b):"
    with Engine.load(DEFAULT_TARGET, draft=None, precision="gguf", progress=False) as target:
        expected = target.generate(prompt, max_tokens=24, ignore_eos=True).tokens
    models = ["--target", DEFAULT_TARGET, "--draft", DEFAULT_DRAFT, "--precision", "gguf"]
    budget = max(1000 * MB, minimum_budget([*models, "--max-tokens", "24"]) + 10 * MB)
    cmd = [sys.executable, "-m", "llmcad.cli", "generate", *models, "--memory-budget", str(budget), "--mode", "llmcad",
           "--max-tokens", "24", "--ignore-eos", "--json", prompt]
    if cgroup_unavailable() is None:
        result, peak = run_limited(budget, cmd, capture_output=True, text=True, timeout=900)
    else:
        result, peak = subprocess.run(cmd, capture_output=True, text=True, timeout=900), None
    assert result.returncode == 0, f"exit {result.returncode} (137 = killed for memory): {result.stderr[-2000:]}"
    out = json.loads(result.stdout)
    assert out["tokens"] == expected
    assert out["stats"]["tokens_per_verification"] > 2  # the draft did real work
    assert out["stats"]["bytes_read"] > out["stats"]["target_passes"] * 500 * MB  # the target was streamed
    assert out["stats"]["peak_rss_mb"] * MB < budget
    assert peak is None or peak <= budget


@pytest.mark.slow
@pytest.mark.skipif(cgroup_unavailable() is not None, reason="no memory cgroup here")
def test_default_chat_streams_in_a_small_cgroup_and_answers_as_uncached(engine, tmp_path):
    """The defaults where the pair does not fit: `llmcad chat` with no model flags in a
    1200 MB memory cgroup takes the paired draft and a budget from the cgroup's limit,
    streams the target, and answers each turn (the second reusing the first's keys and
    values) exactly as the resident target alone does over the same history, uncached."""
    saved = tmp_path / "chat.json"
    lines = ["Write a Python function that reverses a string.", "Now make it return None for None.", f"/save {saved}"]
    cmd = [sys.executable, "-m", "llmcad.cli", "chat", "--max-tokens", "24"]
    result, peak = run_limited(1200 * MB, cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"exit {result.returncode} (137 = killed for memory): {result.stderr[-2000:]}"
    assert "+ draft qwen2.5-coder-0.5b" in result.stderr and "memory cgroup limit" in result.stderr, result.stderr
    assert "target streamed" in result.stderr, result.stderr
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    for turn in range(2):
        history = messages[: 2 * turn + 1]
        expected = engine.chat(history, max_tokens=24, mode="ar", cache_prompt=False)
        assert messages[2 * turn + 1]["content"] == expected.text, turn
    assert peak <= 1200 * MB
