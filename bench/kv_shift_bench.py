#!/usr/bin/env python3
"""KV shifting attention on the GPU against dense: write + attention time per step on the dense
table's decode (64x4k, 16x32k, 128x2k, 1x128k) and prefill (1x4k, 1x16k, 1x64k, 4x4k) shapes, GQA
32/8, head 128, bf16, pages of 16 shuffled; kv_shift with its fused RoPE (theta 1e4, NeoX).
Target: <= 3% over dense. Usage: python3 bench/kv_shift_bench.py --lib LIB --out OUT_DIR"""
import argparse
import ctypes as C
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import BF16, AttentionOptions, CacheOptions, Lib, PlanOptions, dl_tensor, median_ms  # noqa: E402
from star_bench import Batch04, i32, make_context  # noqa: E402


def step_time(lib, ctx, backend, B, L, q_len, hq=32, hkv=8, d=128, bs=16):
    per = (L + bs - 1) // bs
    nblk = B * per
    pages = torch.randn(2, nblk, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    keep = []
    layer = dl_tensor(pages, keep)
    cache, plan, attn = C.c_void_p(), C.c_void_p(), C.c_void_p()
    cfg = None
    if backend == "kv_shift":
        ak = [1.0, 0.5] * hkv
        cfg = json.dumps({"backend_config_type": "KvShiftConfig",
                          "backend_config": {"alpha_k": ak, "alpha_v": ak, "rope_theta": 10000.0}}).encode()
    ao = AttentionOptions(C.sizeof(AttentionOptions), backend.encode(), hq, hkv, d, BF16, 0.0, 2 if cfg else 0,
                          C.cast(C.c_char_p(cfg), C.c_void_p) if cfg else None, len(cfg) if cfg else 0)
    lib("kvp_attention_create", ctx, C.byref(ao), C.byref(attn))
    state = C.c_int64(0)
    lib("kvp_attention_state_bytes", attn, C.byref(state))
    opts = CacheOptions(C.sizeof(CacheOptions), 1, nblk, bs, hkv, d, BF16, 0, 0, B if state.value else 0,
                        state.value, None, None)
    lib("kvp_kv_cache_create_from_tensors", ctx, C.byref(opts), C.byref(layer), 1, C.byref(cache))
    T = B * q_len
    lib("kvp_plan_create", ctx, C.byref(PlanOptions(C.sizeof(PlanOptions), B, T, nblk)), C.byref(plan))
    lib("kvp_plan_attach", plan, attn)
    perm = torch.randperm(nblk, dtype=torch.int32)
    tables = [perm[i * per:(i + 1) * per] for i in range(B)]
    qsl = [q_len * i for i in range(B + 1)]
    indptr = [per * i for i in range(B + 1)]
    flat = torch.cat(tables).contiguous()
    slots = torch.tensor([int(tables[b][p // bs]) * bs + p % bs for b in range(B) for p in range(L - q_len, L)],
                         dtype=torch.int64)
    arrays = [i32(qsl), i32([L] * B), i32(indptr), flat, slots, i32(list(range(B)))]
    batch = Batch04(C.sizeof(Batch04), B, bs, arrays[0], arrays[1], None, 0, arrays[2],
                    C.cast(flat.data_ptr(), C.POINTER(C.c_int32)), C.cast(slots.data_ptr(), C.POINTER(C.c_int64)),
                    arrays[5] if state.value else None, None, None)
    lib("kvp_plan_update", plan, C.byref(batch))
    q = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(T, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    kt, vt, qt, ot = (dl_tensor(x, keep) for x in (k, v, q, out))

    def step():
        lib("kvp_attention_write_kv", attn, plan, cache, 0, C.byref(kt), C.byref(vt))
        lib("kvp_attention_run", attn, plan, cache, 0, C.byref(qt), C.byref(ot), None)
    ms = median_ms(step, iters=10 if q_len > 1 else 60, warmup=3)
    lib.lib.kvp_plan_destroy(plan)
    lib.lib.kvp_kv_cache_destroy(cache)
    lib.lib.kvp_attention_destroy(attn)
    del pages
    torch.cuda.empty_cache()
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    torch.manual_seed(0)
    lib = Lib(args.lib)
    ctx = make_context(lib)
    rows = []
    shapes = [(64, 4096, 1), (16, 32768, 1), (128, 2048, 1), (1, 131072, 1),
              (1, 4096, 4096), (1, 16384, 16384), (1, 65536, 65536), (4, 4096, 4096)]
    for B, L, q in shapes:
        dense, shift = step_time(lib, ctx, "dense", B, L, q), step_time(lib, ctx, "kv_shift", B, L, q)
        rows.append({"B": B, "L": L, "q_len": q, "dense_ms": dense, "kv_shift_ms": shift, "overhead": shift / dense - 1})
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "kv_shift_bench.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
