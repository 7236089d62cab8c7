"""Helpers of the engine tests: tiny Llama configs and the Hugging Face twin of a model."""
from __future__ import annotations

from typing import Any, Dict

import torch

from kvplug.engine import ModelConfig


def tiny_model(**overrides: Any) -> Dict[str, Any]:
    """hidden 64, 4 query / 2 KV heads of 32, vocab 256, random weights."""
    d: Dict[str, Any] = {
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "weights": {"seed": 0},
    }
    d.update(overrides)
    return d


def dense(window_left: int = -1) -> Dict[str, Any]:
    return {"backend_config_type": "DenseConfig", "backend_config": {"window_left": window_left}}


def hf_model(cfg: ModelConfig, state_dict: Dict[str, torch.Tensor]) -> Any:
    """transformers' LlamaForCausalLM with the same dimensions and weights (eager attention, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**cfg.hf_config_kwargs(), attn_implementation="eager")).float()
    assert hf.config._attn_implementation == "eager"
    hf.load_state_dict(state_dict, strict=True)
    return hf.eval()
