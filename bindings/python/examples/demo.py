#!/usr/bin/env python3
"""kvplug from Python, end to end: the scenario of bench/demo.cc through the Python binding.

A block manager with prefix caching and a paged KV cache serve four requests that share a 48-token
system prompt and arrive over several steps (the later ones hit the prefix cache), with chunked
prefill (32 tokens per sequence per step) mixed with decode, a fork of request 1 once its prompt is
in (parallel sampling: its partly filled last block is shared until the first append copies it,
applied with KvCache.copy_blocks), then 8 decode steps per sequence. Attention is the library's
dense backend; every output is checked against naive causal attention in float64 NumPy
(kvplug.reference). K, V and Q are the same hash features as the C demo, so the counts (and nearly
the errors) match its table.

Usage: KVPLUG_LIBRARY=build/abi/libkvplug.so python bindings/python/examples/demo.py
Exits 1 if the max abs error (output or log-sum-exp) exceeds 1e-5 for the float32 cache (1e-4 for bfloat16).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Dict, List

import numpy as np
from numpy.typing import ArrayLike, NDArray

import kvplug
from kvplug.reference import naive_attention, round_to_bfloat16

LAYERS, Q_HEADS, KV_HEADS, HEAD, BLOCK, BLOCKS = 2, 8, 2, 128, 16, 96
CHUNK = 32  # prefill tokens per sequence per step (chunked prefill)
SYSTEM = list(range(1000, 1048))  # the shared system prompt
USER_LENS = [13, 29, 7, 50]
ARRIVAL = [0, 2, 2, 3]  # request r arrives at step ARRIVAL[r]
DECODE_STEPS = 8

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def feature(token: ArrayLike, pos: ArrayLike, layer: int, heads: int, which: int) -> NDArray[np.float32]:
    """bench/demo.cc's Feature(): a hash of (token, position, layer, head, i, which) in [-1, 1), for
    each token/position pair and every head and dimension: [n, heads, HEAD] float32.

    A shared prefix gets the same K/V in every sequence, as a real model's would."""
    u = np.uint64
    t = np.asarray(token, u)[:, None, None]
    p = np.asarray(pos, u)[:, None, None]
    h = np.arange(heads, dtype=u)[None, :, None]
    i = np.arange(HEAD, dtype=u)[None, None, :]
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as in C
        x = (t * u(0x9E3779B97F4A7C15)) ^ (p << u(20)) ^ (u(layer) << u(40)) ^ (h << u(48)) ^ (i << u(8)) ^ (
            u(which) << u(60))
        x ^= x >> u(33)
        x = (x * u(0xFF51AFD7ED558CCD)) & _M64
        x ^= x >> u(33)
        x = (x * u(0xC4CEB9FE1A85EC53)) & _M64
        x ^= x >> u(33)
    out: NDArray[np.float32] = ((x >> u(11)).astype(np.float64) / 9007199254740992.0 * 2.0 - 1.0).astype(np.float32)
    return out


@dataclasses.dataclass
class Sequence:
    id: int
    tokens: List[int]
    computed: int = 0  # tokens whose K/V is in the cache
    decode_left: int = DECODE_STEPS


@dataclasses.dataclass
class Row:
    dtype: str
    seqs: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    decode_tokens: int = 0
    cow_copies: int = 0
    kv_bytes: int = 0
    ms: float = 0.0
    max_err: float = 0.0  # out
    max_lse_err: float = 0.0


def serve(ctx: kvplug.Context, kv_dtype: str) -> Row:
    row = Row(kv_dtype)
    with kvplug.BlockManager(block_size=BLOCK, num_device_blocks=BLOCKS, enable_prefix_caching=True,
                             watermark=0.01) as bm, \
            kvplug.KvCache(ctx, num_layers=LAYERS, num_blocks=BLOCKS, block_size=BLOCK, num_kv_heads=KV_HEADS,
                           head_size=HEAD, dtype=kv_dtype) as cache, \
            kvplug.Attention(ctx, "dense", num_q_heads=Q_HEADS, num_kv_heads=KV_HEADS, head_size=HEAD,
                             kv_dtype=kv_dtype) as attn, \
            kvplug.Plan(ctx, max_num_seqs=16, max_num_tokens=512, max_num_blocks=BLOCKS) as plan:
        seqs: List[Sequence] = []
        admitted, forked, peak_used = 0, False, 0
        step = 0
        while True:
            # Admit the requests that have arrived: later ones find the system prompt computed.
            while admitted < len(USER_LENS) and ARRIVAL[admitted] <= step:
                r = admitted
                s = Sequence(r + 1, SYSTEM + [5000 + 100 * r + i for i in range(USER_LENS[r])])
                s.computed = bm.allocate(s.id, s.tokens)
                row.cached_tokens += s.computed
                seqs.append(s)
                admitted += 1
            # Schedule: each sequence contributes its next prefill chunk, or one decode token.
            batch: List[Sequence] = []
            q_lens: List[int] = []
            for s in seqs:
                pending = len(s.tokens) - s.computed
                if pending > 0:
                    batch.append(s)
                    q_lens.append(min(pending, CHUNK))
                    continue
                if s.decode_left == 0:
                    continue
                # Decode: append the next token (greedy stand-in, as in the C demo).
                nxt = 7 + (s.id * 131 + len(s.tokens) * 17) % 9000
                copy = bm.append(s.id, nxt)
                if copy is not None:  # the last block was shared with a fork: copy on write
                    cache.copy_blocks([copy])
                    row.cow_copies += 1
                s.tokens.append(nxt)
                s.decode_left -= 1
                row.decode_tokens += 1
                batch.append(s)
                q_lens.append(1)
            if not batch and admitted == len(USER_LENS):
                break
            step += 1
            if not batch:
                continue
            ids = [s.id for s in batch]
            qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
            table, _ = bm.block_tables(ids)
            # seq_lens for attention: tokens computed after this step (the rest of a prompt comes later).
            lens = np.array([s.computed + q for s, q in zip(batch, q_lens)], np.int32)
            slots = np.concatenate([bm.slot_mapping(s.id, s.computed, q) for s, q in zip(batch, q_lens)])
            t0 = time.perf_counter()
            plan.update(qsl, lens, block_size=BLOCK, block_table=table, slot_mapping=slots)
            row.ms += (time.perf_counter() - t0) * 1e3
            tok = np.concatenate([s.tokens[s.computed:s.computed + q] for s, q in zip(batch, q_lens)])
            pos = np.concatenate([np.arange(s.computed, s.computed + q) for s, q in zip(batch, q_lens)])
            qtok = np.concatenate([np.asarray(s.tokens[s.computed:s.computed + q], np.uint64) ^ np.uint64(s.id)
                                   for s, q in zip(batch, q_lens)])
            for layer in range(LAYERS):
                k = feature(tok, pos, layer, KV_HEADS, 0)
                v = feature(tok, pos, layer, KV_HEADS, 1)
                q = feature(qtok, pos, layer, Q_HEADS, 2)
                out = np.empty_like(q)
                lse = np.empty(q.shape[:2], np.float32)
                t1 = time.perf_counter()
                attn.write_kv(plan, cache, layer, k, v)
                attn.run(plan, cache, layer, q, out, lse)
                row.ms += (time.perf_counter() - t1) * 1e3
                # Reference: each sequence's contiguous K/V rebuilt from the features, in float64,
                # rounded as the cache stores them.
                for b, s in enumerate(batch):
                    n = int(lens[b])
                    all_pos = np.arange(n)
                    ks = feature(np.asarray(s.tokens[:n]), all_pos, layer, KV_HEADS, 0)
                    vs = feature(np.asarray(s.tokens[:n]), all_pos, layer, KV_HEADS, 1)
                    if kv_dtype == "bfloat16":
                        ks, vs = round_to_bfloat16(ks), round_to_bfloat16(vs)
                    ref, ref_lse = naive_attention(q[qsl[b]:qsl[b + 1]], ks, vs, attn.sm_scale)
                    row.max_err = max(row.max_err, float(np.abs(ref - out[qsl[b]:qsl[b + 1]]).max()))
                    row.max_lse_err = max(row.max_lse_err, float(np.abs(ref_lse - lse[qsl[b]:qsl[b + 1]]).max()))
            for s, q_len in zip(batch, q_lens):
                s.computed += q_len
                bm.mark_computed(s.id, s.computed)
            peak_used = max(peak_used, bm.stats().num_used_blocks)
            # Once request 1's prompt is in, fork it (parallel sampling): its partial last block is
            # shared until the first append copies it.
            if not forked and seqs[0].computed == len(seqs[0].tokens):
                bm.fork(1, 99)
                seqs.append(Sequence(99, list(seqs[0].tokens), seqs[0].computed))
                forked = True
        itemsize = 4 if kv_dtype == "float32" else 2
        row.kv_bytes = peak_used * 2 * BLOCK * KV_HEADS * HEAD * itemsize * LAYERS  # peak, all layers
        row.seqs = len(seqs)
        row.prefill_tokens = sum(len(SYSTEM) + n for n in USER_LENS) - row.cached_tokens
        for s in seqs:
            bm.free(s.id)
        if bm.stats().num_used_blocks != 0:
            raise SystemExit(f"block leak: {bm.stats().num_used_blocks} used after freeing all")
    return row


def main() -> int:
    v = kvplug.abi_version()
    print(f"kvplug {kvplug.version_string()} loaded from {kvplug.library_path()} "
          f"(ABI {v // 10000}.{v // 100 % 100}.{v % 100})")
    print(f"model: {LAYERS} layers, {Q_HEADS} query / {KV_HEADS} KV heads, head size {HEAD}, block size {BLOCK}; "
          f"{len(USER_LENS)} requests sharing a {len(SYSTEM)}-token system prompt, chunked prefill ({CHUNK} tokens), "
          f"a fork, {DECODE_STEPS} decode steps each\n")
    tolerance: Dict[str, float] = {"float32": 1e-5, "bfloat16": 1e-4}
    dtypes = [d for d in ("float32", "bfloat16") if d in kvplug.backend_info("dense").dtypes]
    with kvplug.Context() as ctx:
        rows = [serve(ctx, d) for d in dtypes]
    print(f"{'backend':<10} {'kv dtype':<9} {'seqs':>5} {'prefill':>8} {'cached':>7} {'decode':>7} {'cow':>4} "
          f"{'KV bytes':>10} {'time ms':>9} {'max |err|':>12} {'lse |err|':>12}")
    ok = True
    for r in rows:
        good = max(r.max_err, r.max_lse_err) <= tolerance[r.dtype]
        ok = ok and good
        print(f"{'dense':<10} {r.dtype:<9} {r.seqs:>5} {r.prefill_tokens:>8} {r.cached_tokens:>7} {r.decode_tokens:>7} "
              f"{r.cow_copies:>4} {r.kv_bytes:>10} {r.ms:>9.2f} {r.max_err:>12.3g} {r.max_lse_err:>12.3g}"
              f"{'' if good else '  <-- over tolerance'}")
    print("\nmax |err| (attention output) and lse |err| (its log-sum-exp): against naive causal attention in "
          "float64 NumPy;\ntolerance 1e-5 for a float32 cache, 1e-4 for bfloat16 (the reference fed the same rounded "
          "K/V).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
