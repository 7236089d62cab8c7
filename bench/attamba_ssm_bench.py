"""Attamba's chunk-local SSM prefill: kvplug (kvp_attention_ssm) against PyTorch running the same
chunk-local Mamba-2 block on the same device (the CPU here), interleaved rounds, medians.

PyTorch's side is the natural vectorised form of the chunk-local scan: the sequence cut at the
layer's chunk boundaries into [num_chunks, P] (the one-token first chunk and the ragged last one
padded), the conv as a padded depthwise conv1d per chunk, then a loop over the P positions of a chunk
vectorised over every chunk and head (state resets are the chunk starts). Both sides get the same
in_proj output and weights; the outputs are compared too (max abs difference printed).

    python3 bench/attamba_ssm_bench.py [--tokens 4096] [--chunk 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import kvplug


def torch_chunk_ssm(inp, conv_w, dt_bias, a_log, d_skip, norm_w, heads, head_dim, state, P, off, eps):
    """The block over one sequence [n, in_dim] -> [n, d_inner], chunk-local (layer offset `off`)."""
    n = inp.shape[0]
    di, gn = heads * head_dim, state  # one group
    conv_dim = di + 2 * gn
    z, xbc, dt = inp[:, :di], inp[:, di:di + conv_dim], inp[:, di + conv_dim:]
    # Chunks: [0, 0], then ends at j P + P - 1 - off; pad every chunk to P positions.
    starts = [0] + [s for s in range(1, n) if (s + off) % P == 0 or s == 1]
    starts = sorted(set(starts))
    bounds = list(zip(starts, starts[1:] + [n]))
    C = len(bounds)
    idx = torch.full((C, P), n, dtype=torch.long)  # n: the padding row (zeros)
    for c, (a, b) in enumerate(bounds):
        idx[c, : b - a] = torch.arange(a, b)
    pad = lambda t: torch.cat([t, torch.zeros(1, t.shape[1], dtype=t.dtype)], 0)  # noqa: E731
    xc = pad(xbc)[idx]  # [C, P, conv_dim]
    w = conv_w.shape[1]
    conv = F.conv1d(F.pad(xc.transpose(1, 2), (w - 1, 0)), conv_w[:, None, :], groups=conv_dim)
    xc = F.silu(conv).transpose(1, 2)  # [C, P, conv_dim]
    x = xc[..., :di].reshape(C, P, heads, head_dim)
    B, Cm = xc[..., di:di + gn], xc[..., di + gn:]
    dtc = F.softplus(pad(dt)[idx] + dt_bias)  # [C, P, heads]
    decay = torch.exp(dtc * -torch.exp(a_log))
    h = torch.zeros(C, heads, head_dim, state)
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heads, head_dim, state, width = 32, 64, 64, 4  # d_inner 2048: a 1B-class model's SSM
    n, P = args.tokens, args.chunk
    g = torch.Generator().manual_seed(0)
    di = heads * head_dim
    conv_dim = di + 2 * state
    in_dim = 2 * di + 2 * state + heads
    inp = torch.randn(n, in_dim, generator=g)
    conv_w = 0.5 * torch.randn(conv_dim, width, generator=g)
    dt_bias, a_log, d_skip = torch.randn(heads, generator=g), torch.rand(heads, generator=g), torch.randn(heads, generator=g)
    norm_w = 1 + 0.1 * torch.randn(di, generator=g)

    ctx = kvplug.Context(num_threads=args.threads)
    cfg = kvplug.attamba_config(chunk_size=P, window=0, ssm_heads=heads, ssm_head_dim=head_dim, state_size=state,
                                conv_width=width)
    attn = kvplug.Attention(ctx, "attamba", num_q_heads=8, num_kv_heads=8, head_size=64, config=cfg)
    cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=4, block_size=16, num_kv_heads=8, head_size=64,
                           num_state_slots=1, state_bytes_per_layer=attn.state_bytes)
    plan = kvplug.Plan(ctx, max_num_seqs=1, max_num_tokens=n, max_num_blocks=4)
    plan.update([0, n], [1], block_size=16, block_table=[[0]], state_slots=[0], query_pos_starts=[0])
    out = np.zeros((n, di), dtype=np.float32)
    args_np = dict(conv_weight=conv_w.numpy(), dt_bias=dt_bias.numpy(), a_log=a_log.numpy(), d_skip=d_skip.numpy(),
                   norm_weight=norm_w.numpy())
    inp_np = inp.numpy()

    def run_kvplug():
        attn.ssm(plan, cache, 0, inp_np, out, which=0, **args_np)

    def run_torch():
        return torch_chunk_ssm(inp, conv_w, dt_bias, a_log, d_skip, norm_w, heads, head_dim, state, P, 0, 1e-5)

    ref = run_torch()
    run_kvplug()
    err = float(np.max(np.abs(ref.numpy() - out)))
    tk, tt = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        run_kvplug()
        tk.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_torch()
        tt.append(time.perf_counter() - t0)
    mk, mt = statistics.median(tk), statistics.median(tt)
    print("| tokens | P | SSM | threads | kvplug tokens/s | PyTorch tokens/s | kvplug / PyTorch | max abs diff |")
    print(f"| {n} | {P} | {heads}x{head_dim}, N={state}, conv {width} | {args.threads} | {n / mk:,.0f} | "
          f"{n / mt:,.0f} | {mt / mk:.2f}x | {err:.2e} |")


if __name__ == "__main__":
    main()
