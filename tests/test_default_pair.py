"""The default pair (Qwen2.5-Coder 0.5B drafting for 1.5B, fetched on first use): greedy
`sd`, `tree` and `llmcad` (both adaptive fallbacks, pipeline on) produce exactly the target's own greedy tokens on three prompts."""

from __future__ import annotations

import pytest

from llmcad.engine import Engine
from llmcad.hub import DEFAULT_DRAFT, DEFAULT_TARGET

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
