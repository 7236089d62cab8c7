#!/usr/bin/env python3
"""Star Attention on the GPU, side by side in one run with dense and the peers.

Phase 1 (context encoding): one sequence of S context tokens in blocks of b (anchor a = b), GQA
32/8, head 128, bf16, pages of 16 shuffled. kvplug's `star` on its paged cache against kvplug's own
dense, cuDNN and flash SDPA dense causal prefill (contiguous), and FlexAttention with the
anchor+block mask (exact Star: also the correctness reference). Speedup = best dense SDPA time /
time; FLOP-ideal = attended pairs of dense causal / attended pairs of Star. Also the relative
error of Star against dense on the same inputs (what Star's approximation costs).

Phase 2 (decode at 128k): B sequences, the context spread over 1 or 4 in-process shards (each a
cache of its blocks), each shard's partial (out, lse), merged by an in-process kvp_comm; the merge
share of the step time.

Usage: python3 bench/star_bench.py --lib build/abi/libkvplug.so --out OUT_DIR [--quick]
"""
import argparse
import ctypes as C
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import (BF16, KDLCUDA, AttentionOptions, CacheOptions, ContextOptions, Lib, PlanOptions,  # noqa: E402
                       dl_tensor, median_ms)


class Batch04(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("num_seqs", C.c_int32), ("block_size", C.c_int32),
                ("query_start_loc", C.POINTER(C.c_int32)), ("seq_lens", C.POINTER(C.c_int32)),
                ("block_table", C.POINTER(C.c_int32)), ("block_table_stride", C.c_int32),
                ("kv_indptr", C.POINTER(C.c_int32)), ("kv_indices", C.POINTER(C.c_int32)),
                ("slot_mapping", C.POINTER(C.c_int64)), ("state_slots", C.POINTER(C.c_int32)),
                ("context_lens", C.POINTER(C.c_int32)), ("query_pos_starts", C.POINTER(C.c_int32))]


class CommOptions(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("kind", C.c_int32), ("num_ranks", C.c_int32), ("rank", C.c_int32),
                ("nccl_unique_id", C.c_void_p), ("max_num_tokens", C.c_int32), ("num_heads", C.c_int32),
                ("head_size", C.c_int32), ("out_dtype", C.c_int32), ("validate_each_call", C.c_int32)]


def i32(xs):
    return (C.c_int32 * len(xs))(*xs)


class Shard:
    """A CUDA context's cache over torch pages, a plan and one attention (dense or star)."""

    def __init__(self, lib, ctx, pages, hq, hkv, d, bs, backend, config=None, max_tokens=1, max_seqs=1):
        self.lib, self.keep, self.pages, self.bs = lib, [], pages, bs
        self.cache, self.plan, self.attn = C.c_void_p(), C.c_void_p(), C.c_void_p()
        layer = dl_tensor(pages, self.keep)
        nblk = pages.shape[1]
        opts = CacheOptions(C.sizeof(CacheOptions), 1, nblk, bs, hkv, d, BF16, 0, 0, 0, 0, None, None)
        lib("kvp_kv_cache_create_from_tensors", ctx, C.byref(opts), C.byref(layer), 1, C.byref(self.cache))
        lib("kvp_plan_create", ctx, C.byref(PlanOptions(C.sizeof(PlanOptions), max_seqs, max_tokens, nblk)),
            C.byref(self.plan))
        cfg = json.dumps(config).encode() if config else None
        self.cfg = cfg
        ao = AttentionOptions(C.sizeof(AttentionOptions), backend.encode(), hq, hkv, d, BF16, 0.0,
                              2 if cfg else 0, C.cast(C.c_char_p(cfg), C.c_void_p) if cfg else None,
                              len(cfg) if cfg else 0)
        lib("kvp_attention_create", ctx, C.byref(ao), C.byref(self.attn))
        lib("kvp_plan_attach", self.plan, self.attn)

    def update(self, q_lens, kv_lens, tables, context_lens=None, pos_starts=None):
        qsl = [0]
        for q in q_lens:
            qsl.append(qsl[-1] + q)
        indptr = [0]
        for t in tables:
            indptr.append(indptr[-1] + len(t))
        flat = torch.cat(tables).to(torch.int32).contiguous()
        self.arrays = [i32(qsl), i32(kv_lens), i32(indptr), flat,
                       i32(context_lens) if context_lens else None, i32(pos_starts) if pos_starts else None]
        b = Batch04(C.sizeof(Batch04), len(q_lens), self.bs, self.arrays[0], self.arrays[1], None, 0, self.arrays[2],
                    C.cast(flat.data_ptr(), C.POINTER(C.c_int32)), None, None, self.arrays[4], self.arrays[5])
        self.lib("kvp_plan_update", self.plan, C.byref(b))

    def run(self, q, out, lse=None):
        keep = []
        qt, ot = dl_tensor(q, keep), dl_tensor(out, keep)
        lt = C.byref(dl_tensor(lse, keep)) if lse is not None else None
        self.lib("kvp_attention_run", self.attn, self.plan, self.cache, 0, C.byref(qt), C.byref(ot), lt)

    def close(self):
        self.lib.lib.kvp_attention_destroy(self.attn)
        self.lib.lib.kvp_plan_destroy(self.plan)
        self.lib.lib.kvp_kv_cache_destroy(self.cache)


def make_context(lib):
    ctx = C.c_void_p()
    stream = torch.cuda.current_stream().cuda_stream
    lib("kvp_context_create", C.byref(ContextOptions(C.sizeof(ContextOptions), KDLCUDA, 0, 0, stream)), C.byref(ctx))
    return ctx


def star_pairs(S, blk, a):
    nb = (S + blk - 1) // blk
    pairs = blk * (blk + 1) / 2
    for k in range(1, nb):
        n = min(blk, S - k * blk)
        pairs += n * a + n * (n + 1) / 2
    return pairs


def bench_phase1(lib, ctx, S, blocks, hq=32, hkv=8, d=128, bs=16, iters=5):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    nblk = S // bs
    pages = torch.randn(2, nblk, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(nblk, dtype=torch.int32)
    # Contiguous K/V for the peers, in token order.
    k = pages[0, perm.long()].reshape(S, hkv, d).transpose(0, 1).unsqueeze(0).contiguous()
    v = pages[1, perm.long()].reshape(S, hkv, d).transpose(0, 1).unsqueeze(0).contiguous()
    q = torch.randn(S, hq, d, device="cuda", dtype=torch.bfloat16)
    qc = q.transpose(0, 1).unsqueeze(0)
    peers = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel([be]):
            peers[name] = median_ms(lambda: F.scaled_dot_product_attention(qc, k, v, is_causal=True, enable_gqa=True),
                                    iters=iters, warmup=2)
    dense = Shard(lib, ctx, pages, hq, hkv, d, bs, "dense", max_tokens=S)
    dense.update([S], [S], [perm])
    out_dense = torch.empty_like(q)
    t_dense = median_ms(lambda: dense.run(q, out_dense), iters=iters, warmup=2)
    dense.close()
    best_dense = min(peers.values())
    rows = []
    kr = k.repeat_interleave(hq // hkv, dim=1)
    vr = v.repeat_interleave(hq // hkv, dim=1)
    for blk in blocks:
        if blk >= S:
            continue
        a = blk
        st = Shard(lib, ctx, pages, hq, hkv, d, bs, "star",
                   {"backend_config_type": "StarConfig",
                    "backend_config": {"context_block_size": blk, "anchor_block_size": a}}, max_tokens=S)
        st.update([S], [S], [perm], context_lens=[S])
        out = torch.empty_like(q)
        t_star = median_ms(lambda: st.run(q, out), iters=iters, warmup=2)
        st.close()

        def mask(b, h, qi, ki):
            return (qi >= ki) & ((qi // blk == ki // blk) | (ki < a))
        bm = create_block_mask(mask, 1, None, S, S, device="cuda", _compile=True)
        t_flex = median_ms(lambda: flex(qc, kr, vr, block_mask=bm), iters=iters, warmup=2)
        ref = flex(qc, kr, vr, block_mask=bm)[0].transpose(0, 1).float()
        err_flex = (out.float() - ref).abs().max().item()
        rel_vs_dense = ((out.float() - out_dense.float()).norm() / out_dense.float().norm()).item()
        ideal = (S * (S + 1) / 2) / star_pairs(S, blk, a)
        rows.append({"S": S, "block": blk, "anchor": a, "star_ms": t_star, "flex_ms": t_flex,
                     "kvplug_dense_ms": t_dense, "cudnn_ms": peers["cudnn"], "flash_ms": peers["flash"],
                     "speedup_star": best_dense / t_star, "speedup_flex": best_dense / t_flex,
                     "flop_ideal": ideal, "fraction_of_ideal": best_dense / t_star / ideal,
                     "star_TFLOPs": 4.0 * hq * d * star_pairs(S, blk, a) / t_star / 1e9,
                     "max_abs_vs_flex": err_flex, "rel_err_star_vs_dense": rel_vs_dense})
        print(json.dumps(rows[-1]), flush=True)
        del ref
        torch.cuda.empty_cache()
    del k, v, kr, vr, pages, q
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    lib = Lib(args.lib)
    ctx = make_context(lib)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "phase1": [], "phase2": []}
    sweeps = [(32768, [4096])] if args.quick else [(32768, [4096]), (65536, [4096, 8192]),
                                                   (131072, [4096, 8192, 16384])]
    for S, blocks in sweeps:
        results["phase1"] += bench_phase1(lib, ctx, S, blocks)
    results["phase2"] = bench_decode_shards(lib, ctx, 131072, [1, 8])
    with open(os.path.join(args.out, "star_bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    lib.lib.kvp_context_destroy(ctx)


def bench_decode_shards(lib, ctx, L, batches, hq=32, hkv=8, d=128, bs=16, blk=4096):
    rows = []
    for B in batches:
        times = {}
        for shards in (1, 4):
            nblocks = L // blk
            q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
            objs, outs, lses = [], [], []
            comm = C.c_void_p()
            if shards > 1:
                co = CommOptions(C.sizeof(CommOptions), 1, shards, 0, None, B, hq, d, BF16, 0)
                lib("kvp_comm_create", ctx, C.byref(co), C.byref(comm))
            for r in range(shards):
                own_blocks = [k for k in range(nblocks) if k % shards == r]
                own = len(own_blocks) * blk
                npages = B * own // bs
                pages = torch.randn(2, npages, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
                perm = torch.randperm(npages, dtype=torch.int32)
                per = own // bs
                tables = [perm[i * per:(i + 1) * per] for i in range(B)]
                # Each shard holds its context blocks; the decode token's own key lives on the
                # appending shard (shard 0 here), so that one holds own + 1 keys: give it a page more.
                app = r == 0
                extra = 1 if app else 0
                if app:
                    more = torch.randn(2, B, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
                    pages = torch.cat([pages, more], dim=1)
                    tables = [torch.cat([t, torch.tensor([npages + i], dtype=torch.int32)]) for i, t in enumerate(tables)]
                cfg = {"backend_config_type": "StarConfig",
                       "backend_config": {"context_block_size": blk, "anchor_block_size": blk,
                                          "num_shards": shards, "shard_rank": r, "append_shard": 0}}
                s = Shard(lib, ctx, pages, hq, hkv, d, bs, "star", cfg, max_tokens=B, max_seqs=B)
                starts = [L] * B if shards > 1 else None
                s.update([1] * B, [own + extra] * B, tables, context_lens=[L] * B, pos_starts=starts)
                objs.append(s)
                outs.append(torch.empty_like(q))
                lses.append(torch.empty(B, hq, device="cuda", dtype=torch.float32))

            def attend():
                for r, s in enumerate(objs):
                    s.run(q, outs[r], lses[r])

            def merge():
                keep = []
                for r in range(shards):
                    o, l_ = dl_tensor(outs[r], keep), dl_tensor(lses[r], keep)
                    lib("kvp_comm_merge_attention", comm, r, C.byref(o), C.byref(l_))

            def step():
                attend()
                if shards > 1:
                    merge()
            t_step = median_ms(step, iters=50)
            t_attend = median_ms(attend, iters=50)
            step()
            times[shards] = (t_step, t_attend)
            for s in objs:
                s.close()
            if shards > 1:
                lib.lib.kvp_comm_destroy(comm)
            del objs
            torch.cuda.empty_cache()
        t1, t4, t4a = times[1][0], times[4][0], times[4][1]
        rows.append({"L": L, "B": B, "one_shard_ms": t1, "four_shards_ms": t4, "four_shards_attend_ms": t4a,
                     "merge_share": (t4 - t4a) / t4})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
