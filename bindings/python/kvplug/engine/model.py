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

Attamba layers (:class:`AttambaAttention`) have no k_proj / v_proj: K = x + SSM_k(x) and V = x +
SSM_v(x), x the layer's normed input, each SSM a Mamba-2 block whose GEMMs (``in_proj``,
``out_proj``) run here and whose chunk-local conv + scan + gated RMSNorm run in kvplug through the
engine's ``ssm(layer, which, block, zxbcdt) -> y`` callable (``kvp_attention_ssm``, state in the
cache's state slots); RoPE on Q and on the SSM'd K at global positions. Parameter names follow
mamba_ssm's Mamba2 under ``self_attn.k_ssm`` / ``self_attn.v_ssm`` (``in_proj.weight``,
``conv1d.weight`` [conv_dim, 1, width], ``conv1d.bias``, ``dt_bias``, ``A_log``, ``D``,
``norm.weight``, ``out_proj.weight``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

import kvplug

from .config import AttambaParams, AttentionSpec, ModelConfig

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: ssm(layer, which, block, zxbcdt) -> y: the chunk-local SSM of an attamba layer (which 0: keys, 1:
#: values) over in_proj's output [T, in_dim], returning y [T, d_inner] for out_proj.
SsmFn = Callable[[int, int, "AttambaSsm", torch.Tensor], torch.Tensor]


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
                attention: AttentionFn, rope_keys: bool = True, ssm: Optional[SsmFn] = None) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin).contiguous()
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        k = (apply_rope(k, cos, sin) if rope_keys else k).contiguous()
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim).contiguous()
        out = attention(layer, q, k, v)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class GatedNormWeight(nn.Module):
    """The gated RMSNorm's weight of a Mamba-2 block (mamba_ssm's ``norm.weight``); kvplug applies it."""

    def __init__(self, d_inner: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_inner))


class AttambaSsm(nn.Module):
    """The weights of one Mamba-2 block of an attamba layer: in_proj (hidden -> [z][xBC][dt]), the
    depthwise conv over xBC, dt_bias, A_log, D, the gated norm's weight and out_proj (d_inner ->
    the K/V width). in_proj and out_proj run in PyTorch; the rest in kvplug (kvp_attention_ssm)."""

    def __init__(self, hidden_size: int, kv_width: int, p: AttambaParams) -> None:
        super().__init__()
        self.params = p
        self.in_proj = nn.Linear(hidden_size, p.in_dim, bias=False)
        self.conv1d = nn.Conv1d(p.conv_dim, p.conv_dim, p.conv_width, groups=p.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(p.ssm_heads))
        self.A_log = nn.Parameter(torch.zeros(p.ssm_heads))
        self.D = nn.Parameter(torch.ones(p.ssm_heads))
        self.norm = GatedNormWeight(p.d_inner)
        self.out_proj = nn.Linear(p.d_inner, kv_width, bias=False)

    def forward(self, x: torch.Tensor, layer: int, which: int, ssm: SsmFn) -> torch.Tensor:
        """x + out_proj(SSM(in_proj(x))): the paper's K (which 0) or V (which 1), [T, kv_width]."""
        return x + self.out_proj(ssm(layer, which, self, self.in_proj(x)))


class AttambaAttention(nn.Module):
    """Attamba's attention: Q = W_q x (RoPE), K = x + SSM_k(x) (RoPE on the result), V = x + SSM_v(x),
    attention (chunk ends + window, the backend's key sets) over them, then o_proj."""

    def __init__(self, cfg: ModelConfig, spec: AttentionSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        p = spec.attamba_params()
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_ssm = AttambaSsm(cfg.hidden_size, kv_width, p)
        self.v_ssm = AttambaSsm(cfg.hidden_size, kv_width, p)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                attention: AttentionFn, rope_keys: bool = True, ssm: Optional[SsmFn] = None) -> torch.Tensor:
        if ssm is None:
            raise RuntimeError(f"layer {layer} is an attamba layer: the forward pass needs the engine's ssm callable")
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin).contiguous()
        k = self.k_ssm(x, layer, 0, ssm).view(t, self.num_kv_heads, self.head_dim)
        k = apply_rope(k, cos, sin).contiguous()
        v = self.v_ssm(x, layer, 1, ssm).view(t, self.num_kv_heads, self.head_dim).contiguous()
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
    def __init__(self, cfg: ModelConfig, spec: Optional[AttentionSpec] = None) -> None:
        super().__init__()
        self.self_attn: nn.Module = (AttambaAttention(cfg, spec) if spec is not None and spec.is_attamba
                                     else LlamaAttention(cfg))
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
                attention: AttentionFn, rope_keys: bool = True, ssm: Optional[SsmFn] = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, attention, rope_keys, ssm)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, spec) for spec in cfg.layer_attention])
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
                raw_key_layers: Optional[frozenset] = None, ssm: Optional[SsmFn] = None) -> torch.Tensor:
        """``raw_key_layers``: layers that get pre-RoPE keys (default: this model config's).
        ``ssm``: the chunk-local SSM of attamba layers (needed when the model has some)."""
        raw = self.raw_key_layers if raw_key_layers is None else raw_key_layers
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, attention, i not in raw, ssm)
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
        std times ``lm_head_scale``. Attention is then far from uniform, so checks see real softmax.
        Attamba SSMs: conv weights N(0, 1) / sqrt(width), conv biases 0.1 N(0, 1), dt_bias and A_log
        uniform in [-1.5, 1) (A = -exp(A_log) in (-2.7, -0.2]: the scan both carries and forgets
        within a chunk), D N(0, 1)."""
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        for name, p in self.named_parameters():  # a fixed order: registration order
            if name.endswith("embed_tokens.weight"):
                value = torch.randn(p.shape, generator=g)
            elif "norm" in name:
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("conv1d.weight"):
                value = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
            elif name.endswith("conv1d.bias"):
                value = 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith(".dt_bias") or name.endswith(".A_log"):
                value = -1.5 + 2.5 * torch.rand(p.shape, generator=g)
            elif name.endswith(".D"):
                value = torch.randn(p.shape, generator=g)
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

    def __init__(self, ctx: kvplug.Context, spec: AttentionSpec, cfg: ModelConfig, kv_dtype: str,
                 layer: Optional[int] = None) -> None:
        self.spec = spec
        self.attn = kvplug.Attention(ctx, spec.backend, num_q_heads=cfg.num_attention_heads,
                                     num_kv_heads=cfg.num_key_value_heads, head_size=cfg.head_dim,
                                     kv_dtype=kv_dtype, config=spec.library_config(cfg, layer))
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


class KvplugAttambaAttention(KvplugAttention):
    """An attamba layer: write_kv + run as every kvplug layer (over the attamba pages' plan and cache,
    :mod:`.attamba`), plus :meth:`ssm`, the chunk-local Mamba-2 block (kvp_attention_ssm)."""

    def __init__(self, ctx: kvplug.Context, spec: AttentionSpec, cfg: ModelConfig, kv_dtype: str, layer: int) -> None:
        super().__init__(ctx, spec, cfg, kv_dtype, layer)
        self.params = spec.attamba_params()

    def ssm(self, plan: kvplug.Plan, cache: kvplug.KvCache, layer: int, which: int, block: AttambaSsm,
            zxbcdt: torch.Tensor) -> torch.Tensor:
        """y [T, d_inner] of the key (``which`` 0) or value (1) SSM over in_proj's output, its conv and
        scan state in ``cache``'s state slots (the plan's state_slots and query_pos_starts)."""
        p = self.params
        x = zxbcdt.detach().to(torch.float32).contiguous()
        out = torch.empty(x.shape[0], p.d_inner, dtype=torch.float32, device=x.device)
        f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731  (views when already fp32)
        self.attn.ssm(plan, cache, layer, x, out, which=which,
                      conv_weight=f32(block.conv1d.weight).view(p.conv_dim, p.conv_width),
                      conv_bias=f32(block.conv1d.bias), a_log=f32(block.A_log), dt_bias=f32(block.dt_bias),
                      d_skip=f32(block.D), norm_weight=f32(block.norm.weight))
        return out.to(zxbcdt.dtype)


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
