"""KvCache: K/V written from NumPy through DLPack and read back through layer_view bit-exactly, in
every cache dtype and both layouts; block copies, swaps, state slots, caches over caller tensors."""
from __future__ import annotations

import gc

import numpy as np
import pytest

import kvplug
from kvplug.reference import bfloat16_bits_to_float32, float32_to_bfloat16_bits

H, D, BS = 2, 32, 4


def _kv(rng: np.random.Generator, n: int, dtype: type = np.float32) -> tuple:
    return (rng.standard_normal((n, H, D)).astype(dtype), rng.standard_normal((n, H, D)).astype(dtype))


def _page(view: np.ndarray, layout: str, kv: int, slot: int) -> np.ndarray:
    """Key (kv=0) or value (kv=1) of cache slot ``slot`` in a layer view: [H, D]."""
    block, off = divmod(slot, BS)
    return view[kv, block, off] if layout == "kv_first" else view[block, kv, off]


@pytest.mark.parametrize("layout", ["kv_first", "block_first"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_write_then_layer_view_is_bit_exact(ctx: kvplug.Context, layout: str, dtype: str) -> None:
    rng = np.random.default_rng(1)
    cache = kvplug.KvCache(ctx, num_layers=2, num_blocks=6, block_size=BS, num_kv_heads=H, head_size=D, dtype=dtype,
                           layout=layout)
    view = cache.layer_view(1)
    expected_shape = (2, 6, BS, H, D) if layout == "kv_first" else (6, 2, BS, H, D)
    assert view.shape == expected_shape and view.dtype == np.dtype(dtype)
    assert not view.any()  # pages start zero-filled
    k, v = _kv(rng, 7, np.dtype(dtype).type)  # in the cache's own dtype: stored unchanged
    slots = np.array([0, 5, 6, 23, 9, -1, 12], np.int64)  # -1 skips a token
    cache.write(1, k, v, slots)
    for t, s in enumerate(slots):
        if s < 0:
            continue
        assert np.array_equal(_page(view, layout, 0, s).view(np.uint8), k[t].view(np.uint8))
        assert np.array_equal(_page(view, layout, 1, s).view(np.uint8), v[t].view(np.uint8))
    written = {int(s) for s in slots if s >= 0}
    for s in set(range(24)) - written:
        assert not _page(view, layout, 0, s).any() and not _page(view, layout, 1, s).any()
    assert not cache.layer_view(0).any()  # layer 0 untouched


def test_float32_into_float16_and_bfloat16_caches(ctx: kvplug.Context) -> None:
    rng = np.random.default_rng(2)
    k, v = _kv(rng, 5)
    slots = np.arange(5)
    half = kvplug.KvCache(ctx, num_layers=1, num_blocks=2, block_size=BS, num_kv_heads=H, head_size=D, dtype=np.float16)
    half.write(0, k, v, slots)
    hv = half.layer_view(0)
    assert hv.dtype == np.float16
    assert np.array_equal(hv[0].reshape(-1, H, D)[:5], k.astype(np.float16))  # round to nearest even
    bf = kvplug.KvCache(ctx, num_layers=1, num_blocks=2, block_size=BS, num_kv_heads=H, head_size=D, dtype="bfloat16")
    bf.write(0, k, v, slots)
    bv = bf.layer_view(0)
    assert bv.dtype == np.uint16  # bfloat16 has no NumPy dtype: raw bits
    assert np.array_equal(bv[1].reshape(-1, H, D)[:5], float32_to_bfloat16_bits(v))
    assert np.abs(bfloat16_bits_to_float32(bv[1].reshape(-1, H, D)[:5]) - v).max() <= np.abs(v).max() * 2**-8


def test_strided_inputs_are_read_through_their_strides(ctx: kvplug.Context) -> None:
    rng = np.random.default_rng(3)
    big_k, big_v = _kv(rng, 12)
    k, v = big_k[::3], big_v[1::3]  # token stride 3: a view, not a copy
    assert not k.flags.c_contiguous
    cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=2, block_size=BS, num_kv_heads=H, head_size=D)
    cache.write(0, k, v, [4, 5, 6, 7])
    assert np.array_equal(cache.layer_view(0)[0, 1], k) and np.array_equal(cache.layer_view(0)[1, 1], v)


def test_slot_mapping_forms_and_all_or_nothing(ctx: kvplug.Context) -> None:
    rng = np.random.default_rng(4)
    k, v = _kv(rng, 3)
    cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=2, block_size=BS, num_kv_heads=H, head_size=D)
    cache.write(0, k, v, [0, 1, 2])  # a list is converted to int64
    view = cache.layer_view(0)
    before = view.copy()
    with pytest.raises(kvplug.OutOfRangeError):
        cache.write(0, k * 2, v, [3, 4, 8])  # slot 8 is past 2 blocks x 4: nothing is written
    assert np.array_equal(view, before)
    with pytest.raises(kvplug.InvalidArgumentError, match="int64"):
        cache.write(0, k, v, np.array([3, 4, 5], np.int32))  # a DLPack int32 tensor: C checks the dtype
    with pytest.raises(kvplug.InvalidArgumentError, match="slot_mapping"):
        cache.write(0, k, v, np.array([3, 4], np.int64))  # wrong length


def test_tensor_errors(ctx: kvplug.Context) -> None:
    rng = np.random.default_rng(5)
    k, v = _kv(rng, 3)
    s = np.arange(3)
    cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=2, block_size=BS, num_kv_heads=H, head_size=D)
    with pytest.raises(kvplug.InvalidArgumentError, match="dtype"):
        cache.write(0, k.astype(np.float64), v, s)
    with pytest.raises(kvplug.InvalidArgumentError, match="ndim"):
        cache.write(0, k.reshape(3, -1), v, s)
    with pytest.raises(kvplug.InvalidArgumentError, match="shapes differ"):
        cache.write(0, k, v[:2], s)
    with pytest.raises(kvplug.InvalidArgumentError):
        cache.write(0, k[:, :1], v[:, :1], s)  # one KV head for a two-head cache
    with pytest.raises(kvplug.InvalidArgumentError, match="key is NULL"):
        cache.write(0, None, v, s)
    with pytest.raises(kvplug.InvalidArgumentError, match="slot_mapping is NULL"):
        cache.write(0, k, v, None)
    with pytest.raises(TypeError, match="DLPack"):
        cache.write(0, k.tolist(), v, s)
    with pytest.raises(kvplug.OutOfRangeError):
        cache.write(1, k, v, s)
    assert not cache.layer_view(0).any()


def test_copy_blocks_every_layer(ctx: kvplug.Context) -> None:
    rng = np.random.default_rng(6)
    cache = kvplug.KvCache(ctx, num_layers=2, num_blocks=4, block_size=BS, num_kv_heads=H, head_size=D)
    for layer in range(2):
        k, v = _kv(rng, 8)
        cache.write(layer, k, v, np.arange(8))
    views = [cache.layer_view(layer) for layer in range(2)]
    cache.copy_blocks([kvplug.BlockCopy(0, 3), (1, 2)])
    for view in views:
        assert np.array_equal(view[:, 3], view[:, 0]) and np.array_equal(view[:, 2], view[:, 1])
    cache.copy_blocks(kvplug.BlockCopy(3, 1))  # one pair, as BlockManager.append returns it
    cache.copy_blocks(np.zeros((0, 2), np.int32))  # an empty plan is a no-op
    assert np.array_equal(views[0][:, 1], views[0][:, 0])
    with pytest.raises(kvplug.OutOfRangeError):
        cache.copy_blocks([(0, 4)])
    with pytest.raises(kvplug.InvalidArgumentError, match="pairs"):
        cache.copy_blocks(np.zeros((2, 3), np.int32))


def test_swap_out_and_in_through_host_pages(ctx: kvplug.Context) -> None:
    rng = np.random.default_rng(7)
    cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=4, block_size=BS, num_kv_heads=H, head_size=D,
                           num_host_blocks=2)
    k, v = _kv(rng, 8)
    cache.write(0, k, v, np.arange(8))
    device, host = cache.layer_view(0), cache.layer_view(0, host=True)
    assert host.shape == (2, 2, BS, H, D)
    original = device[:, :2].copy()
    cache.swap_out([(0, 1), (1, 0)])
    assert np.array_equal(host[:, 1], original[:, 0]) and np.array_equal(host[:, 0], original[:, 1])
    device[:] = 0  # the views are writable: the engine may reuse the device blocks
    cache.swap_in([(1, 2), (0, 3)])
    assert np.array_equal(device[:, 2], original[:, 0]) and np.array_equal(device[:, 3], original[:, 1])
    with pytest.raises(kvplug.OutOfRangeError):
        cache.swap_out([(0, 2)])  # host block 2 of 2


def test_state_slots(ctx: kvplug.Context) -> None:
    cache = kvplug.KvCache(ctx, num_layers=2, num_blocks=1, block_size=BS, num_kv_heads=H, head_size=D,
                           num_state_slots=3, state_bytes_per_layer=24)
    s0 = cache.state(1, 0)
    assert s0.dtype == np.uint8 and s0.shape == (24,) and not s0.any()
    s0[:] = np.arange(24, dtype=np.uint8)
    cache.copy_state(0, 2)
    assert np.array_equal(cache.state(1, 2), np.arange(24))
    assert not cache.state(0, 2).any() and not cache.state(1, 1).any()
    with pytest.raises(kvplug.OutOfRangeError):
        cache.state(0, 3)
    with pytest.raises(kvplug.OutOfRangeError):
        cache.copy_state(0, 3)


@pytest.mark.parametrize("layout", ["kv_first", "block_first"])
def test_cache_over_caller_tensors_is_zero_copy(ctx: kvplug.Context, layout: str) -> None:
    rng = np.random.default_rng(8)
    shape = (2, 5, BS, H, D) if layout == "kv_first" else (5, 2, BS, H, D)
    # Both layers carved out of one allocation: the per-layer tensors are views with their own strides.
    storage = np.zeros((2,) + shape, np.float16)
    cache = kvplug.KvCache.from_tensors(ctx, [storage[0], storage[1]], layout=layout, num_host_blocks=1)
    assert (cache.num_layers, cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_size) == (2, 5, BS, H, D)
    assert cache.dtype == "float16" and cache.layout == layout
    view = cache.layer_view(1)
    assert view.__array_interface__["data"][0] == storage[1].__array_interface__["data"][0]
    k, v = _kv(rng, 2, np.float16)
    cache.write(1, k, v, [9, 10])
    assert np.array_equal(_page(storage[1], layout, 0, 9), k[0]) and np.array_equal(_page(storage[1], layout, 1, 10), v[1])
    assert not storage[0].any()
    storage[1][...] = 1  # and the other way round: the cache reads the caller's memory
    assert (view == 1).all()
    del storage, view
    gc.collect()  # the cache keeps the tensors alive
    assert (cache.layer_view(1) == 1).all()


def test_cache_over_caller_tensors_errors(ctx: kvplug.Context) -> None:
    good = np.zeros((2, 3, BS, H, D), np.float32)
    with pytest.raises(kvplug.InvalidArgumentError, match="dtype"):
        kvplug.KvCache.from_tensors(ctx, [good, good.astype(np.float16)])
    with pytest.raises(kvplug.InvalidArgumentError, match="shape"):
        kvplug.KvCache.from_tensors(ctx, [good, np.zeros((2, 4, BS, H, D), np.float32)])
    with pytest.raises(kvplug.InvalidArgumentError, match="ndim"):
        kvplug.KvCache.from_tensors(ctx, [good.reshape(2, 3, BS, -1)])
    with pytest.raises(kvplug.InvalidArgumentError, match="head axis"):
        kvplug.KvCache.from_tensors(ctx, [np.zeros((2, 3, BS, H, 2 * D), np.float32)[..., ::2]])
    readonly = good.copy()
    readonly.flags.writeable = False
    with pytest.raises(kvplug.InvalidArgumentError, match="read-only"):
        kvplug.KvCache.from_tensors(ctx, [readonly])
    with pytest.raises(kvplug.InvalidArgumentError, match="empty"):
        kvplug.KvCache.from_tensors(ctx, [])


def test_cache_option_errors(ctx: kvplug.Context) -> None:
    with pytest.raises(kvplug.NotSupportedError, match="fp8"):
        kvplug.KvCache(ctx, num_layers=1, num_blocks=1, block_size=BS, num_kv_heads=H, head_size=D, dtype="fp8_e4m3")
    with pytest.raises(kvplug.InvalidArgumentError, match="dtype"):
        kvplug.KvCache(ctx, num_layers=1, num_blocks=1, block_size=BS, num_kv_heads=H, head_size=D, dtype=7)
    with pytest.raises(kvplug.InvalidArgumentError, match="dtype"):
        kvplug.KvCache(ctx, num_layers=1, num_blocks=1, block_size=BS, num_kv_heads=H, head_size=D, dtype=np.int8)
    with pytest.raises(kvplug.InvalidArgumentError, match="head_size"):
        kvplug.KvCache(ctx, num_layers=1, num_blocks=1, block_size=BS, num_kv_heads=H, head_size=0)
    with pytest.raises(kvplug.InvalidArgumentError, match="layout"):
        kvplug.KvCache(ctx, num_layers=1, num_blocks=1, block_size=BS, num_kv_heads=H, head_size=D, layout="nhd")
