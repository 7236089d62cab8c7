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
logits_soft_cap); it is the engine's own check of the library's backends.

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


class EngineConfigError(ValueError):
    """A model or engine config that cannot work (raised before any work starts)."""


class UnknownBackendError(EngineConfigError):
    """A layer names an attention backend that the loaded libkvplug does not register."""


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """The attention backend of one layer: a name and its config (a dict or JSON str, or None)."""

    backend: str = "dense"
    config: Optional[Dict[str, Any]] = None

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
            if info.needs_state_slots:
                raise EngineConfigError(f"{where}: backend {spec.backend!r} keeps per-sequence state; this engine "
                                        "does not allocate state slots yet")
            _check_config(spec.backend, spec, where)


def _check_config(backend: str, spec: AttentionSpec, where: str) -> None:
    """kvplug.check_config with the layer and the config in the message."""
    try:
        kvplug.check_config(backend, spec.config)
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
    return AttentionSpec(backend=backend, config=config)


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

    def check(self) -> None:
        if self.block_size <= 0 or self.num_device_blocks <= 0 or self.num_host_blocks < 0:
            raise EngineConfigError(f"block_size={self.block_size}, num_device_blocks={self.num_device_blocks} must be "
                                    f"> 0 and num_host_blocks={self.num_host_blocks} >= 0")
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
