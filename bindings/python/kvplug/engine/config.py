"""Model and engine configuration, checked before any work starts.

A model config is JSON (or a dict) with Hugging Face ``LlamaConfig`` field names for the
architecture, where the weights come from, and which attention backend each layer uses::

    {
      "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 1024,
      "tie_word_embeddings": false, "eos_token_id": null,
      "weights": {"seed": 0},                      # or {"safetensors": "model.safetensors"}
      "attention": {
        "default": {"backend": "dense",
                    "config": {"backend_config_type": "DenseConfig", "backend_config": {"window_left": -1}}},
        "layers": {"1": {"backend": "dense",
                         "config": {"backend_config_type": "DenseConfig", "backend_config": {"window_left": 8}}}}
      }
    }

``attention.layers`` may also be a list with one entry (or null, for the default) per layer. A
backend is a name registered in libkvplug (``kvplug.backends()``) or ``"torch_reference"``: plain
PyTorch attention over the same paged cache, taking a ``DenseConfig`` (window_left,
logits_soft_cap); it is the engine's own check of the library's backends. An ``"entropy"`` layer's
``EntropyConfig.temperature`` may be a ``[num_attention_heads][T]`` table (flattened row-major here)
or the flat list; its length is checked against the head count per layer. A ``"kv_shift"`` layer's
``KvShiftConfig`` (KV shifting attention: per KV head, K^_i = a1 K_i + a2 K_{i-1}, V likewise, before
RoPE) gives ``alpha_k`` and ``alpha_v`` as ``[num_key_value_heads][2]`` tables or flat lists; the
engine fills its RoPE fields from the model (``rope_theta``, the whole head, NeoX), since the
backend rotates the mixed keys in its write and the model hands it pre-RoPE keys. An ``"attamba"``
layer's ``AttambaConfig`` (Attamba: K = x + SSM_k(x), V = x + SSM_v(x) from chunk-local Mamba-2
blocks, attention over chunk-end K/V plus a recent window) gives ``chunk_size``, ``window``,
``chunk_offsets`` and the SSM shape (``ssm_heads`` > 0, ``ssm_head_dim``, ``state_size``,
``ssm_groups``, ``conv_width``, ``norm_eps``); the engine fills ``layer_index`` and ``num_layers``
(the layer's rank among the model's attamba layers, and their count: they share one page list).

:func:`ModelConfig.from_dict` resolves every layer's backend against the loaded library and
checks its config (``kvplug.check_config``), head size and cache dtype, so an unknown backend or a
bad config fails with a clear error before weights are made or a cache is allocated.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import kvplug

#: The engine's own backend: PyTorch attention over the paged cache (CPU caches), for checks.
TORCH_REFERENCE = "torch_reference"
#: Star Attention (arXiv 2411.17116): libkvplug's "star" backend, a StarConfig per layer.
STAR = "star"
#: Entropy-guided attention (arXiv 2501.03489): libkvplug's "entropy" backend, an EntropyConfig
#: (a [num_attention_heads, T] temperature table) per layer.
ENTROPY = "entropy"
#: KV shifting attention (arXiv 2411.19574): libkvplug's "kv_shift" backend, a KvShiftConfig
#: (per KV head weights of the current and the previous token's K and V) per layer.
KV_SHIFT = "kv_shift"
#: Attamba (arXiv 2411.17685): libkvplug's "attamba" backend, an AttambaConfig per layer; its layers
#: keep their compressed cache in pages of their own (:mod:`.attamba`).
ATTAMBA = "attamba"
#: Backends that keep per-sequence state whose rules the engine follows (state slots in every batch,
#: the refill after a prefix-cache hit: see :mod:`.scheduler`; attamba: :mod:`.attamba`); other
#: stateful ones are refused.
STATEFUL_BACKENDS = frozenset({KV_SHIFT, ATTAMBA})
#: AttambaConfig fields the engine fills per layer (from the layer's rank among the attamba layers).
_ATTAMBA_ENGINE_FIELDS = ("layer_index", "num_layers")


def star_spec(context_block_size: int, anchor_block_size: Optional[int] = None) -> "AttentionSpec":
    """A layer running Star Attention with context blocks of ``context_block_size`` tokens and an
    anchor of ``anchor_block_size`` (default: one block), on one shard."""
    anchor = context_block_size if anchor_block_size is None else anchor_block_size
    return AttentionSpec(backend=STAR, config={"backend_config_type": "StarConfig",
                                               "backend_config": {"context_block_size": int(context_block_size),
                                                                  "anchor_block_size": int(anchor)}})


def entropy_spec(temperature: Any = None) -> "AttentionSpec":
    """A layer running entropy-guided attention: logits q.k / (t[h, p] sqrt(d)) with ``temperature``
    a [num_attention_heads, T] table (nested lists or an array; T = 1: per head; positions >= T use
    the last entry), or a flat row-major list; None: t = 1 (dense, with the same telemetry)."""
    return AttentionSpec(backend=ENTROPY, config=kvplug.entropy_config(temperature))


def kv_shift_spec(alpha_k: Any, alpha_v: Any) -> "AttentionSpec":
    """A layer running KV shifting attention: ``alpha_k``/``alpha_v`` [num_key_value_heads][2] tables
    of (current, previous) weights (or flat lists). RoPE comes from the model config."""
    cfg = kvplug.kv_shift_config(alpha_k, alpha_v)
    inner = {k: cfg["backend_config"][k] for k in ("alpha_k", "alpha_v")}
    return AttentionSpec(backend=KV_SHIFT, config={"backend_config_type": "KvShiftConfig", "backend_config": inner})


def attamba_spec(chunk_size: int, window: int = 0, *, ssm_heads: int, ssm_head_dim: int, state_size: int = 16,
                 ssm_groups: int = 1, conv_width: int = 4, chunk_offsets: str = "cyclic",
                 norm_eps: float = 1e-5) -> "AttentionSpec":
    """A layer running Attamba: K = x + SSM_k(x) and V = x + SSM_v(x) from two chunk-local Mamba-2
    blocks of ``ssm_heads`` x ``ssm_head_dim`` (state ``state_size``, ``ssm_groups`` B/C groups, a
    causal conv of ``conv_width``), attention over the chunk ends (every ``chunk_size`` tokens,
    ``chunk_offsets`` "cyclic" or "uniform" across the attamba layers) and the last ``window``
    tokens. The engine fills layer_index and num_layers."""
    cfg = kvplug.attamba_config(chunk_size, window, state_size=state_size, conv_width=conv_width,
                                chunk_offsets=chunk_offsets, ssm_heads=ssm_heads, ssm_head_dim=ssm_head_dim,
                                ssm_groups=ssm_groups, norm_eps=norm_eps)
    inner = {k: v for k, v in cfg["backend_config"].items() if k not in _ATTAMBA_ENGINE_FIELDS}
    return AttentionSpec(backend=ATTAMBA, config={"backend_config_type": "AttambaConfig", "backend_config": inner})


@dataclasses.dataclass(frozen=True)
class AttambaParams:
    """An AttambaConfig's values with the schema's defaults (what the model and the page pool need)."""

    chunk_size: int
    window: int
    chunk_offsets: str  # "Cyclic" or "Uniform"
    ssm_heads: int
    ssm_head_dim: int
    state_size: int
    ssm_groups: int
    conv_width: int
    norm_eps: float

    @property
    def d_inner(self) -> int:
        return self.ssm_heads * self.ssm_head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ssm_groups * self.state_size

    @property
    def in_dim(self) -> int:
        """in_proj's output per token: [z: d_inner][xBC: conv_dim][dt: ssm_heads]."""
        return self.d_inner + self.conv_dim + self.ssm_heads

    @property
    def page_layout_key(self) -> Tuple[int, int, str]:
        """What the layers sharing one page list must agree on."""
        return (self.chunk_size, self.window, self.chunk_offsets)


def parse_temperatures(text: str, num_heads: int, what: str = "--entropy-temperature") -> List[float]:
    """One temperature ("0.5") for every head or one per head ("0.25,0.5,1,4"): a per-head table (T = 1)."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise EngineConfigError(f"{what}={text!r}: expected a number or {num_heads} comma-separated numbers") from None
    if len(values) == 1:
        values = values * num_heads
    if len(values) != num_heads:
        raise EngineConfigError(f"{what}={text!r}: {len(values)} values for {num_heads} attention heads")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise EngineConfigError(f"{what}={text!r}: temperatures must be finite and > 0, not {bad}")
    return values


def parse_layer_list(text: str, num_layers: int, what: str = "--star-layers") -> List[int]:
    """"all", or comma-separated layer indices and LO-HI ranges ("0,2-3"), checked against the model."""
    if text.strip() == "all":
        return list(range(num_layers))
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise EngineConfigError(f"{what}={text!r}: expected 'all' or layer indices like 0,2-3") from None
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad or not out:
        raise EngineConfigError(f"{what}={text!r}: layers {bad} outside [0, {num_layers})")
    return sorted(set(out))


class EngineConfigError(ValueError):
    """A model or engine config that cannot work (raised before any work starts)."""


class UnknownBackendError(EngineConfigError):
    """A layer names an attention backend that the loaded libkvplug does not register."""


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """The attention backend of one layer: a name and its config (a dict or JSON str, or None)."""

    backend: str = "dense"
    config: Optional[Dict[str, Any]] = None

    @property
    def is_star(self) -> bool:
        return self.backend == STAR

    @property
    def is_entropy(self) -> bool:
        return self.backend == ENTROPY

    @property
    def is_kv_shift(self) -> bool:
        return self.backend == KV_SHIFT

    @property
    def is_attamba(self) -> bool:
        return self.backend == ATTAMBA

    @property
    def fuses_key_rope(self) -> bool:
        """The backend rotates keys in its write: the model hands it pre-RoPE keys (queries are
        rotated by the model as for every layer)."""
        return self.is_kv_shift

    def kv_shift_alphas(self) -> Tuple[List[float], List[float]]:
        """A KvShiftConfig's flat alpha_k and alpha_v."""
        cfg = (self.config or {}).get("backend_config") or {}
        return [float(x) for x in cfg.get("alpha_k") or []], [float(x) for x in cfg.get("alpha_v") or []]

    def attamba_params(self) -> AttambaParams:
        """An AttambaConfig's values, the schema's defaults where absent."""
        cfg = (self.config or {}).get("backend_config") or {}
        offsets = cfg.get("chunk_offsets", "Cyclic")
        offsets = {0: "Cyclic", 1: "Uniform"}.get(offsets, offsets) if isinstance(offsets, int) else str(offsets)
        return AttambaParams(chunk_size=int(cfg.get("chunk_size", 8)), window=int(cfg.get("window", 0)),
                             chunk_offsets=offsets, ssm_heads=int(cfg.get("ssm_heads", 0)),
                             ssm_head_dim=int(cfg.get("ssm_head_dim", 0)), state_size=int(cfg.get("state_size", 16)),
                             ssm_groups=int(cfg.get("ssm_groups", 1)), conv_width=int(cfg.get("conv_width", 4)),
                             norm_eps=float(cfg.get("norm_eps", 1e-5)))

    def library_config(self, model: "ModelConfig", layer: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """The config handed to libkvplug: this one, except that a kv_shift layer gets the model's
        RoPE (rope_theta, rotary_dim 0 = the whole head, NeoX: transformers' rotate-half) so the
        backend rotates the mixed keys as the model rotates its queries (EngineConfigError if the
        config asks for other RoPE settings than the model's), and an attamba layer (``layer``: its
        index in the model) gets layer_index = its rank among the model's attamba layers and
        num_layers = their count (EngineConfigError if the config gives other values)."""
        if self.is_attamba and isinstance(self.config, Mapping):
            return self._attamba_library_config(model, layer)
        if not self.is_kv_shift or not isinstance(self.config, Mapping):
            return self.config
        inner = dict(self.config.get("backend_config") or {})
        want = {"rope_theta": float(model.rope_theta), "rotary_dim": 0, "rope_style": "NeoX"}
        same = {"rope_theta": lambda v: float(v) == want["rope_theta"],
                "rotary_dim": lambda v: int(v) in (0, model.head_dim),
                "rope_style": lambda v: v in ("NeoX", 0)}
        for key, ok in same.items():
            if key in inner and not ok(inner[key]):
                raise EngineConfigError(
                    f"kv_shift: {key}={inner[key]!r} differs from the model's RoPE (rope_theta={model.rope_theta}, "
                    f"the whole head of {model.head_dim}, NeoX): the model rotates the queries, the backend the "
                    f"keys, with the same settings; leave it out")
        inner.update(want)
        return dict(self.config, backend_config=inner)

    def _attamba_library_config(self, model: "ModelConfig", layer: Optional[int]) -> Dict[str, Any]:
        assert isinstance(self.config, Mapping)
        ranks = model.attamba_layers
        if layer is None or layer not in ranks:
            raise EngineConfigError(f"attamba: library_config needs the index of an attamba layer of the model "
                                    f"(attamba layers {list(ranks)}), got {layer}")
        inner = dict(self.config.get("backend_config") or {})
        want = {"layer_index": ranks.index(layer), "num_layers": len(ranks)}
        for key, value in want.items():
            if key in inner and int(inner[key]) != value:
                raise EngineConfigError(
                    f"attamba: {key}={inner[key]!r}, but the engine gives this layer {key}={value} (its rank among "
                    f"the model's {len(ranks)} attamba layers, which share one page list and its cyclic chunk "
                    f"offsets); leave it out")
        inner.update(want)
        return dict(self.config, backend_config=inner)

    def temperatures(self) -> List[float]:
        """An EntropyConfig's flat temperature table ([] = t = 1 everywhere)."""
        cfg = (self.config or {}).get("backend_config") or {}
        return [float(x) for x in cfg.get("temperature") or []]

    def temperature_table(self, num_heads: int) -> List[List[float]]:
        """The [num_heads, T] table of an EntropyConfig (T = 1 and t = 1 when it is empty)."""
        flat = self.temperatures() or [1.0] * num_heads
        positions = len(flat) // num_heads
        return [flat[h * positions:(h + 1) * positions] for h in range(num_heads)]

    def star_params(self) -> Tuple[int, int]:
        """(context_block_size, anchor_block_size) of a StarConfig, with the schema's defaults."""
        cfg = (self.config or {}).get("backend_config") or {}
        return int(cfg.get("context_block_size", 4096)), int(cfg.get("anchor_block_size", 4096))

    def dense_params(self) -> Tuple[int, float]:
        """(window_left, logits_soft_cap) from a DenseConfig (the torch reference's parameters)."""
        cfg = (self.config or {}).get("backend_config") or {}
        return int(cfg.get("window_left", -1)), float(cfg.get("logits_soft_cap", 0.0))


_ARCH_DEFAULTS: Dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": None,  # hidden_size // num_attention_heads
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "eos_token_id": None,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-architecture decoder and the attention backend of each of its layers."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_id: Optional[int]
    #: {"seed": int, "std": float|None, "lm_head_scale": float} or {"safetensors": path}
    weights: Dict[str, Any]
    #: One entry per layer.
    layer_attention: Tuple[AttentionSpec, ...]

    # -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, kv_cache_dtype: str = "float32", device: str = "cpu",
                  base_dir: Optional[str] = None) -> "ModelConfig":
        """Parse and check a model config. Raises :class:`EngineConfigError` (or its subclass
        :class:`UnknownBackendError`, or ``kvplug.InvalidConfigError`` for a backend config the
        library rejects) before anything is built."""
        if not isinstance(d, Mapping):
            raise EngineConfigError(f"model config: expected a JSON object, got {type(d).__name__}")
        known = set(_ARCH_DEFAULTS) | {"weights", "attention", "model_type", "architectures"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise EngineConfigError(f"model config: unknown field(s) {unknown}; known: {sorted(known)}")
        a = dict(_ARCH_DEFAULTS)
        a.update({k: v for k, v in d.items() if k in _ARCH_DEFAULTS})
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            if not isinstance(a[key], int) or isinstance(a[key], bool) or a[key] <= 0:
                raise EngineConfigError(f"model config: {key}={a[key]!r} must be a positive integer")
        if a["num_attention_heads"] % a["num_key_value_heads"]:
            raise EngineConfigError(f"model config: num_attention_heads={a['num_attention_heads']} is not a multiple "
                                    f"of num_key_value_heads={a['num_key_value_heads']}")
        if a["head_dim"] is None:
            if a["hidden_size"] % a["num_attention_heads"]:
                raise EngineConfigError("model config: hidden_size is not a multiple of num_attention_heads; "
                                        "give head_dim")
            a["head_dim"] = a["hidden_size"] // a["num_attention_heads"]
        if a["eos_token_id"] is not None and not 0 <= int(a["eos_token_id"]) < a["vocab_size"]:
            raise EngineConfigError(f"model config: eos_token_id={a['eos_token_id']} outside the vocabulary")

        weights = dict(d.get("weights") or {"seed": 0})
        if "safetensors" in weights:
            path = str(weights["safetensors"])
            if base_dir and not os.path.isabs(path):
                path = os.path.join(base_dir, path)
            weights["safetensors"] = path
        elif "seed" not in weights:
            raise EngineConfigError('model config: "weights" needs "seed" (random weights) or "safetensors" (a path)')

        specs = _layer_specs(d.get("attention"), int(a["num_hidden_layers"]))
        cfg = cls(vocab_size=int(a["vocab_size"]), hidden_size=int(a["hidden_size"]),
                  intermediate_size=int(a["intermediate_size"]), num_hidden_layers=int(a["num_hidden_layers"]),
                  num_attention_heads=int(a["num_attention_heads"]), num_key_value_heads=int(a["num_key_value_heads"]),
                  head_dim=int(a["head_dim"]), rms_norm_eps=float(a["rms_norm_eps"]), rope_theta=float(a["rope_theta"]),
                  max_position_embeddings=int(a["max_position_embeddings"]),
                  tie_word_embeddings=bool(a["tie_word_embeddings"]),
                  eos_token_id=None if a["eos_token_id"] is None else int(a["eos_token_id"]),
                  weights=weights, layer_attention=specs)
        cfg.check_backends(kv_cache_dtype=kv_cache_dtype, device=device)
        return cfg

    @classmethod
    def from_json(cls, text_or_path: str, **kwargs: Any) -> "ModelConfig":
        """From JSON text, or from a file path (relative weight paths are then taken from its folder)."""
        if text_or_path.lstrip().startswith("{"):
            text, base = text_or_path, None
        else:
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
            base = os.path.dirname(os.path.abspath(text_or_path))
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise EngineConfigError(f"model config: not valid JSON: {e}") from e
        kwargs.setdefault("base_dir", base)
        return cls.from_dict(d, **kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """The config as JSON-ready data (attention as a per-layer list)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("layer_attention", "weights")}
        d["weights"] = dict(self.weights)
        d["attention"] = {"layers": [{"backend": s.backend, "config": s.config} for s in self.layer_attention]}
        return d

    @property
    def star_layers(self) -> Tuple[int, ...]:
        """The layers that run Star Attention."""
        return tuple(i for i, s in enumerate(self.layer_attention) if s.is_star)

    @property
    def star_layout(self) -> Optional[Tuple[int, int]]:
        """(context_block_size, anchor_block_size) when every Star layer agrees on them (the engine's
        Star statistics and Star prefix keys use it), else None (also without Star layers)."""
        params = {self.layer_attention[i].star_params() for i in self.star_layers}
        return params.pop() if len(params) == 1 else None

    @property
    def all_star(self) -> bool:
        """Every layer runs Star with one layout: a context block's K/V then depends only on the
        anchor and its own tokens, so Star prefix keys (BlockManager.allocate_star) are valid."""
        return len(self.star_layers) == self.num_hidden_layers and self.star_layout is not None

    @property
    def attamba_layers(self) -> Tuple[int, ...]:
        """The layers that run Attamba (their compressed cache lives in pages of its own)."""
        return tuple(i for i, s in enumerate(self.layer_attention) if s.is_attamba)

    def with_layers(self, layers: List[int], spec: AttentionSpec) -> "ModelConfig":
        """This config with ``spec`` on ``layers`` (checked again by the engine)."""
        specs = list(self.layer_attention)
        for i in layers:
            specs[i] = spec
        return dataclasses.replace(self, layer_attention=tuple(specs))

    def hf_config_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``transformers.LlamaConfig`` with the same architecture."""
        return dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                    num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                    rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                    max_position_embeddings=self.max_position_embeddings,
                    tie_word_embeddings=self.tie_word_embeddings, attention_bias=False, mlp_bias=False,
                    hidden_act="silu", eos_token_id=self.eos_token_id, bos_token_id=None, pad_token_id=None)

    # -------------------------------------------------------------------------------------------
    def check_backends(self, *, kv_cache_dtype: str = "float32", device: str = "cpu") -> None:
        """Every layer's backend exists in the loaded library (or is the torch reference), accepts
        its config, this head size, the cache dtype and the device."""
        registered = kvplug.backends()
        for layer, spec in enumerate(self.layer_attention):
            where = f"layer {layer}"
            if spec.backend == TORCH_REFERENCE:
                if device != "cpu":
                    raise EngineConfigError(f"{where}: backend {TORCH_REFERENCE!r} reads the cache through NumPy "
                                            f"views and needs device 'cpu', not {device!r}")
                _check_config("dense", spec, where)  # it takes a DenseConfig
                continue
            if spec.backend not in registered:
                raise UnknownBackendError(
                    f"{where}: unknown attention backend {spec.backend!r}; libkvplug "
                    f"{kvplug.version_string()} ({kvplug.library_path()}) registers {registered}, "
                    f"and the engine adds {TORCH_REFERENCE!r}")
            info = kvplug.backend_info(spec.backend)
            if self.head_dim not in info.head_sizes:
                raise EngineConfigError(f"{where}: backend {spec.backend!r} supports head sizes {list(info.head_sizes)}, "
                                        f"not head_dim={self.head_dim}")
            if kv_cache_dtype not in info.dtypes:
                raise EngineConfigError(f"{where}: backend {spec.backend!r} supports cache dtypes {list(info.dtypes)}, "
                                        f"not {kv_cache_dtype!r}")
            dev = kvplug.DEVICES.get(device)
            if dev is not None and dev not in info.device_types:
                raise EngineConfigError(f"{where}: backend {spec.backend!r} in this build runs on device types "
                                        f"{list(info.device_types)} (DLPack), not {device!r} ({dev})")
            if info.needs_state_slots and spec.backend not in STATEFUL_BACKENDS:
                raise EngineConfigError(f"{where}: backend {spec.backend!r} keeps per-sequence state; this engine "
                                        f"follows the state rules of {sorted(STATEFUL_BACKENDS)} only")
            if spec.is_kv_shift:
                self._check_kv_shift(spec, where)
            if spec.is_attamba:
                self._check_attamba(spec, where, layer)
            _check_config(spec.backend, spec, where, self, layer)
            if spec.is_entropy:  # the library checks the shape only at creation: say it here, per layer
                n = len(spec.temperatures())
                if n % self.num_attention_heads:
                    raise EngineConfigError(
                        f"{where}: the entropy temperature table has {n} entries, not a multiple of "
                        f"num_attention_heads={self.num_attention_heads} (it is [num_attention_heads, T], row-major)")

    def _check_kv_shift(self, spec: AttentionSpec, where: str) -> None:
        """A KvShiftConfig with num_key_value_heads (current, previous) pairs in alpha_k and alpha_v
        (the library checks the lengths only at creation: say it here, per layer) and the model's RoPE."""
        if not isinstance(spec.config, Mapping) or spec.config.get("backend_config_type") != "KvShiftConfig":
            raise EngineConfigError(f"{where}: backend {KV_SHIFT!r} needs a KvShiftConfig with alpha_k and alpha_v "
                                    f"([num_key_value_heads={self.num_key_value_heads}][2] each: current, previous), "
                                    f"got {json.dumps(spec.config)}")
        for name, values in zip(("alpha_k", "alpha_v"), spec.kv_shift_alphas()):
            if len(values) != 2 * self.num_key_value_heads:
                raise EngineConfigError(
                    f"{where}: the kv_shift {name} has {len(values)} values, not num_key_value_heads * 2 = "
                    f"{2 * self.num_key_value_heads} (per KV head: current, previous)")
        try:
            spec.library_config(self)
        except EngineConfigError as e:
            raise EngineConfigError(f"{where}: {e}") from None

    def _check_attamba(self, spec: AttentionSpec, where: str, layer: int) -> None:
        """An AttambaConfig whose SSMs the engine can run through kvplug (ssm_heads > 0), keys and
        values of the model's width (K = x + SSM_k(x): num_key_value_heads * head_dim = hidden_size),
        the same page layout as the other attamba layers, and no layer_index / num_layers of its own
        that differ from the engine's."""
        if not isinstance(spec.config, Mapping) or spec.config.get("backend_config_type") != "AttambaConfig":
            raise EngineConfigError(f"{where}: backend {ATTAMBA!r} needs an AttambaConfig (chunk_size, window and the "
                                    f"SSM shape: ssm_heads, ssm_head_dim, state_size, ssm_groups, conv_width), got "
                                    f"{json.dumps(spec.config)}")
        p = spec.attamba_params()
        kv_width = self.num_key_value_heads * self.head_dim
        if kv_width != self.hidden_size:
            raise EngineConfigError(
                f"{where}: attamba keys and values are x + SSM(x), so num_key_value_heads * head_dim = {kv_width} "
                f"must equal hidden_size = {self.hidden_size}")
        if p.ssm_heads <= 0 or p.ssm_head_dim <= 0:
            raise EngineConfigError(
                f"{where}: attamba needs ssm_heads > 0 and ssm_head_dim > 0 (got {p.ssm_heads}, {p.ssm_head_dim}): "
                f"the engine runs both SSMs through kvplug (kvp_attention_ssm)")
        first = self.layer_attention[self.attamba_layers[0]].attamba_params()
        if p.page_layout_key != first.page_layout_key:
            raise EngineConfigError(
                f"{where}: attamba (chunk_size, window, chunk_offsets) = {p.page_layout_key}, but layer "
                f"{self.attamba_layers[0]} has {first.page_layout_key}: the attamba layers share one page list "
                f"(kvp_attention_cache_layout), so they must agree")
        try:
            spec.library_config(self, layer)
        except EngineConfigError as e:
            raise EngineConfigError(f"{where}: {e}") from None


def _check_config(backend: str, spec: AttentionSpec, where: str, model: Optional["ModelConfig"] = None,
                  layer: Optional[int] = None) -> None:
    """kvplug.check_config with the layer and the config in the message."""
    try:
        kvplug.check_config(backend, spec.library_config(model, layer) if model is not None else spec.config)
    except kvplug.KvplugError as e:
        raise type(e)(f"{where}: backend {spec.backend!r} rejects its config {json.dumps(spec.config)}: "
                      f"{e.message}", e.status, e.status_name) from e


def _spec(value: Any, where: str) -> Optional[AttentionSpec]:
    if value is None:
        return None
    if isinstance(value, str):
        return AttentionSpec(backend=value)
    if not isinstance(value, Mapping):
        raise EngineConfigError(f"attention {where}: expected {{\"backend\": ..., \"config\": ...}}, got {value!r}")
    extra = sorted(set(value) - {"backend", "config"})
    if extra:
        raise EngineConfigError(f"attention {where}: unknown key(s) {extra} (expected 'backend' and 'config')")
    backend = value.get("backend", "dense")
    if not isinstance(backend, str) or not backend:
        raise EngineConfigError(f"attention {where}: backend={backend!r} must be a non-empty string")
    config = value.get("config")
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise EngineConfigError(f"attention {where}: config is not valid JSON: {e}") from e
    if config is not None and not isinstance(config, dict):
        raise EngineConfigError(f"attention {where}: config must be a JSON object or null, got {config!r}")
    if config is not None and config.get("backend_config_type") == "EntropyConfig":
        config = _flat_temperatures(config, where)
    if config is not None and config.get("backend_config_type") == "KvShiftConfig":
        config = _flat_alphas(config, where)
    return AttentionSpec(backend=backend, config=config)


def _flat_temperatures(config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """An EntropyConfig whose temperature is a nested [num_heads][T] list, flattened row-major (the
    schema's form); other configs unchanged. Ragged rows are an error."""
    inner = config.get("backend_config")
    table = inner.get("temperature") if isinstance(inner, Mapping) else None
    if not isinstance(table, list) or not any(isinstance(row, list) for row in table):
        return config
    if not all(isinstance(row, list) for row in table) or len({len(row) for row in table}) != 1:
        raise EngineConfigError(f"attention {where}: temperature must be a flat list or a [num_heads][T] table "
                                f"with rows of one length, got rows of lengths "
                                f"{[len(r) if isinstance(r, list) else None for r in table]}")
    flat = [x for row in table for x in row]
    return dict(config, backend_config=dict(inner, temperature=flat))


def _flat_alphas(config: Dict[str, Any], where: str) -> Dict[str, Any]:
    """A KvShiftConfig whose alpha_k/alpha_v are [num_kv_heads][2] tables, flattened (the schema's form)."""
    inner = config.get("backend_config")
    if not isinstance(inner, Mapping):
        return config
    out = dict(inner)
    for name in ("alpha_k", "alpha_v"):
        table = inner.get(name)
        if not isinstance(table, list) or not any(isinstance(row, list) for row in table):
            continue
        if not all(isinstance(row, list) and len(row) == 2 for row in table):
            raise EngineConfigError(f"attention {where}: {name} must be a flat list or a [num_kv_heads][2] table "
                                    f"(current, previous), got {table!r}")
        out[name] = [x for row in table for x in row]
    return dict(config, backend_config=out)


def _layer_specs(attention: Any, num_layers: int) -> Tuple[AttentionSpec, ...]:
    if attention is None:
        return tuple(AttentionSpec() for _ in range(num_layers))
    if not isinstance(attention, Mapping):
        raise EngineConfigError(f"attention: expected an object with 'default' and/or 'layers', got {attention!r}")
    extra = sorted(set(attention) - {"default", "layers"})
    if extra:
        raise EngineConfigError(f"attention: unknown key(s) {extra} (expected 'default' and 'layers')")
    default = _spec(attention.get("default"), "default") or AttentionSpec()
    specs: List[AttentionSpec] = [default] * num_layers
    layers = attention.get("layers")
    if isinstance(layers, list):
        if len(layers) != num_layers:
            raise EngineConfigError(f"attention.layers has {len(layers)} entries for {num_layers} layers")
        for i, v in enumerate(layers):
            specs[i] = _spec(v, f"layer {i}") or default
    elif isinstance(layers, Mapping):
        for k, v in layers.items():
            try:
                i = int(k)
            except ValueError:
                raise EngineConfigError(f"attention.layers: key {k!r} is not a layer index") from None
            if not 0 <= i < num_layers:
                raise EngineConfigError(f"attention.layers: layer {i} outside [0, {num_layers})")
            specs[i] = _spec(v, f"layer {i}") or default
    elif layers is not None:
        raise EngineConfigError(f"attention.layers: expected a list or an object, got {layers!r}")
    return tuple(specs)


@dataclasses.dataclass
class EngineConfig:
    """The serving side: paged cache geometry, batching limits, preemption."""

    block_size: int = 16
    num_device_blocks: int = 256
    #: Host swap blocks (per layer); 0 disables swapping (preemption then recomputes).
    num_host_blocks: int = 256
    max_num_seqs: int = 64
    #: Token budget of one step (decode tokens + prefill chunks).
    max_num_batched_tokens: int = 256
    enable_prefix_caching: bool = True
    #: Fraction of device blocks that admitting a new request (or swapping one in) must leave free.
    watermark: float = 0.01
    #: "swap" (to host blocks, falling back to recompute when they are full) or "recompute".
    preemption_mode: str = "swap"
    kv_cache_dtype: str = "float32"
    device: str = "cpu"
    #: kvplug CPU worker threads (0 = all cores).
    num_threads: int = 0
    #: PyTorch intra-op threads on the CPU, set by the engine (0: leave torch's setting). One by
    #: default: the model's GEMMs are small, and on small VMs torch's OpenMP team costs more than it
    #: gains (a 256x256x512 linear took 6.4 ms with 2 threads, 0.36 ms with 1, on the 2-core CI).
    torch_threads: int = 1
    #: Seeds the sampler of requests that bring no seed of their own.
    seed: int = 0
    #: Pages of the attamba layers' own pool (compressed chunk-end rows + window pages, per layer);
    #: 0: as many as num_device_blocks. Unused without attamba layers.
    attamba_num_blocks: int = 0
    #: Attention-entropy telemetry: every layer whose backend supports entropy (dense, star, entropy)
    #: writes a per-head summary at each run, accumulated on the device over the run
    #: (:meth:`LLMEngine.entropy_report`); no synchronization per layer.
    entropy_telemetry: bool = False

    def check(self) -> None:
        if self.block_size <= 0 or self.num_device_blocks <= 0 or self.num_host_blocks < 0:
            raise EngineConfigError(f"block_size={self.block_size}, num_device_blocks={self.num_device_blocks} must be "
                                    f"> 0 and num_host_blocks={self.num_host_blocks} >= 0")
        if self.attamba_num_blocks < 0:
            raise EngineConfigError(f"attamba_num_blocks={self.attamba_num_blocks} must be >= 0 (0: num_device_blocks)")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise EngineConfigError("max_num_seqs and max_num_batched_tokens must be > 0")
        if not 0.0 <= self.watermark < 1.0:
            raise EngineConfigError(f"watermark={self.watermark} must be in [0, 1)")
        if self.preemption_mode not in ("swap", "recompute"):
            raise EngineConfigError(f"preemption_mode={self.preemption_mode!r} must be 'swap' or 'recompute'")
        if self.kv_cache_dtype not in ("float32", "float16", "bfloat16"):
            raise EngineConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r} must be float32, float16 or bfloat16")
        if self.device not in ("cpu", "cuda"):
            raise EngineConfigError(f"device={self.device!r} must be 'cpu' or 'cuda'")

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.num_device_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)


ModelConfigLike = Union[ModelConfig, Mapping[str, Any], str]
