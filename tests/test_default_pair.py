"""The default pair (Qwen2.5-Coder 0.5B drafting for 1.5B, fetched on first use): greedy
`sd`, `tree` and `llmcad` (both adaptive fallbacks, pipeline on) produce exactly the target's
own greedy tokens on three prompts; in q4 the pair runs the whole loop inside a tight
memory cgroup and still reproduces the target."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    return Engine.load(DEFAULT_TARGET, draft=DEFAULT_DRAFT, progress=False)  # both int8


@pytest.mark.parametrize("prompt", PROMPTS)
def test_speculation_reproduces_the_target(engine, prompt):
    """Token for token, with no tolerance: int8 linears quantize each row on its own and
    attention runs in float64, so a token's logits in a verification pass are the ones its
    own decode step computes."""
    ids = engine.chat_prompt([{"role": "user", "content": prompt}])
    expected = engine.generate(ids, max_tokens=32, ignore_eos=True, mode="ar").tokens
    for mode, options in (("sd", {}), ("tree", {}), ("llmcad", {"pipeline": True}), ("llmcad", {"fallback": "cost", "pipeline": True})):
        result = engine.generate(ids, max_tokens=32, ignore_eos=True, mode=mode, **options)
        assert result.stats.extra["accepted_per_verification"] > 0.5, mode  # the draft helps
        assert result.tokens == expected, mode


@pytest.mark.slow
def test_q4_pair_runs_llmcad_within_a_tight_budget():
    """A small device's budget: the q4 pair (target streamed, draft resident), mode llmcad,
    in a memory cgroup (where one can be made) of 1000 MB, or of the CLI's stated minimum
    plus 10 MB where that is more (the measured runtime varies: 303 MB here, 390 MB in a
    fresh virtual environment, whose library pages the kernels map more of). Not killed,
    under the budget, the target streamed, and the q4 target's own greedy tokens (computed
    fully resident in this process)."""
    prompt = "def merge_sorted(a, b):"
    with Engine.load(DEFAULT_TARGET, precision="q4", progress=False) as target:
        expected = target.generate(prompt, max_tokens=24, ignore_eos=True).tokens
    models = ["--target", DEFAULT_TARGET, "--draft", DEFAULT_DRAFT, "--precision", "q4", "--draft-precision", "q4"]
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
