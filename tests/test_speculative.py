"""Token-tree speculative decoding is lossless: greedy output equals the target alone, and
sampling draws from the target's own distribution (checked statistically)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmcad import kernels
from llmcad.config import ModelConfig
from llmcad.engine import DEFAULT_FALLBACK, Engine
from llmcad.errors import LlmcadError
from llmcad.model import KVCache, Transformer
from llmcad.quant import FloatLinear
from llmcad.sampling import SamplingParams, probabilities
from llmcad.fallback import ConfidenceFallback, CostFallback, Fallback, TreeLimits
from llmcad.speculative import SpeculativeDecoder
from llmcad.tree import TokenTree
from llmcad.weights import VocabularySubsetHead
from conftest import make_tiny_hf

LIMITS = {
    "sd-1": ("sd", TreeLimits.linear(1), {}),
    "sd-4": ("sd", TreeLimits.linear(4), {}),
    "tree-8": ("tree", TreeLimits(max_nodes=8, max_depth=4, width=3, branch_threshold=0.05, batch=2), {}),
    "tree-32": ("tree", TreeLimits(max_nodes=32, max_depth=8, width=4, branch_threshold=0.02, batch=8), {}),
    # the full loop, with the pipeline forced on (these targets are resident)
    **{f"llmcad-{f}": ("llmcad", None, {"fallback": f, "pipeline": True}) for f in ("fixed", "llmcad", "cost")},
    "llmcad-no-pipeline": ("llmcad", None, {"pipeline": False}),
}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair_folders(request, tmp_path_factory) -> tuple:
    """A tiny target and a draft that is the target with its weights perturbed."""
    root = tmp_path_factory.mktemp(f"pair-{request.param}")
    return make_tiny_hf(root / "target", request.param, seed=3), make_tiny_hf(root / "draft", request.param, seed=3, noise=0.03)


@pytest.fixture(scope="module")
def pair(pair_folders) -> Engine:
    target, draft = pair_folders
    return Engine.load(target, draft=draft, precision="fp32", progress=False)


CASES = [(seed, length) for seed in range(4) for length in (1, 4, 13)]  # prompt seeds x lengths


def prompt_for(seed: int, length: int) -> list[int]:
    return torch.randint(0, 300, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def ar_tokens(pair) -> dict:
    return {case: pair.generate(prompt_for(*case), max_tokens=24, ignore_eos=True, mode="ar").tokens for case in CASES}


@pytest.mark.parametrize("setting", LIMITS)
def test_greedy_equals_target_alone(pair, ar_tokens, setting):
    mode, limits, options = LIMITS[setting]
    accepted = 0
    for case in CASES:
        result = pair.generate(prompt_for(*case), max_tokens=24, ignore_eos=True, mode=mode, limits=limits, **options)
        assert result.tokens == ar_tokens[case], (setting, case)
        accepted += result.stats.extra["accepted_per_verification"]
    assert accepted > 0  # the draft is close enough that speculation did real work


# (precision, kernel path): "no-library" runs as if the native library had not built, so
# attention takes its PyTorch float64 fallback
QUANTIZED = [("q4", None), ("int8", "no-library")] + [(p, path) for p in ("gguf", "q4_0") for path in kernels.supported_paths()]


@pytest.mark.parametrize("precision, kernel_path", QUANTIZED, ids=[f"{p}-{k}" if k else p for p, k in QUANTIZED])
def test_quantized_speculation_reproduces_the_quantized_target(tmp_path, precision, kernel_path, monkeypatch):
    """A quantized target verifies a tree in one pass: q4's and int8's PyTorch kernels and the
    native kernels on each dispatch path (a Hugging Face folder converts to Q8_0 blocks in gguf,
    to Q4_0 in q4_0) compute each row on their own, and so does attention (native, or float64 without the
    library), so verification gives what decoding gives and greedy speculation stays exact."""
    if kernel_path == "no-library":
        monkeypatch.setattr("llmcad.kernels.available", lambda: False)
    elif kernel_path:
        monkeypatch.setenv(kernels.PATH_ENV, kernel_path)
    target = make_tiny_hf(tmp_path / "target", "qwen2", seed=3)
    draft = make_tiny_hf(tmp_path / "draft", "qwen2", seed=3, noise=0.03)
    engine = Engine.load(target, draft=draft, precision=precision, draft_precision=precision, progress=False)
    assert engine.precision == precision
    accepted = 0
    for case in CASES[::2]:
        ar = engine.generate(prompt_for(*case), max_tokens=24, ignore_eos=True, mode="ar").tokens
        for mode in ("sd", "tree", "llmcad"):
            result = engine.generate(prompt_for(*case), max_tokens=24, ignore_eos=True, mode=mode)
            assert result.tokens == ar, (mode, case)
            accepted += result.stats.extra["accepted_per_verification"]
    assert accepted > 0


def test_target_as_its_own_draft_accepts_everything(tiny_llama):
    engine = Engine.load(tiny_llama, draft=tiny_llama, precision="fp32", draft_precision="fp32", progress=False)
    for temperature in (0.0, 1.0):
        chain = engine.generate("abc", max_tokens=41, ignore_eos=True, mode="sd", limits=TreeLimits.linear(4), temperature=temperature, seed=0)
        assert set(chain.stats.extra["accepted_histogram"]) == {4}  # every verification: all 4 drafted
        tree = engine.generate("abc", max_tokens=40, ignore_eos=True, mode="tree", temperature=temperature, seed=0)
        assert set(tree.stats.extra["accepted_histogram"]) == {TreeLimits().max_depth}


def test_tree_mode_needs_a_draft(tiny_llama):
    """(Drafts whose tokenizers differ are refused: tests/test_families.py.)"""
    with pytest.raises(LlmcadError, match="needs a draft"):
        Engine.load(tiny_llama, mode="tree", precision="fp32", progress=False)


def test_a_draft_with_a_truncated_vocabulary_stays_lossless(pair_folders, ar_tokens):
    """The draft proposes only the first 120 of 320 ids (and the special tokens); the
    output is still the target's, and the target's own tokens outside them still come."""
    target, draft = pair_folders
    engine = Engine.load(target, draft=draft, precision="fp32", progress=False, draft_vocab=120)
    allowed = set(range(120)) | set(engine.tokenizer.backend.get_added_tokens_decoder())
    proposed, accepted = set(), 0
    for case in CASES:
        result = engine.generate(prompt_for(*case), max_tokens=24, ignore_eos=True, mode="llmcad",
                                 on_verify=lambda tree, path: proposed.update(tree.tokens[1 : tree.size].tolist()))
        assert result.tokens == ar_tokens[case], case
        accepted += result.stats.extra["accepted_per_verification"]
    assert proposed and proposed <= allowed
    assert accepted > 0 and any(t >= 120 for case in CASES for t in ar_tokens[case])


def test_a_policy_object_of_the_callers_decides_and_sees_the_streaming_layers_timings(pair, ar_tokens, monkeypatch):
    """`fallback` may be a policy object: the engine uses it with its own limits, and the
    decoder hands it every verification with the target's own timings, which the cost
    policy prices (this pair is resident: everything is compute, nothing is read), and the
    time of every draft pass that grows a tree (not the prompt's prefill)."""
    seen, events = [], []  # events: rows of each draft pass, "timed" when the policy hears of one

    class Spy(Fallback):
        def draft_pass(self, seconds):
            events.append("timed")

        def observe(self, tree, path, verify_s, compute_s=None, read_s=0.0):
            seen.append((tree.size - 1, verify_s, compute_s, read_s))

    draft_forward = pair.draft.model.forward
    monkeypatch.setattr(pair.draft.model, "forward", lambda tokens, *a, **k: events.append(len(tokens)) or draft_forward(tokens, *a, **k))
    case = CASES[5]
    result = pair.generate(prompt_for(*case), max_tokens=24, ignore_eos=True, mode="llmcad", fallback=Spy(TreeLimits(max_nodes=5, batch=2)), cache_prompt=False)
    assert events[0] == case[1] - 1 and events[1] != "timed"  # the prompt up to the root: untimed
    tree_passes = events[1:]  # each followed by its timing
    assert len(tree_passes) % 2 == 0 and tree_passes[1::2] == ["timed"] * (len(tree_passes) // 2)
    assert result.tokens == ar_tokens[case]
    assert len(seen) == result.stats.extra["verifications"] > 1
    assert all(nodes <= 5 for nodes, *_ in seen)  # the policy's own limits, not the engine's
    assert all(c is not None and 0 <= c <= v + 1e-3 and r == 0 for _, v, c, r in seen), seen


# ---- sampling: goodness of fit on a 48-token vocabulary ------------------------------------
VOCAB = 48
PROMPT = [5, 17, 3]
SAMPLES = 2000
SAMPLING = SamplingParams(temperature=1.0)
TREE = TreeLimits(max_nodes=8, max_depth=3, width=3, branch_threshold=0.08, batch=4)


def tiny(seed: int) -> Transformer:
    config = ModelConfig("llama", VOCAB, 32, 64, 2, 4, 2, 8, 1e-5, 10000.0, 64, False, False)
    torch.manual_seed(seed)
    model = Transformer(config)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, 1.0 if "norm" in name else 0.0, 0.5 if p.dim() > 1 else 0.05)
    return model.eval()


def exact_marginals(model: Transformer) -> list[torch.Tensor]:
    """The target's own distribution of each of the first three tokens, by enumeration."""
    def dist(ids):
        cache = KVCache(model.config, 16)
        return probabilities(model(torch.tensor(ids), torch.arange(len(ids)), cache, 0)[-1], SAMPLING)

    p1 = dist(PROMPT)
    p2, p3 = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for a in range(VOCAB):
        q2 = dist(PROMPT + [a])
        p2 += p1[a] * q2
        for b in torch.nonzero(q2 > 1e-4).flatten().tolist():
            p3 += p1[a] * q2[b] * dist(PROMPT + [a, b])
    return [p1, p2, p3 / p3.sum()]


def sampled_marginals(decoder_cls, target: Transformer, draft: Transformer) -> list[torch.Tensor]:
    counts = [torch.zeros(VOCAB) for _ in range(3)]
    t_cache, d_cache = KVCache(target.config, 32), KVCache(draft.config, 32)
    for seed in range(SAMPLES):
        params = SamplingParams(SAMPLING.temperature, seed=seed)
        tokens = decoder_cls(target, t_cache, draft, d_cache, Fallback(TREE), params).generate(PROMPT)
        for position in range(3):
            counts[position][next(tokens)] += 1
        tokens.close()
    return counts


def fit_p_values(counts: list[torch.Tensor], expected: list[torch.Tensor]) -> list[float]:
    """Pearson chi-square p-values, bins with fewer than 5 expected samples pooled."""
    out = []
    for observed, probs in zip(counts, expected):
        want = probs.double() * SAMPLES
        small = want < 5
        obs = torch.cat((observed.double()[~small], observed.double()[small].sum().view(1)))
        exp = torch.cat((want[~small], want[small].sum().view(1)))
        keep = exp > 0
        stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
        dof = torch.tensor((int(keep.sum()) - 1) / 2, dtype=torch.float64)
        out.append(float(torch.special.gammaincc(dof, stat / 2)))
    return out


class BrokenRule(SpeculativeDecoder):
    """Deliberately wrong: after a rejected child the target distribution is not replaced by
    the residual max(p - q, 0), so tokens the draft proposed are over-represented."""

    def _accept_child(self, tree, node, p, s):
        if s is None:
            return p
        for child in tree.children[node]:
            x = int(tree.tokens[child])
            if float(torch.rand(1, generator=self.generator)) * float(s.proposal()[x]) < float(p[x]):
                return child
        return p


@pytest.fixture(scope="module")
def sampling_pair():
    target, draft = tiny(0), tiny(1)
    return target, draft, exact_marginals(target)


def test_tree_sampling_preserves_the_target_distribution(sampling_pair):
    target, draft, expected = sampling_pair
    p_values = fit_p_values(sampled_marginals(SpeculativeDecoder, target, draft), expected)
    assert min(p_values) > 1e-3, p_values


def test_sampling_with_a_truncated_draft_vocabulary_preserves_the_target_distribution(sampling_pair):
    """The draft proposes from half the vocabulary: the other half reaches the output only
    through the residual max(p - q, 0), with q zero there."""
    target, draft, expected = sampling_pair
    keep = torch.arange(VOCAB // 2)
    truncated = tiny(1)  # the draft again, with another head
    truncated.lm_head = VocabularySubsetHead(FloatLinear(draft.lm_head.weight[keep]), keep, VOCAB)
    p_values = fit_p_values(sampled_marginals(SpeculativeDecoder, target, truncated), expected)
    assert min(p_values) > 1e-3, p_values


def test_the_fit_test_catches_a_broken_acceptance_rule(sampling_pair):
    target, draft, expected = sampling_pair
    p_values = fit_p_values(sampled_marginals(BrokenRule, target, draft), expected)
    assert min(p_values) < 1e-6, p_values


def test_cli_tree_mode_json_and_show_tree(tiny_llama, capsys):
    from llmcad import cli

    assert cli.main(["generate", "--target", str(tiny_llama), "--draft", str(tiny_llama), "--precision", "fp32",
                     "--max-tokens", "12", "--ignore-eos", "--json", "hello"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["mode"] == "llmcad" and out["stats"]["fallback"] == DEFAULT_FALLBACK and out["stats"]["verifications"] >= 1
    assert out["stats"]["new_tokens"] == len(out["tokens"]) == 12
    assert cli.main(["generate", "--target", str(tiny_llama), "--draft", str(tiny_llama), "--draft-precision", "fp32",
                     "--mode", "sd", "--draft-tokens", "3", "--max-tokens", "8", "--ignore-eos", "--show-tree", "hello"]) == 0
    err = capsys.readouterr().err
    assert "--- tree: 3 drafted, 3 accepted" in err and "*" in err and "tokens per verification" in err


# ---- the LLMCad loop: pipeline, fallback policies, stopping mid-stream ---------------------


def test_growth_during_verification_is_kept_when_the_target_agrees(tiny_llama):
    """With the target as its own draft the target accepts the whole main path and its next
    token is the draft's first choice, so what the draft grew below the path's end while the
    target verified is kept and becomes the next tree; the output is still the target's own."""
    engine = Engine.load(tiny_llama, draft=tiny_llama, precision="fp32", draft_precision="fp32", progress=False)
    expected = engine.generate("abc", max_tokens=40, ignore_eos=True, mode="ar").tokens
    limits = TreeLimits(max_nodes=12, max_depth=16, width=2, branch_threshold=0.2, batch=4)
    off = engine.generate("abc", max_tokens=40, ignore_eos=True, mode="llmcad", fallback="fixed", limits=limits, pipeline=False)
    on = engine.generate("abc", max_tokens=40, ignore_eos=True, mode="llmcad", fallback="fixed", limits=limits, pipeline=True)
    assert on.tokens == off.tokens == expected
    stats = on.stats.extra
    assert stats["extend_passes"] > 0 and stats["extensions_kept"] >= stats["verifications"] - 1
    assert stats["carried_nodes"] > 0
    assert off.stats.extra["extensions_kept"] == 0


def test_subtree_keeps_order_and_relative_confidence():
    tree = TokenTree(10, 8)
    a = tree.add(0, 11, 0.5)  # 1
    b = tree.add(0, 12, 0.4)  # 2
    tree.add(a, 13, 0.8)  # 3
    tree.add(b, 14, 0.9)  # 4
    tree.add(a, 15, 0.1)  # 5
    tree.add(3, 16, 0.5)  # 6
    sub, old = tree.subtree(a, 6)
    assert old == [1, 3, 5, 6]
    assert sub.tokens[: sub.size].tolist() == [11, 13, 15, 16] and sub.children[0] == [1, 2] and sub.children[1] == [3]
    assert sub.depths[: sub.size].tolist() == [0, 1, 1, 2]
    assert math.exp(float(sub.logp[3])) == pytest.approx(0.8 * 0.5)
    copy = tree.grown(12)
    assert copy.capacity == 12 and copy.size == tree.size and torch.equal(copy.mask[:7, :7], tree.mask[:7, :7])


def test_llmcad_sampling_preserves_the_target_distribution(sampling_pair):
    """The confidence fallback and the pipeline (the tree grown on while the target
    verifies, kept when it extends the accepted path) keep sampling lossless."""
    target, draft, expected = sampling_pair

    class Pipelined(SpeculativeDecoder):
        def __init__(self, target, t_cache, draft, d_cache, fallback, params):
            super().__init__(target, t_cache, draft, d_cache, ConfidenceFallback(fallback.limits, threshold=0.05), params, extend_passes=3)

    p_values = fit_p_values(sampled_marginals(Pipelined, target, draft), expected)
    assert min(p_values) > 1e-3, p_values


def test_closing_a_stream_midway_leaves_the_engine_usable(pair, ar_tokens):
    case = CASES[-1]
    stream = pair.stream(prompt_for(*case), max_tokens=24, ignore_eos=True, mode="llmcad", pipeline=True)
    pieces = [next(stream) for _ in range(3)]
    assert any(p.step is not None for p in pieces)  # per-step figures ride on the stream
    assert {"accepted", "tree_nodes", "verify_s"} <= set(next(p.step for p in pieces if p.step))
    stream.close()
    result = pair.generate(prompt_for(*case), max_tokens=24, ignore_eos=True, mode="llmcad", pipeline=True)
    assert result.tokens == ar_tokens[case]


def _tree(probs: list[float]) -> TokenTree:
    """A chain root -> 1 -> 2 ... with these draft probabilities."""
    tree = TokenTree(0, 16)
    for i, p in enumerate(probs):
        tree.add(i, i + 1, p)
    return tree


def test_confidence_fallback_verifies_sooner_after_early_rejections_and_later_after_full_acceptance():
    policy = ConfidenceFallback(TreeLimits(), threshold=0.02, rate=0.5, relax=0.5)
    tree = _tree([0.9, 0.5, 0.4, 0.3])  # cumulative 0.9, 0.45, 0.18, 0.054
    assert not policy.should_verify(tree, [4], [])  # 0.054 >= 0.02
    policy.observe(tree, [0, 1], verify_s=1.0)  # node 2 (confidence 0.45) rejected: move toward it
    assert policy.threshold == pytest.approx(math.exp((math.log(0.02) + math.log(0.45)) / 2))  # 0.095
    assert policy.should_verify(tree, [4], [])  # 0.054 is now below the threshold
    raised = policy.threshold
    policy.observe(tree, [0, 1, 2, 3, 4], verify_s=1.0)  # all accepted: draft longer next time
    assert policy.threshold == pytest.approx(raised * 0.5)


def test_cost_fallback_stops_when_drafting_costs_more_than_it_brings():
    limits = TreeLimits(max_nodes=32, max_depth=12, batch=4)
    tree = _tree([0.9, 0.8, 0.7])
    candidates = [(-math.log(0.9 * 0.8 * 0.7 * 0.6), 3, 0)]
    slow_target = CostFallback(limits)
    for other in (_tree([0.9] * 7), tree):  # two sizes, the same time: a tree's size costs nothing
        slow_target.observe(other, [0, 1, 2, 3], verify_s=1.0)
    slow_target.draft_pass(0.01)  # verification 100x a draft pass: keep drafting
    assert not slow_target.should_verify(tree, [3], candidates)
    slow_draft = CostFallback(limits)
    for other in (_tree([0.9] * 7), tree):
        slow_draft.observe(other, [0, 1, 2, 3], verify_s=0.01)
    slow_draft.draft_pass(1.0)  # a draft pass 100x a verification: verify now
    assert slow_draft.should_verify(tree, [3], candidates)
    assert slow_target.acceptance(0.75) > 0.7  # accepted nodes pull their bin up


def test_cost_fallback_prices_compute_as_a_roofline_through_the_sizes_seen():
    policy = CostFallback(TreeLimits(max_nodes=32))
    policy.observe(_tree([0.5] * 15), [0], verify_s=0.8)  # 16 rows
    assert policy.verify_s(32) == pytest.approx(1.6)  # one size seen: in proportion to rows (twice the size is not free)
    assert policy.verify_s(4) == pytest.approx(0.2)
    policy.observe(_tree([0.5]), [0], verify_s=0.3)  # 2 rows: bound by memory, dearer a row than 16
    assert policy.verify_s(2) == pytest.approx(0.3)  # a size seen: its own
    assert policy.verify_s(4) == pytest.approx(0.3)  # no cheaper than a smaller pass seen
    assert policy.verify_s(8) == pytest.approx(0.4)  # nor than its rows at the cheapest rate seen, 0.05 s
    assert policy.verify_s(32) == pytest.approx(1.6)


def test_cost_fallback_prices_a_chain_by_the_nodes_it_adds_not_a_full_batch():
    limits = TreeLimits(max_nodes=32, max_depth=12, batch=8)
    tree = _tree([0.95, 0.95, 0.95])
    policy = CostFallback(limits)
    for nodes in (4, 12):  # 50 ms a pass and 10 ms a row
        policy.observe(_tree([0.95] * (nodes - 1)), list(range(nodes)), verify_s=0.05 + 0.01 * nodes)
    policy.draft_pass(0.01)
    # the chain's next pass adds one node (worth ~0.8 accepted tokens for 20 ms); eight would
    # cost 90 ms and stop it
    assert not policy.should_verify(tree, [3], [])


def test_cost_fallback_prices_a_streamed_verification_as_the_longer_of_its_reads_and_compute():
    policy = CostFallback(TreeLimits(max_nodes=32))
    for nodes in (3, 6, 9, 12, 15):  # reads take 1.2 s a pass; compute 0.1 s + 0.06 s a node; 0.05 s of waits
        compute = 0.1 + 0.06 * nodes
        policy.observe(_tree([0.5] * (nodes - 1)), [0], verify_s=max(1.2, compute) + 0.05, compute_s=compute, read_s=1.2)
    assert policy.verify_s(4) == pytest.approx(1.25)  # the reads hide the compute: a bigger tree costs nothing more
    assert policy.verify_s(15) == pytest.approx(1.25)
    assert policy.verify_s(40) == pytest.approx(1.0 / 15 * 40 + 0.05)  # compute outlasts the reads (40 rows at 15's rate)
    resident = CostFallback(TreeLimits(max_nodes=32))
    for nodes in (3, 15):
        resident.observe(_tree([0.5] * (nodes - 1)), [0], verify_s=0.1 + 0.06 * nodes)
    assert resident.verify_s(40) == pytest.approx(1.0 / 15 * 40)  # no reads: the compute alone


def test_unknown_fallback_is_a_clear_error(pair):
    with pytest.raises(LlmcadError, match="unknown fallback policy"):
        pair.generate("abc", max_tokens=2, mode="llmcad", fallback="sometimes")
