"""Causal self-attention with heads split across tensor-parallel ranks.

The fused QKV weight is laid out per key/value group, [q heads of the group, k, v],
so a contiguous TP slice of its rows holds whole groups: QKV splits by heads and,
with GQA, by KV heads, without any reshuffling.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear
from ..parallel.param_meta import set_meta
from ..parallel.random import recompute
from ..parallel.state import ParallelState
from .rope import RotaryEmbedding, apply_rotary

_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
             "math": "MATH"}


def sdpa_backend_context(name: str, device: torch.device):
    """Pin SDPA's kernel for a forward pass (backward follows the forward's choice).

    PyTorch prefers FlashAttention-2; on Hopper cuDNN's attention is faster (benchmarks/RESULTS.md), so `auto`
    puts cuDNN first there, with flash and the rest as fallbacks for shapes cuDNN refuses. Entered at two
    depths only: around the whole model call by whoever runs it (the training step, evaluation, inference),
    outside any compiled region, since Dynamo cannot trace this context with priorities and bakes the
    choice in at trace time; and by eager attention itself, so a recompute inside backward picks the same.
    In deterministic mode (gpt3d/train/determinism.py) only flash, then math, are allowed.
    """
    if device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if torch.are_deterministic_algorithms_enabled():   # --deterministic-mode: flash's backward is deterministic
        order = ["flash", "math"]                          # there, cuDNN's and efficient's are not
    elif name == "auto":
        hopper = torch.cuda.get_device_capability(device)[0] >= 9
        order = ["cudnn", "flash", "efficient", "math"] if hopper else ["flash", "efficient", "cudnn", "math"]
    else:
        order = [name] + [n for n in ("flash", "efficient", "math") if n != name]
    return sdpa_kernel([getattr(SDPBackend, _BACKENDS[n]) for n in order], set_priority=True)


try:  # optional: the flash-attn package (--use-flash-attn)
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:
    _flash_attn_func = None


def split_qkv(qkv: torch.Tensor, kv: int, hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused QKV output [..., (heads + 2 kv) * hd] -> q [..., heads, hd], k and v [..., kv, hd]: per kv
    group its query heads, then its key, then its value (views where a group holds one query head)."""
    *lead, n = qkv.shape
    group = n // (kv * hd) - 2
    qkv = qkv.view(*lead, kv, group + 2, hd)
    return qkv[..., :group, :].reshape(*lead, kv * group, hd), qkv[..., group, :], qkv[..., group + 1, :]


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState):
        super().__init__()
        self.ps = ps
        self.head_dim = cfg.head_dim
        self.heads = cfg.num_attention_heads // ps.tp       # query heads on this rank
        self.kv_heads = cfg.kv_heads // ps.tp                # key/value heads on this rank
        self.dropout = cfg.attention_dropout
        self.selective_recompute = cfg.recompute_granularity == "selective"
        self.use_flash_attn = cfg.use_flash_attn and _flash_attn_func is not None
        self.backend = cfg.attention_backend
        bias = not cfg.disable_bias_linear
        qkv_out = (cfg.num_attention_heads + 2 * cfg.kv_heads) * self.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_out, ps, bias=bias, std=cfg.init_method_std)
        self.proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, ps, bias=bias,
                                      std=cfg.init_method_std / math.sqrt(2 * cfg.num_layers))
        self._fused_qkv = None
        self.rotary = None
        if cfg.use_rotary_position_embeddings:
            self.rotary = RotaryEmbedding(int(self.head_dim * cfg.rotary_percent), cfg.rotary_base,
                                          ps.device)

    def set_fused_qkv(self, fused) -> None:
        """`fused(x, qkv.weight, qkv.bias, kv_heads, head_dim)` -> (q, k, v) [tokens, heads|kv, hd] runs the QKV
        GEMM and its split as one (e.g. FP8, gpt3d/model/fp8_qkv.py); the TP layer keeps its communication.
        None: the linear, then split_qkv. q, k, v may be views made inside an autograd function: nothing here may
        modify them in place. Clears the QKV weight's gradient-accumulation mark, as MLP.set_fused does."""
        object.__setattr__(self, "_fused_qkv", fused)   # a plain attribute, never a submodule: names stay the same
        set_meta(self.qkv.weight, fuses_wgrad=False)

    def fused_linears(self) -> tuple[nn.Module, ...]:
        """The linears whose GEMMs a fused function runs (`set_fused_qkv`: the QKV linear; none without one)."""
        return () if self._fused_qkv is None else (self.qkv,)

    def forward(self, x: torch.Tensor, kv_cache: Optional[LayerKV] = None) -> torch.Tensor:
        if self._fused_qkv is not None:
            x = self.qkv.gather_input(x)
            b, s, _ = x.shape
            q, k, v = self._fused_qkv(x, self.qkv.weight, self.qkv.bias, self.kv_heads, self.head_dim)
            q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        else:
            qkv = self.qkv(x)                                  # [b, s, (heads + 2 kv) * hd]
            b, s, _ = qkv.shape
            q, k, v = split_qkv(qkv, self.kv_heads, self.head_dim)   # [b, s, heads|kv, hd]
        if kv_cache is not None:
            return self.proj(self._cached(q, k, v, kv_cache).reshape(b, s, self.heads * self.head_dim))
        # cos, sin [s, rot]: made outside the checkpointed region, whose side effects torch.compile cannot trace
        rope = self.rotary(s, q.device) if self.rotary is not None else ()
        if self.selective_recompute and self.training:
            y = recompute(self._core, q, k, v, *rope)
        else:
            y = self._core(q, k, v, *rope)                     # [b, s, heads, hd]
        return self.proj(y.reshape(b, s, self.heads * self.head_dim))

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: Optional[torch.Tensor] = None,
              sin: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RoPE (when cos/sin are given) + causal softmax attention: [b, s, heads|kv, hd] -> [b, s, heads, hd]."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads|kv, s, hd]
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # heads are split across TP: the kernel's dropout draws from the default generator, seeded per TP rank
        return self._attend(q, k, v, self.dropout if self.training else 0.0)

    def _cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV) -> torch.Tensor:
        """Inference only: the new tokens attend to the cached keys/values and their own causal prefix."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads|kv, s, hd]
        start, s = cache.start, q.shape[2]
        if self.rotary is not None:
            cos, sin = self.rotary(start + s, q.device)
            q, k = apply_rotary(q, cos[start:], sin[start:]), apply_rotary(k, cos[start:], sin[start:])
        k, v = cache.append(k, v)                              # [b, kv, start + s, hd]
        mask = None
        if s > 1:   # query i sees keys up to start + i
            mask = torch.ones(s, start + s, dtype=torch.bool, device=q.device).tril(start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads)
        return y.transpose(1, 2)                               # [b, s, heads, hd]

    def _attend(self, q, k, v, p: float) -> torch.Tensor:
        if self.use_flash_attn and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            y = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=True,
                                 deterministic=torch.are_deterministic_algorithms_enabled())
            return y                                           # [b, s, heads, hd]
        with sdpa_backend_context(self.backend, q.device):   # eager (and eager recompute in backward)
            y = self._sdpa(q, k, v, p)
        return y.transpose(1, 2)                               # [b, s, heads, hd]

    def _sdpa(self, q, k, v, p: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                              enable_gqa=self.kv_heads != self.heads)


class LayerKV:
    """One layer's cached keys/values [b, kv, t, hd]; `start` is the number of tokens already cached."""

    def __init__(self, cache: KVCache):
        self.cache, self.k, self.v = cache, None, None

    @property
    def start(self) -> int:
        return self.cache.length

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """Keys/values of every layer for incremental decoding; the model advances `length` after each call."""

    def __init__(self):
        self.layers: dict[str, LayerKV] = {}
        self.length = 0

    def layer(self, key: str) -> LayerKV:
        return self.layers.setdefault(key, LayerKV(self))
