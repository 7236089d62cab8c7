"""Continuous batching over kvplug's block manager, as vLLM's scheduler does it.

Every step gets a token budget (``max_num_batched_tokens``) and at most ``max_num_seqs`` sequences.
It is filled in priority order (first come, first served):

1. **Running** requests, oldest first: each takes its pending tokens (one for a decode, the next
   chunk of a prompt for a prefill: chunked prefill) while the budget lasts. A decode first appends
   its last sampled token to the block manager; when no block is left for it, the *newest* running
   request is preempted (possibly the one asking), until the append fits.
2. **Swapped** requests come back (``BlockManager.swap_in`` + ``KvCache.swap_in``) when their
   blocks fit above the watermark, unless this step preempted someone.
3. **Waiting** requests are admitted when ``BlockManager.can_allocate`` says OK (it counts cached
   prefix blocks as free and keeps the watermark), unless this step preempted someone or a swapped
   request is still waiting to come back. ``allocate`` returns how many leading tokens the prefix
   cache already holds: those are never computed again.

Preemption swaps the victim to host blocks (``BlockManager.swap_out`` gives the copy plan, which
``KvCache.swap_out`` carries out at once, before any device block is reused) or, with
``preemption_mode="recompute"`` or a full host pool, frees it: it goes back to the waiting queue
with its prompt plus the tokens it has sampled, and the prefix cache usually gives most of them back.

Block copies (swap plans, copy-on-write) are executed synchronously, in the order they are decided,
so a block released by a swap-out is never overwritten before its contents reached the host.

Star Attention: with a Star layer anywhere, ordinary allocation keys the prefix cache with the
request's context length as ``extra_key`` (a Star layer's K/V of a token depends on whether it is
context). With Star on every layer (one layout, blocks a multiple of the page size) and prefix
caching on, admission uses ``BlockManager.allocate_star``: a context block depends only on the
anchor and its own tokens, so every unchanged block hits even after a change before it. The hits
need not be leading: the request then gets one batch entry per missing run of tokens (seq_len the
end of the run, its tokens only), up to ``max_num_seqs`` extra entries per step.

Per-sequence state (KV shifting attention keeps the raw K/V of each sequence's last token in its
state slot, per layer; ``refill_state``): the block manager hands every sequence a state slot at
allocation and the runner passes it in every batch. A swapped sequence keeps its slot (only pages
move). A recomputed one restarts at position 0, where the state is not read. A sequence admitted with
c > 0 cached tokens needs the raw K/V of token c - 1, which the cache does not hold (it holds the
mixed K^): its first entry re-runs token c - 1 with slot -1 (``ScheduledSeq.refill``: q_len n + 1,
seq_len c + n; the refill costs one token of the budget; with a budget of one it runs alone, q_len 1,
seq_len c), which rewrites the state and leaves the pages as they are.

Attamba layers (``attamba``, an :class:`.attamba.AttambaPages`) keep their compressed cache in a
page pool of their own: the scheduler prepares each entry's pages for its step (window pages the
step no longer reaches go back), preempts the newest running request when that pool is short (as
for block-manager blocks; counted in ``num_attamba_preemptions``), admits a request only when its
first step fits above the pool's watermark, and returns a request's pages when it finishes or is
preempted. Preemption always recomputes in such models (a swap would have to move both caches;
``preemption_mode="swap"`` falls back), and the engine turns prefix caching off for them (see
:mod:`.attamba`), so no refill ever happens there.
"""
from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import kvplug

from .config import EngineConfig
from .request import Request, RequestStatus, now

if TYPE_CHECKING:
    from .attamba import AttambaPages


@dataclasses.dataclass
class ScheduledSeq:
    req: Request
    start: int       # first position computed this step (num_computed_tokens before it)
    num_tokens: int  # query tokens this step (not counting the refill token)
    #: Re-run token start - 1 first, with slot -1, to refill the state after a prefix-cache hit.
    refill: bool = False

    @property
    def num_query_tokens(self) -> int:
        """The entry's rows in the batch: its tokens plus the refill token."""
        return self.num_tokens + int(self.refill)

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start >= self.req.prompt_len


@dataclasses.dataclass
class SchedulerOutput:
    seqs: List[ScheduledSeq]
    rejected: List[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_query_tokens for s in self.seqs)


@dataclasses.dataclass
class SchedulerStats:
    """Counters, cumulative since the engine started."""

    num_steps: int = 0
    num_scheduled_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_mixed_steps: int = 0          # steps batching prefill chunks with decodes
    num_chunked_prefills: int = 0     # prefill chunks that stopped short of the prompt's end
    max_batch_seqs: int = 0
    max_batch_tokens: int = 0
    num_admitted: int = 0
    num_preemptions: int = 0
    num_swap_outs: int = 0
    num_swap_ins: int = 0
    num_recomputes: int = 0
    num_blocks_swapped_out: int = 0
    num_blocks_swapped_in: int = 0
    num_cow_copies: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_rejected: int = 0
    prompt_tokens_admitted: int = 0   # tokens handed to allocate (prompts, plus outputs on recompute)
    cached_tokens_admitted: int = 0   # of those, served by the prefix cache
    star_prefix_hit_blocks: int = 0   # Star context blocks served whole by allocate_star (hits need not lead)
    star_non_leading_hit_tokens: int = 0  # cached tokens after the first token to compute
    num_state_refills: int = 0        # prefix hits whose last cached token was re-run with slot -1
    num_attamba_preemptions: int = 0  # preemptions because the attamba layers' page pool was short
    num_forks: int = 0                # LLMEngine.fork_request children
    peak_used_blocks: int = 0
    peak_running: int = 0

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


class Scheduler:
    """Owns the request queues and every block-manager call; executes block copies on ``cache``."""

    def __init__(self, cfg: EngineConfig, bm: kvplug.BlockManager, cache: Optional[kvplug.KvCache], *,
                 star_keys: bool = False, star_layout: Optional[Tuple[int, int]] = None,
                 refill_state: bool = False, attamba: Optional["AttambaPages"] = None) -> None:
        """``cache``: the token-stream layers' cache (None when every layer is attamba).
        ``star_keys``: some layer runs Star (prefix keys then carry the context length).
        ``star_layout``: (context_block_size, anchor_size) to allocate with Star keys
        (allocate_star), or None for ordinary allocation. ``refill_state``: some layer keeps
        per-sequence state, so a prefix-cache hit re-runs its last cached token first.
        ``attamba``: the attamba layers' pages (None without attamba layers)."""
        self.cfg = cfg
        self.bm = bm
        self.cache = cache
        self.attamba = attamba
        self.star_keys = star_keys
        self.star_layout = star_layout
        self.refill_state = refill_state
        #: Batch entries beyond one per sequence a step may use (Star prefix hits that do not lead).
        self.max_extra_entries = cfg.max_num_seqs if star_layout is not None else 0
        self.waiting: List[Request] = []
        self.running: List[Request] = []
        self.swapped: List[Request] = []
        self.requests: Dict[str, Request] = {}
        self.stats = SchedulerStats()

    # -------------------------------------------------------------------------------------------
    # Queues
    # -------------------------------------------------------------------------------------------
    @staticmethod
    def _insort(queue: List[Request], req: Request) -> None:
        keys = [r.priority() for r in queue]
        queue.insert(bisect.bisect(keys, req.priority()), req)

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        req.status = RequestStatus.WAITING
        self._insort(self.waiting, req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request: release its blocks (device or host) and drop it from every queue."""
        if req.status in (RequestStatus.RUNNING, RequestStatus.SWAPPED):
            self.bm.free(req.seq_id)
            if self.attamba is not None:
                self.attamba.release(req.seq_id)
        for q in (self.waiting, self.running, self.swapped):
            if req in q:
                q.remove(req)
        req.status = status
        req.finish_time = now()
        self.requests.pop(req.request_id, None)
        if status is RequestStatus.FINISHED_ABORTED:
            self.stats.num_aborted += 1
        elif status is RequestStatus.FINISHED_REJECTED:
            self.stats.num_rejected += 1
        else:
            self.stats.num_finished += 1

    def abort(self, request_id: str) -> Optional[Request]:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    # -------------------------------------------------------------------------------------------
    # Preemption
    # -------------------------------------------------------------------------------------------
    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        victim.num_preemptions += 1
        self.stats.num_preemptions += 1
        if self.cfg.preemption_mode == "swap" and self.cfg.num_host_blocks > 0 and self.attamba is None:
            try:
                copies = self.bm.swap_out(victim.seq_id)
            except kvplug.NoFreeBlocksError:
                copies = None  # host pool full: recompute instead
            if copies is not None:
                self.cache.swap_out(copies)  # now: the device blocks may be handed out next
                victim.status = RequestStatus.SWAPPED
                self._insort(self.swapped, victim)
                self.stats.num_swap_outs += 1
                self.stats.num_blocks_swapped_out += len(copies)
                return
        self.bm.free(victim.seq_id)
        if self.attamba is not None:
            self.attamba.release(victim.seq_id)
        victim.num_computed_tokens = 0
        victim.cached_ranges = []
        victim.num_bm_tokens = 0
        victim.needs_state_refill = False  # restarts at position 0 (or refills at its next hit)
        victim.status = RequestStatus.WAITING
        self._insort(self.waiting, victim)
        self.stats.num_recomputes += 1

    def _allocate_star(self, req: Request) -> int:
        """allocate_star: Star keys for the context; the cached pages become ``req.cached_ranges``
        (leading ones advance ``num_computed_tokens``). Returns the cached tokens."""
        assert self.star_layout is not None
        cbs, anchor = self.star_layout
        bs = self.cfg.block_size
        context = min(req.context_len, len(req.token_ids))
        pages, cached = self.bm.allocate_star(req.seq_id, req.token_ids, context_len=context, context_block_size=cbs,
                                              anchor_size=anchor)
        ranges: List[Tuple[int, int]] = []
        for i in map(int, (pages != 0).nonzero()[0]):
            lo, hi = i * bs, min((i + 1) * bs, len(req.token_ids))
            if ranges and ranges[-1][1] == lo:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
        req.num_computed_tokens = 0
        req.cached_ranges = ranges
        req.skip_cached()
        self.stats.star_non_leading_hit_tokens += cached - req.num_computed_tokens
        # Star context blocks served whole: every page wholly inside the block's context is cached.
        for k in range(-(-context // cbs)):
            first, last = k * cbs // bs, min((k + 1) * cbs, context) // bs  # pages [first, last)
            if last > first and pages[first:last].all():
                self.stats.star_prefix_hit_blocks += 1
        return cached

    def _append_pending(self, req: Request, may_preempt: bool) -> bool:
        """Give the block manager the tokens sampled since ``req`` was last scheduled. Preempts the
        newest running requests if blocks run out (``may_preempt``). False if ``req`` could not
        get its blocks (it was preempted itself, or may not preempt)."""
        need = len(req.token_ids) - req.num_bm_tokens
        if need <= 0:
            return True
        while not self.bm.can_append(req.seq_id, need):
            if not may_preempt:
                return False
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        copy = self.bm.append(req.seq_id, req.token_ids[req.num_bm_tokens:])
        if copy is not None:  # the last block was shared (after a fork): copy on write first
            if self.cache is not None:  # (no token-stream layer: the blocks hold nothing)
                self.cache.copy_blocks([copy])
            self.stats.num_cow_copies += 1
        req.num_bm_tokens = len(req.token_ids)
        return True

    def _next_step_tokens(self, req: Request, budget: int) -> Tuple[int, int]:
        """(start, n): the positions ``take`` gives ``req``'s entry with this budget (attamba models
        have neither cached ranges nor refills: one entry)."""
        req.skip_cached()
        start = req.num_computed_tokens
        return start, min(len(req.token_ids) - start, budget)

    def _prepare_attamba(self, req: Request, budget: int, may_preempt: bool) -> bool:
        """Pages of the attamba layers for ``req``'s next step. Preempts the newest running requests
        while the pool is short (``may_preempt``). False if ``req`` could not get them (it was
        preempted itself, or may not preempt)."""
        if self.attamba is None:
            return True
        start, n = self._next_step_tokens(req, budget)
        if n <= 0:
            return True
        while not self.attamba.prepare(req.seq_id, start, start + n):
            if not may_preempt:
                return False
            victim = self.running[-1]
            self._preempt(victim)
            self.stats.num_attamba_preemptions += 1
            if victim is req:
                return False
        return True

    # -------------------------------------------------------------------------------------------
    # One step
    # -------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.cfg
        budget = cfg.max_num_batched_tokens
        out: List[ScheduledSeq] = []
        rejected: List[Request] = []
        preempted_before = self.stats.num_preemptions

        extra = self.max_extra_entries

        def take(req: Request) -> None:
            """The request's next tokens within the budget: one entry, or (cached ranges ahead) one
            entry per run of tokens to compute, each ending where the next cached range starts."""
            nonlocal budget, extra
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now()
            req.skip_cached()
            pos, ranges, i, entries = req.num_computed_tokens, req.cached_ranges, 0, 0
            while budget > 0 and pos < len(req.token_ids):
                while i < len(ranges) and ranges[i][0] <= pos:
                    pos = max(pos, ranges[i][1])
                    i += 1
                if pos >= len(req.token_ids):
                    break
                if entries:
                    if extra <= 0:
                        break
                    extra -= 1
                end = ranges[i][0] if i < len(ranges) else len(req.token_ids)
                refill = req.needs_state_refill and pos == req.num_computed_tokens and pos > 0
                n = min(end - pos, budget - int(refill))
                if self.attamba is not None:  # prepared just before (same positions): never short here
                    assert not refill and not entries, "attamba models have no prefix hits"
                    if not self.attamba.prepare(req.seq_id, pos, pos + n):
                        raise AssertionError(f"attamba pages of request {req.request_id} were not prepared")
                out.append(ScheduledSeq(req, pos, n, refill=refill))
                budget -= n + int(refill)
                if refill:
                    req.needs_state_refill = False
                    self.stats.num_state_refills += 1
                pos += n
                entries += 1
                if n == 0:
                    break  # the refill alone filled the budget

        # 1. Running, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if not self._append_pending(req, may_preempt=True):
                break  # it preempted itself: it was the newest, nothing runs after it
            if not self._prepare_attamba(req, budget, may_preempt=True):
                break  # likewise, for the attamba layers' pages
            take(req)
            i += 1
        preempted = self.stats.num_preemptions != preempted_before

        # 2. Swapped back in, oldest first, while their blocks fit above the watermark.
        while not preempted and self.swapped and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.swapped[0]
            need = cfg.blocks_for(len(req.token_ids))  # its blocks plus room for the pending token
            st = self.bm.stats()
            if st.num_free_blocks + st.num_cached_free_blocks - need < cfg.watermark_blocks:
                break
            copies = self.bm.swap_in(req.seq_id)
            self.cache.swap_in(copies)
            self.stats.num_swap_ins += 1
            self.stats.num_blocks_swapped_in += len(copies)
            self.swapped.pop(0)
            req.status = RequestStatus.RUNNING
            self._insort(self.running, req)
            if self._append_pending(req, may_preempt=False) and self._prepare_attamba(req, budget, may_preempt=False):
                take(req)

        # 3. Waiting, in order, while the block manager admits them.
        while (not preempted and not self.swapped and self.waiting and budget > 0
               and len(self.running) < cfg.max_num_seqs):
            req = self.waiting[0]
            extra_key = req.context_len if self.star_keys and self.star_layout is None else 0
            verdict = self.bm.can_allocate(req.token_ids, extra_key=extra_key)
            if verdict == kvplug.AllocVerdict.NEVER:
                self.waiting.pop(0)
                req.error = (f"{len(req.token_ids)} tokens can never fit {cfg.num_device_blocks} blocks of "
                             f"{cfg.block_size} (watermark {cfg.watermark})")
                self.finish(req, RequestStatus.FINISHED_REJECTED)
                rejected.append(req)
                continue
            if verdict != kvplug.AllocVerdict.OK:
                break
            if self.attamba is not None and not self.attamba.can_admit(req.seq_id, 0, min(len(req.token_ids), budget)):
                break  # its first step's attamba pages do not fit above the watermark
            if self.star_layout is not None:
                cached = self._allocate_star(req)
            else:
                cached = self.bm.allocate(req.seq_id, req.token_ids, extra_key=extra_key)
                req.num_computed_tokens = cached
                req.needs_state_refill = self.refill_state and cached > 0
            self.waiting.pop(0)
            req.num_bm_tokens = len(req.token_ids)
            req.num_cached_tokens_total += cached
            if req.num_preemptions == 0:
                req.num_cached_prompt_tokens = cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)  # it is the newest: priority order holds
            self.stats.num_admitted += 1
            self.stats.prompt_tokens_admitted += len(req.token_ids)
            self.stats.cached_tokens_admitted += cached
            take(req)

        # Bookkeeping.
        st = self.stats
        if out:
            st.num_steps += 1
            ntok = sum(s.num_query_tokens for s in out)
            st.num_scheduled_tokens += ntok
            decodes = sum(1 for s in out if s.is_decode)
            prefill_seqs = [s for s in out if not s.is_decode]
            st.num_decode_tokens += decodes
            st.num_prefill_tokens += ntok - decodes
            st.num_chunked_prefills += sum(1 for s in prefill_seqs if s.start + s.num_tokens < len(s.req.token_ids))
            if decodes and prefill_seqs:
                st.num_mixed_steps += 1
            st.max_batch_seqs = max(st.max_batch_seqs, len(out))
            st.max_batch_tokens = max(st.max_batch_tokens, ntok)
            for s in prefill_seqs:
                s.req.num_prefill_chunks += 1
        st.peak_running = max(st.peak_running, len(self.running))
        bm = self.bm.stats()
        st.peak_used_blocks = max(st.peak_used_blocks, bm.num_used_blocks)
        return SchedulerOutput(out, rejected)
