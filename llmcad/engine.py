"""The public Python API: load a model once, then generate, stream or chat."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from llmcad.budget import MemoryPlan, activation_bytes, parse_size, plan_memory
from llmcad.errors import LlmcadError
from llmcad.generate import Generation, GenerationStats, Piece, autoregressive, stream_text
from llmcad.hub import DEFAULT_TARGET, resolve_model
from llmcad.model import ROW_CHUNK, KVCache, Transformer
from llmcad.sampling import Sampler, SamplingParams
from llmcad.speculative import SpeculativeDecoder, TreeLimits
from llmcad.store import LayerStore, ensure_store
from llmcad.streaming import StreamedTransformer
from llmcad.tree import TokenTree
from llmcad.weights import Checkpoint, load_model, open_checkpoint

DEFAULT_PRECISION = "int8"
DEFAULT_MAX_CONTEXT = 4096
CONTEXTS_UNDER_BUDGET = (4096, 2048, 1024, 512)  # tried in turn when a budget is set and no context is
MODES = ("ar", "sd", "tree")
TREE_SLOTS = 64  # cache slots beyond the context reserved for a token tree under verification
DEFAULT_LIMITS = {"sd": TreeLimits.linear(4), "tree": TreeLimits()}


@dataclass
class Draft:
    model: Transformer
    checkpoint: Checkpoint
    cache: KVCache


class Engine:
    """A loaded target (streamed from its layer store under a memory plan) and an optional
    resident draft, ready to generate. One generation runs at a time; a second caller waits
    for the first to finish (generations are serialized)."""

    def __init__(
        self,
        model: StreamedTransformer,
        store: LayerStore,
        max_context: int,
        draft: Draft | None = None,
        mode: str | None = None,
    ):
        tokenizer = store.tokenizer
        if tokenizer.vocab_size > model.config.vocab_size:
            raise LlmcadError(
                f"{store.path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
            )
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.precision = store.precision
        self.plan: MemoryPlan = model.plan
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
        precision: str = DEFAULT_PRECISION,
        draft_precision: str = DEFAULT_PRECISION,
        max_context: int | None = None,
        memory_budget: int | str | None = None,
        keep_page_cache: bool = False,
        progress: bool = True,
    ) -> Engine:
        """Load `target` (and `draft`): GGUF files, Hugging Face folders, layer stores or
        default aliases (fetched on first use). The target is converted once to a layer
        store in `precision` (cached under LLMCAD_HOME) and streamed from it; the draft is
        loaded resident. `mode` is the default decoding mode: "ar" (target alone), "sd"
        (linear draft) or "tree".

        `memory_budget` (bytes, or text such as "1.5GB") bounds the whole process: the
        engine keeps as much of the target resident as fits and streams the rest; None
        keeps everything resident. `max_context` defaults to 4096 tokens, or under a budget
        to the largest of 4096, 2048, 1024, 512 that fits. Pages read while streaming are
        dropped from the OS page cache unless `keep_page_cache`."""
        budget = None if memory_budget is None else parse_size(memory_budget)
        runtime = current_rss()
        store = open_store(target, precision, progress)
        config = store.config
        draft_state, draft_bytes, limit = None, 0, config.max_position_embeddings
        if draft is not None:
            draft_ckpt = open_checkpoint(resolve_model(draft, progress=progress))
            _check_same_vocabulary(store, draft_ckpt)
            draft_model = load_model(draft_ckpt, draft_precision, progress=progress)
            draft_bytes = _tensor_bytes(draft_model)
            limit = min(limit, draft_ckpt.config.max_position_embeddings)
            draft_state = Draft(draft_model, draft_ckpt, None)
        if max_context or budget is None:
            contexts = [min(max_context or DEFAULT_MAX_CONTEXT, limit)]
        else:
            contexts = sorted({min(c, limit) for c in CONTEXTS_UNDER_BUDGET}, reverse=True)
        models = [config] + ([draft_state.model.config] if draft_state else [])
        for context in contexts:
            try:
                plan = plan_memory(
                    config,
                    budget,
                    layer_bytes=store.layer_layout.nbytes,
                    head_bytes=store.head_layout.nbytes,
                    embed_bytes=store.embed_layout.nbytes,
                    runtime=runtime,
                    draft=draft_bytes,
                    kv_cache=sum(KVCache.bytes_for(c, context + TREE_SLOTS) for c in models),
                    activations=sum(activation_bytes(c, context + TREE_SLOTS, ROW_CHUNK, TREE_SLOTS) for c in models),
                )
                break
            except LlmcadError:
                if context == contexts[-1]:
                    raise
        if draft_state is not None:
            draft_state.cache = KVCache(draft_state.model.config, context + TREE_SLOTS)
        model = StreamedTransformer(store, plan, drop_page_cache=not keep_page_cache)
        if plan.bytes_per_pass and torch.get_num_threads() > 1:
            # The reader keeps a core busy copying pages; compute threads that share it with
            # the reader stall each other at every parallel barrier (measured on 2 cores:
            # 0.61 tok/s with 2 compute threads, 1.02 with 1).
            torch.set_num_threads(torch.get_num_threads() - 1)
        return cls(model, store, context, draft_state, mode)

    def close(self) -> None:
        """Stop the background reader (the engine cannot generate afterwards)."""
        self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self.store.name

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
            io_before = self.model.io.snapshot()
            if mode == "ar":
                decoder, tokens = None, autoregressive(self.model, self.cache, ids, Sampler(params))
            else:
                d = self.draft
                decoder = SpeculativeDecoder(self.model, self.cache, d.model, d.cache, limits, params, on_verify)
                tokens = decoder.generate(ids)
            for piece in stream_text(tokens, self.tokenizer, stats, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos):
                if piece.stats is not None:
                    piece.stats.extra.update(self.model.io.since(io_before))
                    if decoder is not None:
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


def open_store(target: str | os.PathLike, precision: str, progress: bool) -> LayerStore:
    """The layer store of `target`: a store folder as is, else a model converted (once, then cached)."""
    path = resolve_model(target, progress=progress)
    if (path / "manifest.json").is_file():
        return LayerStore.open(path, progress=progress)
    return ensure_store(open_checkpoint(path), precision, progress)


def current_rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor `module` holds (parameters, buffers and plain tensor attributes)."""
    tensors = {t.data_ptr(): t.nbytes for t in [*module.parameters(), *module.buffers()]}
    for m in module.modules():
        tensors.update((v.data_ptr(), v.nbytes) for v in vars(m).values() if isinstance(v, torch.Tensor))
    return sum(tensors.values())


def _check_same_vocabulary(target: LayerStore, draft: Checkpoint) -> None:
    """Speculation compares token ids, so both models must mean the same thing by each id."""
    problem = None
    if target.config.vocab_size != draft.config.vocab_size:
        problem = f"vocabulary sizes differ ({target.config.vocab_size} vs {draft.config.vocab_size})"
    elif target.tokenizer.backend.get_vocab(True) != draft.tokenizer.backend.get_vocab(True):
        problem = "their tokenizers map tokens to different ids"
    if problem:
        raise LlmcadError(f"draft {draft.path.name} cannot draft for target {target.name}: {problem}")
