"""The transformer of every family over a preallocated KV cache.

One forward pass takes token ids, their explicit rotary positions, the cache slot where
their keys and values go, and (optionally) an explicit attention mask over the cache. That
is all a token tree needs: its nodes sit in consecutive slots, each at position
`prefix + depth`, each attending to the committed prefix and to its own ancestors.

What a family changes is read from its `Family` (llmcad.families) and the config when a
module is built, never from the family's name: q/k norms, QKV bias, norms after the
sublayers, the gate's activation, embedding scale, query scale and soft-capping, partial
rotary dimensions; per layer, a sliding window and its rotary table. A sliding window is
a mask over the cache, from the positions the cache records per slot, so a tree node at
depth d attends to exactly the window a token at its position sees.

Batch size is always 1; tensors carry no batch dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from llmcad import kernels
from llmcad.config import ModelConfig
from llmcad.quant import QuantLinear, SharedInput

ROW_CHUNK = 64  # tokens run through a layer at a time: bounds activation memory for long prompts


class KVCache:
    """Keys and values for every layer, preallocated for `max_len` slots: keys transposed
    ([layers, kv heads, head dim, slots], so attention scores consecutive slots with one
    vector operation per dimension), values as rows ([layers, kv heads, slots, head dim]).

    `tokens` names what the first slots hold: the keys and values of `tokens[i]` at
    position i are in slot i. Decoders extend it only after a pass has written those slots
    and cut it before a pass overwrites any, so it is true at every moment, and a later
    prompt that begins with the same tokens reuses those entries (the prompt cache)."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype = torch.float32):
        self.k = torch.zeros(config.num_layers, config.num_kv_heads, config.head_dim, max_len, dtype=dtype)
        self.v = torch.zeros(config.num_layers, config.num_kv_heads, max_len, config.head_dim, dtype=dtype)
        # the rotary position of each slot's entry, for sliding windows (whose models alone keep it)
        self.pos = torch.zeros(max_len, dtype=torch.long) if config.windowed_layers else None
        self.max_len = max_len
        self.tokens: list[int] = []

    def keep_prefix(self, ids: Sequence[int]) -> int:
        """Keep the entries of the longest common prefix of `tokens` and `ids`, short of
        the last id (a pass must run at least one token to give logits); forget the rest.
        Returns how many entries are kept."""
        n = 0
        for cached, new in zip(self.tokens, ids[: len(ids) - 1]):
            if cached != new:
                break
            n += 1
        del self.tokens[n:]
        return n

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def bytes_for(config: ModelConfig, max_len: int, dtype: torch.dtype = torch.float32) -> int:
        return 2 * config.num_layers * config.num_kv_heads * max_len * config.head_dim * dtype.itemsize

    def move(self, src: torch.Tensor, dst_start: int) -> None:
        """Copy the entries at slots `src` to slots `dst_start, dst_start + 1, ...` in place.

        Committing an accepted path of a token tree is one such call.
        """
        dst = slice(dst_start, dst_start + len(src))
        self.k[..., dst] = self.k[..., src]
        self.v[:, :, dst] = self.v[:, :, src]
        if self.pos is not None:
            self.pos[dst] = self.pos[src]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if kernels.available():  # one call in place of six ops
        return kernels.rms_norm(x, weight, eps)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split (GPT-NeoX / Hugging Face) layout. x: [T, heads, dim];
    where cos and sin cover fewer dimensions (partial rotary), the rest pass unrotated."""
    dim = cos.shape[-1]
    if dim != x.shape[-1]:
        return torch.cat((rotate(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.query_scale if c.query_scale is not None else c.head_dim**-0.5
        self.softcap = c.attn_softcap
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.qkv = SharedInput()
        self.qk_norm = c.family.qk_norm
        if self.qk_norm:  # per head, before the rotation
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, start: int, mask: torch.Tensor | None):
        n = x.shape[0]
        q, k, v = self.qkv(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if kernels.available():  # the rotation, the cache writes and the attention in one call (~20 ops fewer)
            return self.o_proj(kernels.rotary_attention(q, k, v, cos, sin, k_cache, v_cache, start, mask, self.scale, self.softcap))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        end = start + n
        k_cache[:, :, start:end] = k.permute(1, 2, 0)
        v_cache[:, start:end] = v.transpose(0, 1)
        return self.o_proj(self._attend(q, k_cache, v_cache, end, mask))

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Grouped-query attention of q [T, H, D] over the first `slots` entries of the cache
        layer (keys [KV, D, max_len], values [KV, max_len, D]), without the native kernels. A
        token's result must not depend on what else is in the pass (a tree verification must
        see what one-token decoding sees), which PyTorch's float32 matmuls do not give: their
        summation order depends on how many rows and slots they see. The native kernel
        (`kernels.rotary_attention`) computes each row on its own in a fixed order. Here the
        query heads sharing a KV head are stacked as one matrix (keys and values never
        repeated) and computed in float64, rounded to float32: the order's differences vanish
        in that rounding (all but certainly)."""
        k, v = k_cache[..., :slots], v_cache[:, :slots]
        n, kv, group, dim = q.shape[0], self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = q.double().view(n, kv, group, dim).permute(1, 2, 0, 3).reshape(kv, group * n, dim)
        scores = (q @ k.double()).mul_(self.scale).view(kv, group, n, -1)
        if self.softcap:
            scores = scores.div_(self.softcap).tanh_().mul_(self.softcap)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(kv, group * n, -1)
        out = (probs @ v.double()).view(kv, group, n, dim).permute(2, 0, 1, 3)
        return out.reshape(n, kv * group * dim).float()


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.act = ACTIVATIONS[c.family.activation]
        self.gate_up = SharedInput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x, self.gate_proj, self.up_proj)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    """One layer. Its tensors are the same in every layer of a model (per-layer settings,
    the window and the rotary table, come with the call), so one Block built over a buffer
    serves any streamed layer. Module names are Hugging Face's: with `sandwich_norms`
    `post_attention_layernorm` normalizes the attention's output (Gemma), else the MLP's
    input (Llama)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)
        self.sandwich = c.family.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # what `kernels.Layer` computes: the Llama family's layer, its linears in GGUF blocks
        self.native_family = kernels.available() and not (self.sandwich or c.family.qk_norm) and c.family.activation == "silu"
        self.native: tuple[tuple, kernels.Layer] | None = None  # (the parts it was built over, the call)

    def forward(self, x, cos, sin, k_cache, v_cache, start: int, mask):
        native = self._native_layer()
        if native is not None:
            return native(x, cos, sin, k_cache, v_cache, start, mask)
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start, mask))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _native_layer(self) -> kernels.Layer | None:
        """The layer as one native call (the modules' bits but silu's: `kernels.Layer`), where
        its family and its linears allow; built for the parts it last saw, again when they
        change (a linear replaced, a norm weight's storage)."""
        attn, mlp = self.self_attn, self.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not (self.native_family and all(isinstance(linear, QuantLinear) for linear in linears)):
            self.native = None
            return None
        parts = (*linears, self.input_layernorm.weight.data_ptr(), self.post_attention_layernorm.weight.data_ptr())
        if self.native is None or parts != self.native[0]:  # modules compare by identity
            q, k, v, o, gate, up, down = ((linear.blocks, linear.qtype) for linear in linears)
            layer = kernels.Layer(self.input_layernorm.weight, self.post_attention_layernorm.weight, self.input_layernorm.eps, [q, k, v],
                                  [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], o, [gate, up], down, attn.num_heads,
                                  attn.num_kv_heads, attn.head_dim, attn.scale, attn.softcap)
            self.native = parts, layer
        return self.native[1]


class Transformer(nn.Module):
    """Parameter names follow Hugging Face's, without the leading `model.`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # given its weight, nn.Embedding skips the random init, which on the meta device
        # imports 800 modules (72 MB of RSS) the first time; built on the CPU, the table is
        # left uninitialized (every caller loads or sets the weights)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", config.rope_inv_freq(), persistent=False)
        # longrope: positions from `long_from` on rotate with the long factors
        self.long_from = config.rope_long_from
        self.inv_freq_long = config.rope_inv_freq(long=True) if self.long_from is not None else None
        self.rope_factor = config.rope_attention_factor
        # sliding-window layers with a rotary base of their own (Gemma 3)
        self.inv_freq_local = config.rope_inv_freq(local=True) if config.rope_local_theta is not None else None
        self.windows = [config.layer_window(i) for i in range(config.num_layers)]
        self.window = config.sliding_window if any(self.windows) else None
        self.embed_scale = torch.tensor(config.hidden_size**0.5, device="cpu") if config.family.embed_scale else None
        self.final_softcap = config.final_softcap

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        start: int,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run `tokens` ([T] ids at rotary `positions`) whose keys/values go to cache slots
        `start .. start+T`, and return logits ([T, vocab], or [1, vocab] if `last_only`).

        `mask` ([T, start+T] bool, True = may attend) defaults to causal attention over
        all earlier slots.
        """
        n = tokens.shape[0]
        if start + n > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} slots; asked for {start + n}")
        if mask is None and n > 1:
            mask = torch.ones(n, start + n, dtype=torch.bool).tril(start)
        cos, sin = self._rotary(positions, self.inv_freq)
        local_mask = cos_local = sin_local = None
        if self.window is not None:
            local_mask = self._window_mask(positions, cache, start, mask)
            if self.inv_freq_local is not None:
                cos_local, sin_local = self._rotary(positions, self.inv_freq_local)
        x = self.embed_tokens(tokens)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for i, layer in enumerate(self.layers):
            windowed = self.windows[i] is not None
            layer_mask = local_mask if windowed else mask
            c, s = (cos_local, sin_local) if windowed and cos_local is not None else (cos, sin)
            for a in range(0, n, ROW_CHUNK):  # bounded activations for long prompts
                rows = slice(a, min(n, a + ROW_CHUNK))
                part_mask = None if layer_mask is None else layer_mask[rows, : start + rows.stop]
                x[rows] = layer(x[rows], c[rows], s[rows], cache.k[i], cache.v[i], start + a, part_mask)
        if last_only:
            x = x[-1:]
        logits = self.lm_head(self.norm(x))
        if self.final_softcap:  # -inf (a token a draft's head leaves out) stays -inf
            capped = torch.tanh(logits / self.final_softcap) * self.final_softcap
            logits = capped.masked_fill_(torch.isneginf(logits), -torch.inf)
        return logits

    def _rotary(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, rotary dims] of each row's own position: a token's rotation
        never depends on the other rows of its pass (longrope picks the short or the long
        factors per position, as transformers does decoding token by token)."""
        if self.inv_freq_long is not None and inv_freq is self.inv_freq:
            inv_freq = torch.where((positions >= self.long_from)[:, None], self.inv_freq_long[None, :], inv_freq[None, :])
            angles = positions.to(torch.float32)[:, None] * inv_freq
        else:
            angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        cos, sin = angles.cos(), angles.sin()
        if self.rope_factor != 1.0:
            cos, sin = cos * self.rope_factor, sin * self.rope_factor
        return cos, sin

    def _window_mask(self, positions: torch.Tensor, cache: KVCache, start: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The sliding-window layers' mask: `mask` (causal or a tree's) and, for a query at
        position p, only cache entries at positions p - window + 1 .. p. Records the rows'
        positions in the cache first. None where that is `mask` itself."""
        end = start + positions.shape[0]
        cache.pos[start:end] = positions
        keys = cache.pos[:end]
        if int(positions.max()) - int(keys.min()) < self.window:  # every entry is within every row's window
            return mask
        near = (positions[:, None] - keys[None, :]) < self.window
        return near if mask is None else mask & near
