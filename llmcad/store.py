"""The layer store: a target model converted once into the layout it is streamed in.

    manifest.json            config, precision, source, and every file's size and sha256
    tokenizer.json (+ .json) the tokenizer, as `Tokenizer.from_hf_folder` reads it
    layer_000.safetensors    one file per transformer layer; tensor names are relative to
    ...                      the layer (layers of one precision have the same header,
                             except where a gguf source mixes block types across layers)
    embed.safetensors        token embedding `weight` [vocab, hidden] (+ int8 `scale` [vocab])
    head.safetensors         output head, same layout (absent when tied to the embedding)
    norm.safetensors         final norm
    verified.json            the stamp: each file's size and mtime when it was last hashed

Integrity: every file is hashed when written. Opening checks sizes and the stamp, and
re-hashes only files changed since their last full check (or with no stamp); a file
rewritten in place with its size and mtime restored goes unnoticed until `verify()`
(`llmcad verify MODEL`) hashes every file.

Tensors are stored in the compute layout of the store's precision (fp32: float32; int8:
int8 weights with per-row fp32 scales; q4: the 4-bit kernel's packed codes with bf16 group
scales, and int8 embedding and head; gguf: the GGUF's own blocks as uint8 rows named by
their type, `q4_k` ..., an int8 embedding; see quant.py), so a file read as is into a buffer
gives the tensors as aligned views, with no conversion per pass. Files are plain
safetensors; they are written here a chunk at a time so that converting a model needs
about one layer of memory, not the whole embedding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from llmcad.config import ModelConfig
from llmcad.errors import LlmcadError
from llmcad.model import Block
from llmcad.quant import BLOCKS_OF, PRECISIONS, QuantBlocks, linear_tensors, vocab_precision
from llmcad.tokenizer import Tokenizer
from llmcad.weights import IGNORED_HF_TENSORS, Checkpoint, open_checkpoint, source_bytes, vocab_rows

FORMAT = "llmcad-layer-store"
VERSION = 2  # 2: GGUF blocks packed in the kernels' tiles
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int8: "I8", torch.uint8: "U8"}
DTYPE_OF = {v: k for k, v in DTYPES.items()}
HASH_CHUNK = 16 << 20
MANIFEST = "manifest.json"
STAMP = "verified.json"
Stat = tuple[int, int]  # a file's size and mtime in ns


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a store file lies: `header` is the file's leading bytes (length
    prefix + JSON), `tensors` maps names to (dtype, shape, byte range in the file)."""

    header: bytes
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]
    nbytes: int

    def views(self, buffer: torch.Tensor, base: int = 0) -> dict[str, torch.Tensor]:
        """The tensors as views into `buffer` (uint8) holding the file from byte `base`."""
        out = {}
        for name, (dtype, shape, start, end) in self.tensors.items():
            out[name] = buffer[start - base : end - base].view(dtype).view(shape)
        return out


def read_layout(path: Path) -> Layout:
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            (n,) = struct.unpack("<Q", prefix)
            raw = f.read(n)
        header = json.loads(raw)
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmcadError(f"{path}: not a readable store file ({e})") from None
    base = 8 + len(raw)
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPE_OF[spec["dtype"]]
        start, end = (base + o for o in spec["data_offsets"])
        if start % dtype.itemsize:
            raise LlmcadError(f"{path}: tensor {name} is not aligned for {dtype}")
        tensors[name] = (dtype, tuple(spec["shape"]), start, end)
    return Layout(prefix + raw, tensors, max((t[3] for t in tensors.values()), default=base))


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], chunks: Iterable[torch.Tensor]) -> dict:
    """Write a safetensors file whose tensors (`specs`, in order) arrive as a stream of
    `chunks` (their data, in order, in any pieces). Returns its size and sha256."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        n = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    digest = hashlib.sha256()
    written = 0
    with open(path, "wb") as f:
        prefix = struct.pack("<Q", len(raw)) + raw
        f.write(prefix)
        digest.update(prefix)
        for chunk in chunks:
            data = chunk.contiguous().view(torch.uint8).numpy()
            f.write(data)
            digest.update(data)
            written += data.nbytes
    if written != offset:
        raise AssertionError(f"{path}: wrote {written} data bytes, expected {offset}")
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def layer_tensor_names(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names (relative to the layer) and shapes of one transformer layer's tensors."""
    with torch.device("meta"):
        block = Block(config)
    return {name: tuple(p.shape) for name, p in block.named_parameters()}


def _layer_specs(tensors: dict[str, torch.Tensor | QuantBlocks], precision: str) -> list[tuple[str, torch.Tensor]]:
    """A layer's tensors in the compute layout, widest element type first (so every view is
    aligned: fp32, then bf16, then bytes)."""
    out = []
    for name, t in sorted(tensors.items()):
        if name.endswith("_proj.weight"):
            prefix = name.removesuffix("weight")
            out += [(prefix + key, value) for key, value in linear_tensors(t, None, precision).items()]
        else:
            out.append((name, t.float()))
    return sorted(out, key=lambda item: -item[1].dtype.itemsize)


class LayerStore:
    """An opened store: config, tokenizer, file paths and layouts."""

    def __init__(self, path: Path, manifest: dict, manifest_sha256: str = ""):
        self.path = Path(path)
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256  # of the manifest's bytes: the stamp is for this one
        self.config = ModelConfig(**manifest["config"])
        self.precision: str = manifest["precision"]
        self.files: dict[str, dict] = manifest["files"]

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True, progress: bool = False, full: bool = False) -> LayerStore:
        """Open the store at `path`. Every file's size is checked; `verify` hashes the files
        changed since their last check (per the stamp: all of them without one), `full`
        every file (a corrupt or truncated file is an error naming it)."""
        path = Path(path)
        try:
            raw = (path / MANIFEST).read_bytes()
            manifest = json.loads(raw)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LlmcadError(f"{path / MANIFEST}: unreadable store manifest ({e})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise LlmcadError(f"{path}: not a version {VERSION} llmcad layer store")
        store = cls(path, manifest, hashlib.sha256(raw).hexdigest())
        stats = store._stats()
        if full:
            store._hash(list(store.files), stats, progress)
        elif verify:
            store._hash(store._stale(stats), stats, progress)
        return store

    def verify(self, progress: bool = False) -> None:
        """Hash every file against the manifest (a mismatch is an error naming the file),
        then stamp the store as checked."""
        self._hash(list(self.files), self._stats(), progress)

    def _stats(self) -> dict[str, Stat]:
        """Each file's size and mtime; a missing file or one of the wrong size is an error."""
        stats = {}
        for name, info in self.files.items():
            try:
                st = (self.path / name).stat()
                stats[name] = (st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                st = None
            if st is None or st.st_size != info["bytes"]:
                found = "missing" if st is None else f"{st.st_size} bytes"
                raise LlmcadError(f"{self.path / name}: store file is {found}, expected {info['bytes']} bytes (truncated or replaced?)")
        return stats

    def _stale(self, stats: dict[str, Stat]) -> list[str]:
        """The files not known good: those whose size or mtime differ from the stamp's, or
        whose mtime is not older than the stamp (written in the same clock tick, a change
        could keep it); every file without a stamp or when the manifest changed."""
        try:
            stamp = json.loads((self.path / STAMP).read_bytes())
            written = (self.path / STAMP).stat().st_mtime_ns
            if stamp["manifest_sha256"] == self.manifest_sha256:
                return [name for name, stat in stats.items() if stamp["files"].get(name) != list(stat) or stat[1] >= written]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none, or unreadable
            pass
        return list(self.files)

    def _hash(self, names: list[str], stats: dict[str, Stat], progress: bool) -> None:
        """Hash `names`, then stamp `stats` (taken before: a file changed meanwhile is stale
        at the next open)."""
        if not names:
            return
        total = sum(self.files[name]["bytes"] for name in names)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {self.path.name}", disable=not progress) as bar:
            for name in names:
                if file_sha256(self.path / name, bar.update) != self.files[name]["sha256"]:
                    with contextlib.suppress(OSError):  # later opens hash again
                        (self.path / STAMP).unlink()
                    raise LlmcadError(f"{self.path / name}: checksum mismatch (the file is corrupt; delete {self.path} to convert again)")
        write_stamp(self.path, self.manifest_sha256, stats)

    @property
    def name(self) -> str:
        return self.manifest["source"]["name"]

    def layer_path(self, i: int) -> Path:
        return self.path / f"layer_{i:03d}.safetensors"

    @property
    def embed_path(self) -> Path:
        return self.path / "embed.safetensors"

    @property
    def head_path(self) -> Path:
        return self.embed_path if self.config.tie_word_embeddings else self.path / "head.safetensors"

    @cached_property
    def layer_layouts(self) -> list[Layout]:
        """Each layer file's layout (a gguf store's layers may differ: Q4_K_M gives half the
        layers Q6_K matrices where the others have Q4_K)."""
        return [read_layout(self.layer_path(i)) for i in range(self.config.num_layers)]

    @property
    def layer_bytes(self) -> int:
        """The largest layer file: what a streaming buffer must hold."""
        return max(layout.nbytes for layout in self.layer_layouts)

    @cached_property
    def head_layout(self) -> Layout:
        return read_layout(self.head_path)

    @cached_property
    def embed_layout(self) -> Layout:
        return read_layout(self.embed_path)

    def norm(self) -> torch.Tensor:
        return load_file(self.path / "norm.safetensors")["weight"]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_hf_folder(self.path)


def file_sha256(path: Path, advance: Callable[[int], object] = lambda n: None) -> str:
    """The sha256 of the file at `path`, read a chunk at a time (`advance(bytes)` after each)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            advance(len(chunk))
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # hashing must not fill the page cache
    return digest.hexdigest()


def write_stamp(folder: Path, manifest_sha256: str, stats: dict[str, Stat]) -> None:
    """Record that the files of the store in `folder` had these sizes and mtimes when they
    were hashed (skipped where the folder is read-only: every open then hashes)."""
    tmp = folder / f"{STAMP}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"manifest_sha256": manifest_sha256, "files": stats}))
        os.replace(tmp, folder / STAMP)
    except OSError:
        tmp.unlink(missing_ok=True)


def store_path(source: Checkpoint | Path, precision: str) -> Path:
    """Where the store of `source` (a checkpoint or a model's path, not read) in `precision`
    is cached ($LLMCAD_STORES, else the `stores` folder under LLMCAD_HOME), keyed by the
    source's path, size and modification time, and the store format's version."""
    from llmcad.hub import llmcad_home

    path = source.path if isinstance(source, Checkpoint) else Path(source)
    resolved = path.resolve()
    key = hashlib.sha1(f"{resolved}|{source_bytes(path)}|{resolved.stat().st_mtime_ns}|{VERSION}".encode()).hexdigest()[:10]
    root = Path(os.environ.get("LLMCAD_STORES") or llmcad_home() / "stores")
    return root / f"{path.stem}-{precision}-{key}"


def ensure_store(source: Checkpoint | Path, precision: str, progress: bool = False) -> LayerStore:
    """The cached store of `source` (a checkpoint, or a model's path: read only to convert
    it) in `precision`, converted first if there is none."""
    path = store_path(source, precision)
    if (path / MANIFEST).is_file():
        return LayerStore.open(path, progress=progress)
    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    try:
        convert(ckpt, path, precision, progress)
    except (LlmcadError, OSError):
        if not (path / MANIFEST).is_file():
            raise
        # another process converted the same model meanwhile (first use by two at once): use its store
        return LayerStore.open(path, progress=progress)
    return LayerStore.open(path, verify=False)  # just written and hashed


def convert(ckpt: Checkpoint, out: Path, precision: str, progress: bool = False) -> Path:
    """Write the layer store of `ckpt` in `precision` to the folder `out` (atomically: a
    partial conversion never looks like a store)."""
    if precision not in PRECISIONS:
        raise LlmcadError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    config = ckpt.config
    out = Path(out)
    if out.exists():
        raise LlmcadError(f"{out}: already exists")
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        files = _convert_into(ckpt, partial, precision, progress)
        ckpt.tokenizer.save(partial)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "precision": precision,
            "config": dataclasses.asdict(config),
            "source": {"name": ckpt.path.name, "path": str(ckpt.path.resolve()), "bytes": ckpt.file_bytes},
            "files": files,
        }
        raw = json.dumps(manifest, indent=1).encode()
        (partial / MANIFEST).write_bytes(raw)
        stats = {}
        for name in files:
            st = (partial / name).stat()
            stats[name] = (st.st_size, st.st_mtime_ns)
        write_stamp(partial, hashlib.sha256(raw).hexdigest(), stats)  # hashed as written; renaming the folder keeps mtimes
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _convert_into(ckpt: Checkpoint, folder: Path, precision: str, progress: bool) -> dict[str, dict]:
    config = ckpt.config
    expected = layer_tensor_names(config)
    matrices = ("embed_tokens.weight", "lm_head.weight")
    files: dict[str, dict] = {}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    seen_norm = False
    bar = tqdm(total=config.num_layers + 2, desc=f"converting {ckpt.path.name} to {precision}", unit="file", disable=not progress)
    with bar:
        for name, tensor in ckpt.tensors(skip=matrices, blocks=precision in BLOCKS_OF):
            if name.endswith(IGNORED_HF_TENSORS):
                continue
            if name == "norm.weight":
                files["norm.safetensors"] = write_safetensors(folder / "norm.safetensors", [("weight", torch.float32, tuple(tensor.shape))], [tensor])
                seen_norm = True
                continue
            layer, rel = _split_layer_name(name, ckpt.path, config.num_layers)
            if expected.get(rel) != tuple(tensor.shape):
                raise LlmcadError(f"{ckpt.path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected.get(rel)}")
            pending.setdefault(layer, {})[rel] = tensor
            if pending[layer].keys() == expected.keys():
                specs = _layer_specs(pending.pop(layer), precision)
                file = f"layer_{layer:03d}.safetensors"
                files[file] = write_safetensors(folder / file, [(n, t.dtype, tuple(t.shape)) for n, t in specs], (t for _, t in specs))
                bar.update()
        missing = [f"layers.{i}.{n}" for i, got in sorted(pending.items()) for n in expected if n not in got]
        missing += [f"layers.{i}.*" for i in range(config.num_layers) if f"layer_{i:03d}.safetensors" not in files and i not in pending]
        if not seen_norm:
            missing.append("norm.weight")
        if missing:
            raise LlmcadError(f"{ckpt.path}: missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        files["embed.safetensors"] = _write_matrix(ckpt, "embed_tokens.weight", folder / "embed.safetensors", precision)
        bar.update()
        if not config.tie_word_embeddings:
            files["head.safetensors"] = _write_matrix(ckpt, "lm_head.weight", folder / "head.safetensors", precision)
        bar.update()
    return files


def _split_layer_name(name: str, source: Path, num_layers: int) -> tuple[int, str]:
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and int(parts[1]) < num_layers:
        return int(parts[1]), parts[2]
    raise LlmcadError(f"{source}: unexpected tensor {name!r}")


def _write_matrix(ckpt: Checkpoint, name: str, path: Path, precision: str) -> dict:
    """An embedding-shaped matrix converted a slice of rows at a time: `weight`, then for
    int8 the per-row `scale`; a gguf or q4_0 head in the kernels' tiles, under its type's
    name (`linear_tensors`), where the kernels compute its blocks."""
    rows, cols = ckpt.config.vocab_size, ckpt.config.hidden_size
    blocks = ckpt.blocks(name) if precision in BLOCKS_OF and name == "lm_head.weight" else None
    if blocks is not None:
        ((qtype, packed),) = linear_tensors(blocks, None, precision).items()
        return write_safetensors(path, [(qtype, torch.uint8, tuple(packed.shape))], [packed])
    scales: list[torch.Tensor] = []

    def chunks() -> Iterator[torch.Tensor]:
        for block, scale in vocab_rows(ckpt, name, precision):
            if scale is not None:
                scales.append(scale)
            yield block
        if scales:
            yield torch.cat(scales)

    if vocab_precision(precision) == "int8":
        if cols % 4:
            raise LlmcadError(f"{ckpt.path}: hidden size {cols} is not a multiple of 4")
        specs = [("weight", torch.int8, (rows, cols)), ("scale", torch.float32, (rows,))]
    else:
        specs = [("weight", torch.float32, (rows, cols))]
    return write_safetensors(path, specs, chunks())
