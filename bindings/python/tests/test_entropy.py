"""The "entropy" backend (entropy-guided attention, arXiv 2501.03489) and the entropy summary output
(kvp_attention_outputs.entropy_summary, ABI 0.4) through the binding, against float64 NumPy with
the full probability matrix: a temperature per head and per absolute query position (positions
beyond the table's T use its last entry), per-row entropies, the per-head summary on entropy, dense
and star; t = 1 equals dense; bad temperature tables and bad summary tensors raise with messages."""
from __future__ import annotations

import ctypes
from typing import Any, List, Optional, Tuple

import numpy as np
import pytest

import kvplug
from kvplug import _lib

from test_attention import BLOCK, HEAD, LAYER, RAGGED, Batch, _plan


def _temperature_table(rng: np.random.Generator, hq: int, positions: int) -> np.ndarray:
    """[hq, T] temperatures in [0.3, 3]: low and high, so rows range from sharp to flat."""
    return np.exp(rng.uniform(np.log(0.3), np.log(3.0), size=(hq, positions))).astype(np.float32)


def _reference(batch: Batch, sm_scale: float, t: Optional[np.ndarray]
               ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(out [T, hq, d], lse [T, hq], entropy [T, hq], keys seen [T]) in float64: the causal softmax of
    q.k * sm_scale / t[h, min(p, T - 1)] over every visible key, probabilities in full."""
    group = batch.hq // batch.hkv
    outs, lses, ents, keys = [], [], [], []
    for b, (n, q_len) in enumerate(batch.seqs):
        q = batch.q[batch.qsl[b]: batch.qsl[b + 1]].astype(np.float64)
        k = np.repeat(batch.k[b].astype(np.float64), group, axis=1)
        v = np.repeat(batch.v[b].astype(np.float64), group, axis=1)
        pos = n - q_len + np.arange(q_len)
        scale = np.full((q_len, batch.hq), sm_scale)
        if t is not None:
            scale /= t[:, np.minimum(pos, t.shape[1] - 1)].T.astype(np.float64)  # [q_len, hq]
        logits = np.einsum("ihd,jhd->ihj", q, k) * scale[:, :, None]
        visible = np.arange(n)[None, :] <= pos[:, None]
        logits = np.where(visible[:, None, :], logits, -np.inf)
        m = logits.max(-1, keepdims=True)
        p = np.exp(logits - m)
        s = p.sum(-1, keepdims=True)
        p /= s
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0, p * np.log(p), 0.0)
        outs.append(np.einsum("ihj,jhd->ihd", p, v))
        lses.append((m + np.log(s))[..., 0])
        ents.append(-plogp.sum(-1))
        keys.append(pos + 1)
    return np.concatenate(outs), np.concatenate(lses), np.concatenate(ents), np.concatenate(keys)


def _summary_reference(h: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """[hq, 6] per head: rows, mean H, informative rows (>= 2 keys), mean H / log(keys), collapse
    (H <= E_max / 4) and overload (H >= 3 E_max / 4) rows among the informative ones."""
    hq = h.shape[1]
    out = np.zeros((hq, 6))
    inf = keys >= 2
    e_max = np.log(np.maximum(keys, 1)).astype(np.float64)
    for head in range(hq):
        hh = h[:, head]
        out[head, 0] = len(hh)
        out[head, 1] = hh.mean()
        out[head, 2] = inf.sum()
        out[head, 3] = (hh[inf] / e_max[inf]).mean()
        out[head, 4] = (hh[inf] <= e_max[inf] / 4).sum()
        out[head, 5] = (hh[inf] >= 3 * e_max[inf] / 4).sum()
    return out


def _near_band_edges(h: np.ndarray, keys: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    """[hq] informative rows within tol of a band edge (fp32 may put them on either side)."""
    inf = keys >= 2
    e = np.log(np.maximum(keys, 1))[:, None]
    near = (np.abs(h - e / 4) <= tol) | (np.abs(h - 3 * e / 4) <= tol)
    return (near & inf[:, None]).sum(0)


def _check_summary(got: np.ndarray, h: np.ndarray, keys: np.ndarray) -> None:
    want = _summary_reference(h, keys)
    slack = _near_band_edges(h, keys)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert (got[:, 0] == want[:, 0]).all() and (got[:, 2] == want[:, 2]).all()
    assert np.abs(got[:, 1] - want[:, 1]).max() <= 1e-5
    assert np.abs(got[:, 3] - want[:, 3]).max() <= 1e-5
    assert (np.abs(got[:, 4] - want[:, 4]) <= slack).all(), (got[:, 4], want[:, 4])
    assert (np.abs(got[:, 5] - want[:, 5]) <= slack).all(), (got[:, 5], want[:, 5])


def _entropy_attention(ctx: kvplug.Context, hq: int, hkv: int, t: Any = None, config: Any = "auto"
                       ) -> kvplug.Attention:
    return kvplug.Attention(ctx, "entropy", num_q_heads=hq, num_kv_heads=hkv, head_size=HEAD,
                            config=kvplug.entropy_config(t) if config == "auto" else config)


def _run_all(attn: kvplug.Attention, plan: kvplug.Plan, batch: Batch, **outputs: bool
             ) -> Tuple[np.ndarray, ...]:
    t, hq = batch.q.shape[0], batch.hq
    out = np.full_like(batch.q, np.nan)
    lse = np.full((t, hq), np.nan, np.float32) if outputs.get("lse", True) else None
    ent = np.full((t, hq), np.nan, np.float32) if outputs.get("entropy", True) else None
    summ = np.full((hq, 6), np.nan, np.float32) if outputs.get("summary", True) else None
    assert attn.run(plan, batch.cache, LAYER, batch.q, out, lse, entropy=ent, entropy_summary=summ) is out
    return out, lse, ent, summ


# ------------------------------------------------------------------------------------------------
# The entropy backend
# ------------------------------------------------------------------------------------------------


def test_entropy_backend_is_registered_and_stable() -> None:
    assert "entropy" in kvplug.backends()
    info = kvplug.backend_device_info("entropy", "cpu")
    assert info.available and info.supports_lse and info.supports_entropy and not info.experimental
    assert not info.needs_state_slots and HEAD in info.head_sizes
    for name in ("dense", "star"):  # the telemetry is on every backend of the family
        assert kvplug.backend_device_info(name, "cpu").supports_entropy, name
    kvplug.check_config("entropy", kvplug.entropy_config([[1.0, 2.0], [0.5, 0.25]]))
    kvplug.check_config("entropy", kvplug.entropy_config())  # empty: t = 1
    kvplug.check_config("entropy", None)
    assert kvplug.entropy_config(np.ones((2, 3))) == {
        "backend_config_type": "EntropyConfig", "backend_config": {"temperature": [1.0] * 6}}


@pytest.mark.parametrize("hq,hkv,positions", [(4, 4, 20), (8, 2, 20), (8, 2, 1), (4, 1, 100)])
def test_temperature_per_head_and_position_matches_numpy(ctx: kvplug.Context, hq: int, hkv: int,
                                                         positions: int) -> None:
    """T = 20: the 33- and 100-token sequences' queries sit at positions beyond the table and use
    its last entry; T = 1: per head only; T = 100: every position has its own entry."""
    rng = np.random.default_rng(100 + hq + positions)
    batch = Batch(ctx, hq, hkv, seed=41 + hq * hkv + positions)
    t = _temperature_table(rng, hq, positions)
    attn = _entropy_attention(ctx, hq, hkv, t)
    ref_out, ref_lse, ref_h, keys = _reference(batch, attn.sm_scale, t)
    with _plan(ctx, batch) as plan:
        plan.update(batch.qsl, batch.lens, block_size=BLOCK, block_table=batch.table)
        out, lse, h, summ = _run_all(attn, plan, batch)
    assert np.abs(out - ref_out).max() <= 1e-5
    assert np.abs(lse - ref_lse).max() <= 1e-5
    assert np.abs(h - ref_h).max() <= 1e-5
    _check_summary(summ, ref_h, keys)
    # The table matters: the plain scale gives other outputs and entropies.
    plain_out, _, plain_h, _ = _reference(batch, attn.sm_scale, None)
    assert np.abs(plain_out - ref_out).max() > 1e-2 and np.abs(plain_h - ref_h).max() > 1e-2
    if positions < max(batch.lens):  # the clamp: a table cut at T equals one that repeats entry T-1
        tail = np.repeat(t[:, -1:], max(batch.lens) - positions, axis=1)
        _, _, long_h, _ = _reference(batch, attn.sm_scale, np.concatenate([t, tail], axis=1))
        assert np.abs(long_h - h).max() <= 1e-5
    # Sharp and flat rows both occur, so the bands are exercised.
    assert summ[:, 4].sum() > 0 and summ[:, 5].sum() > 0


def test_chunked_prefill_and_decode_past_the_table(ctx: kvplug.Context) -> None:
    """One 70-token sequence run in chunks (5, 13, 20, 30, then decode 1, 1): each chunk's rows use
    their absolute positions; the T = 24 table's last entry serves positions 24..69."""
    hq, hkv = 4, 2
    rng = np.random.default_rng(5)
    t = _temperature_table(rng, hq, 24)
    batch = Batch(ctx, hq, hkv, seed=5, seqs=[(70, 70)])
    attn = _entropy_attention(ctx, hq, hkv, t)
    ref_out, _, ref_h, keys = _reference(batch, attn.sm_scale, t)
    got_out, got_h, summaries = [], [], []
    with kvplug.Plan(ctx, max_num_seqs=1, max_num_tokens=70, max_num_blocks=16) as plan:
        start = 0
        for chunk in (5, 13, 20, 30, 1, 1):
            end = start + chunk
            plan.update([0, chunk], [end], block_size=BLOCK, block_table=batch.table)
            out = np.empty((chunk, hq, HEAD), np.float32)
            h = np.empty((chunk, hq), np.float32)
            s = np.empty((hq, 6), np.float32)
            attn.run(plan, batch.cache, LAYER, batch.q[start:end], out, entropy=h, entropy_summary=s)
            got_out.append(out)
            got_h.append(h)
            summaries.append(s)
            _check_summary(s, ref_h[start:end], keys[start:end])
            start = end
    assert np.abs(np.concatenate(got_out) - ref_out).max() <= 1e-5
    assert np.abs(np.concatenate(got_h) - ref_h).max() <= 1e-5
    # Summaries of the chunks combine, weighted by their row counts, into the whole run's.
    s = np.stack(summaries).astype(np.float64)
    rows, inf = s[:, :, 0].sum(0), s[:, :, 2].sum(0)
    combined = np.stack([rows, (s[:, :, 0] * s[:, :, 1]).sum(0) / rows, inf,
                         (s[:, :, 2] * s[:, :, 3]).sum(0) / inf, s[:, :, 4].sum(0), s[:, :, 5].sum(0)], axis=1)
    want = _summary_reference(ref_h, keys)
    assert np.abs(combined - want)[:, [0, 2]].max() == 0
    assert np.abs(combined - want)[:, [1, 3]].max() <= 1e-5


def test_unit_temperature_equals_dense_and_summaries_on_dense_and_star(ctx: kvplug.Context) -> None:
    hq, hkv = 8, 2
    batch = Batch(ctx, hq, hkv, seed=77)
    dense = kvplug.Attention(ctx, "dense", num_q_heads=hq, num_kv_heads=hkv, head_size=HEAD)
    star = kvplug.Attention(ctx, "star", num_q_heads=hq, num_kv_heads=hkv, head_size=HEAD,
                            config=kvplug.star_config(128, 128))  # one block covers every context: dense
    _, _, ref_h, keys = _reference(batch, dense.sm_scale, None)
    with _plan(ctx, batch) as plan:
        plan.update(batch.qsl, batch.lens, block_size=BLOCK, block_table=batch.table)
        want = _run_all(dense, plan, batch)
        _check_summary(want[3], ref_h, keys)
        for attn in (_entropy_attention(ctx, hq, hkv), _entropy_attention(ctx, hq, hkv, config=None),
                     _entropy_attention(ctx, hq, hkv, np.ones((hq, 3))), star):
            got = _run_all(attn, plan, batch)
            for g, w in zip(got, want):
                assert np.abs(g - w).max() <= 1e-6, attn.backend
        # The summary alone, or with lse only: the same numbers.
        _, _, _, s = _run_all(dense, plan, batch, lse=False, entropy=False)
        assert np.array_equal(s, want[3])
        _, _, _, s = _run_all(dense, plan, batch, entropy=False)
        assert np.array_equal(s, want[3])


def test_outputs_struct_size_follows_what_is_requested(ctx: kvplug.Context, monkeypatch: Any) -> None:
    """run(entropy=...) sends the 0.3-sized kvp_attention_outputs (0.3 libraries accept it);
    entropy_summary= the full one, with the summary's DLTensor in the new field."""
    hq, hkv = 4, 4
    batch = Batch(ctx, hq, hkv, seed=3, seqs=[(9, 9)])
    attn = _entropy_attention(ctx, hq, hkv)
    seen: List[Tuple[int, bool]] = []
    real = _lib.api().kvp_attention_run_v2

    def spy(a: Any, p: Any, c: Any, layer: int, q: Any, outputs: Any) -> int:
        o = outputs._obj
        seen.append((int(o.struct_size), bool(o.entropy_summary)))
        return real(a, p, c, layer, q, outputs)

    monkeypatch.setattr(_lib.api(), "kvp_attention_run_v2", spy)
    with _plan(ctx, batch) as plan:
        plan.update(batch.qsl, batch.lens, block_size=BLOCK, block_table=batch.table)
        _run_all(attn, plan, batch, summary=False)
        _run_all(attn, plan, batch, lse=False, entropy=False)
    assert seen == [(_lib.KVP_ATTENTION_OUTPUTS_SIZE_0_3, False), (ctypes.sizeof(_lib.kvp_attention_outputs), True)]


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,index", [([1.0, 0.0, 1.0, 1.0], 1), ([1.0, 1.0, -2.0, 1.0], 2),
                                       ([float("nan"), 1.0, 1.0, 1.0], 0), ([1.0, 1.0, 1.0, float("inf")], 3)])
def test_bad_temperatures_are_invalid_configs(ctx: kvplug.Context, bad: List[float], index: int) -> None:
    cfg = kvplug.entropy_config(bad)
    with pytest.raises(kvplug.InvalidConfigError, match=rf"temperature\[{index}\].*finite and > 0") as e:
        kvplug.check_config("entropy", cfg)
    assert e.value.status_name == "KVP_ERR_INVALID_CONFIG"
    with pytest.raises(kvplug.InvalidConfigError, match=rf"temperature\[{index}\]"):
        _entropy_attention(ctx, 4, 2, config=cfg)


def test_bad_table_shapes_and_config_types(ctx: kvplug.Context) -> None:
    # 7 entries for 4 heads: the config alone is fine (no head count), creation says why not.
    kvplug.check_config("entropy", kvplug.entropy_config([1.0] * 7))
    with pytest.raises(kvplug.InvalidArgumentError, match="7 entries, not a multiple of num_q_heads=4"):
        _entropy_attention(ctx, 4, 2, [1.0] * 7)
    with pytest.raises(kvplug.InvalidArgumentError, match="3 entries, not a multiple of num_q_heads=4"):
        _entropy_attention(ctx, 4, 2, np.ones((1, 3)))  # a [1, 3] table for 4 heads
    _entropy_attention(ctx, 4, 2, np.ones((2, 4))).close()  # 8 entries: read as [4, 2]
    with pytest.raises(kvplug.InvalidArgumentError, match="expected a \\[num_q_heads, T\\] table"):
        kvplug.entropy_config(np.ones((2, 2, 2)))
    with pytest.raises(kvplug.InvalidConfigError, match="DenseConfig but backend 'entropy' takes a EntropyConfig"):
        kvplug.check_config("entropy", {"backend_config_type": "DenseConfig", "backend_config": {}})
    with pytest.raises(kvplug.InvalidConfigError, match="EntropyConfig but backend 'dense'"):
        kvplug.check_config("dense", kvplug.entropy_config([1.0]))
    with pytest.raises(kvplug.InvalidConfigError):  # not a float list
        kvplug.check_config("entropy", {"backend_config_type": "EntropyConfig",
                                        "backend_config": {"temperature": "hot"}})


def test_bad_entropy_summary_tensors(ctx: kvplug.Context) -> None:
    hq, hkv = 4, 2
    batch = Batch(ctx, hq, hkv, seed=9, seqs=[(12, 12)])
    attn = _entropy_attention(ctx, hq, hkv)
    q = batch.q
    out = np.empty_like(q)
    with _plan(ctx, batch) as plan:
        plan.update(batch.qsl, batch.lens, block_size=BLOCK, block_table=batch.table)

        def run(summary: Any, **kw: Any) -> None:
            attn.run(plan, batch.cache, LAYER, q, kw.pop("out", out), entropy_summary=summary, **kw)

        with pytest.raises(kvplug.InvalidArgumentError, match=r"entropy_summary: expected shape \[4, 6\]"):
            run(np.zeros((hq + 1, 6), np.float32))
        with pytest.raises(kvplug.InvalidArgumentError, match=r"entropy_summary"):
            run(np.zeros((hq, 5), np.float32))
        with pytest.raises(kvplug.InvalidArgumentError, match="entropy_summary: dtype"):
            run(np.zeros((hq, 6), np.float64))
        with pytest.raises(kvplug.InvalidArgumentError, match="entropy_summary: dtype must be float32"):
            run(np.zeros((hq, 6), np.float16))
        with pytest.raises(kvplug.InvalidArgumentError, match="entropy_summary: must be contiguous"):
            run(np.zeros((hq, 12), np.float32)[:, ::2])
        with pytest.raises(kvplug.InvalidArgumentError, match="overlaps"):  # inside out's memory
            run(out.reshape(-1)[: hq * 6].reshape(hq, 6))
        ent = np.zeros((q.shape[0], hq), np.float32)
        with pytest.raises(kvplug.InvalidArgumentError, match="overlaps"):  # inside the entropy output
            run(ent.reshape(-1)[: hq * 6].reshape(hq, 6), entropy=ent)
        frozen = np.zeros((hq, 6), np.float32)
        frozen.flags.writeable = False
        with pytest.raises(kvplug.InvalidArgumentError):
            run(frozen)
        with pytest.raises(TypeError, match="entropy_summary"):
            run([[0.0] * 6] * hq)
        s = np.zeros((hq, 6), np.float32)
        run(s)  # and the attention still works after the failures
        assert s[:, 0].tolist() == [12.0] * hq
    # A backend without entropy support refuses the summary (if this build registers one).
    lacking = [n for n in kvplug.backends() if not kvplug.backend_device_info(n, "cpu").supports_entropy
               and not kvplug.backend_device_info(n, "cpu").needs_state_slots]
    for name in lacking:
        other = kvplug.Attention(ctx, name, num_q_heads=hq, num_kv_heads=hkv, head_size=HEAD)
        with _plan(ctx, batch) as plan:
            plan.update(batch.qsl, batch.lens, block_size=BLOCK, block_table=batch.table)
            with pytest.raises(kvplug.NotSupportedError, match="entropy"):
                other.run(plan, batch.cache, LAYER, q, out, entropy_summary=np.zeros((hq, 6), np.float32))
