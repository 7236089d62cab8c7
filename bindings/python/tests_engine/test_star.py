"""Star Attention (arXiv 2411.17116) in the engine against a plain PyTorch Star built from Hugging
Face transformers' LlamaForCausalLM (eager, float32) with the same random weights.

The reference follows the paper literally: each context block k is its own forward pass over
[anchor tokens ; block k tokens] with explicit position ids (anchor 0..a-1, block k at its global
positions; block 0 alone, causally); the anchor's outputs are dropped and block k's K/V kept per
layer; every block's K/V concatenated per layer make a DynamicCache, over which the query tokens
(positions n..) run with full attention plus their own causal keys, then 32 greedy tokens the same
way. The engine instead reads the anchor's pages (never recomputing them), splits chunks at block
and context boundaries in the plan, and batches requests of different context lengths.
"""
from __future__ import annotations

import inspect
import random
from typing import Any, List, Optional, Tuple

import pytest
import torch

from engine_helpers import dense, hf_model, tiny_model
from kvplug.engine import EngineConfig, LLMEngine, ModelConfig, SamplingParams
from kvplug.engine.config import EngineConfigError, parse_layer_list, star_spec

TOL = 1e-4
STEPS = 32
BLOCK, ANCHOR = 16, 8


def _star(block: int = BLOCK, anchor: int = ANCHOR) -> dict:
    return {"backend": "star", "config": star_spec(block, anchor).config}


def _model(layers: Optional[List[Any]] = None, seed: int = 5, num_layers: int = 2) -> ModelConfig:
    attention = {"default": _star()} if layers is None else {"layers": layers}
    return ModelConfig.from_dict(tiny_model(num_hidden_layers=num_layers, weights={"seed": seed}, attention=attention))


def _engine(mc: ModelConfig, **kw: Any) -> LLMEngine:
    args = dict(block_size=8, num_device_blocks=96, num_host_blocks=0, max_num_seqs=4, max_num_batched_tokens=24)
    args.update(kw)
    return LLMEngine(mc, EngineConfig(**args))


def _tokens(n: int, vocab: int, seed: int) -> List[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# The PyTorch reference
# ------------------------------------------------------------------------------------------------


def _layer_kv(cache: Any, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """K/V [1, kv_heads, seq, head_dim] of one layer of a transformers cache (4.x or 5.x)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def star_reference(hf: Any, prompt: List[int], context_len: int, block: int, anchor: int,
                   steps: int) -> Tuple[torch.Tensor, List[int]]:
    """Logits [len(prompt) + steps - 1, vocab] (row p predicts token p + 1) and the greedy tokens."""
    from transformers import DynamicCache

    n, num_layers = context_len, hf.config.num_hidden_layers
    # transformers 5 renames forward's past_key_values to cache (the old name warns, then goes).
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    rows: List[torch.Tensor] = []
    ks: List[List[torch.Tensor]] = [[] for _ in range(num_layers)]
    vs: List[List[torch.Tensor]] = [[] for _ in range(num_layers)]
    with torch.no_grad():
        for k in range(-(-n // block)):
            lo, hi = k * block, min((k + 1) * block, n)
            pre = list(range(anchor)) if k > 0 else []
            ids = [prompt[i] for i in pre] + prompt[lo:hi]
            pos = pre + list(range(lo, hi))
            out = hf(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]), use_cache=True)
            rows.append(out.logits[0, len(pre):].float())
            for layer in range(num_layers):
                kk, vv = _layer_kv(out.past_key_values, layer)
                ks[layer].append(kk[:, :, len(pre):])
                vs[layer].append(vv[:, :, len(pre):])
        cache = DynamicCache()
        if n > 0:
            for layer in range(num_layers):
                cache.update(torch.cat(ks[layer], dim=2), torch.cat(vs[layer], dim=2), layer)
        tokens: List[int] = []
        feed, start, past = prompt[n:], n, cache if n > 0 else None
        if not feed:  # the whole prompt is context: its last row samples the first token
            tokens.append(int(rows[-1][-1].argmax()))
            feed = tokens[-1:]
        while len(tokens) < steps:  # the query, then one generated token per pass
            out = hf(input_ids=torch.tensor([feed]), position_ids=torch.arange(start, start + len(feed))[None],
                     use_cache=True, **{cache_kw: past})
            past = out.past_key_values
            rows.append(out.logits[0].float())
            start += len(feed)
            tokens.append(int(rows[-1][-1].argmax()))
            feed = tokens[-1:]
    logits = torch.cat(rows)
    return logits[: len(prompt) + steps - 1], tokens


def _check(engine: LLMEngine, hf: Any, prompt: List[int], query_len: int, out: Any, block: int = BLOCK,
           anchor: int = ANCHOR) -> None:
    ref, tokens = star_reference(hf, prompt, len(prompt) - query_len, block, anchor, STEPS)
    assert out.output_token_ids == tokens
    n = len(prompt)
    computed = ~torch.isnan(out.prompt_logits[:, 0])
    assert computed[n - query_len:].all()  # the query is never served from the cache
    assert (ref[:n][computed] - out.prompt_logits[computed]).abs().max().item() < TOL
    assert (ref[n - 1:] - out.logits).abs().max().item() < TOL


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_star_matches_pytorch_star_batched_and_chunked() -> None:
    """Three requests with different context lengths (50: a partial last block; 33; 16: one block)
    batched; 24-token steps are not a multiple of the 16-token block, so chunks cross block and
    context boundaries."""
    mc = _model()
    engine = _engine(mc)
    prompts = [_tokens(56, mc.vocab_size, 1), _tokens(34, mc.vocab_size, 2), _tokens(19, mc.vocab_size, 3)]
    query_lens = [6, 1, 3]
    outs = engine.generate(prompts, SamplingParams(max_tokens=STEPS, logits=True, prompt_logits=True),
                           query_lens=query_lens)
    st = engine.stats()
    assert st["max_batch_seqs"] >= 2 and st["num_chunked_prefills"] > 0
    assert st["star_context_blocks_encoded"] == 4 + 3 + 1  # ceil(50/16) + ceil(33/16) + 1
    assert st["star_anchor_reuse_blocks"] == 3 + 2
    hf = hf_model(mc, engine.model.state_dict())
    for p, q, o in zip(prompts, query_lens, outs):
        _check(engine, hf, p, q, o)
    engine.check_no_leaks()


def test_query_len_zero_whole_prompt_is_context() -> None:
    """The default: the last prompt token is context (its row samples the first token), every
    generated token is phase 2."""
    mc = _model(seed=6)
    engine = _engine(mc)
    prompt = _tokens(40, mc.vocab_size, 4)
    out = engine.generate([prompt], SamplingParams(max_tokens=STEPS, logits=True, prompt_logits=True))[0]
    _check(engine, hf_model(mc, engine.model.state_dict()), prompt, 0, out)
    with pytest.raises(ValueError, match="query_len=41"):
        engine.add_request(prompt, query_len=41)


def test_star_prefix_hits_that_do_not_lead() -> None:
    """Star on every layer + prefix caching: allocate_star. A second document whose block 1 differs
    hits blocks 0, 2 and 3; the engine computes block 1 alone (seq_len its end) and the query, and
    matches the reference and a cold engine."""
    mc = _model(seed=7)
    engine = _engine(mc)
    assert engine.star_prefix_layout == (BLOCK, ANCHOR)
    doc = _tokens(68, mc.vocab_size, 5)  # context 64 = 4 blocks, query 4
    other = list(doc)
    other[20:28] = _tokens(8, mc.vocab_size, 6)
    params = SamplingParams(max_tokens=STEPS, logits=True, prompt_logits=True)
    engine.generate([doc], params, query_lens=4)
    out = engine.generate([other], params, query_lens=4)[0]
    st = engine.stats()
    assert st["star_prefix_hit_blocks"] == 3
    assert st["star_non_leading_hit_tokens"] == 32  # blocks 2 and 3, after block 1's miss
    assert out.num_cached_prompt_tokens == 48
    assert st["star_context_blocks_encoded"] == 4 + 1  # the first document's 4, then block 1 only
    computed = ~torch.isnan(out.prompt_logits[:, 0])
    assert computed.tolist() == [False] * 16 + [True] * 16 + [False] * 32 + [True] * 4
    hf = hf_model(mc, engine.model.state_dict())
    _check(engine, hf, other, 4, out)
    cold = _engine(mc, enable_prefix_caching=False)
    ref = cold.generate([other], params, query_lens=4)[0]
    assert ref.output_token_ids == out.output_token_ids
    assert (ref.logits - out.logits).abs().max().item() < 1e-5
    engine.check_no_leaks()


def test_block_covering_the_context_is_dense() -> None:
    dense_mc = _model(layers=[{"backend": "dense", "config": dense()}] * 3, seed=8, num_layers=3)
    prompts = [_tokens(40, dense_mc.vocab_size, 7), _tokens(23, dense_mc.vocab_size, 8)]
    params = SamplingParams(max_tokens=8, logits=True)
    want = _engine(dense_mc).generate(prompts, params, query_lens=[5, 0])
    for layers in ([_star(64, 64)] * 3, [_star(64, 16), {"backend": "dense", "config": dense()}, _star(48, 48)]):
        mc = _model(layers=layers, seed=8, num_layers=3)
        got = _engine(mc).generate(prompts, params, query_lens=[5, 0])
        for w, g in zip(want, got):
            assert g.output_token_ids == w.output_token_ids
            assert (g.logits - w.logits).abs().max().item() < 1e-5


def test_star_on_some_layers_runs_with_chained_keys_per_context_length() -> None:
    mc = _model(layers=[_star(8, 8), {"backend": "dense", "config": dense()}, _star(16, 8)], seed=9, num_layers=3)
    engine = _engine(mc)
    assert engine.star_prefix_layout is None  # blocks depend on everything through the dense layer
    system = _tokens(32, mc.vocab_size, 9)
    prompts = [system + _tokens(n, mc.vocab_size, 10 + n) for n in (9, 17, 5)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, logits=True), query_lens=[9, 17, 5])
    assert all(torch.isfinite(o.logits).all() for o in outs)
    st = engine.stats()
    # Context 32 for all three: the shared system prompt hits (context length in the key).
    assert st["cached_tokens_admitted"] >= 2 * 24 and st["star_context_blocks_encoded"] > 0
    # Another context length never hits those pages: its context tokens' K/V differ.
    before = engine.stats()["cached_tokens_admitted"]
    engine.generate([prompts[0]], SamplingParams(max_tokens=2), query_lens=[3])
    assert engine.stats()["cached_tokens_admitted"] == before
    # Star really changed the result: dense gives other logits.
    dense_mc = _model(layers=[{"backend": "dense", "config": dense()}] * 3, seed=9, num_layers=3)
    d = _engine(dense_mc).generate(prompts[:1], SamplingParams(max_tokens=8, logits=True))[0]
    assert (d.logits - outs[0].logits).abs().max().item() > 1e-3
    engine.check_no_leaks()


def test_layer_list_parsing() -> None:
    assert parse_layer_list("all", 3) == [0, 1, 2]
    assert parse_layer_list("0,2-3", 4) == [0, 2, 3]
    with pytest.raises(EngineConfigError, match="outside"):
        parse_layer_list("5", 4)
    with pytest.raises(EngineConfigError, match="expected 'all'"):
        parse_layer_list("x", 4)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_star_prefix_keys_under_preemption(mode: str) -> None:
    """All-Star with Star prefix keys in a pool too small for the batch: preemption (swap or
    recompute, which re-allocates with Star keys), chunked prefill and non-leading hits together;
    every request's tokens and logits equal a roomy engine's without prefix caching."""
    mc = _model(seed=11)
    system = _tokens(40, mc.vocab_size, 20)
    prompts = [system + _tokens(n, mc.vocab_size, 30 + n) for n in (12, 30, 7, 21, 16)]
    prompts.append(list(prompts[1]))
    prompts[-1][20:24] = [1, 2, 3, 4]  # block 1 differs: the later blocks hit, not leading
    query_lens = [4, 8, 3, 5, 6, 8]
    params = SamplingParams(max_tokens=32, logits=True)
    roomy = _engine(mc, enable_prefix_caching=False, max_num_seqs=6, max_num_batched_tokens=256)
    want = roomy.generate(prompts, params, query_lens=query_lens)
    tight = _engine(mc, num_device_blocks=28, num_host_blocks=64 if mode == "swap" else 0, max_num_seqs=6,
                    max_num_batched_tokens=32, watermark=0.05, preemption_mode=mode)
    got = tight.generate(prompts, params, query_lens=query_lens)
    st = tight.stats()
    assert st["num_preemptions"] > 0 and st["star_prefix_hit_blocks"] > 0 and st["num_chunked_prefills"] > 0
    assert st["star_non_leading_hit_tokens"] > 0
    for w, g in zip(want, got):
        assert g.output_token_ids == w.output_token_ids
        assert (g.logits - w.logits).abs().max().item() < 1e-5
    tight.check_no_leaks()
