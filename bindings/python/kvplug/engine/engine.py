"""The engine: requests in, tokens out, one batched model step at a time.

Per step (what ``bench/demo.cc`` does, with a real model):

1. the scheduler picks the batch (continuous batching, chunked prefill, admission, preemption and
   swap plans: :mod:`.scheduler`);
2. the runner builds the flat batch: token ids, positions, ``query_start_loc``, ``seq_lens``
   (computed tokens after this step), block tables (``BlockManager.block_tables``) and the slot
   mapping (``BlockManager.slot_mapping``), and updates the one ``kvplug.Plan`` of the step;
3. the model runs; each layer writes its K/V through its backend at the plan's slot mapping and
   runs attention (``Attention.write_kv`` + ``Attention.run``), or the torch reference;
4. the rows that need logits go through the LM head and are sampled;
5. every scheduled sequence is marked computed (``BlockManager.mark_computed``: full blocks join
   the prefix cache), sampled tokens are appended to their requests, finished requests free their
   blocks.

Every batch carries ``context_lens`` (each request's prompt length minus its ``query_len``): Star
Attention layers encode the context blockwise (phase 1) and the rest over everything (phase 2);
other backends ignore it. See :mod:`.scheduler` for Star prefix keys.

With a layer that keeps per-sequence state (``kv_shift``), the block manager and the cache get
``max_num_seqs`` state slots of ``kvp_attention_state_bytes`` per layer, every batch carries each
sequence's ``state_slots``, and a sequence admitted after a prefix-cache hit re-runs its last cached
token with slot -1 first (see :mod:`.scheduler`). kv_shift layers get pre-RoPE keys (the backend
mixes, then rotates them with the model's ``rope_theta``); the model rotates the queries.

Attamba layers keep their compressed cache in pages of their own (:mod:`.attamba`): a second cache
(the attamba layers only), a second plan per step (their page lists, the layout's seq_lens, each
token's window slot, ``query_pos_starts``) and the SSM callable the model's attamba layers call
(``kvp_attention_ssm``, state in that cache's state slots, which the block manager hands out); the
token-stream cache then holds the other layers only (none: no such cache). Prefix caching is off and
preemption recomputes in models with an attamba layer (reasons in :mod:`.attamba`).
"""
from __future__ import annotations

import itertools
import json
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

import kvplug

from .attamba import AttambaPages
from .config import TORCH_REFERENCE, EngineConfig, EngineConfigError, ModelConfig, ModelConfigLike
from .model import (AttambaSsm, KvplugAttambaAttention, KvplugAttention, LlamaForCausalLM, StepBatch,
                    TorchReferenceAttention)
from .request import Request, RequestOutput, RequestStatus, SamplingParams, now
from .sampling import sample
from .scheduler import Scheduler, SchedulerOutput
from .telemetry import EntropyTelemetry

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_model_config(model_config: ModelConfigLike, engine_config: EngineConfig) -> ModelConfig:
    if isinstance(model_config, ModelConfig):
        model_config.check_backends(kv_cache_dtype=engine_config.kv_cache_dtype, device=engine_config.device)
        return model_config
    if isinstance(model_config, str):
        return ModelConfig.from_json(model_config, kv_cache_dtype=engine_config.kv_cache_dtype,
                                     device=engine_config.device)
    return ModelConfig.from_dict(model_config, kv_cache_dtype=engine_config.kv_cache_dtype, device=engine_config.device)


def _entropy_brief(t: List[float], num_heads: int) -> str:
    """An entropy layer's temperature table in a few characters: its shape and range."""
    if not t:
        return "{t=1}"
    return f"{{t [{num_heads}x{len(t) // num_heads}] in [{min(t):.3g}, {max(t):.3g}]}}"


class LLMEngine:
    """A serving engine over libkvplug for a Llama-architecture model.

    ``model_config``: a :class:`ModelConfig`, a dict, JSON text or a JSON file path. Every layer's
    backend is resolved against the loaded library first: an unknown name or a bad config raises
    before weights are made or a cache is allocated. ``model``: reuse built weights (tests).
    """

    def __init__(self, model_config: ModelConfigLike, engine_config: Optional[EngineConfig] = None,
                 model: Optional[LlamaForCausalLM] = None, dtype: str = "float32") -> None:
        ec = engine_config or EngineConfig()
        ec.check()
        mc = resolve_model_config(model_config, ec)  # raises before any work on a bad backend
        if dtype not in _TORCH_DTYPES:
            raise EngineConfigError(f"dtype={dtype!r} must be one of {sorted(_TORCH_DTYPES)}")
        self.model_config = mc
        self.config = ec
        self.device = torch.device(ec.device)
        if ec.device == "cpu" and ec.torch_threads > 0:
            torch.set_num_threads(ec.torch_threads)
        self.dtype = _TORCH_DTYPES[dtype]

        # The model.
        if model is None:
            model = LlamaForCausalLM(mc)
            model.load_weights(mc.weights)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()

        # kvplug: context, block manager, paged cache, one plan per step, one attention per layer.
        stream = None
        if ec.device == "cuda":
            stream = torch.cuda.current_stream().cuda_stream or None
        self.ctx = kvplug.Context(ec.device, num_threads=ec.num_threads, stream=stream)
        self.layer_attention: List[Any] = []
        for i, spec in enumerate(mc.layer_attention):
            if spec.backend == TORCH_REFERENCE:
                self.layer_attention.append(TorchReferenceAttention(spec, mc))
            elif spec.is_attamba:
                self.layer_attention.append(KvplugAttambaAttention(self.ctx, spec, mc, ec.kv_cache_dtype, i))
            else:
                self.layer_attention.append(KvplugAttention(self.ctx, spec, mc, ec.kv_cache_dtype, i))
        # Which cache each layer's K/V lives in, at which of its layers: the token-stream cache for
        # every layer but the attamba ones, which have theirs (.attamba).
        self.token_layers = tuple(i for i, s in enumerate(mc.layer_attention) if not s.is_attamba)
        self.cache_layer = {i: k for k, i in enumerate(self.token_layers)}
        self.cache_layer.update({i: k for k, i in enumerate(mc.attamba_layers)})
        # Per-sequence state (kv_shift, attamba): one state slot per sequence alive, sized for the
        # hungriest layer of each cache. Running plus swapped sequences never exceed max_num_seqs
        # (admission waits for the swapped ones), and can_allocate says LATER when no slot is free.
        token_state = max((self.layer_attention[i].attn.state_bytes for i in self.token_layers
                           if isinstance(self.layer_attention[i], KvplugAttention)), default=0)
        self.state_bytes_per_layer = max((a.attn.state_bytes for a in self.layer_attention
                                          if isinstance(a, KvplugAttention)), default=0)
        self.num_state_slots = ec.max_num_seqs if self.state_bytes_per_layer > 0 else 0
        # Attamba models: no prefix caching (its hits cannot cover the attamba layers' own pages).
        self.prefix_caching = ec.enable_prefix_caching and not mc.attamba_layers
        self.bm = kvplug.BlockManager(block_size=ec.block_size, num_device_blocks=ec.num_device_blocks,
                                      num_host_blocks=ec.num_host_blocks,
                                      enable_prefix_caching=self.prefix_caching, watermark=ec.watermark,
                                      num_state_slots=self.num_state_slots)
        self.cache: Optional[kvplug.KvCache] = None
        if self.token_layers:
            self.cache = kvplug.KvCache(self.ctx, num_layers=len(self.token_layers), num_blocks=ec.num_device_blocks,
                                        block_size=ec.block_size, num_kv_heads=mc.num_key_value_heads,
                                        head_size=mc.head_dim, dtype=ec.kv_cache_dtype,
                                        num_host_blocks=ec.num_host_blocks,
                                        num_state_slots=self.num_state_slots if token_state else 0,
                                        state_bytes_per_layer=token_state)
        self.attamba: Optional[AttambaPages] = None
        if mc.attamba_layers:
            self.attamba = AttambaPages(self.ctx, mc, ec, [self.layer_attention[i].attn for i in mc.attamba_layers],
                                        self.num_state_slots)
        self.raw_key_layers = frozenset(i for i, s in enumerate(mc.layer_attention) if s.fuses_key_rope)
        self.max_blocks_per_seq = ec.blocks_for(mc.max_position_embeddings)
        # Star: prefix keys of Star blocks when every layer is Star with one page-aligned layout.
        # The Star layout the statistics count blocks by: the Star layers' (the first one's when they differ).
        self.star_layout = mc.star_layout or (mc.layer_attention[mc.star_layers[0]].star_params()
                                              if mc.star_layers else None)
        star_prefix = None
        if ec.enable_prefix_caching and mc.all_star and mc.star_layout is not None:
            cbs, anchor = self.star_layout
            if cbs % ec.block_size == 0 and 1 <= anchor <= cbs:
                star_prefix = self.star_layout
        self.star_prefix_layout = star_prefix
        self.scheduler = Scheduler(ec, self.bm, self.cache, star_keys=bool(mc.star_layers), star_layout=star_prefix,
                                   refill_state=self.num_state_slots > 0, attamba=self.attamba)
        max_entries = ec.max_num_seqs + self.scheduler.max_extra_entries
        self.plan = kvplug.Plan(self.ctx, max_num_seqs=max_entries, max_num_tokens=ec.max_num_batched_tokens,
                                max_num_blocks=max_entries * self.max_blocks_per_seq)
        for i in self.token_layers:
            a = self.layer_attention[i]
            if isinstance(a, KvplugAttention):
                # Plan-side step buffers are allocated here, once, not at the first run (the attamba
                # layers' plan: AttambaPages).
                self.plan.attach(a.attn)

        # Entropy telemetry: each reporting layer's runs write into its slice of one step buffer.
        self.entropy: Optional[EntropyTelemetry] = None
        if ec.entropy_telemetry:
            reporting = [i for i, a in enumerate(self.layer_attention) if isinstance(a, KvplugAttention)
                         and kvplug.backend_device_info(a.spec.backend, ec.device).supports_entropy]
            self.entropy = EntropyTelemetry(mc.num_hidden_layers, mc.num_attention_heads, reporting,
                                            [s.backend for s in mc.layer_attention], self.device)
            for i in reporting:
                self.layer_attention[i].summary_out = self.entropy.step_buffer[i]

        self._seq_ids = itertools.count(1)
        self._seed_base = int(ec.seed)
        self.start_stats = self.bm.stats()
        self.step_times: List[float] = []
        self.num_generated_tokens = 0
        self.num_prompt_tokens_computed = 0
        self.star_context_blocks_encoded = 0  # Star context blocks whose last token was computed
        self.star_anchor_reuse_blocks = 0     # of those, blocks k > 0: they read the anchor's pages

    # -------------------------------------------------------------------------------------------
    # Requests
    # -------------------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: Sequence[int], params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None, arrival_time: Optional[float] = None,
                    query_len: int = 0) -> str:
        """Queue a request; returns its id. ValueError for one that can never be served (empty,
        ids outside the vocabulary, longer than the model or the block pool allows).

        ``query_len``: how many trailing prompt tokens are the query; the rest is context (Star
        layers encode it blockwise; see :class:`.request.Request`). 0: the whole prompt is context,
        and the first output token is sampled from the last context token."""
        params = params or SamplingParams()
        mc = self.model_config
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("prompt_token_ids is empty")
        bad = [t for t in ids if not 0 <= t < mc.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {mc.vocab_size})")
        self._check_fits(len(ids), params.max_tokens)
        seq_id = next(self._seq_ids)
        request_id = str(seq_id) if request_id is None else str(request_id)
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        gen = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._seed_base * 1_000_003 + seq_id
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
        req = Request(request_id, seq_id, ids, params, now() if arrival_time is None else arrival_time, gen,
                      query_len=query_len)
        if params.prompt_logits:
            req.prompt_logits = torch.full((len(ids), mc.vocab_size), float("nan"))
        self.scheduler.add(req)
        return request_id

    def _check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """ValueError for a request that can never be served: longer than the model, or than the
        block pool (or the attamba pool) can hold alone."""
        mc, ec = self.model_config, self.config
        total = prompt_len + max_tokens
        if total > mc.max_position_embeddings:
            raise ValueError(f"prompt ({prompt_len}) + max_tokens ({max_tokens}) = {total} exceeds "
                             f"max_position_embeddings={mc.max_position_embeddings}")
        if ec.blocks_for(total) > ec.num_device_blocks - ec.watermark_blocks:
            raise ValueError(f"prompt ({prompt_len}) + max_tokens ({max_tokens}) needs {ec.blocks_for(total)} "
                             f"blocks of {ec.block_size}; the pool has {ec.num_device_blocks} "
                             f"(watermark {ec.watermark_blocks})")
        if self.attamba is not None:
            need = self.attamba.max_pages(total)
            if need > self.attamba.num_blocks - self.attamba.watermark_blocks:
                raise ValueError(f"prompt ({prompt_len}) + max_tokens ({max_tokens}) needs up to {need} attamba "
                                 f"pages of {ec.block_size} rows (compressed rows + window); the pool has "
                                 f"{self.attamba.num_blocks} (watermark {self.attamba.watermark_blocks})")

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request wherever it is (waiting, running, swapped); its blocks, device or host, are
        freed at once. Returns its final output (finish_reason "abort"), or None if unknown."""
        req = self.scheduler.abort(str(request_id))
        return None if req is None else req.output()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def fork_request(self, request_id: str, params: Optional[SamplingParams] = None,
                     child_request_id: Optional[str] = None) -> str:
        """Fork a running request between steps (parallel sampling): the child starts with the
        parent's tokens, outputs and logits so far and continues on its own, with ``params``
        (default: the parent's; sampled children get their own generator). The block manager shares
        every block (copy on write when either appends), the state slot is copied in every cache
        (kv_shift's raw last K/V, attamba's SSM states) and attamba pages are shared where full and
        immutable, copied where partial (:meth:`.attamba.AttambaPages.fork`). The parent must be
        decoding: every token but the one it just sampled computed. Returns the child's request id.
        ValueError when it cannot fork (not running, mid-prefill, max_num_seqs reached, no room for
        the copies)."""
        sch, bm = self.scheduler, self.bm
        parent = sch.requests.get(str(request_id))
        if parent is None or parent.status is not RequestStatus.RUNNING:
            raise ValueError(f"request {request_id!r} is not running (status "
                             f"{parent.status.value if parent is not None else 'unknown'}): only running requests fork")
        if parent.num_computed_tokens != len(parent.token_ids) - 1 or parent.num_bm_tokens != parent.num_computed_tokens:
            raise ValueError(f"request {request_id!r} is not between decode steps ({parent.num_computed_tokens} of "
                             f"{len(parent.token_ids)} tokens computed): fork after a step that sampled its token")
        if len(sch.running) + len(sch.swapped) >= self.config.max_num_seqs:
            raise ValueError(f"max_num_seqs={self.config.max_num_seqs} sequences are running or swapped: no room for "
                             f"a fork")
        params = params or parent.params
        self._check_fits(parent.prompt_len, params.max_tokens)
        seq_id = next(self._seq_ids)
        child_id = str(seq_id) if child_request_id is None else str(child_request_id)
        if child_id in sch.requests:
            raise ValueError(f"request id {child_id!r} is already in use")
        gen = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._seed_base * 1_000_003 + seq_id
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
        child = Request(child_id, seq_id, parent.prompt_token_ids, params, now(), gen, query_len=parent.query_len)
        c = parent.num_computed_tokens
        try:
            bm.fork(parent.seq_id, seq_id)
        except kvplug.KvplugError as e:
            raise ValueError(f"request {request_id!r}: the block manager cannot fork it: {e}") from e
        parent_slot, child_slot = bm.state_slot(parent.seq_id), bm.state_slot(seq_id)
        try:
            if self.attamba is not None:
                self.attamba.fork(parent.seq_id, seq_id, c, parent_slot, child_slot)
        except kvplug.NoFreeBlocksError as e:
            bm.free(seq_id)
            raise ValueError(f"request {request_id!r}: {e}") from e
        if self.cache is not None and self.cache.num_state_slots > 0 and child_slot >= 0:
            self.cache.copy_state(parent_slot, child_slot)
        child.token_ids = list(parent.token_ids)
        child.num_computed_tokens = child.num_bm_tokens = c
        child.first_scheduled_time = now()
        child.token_times = list(parent.token_times)
        child.output_logits = list(parent.output_logits)
        child.output_margins = list(parent.output_margins)
        child.num_prefill_chunks = parent.num_prefill_chunks
        if parent.prompt_logits is not None and params.prompt_logits:
            child.prompt_logits = parent.prompt_logits.clone()
        child.status = RequestStatus.RUNNING
        sch.requests[child_id] = child
        sch.running.append(child)  # the newest: priority order holds
        sch.stats.num_forks += 1
        return child_id

    # -------------------------------------------------------------------------------------------
    # One step
    # -------------------------------------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """Schedule, run the model once over the batch, sample. Returns the requests that got a
        token or finished (including rejected ones) in this step."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        outputs = [r.output() for r in sched.rejected]
        if sched.seqs:
            outputs += self._run(sched)
        self.step_times.append(time.perf_counter() - t0)
        return outputs

    def _run(self, sched: SchedulerOutput) -> List[RequestOutput]:
        ec, mc, bm = self.config, self.model_config, self.bm
        seqs = sched.seqs
        n = len(seqs)
        qsl = np.zeros(n + 1, np.int32)
        seq_lens = np.empty(n, np.int32)
        context_lens = np.empty(n, np.int32)
        state_slots = np.empty(n, np.int32) if self.num_state_slots else None
        input_ids: List[int] = []
        positions: List[int] = []
        slots: List[np.ndarray] = []
        width = 1
        for b, s in enumerate(seqs):
            r = s.req
            if state_slots is not None:
                state_slots[b] = bm.state_slot(r.seq_id)
            first = s.start - int(s.refill)  # a refill re-runs token start - 1, not stored (slot -1)
            qsl[b + 1] = qsl[b] + s.num_query_tokens
            seq_lens[b] = s.start + s.num_tokens
            context_lens[b] = r.context_len
            input_ids.extend(r.token_ids[first:s.start + s.num_tokens])
            positions.extend(range(first, s.start + s.num_tokens))
            if s.refill:
                slots.append(np.full(1, -1, np.int64))
            slots.append(bm.slot_mapping(r.seq_id, s.start, s.num_tokens))
            width = max(width, ec.blocks_for(r.num_bm_tokens))
        slot_mapping = np.concatenate(slots)
        table, _ = bm.block_tables([s.req.seq_id for s in seqs], max_blocks_per_seq=width)
        if self.cache is not None:
            self.plan.update(qsl, seq_lens, block_size=ec.block_size, block_table=table, slot_mapping=slot_mapping,
                             state_slots=state_slots if self.cache.num_state_slots else None,
                             context_lens=context_lens)
        batch = StepBatch(qsl, seq_lens, table, slot_mapping)
        layers, cache_layer = self.layer_attention, self.cache_layer
        attamba_layers = frozenset(mc.attamba_layers)
        plans = {i: self.plan for i in self.token_layers}
        caches: Dict[int, Any] = {i: self.cache for i in self.token_layers}
        if self.attamba is not None:
            assert state_slots is not None and not any(s.refill for s in seqs)
            self.attamba.update_plan([(s.req.seq_id, s.start, s.start + s.num_tokens) for s in seqs], state_slots)
            plans.update({i: self.attamba.plan for i in attamba_layers})
            caches.update({i: self.attamba.cache for i in attamba_layers})

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return layers[layer](plans[layer], caches[layer], batch, cache_layer[layer], q, k, v)

        def ssm(layer: int, which: int, block: AttambaSsm, zxbcdt: torch.Tensor) -> torch.Tensor:
            return layers[layer].ssm(plans[layer], caches[layer], cache_layer[layer], which, block, zxbcdt)

        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids_t, pos_t, attention, self.raw_key_layers, ssm if self.attamba is not None else None)
        if self.entropy is not None:
            self.entropy.end_step()  # device-side accumulation: no sync

        # Rows that need logits: the last token of every sequence that reaches its end this step
        # (it samples), and prompt positions of requests that asked for prompt logits.
        sample_rows: List[int] = []
        sample_seqs = []
        prompt_rows: List[int] = []
        prompt_dst = []
        for b, s in enumerate(seqs):
            r = s.req
            if r.params.prompt_logits and s.start < r.prompt_len:
                end = min(s.start + s.num_tokens, r.prompt_len)
                row0 = int(qsl[b]) + int(s.refill)  # the refill row's output is discarded
                prompt_rows.extend(range(row0, row0 + end - s.start))
                prompt_dst.append((r, s.start, end))
            if s.start + s.num_tokens == len(r.token_ids):
                sample_rows.append(int(qsl[b + 1]) - 1)
                sample_seqs.append(s)
        rows = sample_rows + prompt_rows
        logits = self.model.compute_logits(hidden[rows]) if rows else None
        if prompt_rows:
            assert logits is not None
            pl = logits[len(sample_rows):].cpu()
            k = 0
            for r, start, end in prompt_dst:
                r.prompt_logits[start:end] = pl[k:k + end - start]
                k += end - start
        tokens: List[int] = []
        margins: List[float] = []
        if sample_rows:
            assert logits is not None
            tokens, margins = sample(logits[: len(sample_rows)], [s.req for s in sample_seqs])

        # Publish what was computed, then append sampled tokens and retire finished requests.
        t = now()
        for s in seqs:
            r = s.req
            r.num_computed_tokens = s.start + s.num_tokens
            r.skip_cached()  # past the cached range this entry ran up to (Star prefix hits)
            bm.mark_computed(r.seq_id, r.num_computed_tokens)
            if s.start < r.prompt_len:
                self.num_prompt_tokens_computed += min(s.start + s.num_tokens, r.prompt_len) - s.start
            if self.star_layout is not None and s.start < r.context_len:
                self._count_star_blocks(r.context_len, s.start, s.start + s.num_tokens)
        outputs = []
        for i, s in enumerate(sample_seqs):
            r = s.req
            tok = tokens[i]
            r.token_ids.append(tok)
            r.token_times.append(t)
            r.output_margins.append(margins[i])
            if r.params.logits:
                assert logits is not None
                r.output_logits.append(logits[i].cpu())
            self.num_generated_tokens += 1
            p = r.params
            if tok in p.stop_token_ids or (not p.ignore_eos and mc.eos_token_id is not None and tok == mc.eos_token_id):
                self.scheduler.finish(r, RequestStatus.FINISHED_STOPPED)
            elif r.num_output_tokens >= p.max_tokens:
                self.scheduler.finish(r, RequestStatus.FINISHED_LENGTH)
            outputs.append(r.output())
        return outputs

    def _count_star_blocks(self, context_len: int, start: int, end: int) -> None:
        """Star context blocks whose last token lies in [start, end): encoded now."""
        assert self.star_layout is not None
        cbs = self.star_layout[0]
        for k in range(start // cbs, -(-min(end, context_len) // cbs)):
            last = min((k + 1) * cbs, context_len) - 1
            if start <= last < end:
                self.star_context_blocks_encoded += 1
                self.star_anchor_reuse_blocks += k > 0

    # -------------------------------------------------------------------------------------------
    # Conveniences
    # -------------------------------------------------------------------------------------------
    def generate(self, prompts: Iterable[Sequence[int]],
                 params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 query_lens: Union[int, Sequence[int]] = 0) -> List[RequestOutput]:
        """Serve ``prompts`` to completion (with whatever else is queued); outputs in prompt order.
        ``query_lens``: each prompt's query length (one int for all), see :meth:`add_request`."""
        prompts = list(prompts)
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        qlist = [query_lens] * len(prompts) if isinstance(query_lens, int) else list(query_lens)
        if len(qlist) != len(prompts):
            raise ValueError(f"query_lens has {len(qlist)} entries for {len(prompts)} prompts")
        ids = [self.add_request(p, sp, query_len=q) for p, sp, q in zip(prompts, plist, qlist)]
        done: Dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for o in self.step():
                if o.finished:
                    done[o.request_id] = o
        return [done[i] for i in ids if i in done]

    def stats(self) -> Dict[str, Any]:
        """Scheduler counters, block manager stats and the prefix-cache hit rate."""
        st = self.bm.stats()
        d: Dict[str, Any] = self.scheduler.stats.as_dict()
        d.update({f"bm_{k}": v for k, v in st.__dict__.items()})
        d["prefix_block_hit_rate"] = st.prefix_hit_blocks / st.prefix_queried_blocks if st.prefix_queried_blocks else 0.0
        sc = self.scheduler.stats
        d["prefix_token_hit_rate"] = (sc.cached_tokens_admitted / sc.prompt_tokens_admitted
                                      if sc.prompt_tokens_admitted else 0.0)
        d["num_generated_tokens"] = self.num_generated_tokens
        d["num_prompt_tokens_computed"] = self.num_prompt_tokens_computed
        d["star_layers"] = len(self.model_config.star_layers)
        d["star_prefix_keys"] = self.star_prefix_layout is not None
        d["star_context_blocks_encoded"] = self.star_context_blocks_encoded
        d["star_anchor_reuse_blocks"] = self.star_anchor_reuse_blocks
        d["kv_shift_layers"] = sum(1 for s in self.model_config.layer_attention if s.is_kv_shift)
        d["attamba_layers"] = len(self.model_config.attamba_layers)
        d["prefix_caching"] = self.prefix_caching
        if self.attamba is not None:
            d["attamba_num_blocks"] = self.attamba.num_blocks
            d["attamba_used_pages"] = self.attamba.num_used
            d["attamba_peak_used_pages"] = self.attamba.peak_used_pages
            d["attamba_fork_page_copies"] = self.attamba.num_page_copies
        d["num_state_slots"] = self.num_state_slots
        d["state_bytes_per_layer"] = self.state_bytes_per_layer
        d["entropy_telemetry"] = self.entropy is not None
        d["entropy_layers"] = len(self.entropy.layers) if self.entropy is not None else 0
        return d

    def entropy_report(self) -> Optional[Dict[str, Any]]:
        """The run's attention-entropy telemetry per layer and head (:meth:`.telemetry.EntropyTelemetry.report`;
        reads the device once), or None without ``EngineConfig.entropy_telemetry``."""
        return None if self.entropy is None else self.entropy.report()

    def check_no_leaks(self) -> None:
        """With no request left: every device block free or cached-free, every host block free."""
        st = self.bm.stats()
        problems = []
        if self.has_unfinished_requests():
            problems.append(f"{self.scheduler.num_unfinished()} requests unfinished")
        if st.num_used_blocks != 0:
            problems.append(f"num_used_blocks={st.num_used_blocks}")
        if st.num_free_blocks + st.num_cached_free_blocks != st.num_device_blocks:
            problems.append(f"free {st.num_free_blocks} + cached_free {st.num_cached_free_blocks} != "
                            f"{st.num_device_blocks}")
        if st.num_free_host_blocks != st.num_host_blocks:
            problems.append(f"host blocks free {st.num_free_host_blocks} of {st.num_host_blocks}")
        if st.num_sequences != 0 or st.num_swapped_sequences != 0:
            problems.append(f"{st.num_sequences} sequences ({st.num_swapped_sequences} swapped) still in the manager")
        if self.attamba is not None:
            problems.extend(self.attamba.check_no_leaks())
        if problems:
            raise AssertionError("block leak: " + "; ".join(problems))

    def describe(self) -> str:
        mc, ec = self.model_config, self.config
        layers = ", ".join(f"{i}:{s.backend}" + (_entropy_brief(s.temperatures(), mc.num_attention_heads)
                                                  if s.is_entropy else
                                                  f"{json.dumps((s.config or {}).get('backend_config'))}"
                                                  if s.config else "")
                           for i, s in enumerate(mc.layer_attention))
        return (f"model: {mc.num_hidden_layers} layers, hidden {mc.hidden_size}, {mc.num_attention_heads} q / "
                f"{mc.num_key_value_heads} kv heads x {mc.head_dim}, vocab {mc.vocab_size}; attention [{layers}]\n"
                f"kv cache: {ec.num_device_blocks} device + {ec.num_host_blocks} host blocks of {ec.block_size} tokens, "
                f"{ec.kv_cache_dtype}, on {ec.device}; prefix caching "
                f"{'on' if self.prefix_caching else 'off (attamba layers)' if ec.enable_prefix_caching else 'off'}, "
                f"preemption {ec.preemption_mode if self.attamba is None else 'recompute (attamba layers)'}, "
                f"max {ec.max_num_seqs} seqs / {ec.max_num_batched_tokens} tokens "
                f"per step; kvplug {kvplug.version_string()}"
                + (f"\nentropy telemetry: layers {list(self.entropy.layers)} of {mc.num_hidden_layers}"
                   if self.entropy is not None else "")
                + (f"\nstar: layers {list(mc.star_layers)}, context blocks / anchor {self.star_layout}, prefix keys "
                   f"{'Star (allocate_star)' if self.star_prefix_layout else 'chained, keyed by context length'}"
                   if mc.star_layers else "")
                + (f"\nattamba: layers {list(mc.attamba_layers)}, their own pool of {self.attamba.num_blocks} pages "
                   f"(compressed chunk-end rows + window), state slots of {self.attamba.state_bytes_per_layer} bytes "
                   f"per layer" if self.attamba is not None else ""))

    def close(self) -> None:
        if self.attamba is not None:
            self.attamba.close()
        for h in (self.plan, self.cache, self.bm, self.ctx):
            if h is not None:
                h.close()
        for a in self.layer_attention:
            if isinstance(a, KvplugAttention):
                a.attn.close()
