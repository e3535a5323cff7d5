"""The native kernels (llmcad.kernels) on every dispatch path this CPU runs: packed matrices
dequantize to the gguf package's reference, products equal the dequantized fp32 product within
the activations' int8 rounding, every path gives the portable path's bits, and each output row
is bit-identical whatever the rows in the call and the thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llmcad import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason=kernels.unavailable_reason())
PATHS = kernels.supported_paths() or ("portable",)
SHAPES = [(48, 512), (18, 512), (40, 896), (160, 1536)]  # out x in: 18 and 40 end in a narrower tile; 896 = 3.5 super-blocks


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A matrix in `qtype`: the gguf package's own quantizer where it has one, else random
    codes and scales (every bit pattern of the codes is a valid block)."""
    rng = np.random.default_rng(seed)
    kind = GGMLQuantizationType(kernels.QTYPES[qtype][2])
    if qtype in ("q8_0", "q5_0"):
        return torch.from_numpy(np.ascontiguousarray(gguf_quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.02, kind)))
    block, nbytes, _ = kernels.QTYPES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    scales = lambda: (rng.random((rows, cols // block)) * 0.01 + 0.001).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if qtype == "q4_k":
        raw[..., 0:2], raw[..., 2:4] = scales(), scales()  # d, dmin
    else:
        raw[..., 208:210] = scales()  # q6_k's d
    return torch.from_numpy(raw.reshape(rows, -1))


def reference_weights(blocks: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    kind = GGMLQuantizationType(kernels.QTYPES[qtype][2])
    return torch.from_numpy(np.asarray(gguf_dequantize(blocks.numpy(), kind), dtype=np.float32).reshape(-1, cols))


def cases():
    return [(q, n, k) for q in kernels.QTYPES for n, k in SHAPES if kernels.fits(q, k)]


@pytest.mark.parametrize("qtype, rows, cols", cases())
def test_packed_matrix_dequantizes_to_the_gguf_reference(qtype, rows, cols):
    blocks = random_blocks(qtype, rows, cols)
    packed = kernels.pack(blocks, qtype, cols)
    assert packed.shape == (rows, kernels.packed_row_bytes(qtype, cols))
    assert torch.equal(kernels.dequantize(packed, qtype, cols), reference_weights(blocks, qtype, cols))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype, rows, cols", cases())
def test_matmul_is_the_dequantized_product(path, qtype, rows, cols):
    """Within the int8 rounding of the activations (per row, one scale per 256 values), and
    with the portable path's very bits (exact integer sums, the same float operations)."""
    blocks = random_blocks(qtype, rows, cols)
    packed = kernels.pack(blocks, qtype, cols)
    x = torch.randn(33, cols, generator=torch.Generator().manual_seed(1))
    exact = x @ reference_weights(blocks, qtype, cols).t()
    y = kernels.matmul(x, packed, qtype, path)
    assert ((y - exact).norm() / exact.norm()).item() < 0.012
    assert torch.equal(y, kernels.matmul(x, packed, qtype, "portable"))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", list(kernels.QTYPES))
def test_rows_are_bit_identical_at_any_batch_and_thread_count(path, qtype):
    """What speculation rests on: row r of a 128-row call equals row r computed alone, in
    a call of any other size (tiles of 64 rows, odd remainders), with 1 or 2 threads, and
    a column's value does not depend on where it falls among the columns a thread takes."""
    cols = 1536 if kernels.fits(qtype, 1536) else 896
    blocks = random_blocks(qtype, 96, cols, seed=2)
    packed = kernels.pack(blocks, qtype, cols)
    x = torch.randn(128, cols, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = kernels.matmul(x, packed, qtype, path)
        for count in (1, 2, 3, 7, 16, 63, 64, 65, 100):
            assert torch.equal(kernels.matmul(x[:count], packed, qtype, path), full[:count]), count
        torch.set_num_threads(1)
        assert torch.equal(kernels.matmul(x, packed, qtype, path), full)
        assert torch.equal(kernels.matmul(x[77:78], packed, qtype, path), full[77:78])
        for first in (1, 3):  # every column shifted to another lane of its tile
            assert torch.equal(kernels.matmul(x, kernels.pack(blocks[first:], qtype, cols), qtype, path), full[:, first:])
    finally:
        torch.set_num_threads(threads)


def test_pack_and_matmul_refuse_blocks_that_do_not_hold_the_columns():
    blocks = random_blocks("q4_k", 16, 512)
    packed = kernels.pack(blocks, "q4_k", 512)
    assert kernels.matmul(torch.randn(0, 512), packed, "q4_k").shape == (0, 16)  # no rows: nothing to do
    with pytest.raises(ValueError, match="do not hold"):
        kernels.matmul(torch.randn(2, 768), packed, "q4_k")
    with pytest.raises(ValueError, match="do not hold"):
        kernels.matmul(torch.randn(2, 512), blocks, "q4_k")  # GGUF's own layout, not packed
    with pytest.raises(ValueError, match="do not hold"):
        kernels.pack(blocks, "q4_k", 768)


def test_forced_path_must_be_supported(monkeypatch):
    monkeypatch.setenv(kernels.PATH_ENV, "portable")
    assert kernels.active_path() == "portable"
    monkeypatch.setenv(kernels.PATH_ENV, "neon")
    with pytest.raises(RuntimeError, match="runs only"):
        kernels.active_path()


def test_own_thread_pool_gives_the_same_bits_as_pytorchs_threads():
    """Where no OpenMP runtime is found the library splits columns over a pool of its own;
    a column is computed the same way on any thread, so the bits do not change."""
    lib = kernels._library()[0]
    blocks = kernels.pack(random_blocks("q4_k", 160, 1536), "q4_k", 1536)
    x = torch.randn(20, 1536, generator=torch.Generator().manual_seed(4))
    on_openmp = kernels.matmul(x, blocks, "q4_k")
    lib.llmcad_use_openmp(None, None, None)
    try:
        assert torch.equal(kernels.matmul(x, blocks, "q4_k"), on_openmp)
        assert torch.equal(kernels.matmul(x[:1], blocks, "q4_k"), on_openmp[:1])
    finally:
        lib.llmcad_use_openmp(*kernels._torch_openmp())


def test_without_the_library_the_cli_says_so_and_gguf_is_refused(monkeypatch, capsys, tiny_llama):
    """A machine where the library did not build: one line from the CLI, and precision gguf
    refused with the reason (its reference fallback is not batch-invariant)."""
    from llmcad import cli
    from llmcad.engine import Engine
    from llmcad.errors import LlmcadError

    monkeypatch.setattr(kernels, "_library", lambda: (None, "the native kernel library was not built"))
    assert cli.main(["info", str(tiny_llama)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not built; computing with PyTorch's kernels instead" in err
    with pytest.raises(LlmcadError, match="precision gguf needs the native kernels: the native kernel library was not built"):
        Engine.load(tiny_llama, precision="gguf", progress=False)
    assert Engine.load(tiny_llama, precision="int8", progress=False).precision == "int8"
