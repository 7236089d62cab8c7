"""A Llama-architecture decoder in PyTorch whose attention is handed to a callable per layer.

The module tree and parameter names are those of Hugging Face's ``LlamaForCausalLM``
(``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, ..., ``model.norm``, ``lm_head``),
so a state dict moves between the two unchanged. The arithmetic follows it too (RMSNorm in float32,
rotate-half RoPE, SwiGLU MLP, grouped-query attention with scale 1/sqrt(head_dim)).

The model sees a flat batch (vLLM style): ``input_ids`` [num_tokens] of every scheduled sequence
back to back and their ``positions``. It owns no cache: each layer calls
``attention(layer, q, k, v) -> out`` with q [T, num_heads, head_dim] and k, v
[T, num_kv_heads, head_dim] (RoPE applied), and the engine's callable writes K/V into the paged
cache and runs the layer's backend (:class:`KvplugAttention` or :class:`TorchReferenceAttention`).
Layers whose backend rotates keys itself (``AttentionSpec.fuses_key_rope``: kv_shift, whose shift
acts on pre-RoPE keys) get k before RoPE; q is always rotated here.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

import kvplug

from .config import AttentionSpec, ModelConfig

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin of positions, as Hugging Face's default Llama rotary embedding computes them."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]  # [T, 1, head_dim]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                attention: AttentionFn, rope_keys: bool = True) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin).contiguous()
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        k = (apply_rope(k, cos, sin) if rope_keys else k).contiguous()
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim).contiguous()
        out = attention(layer, q, k, v)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                attention: AttentionFn, rope_keys: bool = True) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, attention, rope_keys)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)


class LlamaForCausalLM(nn.Module):
    """The decoder. ``forward`` returns final-normed hidden states; :meth:`compute_logits` applies
    the LM head to the rows that need logits (the engine asks only for those it samples from)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        #: Layers whose attention gets pre-RoPE keys (the backend rotates them in its write).
        self.raw_key_layers = frozenset(i for i, s in enumerate(cfg.layer_attention) if s.fuses_key_rope)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn,
                raw_key_layers: Optional[frozenset] = None) -> torch.Tensor:
        """``raw_key_layers``: layers that get pre-RoPE keys (default: this model config's)."""
        raw = self.raw_key_layers if raw_key_layers is None else raw_key_layers
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, attention, i not in raw)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # -------------------------------------------------------------------------------------------
    # Weights
    # -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_random(self, seed: int = 0, std: Optional[float] = None, lm_head_scale: float = 1.0) -> None:
        """Seeded random weights, the same on every machine for a given seed and shape: embeddings
        N(0, 1); projections N(0, std or 1/sqrt(fan_in)); norm weights 1 + N(0, 0.1); the LM head's
        std times ``lm_head_scale``. Attention is then far from uniform, so checks see real softmax."""
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        for name, p in self.named_parameters():  # a fixed order: registration order
            if name.endswith("embed_tokens.weight"):
                value = torch.randn(p.shape, generator=g)
            elif "norm" in name:
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            else:
                s = std if std is not None else 1.0 / math.sqrt(p.shape[1])
                if name == "lm_head.weight":
                    s *= lm_head_scale
                value = s * torch.randn(p.shape, generator=g)
            p.copy_(value.to(p.dtype))

    def load_weights(self, weights: Dict[str, Any]) -> None:
        """From a config's ``weights``: {"seed": ...} or {"safetensors": path}."""
        if "safetensors" in weights:
            self.load_safetensors(weights["safetensors"])
        else:
            self.init_random(seed=int(weights.get("seed", 0)), std=weights.get("std"),
                             lm_head_scale=float(weights.get("lm_head_scale", 1.0)))

    def save_safetensors(self, path: str) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, path)

    def load_safetensors(self, path: str) -> None:
        """Hugging Face names; missing or unexpected tensors are an error (except a tied LM head)."""
        from safetensors.torch import load_file

        state = load_file(path)
        missing, unexpected = self.load_state_dict(state, strict=False)
        if self.config.tie_word_embeddings:
            missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")


# ------------------------------------------------------------------------------------------------
# Attention backends of one layer, over the engine's paged cache
# ------------------------------------------------------------------------------------------------


class StepBatch:
    """The host-side description of one step, shared by every layer: what kvp_plan_update got."""

    __slots__ = ("num_seqs", "query_start_loc", "seq_lens", "block_table", "slot_mapping")

    def __init__(self, query_start_loc: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray,
                 slot_mapping: np.ndarray) -> None:
        self.num_seqs = int(seq_lens.shape[0])
        self.query_start_loc = query_start_loc
        self.seq_lens = seq_lens
        self.block_table = block_table
        self.slot_mapping = slot_mapping


class KvplugAttention:
    """A libkvplug backend: K/V written through the backend at the plan's slot mapping
    (kvp_attention_write_kv), then kvp_attention_run into a preallocated output. The config is
    the layer's :meth:`AttentionSpec.library_config` (kv_shift: the model's RoPE filled in). With
    ``summary_out`` set (a [num_heads, 6] float32 tensor on the run's device: the engine's entropy
    telemetry), every run also writes the per-head entropy summary there (kvp_attention_run_v2)."""

    def __init__(self, ctx: kvplug.Context, spec: AttentionSpec, cfg: ModelConfig, kv_dtype: str) -> None:
        self.spec = spec
        self.attn = kvplug.Attention(ctx, spec.backend, num_q_heads=cfg.num_attention_heads,
                                     num_kv_heads=cfg.num_key_value_heads, head_size=cfg.head_dim,
                                     kv_dtype=kv_dtype, config=spec.library_config(cfg))
        self.summary_out: Optional[torch.Tensor] = None

    def __call__(self, plan: kvplug.Plan, cache: kvplug.KvCache, batch: StepBatch, layer: int, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.attn.write_kv(plan, cache, layer, k, v)
        out = torch.empty_like(q)
        if self.summary_out is None:
            self.attn.run(plan, cache, layer, q, out)
        else:
            self.attn.run(plan, cache, layer, q, out, entropy_summary=self.summary_out)
        return out


class TorchReferenceAttention:
    """Plain PyTorch attention over the same paged cache: K/V written with kvp_kv_cache_write (not
    through a backend), then gathered block by block from a NumPy view of the layer's pages and
    attended per sequence, causal, with a DenseConfig's window_left and logits_soft_cap. CPU only."""

    def __init__(self, spec: AttentionSpec, cfg: ModelConfig) -> None:
        self.spec = spec
        self.window_left, self.soft_cap = spec.dense_params()
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def __call__(self, plan: kvplug.Plan, cache: kvplug.KvCache, batch: StepBatch, layer: int, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache.write(layer, k, v, batch.slot_mapping)
        pages = torch.from_numpy(cache.layer_view(layer))  # kv_first [2, blocks, block_size, kv_heads, d]
        if cache.layout != "kv_first" or cache.dtype != "float32":
            raise NotImplementedError("torch_reference reads float32 kv_first caches")
        bs = cache.block_size
        out = torch.empty_like(q)
        qsl, lens = batch.query_start_loc, batch.seq_lens
        for b in range(batch.num_seqs):
            n, lo, hi = int(lens[b]), int(qsl[b]), int(qsl[b + 1])
            blocks = torch.from_numpy(batch.block_table[b, : -(-n // bs)].astype(np.int64))
            kk = pages[0, blocks].reshape(-1, *pages.shape[3:])[:n].repeat_interleave(self.group, dim=1)
            vv = pages[1, blocks].reshape(-1, *pages.shape[3:])[:n].repeat_interleave(self.group, dim=1)
            logits = torch.einsum("qhd,khd->hqk", q[lo:hi], kk) * self.scale
            if self.soft_cap > 0:
                logits = self.soft_cap * torch.tanh(logits / self.soft_cap)
            pos_q = torch.arange(n - (hi - lo), n)[:, None]
            pos_k = torch.arange(n)[None, :]
            allowed = pos_k <= pos_q
            if self.window_left >= 0:
                allowed &= pos_k >= pos_q - self.window_left
            logits = logits.masked_fill(~allowed, float("-inf"))
            out[lo:hi] = torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), vv)
        return out
