"""Handle lifetimes: close() is idempotent, a closed handle raises instead of reaching C, and native
objects outlive their Python wrappers exactly as long as something still depends on them."""
from __future__ import annotations

import gc
from typing import Any, Callable, Dict, Tuple

import numpy as np
import pytest

import kvplug

from conftest import CALLED


def _make(ctx: kvplug.Context) -> Dict[str, Tuple[Any, Callable[[Any], Any]]]:
    """One of each handle, with a call that needs its handle."""
    return {
        "BlockManager": (kvplug.BlockManager(block_size=4, num_device_blocks=4), lambda h: h.stats()),
        "KvCache": (kvplug.KvCache(ctx, num_layers=1, num_blocks=1, block_size=4, num_kv_heads=1, head_size=32),
                    lambda h: h.copy_blocks([])),
        "Plan": (kvplug.Plan(ctx, max_num_seqs=1, max_num_tokens=1, max_num_blocks=1),
                 lambda h: h.update([0, 1], [1], block_size=4, block_table=[[0]])),
        "Attention": (kvplug.Attention(ctx, num_q_heads=1, num_kv_heads=1, head_size=32),
                      lambda h: h.run(None, None, 0, None, None)),  # type: ignore[arg-type]
        "Context": (ctx, lambda h: h.set_stream(None)),
    }


def test_closed_handles_raise_failed_precondition() -> None:
    ctx = kvplug.Context(num_threads=1)
    for name, (handle, use) in _make(ctx).items():
        if name != "Attention":
            use(handle)  # works while open
        assert not handle.closed and "handle=0x" in repr(handle)
        handle.close()
        handle.close()  # idempotent
        assert handle.closed and "closed" in repr(handle)
        with pytest.raises(kvplug.FailedPreconditionError, match=f"{name} is closed") as info:
            use(handle)
        assert info.value.status == 10 and info.value.status_name == "KVP_ERR_FAILED_PRECONDITION"
        with pytest.raises(kvplug.FailedPreconditionError):
            with handle:
                pass  # a closed handle cannot be re-entered


def test_closed_handles_as_arguments(ctx: kvplug.Context) -> None:
    cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=1, block_size=4, num_kv_heads=1, head_size=32)
    attn = kvplug.Attention(ctx, num_q_heads=1, num_kv_heads=1, head_size=32)
    plan = kvplug.Plan(ctx, max_num_seqs=1, max_num_tokens=1, max_num_blocks=1)
    plan.update([0, 1], [1], block_size=4, block_table=[[0]])
    q = np.ones((1, 1, 32), np.float32)
    out = np.zeros_like(q)
    attn.run(plan, cache, 0, q, out)
    plan.close()
    with pytest.raises(kvplug.FailedPreconditionError, match="Plan is closed"):
        attn.run(plan, cache, 0, q, out)
    closed = kvplug.Context()
    closed.close()
    for make in (lambda: kvplug.KvCache(closed, num_layers=1, num_blocks=1, block_size=4, num_kv_heads=1, head_size=32),
                 lambda: kvplug.Plan(closed, max_num_seqs=1, max_num_tokens=1, max_num_blocks=1),
                 lambda: kvplug.Attention(closed, num_q_heads=1, num_kv_heads=1, head_size=32)):
        with pytest.raises(kvplug.FailedPreconditionError, match="Context is closed"):
            make()


def test_with_blocks_close() -> None:
    with kvplug.Context() as ctx, kvplug.Plan(ctx, max_num_seqs=1, max_num_tokens=1, max_num_blocks=1) as plan:
        assert not ctx.closed and not plan.closed
    assert ctx.closed and plan.closed


def test_context_outlives_close_while_a_cache_uses_it() -> None:
    gc.collect()
    destroyed = CALLED.get("kvp_context_destroy", 0)
    ctx = kvplug.Context(num_threads=1)
    cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=2, block_size=4, num_kv_heads=1, head_size=32)
    ctx.close()
    gc.collect()
    assert CALLED.get("kvp_context_destroy", 0) == destroyed  # the cache still points at it
    k = np.ones((1, 1, 32), np.float32)
    cache.write(0, k, k, [5])  # and keeps working
    assert cache.layer_view(0)[0, 1, 1].sum() == 32
    del cache
    gc.collect()
    assert CALLED.get("kvp_context_destroy", 0) == destroyed + 1


def test_layer_view_keeps_the_pages_alive() -> None:
    gc.collect()
    destroyed = CALLED.get("kvp_kv_cache_destroy", 0)
    with kvplug.Context(num_threads=1) as ctx:
        cache = kvplug.KvCache(ctx, num_layers=1, num_blocks=2, block_size=4, num_kv_heads=1, head_size=32)
        k = np.full((1, 1, 32), 3.0, np.float32)
        cache.write(0, k, k, [0])
        view = cache.layer_view(0)
        cache.close()
    gc.collect()
    assert CALLED.get("kvp_kv_cache_destroy", 0) == destroyed
    assert (view[:, 0, 0] == 3.0).all()  # still the cache's memory, still valid
    with pytest.raises(kvplug.FailedPreconditionError):
        cache.layer_view(0)  # but the handle itself is closed
    del view
    gc.collect()
    assert CALLED.get("kvp_kv_cache_destroy", 0) == destroyed + 1


def test_context_options_and_stream() -> None:
    with kvplug.Context(num_threads=3, stream=0x1234) as ctx:
        assert (ctx.device_type, ctx.device_id, ctx.num_threads, ctx.stream) == (1, 0, 3, 0x1234)
        ctx.set_stream(0xBEEF)
        assert ctx.stream == 0xBEEF
        ctx.set_stream(None)
        assert ctx.stream is None
    with pytest.raises(kvplug.InvalidArgumentError, match="tpu"):
        kvplug.Context("tpu")
    with pytest.raises(kvplug.NotSupportedError, match="device_type=7"):
        kvplug.Context(7)
    with pytest.raises(kvplug.InvalidArgumentError, match="device_id"):
        kvplug.Context(device_id=1)
