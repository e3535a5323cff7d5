"""The prompt cache: a prompt that begins with what the KV caches already hold prefills
only the rest, and every answer is token for token the one an uncached run gives, in ar and
llmcad modes, resident and streamed, across diverging prompts, cancelled streams and
passes that fail half-way."""

from __future__ import annotations

import pytest
import torch

from llmcad.budget import MB
from llmcad.engine import Engine
from llmcad.model import Block, KVCache
from conftest import make_tiny_hf, smallest_budget

GREEDY = dict(max_tokens=12, ignore_eos=True)
QUESTIONS = ["def add(a, b):", "The quick brown fox", "for (int i = 0; i < n; i++)"]


@pytest.fixture(scope="module")
def pair_folders(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("cache-pair")
    return make_tiny_hf(root / "target", "qwen2", seed=5), make_tiny_hf(root / "draft", "qwen2", seed=5, noise=0.03)


@pytest.fixture(scope="module", params=["resident", "streamed"])
def engine(request, pair_folders):
    target, draft = pair_folders
    if request.param == "resident":
        engine = Engine.load(target, draft=draft, precision="fp32", draft_precision="fp32", progress=False)
    else:
        # the smallest budget that streams every layer, with the runtime pinned (it varies
        # by more than the whole tiny model)
        patch = pytest.MonkeyPatch()
        patch.setattr("llmcad.engine.current_rss", lambda: 300 * MB)
        budget = smallest_budget(target, draft=draft, max_context=512)
        engine = Engine.load(target, draft=draft, memory_budget=budget, max_context=512, progress=False)
        patch.undo()
        assert engine.plan.bytes_per_pass > 0
    yield engine
    engine.close()


@pytest.mark.parametrize("mode", ["ar", "llmcad"])
def test_conversation_equals_uncached_turns(engine, mode):
    """Three turns: each reuses the last turn's prompt and answer, and each answer equals a
    run over the same prompt with the cache emptied first."""
    engine.forget_prompts()
    chat = engine.conversation(system="You are terse.")
    turns = []
    for question in QUESTIONS:
        answer = chat.say(question, mode=mode, **GREEDY)
        turns.append((chat.last_prompt, answer.tokens, answer.stats.extra["prompt_tokens_reused"]))
    assert turns[0][2] == 0
    for prompt, tokens, reused in turns[1:]:
        assert reused >= 10  # the system message, the last question and its answer
        assert reused < len(prompt)
    for prompt, tokens, _ in turns:
        uncached = engine.generate(prompt, mode=mode, cache_prompt=False, **GREEDY)
        assert uncached.tokens == tokens
        assert uncached.stats.extra["prompt_tokens_reused"] == 0
    assert [m["role"] for m in chat.messages] == ["system"] + ["user", "assistant"] * 3


def test_a_diverging_prompt_keeps_only_the_common_prefix(engine):
    engine.forget_prompts()
    first = engine.tokenizer.encode("def add(a, b):\n    return a + b\n")
    engine.generate(first, **GREEDY)
    second = first[:5] + engine.tokenizer.encode(" jumps over the lazy dog")
    result = engine.generate(second, **GREEDY)
    assert result.stats.extra["prompt_tokens_reused"] == 5
    assert result.tokens == engine.generate(second, cache_prompt=False, **GREEDY).tokens
    # the same prompt again: all but its last token (a pass must run one to give logits)
    again = engine.generate(second, mode="ar", **GREEDY)
    assert again.stats.extra["prompt_tokens_reused"] == len(second) - 1 and again.tokens == result.tokens


@pytest.mark.parametrize("mode", ["ar", "llmcad"])
def test_a_cancelled_stream_leaves_the_cache_consistent(engine, mode):
    """A stream closed after three pieces, then a prompt continuing what it produced."""
    engine.forget_prompts()
    prompt = engine.tokenizer.encode(QUESTIONS[1])
    stream = engine.stream(prompt, mode=mode, **GREEDY)
    produced = [t for _, piece in zip(range(3), stream) for t in piece.token_ids]
    stream.close()
    follow = prompt + produced + engine.tokenizer.encode(" and then")
    result = engine.generate(follow, mode=mode, **GREEDY)
    assert result.stats.extra["prompt_tokens_reused"] >= len(prompt)
    assert result.tokens == engine.generate(follow, mode=mode, cache_prompt=False, **GREEDY).tokens


def assert_cache_holds_its_tokens(model, cache) -> None:
    """The keys and values in the slots `cache.tokens` names are those a fresh prefill of
    those tokens computes (up to float rounding: garbage would be far off)."""
    n = len(cache.tokens)
    assert n > 0
    fresh = KVCache(model.config, n)
    model(torch.tensor(cache.tokens), torch.arange(n), fresh, 0)
    torch.testing.assert_close(cache.k[..., :n], fresh.k, atol=1e-4, rtol=0)
    torch.testing.assert_close(cache.v[:, :, :n], fresh.v, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["ar", "llmcad"])
@pytest.mark.parametrize("max_tokens", [1, 5, 16])
def test_the_caches_hold_what_they_say(engine, mode, max_tokens):
    """After a generation (ended anywhere: a speculative one commits past max_tokens) the
    target's and the draft's caches hold exactly the entries their `tokens` name."""
    engine.forget_prompts()
    engine.generate(QUESTIONS[0], mode=mode, max_tokens=max_tokens, ignore_eos=True)
    assert_cache_holds_its_tokens(engine.model, engine.cache)
    if mode == "llmcad":
        assert_cache_holds_its_tokens(engine.draft.model, engine.draft.cache)


class Failure(Exception):
    pass


@pytest.mark.parametrize("mode", ["ar", "llmcad"])
@pytest.mark.parametrize("failing_pass", [1, 3])  # the prefill; a decode step or verification
def test_a_pass_failing_half_way_leaves_the_cache_consistent(engine, mode, failing_pass, monkeypatch):
    """The target raises in its second layer of a pass, after the first layer wrote its keys
    and values: the next generation over the same prompt equals an uncached one."""
    engine.forget_prompts()
    prompt = engine.tokenizer.encode(QUESTIONS[0])
    engine.generate(prompt, mode=mode, **GREEDY)
    longer = prompt + engine.tokenizer.encode(" return a - b")
    draft_blocks = {id(b) for b in engine.draft.model.layers}
    layers, calls = engine.model.config.num_layers, [0]
    real_forward = Block.forward

    def failing(block, *args, **kwargs):
        if id(block) not in draft_blocks:  # a target layer (short prompts: one call per layer and pass)
            calls[0] += 1
            if calls[0] == (failing_pass - 1) * layers + 2:
                raise Failure
        return real_forward(block, *args, **kwargs)

    monkeypatch.setattr(Block, "forward", failing)
    with pytest.raises(Failure):
        engine.generate(longer, mode=mode, **GREEDY)
    monkeypatch.undo()
    result = engine.generate(longer, mode=mode, **GREEDY)
    assert result.tokens == engine.generate(longer, mode=mode, cache_prompt=False, **GREEDY).tokens


def test_sampling_with_a_seed_is_the_same_with_the_cache(engine):
    engine.forget_prompts()
    prompt = engine.tokenizer.encode(QUESTIONS[2])
    options = dict(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True)
    engine.generate(prompt[:-2], **options)
    cached = engine.generate(prompt, **options)
    assert cached.stats.extra["prompt_tokens_reused"] > 0
    assert cached.tokens == engine.generate(prompt, cache_prompt=False, **options).tokens
