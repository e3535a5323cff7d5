"""The layer store: a target model converted once into the layout it is streamed in.

    manifest.json            config, precision, source, and every file's size and sha256
    tokenizer.json (+ .json) the tokenizer, as `Tokenizer.from_hf_folder` reads it
    layer_000.safetensors    one file per transformer layer; tensor names are relative to
    ...                      the layer (layers of one precision have the same header,
                             except where a gguf source mixes block types across layers)
    embed.safetensors        token embedding `weight` [vocab, hidden] (+ int8 `scale` [vocab])
    head.safetensors         output head, same layout (absent when tied to the embedding)
    norm.safetensors         final norm

Tensors are stored in the compute layout of the store's precision (fp32: float32; int8:
int8 weights with per-row fp32 scales; q4: the 4-bit kernel's packed codes with bf16 group
scales, and int8 embedding and head; gguf: the GGUF's own blocks as uint8 rows named by
their type, `q4_k` ..., an int8 embedding; see quant.py), so a file read as is into a buffer
gives the tensors as aligned views, with no conversion per pass. Files are plain
safetensors; they are written here a chunk at a time so that converting a model needs
about one layer of memory, not the whole embedding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from llmcad.config import ModelConfig
from llmcad.errors import LlmcadError
from llmcad.model import Block
from llmcad.quant import PRECISIONS, QuantBlocks, linear_tensors, vocab_precision
from llmcad.tokenizer import Tokenizer
from llmcad.weights import IGNORED_HF_TENSORS, Checkpoint, vocab_rows

FORMAT = "llmcad-layer-store"
VERSION = 1
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int8: "I8", torch.uint8: "U8"}
DTYPE_OF = {v: k for k, v in DTYPES.items()}
HASH_CHUNK = 16 << 20


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

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.config = ModelConfig(**manifest["config"])
        self.precision: str = manifest["precision"]
        self.files: dict[str, dict] = manifest["files"]

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True, progress: bool = False) -> LayerStore:
        """Open the store at `path`; `verify` checks every file's sha256 (a corrupt or
        truncated file is an error naming it)."""
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LlmcadError(f"{path / 'manifest.json'}: unreadable store manifest ({e})") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise LlmcadError(f"{path}: not a version {VERSION} llmcad layer store")
        store = cls(path, manifest)
        for name, info in store.files.items():
            size = (path / name).stat().st_size if (path / name).is_file() else None
            if size != info["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise LlmcadError(f"{path / name}: store file is {found}, expected {info['bytes']} bytes (truncated or replaced?)")
        if verify:
            store.verify(progress)
        return store

    def verify(self, progress: bool = False) -> None:
        total = sum(info["bytes"] for info in self.files.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {self.path.name}", disable=not progress) as bar:
            for name, info in self.files.items():
                if _sha256(self.path / name, bar.update) != info["sha256"]:
                    raise LlmcadError(f"{self.path / name}: checksum mismatch (the file is corrupt; delete {self.path} to convert again)")

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


def _sha256(path: Path, advance=lambda n: None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            advance(len(chunk))
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # hashing must not fill the page cache
    return digest.hexdigest()


def store_path(ckpt: Checkpoint, precision: str) -> Path:
    """Where the store of `ckpt` in `precision` is cached ($LLMCAD_STORES, else the
    `stores` folder under LLMCAD_HOME), keyed by the source's path, size and modification time."""
    from llmcad.hub import llmcad_home

    source = ckpt.path.resolve()
    key = hashlib.sha1(f"{source}|{ckpt.file_bytes}|{source.stat().st_mtime_ns}".encode()).hexdigest()[:10]
    root = Path(os.environ.get("LLMCAD_STORES") or llmcad_home() / "stores")
    return root / f"{ckpt.path.stem}-{precision}-{key}"


def ensure_store(ckpt: Checkpoint, precision: str, progress: bool = False) -> LayerStore:
    """The cached store of `ckpt` in `precision`, converted first if there is none."""
    path = store_path(ckpt, precision)
    if (path / "manifest.json").is_file():
        return LayerStore.open(path, progress=progress)
    try:
        convert(ckpt, path, precision, progress)
    except (LlmcadError, OSError):
        if not (path / "manifest.json").is_file():
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
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=1))
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
        for name, tensor in ckpt.tensors(skip=matrices, blocks=precision == "gguf"):
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
    int8 the per-row `scale`; a gguf head as its GGUF blocks (under its type's name) where
    the kernels compute them."""
    rows, cols = ckpt.config.vocab_size, ckpt.config.hidden_size
    blocks = ckpt.blocks(name) if precision == "gguf" and name == "lm_head.weight" else None
    if blocks is not None:
        return write_safetensors(path, [(blocks.qtype, torch.uint8, tuple(blocks.data.shape))], [blocks.data])
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
