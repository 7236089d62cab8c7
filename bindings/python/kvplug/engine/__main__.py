"""python -m kvplug.engine: serve a synthetic workload and print serving metrics.

Example: python -m kvplug.engine --num-requests 64 --prompt-len 16:96 --output-len 8:48 --system-prompt-len 32
Exit status: 0 when every request completed, 1 when some did not, 2 for a bad argument or config.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Dict, List, Optional

#: The model served without --model-config: a small Llama with random weights.
DEFAULT_MODEL: Dict[str, Any] = {
    "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "weights": {"seed": 0},
    "attention": {"default": {"backend": "dense",
                              "config": {"backend_config_type": "DenseConfig", "backend_config": {"window_left": -1}}}},
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvplug.engine", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=64)
    w.add_argument("--prompt-len", default="16:96", help="user prompt tokens: N or LO:HI (uniform)")
    w.add_argument("--output-len", default="8:48", help="max output tokens: N or LO:HI (uniform)")
    w.add_argument("--system-prompt-len", type=int, default=32, help="tokens of the shared system prompt (0: none)")
    w.add_argument("--shared-fraction", type=float, default=0.8, help="fraction of requests with the system prompt")
    w.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    w.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: seeded sampling")
    w.add_argument("--stop-token", type=int, action="append", default=[], help="a stop token id (repeatable)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--query-len", type=int, default=0,
                   help="trailing prompt tokens of each request that are its query; the rest is context "
                        "(Star phase 1). 0: the whole prompt is context")
    m = p.add_argument_group("model")
    m.add_argument("--model-config", help="JSON model config (architecture, weights, per-layer backends); "
                                          "default: a 4-layer random Llama")
    m.add_argument("--star-layers", metavar="LAYERS",
                   help="run Star Attention on these layers: 'all' or indices like 0,2-3 (overrides the "
                        "model config there); with all layers and prefix caching, Star prefix keys")
    m.add_argument("--star-block", type=int, default=64, help="Star context block size (tokens)")
    m.add_argument("--star-anchor", type=int, default=None, help="Star anchor size (tokens; default: one block)")
    m.add_argument("--entropy-layers", metavar="LAYERS",
                   help="run entropy-guided attention (the 'entropy' backend) on these layers: 'all' or indices "
                        "like 0,2-3 (overrides the model config there), with --entropy-temperature")
    m.add_argument("--entropy-temperature", default="1",
                   help="temperature of those layers: one value, or one per attention head (comma-separated); "
                        "per-position tables go in the model config")
    m.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when torch sees a GPU and libkvplug was built with CUDA, else CPU")
    e = p.add_argument_group("engine")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--num-blocks", type=int, default=256, help="device KV blocks")
    e.add_argument("--num-host-blocks", type=int, default=256, help="host swap blocks (0: no swapping)")
    e.add_argument("--max-num-seqs", type=int, default=32)
    e.add_argument("--max-batched-tokens", type=int, default=256, help="token budget per step")
    e.add_argument("--watermark", type=float, default=0.01)
    e.add_argument("--preemption-mode", choices=["swap", "recompute"], default="swap")
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--threads", type=int, default=0, help="kvplug CPU threads (0: all cores)")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    o.add_argument("--entropy", action="store_true",
                   help="attention-entropy telemetry: every layer whose backend supports it (dense, star, entropy) "
                        "reports a per-head summary each step, accumulated on the device; prints a per-layer, "
                        "per-head table at the end")
    o.add_argument("--entropy-png", metavar="PATH",
                   help="with the telemetry (implies --entropy): write a layer x head heat map of the mean "
                        "normalised entropy, collapse and overload bands marked (needs matplotlib)")
    o.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress line on stderr (auto: on for runs over 32 requests)")
    return p


def _pick_device(requested: str) -> str:
    import torch

    import kvplug

    if requested == "cpu":
        return "cpu"
    cuda_lib = kvplug.DEVICES["cuda"] in kvplug.backend_info("dense").device_types
    if requested == "cuda":
        if not torch.cuda.is_available() or not cuda_lib:
            raise SystemExit("error: --device cuda: " + ("torch sees no GPU" if not torch.cuda.is_available()
                                                          else "this libkvplug was built without CUDA"))
        return "cuda"
    if torch.cuda.is_available() and cuda_lib:
        try:
            kvplug.Context("cuda").close()
            return "cuda"
        except kvplug.KvplugError:
            pass
    return "cpu"


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .config import (EngineConfig, EngineConfigError, ModelConfig, entropy_spec, parse_layer_list,
                         parse_temperatures, star_spec)
    from .engine import LLMEngine
    from .telemetry import MatplotlibMissing, check_matplotlib, format_table, write_heatmap
    from .workload import Progress, format_report, make_workload, parse_range, run_workload

    import kvplug

    try:
        prompt_len = parse_range(args.prompt_len, "--prompt-len")
        output_len = parse_range(args.output_len, "--output-len")
        device = _pick_device(args.device)
        on_gpu = device == "cuda"
        ec = EngineConfig(block_size=args.block_size, num_device_blocks=args.num_blocks,
                          num_host_blocks=args.num_host_blocks, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_batched_tokens,
                          enable_prefix_caching=not args.no_prefix_caching, watermark=args.watermark,
                          preemption_mode=args.preemption_mode, kv_cache_dtype="bfloat16" if on_gpu else "float32",
                          device=device, num_threads=args.threads, seed=args.seed,
                          entropy_telemetry=bool(args.entropy or args.entropy_png))
        ec.check()
        if args.entropy_png:
            check_matplotlib()  # before serving: a missing matplotlib is not found out after the run
        if args.model_config:
            mc = ModelConfig.from_json(args.model_config, kv_cache_dtype=ec.kv_cache_dtype, device=device)
        else:
            mc = ModelConfig.from_dict(DEFAULT_MODEL, kv_cache_dtype=ec.kv_cache_dtype, device=device)
        if args.query_len < 0:
            raise EngineConfigError(f"--query-len={args.query_len} must be >= 0")
        if args.star_layers:
            layers = parse_layer_list(args.star_layers, mc.num_hidden_layers)
            mc = mc.with_layers(layers, star_spec(args.star_block, args.star_anchor))
        if args.entropy_layers:
            layers = parse_layer_list(args.entropy_layers, mc.num_hidden_layers, "--entropy-layers")
            temps = parse_temperatures(args.entropy_temperature, mc.num_attention_heads)
            mc = mc.with_layers(layers, entropy_spec([[t] for t in temps]))
        engine = LLMEngine(mc, ec, dtype="bfloat16" if on_gpu else "float32")
    except (EngineConfigError, kvplug.KvplugError, ValueError, OSError, MatplotlibMissing) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    stop = args.stop_token
    workload = make_workload(args.num_requests, mc.vocab_size, prompt_len, output_len, args.system_prompt_len,
                             args.shared_fraction, args.request_rate, args.temperature, args.seed, stop)
    for w in workload:
        w.query_len = args.query_len
    rate = "all at once" if not math.isfinite(args.request_rate) else f"Poisson, {args.request_rate:g} req/s"
    print(f"kvplug engine: synthetic workload on {device} (libkvplug {kvplug.library_path()})")
    print(engine.describe())
    print(f"workload: {args.num_requests} requests, prompts {prompt_len[0]}-{prompt_len[1]} tokens "
          f"(+ a {args.system_prompt_len}-token system prompt on {100 * args.shared_fraction:.0f}%), outputs "
          f"{output_len[0]}-{output_len[1]} tokens, {'greedy' if args.temperature == 0 else f'T={args.temperature}'}, "
          f"arrivals {rate}")
    sys.stdout.flush()
    enabled = args.progress == "on" or (args.progress == "auto" and args.num_requests > 32)
    try:
        metrics = run_workload(engine, workload, Progress(len(workload), enabled=enabled))
    except ValueError as e:  # a request that can never fit this pool or model
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine.check_no_leaks()
    print("results")
    print(format_report(metrics))
    report = engine.entropy_report()
    if report is not None:
        print(format_table(report))
        if args.entropy_png:
            write_heatmap(report, args.entropy_png,
                          title=f"mean H / log(keys) per layer and head ({metrics['num_requests']} requests, "
                                f"{max(x['rows'] for x in report['layers']) // mc.num_attention_heads} rows per head)")
            print(f"entropy heat map: {args.entropy_png}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": device, "args": {k: v for k, v in vars(args).items() if k != "json"},
                       "model": mc.to_dict(), "metrics": metrics}, f, indent=2, default=str)
    return 0 if metrics["num_completed"] == metrics["num_requests"] == args.num_requests else 1


if __name__ == "__main__":
    sys.exit(main())
