"""The streamed target: layers read from the layer store while earlier layers compute.

A background `LayerReader` reads the non-resident units of a pass (layer files, then chunks
of head rows) in a fixed cyclic order into two preallocated buffers, one read per unit
(two for a head chunk: its rows and their scales). The forward pass takes them in the same
order: while layer i computes from one buffer, layer i+1 is read into the other, and
after the last unit of a pass the reader goes on with the first units of the next pass.
Every streamed layer is a `Block` whose tensors are views into its buffer, built once; a
read refills the memory under the views, so no pass allocates weights. Layer files are
read with O_DIRECT into block-aligned buffers: the disk writes into the buffer itself,
with no copy out of the page cache (on 2 cores that copy cost 0.4 s of CPU per 1.5 GB pass
and slowed the reads that compute and drafting overlap; direct reads took 0.05 s and read
at 1.3-1.4 GB/s against 1.0-1.2 buffered). What cannot be read so (unaligned head chunks,
file systems without direct IO) is read buffered and dropped from the page cache after use
(`posix_fadvise(DONTNEED)`), so runs measure storage, not RAM a small device would not
have. `keep_page_cache` reads everything buffered and keeps it.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmcad import kernels
from llmcad.budget import MemoryPlan
from llmcad.errors import LlmcadError
from llmcad.model import Block, RMSNorm, Transformer
from llmcad.quant import Int8Embedding, linear_from
from llmcad.store import Layout, LayerStore
from llmcad.timeline import TIMELINE


@dataclass(frozen=True)
class Unit:
    """Something read once per pass: byte `ranges` (file offset, length, buffer offset) of
    one file; `header`, if set, must match the buffer's first bytes after the read."""

    path: Path
    ranges: tuple[tuple[int, int, int], ...]
    header: bytes | None = None


@dataclass
class IOStats:
    passes: int = 0
    bytes_read: int = 0
    io_s: float = 0.0  # time the reader spent reading
    io_wait_s: float = 0.0  # time the forward pass waited for a read
    pass_s: float = 0.0  # forward passes, wall time

    @property
    def compute_s(self) -> float:
        return self.pass_s - self.io_wait_s

    def snapshot(self) -> IOStats:
        return IOStats(self.passes, self.bytes_read, self.io_s, self.io_wait_s, self.pass_s)

    def since(self, before: IOStats) -> dict:
        return {
            "target_passes": self.passes - before.passes,
            "bytes_read": self.bytes_read - before.bytes_read,
            "io_s": round(self.io_s - before.io_s, 4),
            "io_wait_s": round(self.io_wait_s - before.io_wait_s, 4),
            "compute_s": round(self.compute_s - before.compute_s, 4),
        }


BLOCK = 4096  # direct reads: file offsets, lengths and memory aligned to this (every common disk's block divides it)


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialized byte buffer at a BLOCK-aligned address, rounded up to whole blocks."""
    size = -(-nbytes // BLOCK) * BLOCK
    raw = torch.empty(size + BLOCK, dtype=torch.uint8)
    start = -raw.data_ptr() % BLOCK
    return raw[start : start + size]


def can_read_directly(unit: Unit, buffer: torch.Tensor) -> bool:
    """Whether `unit` can be read into `buffer` with O_DIRECT: block-aligned offsets in the
    file and the buffer, and room in the buffer for its last range rounded up to a block."""
    if not hasattr(os, "O_DIRECT") or buffer.data_ptr() % BLOCK:
        return False
    fits = all(at + -(-length // BLOCK) * BLOCK <= buffer.numel() for _, length, at in unit.ranges)
    return fits and all(offset % BLOCK == 0 and at % BLOCK == 0 for offset, _, at in unit.ranges)


def read_unit(unit: Unit, buffer: torch.Tensor, fd: int, drop_page_cache: bool, direct: bool = False) -> int:
    """Read `unit` into `buffer`; a short read or a header mismatch is an error naming the file.
    `direct`: `fd` was opened with O_DIRECT, so whole blocks are read (the file's last block
    may come back short) straight from the disk into the buffer, past the page cache."""
    view = memoryview(buffer.numpy())
    total = 0
    for offset, length, at in unit.ranges:
        ask = -(-length // BLOCK) * BLOCK if direct else length
        done = 0
        while done < length:
            n = os.preadv(fd, [view[at + done : at + ask]], offset + done)
            if n == 0 or (direct and n % BLOCK and done + n < length):  # end of file before the range's end
                raise LlmcadError(f"{unit.path}: short read ({done + n} of {length} bytes at offset {offset}; file truncated?)")
            done += n
        if drop_page_cache and not direct:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        total += length
    if unit.header is not None and bytes(view[: len(unit.header)]) != unit.header:
        raise LlmcadError(f"{unit.path}: unexpected content (not the layer file this store was written with)")
    return total


def open_for_reading(path: Path, direct: bool) -> tuple[int, bool]:
    """A read-only descriptor for `path`, and whether it reads past the page cache: O_DIRECT
    when `direct` is asked and the file system allows it (not tmpfs, some network mounts)."""
    if direct:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), True
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), False


_OPEN_READERS: weakref.WeakSet[LayerReader] = weakref.WeakSet()


@atexit.register
def _close_open_readers() -> None:
    """Stop readers left open at interpreter exit: a daemon thread killed there inside a
    PyTorch call aborts the process ("terminate called without an active exception")."""
    for reader in list(_OPEN_READERS):
        reader.close()


class LayerReader:
    """Reads `units` cyclically into `buffers` (used in rotation) ahead of the consumer."""

    def __init__(self, units: list[Unit], buffers: list[torch.Tensor], stats: IOStats, drop_page_cache: bool = True):
        self.units, self.buffers, self.stats = units, buffers, stats
        self.drop_page_cache = drop_page_cache
        # files whose every unit is block-aligned are read past the page cache (module docstring)
        unaligned = {u.path for u in units if not all(can_read_directly(u, b) for b in buffers)}
        self.fds = {path: open_for_reading(path, drop_page_cache and path not in unaligned) for path in {u.path for u in units}}
        self.cond = threading.Condition()
        self._start()
        _OPEN_READERS.add(self)

    def _start(self) -> None:
        self.read_pos = self.take_pos = 0  # units read / taken since the start
        self.error: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="llmcad-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and self.read_pos - self.take_pos >= len(self.buffers):
                    self.cond.wait()
                if self.stopping:
                    return
                pos = self.read_pos
            unit = self.units[pos % len(self.units)]
            t = time.perf_counter()
            try:
                fd, direct = self.fds[unit.path]
                n = read_unit(unit, self.buffers[pos % len(self.buffers)], fd, self.drop_page_cache, direct)
                TIMELINE.add("read", t)
            except BaseException as e:  # handed to the consumer, which raises it
                with self.cond:
                    self.error = e
                    self.cond.notify_all()
                return
            with self.cond:
                self.stats.bytes_read += n
                self.stats.io_s += time.perf_counter() - t
                self.read_pos += 1
                self.cond.notify_all()

    def take(self) -> int:
        """Wait for the next unit in cyclic order; returns the index of the buffer holding it."""
        t = time.perf_counter()
        with self.cond:
            while self.read_pos <= self.take_pos and self.error is None:
                self.cond.wait()
            self.stats.io_wait_s += time.perf_counter() - t
            TIMELINE.add("target waits for a read", t)
            if self.read_pos <= self.take_pos:
                error, self.error = self.error, None
                self._restart_locked()
                raise error
            return self.take_pos % len(self.buffers)

    def give_back(self) -> None:
        """The unit last taken is used up: its buffer may be refilled."""
        with self.cond:
            self.take_pos += 1
            self.cond.notify_all()

    def restart(self) -> None:
        """Start the cycle over (after a pass was abandoned half-way)."""
        with self.cond:
            self._restart_locked()

    def _restart_locked(self) -> None:
        self.stopping = True
        self.cond.notify_all()
        self.cond.release()
        try:
            self.thread.join()
        finally:
            self.cond.acquire()
        self._start()

    def close(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()
        for fd, _ in self.fds.values():
            os.close(fd)
        self.fds = {}
        _OPEN_READERS.discard(self)


def make_block(store: LayerStore, views: dict[str, torch.Tensor]) -> Block:
    """A transformer layer whose tensors are `views` (into a buffer holding a layer file)."""
    with torch.device("meta"):
        block = Block(store.config)
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear):
            tensors = {key[len(name) + 1 :]: view for key, view in views.items() if key.rpartition(".")[0] == name}
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, linear_from(tensors))
        elif isinstance(module, RMSNorm):
            module.weight = nn.Parameter(views[f"{name}.weight"], requires_grad=False)
    return block


class StreamedLayers(nn.Module):
    """The target's layers for one pass, in order: resident blocks as they are, streamed
    blocks as views into the buffer the reader filled (`slot_blocks[buffer][layer]`: layers
    may differ in layout)."""

    def __init__(self, num_layers: int, resident: dict[int, Block], slot_blocks: list[dict[int, Block]], reader: LayerReader | None):
        super().__init__()
        self.num_layers = num_layers
        self.resident = nn.ModuleDict({str(i): b for i, b in resident.items()})
        self.slot_blocks = slot_blocks
        self.reader = reader

    def __len__(self) -> int:
        return self.num_layers

    def __iter__(self):
        for i in range(self.num_layers):
            if str(i) in self.resident:
                yield self.resident[str(i)]
                continue
            slot = self.reader.take()
            try:
                yield self.slot_blocks[slot][i]
            except GeneratorExit:  # the pass was abandoned: the reader is ahead of it
                self.reader.restart()
                raise
            self.reader.give_back()


class StreamedHead(nn.Module):
    """The output head streamed in chunks of vocabulary rows, through the reader's buffers."""

    def __init__(self, chunks: list[tuple[int, int]], slot_modules: list[dict[int, nn.Module]], reader: LayerReader, vocab: int):
        super().__init__()
        self.chunks, self.slot_modules, self.reader, self.vocab = chunks, slot_modules, reader, vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(*x.shape[:-1], self.vocab)
        for start, stop in self.chunks:
            slot = self.reader.take()
            try:
                out[..., start:stop] = self.slot_modules[slot][stop - start](x)
            except BaseException:
                self.reader.restart()
                raise
            self.reader.give_back()
        return out


class RowEmbedding(nn.Module):
    """Token embedding read from storage row by row: a step needs only its tokens' rows."""

    def __init__(self, store: LayerStore):
        super().__init__()
        layout = store.embed_layout
        self.path = store.embed_path
        self.fd = os.open(self.path, os.O_RDONLY)
        self.dtype, (_, self.dim), self.start, _ = layout.tensors["weight"]
        self.row_bytes = self.dim * self.dtype.itemsize
        self.scale = None
        if "scale" in layout.tensors:  # int8: the per-row scales stay resident (4 bytes a row)
            _, _, start, end = layout.tensors["scale"]
            buf = torch.empty(end - start, dtype=torch.uint8)
            read_unit(Unit(self.path, ((start, end - start, 0),)), buf, self.fd, drop_page_cache=True)
            self.scale = buf.view(torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.empty(len(ids) * self.row_bytes, dtype=torch.uint8)
        ranges = tuple((self.start + token * self.row_bytes, self.row_bytes, r * self.row_bytes) for r, token in enumerate(ids.tolist()))
        read_unit(Unit(self.path, ranges), rows, self.fd, drop_page_cache=False)
        x = rows.view(self.dtype).view(len(ids), self.dim).float()
        return x * self.scale[ids, None] if self.scale is not None else x


class StreamedTransformer(Transformer):
    """A Transformer assembled from a layer store under a memory plan; `io` counts passes,
    bytes read and time spent reading, waiting and computing."""

    def __init__(self, store: LayerStore, plan: MemoryPlan, drop_page_cache: bool = True):
        config = store.config
        with torch.device("meta"):
            super().__init__(config)
        self.norm.weight = nn.Parameter(store.norm(), requires_grad=False)
        self.io = IOStats()
        self.plan = plan
        layouts = store.layer_layouts
        resident = {i: make_block(store, layouts[i].views(_read_file(store.layer_path(i), layouts[i]))) for i in plan.resident_layers}
        streamed = [i for i in range(config.num_layers) if i not in resident]
        units = [Unit(store.layer_path(i), ((0, layouts[i].nbytes, 0),), layouts[i].header) for i in streamed]
        head = store.head_layout
        chunks = [] if plan.head_resident else _row_chunks(config.vocab_size, plan.head_rows_per_chunk)
        units += [_head_unit(store.head_path, head, start, stop) for start, stop in chunks]
        self.reader = None
        slot_blocks: list[dict[int, Block]] = []
        slot_heads: list[dict[int, nn.Module]] = []
        if units:
            buffers = [aligned_buffer(plan.buffer_bytes) for _ in range(2)]
            self.reader = LayerReader(units, buffers, self.io, drop_page_cache)
            slot_blocks = [_blocks_by_layout(store, streamed, b) for b in buffers]
            sizes = {stop - start for start, stop in chunks}
            slot_heads = [{n: linear_from(_head_views(head, b, n)) for n in sizes} for b in buffers]
        self.layers = StreamedLayers(config.num_layers, resident, slot_blocks, self.reader)
        if plan.head_resident:
            matrix = _read_file(store.head_path, head)
            self.lm_head = linear_from(head.views(matrix))
        else:
            self.lm_head = StreamedHead(chunks, slot_heads, self.reader, config.vocab_size)
        if config.tie_word_embeddings and plan.head_resident:  # lookups from the resident head
            views = head.views(matrix)
        elif plan.embed_resident:
            views = store.embed_layout.views(_read_file(store.embed_path, store.embed_layout))
        else:
            views = None
            self.embed_tokens = RowEmbedding(store)
        if views is not None:
            self.embed_tokens = Int8Embedding(views["weight"], views["scale"]) if "scale" in views else _Rows(views["weight"])

    def forward(self, *args, **kwargs) -> torch.Tensor:
        t = time.perf_counter()
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.io.passes += 1
            self.io.pass_s += time.perf_counter() - t
            TIMELINE.add("target pass", t)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def _blocks_by_layout(store: LayerStore, layers: list[int], buffer: torch.Tensor) -> dict[int, Block]:
    """A Block over `buffer` for each of `layers`, one per distinct layer layout (a store of
    one block type has one; a Q4_K_M gguf store two)."""
    made: dict[bytes, Block] = {}
    for i in layers:
        layout = store.layer_layouts[i]
        if layout.header not in made:
            made[layout.header] = make_block(store, layout.views(buffer))
    return {i: made[store.layer_layouts[i].header] for i in layers}


class _Rows(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]


def _read_file(path: Path, layout: Layout) -> torch.Tensor:
    """A whole store file in a buffer of its own (for resident parts)."""
    buffer = torch.empty(layout.nbytes, dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        read_unit(Unit(path, ((0, layout.nbytes, 0),), layout.header), buffer, fd, drop_page_cache=True)
    finally:
        os.close(fd)
    return buffer


def _row_chunks(rows: int, per_chunk: int) -> list[tuple[int, int]]:
    return [(a, min(rows, a + per_chunk)) for a in range(0, rows, per_chunk)]


def _matrix_name(layout: Layout) -> str:
    """The head file's matrix: `weight` (fp32, int8) or its GGUF block type (gguf)."""
    return next(name for name, (_, shape, _, _) in layout.tensors.items() if len(shape) == 2)


def _head_unit(path: Path, layout: Layout, start: int, stop: int) -> Unit:
    """Rows start:stop of the head: weight rows at buffer offset 0, then their scales. A
    matrix packed for the native kernels is cut only between its tiles."""
    name = _matrix_name(layout)
    if name in kernels.QTYPES and start % kernels.TILE_COLUMNS:
        raise ValueError(f"a streamed head chunk starting at row {start} would cut a {kernels.TILE_COLUMNS}-row tile of the packed {name} head")
    dtype, (_, dim), w_start, _ = layout.tensors[name]
    row = dim * dtype.itemsize
    ranges = [(w_start + start * row, (stop - start) * row, 0)]
    if "scale" in layout.tensors:
        s_start = layout.tensors["scale"][2]
        ranges.append((s_start + start * 4, (stop - start) * 4, (stop - start) * row))
    return Unit(path, tuple(ranges))


def _head_views(layout: Layout, buffer: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    name = _matrix_name(layout)
    dtype, (_, dim), _, _ = layout.tensors[name]
    n = rows * dim * dtype.itemsize
    views = {name: buffer[:n].view(dtype).view(rows, dim)}
    if "scale" in layout.tensors:
        views["scale"] = buffer[n : n + rows * 4].view(torch.float32)
    return views
