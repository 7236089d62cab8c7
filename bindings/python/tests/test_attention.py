"""Dense attention through the binding against the float64 NumPy reference, on the fixtures of the
C++ suite (tests/attention/dense_cpu_test.cc): the same ragged batch of (seq_len, q_len) pairs, GQA
ratios, head size, block size and layer, with scattered blocks, seeded; plus the plan and attention
error paths."""
from __future__ import annotations

import struct
from typing import List, Tuple

import numpy as np
import pytest

import kvplug
from kvplug.reference import naive_attention, round_to_bfloat16

# The C++ suite's RaggedMixedBatchFp32AllGqaRatios: prefill with cached prefixes, decode, odd
# lengths, block boundaries, a 100-token decode and a full 48-token prefill.
RAGGED: List[Tuple[int, int]] = [(1, 1), (17, 17), (33, 5), (16, 1), (100, 1), (48, 48)]
GQA = [(4, 4), (8, 2), (8, 1), (16, 2), (32, 4)]
HEAD, BLOCK, LAYER = 64, 16, 1


class Batch:
    """A ragged batch in a 2-layer cache: K/V written at scattered blocks (a seeded permutation of
    block ids, so tables are not contiguous), queries, and the reference's inputs."""

    def __init__(self, ctx: kvplug.Context, hq: int, hkv: int, seed: int, kv_dtype: str = "float32",
                 seqs: List[Tuple[int, int]] = RAGGED, q_dtype: type = np.float32) -> None:
        rng = np.random.default_rng(seed)
        self.hq, self.hkv, self.seqs = hq, hkv, seqs
        nblk = [-(-n // BLOCK) for n, _ in seqs]
        self.num_blocks = sum(nblk) + 3
        self.cache = kvplug.KvCache(ctx, num_layers=2, num_blocks=self.num_blocks, block_size=BLOCK,
                                    num_kv_heads=hkv, head_size=HEAD, dtype=kv_dtype)
        ids = rng.permutation(self.num_blocks).astype(np.int32)
        self.indptr = np.concatenate([[0], np.cumsum(nblk)]).astype(np.int32)
        self.indices = ids[: self.indptr[-1]]
        self.table = np.full((len(seqs), max(nblk) + 2), -1, np.int32)  # wider than needed, -1 padded
        self.qsl = np.concatenate([[0], np.cumsum([q for _, q in seqs])]).astype(np.int32)
        self.lens = np.array([n for n, _ in seqs], np.int32)
        self.k: List[np.ndarray] = []
        self.v: List[np.ndarray] = []
        for b, (n, _) in enumerate(seqs):
            row = self.indices[self.indptr[b]: self.indptr[b + 1]]
            self.table[b, : len(row)] = row
            k = rng.standard_normal((n, hkv, HEAD)).astype(np.float32)
            v = rng.standard_normal((n, hkv, HEAD)).astype(np.float32)
            slots = row[np.arange(n) // BLOCK].astype(np.int64) * BLOCK + np.arange(n) % BLOCK
            self.cache.write(LAYER, k, v, slots)
            if kv_dtype == "float16":
                k, v = k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
            elif kv_dtype == "bfloat16":
                k, v = round_to_bfloat16(k), round_to_bfloat16(v)
            self.k.append(k)
            self.v.append(v)
        self.q: np.ndarray = rng.standard_normal((int(self.qsl[-1]), hq, HEAD)).astype(q_dtype)

    def reference(self, sm_scale: float, window_left: int = -1, soft_cap: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
        outs, lses = [], []
        for b in range(len(self.seqs)):
            o, l_ = naive_attention(self.q[self.qsl[b]: self.qsl[b + 1]].astype(np.float64), self.k[b], self.v[b],
                                    sm_scale, window_left, soft_cap)
            outs.append(o)
            lses.append(l_)
        return np.concatenate(outs), np.concatenate(lses)


def _plan(ctx: kvplug.Context, batch: Batch) -> kvplug.Plan:
    return kvplug.Plan(ctx, max_num_seqs=len(batch.seqs), max_num_tokens=int(batch.qsl[-1]),
                       max_num_blocks=int(batch.indptr[-1]))


@pytest.mark.parametrize("hq,hkv", GQA)
def test_ragged_batch_fp32_all_gqa_ratios(ctx: kvplug.Context, hq: int, hkv: int) -> None:
    batch = Batch(ctx, hq, hkv, seed=7 + hq * hkv)  # the C++ test's seeds (its RNG differs: mt19937)
    attn = kvplug.Attention(ctx, "dense", num_q_heads=hq, num_kv_heads=hkv, head_size=HEAD)
    assert attn.sm_scale == pytest.approx(1 / np.sqrt(HEAD))
    ref, ref_lse = batch.reference(attn.sm_scale)
    with _plan(ctx, batch) as plan:
        for form in ("csr", "dense"):
            if form == "csr":  # FlashInfer's form, as the C++ test uses
                plan.update(batch.qsl, batch.lens, block_size=BLOCK, kv_indptr=batch.indptr, kv_indices=batch.indices)
            else:  # vLLM's form
                plan.update(batch.qsl, batch.lens, block_size=BLOCK, block_table=batch.table)
            assert (plan.num_seqs, plan.num_tokens) == (len(RAGGED), int(batch.qsl[-1]))
            out = np.full_like(batch.q, np.nan)
            lse = np.full(batch.q.shape[:2], np.nan, np.float32)
            assert attn.run(plan, batch.cache, LAYER, batch.q, out, lse) is out
            assert np.abs(out - ref).max() <= 1e-5, form
            assert np.abs(lse - ref_lse).max() <= 1e-5, form


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_half_caches_against_rounded_reference(ctx: kvplug.Context, kv_dtype: str) -> None:
    batch = Batch(ctx, 8, 2, seed=11, kv_dtype=kv_dtype)
    attn = kvplug.Attention(ctx, num_q_heads=8, num_kv_heads=2, head_size=HEAD, kv_dtype=kv_dtype)
    ref, _ = batch.reference(attn.sm_scale)
    with _plan(ctx, batch) as plan:
        plan.update(batch.qsl, batch.lens, block_size=BLOCK, block_table=batch.table)
        out = attn.run(plan, batch.cache, LAYER, batch.q, np.empty_like(batch.q))
    assert np.abs(out - ref).max() <= 1e-5  # the K/V rounding is in the reference


def test_float16_queries(ctx: kvplug.Context) -> None:
    batch = Batch(ctx, 8, 2, seed=12, q_dtype=np.float16)
    attn = kvplug.Attention(ctx, num_q_heads=8, num_kv_heads=2, head_size=HEAD)
    ref, _ = batch.reference(attn.sm_scale)
    with _plan(ctx, batch) as plan:
        plan.update(batch.qsl, batch.lens, block_size=BLOCK, block_table=batch.table)
        out = attn.run(plan, batch.cache, LAYER, batch.q, np.empty_like(batch.q))
    assert out.dtype == np.float16
    err = np.abs(out.astype(np.float64) - ref).max()
    assert err <= 2e-3  # the C++ suite's tolerance for float16 outputs
    assert err > 0  # really float16: the output is rounded


def test_write_kv_through_the_plan_matches_cache_write(ctx: kvplug.Context) -> None:
    rng = np.random.default_rng(13)
    seqs = [(20, 20), (9, 9)]  # a prefill step: the step's K/V are the whole sequences
    attn = kvplug.Attention(ctx, num_q_heads=4, num_kv_heads=2, head_size=HEAD)
    # State slots travel in the plan (dense keeps no state, but the cache must have the slots).
    cache = kvplug.KvCache(ctx, num_layers=2, num_blocks=4, block_size=BLOCK, num_kv_heads=2, head_size=HEAD,
                           num_state_slots=2)
    table = np.array([[2, 0], [3, -1]], np.int32)
    slots = np.concatenate([table[b, np.arange(n) // BLOCK] * BLOCK + np.arange(n) % BLOCK
                            for b, (n, _) in enumerate(seqs)]).astype(np.int64)
    k = rng.standard_normal((29, 2, HEAD)).astype(np.float32)
    v = rng.standard_normal((29, 2, HEAD)).astype(np.float32)
    q = rng.standard_normal((29, 4, HEAD)).astype(np.float32)
    plan = kvplug.Plan(ctx, max_num_seqs=2, max_num_tokens=29, max_num_blocks=3)
    plan.update([0, 20, 29], [20, 9], block_size=BLOCK, block_table=table, slot_mapping=slots, state_slots=[0, 1])
    attn.write_kv(plan, cache, 0, k, v)
    other = kvplug.KvCache(ctx, num_layers=2, num_blocks=4, block_size=BLOCK, num_kv_heads=2, head_size=HEAD)
    other.write(0, k, v, slots)
    assert np.array_equal(cache.layer_view(0), other.layer_view(0)) and cache.layer_view(0).any()
    out = attn.run(plan, cache, 0, q, np.empty_like(q))
    ref = np.concatenate([naive_attention(q[:20], k[:20], v[:20], attn.sm_scale)[0],
                          naive_attention(q[20:], k[20:], v[20:], attn.sm_scale)[0]])
    assert np.abs(out - ref).max() <= 1e-5
    plan.update([0, 20, 29], [20, 9], block_size=BLOCK, block_table=table)  # no slot mapping this time
    with pytest.raises(kvplug.FailedPreconditionError, match="slot_mapping"):
        attn.write_kv(plan, cache, 0, k, v)


def _dense_config_binary(window_left: int, soft_cap: float) -> bytes:
    """A FlatBuffers ``kvplug.fb.AttentionConfig`` holding a DenseConfig, built by hand (48 bytes) so
    the test needs no flatbuffers package: root offset, "KVPC", then vtable + table for each."""
    b = bytearray()
    b += struct.pack("<I4s", 16, b"KVPC")                  # 0: root table at 16; file identifier
    b += struct.pack("<4H", 8, 12, 8, 4)                  # 8: vtable: sizes; type at +8, config at +4
    b += struct.pack("<iIB3x", 16 - 8, 36 - 20, 1)        # 16: table: vtable back 8; offset to 36; type 1 = DenseConfig
    b += struct.pack("<4H", 8, 12, 4, 8)                  # 28: DenseConfig vtable: window_left at +4, cap at +8
    b += struct.pack("<iif", 36 - 28, window_left, soft_cap)  # 36: DenseConfig table
    return bytes(b)


def test_configs_json_and_binary_change_the_result(ctx: kvplug.Context) -> None:
    batch = Batch(ctx, 4, 2, seed=14, seqs=[(40, 40), (70, 3)])
    kw = dict(num_q_heads=4, num_kv_heads=2, head_size=HEAD)
    json_cfg = {"backend_config_type": "DenseConfig", "backend_config": {"window_left": 8, "logits_soft_cap": 2.5}}
    binary_cfg = _dense_config_binary(8, 2.5)
    kvplug.check_config("dense", json_cfg)
    kvplug.check_config("dense", binary_cfg)
    kvplug.check_config("dense", None)
    results = {}
    with _plan(ctx, batch) as plan:
        plan.update(batch.qsl, batch.lens, block_size=BLOCK, kv_indptr=batch.indptr, kv_indices=batch.indices)
        for name, cfg in [("none", None), ("json", json_cfg), ("text", '{"backend_config_type": "DenseConfig", '
                          '"backend_config": {"window_left": 8, "logits_soft_cap": 2.5}}'), ("binary", binary_cfg)]:
            with kvplug.Attention(ctx, "dense", config=cfg, **kw) as attn:
                results[name] = attn.run(plan, batch.cache, LAYER, batch.q, np.empty_like(batch.q))
    scale = 1 / np.sqrt(HEAD)
    assert np.abs(results["none"] - batch.reference(scale)[0]).max() <= 1e-5
    windowed = batch.reference(scale, window_left=8, soft_cap=2.5)[0]
    for name in ("json", "text", "binary"):
        assert np.abs(results[name] - windowed).max() <= 1e-5, name
    assert np.abs(results["none"] - windowed).max() > 1e-2  # the config really changed something


@pytest.mark.parametrize("config,match", [
    ({"backend_config_type": "DenseConfig", "backend_config": {"window_size": 8}}, "schema"),   # wrong field
    ({"backend_config_type": "DenseConfig", "backend_config": {"window_left": "wide"}}, "schema"),  # wrong type
    ({"backend_config_type": "StarConfig", "backend_config": {}}, "StarConfig"),  # another backend's
    ({"backend_config_type": "DenseConfig", "backend_config": {"logits_soft_cap": -1.0}}, "logits_soft_cap"),
    ("{not json", "schema"),
    (b"KVPC but not a flatbuffer", "identifier"),
    (_dense_config_binary(8, 2.5)[:40], "verification"),  # truncated: the table runs past the end
])
def test_bad_configs(ctx: kvplug.Context, config: object, match: str) -> None:
    with pytest.raises(kvplug.InvalidConfigError, match=match):
        kvplug.check_config("dense", config)  # type: ignore[arg-type]
    with pytest.raises(kvplug.InvalidConfigError, match=match):
        kvplug.Attention(ctx, "dense", num_q_heads=4, num_kv_heads=2, head_size=HEAD, config=config)  # type: ignore[arg-type]


def test_attention_create_errors(ctx: kvplug.Context) -> None:
    with pytest.raises(kvplug.NotFoundError):
        kvplug.Attention(ctx, "flash", num_q_heads=4, num_kv_heads=2, head_size=HEAD)
    with pytest.raises(kvplug.NotFoundError):
        kvplug.check_config("flash", None)
    with pytest.raises(kvplug.NotSupportedError, match="head_size=48"):
        kvplug.Attention(ctx, num_q_heads=4, num_kv_heads=2, head_size=48)
    with pytest.raises(kvplug.InvalidArgumentError, match="multiple"):
        kvplug.Attention(ctx, num_q_heads=6, num_kv_heads=4, head_size=HEAD)
    with pytest.raises(kvplug.InvalidArgumentError, match="sm_scale"):
        kvplug.Attention(ctx, num_q_heads=4, num_kv_heads=2, head_size=HEAD, sm_scale=float("nan"))
    with pytest.raises(TypeError, match="config"):
        kvplug.Attention(ctx, num_q_heads=4, num_kv_heads=2, head_size=HEAD, config=3)  # type: ignore[arg-type]
    info = kvplug.backend_info("dense")
    assert HEAD in info.head_sizes and 48 not in info.head_sizes and "float32" in info.dtypes
    assert info.name == "dense" and info.supports_lse and not info.needs_state_slots
    assert 1 in info.device_types  # kDLCPU
    assert "dense" in kvplug.backends()


def test_run_errors(ctx: kvplug.Context) -> None:
    batch = Batch(ctx, 4, 2, seed=15, seqs=[(5, 2), (3, 3)])
    attn = kvplug.Attention(ctx, num_q_heads=4, num_kv_heads=2, head_size=HEAD)
    plan = _plan(ctx, batch)
    plan.update(batch.qsl, batch.lens, block_size=BLOCK, block_table=batch.table)
    q = batch.q
    out = np.zeros_like(q)
    with pytest.raises(kvplug.InvalidArgumentError, match="dtype"):
        attn.run(plan, batch.cache, LAYER, q, out.astype(np.float16))  # out dtype differs from query
    with pytest.raises(kvplug.InvalidArgumentError, match="dtype"):
        attn.run(plan, batch.cache, LAYER, q.astype(np.float64), out)
    with pytest.raises(kvplug.InvalidArgumentError, match="query"):
        attn.run(plan, batch.cache, LAYER, q[:3], out)  # 3 tokens for a 5-token plan
    with pytest.raises(kvplug.InvalidArgumentError, match="lse"):
        attn.run(plan, batch.cache, LAYER, q, out, np.zeros(q.shape[:2], np.float16))
    with pytest.raises(kvplug.InvalidArgumentError, match="query is NULL"):
        attn.run(plan, batch.cache, LAYER, None, out)
    with pytest.raises(kvplug.InvalidArgumentError, match="out is NULL"):
        attn.run(plan, batch.cache, LAYER, q, None)
    frozen = np.zeros_like(q)
    frozen.flags.writeable = False
    with pytest.raises(kvplug.InvalidArgumentError, match="read-only"):
        attn.run(plan, batch.cache, LAYER, q, frozen)
    with pytest.raises(kvplug.OutOfRangeError):
        attn.run(plan, batch.cache, 2, q, out)
    half = kvplug.Attention(ctx, num_q_heads=4, num_kv_heads=2, head_size=HEAD, kv_dtype="float16")
    with pytest.raises(kvplug.InvalidArgumentError, match="dtype"):
        half.run(plan, batch.cache, LAYER, q, out)  # a float16 backend over a float32 cache
    assert not out.any()  # nothing was written by the failed calls
    readonly_q = q.copy()
    readonly_q.flags.writeable = False  # inputs may be read-only (exported as DLPack 1.0 read-only)
    attn.run(plan, batch.cache, LAYER, readonly_q, out)
    assert out.any()


def test_plan_update_errors(ctx: kvplug.Context) -> None:
    plan = kvplug.Plan(ctx, max_num_seqs=2, max_num_tokens=8, max_num_blocks=4)
    table = np.array([[0, 1], [2, -1]], np.int32)
    plan.update([0, 4, 5], [20, 9], block_size=BLOCK, block_table=table)
    assert (plan.num_seqs, plan.num_tokens) == (2, 5)
    cases = [
        (kvplug.InvalidArgumentError, "needs 3", dict(query_start_loc=[0, 4], seq_lens=[20, 9], block_table=table)),
        (kvplug.InvalidArgumentError, "rows", dict(query_start_loc=[0, 4], seq_lens=[20], block_table=table)),
        (kvplug.InvalidArgumentError, "not both",
         dict(query_start_loc=[0, 4, 5], seq_lens=[20, 9], block_table=table, kv_indptr=[0, 2, 3], kv_indices=[0, 1, 2])),
        (kvplug.InvalidArgumentError, "no block table", dict(query_start_loc=[0, 4, 5], seq_lens=[20, 9])),
        (kvplug.InvalidArgumentError, "kv_indices has 2",
         dict(query_start_loc=[0, 4, 5], seq_lens=[20, 9], kv_indptr=[0, 2, 3], kv_indices=[0, 1])),
        (kvplug.InvalidArgumentError, "slot_mapping has 4",
         dict(query_start_loc=[0, 4, 5], seq_lens=[20, 9], block_table=table, slot_mapping=[0, 1, 2, 3])),
        (kvplug.InvalidArgumentError, "state_slots",
         dict(query_start_loc=[0, 4, 5], seq_lens=[20, 9], block_table=table, state_slots=[0])),
        (kvplug.InvalidArgumentError, "integer", dict(query_start_loc=[0.0, 4.5, 5.0], seq_lens=[20, 9], block_table=table)),
        (kvplug.InvalidArgumentError, "dimension", dict(query_start_loc=[0, 4, 5], seq_lens=[20, 9], block_table=[0, 1, 2])),
        # Checked by the library:
        (kvplug.InvalidArgumentError, "non-decreasing", dict(query_start_loc=[0, 4, 3], seq_lens=[20, 9], block_table=table)),
        (kvplug.InvalidArgumentError, "shorter", dict(query_start_loc=[0, 4, 5], seq_lens=[3, 9], block_table=table)),
        (kvplug.InvalidArgumentError, "block_table_stride", dict(query_start_loc=[0, 4, 5], seq_lens=[40, 9], block_table=table)),
        (kvplug.InvalidArgumentError, "id -1", dict(query_start_loc=[0, 4, 5], seq_lens=[20, 17], block_table=table)),
        (kvplug.OutOfRangeError, "max_num_tokens", dict(query_start_loc=[0, 4, 9], seq_lens=[20, 9], block_table=table)),
        (kvplug.OutOfRangeError, "max_num_seqs",
         dict(query_start_loc=[0, 1, 2, 3], seq_lens=[1, 1, 1], block_table=np.zeros((3, 1), np.int32))),
        (kvplug.InvalidArgumentError, "must be 0", dict(query_start_loc=[1, 4, 5], seq_lens=[20, 9], block_table=table)),
    ]
    for error, match, kwargs in cases:
        with pytest.raises(error, match=match):
            plan.update(block_size=BLOCK, **kwargs)  # type: ignore[arg-type]
        assert (plan.num_seqs, plan.num_tokens) == (0, 0)  # a failed update empties the plan
    with pytest.raises(kvplug.InvalidArgumentError, match="block_size"):
        plan.update([0, 4, 5], [20, 9], block_size=0, block_table=table)
    with pytest.raises(kvplug.InvalidArgumentError, match="max_num_seqs"):
        kvplug.Plan(ctx, max_num_seqs=0, max_num_tokens=8, max_num_blocks=4)


def test_a_failed_update_never_leaves_a_stale_plan(ctx: kvplug.Context) -> None:
    # Whether C or the binding finds the problem, the next run must not serve the previous batch.
    batch = Batch(ctx, 4, 2, seed=16, seqs=[(5, 2), (3, 3)])
    attn = kvplug.Attention(ctx, num_q_heads=4, num_kv_heads=2, head_size=HEAD)
    plan = _plan(ctx, batch)
    out = np.zeros_like(batch.q)
    for bad in (dict(seq_lens=batch.lens[:1]),             # found by the binding (lengths)
                dict(seq_lens=np.array([1, 3], np.int32))):  # found by the library (5 > 1 - 0 query tokens)
        plan.update(batch.qsl, batch.lens, block_size=BLOCK, block_table=batch.table)
        attn.run(plan, batch.cache, LAYER, batch.q, out)
        with pytest.raises(kvplug.InvalidArgumentError):
            plan.update(batch.qsl, block_size=BLOCK, block_table=batch.table[: len(bad["seq_lens"])], **bad)
        assert (plan.num_seqs, plan.num_tokens) == (0, 0)
        out[...] = np.nan
        with pytest.raises(kvplug.KvplugError):  # FailedPrecondition ("no batch") or a 0-token shape mismatch
            attn.run(plan, batch.cache, LAYER, batch.q, out)
        assert np.isnan(out).all()  # nothing computed from the stale batch
