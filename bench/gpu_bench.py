#!/usr/bin/env python3
"""Dense paged attention on the GPU against PyTorch SDPA (flash and cuDNN), side by side in one run.

Decode: GQA 32/8, head 128, bf16, block 16, shuffled pages; KV bytes read per second.
Prefill: causal, GQA 32/8, head 128, bf16; TFLOP/s (causal FLOPs: 2 * 2 * B * Hq * L^2 * D / 2).
Peers run on contiguous tensors (no paging). Every kvplug output is checked against SDPA's.

Usage: python3 bench/gpu_bench.py --lib build/abi/libkvplug.so --out OUT_DIR
Needs PyTorch with CUDA; talks to libkvplug through a minimal ctypes layer (the full Python
binding lives in bindings/python).
"""
import argparse
import ctypes as C
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# --- minimal ctypes view of kvplug.h -------------------------------------------------------------


class DLDevice(C.Structure):
    _fields_ = [("device_type", C.c_int32), ("device_id", C.c_int32)]


class DLDataType(C.Structure):
    _fields_ = [("code", C.c_uint8), ("bits", C.c_uint8), ("lanes", C.c_uint16)]


class DLTensor(C.Structure):
    _fields_ = [("data", C.c_void_p), ("device", DLDevice), ("ndim", C.c_int32), ("dtype", DLDataType),
                ("shape", C.POINTER(C.c_int64)), ("strides", C.POINTER(C.c_int64)), ("byte_offset", C.c_uint64)]


class ContextOptions(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("device_type", C.c_int32), ("device_id", C.c_int32),
                ("num_threads", C.c_int32), ("stream", C.c_void_p)]


class CacheOptions(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("num_layers", C.c_int32), ("num_blocks", C.c_int32),
                ("block_size", C.c_int32), ("num_kv_heads", C.c_int32), ("head_size", C.c_int32),
                ("dtype", C.c_int32), ("layout", C.c_int32), ("num_host_blocks", C.c_int32),
                ("num_state_slots", C.c_int32), ("state_bytes_per_layer", C.c_int64),
                ("k_scales", C.POINTER(C.c_float)), ("v_scales", C.POINTER(C.c_float))]


class PlanOptions(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("max_num_seqs", C.c_int32), ("max_num_tokens", C.c_int32),
                ("max_num_blocks", C.c_int32)]


class Batch(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("num_seqs", C.c_int32), ("block_size", C.c_int32),
                ("query_start_loc", C.POINTER(C.c_int32)), ("seq_lens", C.POINTER(C.c_int32)),
                ("block_table", C.POINTER(C.c_int32)), ("block_table_stride", C.c_int32),
                ("kv_indptr", C.POINTER(C.c_int32)), ("kv_indices", C.POINTER(C.c_int32)),
                ("slot_mapping", C.POINTER(C.c_int64)), ("state_slots", C.POINTER(C.c_int32))]


class AttentionOptions(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("backend", C.c_char_p), ("num_q_heads", C.c_int32),
                ("num_kv_heads", C.c_int32), ("head_size", C.c_int32), ("kv_dtype", C.c_int32),
                ("sm_scale", C.c_float), ("config_format", C.c_int32), ("config", C.c_void_p),
                ("config_size", C.c_size_t)]


KDLCUDA, KDLBFLOAT, KDLFLOAT, KDLINT = 2, 4, 2, 0
HEAD_MAJOR_PAGES = False  # --head-major: pages stored [2, blocks, heads, block_size, d] (FlashInfer's HND)
PREFILL_AB = False  # --prefill-ab: prefill also on kvplug's own kernel (KVP_CUDA_PREFILL=kvplug)
DECODE_AB = []  # --decode-ab K1,K2: decode also under KVP_CUDA_DECODE=K (cta, warp, kv1, kv2)
BF16, FP8 = 2, 3


class Lib:
    def __init__(self, path):
        self.lib = C.CDLL(path)
        self.lib.kvp_last_error.restype = C.c_char_p

    def __call__(self, name, *args):
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise RuntimeError(f"{name}: status {status}: {self.lib.kvp_last_error().decode()}")


def dl_tensor(t, keep):
    shape = (C.c_int64 * t.dim())(*t.shape)
    strides = (C.c_int64 * t.dim())(*t.stride())
    keep += [shape, strides]
    code = {torch.bfloat16: KDLBFLOAT, torch.int64: KDLINT}.get(t.dtype, KDLFLOAT)
    bits = {torch.float32: 32, torch.int64: 64}.get(t.dtype, 16)
    return DLTensor(t.data_ptr(), DLDevice(KDLCUDA, t.device.index or 0), t.dim(), DLDataType(code, bits, 1),
                    shape, strides, 0)


def median_ms(fn, iters=60, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


class Kvplug:
    """One CUDA context, one cache built over a torch tensor (zero copy), a plan and an attention."""

    def __init__(self, lib, hq, hkv, d, block_size, num_blocks, max_seqs, max_tokens, max_blocks, fp8_from=None):
        self.lib, self.keep = lib, []
        self.ctx, self.cache, self.plan, self.attn = C.c_void_p(), C.c_void_p(), C.c_void_p(), C.c_void_p()
        stream = torch.cuda.current_stream().cuda_stream
        lib("kvp_context_create", C.byref(ContextOptions(C.sizeof(ContextOptions), KDLCUDA, 0, 0, stream)),
            C.byref(self.ctx))
        if fp8_from is not None:
            # kvplug-owned e4m3 pages (DLPack 0.6 has no fp8 type), written from the given bf16 pages.
            self.pages = fp8_from
            self.scales = (C.c_float * 1)(0.02)
            opts = CacheOptions(C.sizeof(CacheOptions), 1, num_blocks, block_size, hkv, d, FP8, 0, 0, 0, 0,
                                self.scales, self.scales)
            lib("kvp_kv_cache_create", self.ctx, C.byref(opts), C.byref(self.cache))
            slots = torch.arange(num_blocks * block_size, device="cuda", dtype=torch.int64)
            keep = []
            self.src = (fp8_from[0].reshape(-1, hkv, d), fp8_from[1].reshape(-1, hkv, d))  # alive until the write ran
            k = dl_tensor(self.src[0], keep)
            v = dl_tensor(self.src[1], keep)
            sl = dl_tensor(slots, keep)
            lib("kvp_kv_cache_write", self.cache, 0, C.byref(k), C.byref(v), C.byref(sl))
            torch.cuda.synchronize()
            self.src = None
        else:
            if HEAD_MAJOR_PAGES:
                # Same logical [2, blocks, block_size, heads, d] view over head-major storage
                # ([2, blocks, heads, block_size, d]): each head's page is one contiguous run.
                self.pages = torch.randn(2, num_blocks, hkv, block_size, d, device="cuda",
                                         dtype=torch.bfloat16).transpose(2, 3)
            else:
                self.pages = torch.randn(2, num_blocks, block_size, hkv, d, device="cuda", dtype=torch.bfloat16)
            layer = dl_tensor(self.pages, self.keep)
            opts = CacheOptions(C.sizeof(CacheOptions), 1, num_blocks, block_size, hkv, d, BF16, 0, 0, 0, 0, None, None)
            lib("kvp_kv_cache_create_from_tensors", self.ctx, C.byref(opts), C.byref(layer), 1, C.byref(self.cache))
        lib("kvp_plan_create", self.ctx, C.byref(PlanOptions(C.sizeof(PlanOptions), max_seqs, max_tokens, max_blocks)),
            C.byref(self.plan))
        ao = AttentionOptions(C.sizeof(AttentionOptions), b"dense", hq, hkv, d, BF16 if fp8_from is None else FP8,
                              0.0, 0, None, 0)
        lib("kvp_attention_create", self.ctx, C.byref(ao), C.byref(self.attn))
        self.block_size = block_size

    def plan_batch(self, q_lens, kv_lens, tables):
        """tables: list of per-sequence page lists (torch int32 on CPU)."""
        qsl = [0]
        for q in q_lens:
            qsl.append(qsl[-1] + q)
        indptr = [0]
        for t in tables:
            indptr.append(indptr[-1] + len(t))
        self.qsl = (C.c_int32 * len(qsl))(*qsl)
        self.lens = (C.c_int32 * len(kv_lens))(*kv_lens)
        self.indptr = (C.c_int32 * len(indptr))(*indptr)
        flat = torch.cat(tables).to(torch.int32).contiguous()
        self.indices = flat  # kept alive during the call
        batch = Batch(C.sizeof(Batch), len(q_lens), self.block_size, self.qsl, self.lens, None, 0, self.indptr,
                      C.cast(flat.data_ptr(), C.POINTER(C.c_int32)), None, None)
        self.lib("kvp_plan_update", self.plan, C.byref(batch))

    def run(self, q, out, lse=None):
        keep = []
        qt, ot = dl_tensor(q, keep), dl_tensor(out, keep)
        lt = C.byref(dl_tensor(lse, keep)) if lse is not None else None
        self.lib("kvp_attention_run", self.attn, self.plan, self.cache, 0, C.byref(qt), C.byref(ot), lt)

    def close(self):
        self.lib.lib.kvp_attention_destroy(self.attn)
        self.lib.lib.kvp_plan_destroy(self.plan)
        self.lib.lib.kvp_kv_cache_destroy(self.cache)
        self.lib.lib.kvp_context_destroy(self.ctx)


def gather_contiguous(pages, tables, lens, hkv, d):
    """[B, Hkv, L, D] K and V from the pages (for the peers, which do not page)."""
    ks, vs = [], []
    for t, n in zip(tables, lens):
        k = pages[0, t.long()].reshape(-1, hkv, d)[:n]
        v = pages[1, t.long()].reshape(-1, hkv, d)[:n]
        ks.append(k.transpose(0, 1))
        vs.append(v.transpose(0, 1))
    return torch.stack(ks), torch.stack(vs)


def sdpa_times(q, k, v, causal):
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
                ref = fn()
                out[name] = (median_ms(fn), ref)
        except Exception as e:  # a backend that refuses the shape is reported, not hidden
            print(f"  {name}: unavailable ({str(e).splitlines()[0][:100]})")
            out[name] = (float("nan"), None)
    return out


def timed_under(env, value, plan, fn, **kw):
    """median_ms(fn) of a plan made with os.environ[env] = value (the engine reads it at plan time);
    the plan is made again without it after."""
    saved = os.environ.get(env)
    os.environ[env] = value
    try:
        plan()
        return median_ms(fn, **kw)
    finally:
        if saved is None:
            del os.environ[env]
        else:
            os.environ[env] = saved
        plan()


def bench_decode(lib, B, L, hq=32, hkv=8, d=128, bs=16):
    blocks_per_seq = (L + bs - 1) // bs
    num_blocks = B * blocks_per_seq
    kp = Kvplug(lib, hq, hkv, d, bs, num_blocks, B, B, num_blocks)
    perm = torch.randperm(num_blocks, dtype=torch.int32)
    tables = [perm[i * blocks_per_seq:(i + 1) * blocks_per_seq] for i in range(B)]
    kp.plan_batch([1] * B, [L] * B, tables)
    q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    t_ours = median_ms(lambda: kp.run(q, out))
    replan = lambda: kp.plan_batch([1] * B, [L] * B, tables)
    alt = {name: {"ms": timed_under("KVP_CUDA_DECODE", name, replan, lambda: kp.run(q, out))} for name in DECODE_AB}
    if DECODE_AB:
        kp.run(q, out)  # out from the default kernel again
    k, v = gather_contiguous(kp.pages, tables, [L] * B, hkv, d)
    peers = sdpa_times(q.unsqueeze(2), k, v, causal=False)
    kv_bytes = B * L * hkv * d * 2 * 2
    ref = peers["cudnn"][1] if peers["cudnn"][1] is not None else peers["flash"][1]
    err = (out.float() - ref.squeeze(2).float()).abs().max().item() if ref is not None else float("nan")
    del k, v
    # The same step over an fp8 (e4m3, scale 0.02) copy of the cache: half the bytes per token.
    kp8 = Kvplug(lib, hq, hkv, d, bs, num_blocks, B, B, num_blocks, fp8_from=kp.pages)
    kp8.plan_batch([1] * B, [L] * B, tables)
    out8 = torch.empty_like(q)
    t_fp8 = median_ms(lambda: kp8.run(q, out8))
    for name in DECODE_AB:
        alt[name]["fp8_ms"] = timed_under("KVP_CUDA_DECODE", name, lambda: kp8.plan_batch([1] * B, [L] * B, tables),
                                          lambda: kp8.run(q, out8))
    if DECODE_AB:
        kp8.run(q, out8)
    err8 = (out8.float() - out.float()).abs().max().item()
    kp8.close()
    kp.close()
    row = {"B": B, "L": L, "kvplug_ms": t_ours, "kvplug_TBps": kv_bytes / t_ours / 1e9,
           "fp8_ms": t_fp8, "fp8_speedup": t_ours / t_fp8, "fp8_max_abs_vs_bf16": err8,
           "flash_ms": peers["flash"][0], "flash_TBps": kv_bytes / peers["flash"][0] / 1e9,
           "cudnn_ms": peers["cudnn"][0], "cudnn_TBps": kv_bytes / peers["cudnn"][0] / 1e9, "max_abs_vs_sdpa": err,
           "decode_kernel": os.environ.get("KVP_CUDA_DECODE", "default"), "alt": alt}
    for a in alt.values():
        a["TBps"] = kv_bytes / a["ms"] / 1e9
    others = ", ".join(f"{n} {a['TBps']:.2f} TB/s fp8 {a['fp8_ms']:.3f} ms" for n, a in alt.items())
    print(f"decode {B}x{L}: {row['kvplug_TBps']:.2f} TB/s, flash {row['flash_TBps']:.2f}, cuDNN {row['cudnn_TBps']:.2f}; "
          f"fp8 {t_fp8:.3f} ms ({t_ours / t_fp8:.2f}x bf16), err {err:.1e} / fp8 {err8:.1e}" +
          (f"; {others}" if others else ""), flush=True)
    torch.cuda.empty_cache()
    return row


def bench_prefill(lib, B, L, hq=32, hkv=8, d=128, bs=16):
    blocks_per_seq = (L + bs - 1) // bs
    num_blocks = B * blocks_per_seq
    kp = Kvplug(lib, hq, hkv, d, bs, num_blocks, B, B * L, num_blocks)
    perm = torch.randperm(num_blocks, dtype=torch.int32)
    tables = [perm[i * blocks_per_seq:(i + 1) * blocks_per_seq] for i in range(B)]
    q = torch.randn(B * L, hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    # PREFILL_AB: the same plan under KVP_CUDA_PREFILL=kvplug (kvplug's own kernel) first, then the
    # default path (FlashInfer's sm_90 prefill where the library has it; "flashinfer" forces it).
    old = None
    if PREFILL_AB:
        saved = os.environ.get("KVP_CUDA_PREFILL")
        os.environ["KVP_CUDA_PREFILL"] = "kvplug"
        kp.plan_batch([L] * B, [L] * B, tables)
        t_old = median_ms(lambda: kp.run(q, out), iters=10, warmup=2)
        old = (t_old, out.clone())
        if saved is None:
            del os.environ["KVP_CUDA_PREFILL"]
        else:
            os.environ["KVP_CUDA_PREFILL"] = saved
    kp.plan_batch([L] * B, [L] * B, tables)
    t_ours = median_ms(lambda: kp.run(q, out), iters=10, warmup=2)
    k, v = gather_contiguous(kp.pages, tables, [L] * B, hkv, d)
    qc = q.view(B, L, hq, d).transpose(1, 2)
    peers = sdpa_times(qc, k, v, causal=True)
    flops = 4.0 * B * hq * L * L * d / 2
    ref = peers["cudnn"][1] if peers["cudnn"][1] is not None else peers["flash"][1]
    err = (out.view(B, L, hq, d).transpose(1, 2).float() - ref.float()).abs().max().item() if ref is not None else float("nan")
    kp.close()
    row = {"B": B, "L": L, "kvplug_ms": t_ours, "kvplug_TFLOPs": flops / t_ours / 1e9,
           "flash_ms": peers["flash"][0], "flash_TFLOPs": flops / peers["flash"][0] / 1e9,
           "cudnn_ms": peers["cudnn"][0], "cudnn_TFLOPs": flops / peers["cudnn"][0] / 1e9, "max_abs_vs_sdpa": err,
           "block_size": bs, "head_size": d, "prefill_path": os.environ.get("KVP_CUDA_PREFILL", "auto")}
    if old is not None:
        old_err = (old[1].view(B, L, hq, d).transpose(1, 2).float() - ref.float()).abs().max().item() \
            if ref is not None else float("nan")
        row.update({"kvplug_own_ms": old[0], "kvplug_own_TFLOPs": flops / old[0] / 1e9,
                    "kvplug_own_max_abs_vs_sdpa": old_err})
        print(f"prefill {B}x{L} d={d} bs={bs}: default path {row['kvplug_TFLOPs']:.0f} TFLOP/s, kvplug's own kernel "
              f"{row['kvplug_own_TFLOPs']:.0f}, flash {row['flash_TFLOPs']:.0f}, cuDNN {row['cudnn_TFLOPs']:.0f} "
              f"(err {err:.1e} / {old_err:.1e})", flush=True)
    del k, v, q, out
    torch.cuda.empty_cache()
    return row


def bench_mixed(lib, n_dec=64, L_dec=4096, n_pre=2, chunk=2048, prefix=2048, hq=32, hkv=8, d=128, bs=16):
    """One step of n_dec decodes (at L_dec keys) and n_pre prefill chunks of `chunk` tokens after a
    `prefix`-token prefix (what chunked prefill produces), against the same two kinds as two steps."""
    L_pre = prefix + chunk
    lens = [L_dec] * n_dec + [L_pre] * n_pre
    q_lens = [1] * n_dec + [chunk] * n_pre
    blocks = [(n + bs - 1) // bs for n in lens]
    num_blocks = sum(blocks)
    kp = Kvplug(lib, hq, hkv, d, bs, num_blocks, n_dec + n_pre, sum(q_lens), num_blocks)
    perm = torch.randperm(num_blocks, dtype=torch.int32)
    tables, at = [], 0
    for b in blocks:
        tables.append(perm[at:at + b])
        at += b
    q = torch.randn(sum(q_lens), hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    kp.plan_batch(q_lens, lens, tables)
    t_mixed = median_ms(lambda: kp.run(q, out), iters=30, warmup=5)
    mixed = out.clone()
    qd, qp = q[:n_dec].contiguous(), q[n_dec:].contiguous()
    od, op = torch.empty_like(qd), torch.empty_like(qp)
    kp.plan_batch(q_lens[:n_dec], lens[:n_dec], tables[:n_dec])
    t_dec = median_ms(lambda: kp.run(qd, od), iters=30, warmup=5)
    kp.plan_batch(q_lens[n_dec:], lens[n_dec:], tables[n_dec:])
    t_pre = median_ms(lambda: kp.run(qp, op), iters=30, warmup=5)
    err = max((mixed[:n_dec].float() - od.float()).abs().max().item(), (mixed[n_dec:].float() - op.float()).abs().max().item())
    kp.close()
    row = {"n_dec": n_dec, "L_dec": L_dec, "n_pre": n_pre, "chunk": chunk, "prefix": prefix, "mixed_ms": t_mixed,
           "decode_ms": t_dec, "prefill_ms": t_pre, "separate_ms": t_dec + t_pre,
           "mixed_vs_separate": (t_dec + t_pre) / t_mixed, "max_abs_mixed_vs_separate": err}
    print(f"mixed step: {n_dec} decodes x {L_dec} + {n_pre} chunks of {chunk} after {prefix}: one step {t_mixed:.3f} ms, "
          f"separately {t_dec:.3f} + {t_pre:.3f} = {t_dec + t_pre:.3f} ms ({row['mixed_vs_separate']:.2f}x), "
          f"max abs {err:.1e}", flush=True)
    torch.cuda.empty_cache()
    return row


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), iters=10)
    return 2 * x.numel() / ms / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True)
    ap.add_argument("--out", default=".")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["decode", "prefill"], help="run one sweep")
    ap.add_argument("--head-major", action="store_true", help="head-major page storage (strided view)")
    ap.add_argument("--prefill-ab", action="store_true",
                    help="prefill also under KVP_CUDA_PREFILL=kvplug (kvplug's own kernel) in the same run")
    ap.add_argument("--decode-ab", default="",
                    help="comma-separated KVP_CUDA_DECODE kernels (cta, warp, kv1, kv2) also timed in the same run")
    ap.add_argument("--decode-shapes", help="comma-separated BxL decode shapes (default: the four)")
    ap.add_argument("--mixed", action="store_true", help="also time a mixed step (decodes + prefill chunks)")
    ap.add_argument("--prefill-heads", default="128", help="comma-separated head sizes of the prefill sweep")
    ap.add_argument("--prefill-shapes", help="comma-separated BxL prefill shapes (default: the four)")
    ap.add_argument("--prefill-block-sizes", default="16", help="comma-separated page sizes of the prefill sweep")
    args = ap.parse_args()
    global PREFILL_AB, DECODE_AB
    PREFILL_AB = args.prefill_ab
    DECODE_AB = [k for k in args.decode_ab.split(",") if k]
    lib = Lib(args.lib)
    global HEAD_MAJOR_PAGES
    HEAD_MAJOR_PAGES = args.head_major
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}")
    copy_tbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_tbps:.2f} TB/s (read + write)")
    decode_shapes = [(64, 4096), (16, 32768), (128, 2048), (1, 131072)]
    prefill_shapes = [(1, 4096), (1, 16384), (1, 65536), (4, 4096)]
    if args.decode_shapes:
        decode_shapes = [tuple(int(x) for x in s.split("x")) for s in args.decode_shapes.split(",")]
    if args.quick:
        decode_shapes, prefill_shapes = decode_shapes[:1], prefill_shapes[:1]
    decode = [bench_decode(lib, B, L) for B, L in decode_shapes] if args.only != "prefill" else []
    if args.prefill_shapes:
        prefill_shapes = [tuple(int(x) for x in s.split("x")) for s in args.prefill_shapes.split(",")]
    prefill = [bench_prefill(lib, B, L, d=int(d), bs=int(bs)) for d in args.prefill_heads.split(",")
               for bs in args.prefill_block_sizes.split(",") for B, L in prefill_shapes] if args.only != "decode" else []
    mixed = [bench_mixed(lib, n_dec=nd, n_pre=npf) for nd, npf in ((64, 2), (16, 1))] if args.mixed else []
    result = {"device": dev, "torch": torch.__version__, "copy_TBps": copy_tbps, "decode": decode, "prefill": prefill,
              "mixed": mixed}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| decode B x L | kvplug TB/s | flash TB/s | cuDNN TB/s | kvplug / best | max abs vs SDPA | fp8 KV ms | fp8 / bf16 tokens/s | fp8 max abs vs bf16 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in decode:
        best = max(x for x in (r["flash_TBps"], r["cudnn_TBps"]) if not math.isnan(x))
        lines.append(f"| {r['B']} x {r['L']} | {r['kvplug_TBps']:.2f} ({r['kvplug_ms']:.3f} ms) | {r['flash_TBps']:.2f} | "
                     f"{r['cudnn_TBps']:.2f} | {r['kvplug_TBps'] / best:.2f}x | {r['max_abs_vs_sdpa']:.1e} | "
                     f"{r['fp8_ms']:.3f} | {r['fp8_speedup']:.2f}x | {r['fp8_max_abs_vs_bf16']:.1e} |")
    if DECODE_AB and decode:
        lines += ["", "| decode B x L | default TB/s | " + " | ".join(f"{k} TB/s" for k in DECODE_AB) +
                  " | default fp8 / bf16 | " + " | ".join(f"{k} fp8 / bf16" for k in DECODE_AB) + " |",
                  "| --- | --- |" + " --- |" * (2 * len(DECODE_AB) + 1)]
        for r in decode:
            lines.append(f"| {r['B']} x {r['L']} | {r['kvplug_TBps']:.2f} | " +
                         " | ".join(f"{r['alt'][k]['TBps']:.2f}" for k in DECODE_AB) +
                         f" | {r['fp8_speedup']:.2f}x | " +
                         " | ".join(f"{r['alt'][k]['ms'] / r['alt'][k]['fp8_ms']:.2f}x" for k in DECODE_AB) + " |")
    lines += ["", "| prefill B x L | kvplug TFLOP/s | flash TFLOP/s | cuDNN TFLOP/s | vs flash | vs cuDNN | max abs vs SDPA |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in prefill:
        lines.append(f"| {r['B']} x {r['L']} | {r['kvplug_TFLOPs']:.0f} ({r['kvplug_ms']:.2f} ms) | {r['flash_TFLOPs']:.0f} | "
                     f"{r['cudnn_TFLOPs']:.0f} | {r['kvplug_TFLOPs'] / r['flash_TFLOPs']:.2f}x | "
                     f"{r['kvplug_TFLOPs'] / r['cudnn_TFLOPs']:.2f}x | {r['max_abs_vs_sdpa']:.1e} |")
    if any("kvplug_own_TFLOPs" in r for r in prefill):
        lines += ["", "| prefill B x L, head, page | default path TFLOP/s | kvplug's own kernel TFLOP/s | default / own | "
                  "default / cuDNN | own / cuDNN | default / flash | max abs vs SDPA (default / own) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in prefill:
            if "kvplug_own_TFLOPs" not in r:
                continue
            lines.append(f"| {r['B']} x {r['L']}, d{r['head_size']}, {r['block_size']} | {r['kvplug_TFLOPs']:.0f} | {r['kvplug_own_TFLOPs']:.0f} | "
                         f"{r['kvplug_TFLOPs'] / r['kvplug_own_TFLOPs']:.2f}x | {r['kvplug_TFLOPs'] / r['cudnn_TFLOPs']:.2f}x | "
                         f"{r['kvplug_own_TFLOPs'] / r['cudnn_TFLOPs']:.2f}x | {r['kvplug_TFLOPs'] / r['flash_TFLOPs']:.2f}x | "
                         f"{r['max_abs_vs_sdpa']:.1e} / {r['kvplug_own_max_abs_vs_sdpa']:.1e} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
        f.write(table + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [f"{r['B']}x{r['L']}" for r in decode]
        x = range(len(labels))
        for i, (key, name) in enumerate((("kvplug_TBps", "kvplug (paged)"), ("flash_TBps", "SDPA flash"),
                                         ("cudnn_TBps", "SDPA cuDNN"))):
            axes[0].bar([j + 0.27 * (i - 1) for j in x], [r[key] for r in decode], 0.27, label=name)
        axes[0].axhline(3.35, color="gray", ls="--", lw=1, label="HBM3 peak")
        axes[0].set_xticks(list(x), labels)
        axes[0].set_ylabel("KV read TB/s")
        axes[0].set_title("decode, GQA 32/8, d128, bf16")
        axes[0].legend(fontsize=8)
        labels = [f"{r['B']}x{r['L']}" for r in prefill]
        x = range(len(labels))
        for i, (key, name) in enumerate((("kvplug_TFLOPs", "kvplug (paged)"), ("flash_TFLOPs", "SDPA flash"),
                                         ("cudnn_TFLOPs", "SDPA cuDNN"))):
            axes[1].bar([j + 0.27 * (i - 1) for j in x], [r[key] for r in prefill], 0.27, label=name)
        axes[1].set_xticks(list(x), labels)
        axes[1].set_ylabel("TFLOP/s")
        axes[1].set_title("prefill, causal, GQA 32/8, d128, bf16")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{dev}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "gpu_bench.png"), dpi=110)
    except Exception as e:
        print(f"plot skipped: {e}")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
