"""Attamba's chunk-local SSM prefill: kvplug (kvp_attention_ssm) against PyTorch running the same
chunk-local Mamba-2 block on the same device (the CPU, or with --device cuda the GPU), interleaved
rounds, medians.

PyTorch's side is the natural vectorised form of the chunk-local scan: the sequence cut at the
layer's chunk boundaries into [num_chunks, P] (the one-token first chunk and the ragged last one
padded), the conv as a padded depthwise conv1d per chunk, then a loop over the P positions of a chunk
vectorised over every chunk and head (state resets are the chunk starts). The gather index of the
chunks depends only on (n, P, offset) and is built once, outside the timed calls. Both sides get
the same in_proj output and weights; the outputs are compared too (max abs difference printed).
On CUDA both are timed with CUDA events around each call (kernel launches from Python included, as
an engine would run them); ``--batch B`` runs B sequences of ``--tokens`` each in one call (kvplug:
one plan of B sequences; PyTorch: the chunks of all B sequences in one batch).

    python3 bench/attamba_ssm_bench.py [--tokens 4096] [--chunk 8] [--threads 1] [--device cpu|cuda]
        [--batch 1] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import kvplug


def chunk_index(n, P, off, device):
    """[C, P] gather index of the chunks of a sequence of n tokens (n: the padding row)."""
    starts = sorted({0} | {s for s in range(1, n) if (s + off) % P == 0 or s == 1})
    bounds = list(zip(starts, starts[1:] + [n]))
    idx = torch.full((len(bounds), P), n, dtype=torch.long)
    for c, (a, b) in enumerate(bounds):
        idx[c, : b - a] = torch.arange(a, b)
    return idx.to(device)


def torch_chunk_ssm(inp, conv_w, dt_bias, a_log, d_skip, norm_w, heads, head_dim, state, P, off, eps, idx=None):
    """The block over one sequence [n, in_dim] -> [n, d_inner], chunk-local (layer offset `off`);
    `idx` from chunk_index (built here when None)."""
    n = inp.shape[0]
    di, gn = heads * head_dim, state  # one group
    conv_dim = di + 2 * gn
    z, xbc, dt = inp[:, :di], inp[:, di:di + conv_dim], inp[:, di + conv_dim:]
    # Chunks: [0, 0], then ends at j P + P - 1 - off; pad every chunk to P positions.
    if idx is None:
        idx = chunk_index(n, P, off, inp.device)
    C = idx.shape[0]
    pad = lambda t: torch.cat([t, t.new_zeros(1, t.shape[1])], 0)  # noqa: E731
    xc = pad(xbc)[idx]  # [C, P, conv_dim]
    w = conv_w.shape[1]
    conv = F.conv1d(F.pad(xc.transpose(1, 2), (w - 1, 0)), conv_w[:, None, :], groups=conv_dim)
    xc = F.silu(conv).transpose(1, 2)  # [C, P, conv_dim]
    x = xc[..., :di].reshape(C, P, heads, head_dim)
    B, Cm = xc[..., di:di + gn], xc[..., di + gn:]
    dtc = F.softplus(pad(dt)[idx] + dt_bias)  # [C, P, heads]
    decay = torch.exp(dtc * -torch.exp(a_log))
    h = inp.new_zeros(C, heads, head_dim, state)
    ys = []
    for i in range(P):
        h = h * decay[:, i, :, None, None] + (dtc[:, i, :, None, None] * x[:, i, :, :, None]) * B[:, i, None, None, :]
        ys.append(torch.einsum("chpn,cn->chp", h, Cm[:, i]) + d_skip[:, None] * x[:, i])
    y = torch.stack(ys, 1).reshape(C * P, di)
    y = y[(idx.reshape(-1) < n)]  # back to positions (chunks are in order)
    y = y * F.silu(z)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * norm_w
    return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=1, help="sequences of --tokens each, in one call")
    ap.add_argument("--json", default=None, help="append the row as one JSON line to this file")
    ap.add_argument("--header", action="store_true", help="print the table header")
    ap.add_argument("--tensors", action="store_true", help="give kvplug torch tensors (DLPack) on the CPU too, as "
                    "on CUDA (a check of that path without a GPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    heads, head_dim, state, width = 32, 64, 64, 4  # d_inner 2048: a 1B-class model's SSM
    n, P, Bn = args.tokens, args.chunk, args.batch
    g = torch.Generator().manual_seed(0)
    di = heads * head_dim
    conv_dim = di + 2 * state
    in_dim = 2 * di + 2 * state + heads
    inp = torch.randn(Bn * n, in_dim, generator=g).to(dev)
    conv_w = (0.5 * torch.randn(conv_dim, width, generator=g)).to(dev)
    dt_bias, a_log, d_skip = (torch.randn(heads, generator=g).to(dev), torch.rand(heads, generator=g).to(dev),
                              torch.randn(heads, generator=g).to(dev))
    norm_w = (1 + 0.1 * torch.randn(di, generator=g)).to(dev)

    ctx = kvplug.Context(args.device, num_threads=args.threads)
    cfg = kvplug.attamba_config(chunk_size=P, window=0, ssm_heads=heads, ssm_head_dim=head_dim, state_size=state,
                                conv_width=width)
    # The SSM never reads the pages; their dtype only has to be one the device's attention takes.
    kv_dtype = "bfloat16" if args.device == "cuda" else "float32"
    attn = kvplug.Attention(ctx, "attamba", num_q_heads=8, num_kv_heads=8, head_size=64, config=cfg,
                            kv_dtype=kv_dtype)
    cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=4 * Bn, block_size=16, num_kv_heads=8, head_size=64,
                           dtype=kv_dtype, num_state_slots=Bn, state_bytes_per_layer=attn.state_bytes)
    plan = kvplug.Plan(ctx, max_num_seqs=Bn, max_num_tokens=Bn * n, max_num_blocks=4 * Bn)
    plan.update([n * b for b in range(Bn + 1)], [1] * Bn, block_size=16, block_table=[[b] for b in range(Bn)],
                state_slots=list(range(Bn)), query_pos_starts=[0] * Bn)
    cuda = args.device == "cuda"
    if cuda or args.tensors:
        out = torch.zeros(Bn * n, di, device=dev)
        kw = dict(conv_weight=conv_w, dt_bias=dt_bias, a_log=a_log, d_skip=d_skip, norm_weight=norm_w)
        x_in = inp
    else:
        out = np.zeros((Bn * n, di), dtype=np.float32)
        kw = dict(conv_weight=conv_w.numpy(), dt_bias=dt_bias.numpy(), a_log=a_log.numpy(), d_skip=d_skip.numpy(),
                  norm_weight=norm_w.numpy())
        x_in = inp.numpy()
    idx1 = chunk_index(n, P, 0, dev)  # setup, not timed: depends on (n, P, offset) only
    # B sequences: their chunks side by side (sequence b's rows offset by b * n, its padding row last).
    idx = torch.cat([torch.where(idx1 < n, idx1 + b * n, Bn * n) for b in range(Bn)], 0) if Bn > 1 else idx1

    def run_kvplug():
        attn.ssm(plan, cache, 0, x_in, out, which=0, **kw)

    def run_torch():
        return torch_chunk_ssm(inp, conv_w, dt_bias, a_log, d_skip, norm_w, heads, head_dim, state, P, 0, 1e-5,
                               idx=idx)

    def timed(fn):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    ref = run_torch()
    run_kvplug()
    if cuda:
        torch.cuda.synchronize()
    got = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
    err = float((ref.to(got.device) - got).abs().max())
    tk, tt = [], []
    for _ in range(args.rounds):
        tk.append(timed(run_kvplug))
        tt.append(timed(run_torch))
    mk, mt = statistics.median(tk), statistics.median(tt)
    dev_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    if args.header:
        print("| device | sequences x tokens | P | SSM | threads | kvplug tokens/s | PyTorch tokens/s | kvplug / PyTorch | "
              "max abs diff |")
        print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {dev_name} | {Bn} x {n} | {P} | {heads}x{head_dim}, N={state}, conv {width} | {args.threads} | "
          f"{Bn * n / mk:,.0f} | {Bn * n / mt:,.0f} | {mt / mk:.2f}x | {err:.2e} |", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"device": dev_name, "sequences": Bn, "tokens": n, "P": P, "heads": heads,
                                "head_dim": head_dim, "state": state, "conv_width": width, "threads": args.threads,
                                "kvplug_s": mk, "torch_s": mt, "kvplug_tokens_per_s": Bn * n / mk,
                                "torch_tokens_per_s": Bn * n / mt, "ratio": mt / mk, "max_abs_diff": err}) + "\n")


if __name__ == "__main__":
    main()
