"""The public Python API: load a model once, then generate, stream or chat."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmcad import kernels
from llmcad.budget import MB, MemoryPlan, activation_bytes, auto_budget, parse_size, plan_memory, release_free_memory, return_large_blocks_at_once
from llmcad.config import ModelConfig
from llmcad.conversation import Conversation
from llmcad.errors import BudgetTooSmall, LlmcadError
from llmcad.generate import Generation, GenerationStats, Piece, autoregressive, stream_text
from llmcad.hub import DEFAULT_TARGET, paired_draft, resolve_model
from llmcad.model import ROW_CHUNK, KVCache, Transformer
from llmcad.quant import BLOCKS_OF, convert_submodule, vocab_precision
from llmcad.sampling import Sampler, SamplingParams
from llmcad.fallback import FALLBACKS, Fallback, TreeLimits, make_fallback
from llmcad.speculative import SpeculativeDecoder
from llmcad.store import LayerStore, ensure_store
from llmcad.streaming import StreamedTransformer
from llmcad.tokenizer import Tokenizer
from llmcad.tree import TokenTree
from llmcad.weights import Checkpoint, load_model, open_checkpoint

AUTO = "auto"  # a default chosen from the models, the machine and the memory plan (Engine.load)
# GGUF's own blocks on the native kernels where they were built; else PyTorch's int8
DEFAULT_PRECISION = "gguf" if kernels.available() else "int8"
DEFAULT_MAX_CONTEXT = 4096
CONTEXTS_UNDER_BUDGET = (4096, 2048, 1024, 512)  # tried in turn when a budget is set and no context is
MODES = ("ar", "sd", "tree", "llmcad")
TREE_SLOTS = 64  # cache slots past the context for a token tree
# under a budget: a 64-node tree's logits and keys would cost the q4 pair 40 MB (1.4 target
# layers), and its verification is compute-bound past 15-20 nodes on 2 cores anyway
TREE_SLOTS_UNDER_BUDGET = 32
EXTEND_PASSES = 3  # with the pipeline on: draft passes growing the tree on while the target verifies it
DRAFT_ROWS = 16  # most nodes in one draft pass (TreeLimits.batch)
DEFAULT_FALLBACK = "cost"  # the fastest by measurement (bench/e2e.py; docs/ARCHITECTURE.md)


def draft_precision_for(precision: str) -> str:
    """The draft's precision where none is given: the target's, but q4_0 beside a gguf target.
    A draft's precision changes speed, never output; in 4-bit blocks the default draft takes
    279 MB instead of its file's 393 MB (its Q8_0 head and Q5_0/Q6_K matrices requantized),
    memory a budget gives to target layers, and its passes read that much less, for the same
    tokens per verification (docs/ARCHITECTURE.md)."""
    return "q4_0" if precision == "gguf" else precision


def default_limits(mode: str, tree_slots: int) -> TreeLimits | None:
    """Tree caps per mode: `llmcad` grows up to the engine's tree slots and lets its
    fallback policy stop earlier."""
    return {
        "sd": TreeLimits.linear(4),
        "tree": TreeLimits(),
        "llmcad": TreeLimits(max_nodes=tree_slots - 1, max_depth=12, width=4, branch_threshold=0.1, batch=8),
    }.get(mode)


@dataclass
class Draft:
    model: Transformer
    cache: KVCache | None
    name: str
    precision: str


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
        tree_slots: int = TREE_SLOTS,
        fallback: str = DEFAULT_FALLBACK,
        budget_note: str | None = None,
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
        self.tree_slots = tree_slots
        self.cache = KVCache(model.config, max_context + tree_slots)
        self.draft = draft
        self.mode = mode or ("llmcad" if draft else "ar")
        self._check_mode(self.mode)
        self._check_fallback(fallback)
        # one policy per engine: what it learns (thresholds, costs) carries across generations
        self.fallback = fallback
        self._policies = {}
        self.lock = threading.Lock()
        # how the budget was chosen: "none", "given", or auto's account of it
        self.budget_note = budget_note or ("given" if self.plan.budget is not None else "none")
        self.draft_note: str | None = None  # why a default draft was left out

    @classmethod
    def load(
        cls,
        target: str | os.PathLike | LayerStore = DEFAULT_TARGET,
        *,
        draft: str | os.PathLike | None = AUTO,
        mode: str | None = None,
        precision: str = AUTO,
        draft_precision: str = AUTO,
        max_context: int | None = None,
        memory_budget: int | str | None = AUTO,
        keep_page_cache: bool = False,
        fallback: str = DEFAULT_FALLBACK,
        draft_vocab: int | None = None,
        progress: bool = True,
    ) -> Engine:
        """Load `target` (and `draft`): GGUF files, Hugging Face folders, layer stores (a
        folder, or a `LayerStore` already opened) or default aliases (fetched on first use).
        The target is converted once to a layer store in `precision` (cached under
        LLMCAD_HOME) and streamed from it; the draft is loaded resident. `mode` is the
        default decoding mode: "ar" (target alone), "sd" (linear draft), "tree" (fixed tree
        limits) or "llmcad" (tree grown until the `fallback` policy, "fixed", "llmcad" or
        "cost", says verify). The default is "llmcad" with a draft, else "ar".

        Defaults ("auto"): the draft paired with a target alias (`hub.PAIRS`; None: no
        draft), left out where `mode` asks for no speculation and the budget holds the
        target but not the pair, or holds the target whole but the pair only by streaming it
        (`draft_note` says why); precision gguf where the native kernels
        built, else int8, or q4 when the budget cannot hold int8 (the draft's:
        `draft_precision_for`); the memory budget the
        memory available to this process (`budget.auto_budget`: MemAvailable or its memory
        cgroup's limit, less a headroom), so that the target streams where it does not fit
        and is wholly resident where it does.

        `memory_budget` (bytes, or text such as "1.5GB") bounds the whole process: the
        engine keeps as much of the target resident as fits and streams the rest; None
        keeps everything resident, unplanned. `max_context` defaults to 4096 tokens, or
        under a budget to the largest of 4096, 2048, 1024, 512 that fits (tree slots: 64
        where everything is resident, else 32). Every token of context costs KV cache and
        activation memory that a budget would otherwise spend on resident layers (the q4
        pair at 2000 MB keeps 13 of 28 layers with 4096 tokens, 27 with 512), so a caller
        who knows its job's length should pass it. Streamed layers are read past the OS
        page cache (O_DIRECT, or dropped from it after use) unless `keep_page_cache`. With
        `draft_vocab` the draft proposes only the first `draft_vocab` token ids and the
        special tokens (see `draft_head_ids`)."""
        # a paired draft the budget cannot hold beside the target is left out (the target
        # alone still runs); one asked for by name, or a speculative mode, is refused instead
        drafts = [paired_draft(target)] if draft == AUTO else [draft]
        if draft == AUTO and drafts[0] is not None and mode in (None, "ar"):
            drafts.append(None)
        if precision == AUTO and isinstance(target, LayerStore):
            precision = target.precision  # a store is computed in its own precision
        options = dict(mode=mode, max_context=max_context, memory_budget=memory_budget,
                       keep_page_cache=keep_page_cache, fallback=fallback, draft_vocab=draft_vocab, progress=progress)
        if precision != AUTO:
            candidates = [precision]
        elif kernels.available():
            candidates = [DEFAULT_PRECISION]
        else:  # no native kernels: PyTorch's int8 is faster than its 4-bit kernel, and twice the size
            candidates = ["int8", "q4"]
        attempts = [(d, p) for d in drafts for p in candidates]
        pair_minimum = None
        for i, (d, p) in enumerate(attempts):
            try:
                engine = cls._load(target, draft=d, precision=p, draft_precision=draft_precision_for(p) if draft_precision == AUTO else draft_precision,
                                   draft_optional=d is not None and draft == AUTO and mode is None, **options)
            except BudgetTooSmall as e:
                if i == len(attempts) - 1:
                    raise
                if d is not None:
                    pair_minimum = e.minimum if pair_minimum is None else min(pair_minimum, e.minimum)
                continue  # the next is tried once this attempt's frames (a loaded draft) are gone
            if d is None and drafts[0] is not None:
                engine.draft_note = f"draft {Path(str(drafts[0])).name} left out: the pair needs {pair_minimum / MB:.0f} MB"
            return engine

    @classmethod
    def _load(cls, target, *, draft, mode, precision, draft_precision, max_context, memory_budget, keep_page_cache, fallback, draft_vocab, progress,
              draft_optional: bool = False) -> Engine:
        native = {precision, draft_precision if draft is not None else None} & set(BLOCKS_OF)
        if native and not kernels.available():
            raise LlmcadError(f"precision {' and '.join(sorted(native))} needs the native kernels: {kernels.unavailable_reason()}")
        if memory_budget is not None:
            return_large_blocks_at_once()
        store = open_store(target, precision, progress)
        store.tokenizer  # loaded before the runtime is measured: it is part of it
        config = store.config
        if memory_budget is not None:
            for p in {store.precision, draft_precision} if draft is not None else {store.precision}:
                map_kernels(config, p)
            release_free_memory()
        runtime = current_rss()  # interpreter, libraries, tokenizer and the kernels' code
        if memory_budget == AUTO:
            budget, budget_note = auto_budget(runtime)
        else:
            budget, budget_note = (None, "none") if memory_budget is None else (parse_size(memory_budget), "given")
        draft_state, draft_bytes, limit = None, 0, config.max_position_embeddings
        if draft is not None:
            before = current_rss()
            draft_ckpt = open_checkpoint(resolve_model(draft, progress=progress))
            problem = vocabulary_mismatch(config, store.tokenizer, draft_ckpt)
            if problem:
                raise LlmcadError(f"draft {draft_ckpt.path.name} cannot draft for target {store.name}: {problem}")
            head_ids = draft_head_ids(store.tokenizer, draft_ckpt.config.vocab_size, draft_vocab)
            draft_model = load_model(draft_ckpt, draft_precision, progress=progress, embedding_on_demand=True, head_ids=head_ids, logits_width=config.vocab_size)
            limit = min(limit, draft_ckpt.config.max_position_embeddings)
            draft_state = Draft(draft_model, None, draft_ckpt.path.name, draft_precision)
            del draft_ckpt  # its metadata (vocabulary strings) is not needed any more
            release_free_memory()
            # what loading really cost (allocator leftovers included), not less than the tensors
            draft_bytes = max(_tensor_bytes(draft_model), current_rss() - before)
        if max_context or budget is None:
            contexts = [min(max_context or DEFAULT_MAX_CONTEXT, limit)]
        else:
            contexts = sorted({min(c, limit) for c in CONTEXTS_UNDER_BUDGET}, reverse=True)
        models = [store] + ([draft_state.model] if draft_state else [])

        def plan_for(context: int, slots: int, pair: bool = True) -> MemoryPlan:
            paired = pair and draft_state is not None
            return plan_memory(
                config,
                budget,
                layer_bytes=store.layer_bytes,
                head_bytes=store.head_layout.nbytes,
                embed_bytes=store.embed_layout.nbytes,
                runtime=runtime,
                draft=draft_bytes if paired else 0,
                # the draft's cache also holds what it grows while the target verifies
                kv_cache=sum(KVCache.bytes_for(c.config, context + slots * (1 + i)) for i, c in enumerate(models[: 1 + paired])),
                activations=sum(
                    # logits: a tree's rows (the target alone: one), a draft pass's rows
                    activation_bytes(c.config, context + slots, ROW_CHUNK, rows) for c, rows in zip(models[: 1 + paired], (slots if paired else 1, DRAFT_ROWS))
                )
                + (slots * config.vocab_size * 2 if paired else 0),  # a sampled tree's draft distributions (fp16)
            )

        def whole_with_big_trees(context: int, pair: bool = True) -> MemoryPlan | None:
            try:
                plan = plan_for(context, TREE_SLOTS, pair)
            except BudgetTooSmall:
                return None
            return plan if plan.bytes_per_pass == 0 else None

        for context in contexts:
            try:
                plan, slots = whole_with_big_trees(context), TREE_SLOTS
                if plan is None:  # streamed: smaller trees leave more memory to resident layers
                    plan, slots = plan_for(context, TREE_SLOTS_UNDER_BUDGET), TREE_SLOTS_UNDER_BUDGET
                break
            except BudgetTooSmall as e:
                if context == contexts[-1]:
                    small = {"q4", *BLOCKS_OF}  # the 4-bit precisions (gguf: a Q4_K_M file's 4-6-bit blocks)
                    smallest = store.precision in small and (draft is None or draft_precision in small)
                    hint = "" if smallest else ", or store the models in 4-bit blocks (--precision gguf --draft-precision q4_0)"
                    raise BudgetTooSmall(f"{e}{hint}" + (f" ({budget_note})" if budget_note.startswith("auto") else ""), e.minimum) from None
        note = None
        if draft_optional and plan.bytes_per_pass and (alone := whole_with_big_trees(context, pair=False)):
            # The pair would stream what the target alone holds: each verification would read
            # plan.bytes_per_pass (~270 MB, the draft's size, at the budgets where this happens:
            # ~0.3 s at this project's disk speeds), which pays only past ~8 tokens a
            # verification against the resident target's ~40 ms a token (measured at 1600 MB:
            # the pair 21 tokens/s on code and 11 on chat, the target alone 26 resident).
            note = f"draft {draft_state.name} left out: the target alone fits in memory, the pair would read {plan.bytes_per_pass / MB:.0f} MB a pass"
            draft_state = draft_model = None
            models = models[:1]
            release_free_memory()
            plan, slots = alone, TREE_SLOTS
        if draft_state is not None:
            draft_state.cache = KVCache(draft_state.model.config, context + 2 * slots)
        model = StreamedTransformer(store, plan, drop_page_cache=not keep_page_cache)
        engine = cls(model, store, context, draft_state, mode, slots, fallback, budget_note)
        engine.draft_note = note
        return engine

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

    def setup(self) -> dict:
        """What was chosen: models, precisions, mode, budget (JSON-ready)."""
        return {
            "target": self.name,
            "precision": self.precision,
            "draft": self.draft.name if self.draft else None,
            "draft_precision": self.draft.precision if self.draft else None,
            "draft_note": self.draft_note,
            "mode": self.mode,
            "fallback": self.fallback if self.mode == "llmcad" else None,
            "memory_budget": self.plan.budget,
            "budget_source": self.budget_note,
            "max_context": self.max_context,
        }

    def describe(self) -> str:
        """The setup and the memory plan in two lines."""
        plan, draft = self.plan, self.draft
        models = f"{self.name} ({self.precision})" + (f" + draft {draft.name} ({draft.precision})" if draft else f", no draft{f' ({self.draft_note})' if self.draft_note else ''}")
        mode = self.mode + (f" (fallback {self.fallback})" if self.mode == "llmcad" else "")
        budget = "no budget" if plan.budget is None else f"budget {plan.budget / MB:.0f} MB ({self.budget_note})"
        if plan.bytes_per_pass:
            head = ", head" if plan.head_resident else ""
            where = f"target streamed, {plan.bytes_per_pass / MB:.0f} MB a pass ({len(plan.resident_layers)}/{plan.num_layers} layers{head} resident)"
        else:
            where = "target wholly resident"
        return f"llmcad: {models}, mode {mode}\n  {budget}, planned {plan.total / MB:.0f} MB: {where}; context {self.max_context} tokens"

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
        fallback: str | Fallback | None = None,
        pipeline: bool = False,
        on_verify: Callable[[TokenTree, list[int]], None] | None = None,
        cache_prompt: bool = True,
    ) -> Iterator[Piece]:
        """Yield the continuation of `prompt` (text, or token ids) piece by piece; the last
        piece has the finish reason and the stats, and the first piece after each
        verification its `step` figures (tokens accepted, tree size, verification seconds,
        share of it waiting on IO). `mode`, the tree `limits` and the `fallback` policy
        override the engine's defaults for this call; `fallback` may also be a policy object
        (`llmcad.fallback`), used with its own limits and kept by the caller between calls.
        `pipeline` (mode llmcad) lets the draft keep drafting during verification (off by
        default: on 2 cores it takes the CPU the target's compute needs; see
        docs/ARCHITECTURE.md).
        `on_verify(tree, accepted_path)` sees every tree. With `cache_prompt` (the default)
        a prompt that begins with tokens the caches already hold (the last prompt and its
        answer, as in a conversation) prefills only the rest; the output is the same either
        way. The stats' `prompt_tokens_reused` says how many were kept."""
        ids = self._ids(prompt)
        params = SamplingParams(temperature, top_k, top_p, seed)
        mode = mode or self.mode
        self._check_mode(mode)
        fallback = fallback or (self.fallback if mode == "llmcad" else "fixed")
        if isinstance(fallback, Fallback):
            limits = fallback.limits  # a caller's policy decides within its own limits
        else:
            self._check_fallback(fallback)
            limits = limits or default_limits(mode, self.tree_slots)
        if mode == "ar":
            limits = None
        if limits is not None and limits.max_nodes >= self.tree_slots:
            raise LlmcadError(f"a token tree holds at most {self.tree_slots - 1} drafted nodes here, asked for {limits.max_nodes}")
        if limits is not None and not 1 <= limits.batch <= DRAFT_ROWS:
            raise LlmcadError(f"a draft pass takes 1 to {DRAFT_ROWS} tree nodes, asked for {limits.batch}")
        extend_passes = EXTEND_PASSES if pipeline and limits is not None else 0
        self._check_lengths(len(ids), max_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop)
        policy = None
        if isinstance(fallback, Fallback) and limits is not None:
            policy = fallback
        elif limits is not None:
            if (fallback, limits) not in self._policies:
                self._policies[fallback, limits] = make_fallback(fallback, limits)
            policy = self._policies[fallback, limits]
        return self._stream(ids, params, mode, policy, extend_passes, on_verify, max_tokens, stops, ignore_eos, cache_prompt)

    def _stream(self, ids, params, mode, policy, extend_passes, on_verify, max_tokens, stop, ignore_eos, cache_prompt) -> Iterator[Piece]:
        with self.lock:
            if not cache_prompt:
                self.forget_prompts()
            extra = {"mode": mode, "precision": self.precision, "prompt_tokens_reused": self.cache.keep_prefix(ids)}
            if policy is not None:
                extra.update(fallback=policy.name, extend_passes=extend_passes)
            stats = GenerationStats(prompt_tokens=len(ids), extra=extra)
            io_before = self.model.io.snapshot()
            if mode == "ar":
                decoder, tokens = None, autoregressive(self.model, self.cache, ids, Sampler(params))
            else:
                d = self.draft
                decoder = SpeculativeDecoder(self.model, self.cache, d.model, d.cache, policy, params, on_verify, extend_passes)
                tokens = decoder.generate(ids)
            steps_seen = 0
            for piece in stream_text(tokens, self.tokenizer, stats, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos):
                if decoder is not None and len(decoder.stats.steps) > steps_seen:
                    steps_seen = len(decoder.stats.steps)
                    piece.step = decoder.stats.steps[-1]
                if piece.stats is not None:
                    piece.stats.extra.update(self.model.io.since(io_before))
                    if decoder is not None:
                        piece.stats.extra.update(decoder.stats.summary())
                yield piece

    def forget_prompts(self) -> None:
        """Empty the prompt cache: the next generation prefills its whole prompt."""
        for cache in (self.cache, self.draft and self.draft.cache):
            if cache is not None:
                cache.tokens.clear()

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
        return self.tokenizer.encode_chat(messages)

    def chat(self, messages: list[dict], **options) -> Generation:
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) with the chat template."""
        return self.generate(self.chat_prompt(messages), **options)

    def conversation(self, system: str | None = None, messages: list[dict] | None = None) -> Conversation:
        """A multi-turn conversation with this engine (see `llmcad.conversation`)."""
        return Conversation(self, system, messages)

    @staticmethod
    def _check_fallback(fallback: str) -> None:
        if fallback not in FALLBACKS:
            raise LlmcadError(f"unknown fallback policy {fallback!r} (choose from {', '.join(FALLBACKS)})")

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


def open_store(target: str | os.PathLike | LayerStore, precision: str, progress: bool) -> LayerStore:
    """The layer store of `target`: a store (or store folder) as is, else a model converted
    (once, then cached; the model is read only to convert it)."""
    if isinstance(target, LayerStore):
        return target
    path = resolve_model(target, progress=progress)
    if (path / "manifest.json").is_file():
        return LayerStore.open(path, progress=progress)
    return ensure_store(path, precision, progress)


def map_kernels(config: ModelConfig, precision: str) -> None:
    """Run a one-layer miniature of `config` in `precision` (decode, prefill) once, so that
    the compute kernels' code is mapped into memory before the runtime is measured.
    Otherwise those pages arrive during generation, outside the plan: about 45 MB of
    libtorch in a fresh virtual environment, which put a run 13 MB over its budget."""
    small = dataclasses.replace(
        config, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
        rope_scaling=None,  # per-pair factors sized for the real head_dim would not fit
    )
    model = Transformer(small)
    for name, _ in list(model.named_modules()):
        convert_submodule(model, name, vocab_precision(precision) if name == "lm_head" else precision)
    cache = KVCache(small, 48)
    for n in (40, 1):
        model(torch.zeros(n, dtype=torch.long), torch.arange(n), cache, 0)


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


def draft_head_ids(tokenizer: Tokenizer, vocab_size: int, count: int | None) -> list[int] | None:
    """The tokens a draft proposes from: ids below `count` and the special tokens (None: all).

    A byte-level BPE vocabulary numbers its tokens in merge order, and early merges are the
    frequent ones, so the low ids cover most of what models write (FR-Spec, Zhao et al.
    2025, with corpus frequencies instead). A token outside them is never proposed, only
    ever the target's own. For the default q4 draft, 32768 of Qwen2.5's 151,936 tokens
    cut the draft from 344 to 242 MB and a draft pass from 60 to 43 ms at one row (144 to
    102 at eight), but tokens per verification fell by 3-22% (tree mode, six prompts), and
    under 1000 MB the run was slower (docs/ARCHITECTURE.md): not on by default."""
    if count is None or count >= vocab_size:
        return None
    if count < 1:
        raise LlmcadError(f"the draft vocabulary needs at least 1 token, asked for {count}")
    special = set(tokenizer.backend.get_added_tokens_decoder()) | tokenizer.eos_token_ids
    return sorted(set(range(count)) | {i for i in special if i < vocab_size})


def vocabulary_mismatch(config: ModelConfig, tokenizer: Tokenizer, draft: Checkpoint) -> str | None:
    """Why `draft` cannot draft for a target of this config and tokenizer (None: it can).

    Speculation compares token ids, so the draft must mean by every id it can propose what
    the target means by it. It can propose the ids below both models' vocabulary rows (the
    matrices are often padded past the tokenizer: 151,936 rows against 152,064 in one
    family); for those the token strings must be equal (an id neither tokenizer has is
    padding in both), compared as lists (the GGUF's token array or tokenizer.json), without
    building the draft's tokenizer. (Where the row counts differ, the draft is loaded with
    the target's logits width: `load_model(logits_width=...)`.)"""
    rows = min(config.vocab_size, draft.config.vocab_size)
    theirs = draft.token_strings()[:rows]
    theirs += [None] * (rows - len(theirs))
    ours = tokenizer.token_strings(rows)
    if ours == theirs:
        return None
    i = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    return f"their tokenizers differ at id {i} (target {ours[i]!r}, draft {theirs[i]!r})"
