"""Native kernels for GGUF's quantized formats: y = x W^T with W in Q4_K, Q6_K, Q8_0, Q5_0 or
Q4_0; a Q4_0 quantizer; attention over a KV cache; and the glue of a layer that costs
PyTorch many small ops (the rotary embedding with the cache writes, RMSNorm).

The C++ library (`qmatmul.cpp` with its kernel templates `tiles.h`, built by `pip install` as
`_qmatmul*.so` beside this file and loaded with ctypes) works on matrices repacked once by
`pack` from GGUF's blocks into tiles of 16 columns (same bits per weight, Q4_K 3% more), so a
vector instruction computes 16 columns' dot products at once and a decoded tile serves several
activation rows. It quantizes each activation row to int8 on its own; every output row gets the
same bits whatever the number of rows in the call, the thread count and the dispatch path, so
verifying a token tree reproduces one-token decoding exactly. `attention` (`attention.h`)
computes each query row and head on its own in float32 in one fixed order, with the same
guarantee; `rotary_attention` rotates a pass's queries and keys (the bits of `model.rotate`),
stores its keys and values and attends, in one call; `rms_norm` normalizes each row on its own.
The model calls these two where PyTorch would spend ~25 ops a layer (~0.2 ms on this project's
2-core test machine); `Layer` chains them with the products into a whole Llama-family layer.

Dispatch paths: `avx512` (AVX-512 F/BW/VL/VNNI), `avxvnni` (AVX2 with AVX-VNNI), `avx2`
(AVX2, FMA, F16C) and `portable` (plain C++); the best one this CPU runs is used unless
`LLMCAD_KERNEL_PATH` names another. Without the library (`available()` is False,
`unavailable_reason()` says why) precision gguf is refused and the engine computes with
PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from functools import cache
from pathlib import Path

import torch

# GGUF block types the kernels compute: (weights per block, bytes per block, ggml type id)
QTYPES = {"q4_k": (256, 144, 12), "q6_k": (256, 210, 14), "q8_0": (32, 34, 8), "q5_0": (32, 22, 6), "q4_0": (32, 18, 2)}
PACKED_BYTES = {"q4_k": 148, "q6_k": 210, "q8_0": 34, "q5_0": 22, "q4_0": 18}  # per column and block, packed
QTYPE_IDS = {name: i for i, name in enumerate(QTYPES)}  # the library's numbering
TILE_COLUMNS = 16  # columns (output rows) a packed tile holds: a packed matrix splits only at multiples of it
ABI = 5  # the library interface these bindings call (llmcad_abi)
PATHS = ("portable", "avx2", "avxvnni", "avx512")
PATH_ENV = "LLMCAD_KERNEL_PATH"


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one GGUF row of `cols` weights in `qtype`."""
    block, nbytes, _ = QTYPES[qtype]
    return cols // block * nbytes


def packed_row_bytes(qtype: str, cols: int) -> int:
    """Bytes per column of `cols` weights in `qtype`, packed."""
    return cols // QTYPES[qtype][0] * PACKED_BYTES[qtype]


def fits(qtype: str, cols: int) -> bool:
    return cols % QTYPES[qtype][0] == 0


class _LayerArgs(ctypes.Structure):
    """The library's `LlmcadLayer`: a layer's weights and shapes (qmatmul.cpp)."""

    _ptr, _i64 = ctypes.c_void_p, ctypes.c_int64
    _fields_ = [("attn_norm", _ptr), ("mlp_norm", _ptr), ("eps", ctypes.c_float), ("qkv_types", ctypes.c_int * 3), ("qkv", _ptr * 3),
                ("qkv_bias", _ptr * 3), ("o_type", ctypes.c_int), ("o", _ptr), ("gate_up_types", ctypes.c_int * 2), ("gate_up", _ptr * 2),
                ("down_type", ctypes.c_int), ("down", _ptr), ("hidden", _i64), ("inter", _i64), ("heads", _i64), ("kv_heads", _i64),
                ("dim", _i64), ("scale", ctypes.c_float), ("softcap", ctypes.c_float)]


@cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    here = Path(__file__).parent
    found = [here / f"_qmatmul{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    found = [p for p in found if p.is_file()]
    if not found:
        return None, f"the native kernel library was not built ({here}/_qmatmul*.so missing; reinstall with a C++ compiler)"
    try:
        lib = ctypes.CDLL(str(found[0]))
    except OSError as e:
        return None, f"the native kernel library did not load ({e})"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.llmcad_paths.restype = ctypes.c_int
    lib.llmcad_packed_bytes.argtypes = [ctypes.c_int, i64]
    lib.llmcad_packed_bytes.restype = i64
    lib.llmcad_pack.argtypes = [ctypes.c_int, ptr, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_int]
    lib.llmcad_pack.restype = ctypes.c_int
    lib.llmcad_dequantize.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ctypes.c_int]
    lib.llmcad_dequantize.restype = ctypes.c_int
    current = hasattr(lib, "llmcad_abi") and lib.llmcad_abi() == ABI and lib.llmcad_tile_columns() == TILE_COLUMNS
    if not current or any(lib.llmcad_packed_bytes(QTYPE_IDS[q], QTYPES[q][0]) != PACKED_BYTES[q] for q in QTYPES):
        return None, f"the native kernel library at {found[0]} is out of date (reinstall: pip install -e .)"
    lib.llmcad_matmul.argtypes = [ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, i64, ptr, i64, ptr, ctypes.c_int]
    lib.llmcad_matmul.restype = ctypes.c_int
    lib.llmcad_quantize.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ctypes.c_int]
    lib.llmcad_quantize.restype = ctypes.c_int
    f32 = ctypes.c_float
    lib.llmcad_attention.argtypes = [ctypes.c_int, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, ptr, f32, f32, ptr, ctypes.c_int]
    lib.llmcad_attention.restype = ctypes.c_int
    lib.llmcad_rotary_attention.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, ptr, ptr, i64, i64,
                                            ptr, f32, f32, ptr, ctypes.c_int]
    lib.llmcad_rotary_attention.restype = ctypes.c_int
    lib.llmcad_rms_norm.argtypes = [ptr, i64, i64, i64, ptr, f32, ptr]
    lib.llmcad_rms_norm.restype = ctypes.c_int
    lib.llmcad_layer.argtypes = [ctypes.c_int, ctypes.POINTER(_LayerArgs), ptr, i64, ptr, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_int]
    lib.llmcad_layer.restype = ctypes.c_int
    lib.llmcad_use_openmp.argtypes = [ptr, ptr, ptr]
    lib.llmcad_use_openmp.restype = None
    lib.llmcad_use_openmp(*_torch_openmp())
    return lib, ""


def _torch_openmp() -> tuple[int | None, int | None, int | None]:
    """GOMP_parallel, omp_get_thread_num and omp_get_num_threads of the OpenMP runtime PyTorch
    loaded (its own libgomp copy, or an Intel or LLVM runtime, which export the same entry
    points), so the kernels' threads are PyTorch's threads; (None, None, None) where none is
    found (the library then runs its own pool)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None, None, None
    runtimes = sorted({line.split()[-1] for line in maps.splitlines() if "/lib" in line and any(n in line for n in ("libgomp", "libiomp", "libomp"))})
    for path in runtimes:
        try:
            runtime = ctypes.CDLL(path)
            return tuple(ctypes.cast(getattr(runtime, name), ctypes.c_void_p).value for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"))
        except (OSError, AttributeError):
            continue
    return None, None, None


def available() -> bool:
    return _library()[0] is not None


def unavailable_reason() -> str:
    return _library()[1]


@cache
def supported_paths() -> tuple[str, ...]:
    """The dispatch paths this CPU runs (empty without the library)."""
    lib = _library()[0]
    if lib is None:
        return ()
    mask = lib.llmcad_paths()
    return tuple(p for i, p in enumerate(PATHS) if mask >> i & 1)


def active_path() -> str:
    """The path `matmul` uses: `LLMCAD_KERNEL_PATH` if set, else the fastest supported."""
    paths = supported_paths()
    if not paths:
        return "none"
    forced = os.environ.get(PATH_ENV)
    if forced:
        if forced not in paths:
            raise RuntimeError(f"{PATH_ENV}={forced}: this CPU or build runs only {', '.join(paths)}")
        return forced
    return paths[-1]


def _checked_library() -> ctypes.CDLL:
    lib = _library()[0]
    if lib is None:
        raise RuntimeError(unavailable_reason())
    return lib


def pack(blocks: torch.Tensor, qtype: str, cols: int, into: str | None = None) -> torch.Tensor:
    """The GGUF matrix `blocks` (uint8 [N, row_bytes] of `qtype`) in the kernels' tiles: uint8
    [N, packed_row_bytes]; of type `into` where given (only "q4_0"): each block dequantized
    and requantized, as `dequantize` and `quantize` would, in one pass."""
    lib = _checked_library()
    into = into or qtype
    blocks = blocks.contiguous()
    if blocks.dim() != 2 or blocks.shape[1] != row_bytes(qtype, cols) or not fits(qtype, cols):
        raise ValueError(f"{qtype} blocks of shape {tuple(blocks.shape)} do not hold rows of {cols} weights")
    if into not in (qtype, "q4_0"):
        raise ValueError(f"cannot pack {qtype} blocks as {into} (only as their own type, or q4_0)")
    out = torch.empty(blocks.shape[0], packed_row_bytes(into, cols), dtype=torch.uint8)
    if blocks.shape[0] and lib.llmcad_pack(QTYPE_IDS[qtype], blocks.data_ptr(), blocks.shape[1], blocks.shape[0], cols, QTYPE_IDS[into],
                                           out.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"llmcad_pack refused {qtype} [{blocks.shape[0]}, {cols}] as {into}")
    return out


def packed_cols(packed: torch.Tensor, qtype: str) -> int:
    """The weights per column (K) of a packed matrix."""
    return packed.shape[1] // PACKED_BYTES[qtype] * QTYPES[qtype][0]


def _check_packed(packed: torch.Tensor, qtype: str, cols: int) -> None:
    """`packed` must be a contiguous matrix from `pack` of `cols` weights a column."""
    if packed.shape[1] != packed_row_bytes(qtype, cols) or not fits(qtype, cols) or not packed.is_contiguous():
        raise ValueError(f"packed {qtype} columns of {packed.shape[1]} bytes do not hold {cols} weights")


def matmul(x: torch.Tensor, packed: torch.Tensor, qtype: str, path: str | None = None) -> torch.Tensor:
    """x [M, K] float32 times the [N, K] matrix held as `packed` (uint8 [N, packed_row_bytes], from `pack`) -> [M, N]."""
    return Product([(packed, qtype)])(x, path)


class Product:
    """x W^T for one or more packed matrices [N_i, K] (from `pack`) that take the same input,
    such as a layer's q, k and v: one call quantizes x once, the threads share out all the
    matrices' columns, and the products come out side by side, [M, sum of N_i]. Each column
    has the bits a `matmul` of its own matrix gives. The matrices are checked, and the
    library's arguments for them built, once (a model calls its products many times)."""

    def __init__(self, matrices: list[tuple[torch.Tensor, str]]):
        lib = _checked_library()
        self.cols = packed_cols(*matrices[0])
        for packed, qtype in matrices:
            _check_packed(packed, qtype, self.cols)
        self.widths = [packed.shape[0] for packed, _ in matrices]
        self.width = sum(self.widths)
        self.matrices = [(p, q) for p, q in matrices if p.shape[0]]  # referenced: the library reads them
        count, ptr = len(self.matrices), ctypes.c_void_p
        self._args = (count, (ctypes.c_int * count)(*(QTYPE_IDS[q] for _, q in self.matrices)),
                      (ptr * count)(*(p.data_ptr() for p, _ in self.matrices)),
                      (ctypes.c_int64 * count)(*(p.shape[0] for p, _ in self.matrices)), self.cols)
        self._matmul = lib.llmcad_matmul

    def __call__(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.cols:
            raise ValueError(f"packed matrices of {self.cols} weights a column do not hold input rows {tuple(x.shape)}")
        x = x.contiguous().float()
        y = torch.empty(x.shape[0], self.width)
        if x.shape[0] == 0 or not self.matrices:
            return y
        path = path or active_path()
        if self._matmul(PATHS.index(path), *self._args, x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads()):
            raise ValueError(f"llmcad_matmul refused {[(q, p.shape[0]) for p, q in self.matrices]} x {tuple(x.shape)} on path {path}")
        return y


def dequantize(packed: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """The weights held as `packed` (from `pack`) as float32 [N, cols]."""
    lib = _checked_library()
    packed = packed.contiguous()
    _check_packed(packed, qtype, cols)
    out = torch.empty(packed.shape[0], cols)
    if packed.shape[0] and lib.llmcad_dequantize(QTYPE_IDS[qtype], packed.data_ptr(), packed.shape[0], cols, out.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"llmcad_dequantize refused {qtype} [{packed.shape[0]}, {cols}]")
    return out


def quantize(weight: torch.Tensor, qtype: str = "q4_0") -> torch.Tensor:
    """The GGUF blocks (uint8 [N, row_bytes]) of `qtype` for a float matrix [N, K], as ggml's
    reference quantizer makes them (the `gguf` package's bits). Only Q4_0."""
    lib = _checked_library()
    weight = weight.contiguous().float()
    rows, cols = weight.shape
    if qtype != "q4_0" or not fits(qtype, cols):
        raise ValueError(f"cannot quantize [{rows}, {cols}] to {qtype} (only q4_0, in rows of whole blocks)")
    out = torch.empty(rows, row_bytes(qtype, cols), dtype=torch.uint8)
    if rows and lib.llmcad_quantize(QTYPE_IDS[qtype], weight.data_ptr(), rows, cols, out.data_ptr(), torch.get_num_threads()):
        raise ValueError(f"llmcad_quantize refused {qtype} [{rows}, {cols}]")
    return out


def _cache_layout(k: torch.Tensor, v: torch.Tensor, dim: int) -> bool:
    """Whether k and v are a cache layer as the attention kernels read it: contiguous float32
    keys [kv_heads, dim, capacity] (transposed) and values [kv_heads, capacity, dim]."""
    kv_heads, capacity = v.shape[0], v.shape[1]
    return (k.shape == (kv_heads, dim, capacity) and v.shape[2] == dim and k.dtype == torch.float32 and v.dtype == torch.float32
            and k.is_contiguous() and v.is_contiguous())


def _checked_mask(caller: str, mask: torch.Tensor | None, rows: int, slots: int) -> torch.Tensor | None:
    """An attention mask as the kernels read it: None, or bool [rows, slots], contiguous."""
    if mask is None:
        return None
    if mask.shape != (rows, slots) or mask.dtype != torch.bool:
        raise ValueError(f"{caller}: mask {tuple(mask.shape)} {mask.dtype} is not bool [{rows}, {slots}]")
    return mask.contiguous()


def _checked_pass(caller: str, rows: int, dim: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  start: int, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Checks what a pass of `rows` rows gives a layer's rotary attention (cos and sin [rows,
    1, rot], a cache layer with room from slot `start`); returns the mask as the kernels read it."""
    rot, capacity = cos.shape[-1], v_cache.shape[1]
    if not _cache_layout(k_cache, v_cache, dim) or not 0 <= start <= start + rows <= capacity:
        raise ValueError(f"{caller}: cache {tuple(k_cache.shape)} / {tuple(v_cache.shape)} cannot take {rows} entries from slot {start}")
    for t in (cos, sin):
        if t.shape != (rows, 1, rot) or t.dtype != torch.float32 or not t.is_contiguous() or rot > dim or rot % 2:
            raise ValueError(f"{caller}: cos/sin {tuple(t.shape)} {t.dtype} do not rotate {rows} rows of {dim} dims")
    return _checked_mask(caller, mask, rows, start + rows)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: int, mask: torch.Tensor | None, scale: float, softcap: float | None = None,
              path: str | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, soft-capped, masked) v for q [T, heads, dim] over the first `slots`
    entries of a KV cache layer: keys transposed, k [kv_heads, dim, max_len], values v
    [kv_heads, max_len, dim] (contiguous float32), each query head reading key/value head
    head // (heads // kv_heads); mask [T, slots] bool (True: may attend) or None. Returns
    [T, heads * dim] float32."""
    lib = _checked_library()
    rows, heads, dim = q.shape
    kv_heads, max_len = v.shape[0], v.shape[1]
    if not _cache_layout(k, v, dim) or not 0 < slots <= max_len:
        raise ValueError(f"attention: keys {tuple(k.shape)} and values {tuple(v.shape)} do not match queries {tuple(q.shape)} over {slots} slots")
    mask = _checked_mask("attention", mask, rows, slots)
    q = q.contiguous().float()
    out = torch.empty(rows, heads * dim)
    status = lib.llmcad_attention(PATHS.index(path or active_path()), q.data_ptr(), rows, heads, kv_heads, dim, k.data_ptr(), v.data_ptr(), max_len, slots,
                                  None if mask is None else mask.data_ptr(), scale, softcap or 0.0, out.data_ptr(), torch.get_num_threads())
    if status:
        raise ValueError(f"llmcad_attention refused {heads} heads over {kv_heads} key/value heads")
    return out


def rotary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, start: int, mask: torch.Tensor | None, scale: float, softcap: float | None = None,
                     path: str | None = None) -> torch.Tensor:
    """A layer's attention for one pass in one native call: q [T, heads, dim] and k [T, kv_heads,
    dim] rotated by cos and sin ([T, 1, rot] float32: the half-split rotary embedding of each
    head's first `rot` dims) with `model.rotate`'s arithmetic (the same bits), k and v
    [T, kv_heads, dim] stored at cache slots start .. start + T, then `attention` over
    start + T slots (mask [T, start + T] or None). q, k and v are float32 with each row's
    heads contiguous; their rows may lie any distance apart (views of a product's columns).
    Returns [T, heads * dim]."""
    lib = _checked_library()
    rows, heads, dim = q.shape
    kv_heads = v_cache.shape[0]
    for name, t, h in (("queries", q, heads), ("keys", k, kv_heads), ("values", v, kv_heads)):
        if t.shape != (rows, h, dim) or t.dtype != torch.float32 or t.stride(2) != 1 or t.stride(1) != dim:
            raise ValueError(f"rotary_attention: {name} {tuple(t.shape)} {t.dtype} are not float32 [{rows}, {h}, {dim}] with contiguous heads")
    mask = _checked_pass("rotary_attention", rows, dim, cos, sin, k_cache, v_cache, start, mask)
    out = torch.empty(rows, heads * dim)
    status = lib.llmcad_rotary_attention(PATHS.index(path or active_path()), q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(),
                                         v.stride(0), rows, heads, kv_heads, dim, cos.data_ptr(), sin.data_ptr(), cos.shape[-1], k_cache.data_ptr(),
                                         v_cache.data_ptr(), v_cache.shape[1], start, None if mask is None else mask.data_ptr(), scale, softcap or 0.0,
                                         out.data_ptr(), torch.get_num_threads())
    if status:
        raise ValueError(f"llmcad_rotary_attention refused {heads} heads over {kv_heads} key/value heads")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension of float32 x, in one native
    call (PyTorch takes 6 ops): each row on its own, its mean of squares from a double sum."""
    lib = _checked_library()
    dim = x.shape[-1]
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != (dim,) or not weight.is_contiguous():
        raise ValueError(f"rms_norm: input {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} {weight.dtype} are not float32 of {dim}")
    rows = x.reshape(-1, dim)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape)
    if lib.llmcad_rms_norm(rows.data_ptr(), rows.shape[0], dim, rows.stride(0) if rows.shape[0] > 1 else dim, weight.data_ptr(), eps, out.data_ptr()):
        raise ValueError(f"llmcad_rms_norm refused {tuple(x.shape)}")
    return out


class Layer:
    """A pre-norm decoder layer of the Llama family (no q/k norms, no norms after the
    sublayers, SwiGLU) as one native call: x + attention, then + MLP. Each step has the bits
    of the calls above one by one (`rms_norm`, `Product`, the biases added, `rotary_attention`),
    but silu(gate), whose exp is a vectorized polynomial: within two ulps of PyTorch's, and an ulp may
    move an activation's int8 rounding in the down product. Each row depends on its own input
    and the cache alone, as with the calls one by one. A layer costs ~25 calls from Python
    that way (~0.2 ms on a 2-core machine); this costs one. The tensors (packed matrices
    `(packed, qtype)`, norm weights, biases or None) are read where they lie at every call: a
    layer buffer refilled in place needs no new `Layer`."""

    def __init__(self, attn_norm: torch.Tensor, mlp_norm: torch.Tensor, eps: float, qkv: list[tuple[torch.Tensor, str]],
                 qkv_bias: list[torch.Tensor | None], o: tuple[torch.Tensor, str], gate_up: list[tuple[torch.Tensor, str]],
                 down: tuple[torch.Tensor, str], heads: int, kv_heads: int, dim: int, scale: float, softcap: float | None = None):
        self._lib = _checked_library()
        hidden, inter = attn_norm.shape[0], gate_up[0][0].shape[0]
        shapes = [(qkv[0], heads * dim, hidden), (qkv[1], kv_heads * dim, hidden), (qkv[2], kv_heads * dim, hidden), (o, hidden, heads * dim),
                  (gate_up[0], inter, hidden), (gate_up[1], inter, hidden), (down, hidden, inter)]
        for (packed, qtype), n, k in shapes:
            if packed.shape[0] != n or not fits(qtype, k):
                raise ValueError(f"Layer: a packed {qtype} matrix of {packed.shape[0]} columns is not [{n}, {k}]")
            _check_packed(packed, qtype, k)
        for t, n in [(attn_norm, hidden), (mlp_norm, hidden)] + [(b, m) for b, m in zip(qkv_bias, (heads * dim, kv_heads * dim, kv_heads * dim)) if b is not None]:
            if t.shape != (n,) or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"Layer: a norm weight or bias {tuple(t.shape)} {t.dtype} is not contiguous float32 [{n}]")
        self.hidden, self.heads, self.dim = hidden, heads, dim
        self.tensors = (attn_norm, mlp_norm, qkv, qkv_bias, o, gate_up, down)  # referenced: the library reads them
        a = self._args = _LayerArgs(attn_norm=attn_norm.data_ptr(), mlp_norm=mlp_norm.data_ptr(), eps=eps, o_type=QTYPE_IDS[o[1]], o=o[0].data_ptr(),
                                    down_type=QTYPE_IDS[down[1]], down=down[0].data_ptr(), hidden=hidden, inter=inter, heads=heads,
                                    kv_heads=kv_heads, dim=dim, scale=scale, softcap=softcap or 0.0)
        for i, ((packed, qtype), bias) in enumerate(zip(qkv, qkv_bias)):
            a.qkv_types[i], a.qkv[i], a.qkv_bias[i] = QTYPE_IDS[qtype], packed.data_ptr(), None if bias is None else bias.data_ptr()
        for i, (packed, qtype) in enumerate(gate_up):
            a.gate_up_types[i], a.gate_up[i] = QTYPE_IDS[qtype], packed.data_ptr()

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                 mask: torch.Tensor | None, path: str | None = None) -> torch.Tensor:
        """The layer's output for x [T, hidden] (float32), its keys and values stored at cache
        slots start .. start + T; cos, sin, the cache layer and mask as `rotary_attention` takes them."""
        rows = x.shape[0]
        if x.shape != (rows, self.hidden) or x.dtype != torch.float32:
            raise ValueError(f"Layer: input {tuple(x.shape)} {x.dtype} is not float32 [rows, {self.hidden}]")
        mask = _checked_pass("Layer", rows, self.dim, cos, sin, k_cache, v_cache, start, mask)
        x = x.contiguous()
        out = torch.empty(rows, self.hidden)
        if self._lib.llmcad_layer(PATHS.index(path or active_path()), ctypes.byref(self._args), x.data_ptr(), rows, cos.data_ptr(), sin.data_ptr(),
                                  cos.shape[-1], k_cache.data_ptr(), v_cache.data_ptr(), v_cache.shape[1], start,
                                  None if mask is None else mask.data_ptr(), out.data_ptr(), torch.get_num_threads()):
            raise ValueError(f"llmcad_layer refused a pass of {rows} rows ({self.heads} heads over {v_cache.shape[0]} key/value heads)")
        return out
