#!/usr/bin/env python3
"""Entropy-guided attention on the GPU against dense, on the dense table's shapes, one run.

For each decode shape (64x4k, 16x32k, 128x2k, 1x128k) and prefill shape (1x4k, 1x16k, 1x64k, 4x4k),
GQA 32/8, head 128, bf16, pages of 16 shuffled: kvplug `dense`; `entropy` with a temperature table
[32 heads, 512 positions] (temperature only); `entropy` writing the per-token entropy; and with the
per-head summary too. Overheads relative to dense (targets: <= 1% temperature only, <= 5% with the
per-token entropy).

Usage: python3 bench/entropy_bench.py --lib build/abi/libkvplug.so --out OUT_DIR
"""
import argparse
import ctypes as C
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import Lib, dl_tensor, median_ms  # noqa: E402
from star_bench import Shard, make_context  # noqa: E402


class Outputs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("out", C.c_void_p), ("lse", C.c_void_p), ("entropy", C.c_void_p),
                ("entropy_summary", C.c_void_p)]


def run_v2(lib, shard, q, out, entropy=None, summary=None):
    keep = []
    qt, ot = dl_tensor(q, keep), dl_tensor(out, keep)
    et = dl_tensor(entropy, keep) if entropy is not None else None
    st = dl_tensor(summary, keep) if summary is not None else None
    o = Outputs(C.sizeof(Outputs), C.cast(C.pointer(ot), C.c_void_p), None,
                C.cast(C.pointer(et), C.c_void_p) if et is not None else None,
                C.cast(C.pointer(st), C.c_void_p) if st is not None else None)
    lib("kvp_attention_run_v2", shard.attn, shard.plan, shard.cache, 0, C.byref(qt), C.byref(o))


def bench(lib, ctx, B, L, q_len, hq=32, hkv=8, d=128, bs=16):
    per = (L + bs - 1) // bs
    pages = torch.randn(2, B * per, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(B * per, dtype=torch.int32)
    tables = [perm[i * per:(i + 1) * per] for i in range(B)]
    T = B * q_len
    q = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    ent = torch.empty(T, hq, device="cuda", dtype=torch.float32)
    summ = torch.empty(hq, 6, device="cuda", dtype=torch.float32)
    temps = [0.5 + (i % 512) / 512 for i in range(hq * 512)]
    cfg = {"backend_config_type": "EntropyConfig", "backend_config": {"temperature": temps}}
    iters = 10 if q_len > 1 else 60
    row = {"B": B, "L": L, "q_len": q_len}
    ref = None
    for name, backend, config, e, s in (("dense", "dense", None, None, None),
                                        ("temperature", "entropy", cfg, None, None),
                                        ("entropy_rows", "entropy", cfg, ent, None),
                                        ("entropy_rows_summary", "entropy", cfg, ent, summ)):
        sh = Shard(lib, ctx, pages, hq, hkv, d, bs, backend, config, max_tokens=T, max_seqs=B)
        sh.update([q_len] * B, [L] * B, tables)
        row[name + "_ms"] = median_ms(lambda: run_v2(lib, sh, q, out, e, s), iters=iters, warmup=3)
        if name == "dense":
            ref = out.clone()
        sh.close()
    for name in ("temperature", "entropy_rows", "entropy_rows_summary"):
        row[name + "_overhead"] = row[name + "_ms"] / row["dense_ms"] - 1
    del pages, q, out, ref
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    torch.manual_seed(0)
    lib = Lib(args.lib)
    ctx = make_context(lib)
    rows = [bench(lib, ctx, B, L, 1) for B, L in ((64, 4096), (16, 32768), (128, 2048), (1, 131072))]
    rows += [bench(lib, ctx, B, L, L) for B, L in ((1, 4096), (1, 16384), (1, 65536), (4, 4096))]
    with open(os.path.join(args.out, "entropy_bench.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
