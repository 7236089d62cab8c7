"""The engine against Hugging Face transformers' LlamaForCausalLM (eager attention, float32) with the
same random weights: prefill logits and 32 greedy decode steps agree within 1e-4, while batching,
chunked prefill, preemption and prefix-cache hits happen during the run (and are asserted)."""
from __future__ import annotations

import random
from typing import Any, Dict, List

import pytest
import torch

from engine_helpers import dense, hf_model, tiny_model
from kvplug.engine import EngineConfig, LLMEngine, ModelConfig, SamplingParams

TOL = 1e-4
DECODE_STEPS = 32


def _prompts(vocab: int, system_len: int, user_lens: List[int], seed: int = 0) -> List[List[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(system_len)]
    return [system + [rng.randrange(vocab) for _ in range(n)] for n in user_lens]


def _check_against_hf(engine: LLMEngine, prompts: List[List[int]], outs: List[Any]) -> Dict[str, float]:
    hf = hf_model(engine.model_config, engine.model.state_dict())
    worst = {"prefill": 0.0, "decode": 0.0}
    for prompt, o in zip(prompts, outs):
        assert o.finish_reason == "length" and len(o.output_token_ids) == DECODE_STEPS
        full = prompt + o.output_token_ids
        with torch.no_grad():
            ref = hf(torch.tensor([full[:-1]])).logits[0].float()  # position p predicts token p + 1
        n = len(prompt)
        # Prefill: every prompt position the engine computed (prefix-cache hits have no logits).
        computed = ~torch.isnan(o.prompt_logits[:, 0])
        assert computed.sum() >= n - o.num_cached_prompt_tokens
        worst["prefill"] = max(worst["prefill"], (ref[:n][computed] - o.prompt_logits[computed]).abs().max().item())
        # Decode: the logits each output token was sampled from.
        assert o.logits.shape == (DECODE_STEPS, engine.model_config.vocab_size)
        worst["decode"] = max(worst["decode"], (ref[n - 1:] - o.logits).abs().max().item())
        # Greedy: Hugging Face's argmax after every prefix is the engine's token, so HF greedy
        # decoding from the prompt yields exactly these 32 tokens.
        assert ref[n - 1:].argmax(-1).tolist() == o.output_token_ids
    assert worst["prefill"] < TOL and worst["decode"] < TOL, worst
    return worst


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_prefill_and_greedy_decode_match_hf_under_pressure(mode: str) -> None:
    mc = ModelConfig.from_dict(tiny_model(num_hidden_layers=3, weights={"seed": 1}))
    # 40 blocks of 8 tokens cannot hold six ~70-token sequences: preemption; 24 tokens per step:
    # chunked prefill mixed with decodes; a 24-token system prompt: prefix-cache hits.
    ec = EngineConfig(block_size=8, num_device_blocks=40, num_host_blocks=64 if mode == "swap" else 0,
                      max_num_seqs=6, max_num_batched_tokens=24, watermark=0.05, preemption_mode=mode)
    engine = LLMEngine(mc, ec)
    prompts = _prompts(mc.vocab_size, 24, [5, 30, 12, 40, 9, 21])
    outs = engine.generate(prompts, SamplingParams(max_tokens=DECODE_STEPS, logits=True, prompt_logits=True))
    st = engine.stats()
    # It happened: batching, mixed steps, chunked prefill, preemption (and resumption), prefix hits.
    assert st["max_batch_seqs"] >= 4
    assert st["num_mixed_steps"] > 0 and st["num_chunked_prefills"] > 0
    assert st["num_preemptions"] > 0
    if mode == "swap":
        assert st["num_swap_outs"] > 0 and st["num_swap_ins"] == st["num_swap_outs"]
        assert st["num_recomputes"] == 0
    else:
        assert st["num_recomputes"] > 0 and st["num_swap_outs"] == 0
    assert sum(o.num_preemptions for o in outs) == st["num_preemptions"]
    assert st["bm_prefix_hit_blocks"] > 0 and st["cached_tokens_admitted"] > 0
    assert sum(1 for o in outs if o.num_cached_prompt_tokens > 0) >= 3
    assert outs[0].num_cached_prompt_tokens == 0  # the first computes its whole prompt
    _check_against_hf(engine, prompts, outs)
    engine.check_no_leaks()


def test_gqa_4_to_1_head_64_tied_embeddings_match_hf() -> None:
    mc = ModelConfig.from_dict(tiny_model(hidden_size=128, intermediate_size=192, num_attention_heads=8,
                                          num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                                          rope_theta=500000.0, weights={"seed": 7},
                                          attention={"default": {"backend": "dense", "config": dense(-1)}}))
    ec = EngineConfig(block_size=16, num_device_blocks=16, num_host_blocks=32, max_num_seqs=4,
                      max_num_batched_tokens=48)
    engine = LLMEngine(mc, ec)
    prompts = _prompts(mc.vocab_size, 32, [1, 17, 45, 8])
    outs = engine.generate(prompts, SamplingParams(max_tokens=DECODE_STEPS, logits=True, prompt_logits=True))
    st = engine.stats()
    assert st["bm_prefix_hit_blocks"] > 0 and st["num_preemptions"] > 0 and st["max_batch_seqs"] >= 3
    _check_against_hf(engine, prompts, outs)
    engine.check_no_leaks()


def test_hf_generate_agrees() -> None:
    """Hugging Face's own decode loop (its KV cache, greedy generate) gives the engine's tokens."""
    mc = ModelConfig.from_dict(tiny_model(weights={"seed": 3}))
    engine = LLMEngine(mc, EngineConfig(block_size=8, num_device_blocks=64, max_num_batched_tokens=32))
    prompts = _prompts(mc.vocab_size, 16, [3, 20])
    outs = engine.generate(prompts, SamplingParams(max_tokens=DECODE_STEPS))
    hf = hf_model(mc, engine.model.state_dict())
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            gen = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=DECODE_STEPS, min_new_tokens=DECODE_STEPS, do_sample=False,
                              pad_token_id=0)
        assert gen[0, len(p):].tolist() == o.output_token_ids
