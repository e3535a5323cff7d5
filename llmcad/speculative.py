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
When to stop growing is the fallback policy's call (llmcad/fallback.py).

Pipeline (`extend_passes` > 0): while the target verifies a tree, a background thread
lets the draft grow a copy of it on, best-first as before, for a fixed number of draft
passes (the first runs the nodes added last, which the target checks but the draft had not
run). The target's next root is its own token after the accepted path; if the draft grew a
child with that token below the path's last node, the subtree under that child is kept: it
becomes the next tree, already drafted, and the next growth goes on from its open slots.
Otherwise it is dropped. The thread is joined before anything is committed and the number
of passes is fixed, so runs are reproducible; greedy output is the same with and without
it. Kept subtrees stay lossless when sampling: their nodes are draws from the draft made
without the target's randomness, each node's children in drawing order.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from llmcad.fallback import Fallback
from llmcad.model import KVCache, Transformer
from llmcad.sampling import SamplingParams, probabilities, seeded_generator
from llmcad.timeline import TIMELINE
from llmcad.tree import TokenTree


@dataclass
class SpeculationStats:
    accepted: list[int] = field(default_factory=list)  # drafted tokens accepted, per verification
    tree_nodes: list[int] = field(default_factory=list)  # drafted nodes, per verification
    draft_passes: int = 0
    carried: list[int] = field(default_factory=list)  # per tree: nodes (root included) drafted during the last verification
    steps: list[dict] = field(default_factory=list)  # per verification: sizes and timings

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
            "extensions_kept": sum(1 for c in self.carried if c),
            "carried_nodes": sum(self.carried) / max(1, len(self.carried)),
        }


class _Slots:
    """A drafted node's draft distribution q and the child slots it offers. Greedy keeps
    only the top tokens; sampling keeps q (fp16: a tree of 64 nodes holds 64 vocabulary-sized
    rows) and the tokens drawn so far. The proposal is q exactly as stored, renormalized."""

    def __init__(self, probs: torch.Tensor, limits, keep_q: bool):
        self.q = probs.half() if keep_q else None
        self.drawn: list[int] = []
        top = probs.topk(max(1, limits.width))
        self.top_probs, self.top_tokens = top.values.tolist(), top.indices.tolist()
        self.count = 1 + sum(0 < p and p >= limits.branch_threshold for p in self.top_probs[1:])

    def proposal(self) -> torch.Tensor:
        q = self.q.float()
        return q / q.sum()

    def draw(self, j: int, generator: torch.Generator | None) -> tuple[int, float]:
        """Child slot j's token and its draft probability: the j-th most likely (greedy) or
        a draw from q without replacement (sampling)."""
        if self.q is None:
            return self.top_tokens[j], self.top_probs[j]
        q = self.proposal()
        remaining = q.clone()
        remaining[self.drawn] = 0.0
        token = int(torch.multinomial(remaining, 1, generator=generator))
        self.drawn.append(token)
        return token, float(q[token])


class SpeculativeDecoder:
    """Yields the target's tokens for a prompt, several per target pass."""

    def __init__(
        self,
        target: Transformer,
        target_cache: KVCache,
        draft: Transformer,
        draft_cache: KVCache,
        fallback: Fallback,
        params: SamplingParams,
        on_verify: Callable[[TokenTree, list[int]], None] | None = None,
        extend_passes: int = 0,
    ):
        self.target, self.target_cache = target, target_cache
        self.draft, self.draft_cache = draft, draft_cache
        self.fallback, self.limits, self.params = fallback, fallback.limits, params
        self.on_verify = on_verify
        self.extend_passes = extend_passes
        # room for the extension: kept subtrees must fit the next tree
        self.extend_room = min(extend_passes * self.limits.batch, self.limits.max_nodes)
        self.generator = seeded_generator(params.seed)
        self.extend_generator = seeded_generator(None if params.seed is None else params.seed + 1)
        # greedy drafting ranks tokens by the draft's plain softmax
        self.draft_params = SamplingParams(1.0) if params.greedy else params
        self.stats = SpeculationStats()

    def generate(self, prompt: Sequence[int]) -> Generator[int, None, None]:
        committed = list(prompt)
        # the last prompt token is the first tree's root; what the caches hold of the rest is kept
        target_len, draft_len = self.target_cache.keep_prefix(committed), self.draft_cache.keep_prefix(committed)
        with ThreadPoolExecutor(1, thread_name_prefix="llmcad-draft") as background:
            # prefill both caches up to the root; with the pipeline the draft's runs beside the
            # target's (the tree's own draft passes are what the fallback policy times)
            draft_prefill, prefill_draft = None, draft_len < len(committed) - 1
            if prefill_draft:
                args = (torch.tensor(committed[draft_len:-1]), torch.arange(draft_len, len(committed) - 1), self.draft_cache, draft_len, None, True)
                if self.extend_passes:
                    draft_prefill = background.submit(self.draft, *args)
                else:
                    self.draft(*args)
            if target_len < len(committed) - 1:
                rest = committed[target_len:-1]
                self.target(torch.tensor(rest), torch.arange(target_len, len(committed) - 1), self.target_cache, target_len, last_only=True)
                self.target_cache.tokens = committed[:-1]
            if draft_prefill is not None:
                draft_prefill.result()
            if prefill_draft:
                draft_len = len(committed) - 1
                self.draft_cache.tokens = committed[:-1]
            carried: tuple[TokenTree, dict[int, _Slots]] | None = None
            while True:
                prefix = len(committed) - 1
                self.stats.carried.append(carried[0].size if carried else 0)
                tree, slots, heap, drafted_upto = self._grow(committed, draft_len, carried)
                extension = background.submit(self._extend, tree, slots, heap, prefix, drafted_upto) if self.extend_passes else None
                started = time.perf_counter()
                io_before = self.target.io.snapshot() if hasattr(self.target, "io") else None
                path, bonus = self._verify(tree, slots, prefix)
                verify_s = time.perf_counter() - started
                accepted = path[1:]
                io = self.target.io.since(io_before) if io_before is not None else None
                timings = (io["compute_s"], io["io_s"]) if io else ()  # a resident target: all compute
                self.fallback.observe(tree, path, verify_s, *timings)
                self._record(tree, accepted, verify_s, io)
                if self.on_verify:
                    self.on_verify(tree, path)
                # keep only the accepted path's keys/values, moved into place behind the root
                self.target_cache.move(torch.tensor([prefix + i for i in accepted], dtype=torch.long), prefix + 1)
                carried = None
                if extension is not None:
                    grown, grown_slots = extension.result()
                    drafted_upto = grown.size  # the extension ran every node it holds
                    child = grown.child_with_token(path[-1], bonus)
                    if child is not None:  # the draft already went down the target's own next token
                        next_tree, olds = grown.subtree(child, self.limits.max_nodes + 1)
                        carried = next_tree, {new: grown_slots[old] for new, old in enumerate(olds)}
                in_draft = [prefix + i for i in accepted if i < drafted_upto]  # a prefix of the path
                draft_len = prefix + 1 + len(in_draft)
                if carried is not None:  # the next root, and the subtree below it, follow the path
                    in_draft += [prefix + old for old in olds]
                    draft_len += 1
                self.draft_cache.move(torch.tensor(in_draft, dtype=torch.long), prefix + 1)
                new = [int(tree.tokens[i]) for i in accepted] + [bonus]
                committed += new
                self.target_cache.tokens, self.draft_cache.tokens = committed[:-1], committed[:draft_len]
                yield from new

    def _run_draft(self, tokens: torch.Tensor, positions: torch.Tensor, start: int, mask: torch.Tensor | None, last_only: bool = True, background: bool = False) -> torch.Tensor:
        """One draft pass; those in the foreground inform the fallback policy."""
        started = time.perf_counter()
        logits = self.draft(tokens, positions, self.draft_cache, start, mask, last_only=last_only)
        self.stats.draft_passes += 1
        TIMELINE.add("draft, in the background" if background else "draft", started)
        if not background:
            self.fallback.draft_pass(time.perf_counter() - started)
        return logits

    def _grow(self, committed: list[int], draft_len: int, carried: tuple[TokenTree, dict[int, _Slots]] | None):
        """Draft a tree rooted at the last committed token, or grow on the one `carried` over
        from the last verification. Returns the tree, the draft distribution at every node
        that was run, the open child slots, and the first node the draft did not run."""
        limits, prefix = self.limits, len(committed) - 1
        heap: list[tuple[float, int, int]] = []
        if carried is not None:  # drafted during the last verification: every node was run
            tree, slots = carried
            for node in range(tree.size):
                self._offer(heap, tree, slots, node, len(tree.children[node]))
        else:
            tree = TokenTree(committed[-1], limits.max_nodes + 1)
            catch_up = committed[draft_len:]  # committed tokens the draft has not seen, root last
            logits = self._run_draft(torch.tensor(catch_up), torch.arange(draft_len, prefix + 1), draft_len, None)
            slots = {0: self._slots(logits[-1])}
            self._offer(heap, tree, slots, 0, 0)
        drafted_upto = tree.size
        while batch := self._add_batch(tree, slots, heap, self.generator):
            if tree.size >= tree.capacity or all(tree.depths[c] >= limits.max_depth for c in batch):
                break
            if self.fallback.should_verify(tree, batch, heap):
                break
            self._run_batch(tree, slots, heap, prefix, batch)
            drafted_upto = tree.size
        return tree, slots, heap, drafted_upto

    def _extend(self, tree: TokenTree, slots: dict[int, _Slots], heap: list, prefix: int, drafted_upto: int):
        """Grow a copy of `tree` on for `extend_passes` draft passes, while the target
        verifies `tree` (runs in the background). Returns the copy, every node of it run."""
        grown, slots, heap = tree.grown(tree.capacity + self.extend_room), dict(slots), list(heap)
        batch = list(range(drafted_upto, tree.size))  # added last: checked by the target, not yet run
        for _ in range(self.extend_passes):
            batch = batch or self._add_batch(grown, slots, heap, self.extend_generator)
            if not batch:
                break
            self._run_batch(grown, slots, heap, prefix, batch, background=True)
            batch = []
        return grown, slots

    def _add_batch(self, tree: TokenTree, slots: dict[int, _Slots], heap: list, generator) -> list[int]:
        """Add the best open slots (up to a batch) to `tree`; returns the new nodes."""
        batch = []
        while heap and len(batch) < self.limits.batch and tree.size < tree.capacity:
            _, node, j = heapq.heappop(heap)
            token, prob = slots[node].draw(j, generator)
            batch.append(tree.add(node, token, prob))
            self._offer(heap, tree, slots, node, j + 1)
        return batch

    def _run_batch(self, tree: TokenTree, slots: dict[int, _Slots], heap: list, prefix: int, batch: list[int], background: bool = False) -> None:
        """One draft pass over `batch` (consecutive nodes), opening their child slots."""
        rows = slice(batch[0], batch[-1] + 1)
        mask = tree.attention_mask(prefix, rows)
        logits = self._run_draft(tree.tokens[rows], prefix + tree.depths[rows], prefix + rows.start, mask, last_only=False, background=background)
        for row, node in enumerate(batch):
            slots[node] = self._slots(logits[row])
            self._offer(heap, tree, slots, node, 0)

    def _slots(self, logits: torch.Tensor) -> _Slots:
        return _Slots(probabilities(logits, self.draft_params), self.limits, keep_q=not self.params.greedy)

    def _record(self, tree: TokenTree, accepted: list[int], verify_s: float, io: dict | None) -> None:
        self.stats.accepted.append(len(accepted))
        self.stats.tree_nodes.append(tree.size - 1)
        step = {"accepted": len(accepted), "tree_nodes": tree.size - 1, "verify_s": verify_s, **self.fallback.state()}
        if io is not None:
            step["io_wait_share"] = io["io_wait_s"] / verify_s if verify_s else 0.0
        self.stats.steps.append(step)

    def _offer(self, heap: list, tree: TokenTree, slots: dict[int, _Slots], node: int, j: int) -> None:
        s = slots[node]
        if j < s.count and tree.depths[node] < self.limits.max_depth:
            score = float(tree.logp[node]) + math.log(max(s.top_probs[j], 1e-30))
            heapq.heappush(heap, (-score, node, j))

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
        q = s.proposal()
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
