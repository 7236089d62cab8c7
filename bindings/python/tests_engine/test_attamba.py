"""Attamba (arXiv 2411.17685) in the engine against a straightforward PyTorch reference of the same
model in float32 on the CPU, written here from the paper's definitions (not from the engine):

- per attamba layer, K = x + SSM_k(x) and V = x + SSM_v(x) (x the layer's normed input), each SSM a
  Mamba-2 block: in_proj -> [z][xBC][dt]; a causal depthwise conv over xBC that never reads across a
  chunk boundary, SiLU; a sequential selective scan with A = -exp(A_log), dt = softplus(dt + dt_bias),
  B and C per group, the state reset at every chunk start, the D skip; y * silu(z), an RMSNorm per
  group, out_proj; Q = W_q x; RoPE on Q and K at global positions;
- chunk ends of the attamba layer of rank r (of A attamba layers): {0} and j P + P - 1 - off, off =
  min(P - 1, r (P // A)) ("cyclic") or 0 ("uniform");
- an explicit boolean mask over every position: query t sees key k iff (k < t and k is a chunk end)
  or t - L <= k <= t (attamba.h's rule), softmax over the full-length K/V;
- dense layers: causal attention (kv_shift layers: K and V shifted before RoPE); RMSNorm, SwiGLU MLP
  and the LM head as Llama's.

The engine runs the GEMMs in torch, the SSMs through kvp_attention_ssm (state in state slots), and
attention through the attamba backend over the compressed cache (chunk-end rows + window pages of
the attamba layers' own pool). Prefill logits and 32 greedy decode steps agree within 1e-4 while
batching, chunked prefill and preemption (by block-manager blocks and by the attamba pool; swap
falls back to recompute) happen (asserted), for attamba-only and mixed models; forks continue
exactly (state and pages copied); P = 1 with null SSMs equals Hugging Face's Llama with identity
k_proj / v_proj.
"""
from __future__ import annotations

import math
import random
from typing import Any, Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import dense, hf_model, tiny_model
from kvplug.engine import EngineConfig, EngineConfigError, LLMEngine, ModelConfig, SamplingParams
from kvplug.engine.config import attamba_spec, kv_shift_spec
from kvplug.engine.model import LlamaForCausalLM

TOL = 1e-4
STEPS = 32
SSM = dict(ssm_heads=2, ssm_head_dim=16, state_size=8, ssm_groups=2, conv_width=4)


def _attamba(chunk: int, window: int, offsets: str = "cyclic", **ssm: int) -> Dict[str, Any]:
    return {"backend": "attamba", "config": attamba_spec(chunk, window, chunk_offsets=offsets,
                                                         **{**SSM, **ssm}).config}


def _model(seed: int, layers: List[Dict[str, Any]], **kw: Any) -> ModelConfig:
    return ModelConfig.from_dict(tiny_model(num_hidden_layers=len(layers), weights={"seed": seed},
                                            attention={"layers": layers}, **kw))


def _prompts(vocab: int, system_len: int, user_lens: List[int], seed: int) -> List[List[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(system_len)]
    return [system + [rng.randrange(vocab) for _ in range(n)] for n in user_lens]


# ------------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------------


def chunk_ends(n: int, chunk: int, off: int) -> List[int]:
    """Chunk ends among positions [0, n): 0 and j P + P - 1 - off."""
    return sorted({0} | {e for e in range(chunk - 1 - off, n, chunk)} & set(range(n)))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of x [n, heads, d] at positions 0..n-1."""
    n, d = x.shape[0], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(n, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_ssm(w: Dict[str, torch.Tensor], x: torch.Tensor, ends: List[int], p: Any) -> torch.Tensor:
    """x + out_proj(Mamba-2 block(x)) with conv and scan restarting at every chunk start, one position
    at a time."""
    n = x.shape[0]
    di, gn, heads, hd, st, groups = p.d_inner, p.ssm_groups * p.state_size, p.ssm_heads, p.ssm_head_dim, \
        p.state_size, p.ssm_groups
    zxbcdt = x @ w["in_proj.weight"].T
    z, xbc, dt_raw = zxbcdt[:, :di], zxbcdt[:, di:di + p.conv_dim], zxbcdt[:, di + p.conv_dim:]
    conv_w, conv_b = w["conv1d.weight"][:, 0, :], w["conv1d.bias"]  # [conv_dim, width]
    end_set = set(ends)
    starts, start = [], 0
    for t in range(n):
        if t > 0 and (t - 1) in end_set:
            start = t
        starts.append(start)
    width = p.conv_width
    conv = torch.empty(n, p.conv_dim)
    for t in range(n):
        acc = conv_b.clone()
        for i in range(width):
            src = t - (width - 1) + i
            if src >= starts[t]:  # never across the chunk's start
                acc = acc + conv_w[:, i] * xbc[src]
        conv[t] = F.silu(acc)
    xs, bmat, cmat = conv[:, :di], conv[:, di:di + gn], conv[:, di + gn:]
    dt = F.softplus(dt_raw + w["dt_bias"])  # [n, heads]
    a = -torch.exp(w["A_log"])
    group_of = torch.arange(heads) // (heads // groups)
    state = torch.zeros(heads, hd, st)
    y = torch.empty(n, di)
    for t in range(n):
        if starts[t] == t:
            state = torch.zeros(heads, hd, st)
        xh = xs[t].view(heads, hd)
        b = bmat[t].view(groups, st)[group_of]  # [heads, state]
        c = cmat[t].view(groups, st)[group_of]
        decay = torch.exp(dt[t] * a)  # [heads]
        state = state * decay[:, None, None] + (dt[t][:, None] * xh)[:, :, None] * b[:, None, :]
        y[t] = (torch.einsum("hpn,hn->hp", state, c) + w["D"][:, None] * xh).reshape(di)
    y = y * F.silu(z)
    yg = y.view(n, groups, di // groups)
    y = (yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + p.norm_eps)).reshape(n, di) * w["norm.weight"]
    return x + y @ w["out_proj.weight"].T


def reference_logits(mc: ModelConfig, sd: Dict[str, torch.Tensor], tokens: List[int]) -> torch.Tensor:
    """Logits [n, vocab] of the whole sequence, every layer over full-length K/V with its mask."""
    n, hq, hkv, d = len(tokens), mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    eps, theta = mc.rms_norm_eps, mc.rope_theta
    ranks = mc.attamba_layers
    x = sd["model.embed_tokens.weight"][torch.tensor(tokens)]
    pos = torch.arange(n)
    for i, spec in enumerate(mc.layer_attention):
        pre = f"model.layers.{i}."
        h = _rms(x, sd[pre + "input_layernorm.weight"], eps)
        q = _rope((h @ sd[pre + "self_attn.q_proj.weight"].T).view(n, hq, d), theta)
        if spec.is_attamba:
            p = spec.attamba_params()
            r = ranks.index(i)
            off = 0 if p.chunk_offsets == "Uniform" else min(p.chunk_size - 1, r * (p.chunk_size // len(ranks)))
            ends = chunk_ends(n, p.chunk_size, off)
            sub = lambda which: {k[len(pre + f"self_attn.{which}."):]: v for k, v in sd.items()  # noqa: E731
                                 if k.startswith(pre + f"self_attn.{which}.")}
            k = _rope(reference_ssm(sub("k_ssm"), h, ends, p).view(n, hkv, d), theta)
            v = reference_ssm(sub("v_ssm"), h, ends, p).view(n, hkv, d)
            is_end = torch.zeros(n, dtype=torch.bool)
            is_end[ends] = True
            tq, tk = pos[:, None], pos[None, :]
            allowed = ((tk < tq) & is_end[None, :]) | ((tk >= tq - p.window) & (tk <= tq))
        else:
            assert spec.backend in ("dense", "kv_shift") and spec.dense_params() == (-1, 0.0)
            k = (h @ sd[pre + "self_attn.k_proj.weight"].T).view(n, hkv, d)
            v = (h @ sd[pre + "self_attn.v_proj.weight"].T).view(n, hkv, d)
            if spec.is_kv_shift:  # K^_i = a1 K_i + a2 K_{i-1} per KV head, before RoPE (V likewise)
                ak, av = (torch.tensor(t).view(hkv, 2)[:, :, None] for t in spec.kv_shift_alphas())
                prev = lambda y: torch.cat([torch.zeros_like(y[:1]), y[:-1]])  # noqa: E731
                k, v = ak[:, 0] * k + ak[:, 1] * prev(k), av[:, 0] * v + av[:, 1] * prev(v)
            k = _rope(k, theta)
            allowed = pos[None, :] <= pos[:, None]
        kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        logits = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(d)
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
        attn = torch.einsum("hqk,khd->qhd", probs, vv).reshape(n, hq * d)
        x = x + attn @ sd[pre + "self_attn.o_proj.weight"].T
        h = _rms(x, sd[pre + "post_attention_layernorm.weight"], eps)
        mlp = (F.silu(h @ sd[pre + "mlp.gate_proj.weight"].T) * (h @ sd[pre + "mlp.up_proj.weight"].T))
        x = x + mlp @ sd[pre + "mlp.down_proj.weight"].T
    return _rms(x, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].T


def _check_against_reference(engine: LLMEngine, prompts: List[List[int]], outs: List[Any],
                             steps: Optional[int] = STEPS) -> Dict[str, float]:
    sd = {k: v.detach().float() for k, v in engine.model.state_dict().items()}
    worst = {"prefill": 0.0, "decode": 0.0}
    for prompt, o in zip(prompts, outs):
        if steps is not None:
            assert o.finish_reason == "length" and len(o.output_token_ids) == steps
        full = prompt + o.output_token_ids
        with torch.no_grad():
            ref = reference_logits(engine.model_config, sd, full[:-1])  # row p predicts token p + 1
        n = len(prompt)
        if o.prompt_logits is not None:
            computed = ~torch.isnan(o.prompt_logits[:, 0])
            assert computed.all()  # no prefix cache: every prompt position is computed
            worst["prefill"] = max(worst["prefill"], (ref[:n] - o.prompt_logits).abs().max().item())
        worst["decode"] = max(worst["decode"], (ref[n - 1:] - o.logits).abs().max().item())
        greedy = o.logits.argmax(-1).tolist() == o.output_token_ids
        if greedy:
            assert ref[n - 1:].argmax(-1).tolist() == o.output_token_ids
    assert worst["prefill"] < TOL and worst["decode"] < TOL, worst
    return worst


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

CASES = {
    # attamba, dense, attamba (cyclic offsets 0 and 4), P = 8, L = 4; the block manager's 40 blocks of 8 run out.
    "mixed_blocks": dict(layers=[_attamba(8, 4), {"backend": "dense", "config": dense()}, _attamba(8, 4)],
                         ec=dict(num_device_blocks=40)),
    # three attamba layers, P = 4, no window, uniform offsets; their own pool of 14 pages runs out.
    "attamba_pages": dict(layers=[_attamba(4, 0, "uniform", conv_width=2)] * 3,
                          ec=dict(num_device_blocks=96, attamba_num_blocks=14)),
    # two attamba layers (offsets 0 and 3 of P = 7), a window across pages (L = 11), one dense layer last.
    "window_pages": dict(layers=[_attamba(7, 11, ssm_groups=1), _attamba(7, 11, ssm_groups=1),
                                 {"backend": "dense", "config": dense()}],
                         ec=dict(num_device_blocks=40, attamba_num_blocks=36)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attamba_matches_the_reference_under_pressure(case: str) -> None:
    """Six ~60-token sequences, 24-token steps (chunked prefill mixed with decodes), a pool too small
    for them (preemption: swap asked for, recompute done), a shared 27-token system prompt (no
    prefix hits: caching is off for attamba models)."""
    c = CASES[case]
    mc = _model(seed=61 + len(case), layers=c["layers"])
    ec = EngineConfig(block_size=8, max_num_seqs=6, max_num_batched_tokens=24, watermark=0.05,
                      preemption_mode="swap", num_host_blocks=64, enable_prefix_caching=True, **c["ec"])
    engine = LLMEngine(mc, ec)
    assert engine.attamba is not None and engine.prefix_caching is False
    assert engine.num_state_slots == 6
    prompts = _prompts(mc.vocab_size, 27, [5, 30, 12, 40, 9, 21], seed=62)
    outs = engine.generate(prompts, SamplingParams(max_tokens=STEPS, logits=True, prompt_logits=True))
    st = engine.stats()
    assert st["attamba_layers"] == len(mc.attamba_layers) and not st["prefix_caching"]
    assert st["max_batch_seqs"] >= 4 and st["num_mixed_steps"] > 0 and st["num_chunked_prefills"] > 0
    assert st["num_preemptions"] > 0 and st["num_recomputes"] == st["num_preemptions"] and st["num_swap_outs"] == 0
    if case == "attamba_pages":
        assert st["num_attamba_preemptions"] > 0
        assert st["attamba_peak_used_pages"] >= ec.attamba_num_blocks - 2
    assert st["cached_tokens_admitted"] == 0 and st["bm_prefix_hit_blocks"] == 0 and st["num_state_refills"] == 0
    _check_against_reference(engine, prompts, outs)
    engine.check_no_leaks()


def test_the_compressed_cache_holds_chunk_ends_and_the_window() -> None:
    """A 200-token sequence (P = 8, L = 6, pages of 8): after prefill and 39 decode steps it holds its
    layout's pages (about n / 64 compressed + one or two window pages), not n / 8; older window pages
    went back to the pool as decoding moved on; logits match the reference."""
    mc = _model(seed=71, layers=[_attamba(8, 6)] * 2)
    engine = LLMEngine(mc, EngineConfig(block_size=8, num_device_blocks=64, max_num_batched_tokens=64))
    prompt = _prompts(mc.vocab_size, 0, [200], seed=72)[0]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=41, logits=True, prompt_logits=True))
    held = []
    pages = engine.attamba
    assert pages is not None
    while engine.has_unfinished_requests():
        engine.step()
        req = engine.scheduler.requests.get(rid)
        if req is not None and req.num_output_tokens >= 2:  # after a decode step over [n - 1, n)
            n = req.num_computed_tokens
            sp = pages.seqs[req.seq_id]
            lay = pages.layout(n, n - 1)
            assert len(sp.compressed) == lay.compressed_pages and sorted(sp.window) == list(
                range(lay.window_first_page, lay.window_first_page + lay.window_pages))
            held.append((n, pages.num_used))
    n, used = held[-1]  # the step that sampled the last token finished the request: 239 computed before it
    assert n == 239 and used == pages.layout(n, n - 1).num_pages <= n // 64 + 1 + 2 < n // 8
    assert pages.peak_used_pages <= pages.max_pages(241, 64)
    engine.check_no_leaks()


def test_forks_copy_the_state_and_pages() -> None:
    """Fork a decoding request twice (positions off page and chunk boundaries, with a kv_shift layer
    between two attamba layers): a greedy child repeats its parent exactly, a sampled child goes its
    own way; every sequence matches the reference over its own tokens; the children shared full pages,
    copied partial ones (attamba pages and block-manager blocks) and the state slots."""
    rng = random.Random(81)
    alphas = lambda: [[rng.uniform(0.4, 1.4), rng.uniform(-1.0, 1.0)] for _ in range(2)]  # noqa: E731
    shift = kv_shift_spec(alphas(), alphas())
    layers = [_attamba(4, 3), {"backend": shift.backend, "config": shift.config}, _attamba(4, 3)]
    mc = _model(seed=82, layers=layers)
    engine = LLMEngine(mc, EngineConfig(block_size=8, num_device_blocks=64, max_num_batched_tokens=32))
    prompt = _prompts(mc.vocab_size, 0, [45], seed=83)[0]
    greedy = SamplingParams(max_tokens=24, logits=True)
    parent = engine.add_request(prompt, greedy)
    forks = {  # after the parent's 3rd output token (47 computed: mid-page, mid-chunk) and its 10th (54)
        3: {"greedy": greedy, "sampled": SamplingParams(max_tokens=24, temperature=0.9, seed=5, logits=True)},
        10: {"late": SamplingParams(max_tokens=30, temperature=1.0, top_k=8, seed=9, logits=True)},
    }
    done: Dict[str, Any] = {}
    pages = engine.attamba
    assert pages is not None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        req = engine.scheduler.requests.get(parent)
        kids = forks.pop(req.num_output_tokens, None) if req is not None else None
        if kids:
            before = pages.num_page_copies
            for name, params in kids.items():
                assert engine.fork_request(parent, params, child_request_id=name) == name
            assert pages.num_page_copies > before  # the partial pages are copied
            assert int(pages._refs.max()) > 1  # the full ones shared
    assert not forks
    assert set(done) == {parent, "greedy", "sampled", "late"}
    st = engine.stats()
    assert st["num_forks"] == 3 and st["num_cow_copies"] >= 3 and st["attamba_fork_page_copies"] >= 3
    assert done["greedy"].output_token_ids == done[parent].output_token_ids
    assert torch.equal(done["greedy"].logits, done[parent].logits)
    assert done["sampled"].output_token_ids != done[parent].output_token_ids
    assert done["late"].output_token_ids[:10] == done[parent].output_token_ids[:10]
    outs = [done[k] for k in (parent, "greedy", "sampled", "late")]
    _check_against_reference(engine, [prompt] * 4, outs, steps=None)
    engine.check_no_leaks()
    with pytest.raises(ValueError, match="is not running"):
        engine.fork_request(parent)


def test_chunk_size_one_with_null_ssms_is_dense_llama() -> None:
    """P = 1: every position is a chunk end, so any window gives causal attention; with out_proj = 0
    the SSMs add nothing: K = V = x. That is Hugging Face's Llama with k_proj = v_proj = identity."""
    mc = _model(seed=91, layers=[_attamba(1, 2)] * 2)
    model = LlamaForCausalLM(mc)
    model.load_weights(mc.weights)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_ssm.out_proj.weight.zero_()
            layer.self_attn.v_ssm.out_proj.weight.zero_()
    engine = LLMEngine(mc, EngineConfig(block_size=8, num_device_blocks=64, max_num_batched_tokens=16), model=model)
    prompts = _prompts(mc.vocab_size, 10, [3, 17], seed=92)
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, logits=True, prompt_logits=True))
    sd = {k: v for k, v in model.state_dict().items() if "_ssm." not in k}
    for i in range(mc.num_hidden_layers):
        for name in ("k_proj", "v_proj"):
            sd[f"model.layers.{i}.self_attn.{name}.weight"] = torch.eye(mc.hidden_size)
    dense_cfg = ModelConfig.from_dict(tiny_model(num_hidden_layers=2))
    hf = hf_model(dense_cfg, sd)
    for prompt, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + o.output_token_ids[:-1]])).logits[0].float()
        n = len(prompt)
        assert (ref[:n] - o.prompt_logits).abs().max().item() < TOL
        assert (ref[n - 1:] - o.logits).abs().max().item() < TOL
    engine.check_no_leaks()


def test_attamba_configs_and_limits_are_checked() -> None:
    def build(*layers: Any, **model: Any) -> ModelConfig:
        return _model(0, list(layers), **model)

    mc = build(_attamba(8, 4), {"backend": "dense", "config": dense()}, _attamba(8, 4))
    assert mc.attamba_layers == (0, 2)
    inner = mc.layer_attention[2].library_config(mc, 2)["backend_config"]
    assert (inner["layer_index"], inner["num_layers"], inner["chunk_size"], inner["window"]) == (1, 2, 8, 4)
    with pytest.raises(EngineConfigError, match="num_key_value_heads \\* head_dim = 64 must equal hidden_size = 128"):
        build(_attamba(8, 4), hidden_size=128)
    with pytest.raises(EngineConfigError, match="attamba needs ssm_heads > 0"):
        build({"backend": "attamba", "config": {"backend_config_type": "AttambaConfig",
                                                "backend_config": {"chunk_size": 4}}})
    with pytest.raises(EngineConfigError, match="needs an AttambaConfig"):
        build({"backend": "attamba", "config": None})
    with pytest.raises(EngineConfigError, match="share one page list"):
        build(_attamba(8, 4), _attamba(4, 4))
    explicit = _attamba(8, 4)
    explicit["config"] = dict(explicit["config"], backend_config=dict(explicit["config"]["backend_config"],
                                                                        layer_index=1, num_layers=2))
    build(_attamba(8, 4), explicit)  # what the engine would give: accepted
    with pytest.raises(EngineConfigError, match="layer 0: attamba: layer_index=1, but the engine gives this layer "
                                                "layer_index=0"):
        build(explicit, _attamba(8, 4))
    # A request the attamba pool could never hold alone is refused up front.
    engine = LLMEngine(build(_attamba(1, 0)), EngineConfig(block_size=8, num_device_blocks=64, attamba_num_blocks=8))
    with pytest.raises(ValueError, match="attamba pages"):
        engine.add_request(list(range(40)), SamplingParams(max_tokens=8))
    with pytest.raises(EngineConfigError, match="attamba_num_blocks"):
        EngineConfig(attamba_num_blocks=-1).check()
