"""A NumPy reference for checking attention outputs: the Python twin of
``tests/common/naive_attention.h``, causal attention over contiguous K/V in float64, written plainly.

Not used by the binding itself; the tests and ``examples/demo.py`` check the library against it, and
engines can use it the same way.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from numpy.typing import ArrayLike, NDArray


def naive_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, sm_scale: float, window_left: int = -1,
                    logits_soft_cap: float = 0.0) -> Tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Causal attention of one sequence in float64.

    ``q`` [q_len, num_q_heads, head_size]: the last q_len positions of the sequence; ``k``/``v``
    [seq_len, num_kv_heads, head_size]. Query i sits at position seq_len - q_len + i and sees
    positions [max(0, pos - window_left) if window_left >= 0 else 0, pos]. Grouped-query attention:
    query head h reads KV head h // (num_q_heads // num_kv_heads).

    Returns ``(out [q_len, num_q_heads, head_size], lse [q_len, num_q_heads])``, lse the natural
    log-sum-exp of the (scaled, capped) logits.
    """
    q64 = np.asarray(q, np.float64)
    k64 = np.asarray(k, np.float64)
    v64 = np.asarray(v, np.float64)
    q_len, hq, _ = q64.shape
    seq_len, hkv, _ = k64.shape
    if hq % hkv:
        raise ValueError(f"num_q_heads={hq} is not a multiple of num_kv_heads={hkv}")
    group = hq // hkv
    kk = np.repeat(k64, group, axis=1)  # [seq_len, hq, d]: KV head of each query head
    vv = np.repeat(v64, group, axis=1)
    logits = np.einsum("ihd,jhd->hij", q64, kk) * sm_scale  # [hq, q_len, seq_len]
    if logits_soft_cap > 0:
        logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
    pos = seq_len - q_len + np.arange(q_len)
    j = np.arange(seq_len)
    hidden = j[None, :] > pos[:, None]
    if window_left >= 0:
        hidden |= j[None, :] < (pos[:, None] - window_left)
    logits = np.where(hidden[None, :, :], -np.inf, logits)
    m = logits.max(axis=-1, keepdims=True)
    p = np.exp(logits - m)
    s = p.sum(axis=-1, keepdims=True)
    out = np.einsum("hij,jhd->ihd", p / s, vv)
    lse = (m + np.log(s))[..., 0].T  # [q_len, hq]
    return out, lse


def round_to_bfloat16(x: ArrayLike) -> NDArray[np.float32]:
    """float32 values rounded to the nearest bfloat16 (ties to even), returned as float32: what a
    bfloat16 cache holds after storing ``x`` (NaNs aside)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) & np.uint64(0xFFFF0000)
    return rounded.astype(np.uint32).view(np.float32)


def bfloat16_bits_to_float32(bits: ArrayLike) -> NDArray[np.float32]:
    """The values of bfloat16 data held as uint16 bits (e.g. a bfloat16 ``KvCache.layer_view``)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16_bits(x: ArrayLike) -> NDArray[np.uint16]:
    """float32 values rounded to bfloat16, as uint16 bits."""
    return (round_to_bfloat16(x).view(np.uint32) >> 16).astype(np.uint16)
