#!/usr/bin/env python3
"""The mini engine (kvplug on the GPU) against Hugging Face transformers' own generate(), same model
and weights, same workload, one run: output tokens per second at batch 1 and batch 64.

Model: Llama architecture, 8 layers, hidden 1024, 16 query / 4 KV heads of 64, vocab 8192, bf16,
random weights (seed 0). Workload: 128-token random prompts, 128 greedy output tokens each.
Usage: KVPLUG_LIBRARY=... PYTHONPATH=bindings/python python3 bench/engine_bench.py --out DIR
"""
import argparse
import json
import os
import random
import time

import torch

from kvplug.engine import EngineConfig, LLMEngine, ModelConfig, SamplingParams

MODEL = {"vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
         "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64, "rms_norm_eps": 1e-6,
         "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
         "eos_token_id": None, "weights": {"seed": 0}}
PROMPT, OUTPUT = 128, 128


def run_engine(engine, prompts):
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=OUTPUT))
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    assert all(len(o.output_token_ids) == OUTPUT for o in outs)
    return dt, [o.output_token_ids for o in outs]


def run_hf(hf, prompts):
    ids = torch.tensor(prompts, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT, min_new_tokens=OUTPUT,
                          do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t, out[:, PROMPT:].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = ModelConfig.from_dict(MODEL, kv_cache_dtype="bfloat16", device="cuda")
    ec = EngineConfig(block_size=16, num_device_blocks=64 * (PROMPT + OUTPUT) // 16 + 64, num_host_blocks=0,
                      max_num_seqs=64, max_num_batched_tokens=8192, kv_cache_dtype="bfloat16", device="cuda")
    engine = LLMEngine(mc, ec, dtype="bfloat16")
    hf = LlamaForCausalLM(LlamaConfig(**mc.hf_config_kwargs())).to(torch.bfloat16).cuda().eval()
    hf.load_state_dict({k: v for k, v in engine.model.state_dict().items()}, strict=True)
    rng = random.Random(0)
    rows = []
    for batch in (1, 64):
        prompts = [[rng.randrange(MODEL["vocab_size"]) for _ in range(PROMPT)] for _ in range(batch)]
        run_engine(engine, prompts[:1])  # warm-up
        run_hf(hf, prompts[:1])
        t_ours, ours = run_engine(engine, prompts)
        t_hf, theirs = run_hf(hf, prompts)
        same = sum(a == b for a, b in zip(ours, theirs))
        first_div = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), OUTPUT) for a, b in zip(ours, theirs)]
        rows.append({"batch": batch, "engine_s": t_ours, "engine_tok_s": batch * OUTPUT / t_ours, "hf_s": t_hf,
                     "hf_tok_s": batch * OUTPUT / t_hf, "identical_sequences": same,
                     "mean_first_divergence": sum(first_div) / batch})
    engine.check_no_leaks()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engine_bench.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"device: {torch.cuda.get_device_name()}")
    print("| batch | kvplug engine tok/s | transformers generate tok/s | engine / HF | identical greedy outputs | mean first divergence (tokens) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['engine_tok_s']:.0f} ({r['engine_s']:.2f} s) | {r['hf_tok_s']:.0f} ({r['hf_s']:.2f} s) | "
              f"{r['engine_tok_s'] / r['hf_tok_s']:.2f}x | {r['identical_sequences']}/{r['batch']} | {r['mean_first_divergence']:.0f} |")


if __name__ == "__main__":
    main()
