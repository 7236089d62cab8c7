"""Entropy-guided attention (arXiv 2501.03489) in the engine: per-layer temperature tables (per head
and per absolute position, T shorter than the sequences so positions >= T use the last entry)
against Hugging Face transformers' LlamaForCausalLM (float32, CPU) whose eager attention is
replaced by the scaled softmax logits / (t[h, p] sqrt(d)); and the engine's entropy telemetry (per
layer and head: rows, mean entropy, mean H / log(keys), collapse and overload rows) against the
entropies of that reference's attention probabilities. Also: t = 1 equals dense, the telemetry on
dense layers, config errors, and ``python -m kvplug.engine --entropy --entropy-png``."""
from __future__ import annotations

import json
import math
import os
import pathlib
import random
import subprocess
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import torch

import kvplug
from engine_helpers import dense, hf_model, tiny_model
from kvplug.engine import EngineConfig, EngineConfigError, LLMEngine, ModelConfig, SamplingParams
from kvplug.engine.config import entropy_spec, parse_temperatures

TOL = 1e-4
STEPS = 32
PKG_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _table(rng: random.Random, heads: int, positions: int) -> List[List[float]]:
    """[heads, positions] temperatures, log-uniform in [0.3, 3]: sharp and flat heads."""
    return [[math.exp(rng.uniform(math.log(0.3), math.log(3.0))) for _ in range(positions)] for _ in range(heads)]


def _entropy_layer(table: Optional[List[List[float]]]) -> Dict[str, Any]:
    return {"backend": "entropy", "config": entropy_spec(table).config}


def _tokens(n: int, vocab: int, seed: int) -> List[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _engine(mc: ModelConfig, **kw: Any) -> LLMEngine:
    args = dict(block_size=8, num_device_blocks=96, num_host_blocks=0, max_num_seqs=4, max_num_batched_tokens=24,
                enable_prefix_caching=False, entropy_telemetry=True)
    args.update(kw)
    return LLMEngine(mc, EngineConfig(**args))


# ------------------------------------------------------------------------------------------------
# The PyTorch reference: transformers' Llama with a temperature in its eager attention
# ------------------------------------------------------------------------------------------------


class ScaledSoftmax:
    """A stand-in for transformers' ``eager_attention_forward``: softmax(q.k * scaling / t[h, p]) with
    p the query's absolute position (key length - query length + i: one sequence, no padding) and
    t = tables[layer] ([heads][T]; None: t = 1). Records each call's per-row entropies, from the
    same logits in float64, as (layer, [heads, q_len] entropies, [q_len] keys seen)."""

    def __init__(self, tables: List[Optional[List[List[float]]]]) -> None:
        self.tables = [None if t is None else torch.tensor(t, dtype=torch.float32) for t in tables]
        self.records: List[Any] = []

    def __call__(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Any, scaling: float, dropout: float = 0.0, **kwargs: Any) -> Any:
        groups = module.num_key_value_groups
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        q_len, k_len = query.shape[2], k.shape[2]
        pos = torch.arange(k_len - q_len, k_len)
        logits = torch.matmul(query, k.transpose(2, 3)) * scaling  # [1, heads, q, k]
        t = self.tables[module.layer_idx]
        if t is not None:
            logits = logits / t[:, pos.clamp(max=t.shape[1] - 1)][None, :, :, None]
        logits = logits.masked_fill(torch.arange(k_len)[None, :] > pos[:, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        p64 = torch.softmax(logits.double(), dim=-1)
        h = -(p64 * torch.where(p64 > 0, p64.log(), torch.zeros_like(p64))).sum(-1)[0]  # [heads, q]
        self.records.append((module.layer_idx, h, pos + 1))
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


def reference(engine: LLMEngine, tables: List[Optional[List[List[float]]]], full: List[int],
              monkeypatch: Any) -> Any:
    """(logits [len(full) - 1, vocab], recorder) of one forward pass over full[:-1] (row p predicts
    token p + 1): every row the engine computed for a request it served with no prefix hits."""
    from transformers.models.llama import modeling_llama

    hf = hf_model(engine.model_config, engine.model.state_dict())
    rec = ScaledSoftmax(tables)
    with monkeypatch.context() as m:
        m.setattr(modeling_llama, "eager_attention_forward", rec)
        with torch.no_grad():
            logits = hf(torch.tensor([full[:-1]])).logits[0].float()
    assert sorted(r[0] for r in rec.records) == list(range(len(tables)))  # one call per layer: it was used
    return logits, rec


def summary_from_entropies(records: List[Any], num_layers: int, num_heads: int) -> np.ndarray:
    """[layers, heads, 6] over every recorded row, in the telemetry's columns; and the slack of the
    band counts (rows within 1e-3 of a band edge, which float32 may put on either side)."""
    h_all: List[List[torch.Tensor]] = [[] for _ in range(num_layers)]
    keys_all: List[List[torch.Tensor]] = [[] for _ in range(num_layers)]
    for layer, h, keys in records:
        h_all[layer].append(h)
        keys_all[layer].append(keys)
    out = np.zeros((num_layers, num_heads, 6))
    slack = np.zeros((num_layers, num_heads))
    for layer in range(num_layers):
        h = torch.cat(h_all[layer], dim=1).numpy()  # [heads, rows]
        keys = torch.cat(keys_all[layer]).numpy()
        inf = keys >= 2
        e = np.log(keys.astype(np.float64))
        for head in range(num_heads):
            hh = h[head]
            out[layer, head] = [len(hh), hh.mean(), inf.sum(), (hh[inf] / e[inf]).mean(),
                                (hh[inf] <= e[inf] / 4).sum(), (hh[inf] >= 3 * e[inf] / 4).sum()]
            slack[layer, head] = ((np.abs(hh - e / 4) <= 1e-3) | (np.abs(hh - 3 * e / 4) <= 1e-3))[inf].sum()
    return out, slack


def _check_telemetry(got: np.ndarray, want: np.ndarray, slack: np.ndarray) -> None:
    assert (got[..., 0] == want[..., 0]).all() and (got[..., 2] == want[..., 2]).all(), (got[..., 0], want[..., 0])
    assert np.abs(got[..., 1] - want[..., 1]).max() < TOL
    assert np.abs(got[..., 3] - want[..., 3]).max() < TOL
    assert (np.abs(got[..., 4] - want[..., 4]) <= slack).all(), (got[..., 4], want[..., 4])
    assert (np.abs(got[..., 5] - want[..., 5]) <= slack).all(), (got[..., 5], want[..., 5])


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_temperature_tables_match_pytorch_reference_and_telemetry_matches_its_entropies(monkeypatch: Any) -> None:
    """Three layers: entropy with a [4, 8] table, dense (t = 1, telemetry only), entropy with a
    per-head [4, 1] table. Three requests (prompts 30, 17, 45: positions up to 76, far past T = 8)
    batched, 24-token steps: chunked prefill mixed with decodes; 32 greedy tokens each."""
    rng = random.Random(13)
    heads = 4
    tables: List[Optional[List[List[float]]]] = [_table(rng, heads, 8), None, _table(rng, heads, 1)]
    layers = [_entropy_layer(tables[0]), {"backend": "dense", "config": dense()}, _entropy_layer(tables[2])]
    mc = ModelConfig.from_dict(tiny_model(num_hidden_layers=3, weights={"seed": 21}, attention={"layers": layers}))
    engine = _engine(mc)
    assert engine.entropy is not None and engine.entropy.layers == (0, 1, 2)
    prompts = [_tokens(n, mc.vocab_size, 40 + n) for n in (30, 17, 45)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=STEPS, logits=True, prompt_logits=True))
    st = engine.stats()
    assert st["max_batch_seqs"] >= 2 and st["num_chunked_prefills"] > 0 and st["num_mixed_steps"] > 0
    assert st["entropy_telemetry"] and st["entropy_layers"] == 3
    records: List[Any] = []
    for p, o in zip(prompts, outs):
        assert o.finish_reason == "length" and len(o.output_token_ids) == STEPS
        full = p + o.output_token_ids
        ref, rec = reference(engine, tables, full, monkeypatch)
        records += rec.records
        n = len(p)
        assert not torch.isnan(o.prompt_logits).any()  # no prefix hits: every row computed
        assert (ref[:n] - o.prompt_logits).abs().max().item() < TOL
        assert (ref[n - 1:] - o.logits).abs().max().item() < TOL
        assert ref[n - 1:].argmax(-1).tolist() == o.output_token_ids
    # The telemetry over the run: every computed row of every request, per layer and head.
    want, slack = summary_from_entropies(records, 3, heads)
    got = engine.entropy.combined()
    assert got[0, 0, 0] == sum(len(p) + STEPS - 1 for p in prompts)
    _check_telemetry(got, want, slack)
    # The tables made a difference: sharp and flat heads, both bands populated.
    assert got[0, :, 4].sum() > 0 and got[0, :, 5].sum() > 0
    assert np.ptp(got[2, :, 3]) > 0.1  # per-head temperatures spread the heads apart
    # The report says the same, per layer and head, with rows-weighted layer means.
    report = engine.entropy_report()
    assert report is not None and report["fields"] == list(kvplug.ENTROPY_SUMMARY_FIELDS)
    for i, layer in enumerate(report["layers"]):
        assert layer["reported"] and layer["backend"] == ("dense" if i == 1 else "entropy")
        assert layer["mean_entropy"] == pytest.approx(float(want[i, :, 1].mean()), abs=TOL)  # equal rows per head
        for h, x in enumerate(layer["heads"]):
            assert x["rows"] == int(want[i, h, 0]) and x["mean_entropy"] == pytest.approx(want[i, h, 1], abs=TOL)
            assert x["band"] == ("collapse" if x["mean_normalized_entropy"] <= 0.25 else
                                 "overload" if x["mean_normalized_entropy"] >= 0.75 else "")
    engine.check_no_leaks()


def test_unit_temperature_equals_dense_with_the_same_telemetry() -> None:
    prompts = [_tokens(n, 256, 60 + n) for n in (26, 9, 40)]
    params = SamplingParams(max_tokens=12, logits=True, prompt_logits=True)
    dense_mc = ModelConfig.from_dict(tiny_model(num_hidden_layers=2, weights={"seed": 22}))
    d_engine = _engine(dense_mc)
    want = d_engine.generate(prompts, params)
    for layers in ([_entropy_layer(None)] * 2, [_entropy_layer([[1.0] * 5] * 4), _entropy_layer([[1.0]] * 4)]):
        mc = ModelConfig.from_dict(tiny_model(num_hidden_layers=2, weights={"seed": 22},
                                              attention={"layers": layers}))
        engine = _engine(mc)
        got = engine.generate(prompts, params)
        for w, g in zip(want, got):
            assert g.output_token_ids == w.output_token_ids
            assert (g.logits - w.logits).abs().max().item() < 1e-5
            assert (g.prompt_logits - w.prompt_logits).abs().max().item() < 1e-5
        assert np.abs(engine.entropy.combined() - d_engine.entropy.combined()).max() < 1e-5
    # Temperatures other than 1 change the result.
    hot = ModelConfig.from_dict(tiny_model(num_hidden_layers=2, weights={"seed": 22},
                                           attention={"default": _entropy_layer([[0.5], [2.0], [0.7], [3.0]])}))
    h = _engine(hot).generate(prompts[:1], params)[0]
    assert (h.logits - want[0].logits).abs().max().item() > 1e-3


def test_telemetry_is_off_by_default_and_skips_layers_without_it() -> None:
    mc = ModelConfig.from_dict(tiny_model(num_hidden_layers=2, weights={"seed": 23},
                                          attention={"layers": [{"backend": "torch_reference"}, None]}))
    off = _engine(mc, entropy_telemetry=False)
    assert off.entropy is None and off.entropy_report() is None and not off.stats()["entropy_telemetry"]
    on = _engine(mc)
    out = on.generate([_tokens(20, 256, 1)], SamplingParams(max_tokens=4, logits=True))[0]
    ref = off.generate([_tokens(20, 256, 1)], SamplingParams(max_tokens=4, logits=True))[0]
    assert (out.logits - ref.logits).abs().max().item() < 1e-6  # telemetry does not change results
    report = on.entropy_report()
    assert [x["reported"] for x in report["layers"]] == [False, True]  # torch_reference has none
    assert report["layers"][0]["rows"] == 0 and report["layers"][1]["rows"] == 4 * (20 + 3)
    assert on.stats()["entropy_layers"] == 1 and "entropy telemetry: layers [1] of 2" in on.describe()


def test_entropy_configs_are_checked_per_layer() -> None:
    def build(layer: Any) -> ModelConfig:
        return ModelConfig.from_dict(tiny_model(attention={"layers": {"1": layer}}))

    # A [heads][T] table in the model config is flattened row-major, as the schema wants it.
    mc = build({"backend": "entropy", "config": {"backend_config_type": "EntropyConfig",
                                                 "backend_config": {"temperature": [[1, 2], [3, 4], [5, 6], [7, 8]]}}})
    assert mc.layer_attention[1].temperatures() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert mc.layer_attention[1].temperature_table(4) == [[1, 2], [3, 4], [5, 6], [7, 8]]
    with pytest.raises(EngineConfigError, match="layer 1: the entropy temperature table has 6 entries, not a "
                                                "multiple of num_attention_heads=4"):
        build(_entropy_layer([[1.0] * 3] * 2))
    with pytest.raises(EngineConfigError, match="rows of one length"):
        build({"backend": "entropy", "config": {"backend_config_type": "EntropyConfig",
                                                "backend_config": {"temperature": [[1.0], [1.0, 2.0]]}}})
    with pytest.raises(kvplug.InvalidConfigError, match=r"layer 1: backend 'entropy' rejects its config.*"
                                                        r"temperature\[2\]"):
        build(_entropy_layer([[1.0], [1.0], [0.0], [1.0]]))
    assert parse_temperatures("2", 3) == [2.0, 2.0, 2.0]
    assert parse_temperatures("0.5,1,4", 3) == [0.5, 1.0, 4.0]
    for bad, what in (("1,2", "2 values for 3"), ("a", "expected a number"), ("1,0,1", "finite and > 0")):
        with pytest.raises(EngineConfigError, match=what):
            parse_temperatures(bad, 3)


def _cli(args: List[str], cwd: Any, extra_path: Optional[str] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(PKG_ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "kvplug.engine", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_entropy_table_json_and_heatmap(tmp_path: pathlib.Path) -> None:
    (tmp_path / "model.json").write_text(json.dumps(tiny_model(num_hidden_layers=3, max_position_embeddings=1024)))
    common = ["--model-config", "model.json", "--num-requests", "6", "--prompt-len", "16:40", "--output-len", "4:8",
              "--system-prompt-len", "0", "--block-size", "8", "--num-blocks", "64", "--device", "cpu",
              "--entropy-layers", "1-2", "--entropy-temperature", "0.1,0.5,2,8"]
    try:
        import matplotlib  # noqa: F401
        have_mpl = True
    except ImportError:
        have_mpl = False
    args = common + ["--json", "m.json"] + (["--entropy-png", "heat.png"] if have_mpl else ["--entropy"])
    r = _cli(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1:entropy{t [4x1] in [0.1, 8]}" in r.stdout and "0:dense" in r.stdout
    assert "attention entropy" in r.stdout and "collapse" in r.stdout and "overload" in r.stdout
    table = [line.split() for line in r.stdout.splitlines() if line.strip().startswith(("0 dense", "1 entropy"))]
    assert len(table) == 8  # layers 0 and 1 of the table, four heads each
    assert table[4][-1] == "collapse" and table[7][-1] == "overload"  # t = 0.1 and t = 8
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]["entropy"]
    assert [x["backend"] for x in m["layers"]] == ["dense", "entropy", "entropy"]
    assert m["collapse_heads"] >= 2 and m["overload_heads"] >= 2
    assert m["layers"][1]["heads"][0]["band"] == "collapse" and m["layers"][2]["heads"][3]["band"] == "overload"
    if have_mpl:
        png = (tmp_path / "heat.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000
    # Without matplotlib, --entropy-png fails before serving, saying how to fix it.
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    r = _cli(common + ["--entropy-png", "x.png"], tmp_path, extra_path=str(fake))
    assert r.returncode == 2 and "needs matplotlib" in r.stderr and "pip install matplotlib" in r.stderr
    assert r.stdout == "" and not (tmp_path / "x.png").exists()
    # Without --entropy: no table.
    r = _cli(common[:-4], tmp_path)
    assert r.returncode == 0 and "attention entropy" not in r.stdout
