"""Generation: the decode loop, and turning its tokens into a text stream that honours
EOS, stop strings and max_tokens and never splits a multi-byte character."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from llmcad.model import KVCache, Transformer
from llmcad.sampling import Sampler
from llmcad.tokenizer import Tokenizer


def autoregressive(model: Transformer, cache: KVCache, prompt: Sequence[int], sampler: Sampler) -> Iterator[int]:
    """Target-only decoding: prefill the prompt (past what `cache` already holds of it),
    then one forward pass per new token."""
    start, n = cache.keep_prefix(prompt), len(prompt)
    logits = model(torch.tensor(prompt[start:]), torch.arange(start, n), cache, start, last_only=True)
    cache.tokens = list(prompt)
    while True:
        token = sampler(logits[-1])
        yield token
        logits = model(torch.tensor([token]), torch.tensor([n]), cache, n)
        cache.tokens.append(token)
        n += 1


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # prompt in, first token out
    decode_s: float = 0.0  # every later token
    peak_rss_mb: float = 0.0
    extra: dict[str, float | int | str] = field(default_factory=dict)  # mode-specific figures

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding (the first comes from prefill)."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s and self.new_tokens > 1 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        extra = out.pop("extra")
        out.update(prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in {**out, **extra}.items()}


@dataclass
class Piece:
    """One step of a stream: new text (possibly empty) and the token ids behind it.
    The last piece carries `finish_reason` ("stop" or "length") and the final stats."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    step: dict | None = None  # speculative modes: the verification that produced this piece


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


class StopStrings:
    """Holds back text that might be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.hit = self.pending[: min(hits)], "", True
            return out, True
        keep = max((_overlap(self.pending, s) for s in self.stops), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


def stream_text(
    tokens: Generator[int, None, None],
    tokenizer: Tokenizer,
    stats: GenerationStats,
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
) -> Iterator[Piece]:
    """Detokenize `tokens` incrementally until EOS, a stop string or `max_tokens`,
    filling in `stats` (new tokens and timings) as it goes."""
    decoder = tokenizer.stream_decoder()
    stops = StopStrings(stop)
    start = time.perf_counter()
    first_token_at = None
    finish, end_ids = "length", []
    try:
        for token in tokens:
            now = time.perf_counter()
            if first_token_at is None:
                first_token_at = now
                stats.prefill_s = now - start
            stats.new_tokens += 1
            stats.decode_s = now - first_token_at
            if token in tokenizer.eos_token_ids and not ignore_eos:
                finish, end_ids = "stop", [token]
                break
            text, hit = stops.push(decoder.add(token))
            yield Piece(text, [token])
            if hit:
                finish = "stop"
                break
            if stats.new_tokens >= max_tokens:
                break
    finally:
        tokens.close()
    text = ""
    if not stops.hit:
        text, hit = stops.push(decoder.flush())
        finish = "stop" if hit else finish
        text += stops.flush()
    stats.peak_rss_mb = peak_rss_mb()
    yield Piece(text, end_ids, finish, stats)


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB. On Linux this is VmHWM, which
    starts afresh at exec (ru_maxrss keeps the peak of the process that forked it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
