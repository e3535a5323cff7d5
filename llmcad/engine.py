"""The public Python API: load a model once, then generate, stream or chat."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmcad.errors import LlmcadError
from llmcad.generate import Generation, GenerationStats, Piece, autoregressive, stream_text
from llmcad.hub import DEFAULT_TARGET, resolve_model
from llmcad.model import KVCache, Transformer
from llmcad.sampling import Sampler, SamplingParams
from llmcad.speculative import SpeculativeDecoder, TreeLimits
from llmcad.tokenizer import Tokenizer
from llmcad.tree import TokenTree
from llmcad.weights import Checkpoint, load_model, open_checkpoint

DEFAULT_PRECISION = "int8"
DEFAULT_MAX_CONTEXT = 4096
MODES = ("ar", "sd", "tree")
TREE_SLOTS = 256  # cache slots beyond the context reserved for a token tree under verification
DEFAULT_LIMITS = {"sd": TreeLimits.linear(4), "tree": TreeLimits()}


@dataclass
class Draft:
    model: Transformer
    checkpoint: Checkpoint
    cache: KVCache


class Engine:
    """A loaded target (and optional draft) ready to generate. One generation runs at a time;
    a second caller waits for the first to finish (generations are serialized)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        checkpoint: Checkpoint,
        precision: str,
        max_context: int,
        draft: Draft | None = None,
        mode: str | None = None,
    ):
        if tokenizer.vocab_size > model.config.vocab_size:
            raise LlmcadError(
                f"{checkpoint.path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
            )
        self.model, self.tokenizer, self.checkpoint = model, tokenizer, checkpoint
        self.precision = precision
        self.max_context = max_context
        self.cache = KVCache(model.config, max_context + TREE_SLOTS)
        self.draft = draft
        self.mode = mode or ("tree" if draft else "ar")
        self._check_mode(self.mode)
        self.lock = threading.Lock()

    @classmethod
    def load(
        cls,
        target: str | os.PathLike = DEFAULT_TARGET,
        *,
        draft: str | os.PathLike | None = None,
        mode: str | None = None,
        precision: str | None = None,
        draft_precision: str = "int8",
        max_context: int = DEFAULT_MAX_CONTEXT,
        progress: bool = True,
    ) -> Engine:
        """Load `target` (and `draft`): GGUF files, Hugging Face folders or default aliases
        (fetched on first use). `mode` is the default decoding mode: "ar" (target alone),
        "sd" (linear draft) or "tree".

        `precision` is the target's: "int8" by default when it runs alone, "fp32" when it
        verifies a draft. int8 quantizes activations per call over all rows at once, so a
        row's result depends on the other rows in the pass: a verified tree can then differ
        from the target's own one-token-at-a-time output. fp32 keeps speculation lossless."""
        precision = precision or ("fp32" if draft is not None else DEFAULT_PRECISION)
        checkpoint = open_checkpoint(resolve_model(target, progress=progress))
        tokenizer = checkpoint.tokenizer
        max_context = min(max_context, checkpoint.config.max_position_embeddings)
        draft_state = None
        if draft is not None:
            draft_ckpt = open_checkpoint(resolve_model(draft, progress=progress))
            _check_same_vocabulary(checkpoint, draft_ckpt)
            draft_model = load_model(draft_ckpt, draft_precision, progress=progress)
            max_context = min(max_context, draft_ckpt.config.max_position_embeddings)
            draft_state = Draft(draft_model, draft_ckpt, KVCache(draft_model.config, max_context + TREE_SLOTS))
        model = load_model(checkpoint, precision, progress=progress)
        return cls(model, tokenizer, checkpoint, precision, max_context, draft_state, mode)

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
        mode: str | None = None,
        limits: TreeLimits | None = None,
        on_verify: Callable[[TokenTree, list[int]], None] | None = None,
    ) -> Iterator[Piece]:
        """Yield the continuation of `prompt` (text, or token ids) piece by piece; the last
        piece has the finish reason and the stats. `mode` and the tree `limits` override the
        engine's defaults for this call; `on_verify(tree, accepted_path)` sees every tree."""
        ids = self._ids(prompt)
        params = SamplingParams(temperature, top_k, top_p, seed)
        mode = mode or self.mode
        self._check_mode(mode)
        limits = limits or DEFAULT_LIMITS.get(mode)
        if limits is not None and limits.max_nodes >= TREE_SLOTS:
            raise LlmcadError(f"a token tree holds at most {TREE_SLOTS - 1} drafted nodes, asked for {limits.max_nodes}")
        self._check_lengths(len(ids), max_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop)
        return self._stream(ids, params, mode, limits, on_verify, max_tokens, stops, ignore_eos)

    def _stream(self, ids, params, mode, limits, on_verify, max_tokens, stop, ignore_eos) -> Iterator[Piece]:
        with self.lock:
            stats = GenerationStats(prompt_tokens=len(ids), extra={"mode": mode, "precision": self.precision})
            if mode == "ar":
                decoder, tokens = None, autoregressive(self.model, self.cache, ids, Sampler(params))
            else:
                d = self.draft
                decoder = SpeculativeDecoder(self.model, self.cache, d.model, d.cache, limits, params, on_verify)
                tokens = decoder.generate(ids)
            for piece in stream_text(tokens, self.tokenizer, stats, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos):
                if piece.stats is not None and decoder is not None:
                    piece.stats.extra.update(decoder.stats.summary())
                yield piece

    def generate(self, prompt: str | Sequence[int], **options) -> Generation:
        """Generate to completion; takes the same options as `stream`."""
        ids = self._ids(prompt)
        pieces = list(self.stream(ids, **options))
        final = pieces[-1]
        return Generation(
            text="".join(p.text for p in pieces),
            tokens=[t for p in pieces for t in p.token_ids],
            prompt_tokens=ids,
            finish_reason=final.finish_reason,
            stats=final.stats,
        )

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` in the model's chat template, ready for the assistant's turn."""
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)

    def chat(self, messages: list[dict], **options) -> Generation:
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) with the chat template."""
        return self.generate(self.chat_prompt(messages), **options)

    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise LlmcadError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
        if mode != "ar" and self.draft is None:
            raise LlmcadError(f"mode {mode!r} needs a draft model (--draft)")

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


def _check_same_vocabulary(target: Checkpoint, draft: Checkpoint) -> None:
    """Speculation compares token ids, so both models must mean the same thing by each id."""
    problem = None
    if target.config.vocab_size != draft.config.vocab_size:
        problem = f"vocabulary sizes differ ({target.config.vocab_size} vs {draft.config.vocab_size})"
    elif target.tokenizer.backend.get_vocab(True) != draft.tokenizer.backend.get_vocab(True):
        problem = "their tokenizers map tokens to different ids"
    if problem:
        raise LlmcadError(f"draft {draft.path.name} cannot draft for target {target.path.name}: {problem}")
