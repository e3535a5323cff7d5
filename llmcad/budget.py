"""The memory plan: how a budget is spent, decided once at start.

budget = runtime (measured: Python, PyTorch, tokenizer) + draft weights + KV caches
       + activations + headroom + resident target parts + two streaming buffers

Resident target parts are chosen greedily: the output head first (needed every pass, and
with tied embeddings it also serves embedding lookups), then as many layers as fit, spread
evenly across the depth so the reader has a resident layer's compute to catch up on. A
budget that holds everything needs no buffers; one that cannot hold the fixed costs plus
two buffers is refused with the minimum in the error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from dataclasses import dataclass
from pathlib import Path

from llmcad import kernels
from llmcad.config import ModelConfig
from llmcad.errors import BudgetTooSmall, LlmcadError

MB = 1 << 20
HEADROOM = 96 * MB  # allocator slack and kernels' first-use workspaces (held to by the cgroup test in tests/test_streaming.py)
UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": MB, "MB": MB, "G": 1 << 30, "GB": 1 << 30}


def parse_size(text: str | int) -> int:
    """Bytes in "1.5GB", "1000MB", "800M" or a plain number of bytes (binary units: 1 MB = 2^20 bytes)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?B?)\s*", str(text).upper())
    if not match:
        raise LlmcadError(f"cannot read memory size {text!r} (examples: 1.5GB, 1000MB)")
    return int(float(match.group(1)) * UNITS[match.group(2)])


AUTO_HEADROOM = 0.10  # of the memory available, left to the rest of the system by `--memory-budget auto`
CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_memory(rss: int, cgroup_root: Path = CGROUP_ROOT) -> tuple[int, str]:
    """Memory this process may use in all (`rss`: what it holds now), and where the figure
    comes from: MemAvailable plus `rss`, or the limit of the memory cgroup it runs in (cgroup
    v2 `memory.max` or v1 `memory.limit_in_bytes`, the tightest along its path) if smaller."""
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    best = (kib * 1024 + rss, "MemAvailable")
    limit = cgroup_memory_limit(cgroup_root)
    return min(best, (limit, "memory cgroup limit")) if limit is not None else best


def cgroup_memory_limit(root: Path = CGROUP_ROOT, membership: str | None = None) -> int | None:
    """The memory limit of this process's cgroup and its ancestors, in bytes (None: no
    limit). `membership` is the text of /proc/self/cgroup (read when None)."""
    if membership is None:
        with open("/proc/self/cgroup") as f:
            membership = f.read()
    limits = []
    for line in membership.splitlines():
        if line.count(":") >= 2:
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # v2: one unified hierarchy
                base, name = root, "memory.max"
            elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
                base, name = root / "memory", "memory.limit_in_bytes"
            else:
                continue
            folder = base / path.strip("/")
            while True:  # the limit that binds is the tightest on the way up to the root
                try:
                    text = (folder / name).read_text().strip()
                except OSError:
                    text = "max"
                if text.isdigit() and int(text) < 1 << 60:  # v1 writes "no limit" as a huge number
                    limits.append(int(text))
                if folder == base:
                    break
                folder = folder.parent
    return min(limits) if limits else None


def auto_budget(rss: int) -> tuple[int, str]:
    """The budget `--memory-budget auto` stands for, and one line saying how it was found."""
    available, source = available_memory(rss)
    budget = int(available * (1 - AUTO_HEADROOM))
    return budget, f"auto: {available / MB:.0f} MB available ({source}) less {AUTO_HEADROOM:.0%}"


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "mallopt") else None  # glibc only


def return_large_blocks_at_once() -> None:
    """Make glibc hand blocks of 1 MiB and more back to the OS when freed. By default its
    threshold grows to 32 MiB after the first large free, and freed activations and load-time
    temporaries then stay in the heap: loading the 0.5B draft left RSS 950 MB above its
    weights; with this, about 110 MB."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def activation_bytes(config: ModelConfig, max_len: int, rows: int, logit_rows: int) -> int:
    """An upper estimate of one pass's activations: up to `max_len` tokens, run through a
    layer `rows` at a time, then `logit_rows` rows of logits. The pass holds its hidden
    states, rotary tables and attention mask throughout; a layer's temporaries are freed
    before the head runs, so they and the logits count once, whichever is larger."""
    h, d, heads, kv = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads
    whole_pass = 4 * max_len * (h + 2 * d) + max_len * max_len  # fp32 hidden states, cos and sin; a bool mask
    per_layer = rows * (8 * h + 2 * (heads + 2 * kv) * d + 3 * config.intermediate_size)
    attention = 2 * heads * rows * max_len + 2 * kv * max_len * d  # float64 scores and probabilities, keys and values
    logits = 2 * logit_rows * config.vocab_size  # the head's int32 products and their fp32 result
    return whole_pass + 4 * max(per_layer + 2 * attention, logits)


@dataclass(frozen=True)
class MemoryPlan:
    budget: int | None
    runtime: int
    draft: int
    kv_cache: int
    activations: int
    layer_bytes: int
    head_bytes: int
    embed_bytes: int  # resident embedding, when not shared with a resident head
    num_layers: int
    resident_layers: tuple[int, ...]
    head_resident: bool
    embed_resident: bool
    buffer_bytes: int  # each of the two streaming buffers (0: nothing streamed)
    head_rows_per_chunk: int

    @property
    def streamed_layers(self) -> int:
        return self.num_layers - len(self.resident_layers)

    @property
    def resident_target(self) -> int:
        return len(self.resident_layers) * self.layer_bytes + self.head_bytes * self.head_resident + self.embed_bytes

    @property
    def bytes_per_pass(self) -> int:
        return self.streamed_layers * self.layer_bytes + (0 if self.head_resident else self.head_bytes)

    @property
    def total(self) -> int:
        fixed = self.runtime + self.draft + self.kv_cache + self.activations + HEADROOM
        return fixed + self.resident_target + 2 * self.buffer_bytes

    def describe(self) -> str:
        budget = "none" if self.budget is None else f"{self.budget / MB:.0f} MB"
        lines = [
            f"memory plan (budget {budget}, planned {self.total / MB:.0f} MB):",
            f"  runtime (measured)     {self.runtime / MB:7.0f} MB",
            f"  draft weights          {self.draft / MB:7.0f} MB",
            f"  KV caches              {self.kv_cache / MB:7.0f} MB",
            f"  activations + headroom {(self.activations + HEADROOM) / MB:7.0f} MB",
            f"  target resident        {self.resident_target / MB:7.0f} MB: {len(self.resident_layers)}/{self.num_layers} layers"
            + (", head" if self.head_resident else "")
            + (", embedding" if self.embed_resident else " (embedding rows read on demand)"),
            f"  streaming buffers      {2 * self.buffer_bytes / MB:7.0f} MB: 2 x {self.buffer_bytes / MB:.1f} MB",
            f"  streamed per pass      {self.bytes_per_pass / MB:7.0f} MB: {self.streamed_layers} layers"
            + ("" if self.head_resident else ", head"),
        ]
        return "\n".join(lines)


def plan_memory(
    config: ModelConfig,
    budget: int | None,
    *,
    layer_bytes: int,
    head_bytes: int,
    embed_bytes: int,
    runtime: int,
    draft: int,
    kv_cache: int,
    activations: int,
) -> MemoryPlan:
    """Decide what of the target stays resident under `budget` (None: everything)."""
    n = config.num_layers
    separate_embed = 0 if config.tie_word_embeddings else embed_bytes
    # a streamed head chunk holds whole tiles of the native kernels' layout
    tile = kernels.TILE_COLUMNS
    rows_per_chunk = max(tile, layer_bytes * config.vocab_size // max(1, head_bytes) // tile * tile)
    common = dict(budget=budget, runtime=runtime, draft=draft, kv_cache=kv_cache, activations=activations,
                  layer_bytes=layer_bytes, head_bytes=head_bytes, num_layers=n, head_rows_per_chunk=rows_per_chunk)
    everything = MemoryPlan(**common, embed_bytes=separate_embed, resident_layers=tuple(range(n)),
                            head_resident=True, embed_resident=True, buffer_bytes=0)
    if budget is None or everything.total <= budget:
        return everything
    # the embedding's rows read from the file as tokens need them, before any layer is streamed
    # (a token's row is a few KB; a streamed layer is read at every pass)
    whole = MemoryPlan(**common, embed_bytes=0, resident_layers=tuple(range(n)), head_resident=True, embed_resident=False, buffer_bytes=0)
    if separate_embed and whole.total <= budget:
        return whole
    streaming = MemoryPlan(**common, embed_bytes=0, resident_layers=(), head_resident=False,
                           embed_resident=False, buffer_bytes=layer_bytes)
    if streaming.total > budget:
        raise BudgetTooSmall(
            f"memory budget {budget / MB:.0f} MB is below the minimum of {streaming.total / MB:.0f} MB for "
            f"{config.num_layers} layers of {layer_bytes / MB:.1f} MB streamed through 2 buffers (runtime "
            f"{runtime / MB:.0f} MB, draft {draft / MB:.0f} MB, KV caches {kv_cache / MB:.0f} MB, activations and "
            f"headroom {(activations + HEADROOM) / MB:.0f} MB); raise the budget or lower --max-context",
            streaming.total,
        )
    spare = budget - streaming.total
    head_resident = head_bytes <= spare
    spare -= head_bytes * head_resident
    k = min(n - 1, spare // layer_bytes) if layer_bytes else 0  # all n resident is `everything`
    resident = tuple(sorted({int((j + 0.5) * n / k) for j in range(k)})) if k else ()
    return MemoryPlan(**common, embed_bytes=0, resident_layers=resident, head_resident=head_resident,
                      embed_resident=False, buffer_bytes=layer_bytes)
