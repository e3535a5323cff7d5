"""Fallback policies: when the draft stops growing a token tree and hands it to the target.

The decoder grows a tree best-first, one draft pass per batch of nodes, and asks its policy
before every further draft pass; after each verification it tells the policy what the
target accepted and how long things took. `TreeLimits` stay hard caps for every policy.

- `fixed`: grow to the caps (max nodes, max depth), the token-tree mode.
- `llmcad`: LLMCad's rule. The tree's cumulative confidence is the cumulative draft
  probability (product along the path) of the best node just added; growth is best-first,
  so every node still to come is less likely than it. Verify once it drops below the
  threshold t. After a verification, let P be the last accepted node:
    - P has drafted children (drafting ran past the first rejection): move t toward the
      confidence c of P's most likely child, in log space: log t += rate * (log c - log t);
    - P is a leaf (everything drafted on that path was accepted): t *= relax (draft longer).
  t stays within [1e-4, 0.9]. rate = 1 (t jumps to c) and relax = 0.9 by measurement
  (bench/confidence.py, q4 pair at 1000 MB): slower adaptation lets t sink to its floor
  and trees grow to the cap, which the target's compute cannot afford.
- `cost`: ours. Keep drafting while one more draft pass raises the expected accepted tokens
  per second of the whole step (drafting plus verification). Expected accepted tokens are
  the sum over nodes of the probability that the target accepts the node's path, from an
  online calibration of draft probability against observed acceptance; times are measured:
  a draft pass (moving average) and a verification. A streamed target reads its layers
  while it computes, so a verification takes the longer of its reads (the median read time
  of recent passes: the streaming layer's own timings) and its compute, plus the median of
  what neither explains. Compute is priced as a roofline: a size seen by the median of its
  recent passes; another size at least as dear as the dearest smaller size seen (a pass of
  few rows streams the weights from memory, and more rows up to a point cost little more)
  and at least its rows at the cheapest cost per row seen (past that point the rows'
  arithmetic decides). The next pass is
  priced by the nodes it would add (a chain adds one), not a full batch. Under a tight
  budget the reads dominate and a bigger tree costs only its drafting, up to the size whose
  compute outlasts the reads (with the q4 pair at 1000 MB on code, about 15 nodes); a
  resident target's verification is its compute.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from llmcad.tree import TokenTree

FALLBACKS = ("fixed", "llmcad", "cost")


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


class Fallback:
    """The `fixed` policy, and the interface of the others: grow to the caps."""

    name = "fixed"

    def __init__(self, limits: TreeLimits):
        self.limits = limits

    def draft_pass(self, seconds: float) -> None:
        """A draft pass of the current tree took `seconds`."""

    def should_verify(self, tree: TokenTree, batch: list[int], candidates: list[tuple[float, int, int]]) -> bool:
        """Stop growing before the next draft pass? `batch` holds the nodes just added;
        `candidates` are the open child slots as (-cumulative log-prob, node, slot)."""
        return False

    def observe(self, tree: TokenTree, path: list[int], verify_s: float, compute_s: float | None = None, read_s: float = 0.0) -> None:
        """The target accepted `path` (root first) of `tree` in a pass of `verify_s` seconds,
        `compute_s` of them computing (None: all) while its reads took `read_s`."""

    def state(self) -> dict:
        """Figures worth reporting per step."""
        return {}


class ConfidenceFallback(Fallback):
    name = "llmcad"

    def __init__(self, limits: TreeLimits, threshold: float = 0.02, rate: float = 1.0, relax: float = 0.9):
        super().__init__(limits)
        self.threshold, self.rate, self.relax = threshold, rate, relax

    def should_verify(self, tree, batch, candidates) -> bool:
        return math.exp(max(float(tree.logp[n]) for n in batch)) < self.threshold

    def observe(self, tree, path, verify_s, compute_s=None, read_s=0.0) -> None:
        last = path[-1]
        if tree.children[last]:
            confidence = max(math.exp(float(tree.logp[c])) for c in tree.children[last])
            log_t = math.log(self.threshold)
            self.threshold = math.exp(log_t + self.rate * (math.log(max(confidence, 1e-30)) - log_t))
        else:
            self.threshold *= self.relax
        self.threshold = min(0.9, max(1e-4, self.threshold))

    def state(self) -> dict:
        return {"threshold": self.threshold}


class CostFallback(Fallback):
    name = "cost"
    BUCKETS = 10  # calibration bins over the draft probability of a node given its parent
    PRIOR = 4.0  # pseudo-observations at "acceptance = draft probability" per bin
    FIRST_TREE = 16  # drafted nodes of the first tree, before anything is measured

    def __init__(self, limits: TreeLimits):
        super().__init__(limits)
        self.offered = [0.0] * self.BUCKETS
        self.accepted = [0.0] * self.BUCKETS
        self.draft_s: float | None = None  # moving average of one draft pass
        self.tree_draft_s = 0.0  # drafting time of the tree being grown
        self.verifications: deque[tuple[int, float, float, float]] = deque(maxlen=64)  # (tree nodes, seconds, compute, reads)

    def _bucket(self, q: float) -> int:
        return min(self.BUCKETS - 1, int(q * self.BUCKETS))

    def acceptance(self, q: float) -> float:
        """Calibrated probability that the target accepts a node drafted with probability q,
        given that it accepted the node's parent."""
        b = self._bucket(q)
        return (self.accepted[b] + self.PRIOR * q) / (self.offered[b] + self.PRIOR)

    def compute_s(self, nodes: int) -> float:
        """Predicted compute seconds of a verification of a tree of `nodes` nodes (rows): a
        roofline through the sizes seen (see the module's docstring)."""
        seen: dict[int, list[float]] = {}
        for size, _, compute, _ in self.verifications:
            seen.setdefault(size, []).append(compute)
        cost = {size: statistics.median(times) for size, times in seen.items()}
        if nodes in cost:
            return cost[nodes]
        # Below the smallest size seen this is proportional to rows. That understates a small
        # pass (its memory-bound part), which is the point: "a smaller tree costs as much" let
        # the trees after the first grow to its size for free (chat: 19 and 30 nodes against
        # 2-3), and a line through the sizes seen priced 3-4 rows as dear as rows of a big
        # tree (2026-12-03, AVX2: the second and third rows cost ~2 ms, rows past four ~15).
        per_row = min(c / n for n, c in cost.items())
        below = max((c for n, c in cost.items() if n < nodes), default=0.0)
        return max(below, per_row * nodes)

    def verify_s(self, nodes: int) -> float:
        """Predicted seconds of a verification of a tree of `nodes` nodes."""
        read = statistics.median(v[3] for v in self.verifications)
        unexplained = statistics.median(max(0.0, s - max(c, r)) for _, s, c, r in self.verifications)
        return max(read, self.compute_s(nodes)) + unexplained

    def draft_pass(self, seconds: float) -> None:
        self.tree_draft_s += seconds
        self.draft_s = seconds if self.draft_s is None else 0.8 * self.draft_s + 0.2 * seconds

    def _reach(self, tree: TokenTree) -> list[float]:
        """Probability that the target accepts each node's whole path, for nodes 0..size."""
        reach = [1.0] * tree.size
        for i in range(1, tree.size):
            reach[i] = reach[int(tree.parents[i])] * self.acceptance(float(tree.probs[i]))
        return reach

    def should_verify(self, tree, batch, candidates) -> bool:
        if not self.verifications or self.draft_s is None:
            # nothing measured yet: a middling tree (one at the caps, 63 nodes, took a q4
            # target 2.9 s, and the cost fit extrapolated from it priced every larger tree high)
            return tree.size > self.FIRST_TREE
        reach = self._reach(tree)
        expected = sum(reach[1:])
        elapsed = self.tree_draft_s + self.verify_s(tree.size)
        rate_now = (expected + 1) / elapsed
        # what the next pass could add: open slots, plus the just-drafted nodes' best children
        gains = [reach[node] * self.acceptance(math.exp(-neg - float(tree.logp[node]))) for neg, node, _ in candidates]
        gains += [reach[node] * self.acceptance(0.9) for node in batch if tree.depths[node] < self.limits.max_depth]
        # the next batch adds about one node per gain counted here (a chain: one; a drafted
        # node that opens several slots adds more, their cost and gain both left out)
        added = min(self.limits.batch, tree.capacity - tree.size, len(gains))
        gain = sum(sorted(gains, reverse=True)[:added])
        cost = self.draft_s + self.verify_s(tree.size + added) - self.verify_s(tree.size)
        return (expected + gain + 1) / (elapsed + cost) <= rate_now

    def observe(self, tree, path, verify_s, compute_s=None, read_s=0.0) -> None:
        on_path = set(path)
        for node in path:
            for child in tree.children[node]:
                b = self._bucket(float(tree.probs[child]))
                self.offered[b] += 1
                self.accepted[b] += child in on_path
        self.verifications.append((tree.size, verify_s, verify_s if compute_s is None else compute_s, read_s))
        self.tree_draft_s = 0.0

    def state(self) -> dict:
        return {"expected_verify_s": round(self.verify_s(1), 4)} if self.verifications else {}


def make_fallback(name: str, limits: TreeLimits) -> Fallback:
    policies = {"fixed": Fallback, "llmcad": ConfidenceFallback, "cost": CostFallback}
    return policies[name](limits)
