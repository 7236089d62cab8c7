"""What ABI 0.4 added, through the binding: the "star" backend (Star Attention) with
kvp_batch.context_lens against float64 NumPy over the paper's key sets, communicators merging
partial attention states, Star keys in the prefix cache (allocate_star), and their error paths.

Tests of entry points the library under test may still lack (kvp_comm_*,
kvp_block_manager_allocate_star: optional in the binding, see _lib.OPTIONAL_ENTRY_POINTS) skip
when the symbol is missing from that .so, and only then."""
from __future__ import annotations

import threading
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pytest

import kvplug
from kvplug import _lib
from kvplug.reference import naive_attention

PAGE = 8      # tokens per cache page (block manager / cache block_size)
HEAD = 32     # the smallest head size the CPU engine lists
HQ, HKV = 4, 2


def _needs(*names: str) -> None:
    missing = [n for n in names if not _lib.api().has(n)]
    if missing:
        pytest.skip(f"{_lib.api().path} lacks {missing} (ABI 0.4, being implemented)")


class Seq:
    """One sequence's K/V (layer 0 of a 1-layer cache) at scattered pages, and its queries."""

    def __init__(self, ctx: kvplug.Context, n: int, seed: int, q_len: Optional[int] = None) -> None:
        rng = np.random.default_rng(seed)
        pages = -(-n // PAGE)
        self.cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=pages + 3, block_size=PAGE, num_kv_heads=HKV,
                                    head_size=HEAD)
        self.table = rng.permutation(pages + 3)[:pages].astype(np.int32)[None, :]
        self.n = n
        self.k = rng.standard_normal((n, HKV, HEAD)).astype(np.float32)
        self.v = rng.standard_normal((n, HKV, HEAD)).astype(np.float32)
        self.cache.write(0, self.k, self.v, self.slots(0, n))
        self.q = rng.standard_normal((n if q_len is None else q_len, HQ, HEAD)).astype(np.float32)

    def slots(self, start: int, count: int) -> np.ndarray:
        pos = np.arange(start, start + count)
        return self.table[0, pos // PAGE].astype(np.int64) * PAGE + pos % PAGE


def _plan(ctx: kvplug.Context, tokens: int = 128, seqs: int = 4) -> kvplug.Plan:
    return kvplug.Plan(ctx, max_num_seqs=seqs, max_num_tokens=tokens, max_num_blocks=64)


def _star_reference(seq: Seq, q: np.ndarray, start: int, context_len: int, block: int, anchor: int,
                    sm_scale: float) -> Tuple[np.ndarray, np.ndarray]:
    """Star attention of queries at positions start.. of ``seq``, by the paper's explicit sequences:
    a context token of block 0 attends causally within block 0; one of block k > 0 attends to
    [anchor ; block k up to itself] (naive_attention over the concatenation, the anchor first);
    a query/generated token attends causally to everything before it."""
    outs, lses = [], []
    for i in range(q.shape[0]):
        p = start + i
        if p < context_len:
            k = p // block
            keys = np.arange(k * block, p + 1)
            if k > 0:
                keys = np.concatenate([np.arange(anchor), keys])
        else:
            keys = np.arange(p + 1)
        o, l_ = naive_attention(q[i:i + 1].astype(np.float64), seq.k[keys], seq.v[keys], sm_scale)
        outs.append(o)
        lses.append(l_)
    return np.concatenate(outs), np.concatenate(lses)


# ------------------------------------------------------------------------------------------------
# Star through Plan.update(context_lens=...)
# ------------------------------------------------------------------------------------------------

BLOCK, ANCHOR, CONTEXT, QUERY = 16, 8, 40, 6   # blocks [0,16) [16,32) [32,40), then 6 query tokens


def _star(ctx: kvplug.Context, block: int = BLOCK, anchor: int = ANCHOR, **extra: int) -> kvplug.Attention:
    return kvplug.Attention(ctx, "star", num_q_heads=HQ, num_kv_heads=HKV, head_size=HEAD,
                            config=kvplug.star_config(block, anchor, **extra))


def test_star_is_registered_with_lse_and_stable_config() -> None:
    assert "star" in kvplug.backends()
    info = kvplug.backend_info("star")
    assert info.supports_lse and not info.needs_state_slots and HEAD in info.head_sizes
    assert not kvplug.backend_device_info("star", "cpu").experimental
    kvplug.check_config("star", {"backend_config_type": "StarConfig",
                                 "backend_config": {"context_block_size": 64, "anchor_block_size": 64}})
    kvplug.check_config("star", kvplug.star_config(64, 16, num_shards=4, shard_rank=3, append_shard=0))


def test_phase_one_block_sees_anchor_and_itself(ctx: kvplug.Context) -> None:
    seq = Seq(ctx, CONTEXT + QUERY, seed=1)
    attn = _star(ctx)
    n = seq.n
    with _plan(ctx) as plan:
        plan.attach(attn)
        plan.update([0, n], [n], block_size=PAGE, block_table=seq.table, context_lens=[CONTEXT])
        out = np.full_like(seq.q, np.nan)
        lse = np.full(seq.q.shape[:2], np.nan, np.float32)
        attn.run(plan, seq.cache, 0, seq.q, out, lse)
    # Block 1 by itself, as the acceptance check states it: [anchor ; block 1] with NumPy.
    kk = np.concatenate([seq.k[:ANCHOR], seq.k[BLOCK:2 * BLOCK]])
    vv = np.concatenate([seq.v[:ANCHOR], seq.v[BLOCK:2 * BLOCK]])
    ref1, ref1_lse = naive_attention(seq.q[BLOCK:2 * BLOCK].astype(np.float64), kk, vv, attn.sm_scale)
    assert np.abs(out[BLOCK:2 * BLOCK] - ref1).max() <= 1e-5
    assert np.abs(lse[BLOCK:2 * BLOCK] - ref1_lse).max() <= 1e-5
    # Every token: block 0 causal, the partial last block with the anchor, the query dense.
    ref, ref_lse = _star_reference(seq, seq.q, 0, CONTEXT, BLOCK, ANCHOR, attn.sm_scale)
    assert np.abs(out - ref).max() <= 1e-5 and np.abs(lse - ref_lse).max() <= 1e-5
    # It is not dense: the anchor-only view changes block 1's output.
    dense_ref, _ = naive_attention(seq.q.astype(np.float64), seq.k, seq.v, attn.sm_scale)
    assert np.abs(out[BLOCK:CONTEXT] - dense_ref[BLOCK:CONTEXT]).max() > 1e-2
    assert np.abs(out[:BLOCK] - dense_ref[:BLOCK]).max() <= 1e-5
    assert np.abs(out[CONTEXT:] - dense_ref[CONTEXT:]).max() <= 1e-5


def test_chunked_prefill_and_decode_cross_block_boundaries(ctx: kvplug.Context) -> None:
    seq = Seq(ctx, CONTEXT + QUERY, seed=2)
    attn = _star(ctx)
    ref, _ = _star_reference(seq, seq.q, 0, CONTEXT, BLOCK, ANCHOR, attn.sm_scale)
    got = []
    with _plan(ctx) as plan:
        start = 0
        for chunk in (5, 13, 20, 3, 1, 1, 1, 1, 1):  # 5+13 crosses block 0|1, 18+20 crosses 1|2 and context|query
            end = start + chunk
            plan.update([0, chunk], [end], block_size=PAGE, block_table=seq.table, context_lens=[CONTEXT])
            out = np.empty((chunk, HQ, HEAD), np.float32)
            attn.run(plan, seq.cache, 0, seq.q[start:end], out)
            got.append(out)
            start = end
    assert start == seq.n
    assert np.abs(np.concatenate(got) - ref).max() <= 1e-5


def test_block_recomputed_alone_and_a_ragged_batch(ctx: kvplug.Context) -> None:
    """Block k recomputed by itself (seq_len = the end of block k, its tokens only: what a Star
    prefix hit leaves to compute) next to another sequence with another context length."""
    a, b = Seq(ctx, 64, seed=3), Seq(ctx, 30, seed=4)
    attn = _star(ctx)
    ref_a, _ = _star_reference(a, a.q, 0, 48, BLOCK, ANCHOR, attn.sm_scale)
    ref_b, _ = _star_reference(b, b.q, 0, 20, BLOCK, ANCHOR, attn.sm_scale)
    width = max(a.table.shape[1], b.table.shape[1])
    table = np.full((2, width), -1, np.int32)
    table[0, : a.table.shape[1]] = a.table[0]
    table[1, : b.table.shape[1]] = b.table[0]
    # Two caches cannot share a run, so b's K/V go into a's cache at pages after a's.
    cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=20, block_size=PAGE, num_kv_heads=HKV, head_size=HEAD)
    table[0, :8] = np.arange(8)
    table[1, :4] = np.arange(8, 12)
    for s, row in ((a, table[0]), (b, table[1])):
        pos = np.arange(s.n)
        cache.write(0, s.k, s.v, row[pos // PAGE].astype(np.int64) * PAGE + pos % PAGE)
    with _plan(ctx) as plan:
        # a: block 2 alone (tokens 32..47, seq_len 48); b: its whole prompt (context 20 + 10 query).
        q = np.concatenate([a.q[32:48], b.q])
        plan.update([0, 16, 16 + 30], [48, 30], block_size=PAGE, block_table=table, context_lens=[48, 20])
        out = attn.run(plan, cache, 0, q, np.empty_like(q))
    assert np.abs(out[:16] - ref_a[32:48]).max() <= 1e-5
    assert np.abs(out[16:] - ref_b).max() <= 1e-5


def test_without_context_star_is_dense(ctx: kvplug.Context) -> None:
    seq = Seq(ctx, CONTEXT + QUERY, seed=5)
    star = _star(ctx)
    dense = kvplug.Attention(ctx, "dense", num_q_heads=HQ, num_kv_heads=HKV, head_size=HEAD)
    n = seq.n
    with _plan(ctx) as plan:
        plan.update([0, n], [n], block_size=PAGE, block_table=seq.table)
        want = dense.run(plan, seq.cache, 0, seq.q, np.empty_like(seq.q))
        for context_lens in (None, [0]):
            plan.update([0, n], [n], block_size=PAGE, block_table=seq.table, context_lens=context_lens)
            got = star.run(plan, seq.cache, 0, seq.q, np.empty_like(seq.q))
            assert np.abs(got - want).max() <= 1e-6, context_lens
        # A block covering the whole context is dense too; dense ignores context_lens.
        big = _star(ctx, block=64, anchor=64)
        plan.update([0, n], [n], block_size=PAGE, block_table=seq.table, context_lens=[CONTEXT],
                    query_pos_starts=[0])
        assert np.abs(big.run(plan, seq.cache, 0, seq.q, np.empty_like(seq.q)) - want).max() <= 1e-6
        assert np.abs(dense.run(plan, seq.cache, 0, seq.q, np.empty_like(seq.q)) - want).max() <= 1e-6
    ref, _ = naive_attention(seq.q.astype(np.float64), seq.k, seq.v, star.sm_scale)
    assert np.abs(want - ref).max() <= 1e-5


def test_plan_and_config_errors(ctx: kvplug.Context) -> None:
    seq = Seq(ctx, 20, seed=6)
    attn = _star(ctx)
    plan = _plan(ctx)
    plan.attach(attn)
    base = dict(block_size=PAGE, block_table=seq.table)
    with pytest.raises(kvplug.InvalidArgumentError, match="context_lens has 2 entries for 1 sequences"):
        plan.update([0, 20], [20], context_lens=[4, 4], **base)
    assert plan.num_seqs == 0  # a failed update empties the plan
    with pytest.raises(kvplug.InvalidArgumentError, match="query_pos_starts has 0 entries"):
        plan.update([0, 20], [20], query_pos_starts=np.zeros(0, np.int32), **base)
    with pytest.raises(kvplug.InvalidArgumentError, match=r"context_lens\[0\]=-1"):
        plan.update([0, 20], [20], context_lens=[-1], **base)
    with pytest.raises(kvplug.InvalidArgumentError, match="context_lens: values .* do not fit int32"):
        plan.update([0, 20], [20], context_lens=[1 << 40], **base)
    with pytest.raises(kvplug.InvalidArgumentError, match=r"query_pos_starts=3.*seq_lens - q_len = 0"):
        plan.update([0, 20], [20], context_lens=[8], query_pos_starts=[3], **base)
    with pytest.raises(kvplug.FailedPreconditionError):  # the failed update left the plan empty
        attn.run(plan, seq.cache, 0, seq.q, np.empty_like(seq.q))
    plan.update([0, 20], [20], context_lens=[8], **base)
    assert (plan.num_seqs, plan.num_tokens) == (1, 20)
    # Shards need query_pos_starts to tell phase 1 from phase 2.
    sharded = _star(ctx, num_shards=2, shard_rank=0)
    with pytest.raises(kvplug.InvalidArgumentError, match="needs kvp_batch.query_pos_starts"):
        plan.attach(sharded)
        plan.update([0, 20], [20], context_lens=[8], **base)
    # Configs the library rejects, with the values.
    for bad, what in ((dict(context_block_size=16, anchor_block_size=32), "anchor_block_size=32"),
                      (dict(context_block_size=0, anchor_block_size=0), "context_block_size=0"),
                      (dict(context_block_size=16, anchor_block_size=16, num_shards=2, shard_rank=2), "shard_rank=2")):
        cfg = {"backend_config_type": "StarConfig", "backend_config": bad}
        with pytest.raises(kvplug.InvalidConfigError, match=what):
            kvplug.check_config("star", cfg)
        with pytest.raises(kvplug.InvalidConfigError, match=what):
            kvplug.Attention(ctx, "star", num_q_heads=HQ, num_kv_heads=HKV, head_size=HEAD, config=cfg)
    with pytest.raises(kvplug.InvalidConfigError):  # a DenseConfig for star
        kvplug.check_config("star", {"backend_config_type": "DenseConfig", "backend_config": {"window_left": 4}})


def test_short_batch_struct_without_the_new_fields() -> None:
    """Plan.update sends the 0.3-sized kvp_batch when context_lens and query_pos_starts are unused
    (any 0.x library accepts it), the full one otherwise."""
    b, _ = kvplug.Plan._batch([0, 1], [1], 8, [[0]], None, None, None, None)
    assert b.struct_size == _lib.KVP_BATCH_SIZE_0_3 < _lib.ctypes.sizeof(_lib.kvp_batch)
    b, keep = kvplug.Plan._batch([0, 1], [1], 8, [[0]], None, None, None, None, [0], None)
    assert b.struct_size == _lib.ctypes.sizeof(_lib.kvp_batch) and b.context_lens[0] == 0 and not b.query_pos_starts
    del keep


# ------------------------------------------------------------------------------------------------
# Communicators
# ------------------------------------------------------------------------------------------------


def _partials(rng: np.random.Generator, t: int, parts: Sequence[np.ndarray], n: int,
              sm_scale: float) -> Tuple[np.ndarray, List[Tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """Queries [t, HQ, HEAD], K/V over n keys; the full (non-causal) attention and, per key subset,
    the partial (out float32, lse float32; -inf and zeros where the subset is empty)."""
    q = rng.standard_normal((t, HQ, HEAD))
    k = rng.standard_normal((n, HQ, HEAD))
    v = rng.standard_normal((n, HQ, HEAD))

    def attend(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if keys.size == 0:
            return np.zeros((t, HQ, HEAD)), np.full((t, HQ), -np.inf)
        logits = np.einsum("thd,khd->thk", q, k[keys]) * sm_scale
        m = logits.max(-1, keepdims=True)
        p = np.exp(logits - m)
        s = p.sum(-1, keepdims=True)
        return np.einsum("thk,khd->thd", p / s, v[keys]), (m + np.log(s))[..., 0]

    full, full_lse = attend(np.arange(n))
    outs = [(o.astype(np.float32), l_.astype(np.float32)) for o, l_ in map(attend, parts)]
    return full, outs, full_lse


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_in_process_merge_equals_full_attention(ctx: kvplug.Context, num_ranks: int) -> None:
    _needs("kvp_comm_create", "kvp_comm_merge_attention", "kvp_comm_pending", "kvp_comm_destroy")
    rng = np.random.default_rng(10 + num_ranks)
    t, n = 7, 50
    parts = np.array_split(rng.permutation(n), num_ranks)  # disjoint, scattered key sets
    full, partials, full_lse = _partials(rng, t, parts, n, 1 / np.sqrt(HEAD))
    with kvplug.Communicator(ctx, num_ranks=num_ranks, max_num_tokens=16, num_heads=HQ, head_size=HEAD) as comm:
        assert comm.kind == "in_process" and comm.pending == 0
        for rank in reversed(range(num_ranks)):  # any order
            o, l_ = partials[rank]
            assert comm.merge_attention(rank, o, l_) is o
            assert comm.pending == (num_ranks - rank) % num_ranks
        for o, l_ in partials:  # every rank holds the merge
            assert np.abs(o - full).max() <= 1e-5
            assert np.abs(l_ - full_lse).max() <= 1e-5
        # A second round, from threads, with an empty partial on the last rank.
        parts = np.array_split(rng.permutation(n), num_ranks - 1) + [np.zeros(0, np.int64)]
        full, partials, _ = _partials(rng, t, parts, n, 1 / np.sqrt(HEAD))
        errors: List[BaseException] = []

        def contribute(rank: int) -> None:
            try:
                comm.merge_attention(rank, *partials[rank])
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=contribute, args=(r,)) for r in range(num_ranks)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors and comm.pending == 0
        for o, _ in partials:
            assert np.isfinite(o).all() and np.abs(o - full).max() <= 1e-5


def test_star_shards_merge_to_one_shard(ctx: kvplug.Context) -> None:
    """Phase 2 across 2 Star shards (context block k on shard k % 2, the query on the last shard),
    merged by an in-process communicator, equals single-shard Star (which is dense for the query)."""
    _needs("kvp_comm_create", "kvp_comm_merge_attention", "kvp_comm_pending", "kvp_comm_destroy")
    block, context, query = 16, 48, 5  # blocks 0, 2 on shard 0; block 1 and the query on shard 1
    full = Seq(ctx, context + query, seed=20, q_len=query)
    sm_scale = 1 / np.sqrt(HEAD)
    ref, ref_lse = naive_attention(full.q.astype(np.float64), full.k, full.v, sm_scale)
    owned = [np.r_[0:16, 32:48], np.r_[16:32, context:context + query]]
    comm = kvplug.Communicator(ctx, num_ranks=2, max_num_tokens=query, num_heads=HQ, head_size=HEAD)
    outs = []
    for rank in range(2):
        keys = owned[rank]
        cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=8, block_size=PAGE, num_kv_heads=HKV, head_size=HEAD)
        pos = np.arange(len(keys))
        cache.write(0, full.k[keys], full.v[keys], pos.astype(np.int64))
        attn = _star(ctx, block=block, anchor=PAGE, num_shards=2, shard_rank=rank)
        with _plan(ctx) as plan:
            plan.update([0, query], [len(keys)], block_size=PAGE, block_table=[np.arange(8)], context_lens=[context],
                        query_pos_starts=[context])
            o = np.empty_like(full.q)
            l_ = np.empty(full.q.shape[:2], np.float32)
            attn.run(plan, cache, 0, full.q, o, l_)
        outs.append((o, l_))
    for rank, (o, l_) in enumerate(outs):
        comm.merge_attention(rank, o, l_)
    for o, l_ in outs:
        assert np.abs(o - ref).max() <= 1e-5 and np.abs(l_ - ref_lse).max() <= 1e-5
    comm.close()


def test_communicator_errors(ctx: kvplug.Context) -> None:
    _needs("kvp_comm_create", "kvp_comm_merge_attention", "kvp_comm_pending", "kvp_comm_destroy")
    with pytest.raises(kvplug.InvalidArgumentError, match="num_ranks=0"):
        kvplug.Communicator(ctx, num_ranks=0, max_num_tokens=4, num_heads=HQ, head_size=HEAD)
    with pytest.raises(kvplug.InvalidArgumentError, match="max_num_tokens=0"):
        kvplug.Communicator(ctx, num_ranks=2, max_num_tokens=0, num_heads=HQ, head_size=HEAD)
    with pytest.raises(kvplug.InvalidArgumentError, match="kind='mpi'"):
        kvplug.Communicator(ctx, num_ranks=2, max_num_tokens=4, num_heads=HQ, head_size=HEAD, kind="mpi")
    with pytest.raises(kvplug.InvalidArgumentError, match="nccl_unique_id has 3 bytes"):
        kvplug.Communicator(ctx, num_ranks=2, max_num_tokens=4, num_heads=HQ, head_size=HEAD, kind="nccl",
                            nccl_unique_id=b"abc")
    with pytest.raises(TypeError, match="kvplug.Context"):
        kvplug.Communicator(None, num_ranks=2, max_num_tokens=4, num_heads=HQ, head_size=HEAD)  # type: ignore
    comm = kvplug.Communicator(ctx, num_ranks=2, max_num_tokens=4, num_heads=HQ, head_size=HEAD)
    out = np.zeros((3, HQ, HEAD), np.float32)
    lse = np.zeros((3, HQ), np.float32)
    with pytest.raises(kvplug.InvalidArgumentError, match="rank"):
        comm.merge_attention(2, out, lse)
    with pytest.raises(kvplug.InvalidArgumentError):  # more tokens than max_num_tokens
        comm.merge_attention(0, np.zeros((5, HQ, HEAD), np.float32), np.zeros((5, HQ), np.float32))
    with pytest.raises(kvplug.InvalidArgumentError):  # the wrong dtype
        comm.merge_attention(0, out.astype(np.float16), lse)
    with pytest.raises(kvplug.InvalidArgumentError):  # lse's shape
        comm.merge_attention(0, out, np.zeros((3, HQ + 1), np.float32))
    with pytest.raises(TypeError):
        comm.merge_attention(0, [[1.0]], lse)
    assert comm.pending == 0  # failed calls contributed nothing
    comm.merge_attention(0, out, lse)
    assert comm.pending == 1
    with pytest.raises(kvplug.FailedPreconditionError):
        comm.merge_attention(0, out.copy(), lse.copy())
    with pytest.raises(kvplug.InvalidArgumentError):  # differs from the round's first contribution
        comm.merge_attention(1, np.zeros((2, HQ, HEAD), np.float32), np.zeros((2, HQ), np.float32))
    comm.merge_attention(1, np.zeros_like(out), np.zeros_like(lse))
    assert comm.pending == 0
    comm.close()
    comm.close()
    with pytest.raises(kvplug.FailedPreconditionError, match="closed"):
        comm.merge_attention(0, out, lse)


def test_nccl_unique_id_and_nccl_comm_on_a_cpu_context(ctx: kvplug.Context) -> None:
    _needs("kvp_comm_nccl_unique_id", "kvp_comm_create")
    try:
        uid = kvplug.nccl_unique_id()
    except (kvplug.NotSupportedError, kvplug.DeviceError) as e:  # no NCCL (or no GPU) here
        assert e.message
        uid = bytes(_lib.KVP_NCCL_UNIQUE_ID_BYTES)
    else:
        assert isinstance(uid, bytes) and len(uid) == _lib.KVP_NCCL_UNIQUE_ID_BYTES
    # NCCL needs a CUDA context: a CPU one is refused (or NCCL is missing altogether).
    with pytest.raises((kvplug.InvalidArgumentError, kvplug.NotSupportedError)):
        kvplug.Communicator(ctx, num_ranks=1, max_num_tokens=4, num_heads=HQ, head_size=HEAD, kind="nccl",
                            nccl_unique_id=uid)


def test_missing_optional_entry_points_raise_not_supported() -> None:
    fake = _lib._missing_entry_point("kvp_comm_create", "/nowhere/libkvplug.so")
    with pytest.raises(kvplug.NotSupportedError, match="no entry point kvp_comm_create.*ABI 0.4"):
        fake(None, None, None)
    api = _lib.api()
    assert all(api.has(n) for n in _lib.ENTRY_POINTS if n not in _lib.OPTIONAL_ENTRY_POINTS)
    assert not api.has("kvp_no_such_function")


# ------------------------------------------------------------------------------------------------
# Star keys in the prefix cache
# ------------------------------------------------------------------------------------------------


def _doc(block1_first: int) -> List[int]:
    """29 tokens: Star blocks of 8 ([0,8) the anchor block, [8,16), [16,24)), then 5 query tokens."""
    return (list(range(100, 108)) + list(range(block1_first, block1_first + 8)) + list(range(300, 308))
            + list(range(900, 905)))


def test_allocate_star_hits_anchor_and_a_later_block_when_a_middle_block_differs() -> None:
    _needs("kvp_block_manager_allocate_star")
    bm = kvplug.BlockManager(block_size=4, num_device_blocks=32, enable_prefix_caching=True)
    layout = dict(context_len=24, context_block_size=8, anchor_size=4)
    cached, n = bm.allocate_star(1, _doc(200), **layout)
    assert cached.dtype == np.uint8 and cached.tolist() == [0] * 8 and n == 0
    bm.mark_computed(1, 29)
    cached, n = bm.allocate_star(2, _doc(250), **layout)  # block 1 differs
    assert cached.tolist() == [1, 1, 0, 0, 1, 1, 0, 0] and n == 16
    assert bm.stats().prefix_hit_blocks == 4
    t1, t2 = bm.block_table(1), bm.block_table(2)
    assert [t1[i] == t2[i] for i in range(8)] == [True, True, False, False, True, True, False, False]
    # The chained key of a plain allocate never hits Star pages.
    assert bm.allocate(3, _doc(200)) == 0
    # extra_key separates caches (another adapter, another model).
    cached, n = bm.allocate_star(4, _doc(200), extra_key=7, **layout)
    assert n == 0 and not cached.any()
    # The same document again: every context block and the query's full page hit; never the last token.
    cached, n = bm.allocate_star(5, _doc(200), **layout)
    assert cached.tolist() == [1, 1, 1, 1, 1, 1, 1, 0] and n == 28
    for s in (1, 2, 3, 4, 5):
        bm.free(s)
    # Without prefix caching the ids may be left out.
    plain = kvplug.BlockManager(block_size=4, num_device_blocks=8)
    cached, n = plain.allocate_star(1, None, num_tokens=10, context_len=8, context_block_size=8, anchor_size=4)
    assert cached.tolist() == [0, 0, 0] and n == 0 and plain.num_tokens(1) == 10


def test_allocate_star_errors() -> None:
    _needs("kvp_block_manager_allocate_star")
    bm = kvplug.BlockManager(block_size=4, num_device_blocks=32, enable_prefix_caching=True)
    doc = _doc(200)
    with pytest.raises(kvplug.InvalidArgumentError, match="context_block_size=6.*block_size=4"):
        bm.allocate_star(1, doc, context_len=24, context_block_size=6, anchor_size=4)
    with pytest.raises(kvplug.InvalidArgumentError, match="context_len=30.*num_tokens=29"):
        bm.allocate_star(1, doc, context_len=30, context_block_size=8, anchor_size=4)
    with pytest.raises(kvplug.InvalidArgumentError, match="anchor_size=9"):
        bm.allocate_star(1, doc, context_len=24, context_block_size=8, anchor_size=9)
    with pytest.raises(kvplug.InvalidArgumentError, match="token_ids is NULL"):
        bm.allocate_star(1, None, num_tokens=29, context_len=24, context_block_size=8, anchor_size=4)
    with pytest.raises(kvplug.InvalidArgumentError, match="context_len=.*out of range"):
        bm.allocate_star(1, doc, context_len=1 << 70, context_block_size=8, anchor_size=4)
    small = kvplug.BlockManager(block_size=4, num_device_blocks=4, enable_prefix_caching=True)
    with pytest.raises(kvplug.NoFreeBlocksError):
        small.allocate_star(1, doc, context_len=24, context_block_size=8, anchor_size=4)
    assert small.stats().num_sequences == 0
    bm.allocate_star(1, doc, context_len=24, context_block_size=8, anchor_size=4)
    with pytest.raises(kvplug.AlreadyExistsError, match="seq 1"):
        bm.allocate_star(1, doc, context_len=24, context_block_size=8, anchor_size=4)
    bm.close()
    with pytest.raises(kvplug.FailedPreconditionError, match="closed"):
        bm.allocate_star(2, doc, context_len=24, context_block_size=8, anchor_size=4)
