"""The attamba layers' cache: pages of their own, laid out as the backend says.

An attamba layer keeps one K/V per chunk end (compressed rows) plus the recent window's token
pages, in the page list ``[compressed pages][window pages]`` of ``kvp_attention_cache_layout``:
one list per sequence, shared by every attamba layer of the model (row j of layer l is its j-th
chunk end; the list has pages for the layer that has the most). That is not the token stream the
block manager allocates, so the engine gives the attamba layers a cache of their own
(:class:`AttambaPages`): a ``KvCache`` of the attamba layers only, ``attamba_num_blocks`` pages
per layer, a free list with reference counts here, and one more ``Plan`` per step (CSR page lists,
``seq_lens`` = the layout's rows, ``query_pos_starts``, each token's window slot, the state slots).
The block manager still holds every sequence's token blocks: they back the other layers, bound the
tokens in flight and hand out the state slots, which this cache shares (its slots hold the two
SSMs' conv and scan state of each attamba layer).

Rules (see also :mod:`.scheduler`):

- **Pages per step**: before a sequence runs positions [p0, n), :meth:`AttambaPages.prepare`
  drops the window pages the step no longer reaches (token pages below ``window_first_page``) and
  takes the missing compressed and window pages; when the pool is short the scheduler preempts the
  newest running request, as it does when block-manager blocks run out. Admission leaves
  ``watermark`` of the pool free. A request that could never fit the pool alone is refused.
- **Preemption recomputes**: a swap would have to move these pages and the block manager's
  together; the engine recomputes attamba models' victims instead (``preemption_mode="swap"``
  falls back to recompute). A recomputed request starts again at position 0, where the SSM state is
  not read (every chunk start resets it), so its state slot needs no care.
- **Prefix caching is off** for models with an attamba layer: a hit would give the other layers
  their cached K/V, but the attamba layers' compressed rows and window live here, outside the block
  manager's prefix cache, and their SSM state would have to restart at a chunk start; serving a hit
  would need a prefix cache of these pages too. Without it every prompt is computed.
- **Forks** (:meth:`AttambaPages.fork`): the child shares the parent's full compressed pages whose
  rows every layer has written (``stable_rows``: immutable from then on) and its full window pages,
  gets copies of the partial ones, and a copy of the parent's state slot (both SSMs' conv and scan
  state, every attamba layer).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import kvplug

from .config import EngineConfig, ModelConfig


@dataclasses.dataclass
class SeqPages:
    """One sequence's pages: its compressed pages in list order, its window pages by token page."""

    compressed: List[int] = dataclasses.field(default_factory=list)
    window: Dict[int, int] = dataclasses.field(default_factory=dict)

    def pages(self) -> List[int]:
        return self.compressed + list(self.window.values())


class AttambaPages:
    """The attamba layers' KvCache, page pool and per-step plan (see the module's docstring).

    ``attentions``: the attamba layers' ``kvplug.Attention`` in model order (cache layer i is the
    i-th attamba layer); they share one page layout (the engine checks chunk_size, window and
    chunk_offsets agree)."""

    def __init__(self, ctx: kvplug.Context, mc: ModelConfig, ec: EngineConfig, attentions: Sequence[kvplug.Attention],
                 num_state_slots: int) -> None:
        self.layers: Tuple[int, ...] = mc.attamba_layers
        assert len(self.layers) == len(attentions) > 0
        self.block_size = ec.block_size
        self.num_blocks = ec.attamba_num_blocks or ec.num_device_blocks
        self.watermark_blocks = int(ec.watermark * self.num_blocks)
        self.params = mc.layer_attention[self.layers[0]].attamba_params()
        self._layout_of = attentions[0]  # every attamba layer computes the same layout
        self.state_bytes_per_layer = max(a.state_bytes for a in attentions)
        self.cache = kvplug.KvCache(ctx, num_layers=len(self.layers), num_blocks=self.num_blocks,
                                    block_size=ec.block_size, num_kv_heads=mc.num_key_value_heads,
                                    head_size=mc.head_dim, dtype=ec.kv_cache_dtype, num_state_slots=num_state_slots,
                                    state_bytes_per_layer=self.state_bytes_per_layer)
        self._free: List[int] = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out 0, 1, ...
        self._refs = np.zeros(self.num_blocks, np.int32)
        self.seqs: Dict[int, SeqPages] = {}
        self._layouts: Dict[Tuple[int, int], kvplug.CacheLayout] = {}
        # The step's plan: page lists of at most max_pages_per_seq entries per batch entry.
        max_pos = mc.max_position_embeddings
        self.max_pages_per_seq = self.max_pages(max_pos, ec.max_num_batched_tokens)
        self.plan = kvplug.Plan(ctx, max_num_seqs=ec.max_num_seqs, max_num_tokens=ec.max_num_batched_tokens,
                                max_num_blocks=ec.max_num_seqs * self.max_pages_per_seq)
        for a in attentions:
            self.plan.attach(a)
        self._max_batched_tokens = ec.max_num_batched_tokens
        # Figures.
        self.peak_used_pages = 0
        self.num_page_copies = 0  # partial pages copied at forks

    # -------------------------------------------------------------------------------------------
    # Layouts and bounds
    # -------------------------------------------------------------------------------------------
    def layout(self, num_tokens: int, query_pos_start: int) -> kvplug.CacheLayout:
        """kvp_attention_cache_layout of a step over [query_pos_start, num_tokens) (memoised)."""
        key = (int(num_tokens), int(query_pos_start))
        lay = self._layouts.get(key)
        if lay is None:
            if len(self._layouts) > 1 << 16:
                self._layouts.clear()
            lay = self._layouts[key] = self._layout_of.cache_layout(self.block_size, key[0], key[1])
        return lay

    def max_pages(self, num_tokens: int, max_step_tokens: Optional[int] = None) -> int:
        """The most pages one sequence of up to ``num_tokens`` tokens holds at any step of at most
        ``max_step_tokens`` tokens (default: the engine's token budget): its compressed pages plus
        the window pages of one step, (step - 1 + window) / block_size + 2 at most."""
        q = self._max_batched_tokens if max_step_tokens is None else max_step_tokens
        bs = self.block_size
        n = max(1, int(num_tokens))
        window = min(-(-n // bs), (min(q, n) - 1 + self.params.window) // bs + 2)
        return self.layout(n, n).compressed_pages + window

    # -------------------------------------------------------------------------------------------
    # The pool
    # -------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def _take(self) -> int:
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def _release(self, page: int) -> None:
        self._refs[page] -= 1
        assert self._refs[page] >= 0, f"attamba page {page} released twice"
        if self._refs[page] == 0:
            self._free.append(page)

    def _missing(self, sp: Optional[SeqPages], lay: kvplug.CacheLayout) -> int:
        have_c = len(sp.compressed) if sp else 0
        first = lay.window_first_page
        have_w = sum(1 for j in range(first, first + lay.window_pages) if sp and j in sp.window)
        return max(0, lay.compressed_pages - have_c) + lay.window_pages - have_w

    def _droppable(self, sp: Optional[SeqPages], lay: kvplug.CacheLayout) -> int:
        """Pages that dropping the window pages before this step would give back to the pool."""
        if sp is None:
            return 0
        return sum(1 for j, page in sp.window.items() if j < lay.window_first_page and self._refs[page] == 1)

    def can_admit(self, seq_id: int, p0: int, n: int) -> bool:
        """A new sequence's first step over [p0, n) fits above the watermark."""
        lay = self.layout(n, p0)
        sp = self.seqs.get(seq_id)
        return self._missing(sp, lay) <= self.num_free + self._droppable(sp, lay) - self.watermark_blocks

    def prepare(self, seq_id: int, p0: int, n: int) -> bool:
        """Give ``seq_id`` the pages of its step over positions [p0, n): drop the window pages the
        step no longer reaches, take the missing ones. False (and nothing taken) when the pool is
        short. Idempotent for the same step."""
        lay = self.layout(n, p0)
        sp = self.seqs.setdefault(seq_id, SeqPages())
        for j in [j for j in sp.window if j < lay.window_first_page]:
            self._release(sp.window.pop(j))
        if self._missing(sp, lay) > self.num_free:
            return False
        while len(sp.compressed) < lay.compressed_pages:
            sp.compressed.append(self._take())
        for j in range(lay.window_first_page, lay.window_first_page + lay.window_pages):
            if j not in sp.window:
                sp.window[j] = self._take()
        self.peak_used_pages = max(self.peak_used_pages, self.num_used)
        return True

    def release(self, seq_id: int) -> None:
        """Every page of ``seq_id`` back to the pool (finish, abort, preemption); no-op if none."""
        sp = self.seqs.pop(seq_id, None)
        if sp is not None:
            for page in sp.pages():
                self._release(page)

    def fork(self, parent_id: int, child_id: int, num_computed: int, parent_slot: int, child_slot: int) -> None:
        """``child_id`` continues ``parent_id`` at ``num_computed`` tokens: full stable compressed
        pages and full window pages shared, partial ones copied (every attamba layer), the state slot
        copied. NoFreeBlocksError (nothing changed) if the pool lacks pages for the copies."""
        src = self.seqs.get(parent_id, SeqPages())
        bs, c = self.block_size, int(num_computed)
        stable = self.layout(c, c).stable_rows if c > 0 else 0
        share_c = [(i + 1) * bs <= stable for i in range(len(src.compressed))]
        share_w = {j: (j + 1) * bs <= c for j in src.window}
        copies = share_c.count(False) + sum(1 for s in share_w.values() if not s)
        if copies > self.num_free:
            raise kvplug.NoFreeBlocksError(f"attamba: forking needs {copies} free pages to copy, the pool has "
                                           f"{self.num_free}")
        plan: List[Tuple[int, int]] = []

        def child_page(page: int, shared: bool) -> int:
            if shared:
                self._refs[page] += 1
                return page
            dst = self._take()
            plan.append((page, dst))
            return dst

        child = SeqPages([child_page(p, s) for p, s in zip(src.compressed, share_c)],
                         {j: child_page(p, share_w[j]) for j, p in src.window.items()})
        if plan:
            self.cache.copy_blocks(plan)
        if parent_slot >= 0 and child_slot >= 0:
            self.cache.copy_state(parent_slot, child_slot)
        self.seqs[child_id] = child
        self.num_page_copies += len(plan)
        self.peak_used_pages = max(self.peak_used_pages, self.num_used)

    # -------------------------------------------------------------------------------------------
    # One step
    # -------------------------------------------------------------------------------------------
    def update_plan(self, entries: Sequence[Tuple[int, int, int]], state_slots: np.ndarray) -> None:
        """The step's plan for the attamba layers. ``entries``: (seq_id, p0, n) per batch entry, in
        batch order, each prepared; ``state_slots``: their state slots."""
        bs = self.block_size
        qsl = np.zeros(len(entries) + 1, np.int32)
        lens = np.empty(len(entries), np.int32)
        indptr = np.zeros(len(entries) + 1, np.int32)
        indices: List[int] = []
        slots: List[np.ndarray] = []
        p0s = np.empty(len(entries), np.int32)
        for b, (seq_id, p0, n) in enumerate(entries):
            lay = self.layout(n, p0)
            sp = self.seqs[seq_id]
            first = lay.window_first_page
            window = [sp.window[j] for j in range(first, first + lay.window_pages)]
            indices.extend(sp.compressed[:lay.compressed_pages])
            indices.extend(window)
            indptr[b + 1] = len(indices)
            qsl[b + 1] = qsl[b] + n - p0
            lens[b] = lay.seq_len
            p0s[b] = p0
            pos = np.arange(p0, n, dtype=np.int64)
            pages = np.asarray(window, np.int64)[pos // bs - first]
            slots.append(pages * bs + pos % bs)
        self.plan.update(qsl, lens, block_size=bs, kv_indptr=indptr, kv_indices=np.asarray(indices, np.int32),
                         slot_mapping=np.concatenate(slots) if slots else np.zeros(0, np.int64),
                         state_slots=state_slots, context_lens=np.zeros(len(entries), np.int32),
                         query_pos_starts=p0s)

    def check_no_leaks(self) -> List[str]:
        """Problems (empty when every page is free and no sequence is left)."""
        problems = []
        if self.seqs:
            problems.append(f"attamba pages of {len(self.seqs)} sequences still held")
        if self.num_free != self.num_blocks or int(self._refs.sum()) != 0:
            problems.append(f"attamba pages free {self.num_free} of {self.num_blocks}")
        return problems

    def close(self) -> None:
        self.plan.close()
        self.cache.close()
