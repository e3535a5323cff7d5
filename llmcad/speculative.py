"""Speculative decoding with a token tree: the draft grows a tree, the target checks every
node in one forward pass, and only what the target itself would have produced is kept.

Growth is best-first on cumulative draft confidence. Each drafted node offers child slots:
slot 0 (its most likely token) always, slot j > 0 while the j-th most likely token's
probability clears `branch_threshold`, up to `width` slots. A slot's score is the node's
cumulative log-probability plus the log of that j-th probability; the best `batch` slots are
drafted, then run through the draft together (one pass, tree mask) to open their own slots.

Acceptance is lossless:
- greedy: follow the target's argmax down the tree while a child carries it, then add the
  target's own next token;
- sampling: at each node the children are draws without replacement from the draft's
  distribution q, tested in drawing order: accept child x with probability min(1, p(x)/q(x));
  on rejection p <- normalize(max(p - q, 0)) and x is removed from q (renormalized); if none
  is accepted, sample from what is left of p (Sequoia's rule for trees; SpecInfer's
  multi-step speculative sampling, without replacement). The number of children is fixed
  by q before any is drawn, so the target distribution is preserved.

A linear draft of k tokens (Leviathan et al. 2023) is the same machinery with width 1.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch

from llmcad.model import KVCache, Transformer
from llmcad.sampling import SamplingParams, probabilities, seeded_generator
from llmcad.tree import TokenTree


@dataclass(frozen=True)
class TreeLimits:
    max_nodes: int = 16  # drafted nodes per verification (the root not counted)
    max_depth: int = 8
    width: int = 4  # children per node at most
    branch_threshold: float = 0.1  # a non-top token opens a branch at this draft probability
    batch: int = 4  # nodes drafted per draft forward pass

    @staticmethod
    def linear(k: int) -> TreeLimits:
        """A single chain of k drafted tokens."""
        return TreeLimits(max_nodes=k, max_depth=k, width=1, branch_threshold=1.0, batch=1)


@dataclass
class SpeculationStats:
    accepted: list[int] = field(default_factory=list)  # drafted tokens accepted, per verification
    tree_nodes: list[int] = field(default_factory=list)  # drafted nodes, per verification
    draft_passes: int = 0

    def summary(self) -> dict:
        n = max(1, len(self.accepted))
        return {
            "verifications": len(self.accepted),
            "accepted_per_verification": sum(self.accepted) / n,
            "tokens_per_verification": (sum(self.accepted) + len(self.accepted)) / n,
            "accepted_histogram": dict(sorted(Counter(self.accepted).items())),
            "draft_tokens": sum(self.tree_nodes),
            "draft_passes": self.draft_passes,
            "tree_nodes": sum(self.tree_nodes) / n,
        }


class _Slots:
    """A drafted node's draft distribution and the child slots it offers."""

    def __init__(self, q: torch.Tensor, limits: TreeLimits):
        self.q = q
        self.remaining = q.clone()  # for draws without replacement
        top = q.topk(max(1, limits.width))
        self.top_probs, self.top_tokens = top.values.tolist(), top.indices.tolist()
        self.count = 1 + sum(0 < p and p >= limits.branch_threshold for p in self.top_probs[1:])


class SpeculativeDecoder:
    """Yields the target's tokens for a prompt, several per target pass."""

    def __init__(
        self,
        target: Transformer,
        target_cache: KVCache,
        draft: Transformer,
        draft_cache: KVCache,
        limits: TreeLimits,
        params: SamplingParams,
        on_verify: Callable[[TokenTree, list[int]], None] | None = None,
    ):
        self.target, self.target_cache = target, target_cache
        self.draft, self.draft_cache = draft, draft_cache
        self.limits, self.params = limits, params
        self.on_verify = on_verify
        self.generator = seeded_generator(params.seed)
        # greedy drafting ranks tokens by the draft's plain softmax
        self.draft_params = SamplingParams(1.0) if params.greedy else params
        self.stats = SpeculationStats()

    def generate(self, prompt: Sequence[int]) -> Generator[int, None, None]:
        committed = list(prompt)
        if len(committed) > 1:  # the last prompt token is the first tree's root
            self.target(torch.tensor(committed[:-1]), torch.arange(len(committed) - 1), self.target_cache, 0, last_only=True)
        draft_len = 0  # committed tokens whose keys/values the draft cache holds
        while True:
            prefix = len(committed) - 1
            tree, slots, drafted_upto = self._grow(committed, draft_len)
            path, bonus = self._verify(tree, slots, prefix)
            accepted = path[1:]
            self.stats.accepted.append(len(accepted))
            self.stats.tree_nodes.append(tree.size - 1)
            if self.on_verify:
                self.on_verify(tree, path)
            # keep only the accepted path's keys/values, moved into place behind the root
            self.target_cache.move(torch.tensor([prefix + i for i in accepted], dtype=torch.long), prefix + 1)
            in_draft = [i for i in accepted if i < drafted_upto]  # a prefix of the path
            self.draft_cache.move(torch.tensor([prefix + i for i in in_draft], dtype=torch.long), prefix + 1)
            draft_len = prefix + 1 + len(in_draft)
            new = [int(tree.tokens[i]) for i in accepted] + [bonus]
            committed += new
            yield from new

    def _grow(self, committed: list[int], draft_len: int) -> tuple[TokenTree, dict[int, _Slots], int]:
        """Draft a tree rooted at the last committed token. Returns the tree, the draft
        distribution at every node that was run, and the first node the draft did not run."""
        limits, prefix = self.limits, len(committed) - 1
        tree = TokenTree(committed[-1], limits.max_nodes + 1)
        catch_up = committed[draft_len:]  # committed tokens the draft has not seen, root last
        logits = self.draft(torch.tensor(catch_up), torch.arange(draft_len, prefix + 1), self.draft_cache, draft_len, last_only=True)
        self.stats.draft_passes += 1
        slots = {0: _Slots(probabilities(logits[-1], self.draft_params), limits)}
        heap: list[tuple[float, int, int]] = []
        self._offer(heap, tree, slots, 0, 0)
        drafted_upto = 1
        while heap and tree.size < tree.capacity:
            batch = []
            while heap and len(batch) < limits.batch and tree.size < tree.capacity:
                _, node, j = heapq.heappop(heap)
                token, prob = self._draw(slots[node], j)
                batch.append(tree.add(node, token, prob))
                self._offer(heap, tree, slots, node, j + 1)
            if tree.size >= tree.capacity or all(tree.depths[c] >= limits.max_depth for c in batch):
                break
            rows = slice(batch[0], batch[-1] + 1)
            logits = self.draft(
                tree.tokens[rows], prefix + tree.depths[rows], self.draft_cache, prefix + rows.start, tree.attention_mask(prefix, rows)
            )
            self.stats.draft_passes += 1
            drafted_upto = rows.stop
            for row, node in enumerate(batch):
                if tree.depths[node] < limits.max_depth:
                    slots[node] = _Slots(probabilities(logits[row], self.draft_params), limits)
                    self._offer(heap, tree, slots, node, 0)
        return tree, slots, drafted_upto

    @staticmethod
    def _offer(heap: list, tree: TokenTree, slots: dict[int, _Slots], node: int, j: int) -> None:
        s = slots[node]
        if j < s.count:
            score = float(tree.logp[node]) + math.log(max(s.top_probs[j], 1e-30))
            heapq.heappush(heap, (-score, node, j))

    def _draw(self, s: _Slots, j: int) -> tuple[int, float]:
        if self.params.greedy:
            return s.top_tokens[j], s.top_probs[j]
        token = int(torch.multinomial(s.remaining, 1, generator=self.generator))
        s.remaining[token] = 0.0
        return token, float(s.q[token])

    def _verify(self, tree: TokenTree, slots: dict[int, _Slots], prefix: int) -> tuple[list[int], int]:
        """One target pass over the whole tree; returns the accepted path (root first) and
        the target's own next token after it."""
        n = tree.size
        logits = self.target(
            tree.tokens[:n], prefix + tree.depths[:n], self.target_cache, prefix, tree.attention_mask(prefix, slice(0, n))
        )
        path = [0]
        if self.params.greedy:
            choice = logits.argmax(-1).tolist()
            while (child := tree.child_with_token(path[-1], choice[path[-1]])) is not None:
                path.append(child)
            return path, choice[path[-1]]
        while True:
            node = path[-1]
            p = probabilities(logits[node], self.params)
            child = self._accept_child(tree, node, p, slots.get(node))
            if isinstance(child, torch.Tensor):  # nothing accepted: sample the residual
                return path, int(torch.multinomial(child, 1, generator=self.generator))
            path.append(child)

    def _accept_child(self, tree: TokenTree, node: int, p: torch.Tensor, s: _Slots | None) -> int | torch.Tensor:
        """The accepted child of `node`, or the residual distribution to sample from."""
        if s is None or not tree.children[node]:
            return p
        q = s.q.clone()
        for child in tree.children[node]:
            x = int(tree.tokens[child])
            if float(torch.rand(1, generator=self.generator)) * float(q[x]) < float(p[x]):
                return child
            residual = (p - q).clamp_(min=0)
            if float(residual.sum()) <= 1e-12:  # p == q up to rounding: nothing left to correct
                return p
            p = residual / residual.sum()
            q[x] = 0.0
            if float(q.sum()) <= 0:
                break
            q /= q.sum()
        return p
