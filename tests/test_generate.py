"""Generation on a tiny random model: greedy equals transformers, sampling is seeded and
follows the target distribution, streams honour stop strings, EOS and max_tokens."""

from __future__ import annotations

import threading

import pytest
import torch

from llmcad.engine import Engine
from llmcad.errors import LlmcadError
from llmcad.generate import StopStrings
from llmcad.sampling import Sampler, SamplingParams, probabilities


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return Engine.load(tiny_llama, precision="fp32", progress=False)


def test_greedy_matches_transformers_generate(engine, tiny_llama):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = engine.tokenizer.encode("def add(a, b):")
    expected = hf.generate(
        torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(ids) :].tolist()
    result = engine.generate(ids, max_tokens=20, ignore_eos=True)
    assert result.tokens == expected
    assert result.finish_reason == "length" and result.stats.new_tokens == 20
    assert result.text == engine.tokenizer.decode(expected)


def test_stream_pieces_add_up_to_generate(engine):
    pieces = list(engine.stream("The quick", max_tokens=15, ignore_eos=True))
    result = engine.generate("The quick", max_tokens=15, ignore_eos=True)
    assert "".join(p.text for p in pieces) == result.text
    assert [t for p in pieces for t in p.token_ids] == result.tokens
    assert all(p.finish_reason is None for p in pieces[:-1]) and pieces[-1].stats is not None


def test_stop_string_cuts_the_text(engine):
    full = engine.generate("import numpy", max_tokens=20, ignore_eos=True).text
    stop = full[5:8]
    assert stop and full.find(stop) == 5
    result = engine.generate("import numpy", max_tokens=20, ignore_eos=True, stop=["zzz-never", stop])
    assert result.text == full[:5] and result.finish_reason == "stop"
    assert len(result.tokens) < 20


def test_eos_ends_generation(engine):
    first = engine.generate("hello", max_tokens=1).tokens[0]
    saved, engine.tokenizer.eos_token_ids = engine.tokenizer.eos_token_ids, frozenset({first})
    try:
        result = engine.generate("hello", max_tokens=10)
    finally:
        engine.tokenizer.eos_token_ids = saved
    assert result.finish_reason == "stop" and result.tokens == [first] and result.text == ""


def test_stop_strings_hold_back_partial_matches():
    stops = StopStrings(["END", "xy"])
    assert stops.push("abcE") == ("abc", False)  # "E" may start "END"
    assert stops.push("N") == ("", False)
    assert stops.push("Dtail") == ("", True)
    stops = StopStrings(["END"])
    assert stops.push("abcEN") == ("abc", False)
    assert stops.push("x") == ("ENx", False)
    assert stops.flush() == ""


def test_sampling_is_reproducible_and_top_k_1_is_greedy(engine):
    options = dict(max_tokens=12, ignore_eos=True, temperature=1.0)
    a = engine.generate("hello", seed=7, **options).tokens
    assert a == engine.generate("hello", seed=7, **options).tokens
    greedy = engine.generate("hello", max_tokens=12, ignore_eos=True).tokens
    assert engine.generate("hello", seed=1, top_k=1, **options).tokens == greedy


def chi_square_p(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square goodness-of-fit test."""
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor((len(counts) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat.double() / 2))


def test_sampler_follows_the_distribution():
    """Chi-square goodness of fit of 20000 samples against softmax(logits / T) after top-k/top-p."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0])
    for params in (SamplingParams(1.0, seed=0), SamplingParams(0.7, top_k=5, seed=1), SamplingParams(1.3, top_p=0.8, seed=2)):
        probs = probabilities(logits, params)
        sampler = Sampler(params)
        counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(20000)]), minlength=8)
        support = probs > 0
        assert counts[~support].sum() == 0
        p = chi_square_p(counts[support].double(), probs[support].double() * 20000)
        assert p > 1e-3, (params, counts, probs)
    # the test has power: samples from the wrong temperature fail it
    wrong = Sampler(SamplingParams(1.5, seed=0))
    counts = torch.bincount(torch.tensor([wrong(logits) for _ in range(20000)]), minlength=8)
    assert chi_square_p(counts.double(), probabilities(logits, SamplingParams(1.0)).double() * 20000) < 1e-6


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = probabilities(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), SamplingParams(1.0, top_p=0.75))
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)


def test_bad_settings_are_refused(engine):
    with pytest.raises(LlmcadError, match="top_p"):
        engine.generate("hi", top_p=0.0)
    with pytest.raises(LlmcadError, match="context window"):
        engine.generate("hi", max_tokens=engine.max_context)
    with pytest.raises(LlmcadError, match="empty"):
        engine.generate([], max_tokens=3)


def test_concurrent_generations_are_serialized(engine):
    expected = engine.generate("abc", max_tokens=10, ignore_eos=True).tokens
    results = []

    def work():
        results.append(engine.generate("abc", max_tokens=10, ignore_eos=True).tokens)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3


def test_closing_a_stream_leaves_the_engine_usable(engine):
    expected = engine.generate("for (int", max_tokens=10, ignore_eos=True).tokens
    stream = engine.stream("something else entirely", max_tokens=50, ignore_eos=True)
    next(stream), next(stream)
    stream.close()
    assert engine.generate("for (int", max_tokens=10, ignore_eos=True).tokens == expected
