"""Turning logits into tokens: greedy, or temperature / top-k / top-p sampling.

`probabilities` is the one definition of the sampling distribution, so a draft and a
target that apply the same settings sample from distributions built the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmcad.errors import LlmcadError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise LlmcadError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LlmcadError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LlmcadError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution to sample from, over the last dimension of `logits`."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def seeded_generator(seed: int | None) -> torch.Generator:
    """A random generator seeded with `seed`, or from the OS when it is None."""
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else torch.seed())
    return generator


class Sampler:
    """Picks the next token from a [vocab] logits vector; seeded, so runs reproduce."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = seeded_generator(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.params.greedy:
            return int(logits.argmax())
        probs = probabilities(logits, self.params)
        return int(torch.multinomial(probs, 1, generator=self.generator))
