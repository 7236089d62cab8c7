#!/usr/bin/env python3
"""The CPU engine against PyTorch's CPU scaled_dot_product_attention, side by side in one run.

Shapes (GQA 32/8, head 128, pages of 16 in shuffled order): decode 8 x 4096, 32 x 1024, 1 x 32768;
causal prefill 1 x 1024, 1 x 4096; float32 and bfloat16 caches; 1 and 2 threads (kvplug's context
threads = torch.set_num_threads). PyTorch gets the same K/V as contiguous [B, H, L, D] tensors (its
best case); each round times kvplug then PyTorch (interleaved), and the table reports medians of the
rounds and their ratio. Decode also reports KV bytes/s against the machine's streaming read rate
(torch's sum over a 1 GiB float32 tensor, same threads, same run). Extra rows: a mixed batch
(prefill chunks + decodes), Star's anchor + block phase 1 and a 1024-token window, each in pairs
per second beside dense. The ISA the engine dispatched to is in kvplug.version_string().

Usage: python3 bench/cpu_bench.py --lib build/abi/libkvplug.so [--out bench/results/cpu.json]
       [--quick] [--threads 1,2] [--rounds 5]
KVP_CPU_ENGINE=plain selects the plain engine (the fast one is the default)."""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HQ, HKV, D, BS = 32, 8, 128, 16


def load_kvplug(lib):
    os.environ["KVPLUG_LIBRARY"] = os.path.abspath(lib)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python"))
    import kvplug
    return kvplug


CLOCK = time.perf_counter  # --cpu-time: time.process_time (a loaded machine, one thread)


def timed(fn, min_time=0.3, max_iters=200):
    fn()
    t0 = CLOCK()
    fn()
    one = CLOCK() - t0
    iters = max(1, min(max_iters, int(min_time / max(one, 1e-6))))
    t0 = CLOCK()
    for _ in range(iters):
        fn()
    return (CLOCK() - t0) / iters


class Case:
    """One batch: K/V pages (shuffled) for kvplug and the same K/V contiguous for PyTorch."""

    def __init__(self, kvplug, ctx, dtype, lens, q_lens, backend="dense", config=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.lens, self.q_lens = lens, q_lens
        per = [(n + BS - 1) // BS for n in lens]
        nblk = sum(per)
        perm = torch.randperm(nblk, generator=g)
        pages = torch.zeros(2, nblk, BS, HKV, D, dtype=dtype)
        self.k, self.v, self.q = [], [], []
        tables, start = [], 0
        for b, n in enumerate(lens):
            k = torch.randn(HKV, n, D, generator=g).to(dtype)
            v = torch.randn(HKV, n, D, generator=g).to(dtype)
            table = perm[start:start + per[b]]
            start += per[b]
            pos = torch.arange(n)
            pages[0, table[pos // BS], pos % BS] = k.transpose(0, 1)
            pages[1, table[pos // BS], pos % BS] = v.transpose(0, 1)
            self.k.append(k)
            self.v.append(v)
            self.q.append(torch.randn(HQ, q_lens[b], D, generator=g).to(dtype))
            tables.append(table.to(torch.int32))
        self.pages = pages
        qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        indptr = np.concatenate([[0], np.cumsum(per)]).astype(np.int32)
        T = int(qsl[-1])
        self.cache = kvplug.KvCache.from_tensors(ctx, [pages])
        self.plan = kvplug.Plan(ctx, max_num_seqs=len(lens), max_num_tokens=T, max_num_blocks=nblk)
        kw = {"config": config} if config is not None else {}
        self.att = kvplug.Attention(ctx, backend, num_q_heads=HQ, num_kv_heads=HKV, head_size=D,
                                    kv_dtype=str(dtype).split(".")[1], **kw)
        self.plan.attach(self.att)
        extra = {}
        if backend == "star":  # phase 1: the whole prompt is context
            extra["context_lens"] = np.array(lens, np.int32)
        self.plan.update(qsl, np.array(lens, np.int32), block_size=BS, kv_indptr=indptr,
                         kv_indices=torch.cat(tables).numpy(), **extra)
        self.query = torch.cat([q.transpose(0, 1) for q in self.q]).contiguous()  # [T, HQ, D]
        self.out = torch.empty_like(self.query)
        self.dtype = dtype

    def run_kvplug(self):
        self.att.run(self.plan, self.cache, 0, self.query, self.out)

    def run_torch(self, causal=True):
        outs = []
        for b in range(len(self.lens)):
            q = self.q[b].unsqueeze(0)
            k = self.k[b].unsqueeze(0)
            v = self.v[b].unsqueeze(0)
            # Causal with the queries at the end of the keys (bottom-right), as a serving step has.
            if self.q_lens[b] == 1:
                outs.append(F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            elif self.q_lens[b] == self.lens[b]:
                outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            else:
                n, m = self.lens[b], self.q_lens[b]
                mask = torch.ones(m, n, dtype=torch.bool).tril(diagonal=n - m)
                outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
        return outs

    def max_error(self):
        self.run_kvplug()
        ref = self.run_torch()
        got = self.out.float()
        err, t = 0.0, 0
        for b, o in enumerate(ref):
            m = self.q_lens[b]
            err = max(err, (got[t:t + m] - o[0].transpose(0, 1).float()).abs().max().item())
            t += m
        return err

    def kv_bytes(self):
        return sum(self.lens) * HKV * D * 2 * self.pages.element_size()

    def causal_pairs(self):
        return sum(sum(n - m + i + 1 for i in range(m)) for n, m in zip(self.lens, self.q_lens)) * HQ


def read_rate(threads):
    torch.set_num_threads(threads)
    x = torch.ones(1 << 28, dtype=torch.float32)
    x.sum()
    s = timed(lambda: x.sum(), min_time=0.5)
    del x
    return (1 << 30) / s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--out", default="")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small shapes, one round (a smoke run)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU time, not wall time (for one thread on a busy machine)")
    ap.add_argument("--only", default="", help="run only the work names containing this")
    args = ap.parse_args()
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    kvplug = load_kvplug(args.lib)
    engine = os.environ.get("KVP_CPU_ENGINE", "fast")
    print(f"kvplug {kvplug.version_string()} (engine {engine}); torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()})")
    decode = [(8, 4096), (32, 1024), (1, 32768)]
    prefill = [(1, 1024), (1, 4096)]
    if args.quick:
        decode, prefill, args.rounds = [(4, 256)], [(1, 256)], 1
    rows = []
    for threads in [int(x) for x in args.threads.split(",")]:
        ctx = kvplug.Context("cpu", num_threads=threads)
        torch.set_num_threads(threads)
        rate = read_rate(threads)
        print(f"\nthreads {threads}: streaming read {rate / 1e9:.1f} GB/s")
        print(f"{'work':28} {'dtype':9} {'kvplug ms':>10} {'torch ms':>10} {'ratio':>6} {'KV GB/s':>8} {'of read':>7} {'max err':>8}")
        for dtype in (torch.float32, torch.bfloat16):
            torch.set_num_threads(threads)
            cases = [("decode", B, L, Case(kvplug, ctx, dtype, [L] * B, [1] * B)) for B, L in decode]
            cases += [("prefill", B, L, Case(kvplug, ctx, dtype, [L] * B, [L] * B)) for B, L in prefill]
            for kind, B, L, c in cases:
                if args.only and args.only not in f"{kind} {B}x{L}":
                    continue
                err = c.max_error()
                tk, tt = [], []
                for _ in range(args.rounds):
                    tk.append(timed(c.run_kvplug))
                    tt.append(timed(c.run_torch))
                mk, mt = statistics.median(tk), statistics.median(tt)
                row = {"work": f"{kind} {B}x{L}", "dtype": str(dtype).split(".")[1], "threads": threads,
                       "kvplug_ms": mk * 1e3, "torch_ms": mt * 1e3, "ratio": mt / mk, "max_err": err,
                       "read_gbs": rate / 1e9}
                line = f"{row['work']:28} {row['dtype']:9} {mk * 1e3:10.3f} {mt * 1e3:10.3f} {mt / mk:6.2f}"
                if kind == "decode":
                    row["kv_gbs"] = c.kv_bytes() / mk / 1e9
                    row["of_read"] = c.kv_bytes() / mk / rate
                    line += f" {row['kv_gbs']:8.1f} {row['of_read']:7.0%}"
                else:
                    row["pairs_per_s"] = c.causal_pairs() / mk
                    line += f" {'':8} {'':7}"
                print(line + f" {err:8.1e}")
                rows.append(row)
                del c
        # Mixed step and the research key sets, in attended (query head, key) pairs per second.
        dtype = torch.bfloat16
        n = 256 if args.quick else 4096
        mixed = Case(kvplug, ctx, dtype, [n] + [1024] * 16, [512 if not args.quick else 64] + [1] * 16)
        dense = Case(kvplug, ctx, dtype, [n], [n])
        window = Case(kvplug, ctx, dtype, [n], [n], backend="dense",
                      config={"backend_config_type": "DenseConfig", "backend_config": {"window_left": n // 4}})
        blk = n // 4
        star = Case(kvplug, ctx, dtype, [n], [n], backend="star",
                    config={"backend_config_type": "StarConfig",
                            "backend_config": {"context_block_size": blk, "anchor_block_size": blk}})
        star_pairs = sum((i + 1) if i < blk else blk + (i % blk) + 1 for i in range(n)) * HQ
        for name, c, pairs in (("dense prefill", dense, dense.causal_pairs()),
                               (f"star phase 1 (blocks {blk})", star, star_pairs),
                               ("mixed prefill+16 decodes", mixed, mixed.causal_pairs()),
                               (f"window {n // 4} prefill", window,
                                sum(min(i + 1, n // 4 + 1) for i in range(n)) * HQ)):
            t = statistics.median(timed(c.run_kvplug) for _ in range(args.rounds))
            print(f"{name:28} bfloat16  {t * 1e3:10.3f} {'':10} {'':6} pairs/s {pairs / t / 1e9:.2f} G")
            rows.append({"work": name, "dtype": "bfloat16", "threads": threads, "kvplug_ms": t * 1e3,
                         "pairs_per_s": pairs / t})
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"version": kvplug.version_string(), "engine": engine, "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
