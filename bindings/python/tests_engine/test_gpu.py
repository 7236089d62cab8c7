"""The engine on a GPU (CUDA context, bfloat16 weights and cache, libkvplug's CUDA dense backend)
against Hugging Face in float32 with the same (bfloat16-rounded) weights. Skipped without a GPU or
without a CUDA build of libkvplug."""
from __future__ import annotations

import random

import pytest
import torch

import kvplug
from engine_helpers import hf_model, tiny_model
from kvplug.engine import EngineConfig, LLMEngine, ModelConfig, SamplingParams


def _cuda_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    if kvplug.DEVICES["cuda"] not in kvplug.backend_info("dense").device_types:
        return False
    try:
        kvplug.Context("cuda").close()
    except kvplug.KvplugError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _cuda_ready(), reason="needs a GPU and a CUDA build of libkvplug")

# bfloat16 activations and cache against float32: logits of unit scale agree to about 2^-8 relative
# per operation, a few of them in a row. An estimate, not yet measured on a GPU: the test prints the
# observed difference, to tighten this once it has run.
TOL = 0.15


def test_gpu_engine_matches_hf_in_bfloat16() -> None:
    mc = ModelConfig.from_dict(tiny_model(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                          num_key_value_heads=2, head_dim=64, num_hidden_layers=3,
                                          weights={"seed": 5}), kv_cache_dtype="bfloat16", device="cuda")
    ec = EngineConfig(block_size=16, num_device_blocks=20, num_host_blocks=32, max_num_seqs=6,
                      max_num_batched_tokens=48, kv_cache_dtype="bfloat16", device="cuda")
    engine = LLMEngine(mc, ec, dtype="bfloat16")
    rng = random.Random(0)
    system = [rng.randrange(256) for _ in range(32)]
    prompts = [system + [rng.randrange(256) for _ in range(n)] for n in (5, 30, 12, 40, 9, 21)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=32, logits=True, prompt_logits=True))
    st = engine.stats()
    assert st["num_preemptions"] > 0 and st["num_swap_ins"] > 0 and st["bm_prefix_hit_blocks"] > 0
    engine.check_no_leaks()

    # The reference: the engine's own bfloat16 weights, in float32, on the CPU.
    hf = hf_model(mc, {k: v.float().cpu() for k, v in engine.model.state_dict().items()})
    worst, agree, total = 0.0, 0, 0
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf(torch.tensor([p + o.output_token_ids[:-1]])).logits[0]
        n = len(p)
        worst = max(worst, (ref[n - 1:] - o.logits).abs().max().item())
        m = ~torch.isnan(o.prompt_logits[:, 0])
        worst = max(worst, (ref[:n][m] - o.prompt_logits[m]).abs().max().item())
        agree += sum(int(a == b) for a, b in zip(ref[n - 1:].argmax(-1).tolist(), o.output_token_ids))
        total += len(o.output_token_ids)
    print(f"GPU bfloat16 vs HF float32: max |logits diff| {worst:.4f}, greedy agreement {agree}/{total}")
    assert worst < TOL
    assert agree >= 0.95 * total
