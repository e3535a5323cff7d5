"""Reading checkpoints: a Hugging Face folder (config.json + safetensors) or a GGUF file.

Both present their tensors under Hugging Face names (without the leading `model.`) in
fp32, one at a time, so a model is built tensor by tensor in its compute precision without
ever holding a second full copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from llmcad.config import ModelConfig
from llmcad.errors import LlmcadError
from llmcad.families import GGUF_ROPE_TENSORS, Family
from llmcad.gguf_file import GGUFFile, GGUFTensor, dequantize_tensor, read_tensor
from llmcad.kernels import QTYPES
from llmcad.model import Block, Transformer
from llmcad.quant import (
    BLOCKS_OF,
    PRECISIONS,
    FloatLinear,
    Int8Embedding,
    Int8Linear,
    QuantBlocks,
    convert_submodule,
    linear_from,
    linear_tensors,
    quantize_rows,
    tied_head,
    vocab_precision,
)
from llmcad.tokenizer import Tokenizer, token_strings_of_file, token_strings_of_gguf

IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)
QTYPE_OF_GGML = {ggml: name for name, (_, _, ggml) in QTYPES.items()}


@dataclass
class Checkpoint:
    """A model on disk: its config, tokenizer and tensors, read lazily."""

    path: Path
    config: ModelConfig
    file_bytes: int
    tensor_count: int
    gguf: GGUFFile | None = None  # None for a Hugging Face folder

    def tensors(self, skip: Container[str] = (), blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantBlocks]]:
        """(name, fp32 tensor) pairs, one tensor in memory at a time; names in `skip` are not
        read. With `blocks`, a GGUF matrix in a type the native kernels compute comes as it is
        stored (`QuantBlocks`). Names and layouts are the model's: the family's fused
        projections come split into their parts, norm weights with its offset added."""
        family = self.config.family
        if self.gguf is not None:
            tensors = _gguf_tensors(self, skip, blocks)
        else:
            tensors = _hf_tensors(self.path, skip, family)
            if family.hf_norm_offset:
                tensors = ((n, t + family.hf_norm_offset if n.endswith("norm.weight") else t) for n, t in tensors)
        return _split_fused(self.config, tensors) if family.fused else tensors

    def blocks(self, name: str, ids: Sequence[int] | None = None) -> QuantBlocks | None:
        """The matrix `name` (all rows, or the rows `ids`) in its GGUF blocks, if it is stored
        in a type the native kernels compute; else None."""
        tensor = self._gguf_tensor(name) if self.gguf is not None else None
        blocks = None if tensor is None else _quant_blocks(self.gguf.path, tensor)
        if blocks is None or ids is None:
            return blocks
        return replace(blocks, data=blocks.data[torch.as_tensor(ids)])

    def _gguf_tensor(self, name: str) -> GGUFTensor | None:
        names = self.config.family.gguf_name_map()
        return next((t for t in self.gguf.tensors if _gguf_name(t.name, names) == name), None)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of the 2-D tensor `name` in fp32: a 150k-row embedding is
        converted a slice at a time."""
        return self.row_reader(name)(start, stop)

    def row_reader(self, name: str) -> Callable[[int, int], torch.Tensor]:
        """rows(start, stop) of tensor `name`, holding only the file's path (not its metadata)."""
        if self.gguf is None:
            return partial(_hf_rows, self.path, name, self.config.family)
        tensor = self._gguf_tensor(name)
        if tensor is None:
            raise LlmcadError(f"{self.path}: no tensor {name}")
        path = self.gguf.path  # not `self`: a closure over it would keep the metadata and tokenizer alive
        return lambda start, stop: torch.from_numpy(dequantize_tensor(path, tensor, slice(start, stop)))

    @property
    def format(self) -> str:
        return "hf" if self.gguf is None else "gguf"

    @cached_property
    def tokenizer(self) -> Tokenizer:
        if self.gguf is not None:
            return Tokenizer.from_gguf(self.gguf)
        return Tokenizer.from_hf_folder(self.path)

    def token_strings(self) -> list[str | None]:
        """The vocabulary entry of every token id (None where an id has none), read from the
        GGUF's token array or tokenizer.json without building a tokenizer."""
        if self.gguf is not None:
            return token_strings_of_gguf(self.gguf)
        return token_strings_of_file(self.path / "tokenizer.json")


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        return _open_hf(path)
    if path.is_file():
        return _open_gguf(path)
    raise LlmcadError(f"{path}: no such file or folder")


class VocabularySubsetHead(nn.Module):
    """An output head over some vocabulary rows only (`ids`); every other token's logit is
    -inf. A draft's proposals then come from those tokens alone, and speculation stays
    lossless: the target checks every proposal, and sampling's acceptance uses this very
    distribution (zero outside `ids`, so the residual keeps the target's mass there)."""

    def __init__(self, head: nn.Module, ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.head, self.ids, self.vocab_size = head, ids, vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.new_full((*x.shape[:-1], self.vocab_size), -torch.inf)
        logits[..., self.ids] = self.head(x)
        return logits


class WidthHead(nn.Module):
    """An output head's logits cut to `width` columns, or padded to it with -inf: a draft
    whose vocabulary has more or fewer rows than its target's (padding) gives logits over
    the target's ids, and never proposes one the target lacks."""

    def __init__(self, head: nn.Module, width: int):
        super().__init__()
        self.head, self.width = head, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(x)
        have = logits.shape[-1]
        if have >= self.width:
            return logits[..., : self.width]
        out = logits.new_full((*logits.shape[:-1], self.width), -torch.inf)
        out[..., :have] = logits
        return out


class ZeroPastEmbedding(nn.Module):
    """An embedding that gives zeros for ids past its `rows`: a draft with fewer rows than
    its target runs whatever the target committed (an id in the target's padding, which it
    never proposes itself), and only its proposals suffer."""

    def __init__(self, embedding: nn.Module, rows: int, dim: int):
        super().__init__()
        self.embedding, self.rows, self.dim = embedding, rows, dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = ids < self.rows
        if bool(inside.all()):
            return self.embedding(ids)
        out = torch.zeros(len(ids), self.dim)
        if bool(inside.any()):
            out[inside] = self.embedding(ids[inside])
        return out


class CheckpointEmbedding(nn.Module):
    """Token embedding rows read from the checkpoint file when a step looks them up (about
    0.1 ms a row from a GGUF), instead of a resident vocabulary-sized table."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__()
        self.rows = ckpt.row_reader("embed_tokens.weight")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.rows(t, t + 1) for t in ids.tolist()])


VOCAB_MATRICES = ("embed_tokens.weight", "lm_head.weight")
ROWS_PER_CHUNK = 8192  # vocabulary rows converted at a time


def load_model(
    ckpt: Checkpoint,
    precision: str = "fp32",
    progress: bool = False,
    embedding_on_demand: bool = False,
    head_ids: Sequence[int] | None = None,
    logits_width: int | None = None,
) -> Transformer:
    """Build the model, converting each tensor to `precision` as soon as its module is complete;
    vocabulary-sized matrices are converted a slice of rows at a time (no fp32 copy of a
    150k-row head). With `embedding_on_demand` the embedding is not loaded unless it is the
    output head's matrix too: its rows are read from the checkpoint as needed. With
    `head_ids` the output head holds only those tokens' rows (`VocabularySubsetHead`). With
    `logits_width` (a draft for a target whose vocabulary has another number of rows) the
    logits have that width: cut to it, or -inf past the model's own rows (`WidthHead`), so
    it never proposes an id the target lacks."""
    if precision not in PRECISIONS:
        raise LlmcadError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    config = ckpt.config
    with torch.device("meta"):
        model = Transformer(config)
    head_name = "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    if head_ids is not None:
        head_ids = sorted(set(head_ids))
        if not head_ids or head_ids[0] < 0 or head_ids[-1] >= config.vocab_size:
            raise LlmcadError(f"{ckpt.path}: head token ids must lie in 0..{config.vocab_size - 1}")
    shared = config.tie_word_embeddings and head_ids is None  # one matrix serves both
    on_demand = embedding_on_demand and not shared
    bar = tqdm(total=ckpt.tensor_count, desc=f"loading {ckpt.path.name} ({precision})", unit="tensor", disable=not progress)
    with bar:  # closed on error too, so an error message starts on a line of its own
        model.embed_tokens = CheckpointEmbedding(ckpt) if on_demand else _vocab_matrix(ckpt, "embed_tokens.weight", precision)
        if shared:
            model.lm_head = tied_head(model.embed_tokens)  # one copy of the shared matrix
        else:
            blocks = ckpt.blocks(head_name, head_ids) if precision in BLOCKS_OF else None
            head = linear_from(linear_tensors(blocks, None, precision)) if blocks else _vocab_matrix(ckpt, head_name, precision, as_head=True, ids=head_ids)
            model.lm_head = head if head_ids is None else VocabularySubsetHead(head, torch.tensor(head_ids), config.vocab_size)
        if logits_width is not None and logits_width != config.vocab_size:
            model.lm_head = WidthHead(model.lm_head, logits_width)
            if logits_width > config.vocab_size:  # the target may still commit an id past these rows
                model.embed_tokens = ZeroPastEmbedding(model.embed_tokens, config.vocab_size, config.hidden_size)
        bar.update(len(VOCAB_MATRICES) - config.tie_word_embeddings)
        linears: dict[str, dict[str, torch.Tensor | QuantBlocks]] = {}  # a linear's tensors until it has all
        for name, tensor in ckpt.tensors(skip=VOCAB_MATRICES, blocks=precision in BLOCKS_OF):
            bar.update()
            if not name.endswith(IGNORED_HF_TENSORS):
                _assign(model, name, tensor, precision, ckpt.path, linears)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise LlmcadError(f"{ckpt.path}: missing tensors: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    return model.eval()


def vocab_rows(ckpt: Checkpoint, name: str, precision: str, ids: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The vocabulary matrix `name` (all rows, or the sorted `ids`) a slice of rows at a
    time, in the vocabulary precision of `precision`: (rows, their int8 scales or None)."""
    cols, int8 = ckpt.config.hidden_size, vocab_precision(precision) == "int8"
    for start, stop in _row_slices(range(ckpt.config.vocab_size) if ids is None else ids):
        block = ckpt.rows(name, start, stop)
        if tuple(block.shape) != (stop - start, cols):
            raise LlmcadError(f"{ckpt.path}: tensor {name!r} has rows of {block.shape[-1]} values, expected {cols}")
        yield quantize_rows(block) if int8 else (block, None)


def _vocab_matrix(ckpt: Checkpoint, name: str, precision: str, as_head: bool = False, ids: Sequence[int] | None = None) -> nn.Module:
    """The vocabulary matrix `name` (all rows, or the sorted `ids`) as an embedding or an
    output head, converted to `precision` in slices of rows."""
    int8 = vocab_precision(precision) == "int8"
    count = ckpt.config.vocab_size if ids is None else len(ids)
    weight = torch.empty(count, ckpt.config.hidden_size, dtype=torch.int8 if int8 else torch.float32)
    scale = torch.empty(count)
    at = 0
    for block, block_scale in vocab_rows(ckpt, name, precision, ids):
        rows = slice(at, at + len(block))
        weight[rows] = block
        if int8:
            scale[rows] = block_scale
        at = rows.stop
    if as_head:
        return Int8Linear(weight, scale) if int8 else FloatLinear(weight)
    return Int8Embedding(weight, scale) if int8 else nn.Embedding.from_pretrained(weight, freeze=True)


def _row_slices(ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(start, stop) slices covering the sorted `ids` in order, runs of consecutive ids
    together and none longer than ROWS_PER_CHUNK."""
    i = 0
    while i < len(ids):
        j = min(i + ROWS_PER_CHUNK, len(ids))
        if ids[j - 1] - ids[i] != j - 1 - i:  # a gap before j: stop at it
            j = i + 1
            while ids[j] == ids[j - 1] + 1:
                j += 1
        yield ids[i], ids[j - 1] + 1
        i = j


def _assign(model: Transformer, name: str, tensor: torch.Tensor | QuantBlocks, precision: str, source: Path, linears: dict) -> None:
    """Put `tensor` in its place in `model`; a linear layer is built in `precision` once
    `linears` (its pending tensors) holds its weight and any bias."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
        expected = getattr(module, attr)
    except AttributeError:
        raise LlmcadError(f"{source}: unexpected tensor {name!r}") from None
    if not isinstance(expected, torch.Tensor) or tuple(expected.shape) != tuple(tensor.shape):
        shape = tuple(getattr(expected, "shape", ()))
        raise LlmcadError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
    if isinstance(module, nn.Linear):
        parts = linears.setdefault(module_name, {})
        parts[attr] = tensor
        if "weight" in parts and ("bias" in parts or module.bias is None):
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear_from(linear_tensors(parts["weight"], parts.get("bias"), precision)))
            del linears[module_name]
        return
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
    if not _is_incomplete(module):
        convert_submodule(model, module_name, precision)


def _is_incomplete(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters(recurse=False))


# ---- Hugging Face folders -------------------------------------------------------------


def _open_hf(folder: Path) -> Checkpoint:
    config_path = _config_path(folder)
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LlmcadError(f"{config_path}: not valid JSON ({e})") from None
    files = _safetensors_files(folder)
    config = ModelConfig.from_hf(raw, str(config_path))
    count = 0
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                count += sum(_hf_name(k, config.family) is not None for k in f.keys())
        except (SafetensorError, OSError) as e:
            raise LlmcadError(f"{file}: unreadable safetensors file ({e})") from None
    return Checkpoint(folder, config, source_bytes(folder), count)


def source_bytes(path: Path) -> int:
    """A model's bytes as `Checkpoint.file_bytes` counts them (a GGUF file's size, or the
    sum of a folder's safetensors files), from the file system alone."""
    if not path.is_dir():
        return path.stat().st_size
    _config_path(path)
    return sum(f.stat().st_size for f in _safetensors_files(path))


def _config_path(folder: Path) -> Path:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LlmcadError(f"{config_path}: missing (a Hugging Face model folder needs config.json)")
    return config_path


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise LlmcadError(f"{index}: unreadable index ({e})") from None
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LlmcadError(f"{folder}: no *.safetensors weights in the folder")
    for f in files:
        if not f.is_file():
            raise LlmcadError(f"{f}: missing (listed in {index.name})")
    return files


def _hf_name(key: str, family: Family) -> str | None:
    """A safetensors key as the model names it (the family's prefix stripped: `model.`, a
    multimodal checkpoint's `model.language_model.`); None for a tensor not read (its
    vision tower)."""
    if key.startswith(family.hf_ignored):
        return None
    prefix = next((p for p in family.hf_prefixes if key.startswith(p)), "")
    return key[len(prefix) :]


def _hf_tensors(folder: Path, skip: Container[str], family: Family) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _safetensors_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = _hf_name(key, family)
                    if name is not None and name not in skip:
                        yield name, f.get_tensor(key).to(torch.float32)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise LlmcadError(f"{file}: unreadable safetensors file ({e})") from None


def _hf_rows(folder: Path, name: str, family: Family, start: int, stop: int) -> torch.Tensor:
    for file in _safetensors_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                key = next((k for k in f.keys() if _hf_name(k, family) == name), None)
                if key is not None:
                    return f.get_slice(key)[start:stop].to(torch.float32)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise LlmcadError(f"{file}: unreadable safetensors file ({e})") from None
    raise LlmcadError(f"{folder}: no tensor {name}")


# ---- GGUF files -------------------------------------------------------------------------


def _open_gguf(path: Path) -> Checkpoint:
    file = GGUFFile(path)
    tensors = {t.name: t for t in file.tensors}
    # rotary settings stored as tensors: llama.cpp's frequency divisors, Phi-3's longrope factors
    factors = {name.removesuffix(".weight"): file.dequantize(tensors[name]).tolist() for name in GGUF_ROPE_TENSORS if name in tensors}
    config = ModelConfig.from_gguf(file.fields, str(path), tie_word_embeddings="output.weight" not in tensors, rope_factors=factors)
    return Checkpoint(path, config, path.stat().st_size, len(file.tensors), file)


def _gguf_name(gguf_name: str, names: dict[str, str]) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{names.get(parts[2], parts[2])}.{parts[3]}"
    return f"{names.get(parts[0], parts[0])}.{parts[1]}"


def _gguf_tensors(ckpt: Checkpoint, skip: Container[str], blocks: bool) -> Iterator[tuple[str, torch.Tensor | QuantBlocks]]:
    config = ckpt.config
    names = config.family.gguf_name_map()
    for t in ckpt.gguf.tensors:
        name = _gguf_name(t.name, names)
        if t.name in GGUF_ROPE_TENSORS or name in skip:
            continue
        tensor = _quant_blocks(ckpt.gguf.path, t) if blocks else None
        if tensor is None:
            tensor = torch.from_numpy(ckpt.gguf.dequantize(t))
        if config.family.gguf_rope_permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            tensor = _unpermute_rope(tensor, heads)
        yield name, tensor


def _split_fused(config: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor | QuantBlocks]]) -> Iterator[tuple[str, torch.Tensor | QuantBlocks]]:
    """The family's fused projections (Phi-3's qkv_proj, gate_up_proj) as their parts, by
    rows (a GGUF matrix's blocks too: each row is quantized on its own), so the model, the
    layer store and the kernels see ordinary matrices."""
    parts = _fused_parts(config)
    for name, tensor in tensors:
        module, _, kind = name.rpartition(".")  # layers.3.self_attn.qkv_proj, weight
        top, _, rest = module.partition(".")
        index, _, rel = rest.partition(".")
        split = parts.get(rel) if top == "layers" else None
        if split is None:
            yield name, tensor
            continue
        rows = tensor.shape[0]
        if rows != sum(n for _, n in split):
            raise LlmcadError(f"tensor {name!r} has {rows} rows, expected {sum(n for _, n in split)} ({' + '.join(p for p, _ in split)})")
        at = 0
        for part, n in split:
            piece = replace(tensor, data=tensor.data[at : at + n]) if isinstance(tensor, QuantBlocks) else tensor[at : at + n]
            yield f"layers.{index}.{part}.{kind}", piece
            at += n


def _fused_parts(config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Fused module (relative to a layer) -> its parts and their rows, from the model's own shapes."""
    with torch.device("meta"):
        block = Block(config)
    return {fused: [(part, block.get_submodule(part).out_features) for part in parts] for fused, parts in config.family.fused.items()}


def _quant_blocks(path: Path, tensor: GGUFTensor) -> QuantBlocks | None:
    """`tensor`'s stored blocks, if it is a matrix in a type the native kernels compute."""
    qtype = QTYPE_OF_GGML.get(tensor.type.value) if len(tensor.shape) == 2 else None
    return None if qtype is None else QuantBlocks(qtype, torch.from_numpy(read_tensor(path, tensor)), tensor.shape[1])


def _unpermute_rope(w: torch.Tensor | QuantBlocks, heads: int) -> torch.Tensor | QuantBlocks:
    """llama.cpp stores Llama's q/k rows with rotary pairs interleaved; restore the HF layout
    (for blocks, a reordering of their rows: each row is quantized on its own)."""
    if isinstance(w, QuantBlocks):
        return replace(w, data=_unpermute_rope(w.data, heads).contiguous())
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
