"""What ABI 0.5 added, through the binding: kvp_attention_cache_layout (dense and attamba, against
the formulas of attamba.h), the experimental "attamba" backend end to end on the CPU (compressed page
list, write_kv, run) against a float64 NumPy reference of its key sets, and kvp_attention_ssm with
its error paths.

Tests of the 0.5 entry points skip when the library under test lacks them (optional in the binding),
and only then."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import pytest

import kvplug
from kvplug import _lib

PAGE = 8      # tokens per cache page
HEAD = 32     # the smallest head size the CPU engine lists
HQ, HKV = 4, 2
P, L = 4, 3   # chunk size, window
NUM_LAYERS, LAYER = 2, 1  # cyclic offset of layer 1 of 2: min(P - 1, 1 * (P // 2)) = 2
SSM = dict(ssm_heads=2, ssm_head_dim=4, state_size=4, ssm_groups=1, conv_width=3)


def _needs_0_5() -> None:
    missing = [n for n in ("kvp_attention_cache_layout", "kvp_attention_ssm") if not _lib.api().has(n)]
    if missing:
        pytest.skip(f"{_lib.api().path} lacks {missing} (ABI 0.5)")


def _offset(layer: int, num_layers: int = NUM_LAYERS, chunk: int = P, uniform: bool = False) -> int:
    return 0 if uniform else min(chunk - 1, layer * (chunk // num_layers))


def _chunk_ends(n: int, off: int, chunk: int = P) -> List[int]:
    """Chunk ends among positions [0, n), listed as attamba.h defines them: 0 and j*P + P-1 - off."""
    ends = {0} | {j * chunk + chunk - 1 - off for j in range(n // chunk + 2)}
    return sorted(e for e in ends if 0 <= e < n)


def _expected_layout(n: int, p0: int, bs: int, num_layers: int = NUM_LAYERS, chunk: int = P, window: int = L,
                     uniform: bool = False) -> kvplug.CacheLayout:
    rows = [len(_chunk_ends(n, _offset(layer, num_layers, chunk, uniform), chunk)) for layer in range(num_layers)]
    comp_pages = -(-max(rows) // bs)
    first = max(0, p0 - window) // bs
    win_pages = -(-n // bs) - first
    return kvplug.CacheLayout(seq_len=comp_pages * bs + n - first * bs, num_pages=comp_pages + win_pages,
                              compressed_rows=max(rows), compressed_pages=comp_pages, stable_rows=min(rows),
                              window_first_page=first, window_pages=win_pages)


def _attamba(ctx: kvplug.Context, **over: int) -> kvplug.Attention:
    cfg = dict(chunk_size=P, window=L, layer_index=LAYER, num_layers=NUM_LAYERS, **SSM)
    cfg.update(over)
    return kvplug.Attention(ctx, "attamba", num_q_heads=HQ, num_kv_heads=HKV, head_size=HEAD,
                            config=kvplug.attamba_config(**cfg))


def test_version_and_registration() -> None:
    v = kvplug.abi_version()
    assert v // 10000 == 0 and v // 100 % 100 >= 5
    assert kvplug.ABI_VERSION_MINOR == 5
    assert "attamba" in kvplug.backends()
    info = kvplug.backend_info("attamba")
    assert info.needs_state_slots and HEAD in info.head_sizes
    cpu = kvplug.backend_device_info("attamba", "cpu")
    assert cpu.available and cpu.experimental
    # On CUDA attamba runs wherever the family's CUDA engine does.
    assert kvplug.backend_device_info("attamba", "cuda").head_sizes == kvplug.backend_device_info("dense", "cuda").head_sizes


def test_attamba_config_json() -> None:
    cfg = kvplug.attamba_config(16, 64, layer_index=3, num_layers=8, chunk_offsets="uniform", ssm_heads=4,
                                ssm_head_dim=8, ssm_groups=2, norm_eps=1e-6)
    assert cfg["backend_config_type"] == "AttambaConfig"
    body = cfg["backend_config"]
    assert body["chunk_size"] == 16 and body["window"] == 64 and body["chunk_offsets"] == "Uniform"
    assert (body["layer_index"], body["num_layers"], body["ssm_heads"], body["ssm_groups"]) == (3, 8, 4, 2)
    kvplug.check_config("attamba", cfg)
    kvplug.check_config("attamba", kvplug.attamba_config())
    with pytest.raises(kvplug.InvalidArgumentError, match="chunk_offsets"):
        kvplug.attamba_config(chunk_offsets="random")
    with pytest.raises((kvplug.InvalidConfigError, kvplug.InvalidArgumentError), match="ssm_groups"):
        kvplug.check_config("attamba", kvplug.attamba_config(ssm_heads=3, ssm_head_dim=4, ssm_groups=2))


def test_dense_cache_layout_is_the_token_stream(ctx: kvplug.Context) -> None:
    _needs_0_5()
    with kvplug.Attention(ctx, num_q_heads=HQ, num_kv_heads=HKV, head_size=HEAD) as dense:
        for n, p0 in ((0, 0), (1, 0), (17, 5), (64, 63)):
            lay = dense.cache_layout(PAGE, n, p0)
            assert lay.seq_len == n and lay.window_pages == -(-n // PAGE) == lay.num_pages
            assert (lay.compressed_rows, lay.compressed_pages, lay.stable_rows, lay.window_first_page) == (0, 0, 0, 0)


@pytest.mark.parametrize("uniform", [False, True])
def test_attamba_cache_layout_matches_the_header(ctx: kvplug.Context, uniform: bool) -> None:
    _needs_0_5()
    with _attamba(ctx, chunk_offsets="uniform" if uniform else "cyclic") as attn:
        for n, p0 in ((1, 0), (4, 0), (38, 0), (40, 0), (46, 40), (100, 99), (100, 2), (9, 9)):
            assert attn.cache_layout(PAGE, n, p0) == _expected_layout(n, p0, PAGE, uniform=uniform), (n, p0)
        # Cyclic offsets differ per layer, so the layers' row counts can differ: stable < compressed.
        if not uniform:
            lay = attn.cache_layout(PAGE, 38, 0)  # layer 0's ends 0, 3, .., 35; layer 1's 0, 1, 5, .., 37
            assert (lay.stable_rows, lay.compressed_rows) == (10, 11)
        with pytest.raises(kvplug.InvalidArgumentError, match="block_size=0"):
            attn.cache_layout(0, 10, 0)
        with pytest.raises(kvplug.InvalidArgumentError, match="query_pos_start=11"):
            attn.cache_layout(PAGE, 10, 11)
        with pytest.raises(kvplug.InvalidArgumentError, match="num_tokens"):
            attn.cache_layout(PAGE, -1, 0)


def _reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, sm_scale: float, off: int) -> np.ndarray:
    """float64 attention of queries at positions p0.. over the attamba key set (a dense mask): key k
    is seen by query t iff (k < t and k is a chunk end) or t - L <= k <= t."""
    n = p0 + q.shape[0]
    ends = set(_chunk_ends(n, off))
    t = np.arange(p0, n)[:, None]
    kk = np.arange(n)[None, :]
    is_end = np.isin(kk, sorted(ends))
    mask = ((kk < t) & is_end) | ((t - L <= kk) & (kk <= t))
    group = HQ // HKV
    k64 = np.repeat(k[:n].astype(np.float64), group, axis=1)
    v64 = np.repeat(v[:n].astype(np.float64), group, axis=1)
    logits = np.einsum("thd,khd->htk", q.astype(np.float64), k64) * sm_scale
    logits = np.where(mask[None], logits, -np.inf)
    w = np.exp(logits - logits.max(axis=2, keepdims=True))
    w /= w.sum(axis=2, keepdims=True)
    return np.einsum("htk,khd->thd", w, v64)


class _Sequence:
    """One sequence's physical pages: compressed row pages and token-stream pages, kept across steps."""

    def __init__(self, rng: np.random.Generator, num_blocks: int) -> None:
        self.free = list(rng.permutation(num_blocks))
        self.compressed: List[int] = []
        self.tokens: List[int] = []

    def page_list(self, lay: kvplug.CacheLayout) -> np.ndarray:
        while len(self.compressed) < lay.compressed_pages:
            self.compressed.append(int(self.free.pop()))
        last = lay.window_first_page + lay.window_pages
        while len(self.tokens) < last:
            self.tokens.append(int(self.free.pop()))
        return np.asarray(self.compressed + self.tokens[lay.window_first_page:last], np.int32)

    def window_slots(self, p0: int, n: int) -> np.ndarray:
        pos = np.arange(p0, n)
        return np.asarray(self.tokens, np.int64)[pos // PAGE] * PAGE + pos % PAGE


def test_attamba_step_end_to_end(ctx: kvplug.Context) -> None:
    _needs_0_5()
    rng = np.random.default_rng(5)
    total = 46
    k = rng.standard_normal((total, HKV, HEAD)).astype(np.float32)
    v = rng.standard_normal((total, HKV, HEAD)).astype(np.float32)
    q = rng.standard_normal((total, HQ, HEAD)).astype(np.float32)
    num_blocks = 16
    with _attamba(ctx) as attn:
        state_bytes = attn.state_bytes
        assert state_bytes > 0
        cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=num_blocks, block_size=PAGE, num_kv_heads=HKV,
                               head_size=HEAD, num_state_slots=1, state_bytes_per_layer=state_bytes)
        plan = kvplug.Plan(ctx, max_num_seqs=2, max_num_tokens=64, max_num_blocks=num_blocks)
        plan.attach(attn)
        seq = _Sequence(rng, num_blocks)
        # A prefill of 40 tokens, then a step of 6 whose window no longer reaches the first pages.
        for p0, n in ((0, 40), (40, total)):
            lay = attn.cache_layout(PAGE, n, p0)
            pages = seq.page_list(lay)
            assert pages.shape[0] == lay.num_pages
            plan.update([0, n - p0], [lay.seq_len], block_size=PAGE, block_table=pages[None, :],
                        slot_mapping=seq.window_slots(p0, n), state_slots=[0], query_pos_starts=[p0])
            attn.write_kv(plan, cache, 0, k[p0:n], v[p0:n])
            out = np.full((n - p0, HQ, HEAD), np.nan, np.float32)
            attn.run(plan, cache, 0, q[p0:n], out)
            ref = _reference(q[p0:n], k, v, p0, attn.sm_scale, _offset(LAYER))
            assert np.abs(out - ref).max() <= 1e-4, (p0, n)
        assert lay.window_first_page > 0  # the second step really dropped pages
        # It is not dense attention: the compressed key set changes the outputs.
        dense = _reference_dense(q[40:total], k, v, 40, attn.sm_scale)
        assert np.abs(out - dense).max() > 1e-2
        # A wrong seq_lens (the token count instead of the layout's rows) is refused with the numbers.
        with pytest.raises(kvplug.InvalidArgumentError, match="seq_lens"):
            plan.update([0, 6], [total], block_size=PAGE, block_table=pages[None, :],
                        slot_mapping=seq.window_slots(40, total), state_slots=[0], query_pos_starts=[40])
            attn.write_kv(plan, cache, 0, k[40:total], v[40:total])


def _reference_dense(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int, sm_scale: float) -> np.ndarray:
    from kvplug.reference import naive_attention

    return naive_attention(q, k[:p0 + q.shape[0]], v[:p0 + q.shape[0]], sm_scale)[0]


def _ssm_tensors(rng: np.random.Generator, t: int) -> Tuple[np.ndarray, dict]:
    heads, hd, n, g, w = (SSM[x] for x in ("ssm_heads", "ssm_head_dim", "state_size", "ssm_groups", "conv_width"))
    d_inner, conv_dim = heads * hd, heads * hd + 2 * g * n
    x = rng.standard_normal((t, 2 * d_inner + 2 * g * n + heads)).astype(np.float32)
    params = dict(conv_weight=rng.standard_normal((conv_dim, w)).astype(np.float32) * 0.5,
                  conv_bias=rng.standard_normal(conv_dim).astype(np.float32) * 0.1,
                  dt_bias=rng.standard_normal(heads).astype(np.float32) * 0.1,
                  a_log=rng.standard_normal(heads).astype(np.float32) * 0.1,
                  d_skip=np.ones(heads, np.float32),
                  norm_weight=np.ones(d_inner, np.float32))
    return x, params


def test_ssm_runs_chunk_local_and_checks_its_arguments(ctx: kvplug.Context) -> None:
    _needs_0_5()
    rng = np.random.default_rng(9)
    t = 14
    d_inner = SSM["ssm_heads"] * SSM["ssm_head_dim"]
    x, params = _ssm_tensors(rng, t)
    with _attamba(ctx) as attn:
        # attamba.h: two SSMs of (conv_width - 1) conv_dim + heads head_dim state floats each.
        conv_dim = d_inner + 2 * SSM["ssm_groups"] * SSM["state_size"]
        floats = (SSM["conv_width"] - 1) * conv_dim + d_inner * SSM["state_size"]
        assert attn.state_bytes == 2 * floats * 4
        cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=8, block_size=PAGE, num_kv_heads=HKV, head_size=HEAD,
                               num_state_slots=2, state_bytes_per_layer=attn.state_bytes)
        plan = kvplug.Plan(ctx, max_num_seqs=2, max_num_tokens=32, max_num_blocks=8)
        plan.attach(attn)
        lay = attn.cache_layout(PAGE, t, 0)
        table = np.arange(lay.num_pages, dtype=np.int32)[None, :]

        def step(inp: np.ndarray, which: int = 0, slot: int = 0) -> np.ndarray:
            plan.update([0, t], [lay.seq_len], block_size=PAGE, block_table=table, state_slots=[slot],
                        query_pos_starts=[0])
            out = np.full((t, d_inner), np.nan, np.float32)
            assert attn.ssm(plan, cache, 0, inp, out, which=which, **params) is out
            return out

        out = step(x)
        assert out.shape == (t, d_inner) and np.isfinite(out).all() and np.abs(out).max() > 0
        # The state resets at every chunk start: changing the tokens of earlier chunks leaves the
        # outputs from the next chunk start on unchanged (layer 1's ends: 0, 1, 5, 9, 13).
        ends = _chunk_ends(t, _offset(LAYER))
        assert ends == [0, 1, 5, 9, 13]
        start = ends[2] + 1  # position 6
        x2 = x.copy()
        x2[:start] = rng.standard_normal((start, x.shape[1]))
        out2 = step(x2, slot=1)
        assert np.allclose(out2[start:], out[start:], atol=1e-5)
        assert np.abs(out2[:start] - out[:start]).max() > 1e-3
        # The value SSM (which=1) runs too, on the same inputs.
        assert np.allclose(step(x, which=1), out, atol=1e-5)

        bad = np.zeros((t, d_inner), np.float32)
        with pytest.raises(kvplug.InvalidArgumentError, match="which=2"):
            attn.ssm(plan, cache, 0, x, bad, which=2, **params)
        # (The library names out "y" in this message: match the shape only.)
        with pytest.raises(kvplug.InvalidArgumentError, match=r"expected shape \[14, 8\]"):
            attn.ssm(plan, cache, 0, x, np.zeros((t, d_inner + 1), np.float32), **params)
        with pytest.raises(kvplug.InvalidArgumentError, match="a_log"):
            attn.ssm(plan, cache, 0, x, bad, **{**params, "a_log": np.zeros(3, np.float32)})
        with pytest.raises(kvplug.OutOfRangeError, match="layer=1"):
            attn.ssm(plan, cache, 1, x, bad, **params)
        plan.update([0, t], [lay.seq_len], block_size=PAGE, block_table=table, query_pos_starts=[0])
        with pytest.raises(kvplug.InvalidArgumentError, match="state_slots"):
            attn.ssm(plan, cache, 0, x, bad, **params)
        # Without SSM heads the engine runs its own SSMs: refused, saying why.
        with _attamba(ctx, ssm_heads=0, ssm_head_dim=0) as no_ssm:
            assert no_ssm.state_bytes == 0
            with pytest.raises(kvplug.FailedPreconditionError, match="ssm_heads"):
                no_ssm.ssm(plan, cache, 0, x, bad, **params)
    with kvplug.Attention(ctx, num_q_heads=HQ, num_kv_heads=HKV, head_size=HEAD) as dense:
        with kvplug.Plan(ctx, max_num_seqs=1, max_num_tokens=32, max_num_blocks=8) as dplan:
            dplan.update([0, t], [t], block_size=PAGE, block_table=np.arange(2, dtype=np.int32)[None, :],
                         state_slots=[0], query_pos_starts=[0])
            with pytest.raises(kvplug.NotSupportedError):
                dense.ssm(dplan, cache, 0, x, bad, **params)
