"""Scheduler behaviour: stop conditions, sampling, abort, admission with a watermark, prefix caching
across chunked prefill, preemption modes, request validation."""
from __future__ import annotations

import random
from typing import List

import pytest

from engine_helpers import tiny_model
from kvplug.engine import EngineConfig, LLMEngine, RequestStatus, SamplingParams


def _rand(n: int, seed: int) -> List[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def _engine(**kw: object) -> LLMEngine:
    ec = dict(block_size=8, num_device_blocks=64, num_host_blocks=64, max_num_seqs=8, max_num_batched_tokens=64)
    ec.update(kw)  # type: ignore[arg-type]
    return LLMEngine(tiny_model(weights={"seed": 4}), EngineConfig(**ec))  # type: ignore[arg-type]


def test_max_tokens_and_stop_tokens() -> None:
    e = _engine()
    p = _rand(20, 1)
    full = e.generate([p], SamplingParams(max_tokens=20))[0]
    assert full.finish_reason == "length" and len(full.output_token_ids) == 20
    assert e.generate([p], SamplingParams(max_tokens=7))[0].output_token_ids == full.output_token_ids[:7]
    stop = full.output_token_ids[5]
    first = full.output_token_ids.index(stop)
    o = e.generate([p], SamplingParams(max_tokens=20, stop_token_ids=(999, stop)))[0]
    assert o.finish_reason == "stop" and o.output_token_ids == full.output_token_ids[: first + 1]
    e.check_no_leaks()


def test_eos_from_model_config() -> None:
    probe = _engine()
    p = _rand(12, 2)
    toks = probe.generate([p], SamplingParams(max_tokens=16))[0].output_token_ids
    eos = toks[3]
    e = LLMEngine(tiny_model(weights={"seed": 4}, eos_token_id=eos), EngineConfig(block_size=8, num_device_blocks=64))
    o = e.generate([p], SamplingParams(max_tokens=16))[0]
    assert o.finish_reason == "stop" and o.output_token_ids == toks[: toks.index(eos) + 1]
    o = e.generate([p], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert o.finish_reason == "length" and o.output_token_ids == toks


def test_seeded_sampling_does_not_depend_on_the_batch() -> None:
    p = _rand(15, 3)
    sp = SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    alone = _engine().generate([p], sp)[0].output_token_ids
    # Now among 11 others, in a pool small enough to preempt.
    e = _engine(num_device_blocks=20, max_num_batched_tokens=24)
    others = [_rand(10 + 3 * i, 100 + i) for i in range(11)]
    outs = e.generate(others[:5] + [p] + others[5:], [SamplingParams(max_tokens=24)] * 5 + [sp]
                      + [SamplingParams(max_tokens=24, temperature=0.7, seed=i) for i in range(6)])
    assert e.stats()["num_preemptions"] > 0
    assert outs[5].output_token_ids == alone
    # Another seed samples something else; greedy is not what sampling gives.
    other = _engine().generate([p], SamplingParams(max_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=99))[0]
    assert other.output_token_ids != alone
    assert _engine().generate([p], SamplingParams(max_tokens=24))[0].output_token_ids != alone
    e.check_no_leaks()


def test_abort_frees_everything_in_every_state() -> None:
    e = _engine(num_device_blocks=24, num_host_blocks=40, max_num_seqs=8, max_num_batched_tokens=64)
    for i in range(10):
        e.add_request(_rand(30, 10 + i), SamplingParams(max_tokens=40))
    done = {}
    for _ in range(300):
        s = e.scheduler
        if "waiting" not in done and s.waiting:
            done["waiting"] = e.abort_request(s.waiting[-1].request_id)
        if "running" not in done and len(s.running) > 1:
            used = e.bm.stats().num_used_blocks
            done["running"] = e.abort_request(s.running[-1].request_id)
            assert e.bm.stats().num_used_blocks < used  # its device blocks are back
        if "swapped" not in done and s.swapped:
            host_free = e.bm.stats().num_free_host_blocks
            done["swapped"] = e.abort_request(s.swapped[0].request_id)
            assert e.bm.stats().num_free_host_blocks > host_free  # its host blocks are back
        if len(done) == 3 or not e.has_unfinished_requests():
            break
        e.step()
    assert set(done) == {"swapped", "running", "waiting"}, done
    for out in done.values():
        assert out is not None and out.finished and out.finish_reason == "abort"
        assert e.abort_request(out.request_id) is None  # gone
    assert e.abort_request("no-such-request") is None
    while e.has_unfinished_requests():
        e.step()
    st = e.stats()
    assert st["num_aborted"] == 3 and st["num_finished"] == 7
    e.check_no_leaks()


def test_abort_everything_midway() -> None:
    e = _engine(num_device_blocks=24, num_host_blocks=40)
    ids = [e.add_request(_rand(30, 50 + i), SamplingParams(max_tokens=40)) for i in range(10)]
    for _ in range(25):
        e.step()
    assert e.scheduler.swapped or e.scheduler.waiting
    for rid in ids:
        e.abort_request(rid)
    assert not e.has_unfinished_requests()
    e.check_no_leaks()


def test_watermark_holds_back_admission() -> None:
    # Two 56-token prompts need 7 blocks each of 16; with a 25% watermark (4 blocks) the second
    # would leave 2 free, so it waits for the first to finish.
    prompts = [_rand(56, 7), _rand(56, 8)]
    sp = SamplingParams(max_tokens=4)
    held = _engine(num_device_blocks=16, watermark=0.25)
    held.generate(prompts, sp)
    assert held.stats()["peak_running"] == 1 and held.stats()["num_preemptions"] == 0
    free = _engine(num_device_blocks=16, watermark=0.0)
    free.generate(prompts, sp)
    assert free.stats()["peak_running"] == 2


def test_prefix_blocks_published_during_chunked_prefill() -> None:
    e = _engine(max_num_batched_tokens=24, enable_prefix_caching=True)
    shared = _rand(64, 9)
    a = e.add_request(shared + [1], SamplingParams(max_tokens=2))
    e.step()
    e.step()  # a has 48 tokens computed: 6 full blocks marked computed
    b = e.add_request(shared + [2], SamplingParams(max_tokens=2))
    e.step()  # a's last 17 tokens, then b with what is left of the budget
    req_b = e.scheduler.requests[b]
    assert req_b.num_cached_prompt_tokens == 48
    while e.has_unfinished_requests():
        e.step()
    c = e.generate([shared + [3]], SamplingParams(max_tokens=2))[0]
    assert c.num_cached_prompt_tokens == 64  # all 8 full blocks, now published
    assert e.stats()["bm_prefix_hit_blocks"] == 6 + 8
    nocache = _engine(enable_prefix_caching=False)
    assert nocache.generate([shared + [3]], SamplingParams(max_tokens=2))[0].num_cached_prompt_tokens == 0
    assert a != b


def test_swap_falls_back_to_recompute_when_the_host_pool_is_full() -> None:
    e = _engine(num_device_blocks=20, num_host_blocks=6, max_num_batched_tokens=32)
    prompts = [_rand(20 + i, 30 + i) for i in range(8)]
    outs = e.generate(prompts, SamplingParams(max_tokens=30))
    st = e.stats()
    assert st["num_recomputes"] > 0 and st["num_preemptions"] == st["num_swap_outs"] + st["num_recomputes"]
    alone = _engine()
    for p, o in zip(prompts, outs):
        assert o.output_token_ids == alone.generate([p], SamplingParams(max_tokens=30))[0].output_token_ids
    e.check_no_leaks()


def test_continuous_batching_mixes_prefill_and_decode() -> None:
    e = _engine(max_num_batched_tokens=32)
    e.add_request(_rand(10, 11), SamplingParams(max_tokens=20))
    for _ in range(4):
        e.step()  # decoding now
    e.add_request(_rand(50, 12), SamplingParams(max_tokens=5))
    e.step()
    st = e.stats()
    assert st["num_mixed_steps"] == 1 and st["max_batch_seqs"] == 2
    e.step()
    assert e.stats()["num_chunked_prefills"] >= 1  # 50 tokens > 31 left in the budget
    while e.has_unfinished_requests():
        e.step()
    e.check_no_leaks()


def test_invalid_requests_are_refused_up_front() -> None:
    e = _engine(num_device_blocks=8)
    with pytest.raises(ValueError, match="empty"):
        e.add_request([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        e.add_request([1, 256])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        e.add_request([1] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="blocks"):
        e.add_request([1] * 60, SamplingParams(max_tokens=20))  # 80 tokens > 8 blocks of 8
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)
    rid = e.add_request([1, 2, 3], request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        e.add_request([1, 2, 3], request_id="x")
    assert e.scheduler.requests[rid].status is RequestStatus.WAITING
    e.abort_request(rid)
    e.check_no_leaks()
