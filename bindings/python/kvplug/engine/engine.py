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
"""
from __future__ import annotations

import itertools
import json
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

import kvplug

from .config import TORCH_REFERENCE, EngineConfig, EngineConfigError, ModelConfig, ModelConfigLike
from .model import KvplugAttention, LlamaForCausalLM, StepBatch, TorchReferenceAttention
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
        for spec in mc.layer_attention:
            if spec.backend == TORCH_REFERENCE:
                self.layer_attention.append(TorchReferenceAttention(spec, mc))
            else:
                self.layer_attention.append(KvplugAttention(self.ctx, spec, mc, ec.kv_cache_dtype))
        # Per-sequence state (kv_shift): one state slot per sequence alive, sized for the hungriest
        # layer. Running plus swapped sequences never exceed max_num_seqs (admission waits for the
        # swapped ones), and can_allocate says LATER when no slot is free.
        self.state_bytes_per_layer = max((a.attn.state_bytes for a in self.layer_attention
                                          if isinstance(a, KvplugAttention)), default=0)
        self.num_state_slots = ec.max_num_seqs if self.state_bytes_per_layer > 0 else 0
        self.bm = kvplug.BlockManager(block_size=ec.block_size, num_device_blocks=ec.num_device_blocks,
                                      num_host_blocks=ec.num_host_blocks,
                                      enable_prefix_caching=ec.enable_prefix_caching, watermark=ec.watermark,
                                      num_state_slots=self.num_state_slots)
        self.cache = kvplug.KvCache(self.ctx, num_layers=mc.num_hidden_layers, num_blocks=ec.num_device_blocks,
                                    block_size=ec.block_size, num_kv_heads=mc.num_key_value_heads,
                                    head_size=mc.head_dim, dtype=ec.kv_cache_dtype,
                                    num_host_blocks=ec.num_host_blocks, num_state_slots=self.num_state_slots,
                                    state_bytes_per_layer=self.state_bytes_per_layer)
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
                                   refill_state=self.num_state_slots > 0)
        max_entries = ec.max_num_seqs + self.scheduler.max_extra_entries
        self.plan = kvplug.Plan(self.ctx, max_num_seqs=max_entries, max_num_tokens=ec.max_num_batched_tokens,
                                max_num_blocks=max_entries * self.max_blocks_per_seq)
        for a in self.layer_attention:
            if isinstance(a, KvplugAttention):
                # Plan-side step buffers are allocated here, once, not at the first run.
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
        mc, ec = self.model_config, self.config
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise ValueError("prompt_token_ids is empty")
        bad = [t for t in ids if not 0 <= t < mc.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {mc.vocab_size})")
        total = len(ids) + params.max_tokens
        if total > mc.max_position_embeddings:
            raise ValueError(f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) = {total} exceeds "
                             f"max_position_embeddings={mc.max_position_embeddings}")
        if ec.blocks_for(total) > ec.num_device_blocks - ec.watermark_blocks:
            raise ValueError(f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) needs {ec.blocks_for(total)} "
                             f"blocks of {ec.block_size}; the pool has {ec.num_device_blocks} "
                             f"(watermark {ec.watermark_blocks})")
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

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Stop a request wherever it is (waiting, running, swapped); its blocks, device or host, are
        freed at once. Returns its final output (finish_reason "abort"), or None if unknown."""
        req = self.scheduler.abort(str(request_id))
        return None if req is None else req.output()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

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
            first = s.start - int(s.refill)  # a refill re-runs token start - 1, not stored (slot -1)
            qsl[b + 1] = qsl[b] + s.num_query_tokens
            seq_lens[b] = s.start + s.num_tokens
            context_lens[b] = r.context_len
            input_ids.extend(r.token_ids[first:s.start + s.num_tokens])
            positions.extend(range(first, s.start + s.num_tokens))
            if s.refill:
                slots.append(np.full(1, -1, np.int64))
            slots.append(bm.slot_mapping(r.seq_id, s.start, s.num_tokens))
            if state_slots is not None:
                state_slots[b] = bm.state_slot(r.seq_id)
            width = max(width, ec.blocks_for(r.num_bm_tokens))
        slot_mapping = np.concatenate(slots)
        table, _ = bm.block_tables([s.req.seq_id for s in seqs], max_blocks_per_seq=width)
        self.plan.update(qsl, seq_lens, block_size=ec.block_size, block_table=table, slot_mapping=slot_mapping,
                         state_slots=state_slots, context_lens=context_lens)
        batch = StepBatch(qsl, seq_lens, table, slot_mapping)
        plan, cache, layers = self.plan, self.cache, self.layer_attention

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return layers[layer](plan, cache, batch, layer, q, k, v)

        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids_t, pos_t, attention, self.raw_key_layers)
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
                f"{ec.kv_cache_dtype}, on {ec.device}; prefix caching {'on' if ec.enable_prefix_caching else 'off'}, "
                f"preemption {ec.preemption_mode}, max {ec.max_num_seqs} seqs / {ec.max_num_batched_tokens} tokens "
                f"per step; kvplug {kvplug.version_string()}"
                + (f"\nentropy telemetry: layers {list(self.entropy.layers)} of {mc.num_hidden_layers}"
                   if self.entropy is not None else "")
                + (f"\nstar: layers {list(mc.star_layers)}, context blocks / anchor {self.star_layout}, prefix keys "
                   f"{'Star (allocate_star)' if self.star_prefix_layout else 'chained, keyed by context length'}"
                   if mc.star_layers else ""))

    def close(self) -> None:
        for h in (self.plan, self.cache, self.bm, self.ctx):
            h.close()
        for a in self.layer_attention:
            if isinstance(a, KvplugAttention):
                a.attn.close()
