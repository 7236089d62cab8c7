"""KV shifting attention (arXiv 2411.19574) in the engine against Hugging Face transformers'
LlamaForCausalLM (eager, float32, CPU) with the same random weights and the shift inserted before
RoPE: each KV-shift layer's k_proj and v_proj are wrapped so that K^_i = a1[h] K_i + a2[h] K_{i-1}
and V^_i = b1[h] V_i + b2[h] V_{i-1} per KV head (K_{-1} = V_{-1} = 0), then HF rotates K^ as usual.

The engine hands the kv_shift backend pre-RoPE keys (it mixes, then rotates with the model's
rope_theta in its write) and keeps each sequence's raw last K/V in a state slot: across chunked
prefill and decode, across swaps (the slot stays), after recompute (restart at 0) and after
prefix-cache hits (the last cached token re-run with slot -1). Prefill logits and 32 greedy decode
steps agree within 1e-4 while batching, chunking, preemption and prefix hits happen (asserted).
"""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from torch import nn

import kvplug
from engine_helpers import dense, hf_model, tiny_model
from kvplug.engine import EngineConfig, EngineConfigError, LLMEngine, ModelConfig, SamplingParams
from kvplug.engine.config import kv_shift_spec

TOL = 1e-4
STEPS = 32
KV_HEADS = 2


def _alphas(rng: random.Random) -> List[List[float]]:
    """[kv_heads][2] (current, previous) weights of any sign, far from (1, 0)."""
    return [[rng.uniform(0.4, 1.4), rng.uniform(-1.0, 1.0)] for _ in range(KV_HEADS)]


def _shift_layer(ak: Any, av: Any) -> Dict[str, Any]:
    return {"backend": "kv_shift", "config": kv_shift_spec(ak, av).config}


def _tokens(n: int, vocab: int, rng: random.Random) -> List[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def _prompts(vocab: int, system_len: int, user_lens: List[int], seed: int) -> List[List[int]]:
    rng = random.Random(seed)
    system = _tokens(system_len, vocab, rng)
    return [system + _tokens(n, vocab, rng) for n in user_lens]


# ------------------------------------------------------------------------------------------------
# The PyTorch reference: transformers' Llama with the shift after k_proj / v_proj (before RoPE)
# ------------------------------------------------------------------------------------------------


class ShiftedProjection(nn.Module):
    """``proj`` followed by the per-KV-head shift along the sequence: out_i = c[h] y_i + p[h] y_{i-1}."""

    def __init__(self, proj: nn.Module, alpha: List[List[float]], head_dim: int) -> None:
        super().__init__()
        self.proj = proj
        a = torch.tensor(alpha, dtype=torch.float32)  # [kv_heads, 2]
        self.register_buffer("cur", a[:, 0, None])    # [kv_heads, 1]: broadcast over head_dim
        self.register_buffer("prev", a[:, 1, None])
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)  # [batch, T, kv_heads * head_dim]
        h = y.view(*y.shape[:-1], -1, self.head_dim)  # [batch, T, kv_heads, head_dim]
        before = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return (self.cur * h + self.prev * before).reshape(y.shape)


def shift_reference(mc: ModelConfig, state_dict: Dict[str, torch.Tensor]) -> Any:
    """The HF twin of the engine's model with every kv_shift layer's projections wrapped."""
    hf = hf_model(mc, state_dict)
    for i, spec in enumerate(mc.layer_attention):
        if spec.is_kv_shift:
            ak, av = spec.kv_shift_alphas()
            attn = hf.model.layers[i].self_attn
            pairs = lambda flat: [flat[2 * h: 2 * h + 2] for h in range(mc.num_key_value_heads)]  # noqa: E731
            attn.k_proj = ShiftedProjection(attn.k_proj, pairs(ak), mc.head_dim)
            attn.v_proj = ShiftedProjection(attn.v_proj, pairs(av), mc.head_dim)
    return hf


def _check_against_reference(engine: LLMEngine, prompts: List[List[int]], outs: List[Any]) -> None:
    hf = shift_reference(engine.model_config, engine.model.state_dict())
    worst = {"prefill": 0.0, "decode": 0.0}
    for prompt, o in zip(prompts, outs):
        assert o.finish_reason == "length" and len(o.output_token_ids) == STEPS
        full = prompt + o.output_token_ids
        with torch.no_grad():
            ref = hf(torch.tensor([full[:-1]])).logits[0].float()  # row p predicts token p + 1
        n = len(prompt)
        computed = ~torch.isnan(o.prompt_logits[:, 0])
        assert computed.sum() >= n - o.num_cached_prompt_tokens
        worst["prefill"] = max(worst["prefill"], (ref[:n][computed] - o.prompt_logits[computed]).abs().max().item())
        worst["decode"] = max(worst["decode"], (ref[n - 1:] - o.logits).abs().max().item())
        assert ref[n - 1:].argmax(-1).tolist() == o.output_token_ids
    assert worst["prefill"] < TOL and worst["decode"] < TOL, worst


def _model(seed: int, layers: Optional[List[Any]] = None) -> ModelConfig:
    rng = random.Random(seed)
    if layers is None:  # two KV-shift layers with their own weights around a dense one
        layers = [_shift_layer(_alphas(rng), _alphas(rng)), {"backend": "dense", "config": dense()},
                  _shift_layer(_alphas(rng), _alphas(rng))]
    return ModelConfig.from_dict(tiny_model(num_hidden_layers=len(layers), weights={"seed": seed},
                                            attention={"layers": layers}))


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_kv_shift_matches_hf_under_pressure(mode: str) -> None:
    """Six ~70-token sequences in 40 blocks of 8: preemption; 24-token steps: chunked prefill mixed
    with decodes; a 27-token system prompt (3 full blocks + 3 tokens): prefix hits, each refilled by
    re-running token 23 with slot -1 (recomputed requests hit their own earlier blocks too)."""
    mc = _model(seed=31)
    ec = EngineConfig(block_size=8, num_device_blocks=40, num_host_blocks=64 if mode == "swap" else 0,
                      max_num_seqs=6, max_num_batched_tokens=24, watermark=0.05, preemption_mode=mode)
    engine = LLMEngine(mc, ec)
    assert engine.num_state_slots == 6 and engine.state_bytes_per_layer == 2 * KV_HEADS * mc.head_dim * 4
    assert engine.raw_key_layers == frozenset({0, 2})
    prompts = _prompts(mc.vocab_size, 27, [5, 30, 12, 40, 9, 21], seed=32)
    outs = engine.generate(prompts, SamplingParams(max_tokens=STEPS, logits=True, prompt_logits=True))
    st = engine.stats()
    assert st["kv_shift_layers"] == 2 and st["num_state_slots"] == 6
    assert st["max_batch_seqs"] >= 4 and st["num_mixed_steps"] > 0 and st["num_chunked_prefills"] > 0
    assert st["num_preemptions"] > 0
    if mode == "swap":
        assert st["num_swap_outs"] > 0 and st["num_swap_ins"] == st["num_swap_outs"] and st["num_recomputes"] == 0
    else:
        assert st["num_recomputes"] > 0 and st["num_swap_outs"] == 0
    assert st["bm_prefix_hit_blocks"] > 0 and sum(1 for o in outs if o.num_cached_prompt_tokens > 0) >= 3
    assert st["num_state_refills"] >= 3  # one per admission with a hit
    _check_against_reference(engine, prompts, outs)
    engine.check_no_leaks()


def test_refill_alone_when_the_budget_has_one_token_and_without_refill_it_goes_wrong(monkeypatch: Any) -> None:
    """A budget of 2 tokens per step: the first request's decode leaves one, so the next request,
    admitted with a 16-token hit, gets only its refill token in its first step (q_len 1, seq_len 16,
    slot -1), then continues; all match the reference. Switching the refill off makes the first token
    after the hit mix a stale state (another sequence's last token)."""
    from kvplug.engine import scheduler as scheduler_module

    entries: List[Tuple[bool, int]] = []
    schedule = scheduler_module.Scheduler.schedule

    def recording(self: Any) -> Any:
        out = schedule(self)
        entries.extend((s.refill, s.num_tokens) for s in out.seqs if s.refill)
        return out

    monkeypatch.setattr(scheduler_module.Scheduler, "schedule", recording)
    mc = _model(seed=41)
    prompts = _prompts(mc.vocab_size, 16, [1, 5, 3], seed=42)
    params = SamplingParams(max_tokens=STEPS, logits=True, prompt_logits=True)
    ec = dict(block_size=8, num_device_blocks=64, num_host_blocks=0, max_num_seqs=4, max_num_batched_tokens=2)
    engine = LLMEngine(mc, EngineConfig(**ec))
    outs = engine.generate(prompts, params)
    st = engine.stats()
    assert st["num_state_refills"] == 2 and st["cached_tokens_admitted"] == 32
    assert entries[0] == (True, 0)  # the refill alone
    _check_against_reference(engine, prompts, outs)
    # Without the refill (a broken engine): the state slot holds whatever its last user left.
    broken = LLMEngine(mc, EngineConfig(**ec))
    broken.scheduler.refill_state = False
    bad = broken.generate(prompts, params)
    assert broken.stats()["num_state_refills"] == 0
    assert max((b.logits - o.logits).abs().max().item() for b, o in zip(bad[1:], outs[1:])) > 1e-3


def test_unit_weights_equal_dense() -> None:
    """a1 = b1 = 1, a2 = b2 = 0 on every layer: dense attention (the backend's fused RoPE on the
    keys against the model's), with prefix hits and refills on the way."""
    prompts = _prompts(256, 20, [9, 25, 4], seed=51)
    params = SamplingParams(max_tokens=12, logits=True, prompt_logits=True)
    ec = dict(block_size=8, num_device_blocks=64, max_num_batched_tokens=24)
    want = LLMEngine(_model(52, [{"backend": "dense", "config": dense()}] * 2), EngineConfig(**ec)).generate(
        prompts, params)
    unit = [[1.0, 0.0]] * KV_HEADS
    engine = LLMEngine(_model(52, [_shift_layer(unit, unit)] * 2), EngineConfig(**ec))
    got = engine.generate(prompts, params)
    assert engine.stats()["num_state_refills"] == 2
    for w, g in zip(want, got):
        assert g.output_token_ids == w.output_token_ids
        assert (g.logits - w.logits).abs().max().item() < 1e-5
        c = ~torch.isnan(w.prompt_logits[:, 0])
        assert (c == ~torch.isnan(g.prompt_logits[:, 0])).all()
        assert (g.prompt_logits[c] - w.prompt_logits[c]).abs().max().item() < 1e-5


def test_kv_shift_configs_are_checked_per_layer() -> None:
    def build(layer: Any, **model: Any) -> ModelConfig:
        return ModelConfig.from_dict(tiny_model(attention={"layers": {"1": layer}}, **model))

    # [kv_heads][2] tables are flattened; the engine fills the model's RoPE in the library's config.
    mc = build({"backend": "kv_shift", "config": {"backend_config_type": "KvShiftConfig",
                                                  "backend_config": {"alpha_k": [[1, 0.5], [0.25, -1]],
                                                                     "alpha_v": [1, 0, 0, 1]}}}, rope_theta=5e5)
    spec = mc.layer_attention[1]
    assert spec.kv_shift_alphas() == ([1, 0.5, 0.25, -1], [1, 0, 0, 1])
    inner = spec.library_config(mc)["backend_config"]
    assert (inner["rope_theta"], inner["rotary_dim"], inner["rope_style"]) == (5e5, 0, "NeoX")
    # Matching RoPE fields are accepted, others refused.
    build({"backend": "kv_shift", "config": {"backend_config_type": "KvShiftConfig", "backend_config": {
        "alpha_k": [1, 0] * 2, "alpha_v": [1, 0] * 2, "rope_theta": 10000.0, "rotary_dim": 32}}})
    with pytest.raises(EngineConfigError, match=r"layer 1: kv_shift: rope_theta=500.0 differs from the model's RoPE"):
        build({"backend": "kv_shift", "config": {"backend_config_type": "KvShiftConfig", "backend_config": {
            "alpha_k": [1, 0] * 2, "alpha_v": [1, 0] * 2, "rope_theta": 500.0}}})
    with pytest.raises(EngineConfigError, match="layer 1: the kv_shift alpha_k has 6 values, not "
                                                "num_key_value_heads \\* 2 = 4"):
        build(_shift_layer([[1, 0]] * 3, [[1, 0]] * 2))
    with pytest.raises(EngineConfigError, match="layer 1: backend 'kv_shift' needs a KvShiftConfig"):
        build({"backend": "kv_shift", "config": None})
    with pytest.raises(EngineConfigError, match=r"\[num_kv_heads\]\[2\] table"):
        build({"backend": "kv_shift", "config": {"backend_config_type": "KvShiftConfig",
                                                 "backend_config": {"alpha_k": [[1, 0, 2]], "alpha_v": [1, 0]}}})
    with pytest.raises(kvplug.InvalidConfigError, match=r"layer 1: backend 'kv_shift' rejects its config.*alpha_v\[1\]"):
        build(_shift_layer([[1, 0]] * 2, [[1, float("nan")], [1, 0]]))
