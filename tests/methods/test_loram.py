"""LoRAM's properties (arXiv 2502.13533): training runs on a smaller model, recovery zero-fills the adapters at the
pruned positions and puts W0 back, the recovered model is what the run scores, and unstructured pruning keeps shapes."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.run import run
from methods.loram import LoRAM, LoRAMLinear
from tests.helpers import compose_cfg, tiny, train_steps, wrapped


def _loram(extra: list[str] | None = None):
    t = tiny("loram", extra=["method.lr=5e-3", *(extra or [])])
    method, model = wrapped(t)
    assert isinstance(method, LoRAM)
    return t, method, model


def test_structured_pruning_keeps_the_strongest_neurons_and_shrinks_the_model():
    t, method, model = _loram()
    base = t.base
    blocks = method.ffn_blocks(base)
    assert blocks, "the tiny BERT has feed-forward blocks"
    for (up,), down in blocks:
        hidden = base.get_submodule(up).out_features
        keep = hidden - round(0.5 * hidden)
        layer_up, layer_down = model.get_submodule(up), model.get_submodule(down)
        assert isinstance(layer_up, LoRAMLinear) and layer_up.base.out_features == keep
        assert layer_down.base.in_features == keep
        score = base.get_submodule(up).weight.pow(2).sum(1) + base.get_submodule(down).weight.pow(2).sum(0)
        strongest = set(torch.topk(score, keep).indices.tolist())
        assert set(layer_up.rows.tolist()) == strongest == set(layer_down.cols.tolist())
        torch.testing.assert_close(layer_up.base.weight, base.get_submodule(up).weight[layer_up.rows], rtol=0, atol=0)
    lora = tiny("lora")
    lora_method, lora_model = wrapped(lora)
    trained_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    lora_bytes = sum(p.numel() * p.element_size() for p in lora_model.parameters())
    assert trained_bytes < lora_bytes, "the pruned model should hold less than LoRA on the full model"


def test_recovery_zero_fills_the_pruned_positions_and_restores_w0():
    t, method, model = _loram()
    train_steps(model, method, t.loader, steps=3)
    trained = {n: (layer.lora_B.detach().clone(), layer.lora_A.detach().clone(), layer.rows, layer.cols)
               for n, layer in method.adapted_layers(model).items()}
    metrics = method.post_train(model, t.ctx)
    assert 0 < metrics["loram_trained_model_share"] < 1
    for name, layer in method.adapted_layers(model).items():
        w0 = t.base.get_submodule(name).weight
        assert torch.equal(layer.base.weight, w0), f"{name}: W0 was not restored"
        assert layer.lora_B.shape == (w0.shape[0], 8) and layer.lora_A.shape == (8, w0.shape[1])
        b, a, rows, cols = trained[name]
        if rows is not None:
            pruned = torch.ones(w0.shape[0], dtype=torch.bool)
            pruned[rows] = False
            assert layer.lora_B[pruned].abs().max() == 0 and torch.equal(layer.lora_B[rows], b)
        if cols is not None:
            pruned = torch.ones(w0.shape[1], dtype=torch.bool)
            pruned[cols] = False
            assert layer.lora_A[:, pruned].abs().max() == 0 and torch.equal(layer.lora_A[:, cols], a)
    assert any(rows is not None for *_, rows, _ in trained.values()), "no adapted layer was pruned"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in t.base.parameters()) + sum(
        layer.lora_A.numel() + layer.lora_B.numel() for layer in method.adapted_layers(model).values())


def test_unstructured_pruning_zeroes_the_smallest_entries_and_keeps_shapes():
    t, method, model = _loram(["method.prune=unstructured"])
    for name, layer in method.adapted_layers(model).items():
        w0 = t.base.get_submodule(name).weight
        assert layer.base.weight.shape == w0.shape and layer.rows is None and layer.cols is None
        zero = layer.base.weight == 0
        assert zero.float().mean() >= 0.5
        assert w0[zero].abs().max() <= w0[~zero].abs().min()  # the smallest magnitudes went
    method.post_train(model, t.ctx)
    for name, layer in method.adapted_layers(model).items():
        assert torch.equal(layer.base.weight, t.base.get_submodule(name).weight)


def test_a_run_scores_the_pruned_and_the_recovered_model(tmp_path):
    cfg = compose_cfg(["method=loram", "task=glue/sst2", "model=tiny_bert", "+experiment=smoke",
                       f"results_dir={tmp_path}", "record.save_delta=false"])
    record = run(cfg)
    assert record["status"] == "completed", record["error"]
    assert "loram_pruned_accuracy" in record["metrics"] and "accuracy" in record["metrics"]
    assert record["params"]["trainable"] == LoRAM(lr=1e-3).expected_trainable(
        copy.deepcopy(tiny("loram").base), tiny("loram").ctx)


def test_a_model_without_feed_forward_blocks_names_the_fix():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="prune=unstructured"):
        LoRAM(lr=1e-3).ffn_blocks(model)
