"""Requests, their sampling parameters, and what the engine hands back."""
from __future__ import annotations

import dataclasses
import enum
import time
from typing import List, Optional, Sequence, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are chosen and when it stops.

    ``temperature`` 0 is greedy; otherwise softmax sampling (after ``top_k`` > 0 and ``top_p`` < 1
    filtering) from a per-request generator: with ``seed`` the tokens depend on nothing else (not
    on what else is batched, nor on preemption). ``max_tokens`` caps the output; generation also
    stops after a token in ``stop_token_ids`` or the model's EOS (unless ``ignore_eos``); the stop
    token is the last output token. ``logits``: keep the logits each output token was sampled from;
    ``prompt_logits``: keep the logits of every prompt position the engine computes (positions
    served from the prefix cache have none: NaN rows).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = ()
    ignore_eos: bool = False
    logits: bool = False
    prompt_logits: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"      # not holding blocks (new, or preempted by recompute)
    RUNNING = "running"      # holding device blocks
    SWAPPED = "swapped"      # its blocks are on the host
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_REJECTED = "rejected"  # could never fit the pool or the model

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "rejected")


class Request:
    """One request's state in the engine. ``token_ids`` holds the prompt and every sampled token;
    ``num_computed_tokens`` of them have K/V in the cache; the block manager holds
    ``num_bm_tokens`` of them (the last sampled token joins it when the request is next scheduled).

    ``query_len``: the prompt's trailing tokens that are its query; the ``context_len`` tokens before
    them are context (Star Attention encodes them blockwise in phase 1; other backends ignore it).
    0 (the default) makes the whole prompt context: its last token, which samples the first output
    token, then sees only the anchor and its own Star block, and generated tokens are phase 2.
    ``cached_ranges``: token ranges past ``num_computed_tokens`` whose K/V the prefix cache already
    holds (Star prefix hits need not be leading); computing skips them."""

    def __init__(self, request_id: str, seq_id: int, prompt_token_ids: Sequence[int], params: SamplingParams,
                 arrival_time: float, generator: Optional[torch.Generator], query_len: int = 0) -> None:
        self.request_id = request_id
        self.seq_id = seq_id
        self.prompt_token_ids: List[int] = [int(t) for t in prompt_token_ids]
        self.token_ids: List[int] = list(self.prompt_token_ids)
        self.params = params
        self.arrival_time = arrival_time
        self.generator = generator
        self.status = RequestStatus.WAITING
        if not 0 <= int(query_len) <= len(self.prompt_token_ids):
            raise ValueError(f"query_len={query_len} must be in [0, {len(self.prompt_token_ids)}] (the prompt's length)")
        self.query_len = int(query_len)
        self.context_len = len(self.prompt_token_ids) - self.query_len
        self.cached_ranges: List[Tuple[int, int]] = []
        self.num_computed_tokens = 0
        self.num_bm_tokens = 0
        #: Admitted after a prefix-cache hit with stateful layers: the first entry re-runs the last
        #: cached token with slot -1 to rebuild the per-sequence state (see :mod:`.scheduler`).
        self.needs_state_refill = False
        # Metrics.
        self.first_scheduled_time: Optional[float] = None
        self.token_times: List[float] = []
        self.finish_time: Optional[float] = None
        self.num_cached_prompt_tokens = 0  # prefix-cache hits at first admission
        self.num_cached_tokens_total = 0   # hits over every (re)admission
        self.num_preemptions = 0
        self.num_prefill_chunks = 0
        self.output_logits: List[torch.Tensor] = []
        self.output_margins: List[float] = []  # top-1 minus top-2 logit of each sampled position
        self.prompt_logits: Optional[torch.Tensor] = None
        self.error: Optional[str] = None

    def skip_cached(self) -> None:
        """Move ``num_computed_tokens`` past cached ranges that start at (or before) it."""
        while self.cached_ranges and self.cached_ranges[0][0] <= self.num_computed_tokens:
            self.num_computed_tokens = max(self.num_computed_tokens, self.cached_ranges.pop(0)[1])

    def next_cached_start(self) -> int:
        """Where the next cached range starts (the end of the tokens when none is left)."""
        return self.cached_ranges[0][0] if self.cached_ranges else len(self.token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> List[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def max_total_tokens(self) -> int:
        return self.prompt_len + self.params.max_tokens

    def priority(self) -> Tuple[float, int]:
        """FCFS: earlier arrivals first (ties by id, which grows with arrival)."""
        return (self.arrival_time, self.seq_id)

    def output(self) -> "RequestOutput":
        return RequestOutput(
            request_id=self.request_id, prompt_token_ids=list(self.prompt_token_ids),
            output_token_ids=list(self.output_token_ids), finished=self.status.finished,
            finish_reason=self.status.value if self.status.finished else None, arrival_time=self.arrival_time,
            token_times=list(self.token_times), finish_time=self.finish_time,
            num_cached_prompt_tokens=self.num_cached_prompt_tokens, num_preemptions=self.num_preemptions,
            logits=torch.stack(self.output_logits) if self.output_logits else None,
            output_margins=list(self.output_margins), prompt_logits=self.prompt_logits, error=self.error)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: List[int]
    output_token_ids: List[int]
    finished: bool
    finish_reason: Optional[str]
    arrival_time: float
    token_times: List[float]
    finish_time: Optional[float]
    num_cached_prompt_tokens: int
    num_preemptions: int
    logits: Optional[torch.Tensor]           # [num_output_tokens, vocab] with SamplingParams(logits=True)
    output_margins: List[float]
    prompt_logits: Optional[torch.Tensor]    # [prompt_len, vocab] with SamplingParams(prompt_logits=True)
    error: Optional[str] = None

    @property
    def ttft(self) -> Optional[float]:
        """Time to first token (seconds from arrival)."""
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def itls(self) -> List[float]:
        """Inter-token latencies (seconds)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def now() -> float:
    return time.perf_counter()
