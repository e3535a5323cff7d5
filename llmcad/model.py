"""The Llama/Qwen2 transformer over a preallocated KV cache.

One forward pass takes token ids, their explicit rotary positions, the cache slot where
their keys and values go, and (optionally) an explicit attention mask over the cache. That
is all a token tree needs: its nodes sit in consecutive slots, each at position
`prefix + depth`, each attending to the committed prefix and to its own ancestors.

Batch size is always 1; tensors carry no batch dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llmcad.config import ModelConfig


ROW_CHUNK = 64  # tokens run through a layer at a time: bounds activation memory for long prompts


class KVCache:
    """Keys and values for every layer, preallocated for `max_len` slots.

    `tokens` names what the first slots hold: the keys and values of `tokens[i]` at
    position i are in slot i. Decoders extend it only after a pass has written those slots
    and cut it before a pass overwrites any, so it is true at every moment, and a later
    prompt that begins with the same tokens reuses those entries (the prompt cache)."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype = torch.float32):
        shape = (config.num_layers, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
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
        self.k[:, :, dst] = self.k[:, :, src]
        self.v[:, :, dst] = self.v[:, :, src]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split (GPT-NeoX / Hugging Face) layout. x: [T, heads, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


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
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, k_cache, v_cache, start: int, mask: torch.Tensor | None):
        n = x.shape[0]
        q = rotate(self.q_proj(x).view(n, self.num_heads, self.head_dim), cos, sin)
        k = rotate(self.k_proj(x).view(n, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        end = start + n
        k_cache[:, start:end] = k.transpose(0, 1)
        v_cache[:, start:end] = v.transpose(0, 1)
        return self.o_proj(self._attend(q, k_cache[:, :end], v_cache[:, :end], mask))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Grouped-query attention: the query heads sharing a KV head are stacked as one
        matrix, so keys and values are never repeated. q: [T, H, D]; k, v: [KV, S, D].

        Computed in float64 and rounded to float32: a matmul's summation order depends on
        how many rows and cache slots it sees, so in float32 a token's attention output
        differs in its last bits between a one-token decode step and a tree verification
        pass. In float64 those differences vanish in the rounding back to float32 (all but
        certainly), so a token's result does not depend on what else is in the pass; with
        int8 linears, whose rows are already independent, verification is then exact."""
        n, kv, group, dim = q.shape[0], self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = q.double().view(n, kv, group, dim).permute(1, 2, 0, 3).reshape(kv, group * n, dim)
        scores = (q @ k.double().transpose(1, 2)).mul_(dim**-0.5).view(kv, group, n, -1)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, k_cache, v_cache, start: int, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]  # [T, 1, head_dim]
        cos, sin = angles.cos(), angles.sin()
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            for a in range(0, n, ROW_CHUNK):  # bounded activations for long prompts
                rows = slice(a, min(n, a + ROW_CHUNK))
                part_mask = None if mask is None else mask[rows, : start + rows.stop]
                x[rows] = layer(x[rows], cos[rows], sin[rows], cache.k[i], cache.v[i], start + a, part_mask)
        if last_only:
            x = x[-1:]
        return self.lm_head(self.norm(x))
