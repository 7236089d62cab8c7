"""python -m kvplug.engine: a synthetic workload end to end, its report, its JSON and its errors."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any, List

from engine_helpers import dense, tiny_model

PKG_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args: List[str], cwd: Any) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PKG_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "kvplug.engine", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_synthetic_workload_report(tmp_path: pathlib.Path) -> None:
    model = tiny_model(num_hidden_layers=3, max_position_embeddings=1024,
                       attention={"layers": {"1": {"backend": "dense", "config": dense(16)}}})
    (tmp_path / "model.json").write_text(json.dumps(model))
    r = _run(["--model-config", "model.json", "--num-requests", "40", "--prompt-len", "8:40", "--output-len", "4:24",
              "--system-prompt-len", "32", "--num-blocks", "40", "--num-host-blocks", "64", "--block-size", "8",
              "--max-num-seqs", "12", "--max-batched-tokens", "64", "--progress", "on", "--json", "m.json",
              "--device", "cpu"], tmp_path)
    assert r.returncode == 0, r.stderr
    for label in ("throughput", "time to first token", "inter-token latency", "KV blocks", "prefix cache",
                  "preemptions", "40 completed"):
        assert label in r.stdout, r.stdout
    assert "1:dense{\"window_left\": 16}" in r.stdout
    assert "40/40 done" in r.stderr  # the progress line
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert m["num_completed"] == 40 and m["output_tokens"] > 0
    assert m["prefix_cache"]["hit_blocks"] > 0 and m["scheduler"]["num_preemptions"] > 0
    assert m["kv_blocks"]["peak_used"] <= 40 and m["kv_blocks"]["used_now"] == 0
    assert m["ttft_ms"]["mean"] > 0 and m["itl_ms"]["p50"] > 0


def test_unknown_backend_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "bad.json").write_text(json.dumps(tiny_model(attention={"default": {"backend": "nope"}})))
    r = _run(["--model-config", "bad.json", "--num-requests", "4"], tmp_path)
    assert r.returncode == 2
    assert "unknown attention backend 'nope'" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""  # nothing served


def test_bad_arguments(tmp_path: pathlib.Path) -> None:
    r = _run(["--prompt-len", "9:3"], tmp_path)
    assert r.returncode == 2 and "LO <= HI" in r.stderr
    r = _run(["--num-blocks", "2", "--num-requests", "2"], tmp_path)  # 2 blocks of 16: prompts cannot fit
    assert r.returncode == 2 and "blocks" in r.stderr


def test_star_layers_flag(tmp_path: pathlib.Path) -> None:
    (tmp_path / "model.json").write_text(json.dumps(tiny_model(num_hidden_layers=2, max_position_embeddings=1024)))
    common = ["--model-config", "model.json", "--num-requests", "12", "--prompt-len", "40:80", "--output-len", "2:6",
              "--system-prompt-len", "48", "--block-size", "8", "--num-blocks", "128", "--device", "cpu",
              "--star-block", "16", "--star-anchor", "8", "--query-len", "4", "--json", "m.json"]
    r = _run(common + ["--star-layers", "all"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "0:star" in r.stdout and "1:star" in r.stdout and "Star (allocate_star)" in r.stdout
    assert "star attention" in r.stdout
    star = json.loads((tmp_path / "m.json").read_text())["metrics"]["star"]
    assert star["layers"] == 2 and star["prefix_keys"] == "star"
    assert star["context_blocks_encoded"] > 0 and star["anchor_reuse_blocks"] > 0
    assert star["prefix_hit_blocks"] > 0  # the shared system prompt's Star blocks
    r = _run(common + ["--star-layers", "1"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "0:dense" in r.stdout and "1:star" in r.stdout and "chained, keyed by context length" in r.stdout
    r = _run(common + ["--star-layers", "7"], tmp_path)
    assert r.returncode == 2 and "outside [0, 2)" in r.stderr
    r = _run(common + ["--star-layers", "all", "--star-anchor", "32"], tmp_path)  # anchor > block
    assert r.returncode == 2 and "anchor_block_size=32" in r.stderr and "Traceback" not in r.stderr
