"""Per-layer backend selection: a layer's config really reaches its kvplug backend, the torch
reference agrees with it, and bad backend names or configs fail before any work starts."""
from __future__ import annotations

import json
import random
from typing import Any, Dict, List

import pytest
import torch

import kvplug
import kvplug.engine.engine as engine_module
from engine_helpers import dense, tiny_model
from kvplug.engine import (TORCH_REFERENCE, EngineConfig, EngineConfigError, LLMEngine, ModelConfig, SamplingParams,
                           UnknownBackendError)
from kvplug.engine.model import KvplugAttention, TorchReferenceAttention

WINDOW = 8


def _run(model: Dict[str, Any], prompts: List[List[int]]) -> Dict[str, Any]:
    engine = LLMEngine(model, EngineConfig(block_size=8, num_device_blocks=48, num_host_blocks=32,
                                           max_num_seqs=4, max_num_batched_tokens=32))
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, logits=True, prompt_logits=True))
    engine.check_no_leaks()
    return {"engine": engine, "tokens": [o.output_token_ids for o in outs],
            "logits": [o.logits for o in outs], "prompt_logits": [o.prompt_logits for o in outs]}


def _max_diff(a: Dict[str, Any], b: Dict[str, Any]) -> float:
    """Largest logits difference over runs that produced the same tokens (teacher-forced alike)."""
    assert a["tokens"] == b["tokens"]
    d = 0.0
    for x, y in zip(a["logits"], b["logits"]):
        d = max(d, (x - y).abs().max().item())
    for x, y in zip(a["prompt_logits"], b["prompt_logits"]):
        m = ~torch.isnan(x[:, 0]) & ~torch.isnan(y[:, 0])
        d = max(d, (x[m] - y[m]).abs().max().item())
    return d


@pytest.fixture(scope="module")
def prompts() -> List[List[int]]:
    rng = random.Random(5)
    return [[rng.randrange(256) for _ in range(n)] for n in (40, 23, 57)]  # longer than the window


def test_sliding_window_on_one_layer(prompts: List[List[int]]) -> None:
    base = tiny_model(num_hidden_layers=3, weights={"seed": 11})
    default = _run(base, prompts)
    windowed = _run({**base, "attention": {"layers": {"1": {"backend": "dense", "config": dense(WINDOW)}}}}, prompts)
    reference = _run({**base, "attention": {"layers": {"1": {"backend": TORCH_REFERENCE, "config": dense(WINDOW)}}}},
                     prompts)

    layers = windowed["engine"].layer_attention
    assert [type(a) for a in layers] == [KvplugAttention] * 3
    assert [a.spec.dense_params()[0] for a in layers] == [-1, WINDOW, -1]
    assert isinstance(reference["engine"].layer_attention[1], TorchReferenceAttention)

    # The window changed the model's outputs ...
    diff = max((x - y).abs().max().item() for x, y in zip(default["prompt_logits"], windowed["prompt_logits"]))
    assert diff > 1e-2, "a window of 8 on layer 1 should change logits of 23-57 token prompts"
    # ... only past the window: prompt positions < WINDOW + 1 see the same keys either way.
    for x, y in zip(default["prompt_logits"], windowed["prompt_logits"]):
        assert (x[: WINDOW + 1] - y[: WINDOW + 1]).abs().max().item() < 1e-5
    # ... and exactly as plain PyTorch attention with the same window does.
    assert _max_diff(windowed, reference) < 1e-4


def test_torch_reference_everywhere_equals_dense(prompts: List[List[int]]) -> None:
    base = tiny_model(weights={"seed": 12})
    a = _run(base, prompts)
    b = _run({**base, "attention": {"default": {"backend": TORCH_REFERENCE, "config": None}}}, prompts)
    assert _max_diff(a, b) < 1e-4


def test_layer_list_form_and_soft_cap() -> None:
    cap = {"backend_config_type": "DenseConfig", "backend_config": {"logits_soft_cap": 2.0}}
    mc = ModelConfig.from_dict(tiny_model(attention={"layers": [None, {"backend": "dense", "config": cap}]}))
    assert mc.layer_attention[0].config is None
    assert mc.layer_attention[1].dense_params() == (-1, 2.0)
    rng = random.Random(0)
    p = [[rng.randrange(256) for _ in range(30)]]
    capped = _run(tiny_model(attention={"layers": [None, {"backend": "dense", "config": cap}]}), p)
    ref = _run(tiny_model(attention={"layers": [None, {"backend": TORCH_REFERENCE, "config": cap}]}), p)
    plain = _run(tiny_model(), p)
    assert (capped["prompt_logits"][0] - plain["prompt_logits"][0]).abs().max().item() > 1e-3
    assert _max_diff(capped, ref) < 1e-4


class _Boom:
    def __init__(self, *a: Any, **k: Any) -> None:
        raise AssertionError("work started before the backend names were checked")


def test_unknown_backend_fails_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    # Nothing may be built: no weights, no context, block manager, cache, plan or attention.
    for name in ("Context", "BlockManager", "KvCache", "Plan", "Attention"):
        monkeypatch.setattr(kvplug, name, _Boom)
    monkeypatch.setattr(engine_module, "LlamaForCausalLM", _Boom)
    bad = tiny_model(num_hidden_layers=3, attention={"layers": {"2": {"backend": "flash_nonexistent", "config": None}}})
    with pytest.raises(UnknownBackendError) as e:
        LLMEngine(bad, EngineConfig())
    msg = str(e.value)
    assert "layer 2" in msg and "'flash_nonexistent'" in msg and str(kvplug.backends()) in msg
    # The same from a JSON file, and as a ValueError for callers that catch those.
    path = tmp_path / "model.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown attention backend 'flash_nonexistent'"):
        LLMEngine(str(path))
    with pytest.raises(UnknownBackendError):
        ModelConfig.from_json(str(path))


def test_backend_registry_is_consulted() -> None:
    for name in kvplug.backends():
        model = tiny_model(attention={"default": {"backend": name, "config": None}})
        if name == "kv_shift":  # served (tests_engine/test_kv_shift.py), but it has no default weights
            with pytest.raises(EngineConfigError, match="backend 'kv_shift' needs a KvShiftConfig"):
                ModelConfig.from_dict(model)
            continue
        if name == "attamba":  # served (tests_engine/test_attamba.py), but it needs its SSM shape
            with pytest.raises(EngineConfigError, match="backend 'attamba' needs an AttambaConfig"):
                ModelConfig.from_dict(model)
            continue
        if kvplug.backend_info(name).needs_state_slots:  # a stateful backend whose rules the engine lacks
            with pytest.raises(EngineConfigError, match=f"backend '{name}' keeps per-sequence state"):
                ModelConfig.from_dict(model)
            continue
        ModelConfig.from_dict(model)


def test_bad_configs_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "LlamaForCausalLM", _Boom)
    # A config of another backend's type: the library refuses it, the message names the layer.
    star = {"backend_config_type": "StarConfig", "backend_config": {"context_block_size": 64}}
    with pytest.raises(kvplug.InvalidConfigError, match="layer 1: backend 'dense' rejects its config"):
        LLMEngine(tiny_model(attention={"layers": {"1": {"backend": "dense", "config": star}}}))
    with pytest.raises(kvplug.InvalidConfigError):
        LLMEngine(tiny_model(attention={"default": {"backend": "dense", "config": {
            "backend_config_type": "DenseConfig", "backend_config": {"window_left": "wide"}}}}))
    with pytest.raises(kvplug.InvalidConfigError):  # the torch reference takes a DenseConfig too
        LLMEngine(tiny_model(attention={"default": {"backend": TORCH_REFERENCE, "config": star}}))
    with pytest.raises(EngineConfigError, match="head sizes"):
        LLMEngine(tiny_model(hidden_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=48))
    with pytest.raises(EngineConfigError, match="unknown field"):
        LLMEngine(tiny_model(num_layers=2))
    with pytest.raises(EngineConfigError, match="layer 5 outside"):
        LLMEngine(tiny_model(attention={"layers": {"5": "dense"}}))
    with pytest.raises(EngineConfigError, match="2 entries for 3 layers"):
        LLMEngine(tiny_model(num_hidden_layers=3, attention={"layers": ["dense", "dense"]}))
    with pytest.raises(EngineConfigError, match="multiple of num_key_value_heads"):
        LLMEngine(tiny_model(num_key_value_heads=3))
    with pytest.raises(EngineConfigError, match="preemption_mode"):
        LLMEngine(tiny_model(), EngineConfig(preemption_mode="drop"))


def test_safetensors_weights(tmp_path: Any) -> None:
    a = LLMEngine(tiny_model(weights={"seed": 21}), EngineConfig(num_device_blocks=32))
    path = tmp_path / "w.safetensors"
    a.model.save_safetensors(str(path))
    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps(tiny_model(weights={"safetensors": "w.safetensors"})))  # relative to the file
    b = LLMEngine(str(cfg_path), EngineConfig(num_device_blocks=32))
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    p = [[1, 2, 3, 4, 5, 6, 7]]
    sp = SamplingParams(max_tokens=8, logits=True)
    oa, ob = a.generate(p, sp)[0], b.generate(p, sp)[0]
    assert oa.output_token_ids == ob.output_token_ids and torch.equal(oa.logits, ob.logits)
    with pytest.raises(ValueError, match="missing tensors"):
        LLMEngine(tiny_model(num_hidden_layers=3, weights={"safetensors": str(path)}))
