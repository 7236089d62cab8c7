"""The "kv_shift" backend (KV shifting attention, arXiv 2411.19574) through the binding, against
float64 NumPy: K^_i = a1[h] K_i + a2[h] K_{i-1}, V^_i = b1[h] V_i + b2[h] V_{i-1} per KV head
(K_{-1} = V_{-1} = 0), then optionally RoPE on K^_i at position i (NeoX or GPT-J, a rotary_dim
below the head size), stored in the pages and attended causally. Also: the per-sequence state (the
raw K/V of the last token) across steps, so that prefill(n) then decode equals prefill(n + m); the
refill after a prefix-cache hit (the last cached token re-run with slot -1: state updated, pages
untouched); a1 = 1, a2 = 0 equals dense; bad configs and caches without state slots raise."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import pytest

import kvplug
from kvplug.reference import naive_attention

HEAD, BLOCK = 64, 16


def _alphas(rng: np.random.Generator, hkv: int) -> Tuple[np.ndarray, np.ndarray]:
    """[hkv, 2] (current, previous) weights of any sign, far from (1, 0): trained values are."""
    return (rng.uniform(-1.5, 1.5, size=(hkv, 2)).astype(np.float32),
            rng.uniform(-1.5, 1.5, size=(hkv, 2)).astype(np.float32))


def _rope(x: np.ndarray, theta: float, rotary_dim: int, style: str) -> np.ndarray:
    """x [n, heads, d] (position i = row i) rotated in float64 over its leading rotary_dim dims."""
    out = x.astype(np.float64).copy()
    half = rotary_dim // 2
    pos = np.arange(x.shape[0], dtype=np.float64)[:, None]
    angle = pos * theta ** (-2.0 * np.arange(half) / rotary_dim)[None, :]  # [n, half]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    i0 = 2 * np.arange(half) if style == "gptj" else np.arange(half)
    i1 = i0 + 1 if style == "gptj" else i0 + half
    x0, x1 = out[..., i0].copy(), out[..., i1].copy()
    out[..., i0] = x0 * cos - x1 * sin
    out[..., i1] = x1 * cos + x0 * sin
    return out


def shift_reference(k: np.ndarray, v: np.ndarray, ak: np.ndarray, av: np.ndarray, theta: float = 0.0,
                    rotary_dim: int = 0, style: str = "neox") -> Tuple[np.ndarray, np.ndarray]:
    """(K^, V^) [n, hkv, d] in float64 of one whole sequence's raw k, v."""
    def mix(x: np.ndarray, a: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        prev = np.concatenate([np.zeros_like(x[:1]), x[:-1]])
        return a[None, :, 0, None].astype(np.float64) * x + a[None, :, 1, None].astype(np.float64) * prev

    kk, vv = mix(k, ak), mix(v, av)
    if theta > 0:
        kk = _rope(kk, theta, rotary_dim or k.shape[-1], style)
    return kk, vv


class Seqs:
    """Sequences of given lengths in scattered blocks of a 2-layer cache with state slots; their raw
    K/V and queries; the slot mapping of any range of positions."""

    def __init__(self, ctx: kvplug.Context, lens: List[int], hq: int, hkv: int, seed: int,
                 num_state_slots: int = 4, state_bytes: Optional[int] = None) -> None:
        rng = np.random.default_rng(seed)
        self.hq, self.hkv, self.lens = hq, hkv, lens
        nblk = [-(-n // BLOCK) for n in lens]
        self.num_blocks = sum(nblk) + 2
        ids = rng.permutation(self.num_blocks).astype(np.int32)
        self.table = np.full((len(lens), max(nblk)), -1, np.int32)
        at = 0
        for b, m in enumerate(nblk):
            self.table[b, :m] = ids[at: at + m]
            at += m
        state = 2 * hkv * HEAD * 4 if state_bytes is None else state_bytes
        self.cache = kvplug.KvCache(ctx, num_layers=2, num_blocks=self.num_blocks, block_size=BLOCK,
                                    num_kv_heads=hkv, head_size=HEAD, num_state_slots=num_state_slots,
                                    state_bytes_per_layer=state)
        self.k = [rng.standard_normal((n, hkv, HEAD)).astype(np.float32) for n in lens]
        self.v = [rng.standard_normal((n, hkv, HEAD)).astype(np.float32) for n in lens]
        self.q = [rng.standard_normal((n, hq, HEAD)).astype(np.float32) for n in lens]
        self.state_slots = np.array([num_state_slots - 1 - b for b in range(len(lens))], np.int32)  # not 0, 1, ...

    def slots(self, b: int, lo: int, hi: int) -> np.ndarray:
        p = np.arange(lo, hi)
        return (self.table[b, p // BLOCK].astype(np.int64) * BLOCK + p % BLOCK)

    def step(self, ranges: List[Tuple[int, int]], refill: Tuple[int, ...] = ()) -> Tuple[dict, np.ndarray, ...]:
        """The batch of one step computing positions [lo, hi) of each sequence (lo == hi: none); a
        sequence in ``refill`` also re-runs position lo - 1 first, with slot -1. Returns the plan
        arguments and the step's q, k, v."""
        qsl, lens, slots, qs, ks, vs = [0], [], [], [], [], []
        for b, (lo, hi) in enumerate(ranges):
            first = lo - 1 if b in refill else lo
            qsl.append(qsl[-1] + hi - first)
            lens.append(hi)
            s = self.slots(b, lo, hi)
            slots.append(np.concatenate([[-1], s]) if b in refill else s)
            qs.append(self.q[b][first:hi])
            ks.append(self.k[b][first:hi])
            vs.append(self.v[b][first:hi])
        args = dict(block_size=BLOCK, block_table=self.table, slot_mapping=np.concatenate(slots).astype(np.int64),
                    state_slots=self.state_slots)
        return (np.array(qsl, np.int32), np.array(lens, np.int32), args,
                np.concatenate(qs), np.concatenate(ks), np.concatenate(vs))

    def pages(self, layer: int, b: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """The stored K^, V^ [n, hkv, d] of sequence b's first n positions."""
        view = self.cache.layer_view(layer)  # kv_first [2, blocks, block_size, hkv, d]
        p = np.arange(n)
        blk, off = self.table[b, p // BLOCK], p % BLOCK
        return view[0, blk, off].copy(), view[1, blk, off].copy()

    def state(self, layer: int, b: int) -> np.ndarray:
        """The state slot of sequence b: fp32 [2, hkv, d] (raw K, V of its last written token)."""
        raw = self.cache.state(layer, int(self.state_slots[b]))
        return raw[: 2 * self.hkv * HEAD * 4].view(np.float32).reshape(2, self.hkv, HEAD)


def _shift(ctx: kvplug.Context, hq: int, hkv: int, ak: np.ndarray, av: np.ndarray, **rope: object) -> kvplug.Attention:
    return kvplug.Attention(ctx, "kv_shift", num_q_heads=hq, num_kv_heads=hkv, head_size=HEAD,
                            config=kvplug.kv_shift_config(ak, av, **rope))


def _run(attn: kvplug.Attention, plan: kvplug.Plan, seqs: Seqs, layer: int, qsl: np.ndarray, lens: np.ndarray,
         args: dict, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    plan.update(qsl, lens, **args)
    attn.write_kv(plan, seqs.cache, layer, k, v)
    out = np.full_like(q, np.nan)
    attn.run(plan, seqs.cache, layer, q, out)
    return out


def _plan(ctx: kvplug.Context, seqs: Seqs) -> kvplug.Plan:
    return kvplug.Plan(ctx, max_num_seqs=len(seqs.lens), max_num_tokens=sum(seqs.lens) + len(seqs.lens),
                       max_num_blocks=seqs.num_blocks)


# ------------------------------------------------------------------------------------------------


def test_kv_shift_is_registered_with_state() -> None:
    assert "kv_shift" in kvplug.backends()
    info = kvplug.backend_device_info("kv_shift", "cpu")
    assert info.available and info.needs_state_slots and info.supports_lse and HEAD in info.head_sizes
    assert kvplug.backend_info("kv_shift").needs_state_slots
    cfg = kvplug.kv_shift_config([[1.0, 0.5], [0.25, -2.0]], [1, 0, 0, 1], rope_theta=10000, rotary_dim=32,
                                 rope_style="GPTJ")
    assert cfg == {"backend_config_type": "KvShiftConfig",
                   "backend_config": {"alpha_k": [1.0, 0.5, 0.25, -2.0], "alpha_v": [1.0, 0.0, 0.0, 1.0],
                                      "rope_theta": 10000.0, "rotary_dim": 32, "rope_style": "GPTJ"}}
    kvplug.check_config("kv_shift", cfg)
    kvplug.check_config("kv_shift", kvplug.kv_shift_config(np.ones((3, 2)), np.ones(6)))


@pytest.mark.parametrize("hq,hkv,rope", [
    (4, 4, {}),
    (8, 2, {"rope_theta": 10000.0}),                                        # NeoX over the whole head
    (8, 1, {"rope_theta": 500.0, "rotary_dim": 32, "rope_style": "gptj"}),  # GPT-J pairs, half the head
    (6, 2, {"rope_theta": 10000.0, "rotary_dim": 16, "rope_style": "neox"}),
])
def test_mix_and_rope_in_one_prefill_match_numpy(ctx: kvplug.Context, hq: int, hkv: int, rope: dict) -> None:
    """A packed batch of whole sequences (1, 17, 33, 48 tokens): the stored K^/V^, the attention over
    them, and each sequence's state (its last token's raw K/V). The shift never crosses sequences."""
    rng = np.random.default_rng(hq * 10 + hkv)
    ak, av = _alphas(rng, hkv)
    seqs = Seqs(ctx, [1, 17, 33, 48], hq, hkv, seed=hq + hkv)
    attn = _shift(ctx, hq, hkv, ak, av, **rope)
    assert attn.state_bytes == 2 * hkv * HEAD * 4
    style = str(rope.get("rope_style", "neox"))
    with _plan(ctx, seqs) as plan:
        qsl, lens, args, q, k, v = seqs.step([(0, n) for n in seqs.lens])
        out = _run(attn, plan, seqs, 1, qsl, lens, args, q, k, v)
    for b, n in enumerate(seqs.lens):
        kk, vv = shift_reference(seqs.k[b], seqs.v[b], ak, av, float(rope.get("rope_theta", 0.0)),
                                 int(rope.get("rotary_dim", 0)), style)
        pk, pv = seqs.pages(1, b, n)
        assert np.abs(pk - kk).max() <= 1e-5 and np.abs(pv - vv).max() <= 1e-5, b
        ref, _ = naive_attention(seqs.q[b], kk, vv, attn.sm_scale)
        assert np.abs(out[qsl[b]: qsl[b + 1]] - ref).max() <= 1e-5, b
        st = seqs.state(1, b)
        assert np.array_equal(st[0], seqs.k[b][-1]) and np.array_equal(st[1], seqs.v[b][-1])
    assert not seqs.cache.layer_view(0).any()  # only layer 1 was written


def test_state_carries_across_steps_bitwise(ctx: kvplug.Context) -> None:
    """Chunked prefill off block boundaries, then decodes, mixed in packed batches, equals one whole
    prefill of the same tokens bitwise (pages and outputs), and the NumPy reference."""
    hq, hkv = 8, 2
    rng = np.random.default_rng(3)
    ak, av = _alphas(rng, hkv)
    rope = {"rope_theta": 10000.0}
    lens = [40, 23]
    whole = Seqs(ctx, lens, hq, hkv, seed=9)
    steps = Seqs(ctx, lens, hq, hkv, seed=9)
    attn = _shift(ctx, hq, hkv, ak, av, **rope)
    with _plan(ctx, whole) as plan:
        qsl, sl, args, q, k, v = whole.step([(0, n) for n in lens])
        want = _run(attn, plan, whole, 0, qsl, sl, args, q, k, v)
        got: List[List[np.ndarray]] = [[], []]
        # Sequence 0: 13 + 20 + 7 decodes; sequence 1: 5 + 11 + 7 decodes, alongside.
        bounds = [[0, 13, 33] + list(range(34, 41)), [0, 5, 16] + list(range(17, 24))]
        for i in range(len(bounds[0]) - 1):
            ranges = [(bounds[b][i], bounds[b][i + 1]) for b in range(2)]
            qsl, sl, args, q, k, v = steps.step(ranges)
            out = _run(attn, plan, steps, 0, qsl, sl, args, q, k, v)
            for b in range(2):
                got[b].append(out[qsl[b]: qsl[b + 1]])
    for b, n in enumerate(lens):
        assert np.array_equal(np.concatenate(got[b]), want[qsl_whole(lens)[b]: qsl_whole(lens)[b + 1]]), b
        for x, y in zip(whole.pages(0, b, n), steps.pages(0, b, n)):
            assert np.array_equal(x, y), b
        kk, vv = shift_reference(whole.k[b], whole.v[b], ak, av, 10000.0)
        ref, _ = naive_attention(whole.q[b], kk, vv, attn.sm_scale)
        assert np.abs(np.concatenate(got[b]) - ref).max() <= 1e-5
        assert np.array_equal(steps.state(0, b)[0], steps.k[b][-1])


def qsl_whole(lens: List[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens)])


@pytest.mark.parametrize("alone", [True, False])
def test_prefix_hit_refill_with_slot_minus_one(ctx: kvplug.Context, alone: bool) -> None:
    """A prefix-cache hit of c = 32 tokens: the cache holds K^ only, the new sequence's state slot
    holds garbage. Re-running token c - 1 with slot -1 (alone: q_len 1, seq_len c; or as the first
    token of the next chunk: q_len n + 1, seq_len c + n) refills the state without touching its
    page; what follows equals the reference. Without the refill, the first new token mixes garbage."""
    hq, hkv, c, n = 4, 2, 32, 40
    rng = np.random.default_rng(21)
    ak, av = _alphas(rng, hkv)
    attn = _shift(ctx, hq, hkv, ak, av, rope_theta=10000.0)
    seqs = Seqs(ctx, [n], hq, hkv, seed=21)
    kk, vv = shift_reference(seqs.k[0], seqs.v[0], ak, av, 10000.0)
    ref, _ = naive_attention(seqs.q[0], kk, vv, attn.sm_scale)
    with _plan(ctx, seqs) as plan:
        qsl, sl, args, q, k, v = seqs.step([(0, c)])
        _run(attn, plan, seqs, 0, qsl, sl, args, q, k, v)  # the cached prefix, by an earlier sequence
        before = [x.copy() for x in seqs.pages(0, 0, c)]
        seqs.cache.state(0, int(seqs.state_slots[0]))[:] = 0x7F  # another sequence's slot: garbage
        if alone:
            qsl, sl, args, q, k, v = seqs.step([(c, c)], refill=(0,))
            assert (qsl.tolist(), sl.tolist(), args["slot_mapping"].tolist()) == ([0, 1], [c], [-1])
            _run(attn, plan, seqs, 0, qsl, sl, args, q, k, v)
            qsl, sl, args, q, k, v = seqs.step([(c, n)])
            out = _run(attn, plan, seqs, 0, qsl, sl, args, q, k, v)
        else:
            qsl, sl, args, q, k, v = seqs.step([(c, n)], refill=(0,))
            assert qsl.tolist() == [0, n - c + 1] and args["slot_mapping"][0] == -1
            out = _run(attn, plan, seqs, 0, qsl, sl, args, q, k, v)[1:]  # the refill row is discarded
        after = seqs.pages(0, 0, n)
    for x, y in zip(before, after):
        assert np.array_equal(x, y[:c])  # slot -1: token c - 1's page untouched
    assert np.abs(after[0] - kk).max() <= 1e-5 and np.abs(after[1] - vv).max() <= 1e-5
    assert np.abs(out - ref[c:]).max() <= 1e-5
    # Without the refill the state is stale: token c mixes whatever the slot held.
    stale = Seqs(ctx, [n], hq, hkv, seed=21)
    with _plan(ctx, stale) as plan:
        qsl, sl, args, q, k, v = stale.step([(0, c)])
        _run(attn, plan, stale, 0, qsl, sl, args, q, k, v)
        stale.cache.state(0, int(stale.state_slots[0]))[:] = 0
        qsl, sl, args, q, k, v = stale.step([(c, n)])
        _run(attn, plan, stale, 0, qsl, sl, args, q, k, v)
    assert np.abs(stale.pages(0, 0, c + 1)[0][c] - kk[c]).max() > 1e-3


def test_unit_weights_equal_dense(ctx: kvplug.Context) -> None:
    hq, hkv = 8, 2
    lens = [17, 33, 1]
    ones = np.tile(np.array([[1.0, 0.0]], np.float32), (hkv, 1))
    seqs = Seqs(ctx, lens, hq, hkv, seed=5)
    dense_seqs = Seqs(ctx, lens, hq, hkv, seed=5)
    shift = _shift(ctx, hq, hkv, ones, ones)
    dense = kvplug.Attention(ctx, "dense", num_q_heads=hq, num_kv_heads=hkv, head_size=HEAD)
    with _plan(ctx, seqs) as plan:
        qsl, sl, args, q, k, v = seqs.step([(0, n) for n in lens])
        a = _run(shift, plan, seqs, 1, qsl, sl, args, q, k, v)
        b = _run(dense, plan, dense_seqs, 1, qsl, sl, args, q, k, v)
    assert np.array_equal(a, b)
    assert np.array_equal(seqs.cache.layer_view(1), dense_seqs.cache.layer_view(1))


def test_bad_configs_raise(ctx: kvplug.Context) -> None:
    ok = [1.0, 0.0, 1.0, 0.0]
    # What the library can check without the heads: at check_config and creation alike.
    for cfg, what in ((kvplug.kv_shift_config([1.0, float("nan"), 1.0, 0.0], ok), r"alpha_k\[1\]"),
                      (kvplug.kv_shift_config(ok, [1.0, 0.0, float("inf"), 0.0]), r"alpha_v\[2\]"),
                      (kvplug.kv_shift_config([1.0, 0.0, 1.0], ok), "2 per KV head"),
                      (kvplug.kv_shift_config(ok, ok, rope_theta=-1.0), "rope_theta"),
                      (kvplug.kv_shift_config(ok, ok, rope_theta=1e4, rotary_dim=7), "rotary_dim"),
                      ({"backend_config_type": "KvShiftConfig",
                        "backend_config": {"alpha_k": ok, "alpha_v": ok, "rope_style": "Rotate"}}, "rope_style|enum")):
        with pytest.raises(kvplug.InvalidConfigError, match=what):
            kvplug.check_config("kv_shift", cfg)
        with pytest.raises(kvplug.InvalidConfigError, match=what):
            kvplug.Attention(ctx, "kv_shift", num_q_heads=4, num_kv_heads=2, head_size=HEAD, config=cfg)
    # What needs the heads: at creation.
    for cfg, what in ((kvplug.kv_shift_config([1.0, 0.0] * 3, ok), "alpha_k has 6 values, expected num_kv_heads"),
                      (kvplug.kv_shift_config(ok, [1.0, 0.0]), "alpha_v has 2 values"),
                      (kvplug.kv_shift_config(ok, ok, rope_theta=1e4, rotary_dim=2 * HEAD), "rotary_dim=128"),
                      (None, "KvShiftConfig is required")):
        with pytest.raises(kvplug.InvalidArgumentError, match=what):
            kvplug.Attention(ctx, "kv_shift", num_q_heads=4, num_kv_heads=2, head_size=HEAD, config=cfg)
    with pytest.raises(kvplug.InvalidConfigError, match="holds a StarConfig but backend 'kv_shift' takes a KvShiftConfig"):
        kvplug.Attention(ctx, "kv_shift", num_q_heads=4, num_kv_heads=2, head_size=HEAD, config=kvplug.star_config(64))
    # The helper's own checks.
    with pytest.raises(kvplug.InvalidArgumentError, match="rope_style"):
        kvplug.kv_shift_config(ok, ok, rope_style="rotate_half")
    with pytest.raises(kvplug.InvalidArgumentError, match=r"\[num_kv_heads, 2\]"):
        kvplug.kv_shift_config(np.ones((2, 3)), ok)
    with pytest.raises(kvplug.InvalidArgumentError, match="rotary_dim"):
        kvplug.kv_shift_config(ok, ok, rotary_dim=1.5)  # type: ignore[arg-type]


def test_caches_without_state_slots_and_batches_without_state_raise(ctx: kvplug.Context) -> None:
    hq, hkv = 4, 2
    ones = [1.0, 0.5, 1.0, 0.5]
    attn = kvplug.Attention(ctx, "kv_shift", num_q_heads=hq, num_kv_heads=hkv, head_size=HEAD,
                            config=kvplug.kv_shift_config(ones, ones))
    need = attn.state_bytes

    def write(seqs: Seqs, **override: object) -> None:
        qsl, sl, args, q, k, v = seqs.step([(0, n) for n in seqs.lens])
        args.update(override)
        with _plan(ctx, seqs) as plan:
            plan.update(qsl, sl, **{a: x for a, x in args.items() if x is not None})
            attn.write_kv(plan, seqs.cache, 0, k, v)

    # A cache without state slots (named as such), or a batch without them (the write names
    # kvp_batch.state_slots).
    with pytest.raises(kvplug.FailedPreconditionError, match="num_state_slots=0"):
        write(Seqs(ctx, [9, 4], hq, hkv, seed=1, num_state_slots=0, state_bytes=0), state_slots=[0, 0])
    for slots in (0, 4):
        with pytest.raises(kvplug.FailedPreconditionError, match="keeps per-sequence state: set kvp_batch.state_slots"):
            write(Seqs(ctx, [9, 4], hq, hkv, seed=1, num_state_slots=slots, state_bytes=0 if slots == 0 else None),
                  state_slots=None)
    with pytest.raises(kvplug.FailedPreconditionError, match=f"state_bytes_per_layer={need - 4}"):
        write(Seqs(ctx, [9, 4], hq, hkv, seed=1, state_bytes=need - 4))
    with pytest.raises(kvplug.OutOfRangeError, match="state slot 4"):
        write(Seqs(ctx, [9, 4], hq, hkv, seed=1), state_slots=[4, 0])
    with pytest.raises(kvplug.InvalidArgumentError, match="state_slots"):  # the binding counts them
        write(Seqs(ctx, [9, 4], hq, hkv, seed=1), state_slots=[0])
    # Nothing was written by the refused calls; a good batch still works.
    good = Seqs(ctx, [9, 4], hq, hkv, seed=1)
    write(good)
    assert good.cache.layer_view(0).any()
