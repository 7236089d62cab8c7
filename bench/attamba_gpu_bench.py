#!/usr/bin/env python3
"""Attamba against dense on the GPU (issue 11's Benchmarks): KV bytes per token from the real
allocations, and decode attention per layer step at the same batch and context.

Shapes: GQA 32/8, head 128, bfloat16 pages of 16, window L = 64, cyclic offsets (one layer);
contexts 32k and 128k, batches 8 and 1, P in {4, 8, 16}.

- KV bytes: attamba's pages are the ones the serving engine's attamba page pool
  (``kvplug.engine.attamba.AttambaPages``: ``kvp_attention_cache_layout`` per step, window pages
  the window no longer reaches freed) holds for the batch when token n decodes, after the context
  went in through ``kvp_attention_write_kv`` in 4096-token steps; dense's are the blocks
  ``kvp_block_manager`` holds for the same batch (``kvp_block_manager_stats.num_used_blocks``).
  Bytes = pages x the cache's page bytes (K and V). Target: (1/P + L/n) of dense.
- Decode: one query per sequence at position n; ``kvp_attention_run`` (the attention of one layer
  step; the write of the step's K/V is timed separately, ``write_ms``) captured in a CUDA graph of
  ``--reps`` calls on the context's stream and replayed between CUDA events (so Python's call
  overhead is not counted), medians of interleaved rounds; tokens/s = batch / step time. Target:
  attamba >= 0.8 P x dense's tokens/s. The loop column times the same calls launched from Python.
- Each attamba configuration's output of sequence 0 is checked against a float32 PyTorch
  reference over the keys the mask allows (chunk ends before n - L and the window).

Usage: python3 bench/attamba_gpu_bench.py [--lib LIB] [--out DIR] [--contexts 32768 131072]
       [--batches 8 1] [--chunks 4 8 16]
(KVPLUG_LIBRARY or --lib: the libkvplug.so; bindings/python on PYTHONPATH or found beside bench/.)
"""
from __future__ import annotations

import argparse
import ctypes as C
import json
import os
import statistics
import sys
import time
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bindings", "python"))

HQ, HKV, D, BS, WINDOW, STEP = 32, 8, 128, 16, 64, 4096
DEVICE = "cuda"  # --device cpu: a smoke test of the same code on the CPU backend (timings meaningless)


def load(lib_path):
    if lib_path:
        os.environ["KVPLUG_LIBRARY"] = lib_path
    import kvplug  # noqa: E402
    from kvplug.engine.attamba import AttambaPages  # noqa: E402
    return kvplug, AttambaPages


class Raw:
    """kvp_attention_run / kvp_attention_write_kv through ctypes on prebuilt DLTensors (no DLPack
    exchange per call, so the calls can be captured in a CUDA graph)."""

    class DLDevice(C.Structure):
        _fields_ = [("device_type", C.c_int32), ("device_id", C.c_int32)]

    class DLDataType(C.Structure):
        _fields_ = [("code", C.c_uint8), ("bits", C.c_uint8), ("lanes", C.c_uint16)]

    class DLTensor(C.Structure):
        pass

    DLTensor._fields_ = [("data", C.c_void_p), ("device", DLDevice), ("ndim", C.c_int32), ("dtype", DLDataType),
                         ("shape", C.POINTER(C.c_int64)), ("strides", C.POINTER(C.c_int64)),
                         ("byte_offset", C.c_uint64)]

    def __init__(self, path):
        self.lib = C.CDLL(path)
        self.lib.kvp_last_error.restype = C.c_char_p
        self.keep = []

    def tensor(self, t):
        shape = (C.c_int64 * t.dim())(*t.shape)
        strides = (C.c_int64 * t.dim())(*t.stride())
        self.keep += [shape, strides, t]
        code, bits = {torch.bfloat16: (4, 16), torch.float32: (2, 32)}[t.dtype]
        return self.DLTensor(t.data_ptr(), self.DLDevice(2 if t.is_cuda else 1, t.device.index or 0), t.dim(),
                             self.DLDataType(code, bits, 1), shape, strides, 0)

    def __call__(self, name, *args):
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise RuntimeError(f"{name}: status {status}: {self.lib.kvp_last_error().decode()}")


def fmt_us(ms):
    return "-" if ms is None else f"{ms * 1e3:.1f}"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name():
    return torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke test)"


def time_calls(fn, stream, reps, rounds):
    """Per-call ms: (graph replay median, Python loop median). fn launches on `stream`."""
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return None, (time.perf_counter() - t0) * 1e3
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph_ms = None
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(reps):
                fn()
        torch.cuda.synchronize()
        times = []
        with torch.cuda.stream(stream):
            g.replay()
            for _ in range(rounds):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / reps)
        graph_ms = statistics.median(times)
        del g
    except Exception as e:  # noqa: BLE001  (reported, then the loop timing stands)
        print(f"  graph capture failed ({e}); loop timing only", flush=True)
        torch.cuda.synchronize()
    times = []
    with torch.cuda.stream(stream):
        for _ in range(rounds):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(reps):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / reps)
    return graph_ms, statistics.median(times)


class DenseSetup:
    def __init__(self, kv, raw, ctx, stream, B, n):
        self.B, self.n = B, n
        per = (n + 1 + BS - 1) // BS
        nblk = B * per
        self.bm = kv.BlockManager(block_size=BS, num_device_blocks=nblk)
        for b in range(B):
            self.bm.allocate(b, num_tokens=n + 1)
        self.used_blocks = self.bm.stats().num_used_blocks
        self.pages = torch.randn(2, nblk, BS, HKV, D, device=DEVICE, dtype=torch.bfloat16)
        self.cache = kv.KvCache.from_tensors(ctx, [self.pages])
        self.page_bytes = 2 * BS * HKV * D * 2
        self.attn = kv.Attention(ctx, "dense", num_q_heads=HQ, num_kv_heads=HKV, head_size=D, kv_dtype="bfloat16")
        table, lens = self.bm.block_tables(list(range(B)))
        slots = np.concatenate([self.bm.slot_mapping(b, n, 1) for b in range(B)]).astype(np.int64)
        self.plan = kv.Plan(ctx, max_num_seqs=B, max_num_tokens=B, max_num_blocks=nblk)
        self.plan.attach(self.attn)
        self.plan.update(np.arange(B + 1, dtype=np.int32), lens, block_size=BS, block_table=table,
                         slot_mapping=slots)


class AttambaSetup:
    def __init__(self, kv, AttambaPages, ctx, stream, B, n, P):
        self.B, self.n, self.P = B, n, P
        cfg = kv.attamba_config(chunk_size=P, window=WINDOW)
        self.attn = kv.Attention(ctx, "attamba", num_q_heads=HQ, num_kv_heads=HKV, head_size=D, kv_dtype="bfloat16",
                                 config=cfg)
        probe = self.attn.cache_layout(BS, n + 1, n)
        max_pages = probe.compressed_pages + (STEP + WINDOW) // BS + 3
        params = types.SimpleNamespace(window=WINDOW, chunk_size=P)
        layer = types.SimpleNamespace(attamba_params=lambda: params)
        mc = types.SimpleNamespace(attamba_layers=(0,), layer_attention={0: layer}, num_key_value_heads=HKV,
                                   head_dim=D, max_position_embeddings=n + 1)
        ec = types.SimpleNamespace(block_size=BS, attamba_num_blocks=B * max_pages, num_device_blocks=B * max_pages,
                                   watermark=0.0, kv_cache_dtype="bfloat16", max_num_seqs=B,
                                   max_num_batched_tokens=max(STEP, B))
        self.pages = AttambaPages(ctx, mc, ec, [self.attn], num_state_slots=0)
        self.page_bytes = 2 * BS * HKV * D * 2
        # The context: K = V = kv[p % STEP] at position p, written in STEP-token steps per sequence.
        g = torch.Generator(device=DEVICE).manual_seed(1)
        self.kv = torch.randn(STEP, HKV, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
        self.write_s = 0.0
        for b in range(B):
            for p0 in range(0, n, STEP):
                end = min(n, p0 + STEP)
                assert self.pages.prepare(b, p0, end), "attamba page pool too small"
                self.pages.update_plan([(b, p0, end)], None)
                t0 = time.perf_counter()
                self.attn.write_kv(self.pages.plan, self.pages.cache, 0, self.kv[: end - p0], self.kv[: end - p0])
                sync()
                self.write_s += time.perf_counter() - t0
        entries = [(b, n, n + 1) for b in range(B)]
        for b in range(B):
            assert self.pages.prepare(b, n, n + 1)
        self.pages.update_plan(entries, None)
        self.used_pages = self.pages.num_used  # what the pool holds for the batch at this step
        self.plan = self.pages.plan
        self.cache = self.pages.cache

    def reference(self, q0, k_new, v_new):
        """float32 attention of sequence 0's decode query over the keys the mask allows."""
        n, P = self.n, self.P
        ends = [0] + list(range(P - 1, n, P))
        seen = sorted({e for e in ends if e < n - WINDOW} | set(range(max(0, n - WINDOW), n)))
        pos = torch.tensor(seen, device=DEVICE)
        keys = self.kv[pos % STEP].float()                       # [S, HKV, D]
        keys = torch.cat([keys, k_new[None].float()], 0)         # + position n
        vals = torch.cat([self.kv[pos % STEP].float(), v_new[None].float()], 0)
        q = q0.float().view(HKV, HQ // HKV, D)
        logits = torch.einsum("gqd,sgd->gqs", q, keys) / D ** 0.5
        return torch.einsum("gqs,sgd->gqd", logits.softmax(-1), vals).reshape(HQ, D)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", default=os.environ.get("KVPLUG_LIBRARY") or os.environ.get("KVP_LIBRARY"))
    ap.add_argument("--out", default=".")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    kv, AttambaPages = load(args.lib)
    raw = Raw(kv.load_library().path)  # the same file the package loaded: handles are shared
    stream = torch.cuda.Stream() if DEVICE == "cuda" else None
    ctx = kv.Context("cuda", stream=stream.cuda_stream) if stream else kv.Context("cpu", num_threads=2)
    torch.manual_seed(0)
    rows = []
    print(f"device: {device_name()}; GQA {HQ}/{HKV}, head {D}, bf16, page {BS}, L={WINDOW}; "
          f"graph of {args.reps} calls, median of {args.rounds} replays", flush=True)
    for n in args.contexts:
        for B in args.batches:
            dense = DenseSetup(kv, raw, ctx, stream, B, n)
            q = torch.randn(B, HQ, D, device=DEVICE, dtype=torch.bfloat16)
            knew = torch.randn(B, HKV, D, device=DEVICE, dtype=torch.bfloat16)
            vnew = torch.randn(B, HKV, D, device=DEVICE, dtype=torch.bfloat16)
            out = torch.empty_like(q)
            qt, ot, kt, vt = raw.tensor(q), raw.tensor(out), raw.tensor(knew), raw.tensor(vnew)

            def runner(s):
                a, p, c = C.c_void_p(s.attn._ptr()), C.c_void_p(s.plan._ptr()), C.c_void_p(s.cache._ptr())
                run = lambda: raw("kvp_attention_run", a, p, c, 0, C.byref(qt), C.byref(ot), None)  # noqa: E731
                write = lambda: raw("kvp_attention_write_kv", a, p, c, 0, C.byref(kt), C.byref(vt))  # noqa: E731
                return run, write

            d_run, d_write = runner(dense)
            d_write()
            d_ms, d_loop = time_calls(d_run, stream, args.reps, args.rounds)
            d_wms, _ = time_calls(d_write, stream, args.reps, args.rounds)
            dense_bytes = dense.used_blocks * dense.page_bytes
            for P in args.chunks:
                att = AttambaSetup(kv, AttambaPages, ctx, stream, B, n, P)
                a_run, a_write = runner(att)
                a_write()
                a_run()
                sync()
                err = float((out[0].float() - att.reference(q[0], knew[0], vnew[0])).abs().max())
                a_ms, a_loop = time_calls(a_run, stream, args.reps, args.rounds)
                a_wms, _ = time_calls(a_write, stream, args.reps, args.rounds)
                # Dense again, interleaved (its figure is the median of both measurements).
                d2_ms, d2_loop = time_calls(d_run, stream, args.reps, args.rounds)
                dm = statistics.median([x for x in (d_ms, d2_ms) if x is not None]) if d_ms else None
                dl = statistics.median([d_loop, d2_loop])
                att_bytes = att.used_pages * att.page_bytes
                ratio = att_bytes / dense_bytes
                target_mem = 1 / P + WINDOW / n
                a_t, d_t = (a_ms, dm) if a_ms and dm else (a_loop, dl)
                speed = d_t / a_t
                row = {
                    "context": n, "batch": B, "P": P, "window": WINDOW,
                    "attamba_pages": att.used_pages, "dense_blocks": dense.used_blocks, "page_bytes": att.page_bytes,
                    "attamba_kv_bytes_per_token": att_bytes / (B * (n + 1)),
                    "dense_kv_bytes_per_token": dense_bytes / (B * (n + 1)),
                    "kv_ratio": ratio, "kv_target": target_mem, "kv_met": ratio <= target_mem * 1.02,
                    "attamba_run_ms": a_ms, "dense_run_ms": dm, "attamba_loop_ms": a_loop, "dense_loop_ms": dl,
                    "attamba_tokens_per_s": B / a_t * 1e3, "dense_tokens_per_s": B / d_t * 1e3,
                    "speedup": speed, "speed_target": 0.8 * P, "speed_met": speed >= 0.8 * P,
                    "attamba_write_ms": a_wms, "dense_write_ms": d_wms,
                    "context_write_s": att.write_s, "max_abs_err_vs_torch": err,
                }
                rows.append(row)
                print(f"row n={n} B={B} P={P}: kv {ratio:.4f} (target {target_mem:.4f}), run us attamba "
                      f"{a_t * 1e3:.1f} dense {d_t * 1e3:.1f} (loop {a_loop * 1e3:.1f} / {dl * 1e3:.1f}), speedup "
                      f"{speed:.2f}x (target {0.8 * P:.1f}x), write us {fmt_us(a_wms)} / {fmt_us(d_wms)}, "
                      f"err {err:.1e}", flush=True)
                with open(os.path.join(args.out, "attamba_gpu_bench.json"), "w") as f:  # after every row
                    json.dump({"device": device_name(), "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
                att.pages.close()
                del att
                sync()
            del dense
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    print("| context | batch | P | KV B/token attamba / dense | ratio | target 1/P+L/n | decode us attamba | "
          "decode us dense | tokens/s attamba | tokens/s dense | speedup | target 0.8P | err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        am = r["attamba_run_ms"] or r["attamba_loop_ms"]
        dm = r["dense_run_ms"] or r["dense_loop_ms"]
        print(f"| {r['context']} | {r['batch']} | {r['P']} | {r['attamba_kv_bytes_per_token']:.1f} / "
              f"{r['dense_kv_bytes_per_token']:.1f} | {r['kv_ratio']:.4f} | {r['kv_target']:.4f} "
              f"{'met' if r['kv_met'] else 'NOT met'} | {am * 1e3:.1f} | {dm * 1e3:.1f} | "
              f"{r['attamba_tokens_per_s']:,.0f} | {r['dense_tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
              f"{r['speed_target']:.1f}x {'met' if r['speed_met'] else 'NOT met'} | {r['max_abs_err_vs_torch']:.1e} |")


if __name__ == "__main__":
    main()
