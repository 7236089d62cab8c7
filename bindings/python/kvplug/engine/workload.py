"""Synthetic workloads: requests with random prompt/output lengths sharing a system prompt, served
through an engine, and the serving metrics (throughput, TTFT, ITL, KV blocks, prefix hits)."""
from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from .engine import LLMEngine
from .request import RequestOutput, SamplingParams


def parse_range(text: str, name: str) -> Tuple[int, int]:
    """"N" (fixed) or "LO:HI" (uniform, inclusive)."""
    try:
        if ":" in text:
            lo, hi = (int(x) for x in text.split(":", 1))
        else:
            lo = hi = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected N or LO:HI") from None
    if lo < 0 or hi < lo:
        raise ValueError(f"{name}={text!r}: need 0 <= LO <= HI")
    return lo, hi


@dataclasses.dataclass
class WorkloadRequest:
    prompt: List[int]
    params: SamplingParams
    arrival: float  # seconds after the start
    query_len: int = 0  # trailing prompt tokens that are the query (the rest is context: Star phase 1)


def make_workload(num_requests: int, vocab_size: int, prompt_len: Tuple[int, int], output_len: Tuple[int, int],
                  system_prompt_len: int = 0, shared_fraction: float = 1.0, request_rate: float = math.inf,
                  temperature: float = 0.0, seed: int = 0, stop_token_ids: Sequence[int] = ()) -> List[WorkloadRequest]:
    """``num_requests`` requests: a fraction ``shared_fraction`` start with one shared system prompt
    of ``system_prompt_len`` tokens, then ``prompt_len`` random tokens; ``output_len`` tokens each
    (unless a stop token comes first); Poisson arrivals at ``request_rate`` per second (inf: all at
    once). Token ids avoid the stop tokens. Same seed, same workload."""
    rng = random.Random(seed)
    banned = set(stop_token_ids)
    pool = [t for t in range(vocab_size) if t not in banned]
    system = [rng.choice(pool) for _ in range(system_prompt_len)]
    out: List[WorkloadRequest] = []
    t = 0.0
    for i in range(num_requests):
        n = rng.randint(*prompt_len)
        shared = system_prompt_len > 0 and rng.random() < shared_fraction
        prompt = (system if shared else []) + [rng.choice(pool) for _ in range(n)]
        if not prompt:
            prompt = [rng.choice(pool)]
        params = SamplingParams(max_tokens=max(1, rng.randint(*output_len)), temperature=temperature,
                                seed=seed * 100_003 + i, stop_token_ids=tuple(stop_token_ids))
        if math.isfinite(request_rate) and request_rate > 0:
            t += rng.expovariate(request_rate)
        out.append(WorkloadRequest(prompt, params, t))
    return out


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class Progress:
    """A one-line progress indicator on a stream: rewritten in place on a terminal, else one line
    every ``interval`` seconds."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, interval: float = 2.0, enabled: bool = True) -> None:
        self.total, self.stream, self.interval, self.enabled = total, stream, interval, enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.last = 0.0
        self.start = time.perf_counter()

    def update(self, done: int, engine: LLMEngine, force: bool = False) -> None:
        if not self.enabled:
            return
        t = time.perf_counter()
        if not force and t - self.last < (0.2 if self.tty else self.interval):
            return
        self.last = t
        s = engine.scheduler
        st = engine.bm.stats()
        width = 24
        filled = int(width * done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} done  step {s.stats.num_steps}  "
                f"running {len(s.running)} waiting {len(s.waiting)} swapped {len(s.swapped)}  "
                f"blocks {st.num_used_blocks}/{st.num_device_blocks}  {t - self.start:.1f}s")
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_workload(engine: LLMEngine, workload: Sequence[WorkloadRequest], progress: Optional[Progress] = None,
                 on_step: Optional[Callable[[LLMEngine], None]] = None) -> Dict[str, Any]:
    """Serve ``workload`` (arrivals in real time) to completion; returns the metrics."""
    order = sorted(range(len(workload)), key=lambda i: workload[i].arrival)
    finished: Dict[str, RequestOutput] = {}
    ids: List[str] = []
    nxt = 0
    start = time.perf_counter()
    while nxt < len(order) or engine.has_unfinished_requests():
        t = time.perf_counter() - start
        while nxt < len(order) and workload[order[nxt]].arrival <= t:
            w = workload[order[nxt]]
            ids.append(engine.add_request(w.prompt, w.params, arrival_time=start + w.arrival,
                                          query_len=min(w.query_len, len(w.prompt))))
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(0.05, workload[order[nxt]].arrival - t)))
            continue
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
        if on_step is not None:
            on_step(engine)
        if progress is not None:
            progress.update(len(finished), engine)
    wall = time.perf_counter() - start
    if progress is not None:
        progress.update(len(finished), engine, force=True)
        progress.close()
    outs = [finished[i] for i in ids if i in finished]
    return summarize(engine, outs, wall)


def summarize(engine: LLMEngine, outs: Sequence[RequestOutput], wall: float) -> Dict[str, Any]:
    completed = [o for o in outs if o.finish_reason in ("stop", "length")]
    ttfts = [o.ttft for o in completed if o.ttft is not None]
    itls = [x for o in completed for x in o.itls]
    out_tokens = sum(len(o.output_token_ids) for o in outs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    st = engine.stats()
    steps = engine.step_times
    ec, mc = engine.config, engine.model_config
    # A block of the token-stream cache holds every layer but the attamba ones (theirs: their own pool).
    bytes_per_layer_block = (2 * ec.block_size * mc.num_key_value_heads * mc.head_dim
                             * {"float32": 4, "float16": 2, "bfloat16": 2}[ec.kv_cache_dtype])
    bytes_per_block = bytes_per_layer_block * len(engine.token_layers)
    return {
        "num_requests": len(outs),
        "num_completed": len(completed),
        "num_aborted_or_rejected": len(outs) - len(completed),
        "wall_s": wall,
        "prompt_tokens": prompt_tokens,
        "output_tokens": out_tokens,
        "output_throughput_tok_s": out_tokens / wall if wall > 0 else float("nan"),
        "total_throughput_tok_s": (out_tokens + prompt_tokens) / wall if wall > 0 else float("nan"),
        "request_throughput_req_s": len(completed) / wall if wall > 0 else float("nan"),
        "ttft_ms": {"mean": 1e3 * _mean(ttfts), "p50": 1e3 * _pct(ttfts, 0.5), "p99": 1e3 * _pct(ttfts, 0.99)},
        "itl_ms": {"mean": 1e3 * _mean(itls), "p50": 1e3 * _pct(itls, 0.5), "p99": 1e3 * _pct(itls, 0.99)},
        "num_steps": len(steps),
        "step_ms_mean": 1e3 * _mean(steps),
        "kv_blocks": {"device": ec.num_device_blocks, "peak_used": st["peak_used_blocks"],
                      "used_now": st["bm_num_used_blocks"], "cached_free_now": st["bm_num_cached_free_blocks"],
                      "bytes_per_block": bytes_per_block, "host": ec.num_host_blocks},
        "prefix_cache": {"queried_blocks": st["bm_prefix_queried_blocks"], "hit_blocks": st["bm_prefix_hit_blocks"],
                         "block_hit_rate": st["prefix_block_hit_rate"], "cached_tokens": st["cached_tokens_admitted"],
                         "token_hit_rate": st["prefix_token_hit_rate"], "evictions": st["bm_num_evictions"]},
        "scheduler": {k: st[k] for k in ("num_preemptions", "num_swap_outs", "num_swap_ins", "num_recomputes",
                                         "num_mixed_steps", "num_chunked_prefills", "max_batch_seqs",
                                         "max_batch_tokens", "peak_running")},
        "star": {"layers": st["star_layers"], "prefix_keys": "star" if st["star_prefix_keys"] else "chained",
                 "context_blocks_encoded": st["star_context_blocks_encoded"],
                 "anchor_reuse_blocks": st["star_anchor_reuse_blocks"],
                 "prefix_hit_blocks": st["star_prefix_hit_blocks"],
                 "non_leading_hit_tokens": st["star_non_leading_hit_tokens"]},
        "attamba": None if engine.attamba is None else {
            "layers": st["attamba_layers"], "pages": st["attamba_num_blocks"],
            "peak_used_pages": st["attamba_peak_used_pages"],
            "bytes_per_page": bytes_per_layer_block * st["attamba_layers"],
            "preemptions": st["num_attamba_preemptions"]},
        # Attention-entropy telemetry per layer and head (None without it): EntropyTelemetry.report().
        "entropy": engine.entropy_report(),
    }


def format_report(m: Dict[str, Any]) -> str:
    kv, pc, sc = m["kv_blocks"], m["prefix_cache"], m["scheduler"]
    rows = [
        ("requests", f"{m['num_completed']} completed, {m['num_aborted_or_rejected']} aborted/rejected, "
                     f"in {m['wall_s']:.2f} s"),
        ("throughput", f"{m['output_throughput_tok_s']:.1f} output tok/s, {m['total_throughput_tok_s']:.1f} "
                       f"total tok/s, {m['request_throughput_req_s']:.2f} req/s "
                       f"({m['prompt_tokens']} prompt + {m['output_tokens']} output tokens)"),
        ("time to first token", f"mean {m['ttft_ms']['mean']:.1f} ms, p50 {m['ttft_ms']['p50']:.1f} ms, "
                                f"p99 {m['ttft_ms']['p99']:.1f} ms"),
        ("inter-token latency", f"mean {m['itl_ms']['mean']:.2f} ms, p50 {m['itl_ms']['p50']:.2f} ms, "
                                f"p99 {m['itl_ms']['p99']:.2f} ms"),
        ("steps", f"{m['num_steps']} (mean {m['step_ms_mean']:.2f} ms), max batch {sc['max_batch_seqs']} seqs / "
                  f"{sc['max_batch_tokens']} tokens, {sc['num_mixed_steps']} mixed prefill+decode, "
                  f"{sc['num_chunked_prefills']} chunked prefills"),
        ("KV blocks", f"peak {kv['peak_used']} of {kv['device']} used ({100.0 * kv['peak_used'] / kv['device']:.1f}%, "
                      f"{kv['peak_used'] * kv['bytes_per_block'] / 2**20:.2f} MiB); at the end {kv['used_now']} used, "
                      f"{kv['cached_free_now']} cached-free"),
        ("prefix cache", f"hit rate {100.0 * pc['block_hit_rate']:.1f}% of prompt blocks ({pc['hit_blocks']}/"
                         f"{pc['queried_blocks']}), {pc['cached_tokens']} prompt tokens not recomputed "
                         f"({100.0 * pc['token_hit_rate']:.1f}%), {pc['evictions']} evictions"),
        ("preemptions", f"{sc['num_preemptions']} (swap out {sc['num_swap_outs']}, swap in {sc['num_swap_ins']}, "
                        f"recompute {sc['num_recomputes']}), peak {sc['peak_running']} running"),
    ]
    star = m.get("star") or {}
    if star.get("layers"):
        rows.append(("star attention", f"{star['layers']} layers, {star['context_blocks_encoded']} context blocks "
                                       f"encoded ({star['anchor_reuse_blocks']} reading the anchor's pages), "
                                       f"{star['prefix_keys']} prefix keys: {star['prefix_hit_blocks']} Star blocks "
                                       f"hit, {star['non_leading_hit_tokens']} cached tokens after a miss"))
    att = m.get("attamba")
    if att:
        rows.append(("attamba pages", f"{att['layers']} layers, peak {att['peak_used_pages']} of {att['pages']} pages "
                                      f"({att['peak_used_pages'] * att['bytes_per_page'] / 2**20:.2f} MiB: chunk-end "
                                      f"rows + windows), {att['preemptions']} preemptions for them"))
    if m.get("entropy"):
        from .telemetry import summary_line

        rows.append(("attention entropy", summary_line(m["entropy"])))
    return "\n".join(f"  {k:<20} {v}" for k, v in rows)
