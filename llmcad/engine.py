"""The public Python API: load a model once, then generate, stream or chat."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from llmcad.errors import LlmcadError
from llmcad.generate import Generation, GenerationStats, Piece, autoregressive, stream_text
from llmcad.hub import DEFAULT_TARGET, resolve_model
from llmcad.model import KVCache, Transformer
from llmcad.sampling import Sampler, SamplingParams
from llmcad.tokenizer import Tokenizer
from llmcad.weights import Checkpoint, load_model, open_checkpoint

DEFAULT_PRECISION = "int8"
DEFAULT_MAX_CONTEXT = 4096


class Engine:
    """A loaded model ready to generate. One generation runs at a time; a second caller
    waits for the first to finish (generations are serialized, never interleaved)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, checkpoint: Checkpoint, precision: str, max_context: int):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise LlmcadError(
                f"{checkpoint.path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
            )
        self.model, self.tokenizer, self.checkpoint = model, tokenizer, checkpoint
        self.precision = precision
        self.max_context = max_context
        self.cache = KVCache(model.config, max_context)
        self.lock = threading.Lock()

    @classmethod
    def load(
        cls,
        target: str | os.PathLike = DEFAULT_TARGET,
        *,
        precision: str = DEFAULT_PRECISION,
        max_context: int = DEFAULT_MAX_CONTEXT,
        progress: bool = True,
    ) -> Engine:
        """Load `target` (a GGUF file, a Hugging Face folder, or a default alias, fetched on
        first use) in `precision` ("fp32" or "int8")."""
        checkpoint = open_checkpoint(resolve_model(target, progress=progress))
        tokenizer = checkpoint.tokenizer
        start = time.perf_counter()
        model = load_model(checkpoint, precision, progress=progress)
        engine = cls(model, tokenizer, checkpoint, precision, min(max_context, checkpoint.config.max_position_embeddings))
        engine.load_s = time.perf_counter() - start
        return engine

    @property
    def name(self) -> str:
        return Path(self.checkpoint.path).name

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        ignore_eos: bool = False,
    ) -> Iterator[Piece]:
        """Yield the continuation of `prompt` (text, or token ids) piece by piece; the last
        piece has the finish reason and the stats."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, seed))
        self._check_lengths(len(ids), max_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop)
        return self._stream(ids, sampler, max_tokens, stops, ignore_eos)

    def _stream(self, ids: list[int], sampler: Sampler, max_tokens: int, stop: list[str], ignore_eos: bool) -> Iterator[Piece]:
        with self.lock:
            stats = GenerationStats(prompt_tokens=len(ids), extra={"mode": "ar", "precision": self.precision})
            tokens = autoregressive(self.model, self.cache, ids, sampler)
            yield from stream_text(tokens, self.tokenizer, stats, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos)

    def generate(self, prompt: str | Sequence[int], **options) -> Generation:
        """Generate to completion; takes the same options as `stream`."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        pieces = list(self.stream(ids, **options))
        final = pieces[-1]
        return Generation(
            text="".join(p.text for p in pieces),
            tokens=[t for p in pieces for t in p.token_ids],
            prompt_tokens=ids,
            finish_reason=final.finish_reason,
            stats=final.stats,
        )

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` in the model's chat template, ready for the assistant's turn."""
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)

    def chat(self, messages: list[dict], **options) -> Generation:
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) with the chat template."""
        return self.generate(self.chat_prompt(messages), **options)

    def _check_lengths(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens == 0:
            raise LlmcadError("the prompt is empty")
        if max_tokens < 1:
            raise LlmcadError(f"max_tokens must be at least 1, got {max_tokens}")
        if prompt_tokens + max_tokens > self.max_context:
            raise LlmcadError(
                f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context window "
                f"({self.max_context} tokens)"
            )
