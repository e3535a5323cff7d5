"""The token tree: flat tensors whose node order doubles as KV-cache slot order.

Node 0 is the root: the last committed token, which neither model has run yet. Node i > 0 is
a drafted token, run at rotary position `prefix + depth[i]` in cache slot `prefix + i`, where
`prefix` is the number of committed tokens before the root. `mask[i, j]` is True when node j
is node i itself or one of its ancestors: exactly the tree part of node i's attention mask.
"""

from __future__ import annotations

import math

import torch


class TokenTree:
    def __init__(self, root_token: int, capacity: int):
        self.capacity = capacity
        self.tokens = torch.zeros(capacity, dtype=torch.long)
        self.parents = torch.full((capacity,), -1, dtype=torch.long)
        self.depths = torch.zeros(capacity, dtype=torch.long)
        self.probs = torch.ones(capacity)  # draft probability of the token given its parent
        self.logp = torch.zeros(capacity)  # cumulative draft log-probability from the root
        self.mask = torch.zeros(capacity, capacity, dtype=torch.bool)
        self.children: list[list[int]] = [[] for _ in range(capacity)]  # in drafting order
        self.tokens[0] = root_token
        self.mask[0, 0] = True
        self.size = 1

    def add(self, parent: int, token: int, prob: float) -> int:
        i = self.size
        if i >= self.capacity:
            raise IndexError("token tree is full")
        self.tokens[i], self.parents[i], self.probs[i] = token, parent, prob
        self.depths[i] = self.depths[parent] + 1
        self.logp[i] = self.logp[parent] + math.log(max(prob, 1e-30))
        self.mask[i] = self.mask[parent]
        self.mask[i, i] = True
        self.children[parent].append(i)
        self.size += 1
        return i

    def child_with_token(self, node: int, token: int) -> int | None:
        return next((c for c in self.children[node] if self.tokens[c] == token), None)

    def grown(self, capacity: int) -> TokenTree:
        """A copy of this tree with room for `capacity` nodes."""
        tree = TokenTree(int(self.tokens[0]), capacity)
        for i in range(1, self.size):
            tree.add(int(self.parents[i]), int(self.tokens[i]), float(self.probs[i]))
        return tree

    def subtree(self, node: int, capacity: int) -> tuple[TokenTree, list[int]]:
        """The nodes below `node` as a tree rooted at it, and the old number of each new node.
        Nodes keep their order, so every node's children stay in drafting order."""
        tree, old = TokenTree(int(self.tokens[node]), capacity), [node]
        new = {node: 0}
        for i in range(node + 1, self.size):
            parent = int(self.parents[i])
            if parent in new:
                new[i] = tree.add(new[parent], int(self.tokens[i]), float(self.probs[i]))
                old.append(i)
        return tree, old

    def path(self, node: int) -> list[int]:
        """Nodes from the root down to `node`."""
        out = [node]
        while out[-1] != 0:
            out.append(int(self.parents[out[-1]]))
        return out[::-1]

    def attention_mask(self, prefix: int, rows: slice) -> torch.Tensor:
        """Mask for running nodes `rows` over `prefix` committed slots plus the tree so far."""
        rows_mask = self.mask[rows, : rows.stop]
        return torch.cat((torch.ones(rows_mask.shape[0], prefix, dtype=torch.bool), rows_mask), dim=1)

    def render(self, decode, accepted: list[int] = ()) -> str:
        """The tree as indented text, one node per line; accepted nodes marked with *."""
        lines = []

        def visit(node: int, indent: str) -> None:
            mark = "*" if node in accepted else " "
            prob = f"{float(self.probs[node]):.2f}" if node else "root"
            lines.append(f"{indent}{mark} {decode([int(self.tokens[node])])!r} ({prob})")
            for child in self.children[node]:
                visit(child, indent + "  ")

        visit(0, "")
        return "\n".join(lines)
