"""A small vLLM-like serving engine on libkvplug (PyTorch model, kvplug attention and block manager).

Needs PyTorch (``pip install torch``); ``import kvplug`` alone does not. Run a synthetic workload
with ``python -m kvplug.engine --help``.

    from kvplug.engine import LLMEngine, EngineConfig, SamplingParams
    engine = LLMEngine({"num_hidden_layers": 2, "weights": {"seed": 0}}, EngineConfig(num_device_blocks=64))
    out = engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=8))
"""
from __future__ import annotations

from .config import (
    TORCH_REFERENCE,
    AttentionSpec,
    EngineConfig,
    EngineConfigError,
    ModelConfig,
    UnknownBackendError,
)
from .engine import LLMEngine
from .model import LlamaForCausalLM
from .request import RequestOutput, RequestStatus, SamplingParams
from .scheduler import SchedulerStats

__all__ = [
    "TORCH_REFERENCE",
    "AttentionSpec",
    "EngineConfig",
    "EngineConfigError",
    "LLMEngine",
    "LlamaForCausalLM",
    "ModelConfig",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "SchedulerStats",
    "UnknownBackendError",
]
