"""BlockManager through the binding: every method, against the semantics kvplug.h documents."""
from __future__ import annotations

import numpy as np
import pytest

import kvplug


def _prompt(n: int, base: int = 100) -> np.ndarray:
    return np.arange(base, base + n, dtype=np.int32)


def test_allocate_block_table_slot_mapping() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=16) as bm:
        assert bm.allocate(7, _prompt(10)) == 0  # nothing cached without prefix caching
        assert bm.num_tokens(7) == 10
        table = bm.block_table(7)
        assert table.dtype == np.int32 and len(table) == 3 and len(set(table.tolist())) == 3
        assert ((0 <= table) & (table < 16)).all()
        slots = bm.slot_mapping(7, 2, 7)
        expected = [int(table[p // 4]) * 4 + p % 4 for p in range(2, 9)]
        assert slots.dtype == np.int64 and slots.tolist() == expected
        assert bm.slot_mapping(7, 0, 0).shape == (0,)
        with pytest.raises(kvplug.OutOfRangeError):
            bm.slot_mapping(7, 8, 5)  # past the sequence's 10 tokens
        assert bm.can_append(7, 2) and not bm.can_append(7, 100)
        assert bm.append(7, [1, 2, 3]) is None  # not shared: no copy
        assert bm.num_tokens(7) == 13 and len(bm.block_table(7)) == 4
        assert bm.append(7, num_tokens=1) is None  # ids are optional without prefix caching
        bm.free(7)
        with pytest.raises(kvplug.NotFoundError):
            bm.num_tokens(7)
        assert bm.stats().num_used_blocks == 0


def test_block_tables_batch() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=16) as bm:
        for sid, n in [(1, 3), (2, 9), (3, 16)]:
            bm.allocate(sid, _prompt(n, 10 * sid))
        table, lens = bm.block_tables([1, 2, 3])
        assert table.shape == (3, 4) and table.dtype == np.int32  # the longest needs 16 / 4 = 4 blocks
        assert lens.tolist() == [3, 9, 16]
        for row, sid in zip(table, [1, 2, 3]):
            own = bm.block_table(sid)
            assert row[: len(own)].tolist() == own.tolist() and (row[len(own):] == -1).all()
        wide, _ = bm.block_tables(np.array([3, 1], np.uint64), max_blocks_per_seq=6)
        assert wide.shape == (2, 6) and wide[0, :4].tolist() == bm.block_table(3).tolist()
        with pytest.raises(kvplug.OutOfRangeError, match="max_blocks_per_seq"):
            bm.block_tables([3], max_blocks_per_seq=2)
        with pytest.raises(kvplug.NotFoundError):
            bm.block_tables([1, 42])


def test_long_block_table_and_swap_plans_grow_their_buffers() -> None:
    # 100 one-token blocks: more than the binding's first guesses (64 table entries, 16 copies).
    with kvplug.BlockManager(block_size=1, num_device_blocks=128, num_host_blocks=128) as bm:
        bm.allocate(1, num_tokens=100)
        table = bm.block_table(1)
        assert len(table) == 100 and len(set(table.tolist())) == 100
        out = bm.swap_out(1)
        assert len(out) == 100 and [c.src for c in out] == table.tolist()


def test_prefix_caching_and_extra_key() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=16, enable_prefix_caching=True, hash_seed=3) as bm:
        system = _prompt(12)
        bm.allocate(1, system)
        # Unwritten blocks are never served: nothing is cached before mark_computed.
        assert bm.allocate(2, np.concatenate([system, _prompt(2, 900)])) == 0
        bm.mark_computed(1, 12)
        hit = bm.allocate(3, np.concatenate([system, _prompt(5, 700)]))
        assert hit == 12
        assert bm.block_table(3)[:3].tolist() == bm.block_table(1).tolist()  # the same physical blocks
        assert bm.allocate(4, np.concatenate([system, _prompt(5, 700)]), extra_key=9) == 0  # another tenant
        stats = bm.stats()
        assert stats.prefix_hit_blocks >= 3 and stats.prefix_queried_blocks >= stats.prefix_hit_blocks
        with pytest.raises(kvplug.InvalidArgumentError, match="token_ids"):
            bm.allocate(5, num_tokens=4)  # ids are required with prefix caching
        with pytest.raises(kvplug.OutOfRangeError):
            bm.mark_computed(1, 13)


def test_can_allocate_counts_cached_prefix_blocks_as_free() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=4, enable_prefix_caching=True) as bm:
        prompt = _prompt(13)  # 4 blocks: the whole pool
        bm.allocate(1, prompt)
        bm.mark_computed(1, 13)
        assert bm.can_allocate(prompt) == kvplug.AllocVerdict.LATER
        bm.free(1)  # its 3 full blocks stay cached, unreferenced
        s = bm.stats()
        assert s.num_cached_free_blocks == 3 and s.num_used_blocks == 0
        assert bm.can_allocate(prompt) == kvplug.AllocVerdict.OK
        assert bm.can_allocate(num_tokens=20) == kvplug.AllocVerdict.NEVER


def test_fork_copy_on_write() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=16) as bm:
        bm.allocate(1, _prompt(6))  # the second block is half full
        parent = bm.block_table(1)
        bm.fork(1, 2)
        assert bm.block_table(2).tolist() == parent.tolist()
        with pytest.raises(kvplug.AlreadyExistsError):
            bm.fork(1, 2)
        copy = bm.append(2, 55)
        assert isinstance(copy, kvplug.BlockCopy) and copy.src == parent[1] and copy.dst not in parent
        assert bm.block_table(2).tolist() == [parent[0], copy.dst]
        assert bm.block_table(1).tolist() == parent.tolist()  # the parent keeps its block
        assert bm.append(2, 56) is None  # now private
        assert bm.append(1, 57) is None  # the parent's last block is no longer shared either


def test_state_slots() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=8, num_state_slots=2) as bm:
        bm.allocate(1, num_tokens=3)
        bm.fork(1, 2)
        slots = {bm.state_slot(1), bm.state_slot(2)}
        assert slots == {0, 1}
        with pytest.raises(kvplug.NoFreeBlocksError):
            bm.allocate(3, num_tokens=3)  # no state slot left
    with kvplug.BlockManager(block_size=4, num_device_blocks=8) as bm:
        bm.allocate(1, num_tokens=3)
        assert bm.state_slot(1) == -1


def test_swap_out_and_in() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=8, num_host_blocks=8) as bm:
        bm.allocate(1, num_tokens=10)
        table = bm.block_table(1)
        assert not bm.is_swapped(1)
        out = bm.swap_out(1)
        assert all(isinstance(c, kvplug.BlockCopy) for c in out)
        assert [c.src for c in out] == table.tolist() and len({c.dst for c in out}) == 3
        assert bm.is_swapped(1)
        s = bm.stats()
        assert s.num_swapped_sequences == 1 and s.num_free_host_blocks == 5 and s.num_used_blocks == 0
        with pytest.raises(kvplug.FailedPreconditionError):
            bm.swap_out(1)
        back = bm.swap_in(1)
        assert [c.src for c in back] == [c.dst for c in out]
        assert [c.dst for c in back] == bm.block_table(1).tolist()
        assert not bm.is_swapped(1) and bm.stats().num_free_host_blocks == 8
    with kvplug.BlockManager(block_size=4, num_device_blocks=8) as bm:
        bm.allocate(1, num_tokens=5)
        with pytest.raises(kvplug.NoFreeBlocksError):
            bm.swap_out(1)  # no host blocks at all
        assert not bm.is_swapped(1)


def test_stats_dataclass() -> None:
    with kvplug.BlockManager(block_size=4, num_device_blocks=10, num_host_blocks=3) as bm:
        bm.allocate(1, num_tokens=9)
        s = bm.stats()
        assert isinstance(s, kvplug.BlockManagerStats)
        assert (s.num_device_blocks, s.num_used_blocks, s.num_free_blocks) == (10, 3, 7)
        assert (s.num_host_blocks, s.num_free_host_blocks, s.num_sequences) == (3, 3, 1)
        with pytest.raises(AttributeError):
            s.num_used_blocks = 0  # type: ignore[misc]  # a snapshot, frozen
