"""CoDyRA's properties (arXiv 2412.01004): the threshold is 0 through the dense phase and then rises in a staircase
to κ; every gate is soft-thresholded after each step; a new task folds the kept components into the frozen store
without changing the model, and starts a fresh gated LoRA; the store stays fixed while the next task trains; a
continual stage on a real cell starts from the previous stage's ΔW and adds to it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from bench.run import run
from methods.codyra import CoDyRA, CoDyRALinear, threshold_at
from tests.helpers import compose_cfg, logits, tiny, train_steps, wrapped


def codyra(extra: list[str] | None = None):
    t = tiny("codyra", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, CoDyRA)
    return t, method, model


def layers(method: CoDyRA, model: torch.nn.Module) -> dict[str, CoDyRALinear]:
    return method.layers(model)


def randomize_b(method: CoDyRA, model: torch.nn.Module, seed: int = 1) -> None:
    """B = 0 at init hides the components; random B makes every gated component show in ΔW."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(method, model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.3)


def test_threshold_schedule_is_zero_while_dense_then_a_staircase_to_kappa():
    steps, kappa, levels = 100, 7e-4, 5
    values = [threshold_at(s, steps, kappa, levels, 0.5) for s in range(steps)]
    assert all(v == 0 for v in values[:51]) and values[51] > 0  # thresholds after the steps past 0.5·100
    assert all(b >= a for a, b in zip(values, values[1:]))  # never falls
    assert values[-1] == pytest.approx(kappa)
    assert sorted(set(values)) == pytest.approx([kappa * k / (levels - 1) for k in range(levels)])
    assert threshold_at(10, steps, 0.0, levels, 0.5) == 0  # κ = 0: plain gated LoRA
    assert threshold_at(1, steps, kappa, levels, 0.0) > 0  # no dense phase: thresholds from the second step on


def test_every_gate_is_soft_thresholded_after_a_step_past_the_dense_phase():
    t, method, model = codyra(["method.max_threshold=0.5", "method.levels=2", "method.dense_ratio=0.5"])
    method.max_steps = 10
    before = {n: layer.gate.detach().clone() for n, layer in layers(method, model).items()}
    method.on_step_end(model, 5, None)  # still dense: nothing moves
    assert all(torch.equal(before[n], layer.gate) for n, layer in layers(method, model).items())
    method.on_step_end(model, 6, None)  # λ = 0.5
    zeroed = 0
    for name, layer in layers(method, model).items():
        g0, g = before[name], layer.gate.detach()
        small = g0.abs() <= 0.5
        assert torch.all(g[small] == 0)
        torch.testing.assert_close(g[~small].abs(), g0[~small].abs() - 0.5)
        zeroed += int(small.sum())
    assert zeroed > 0


def test_fold_keeps_the_model_and_starts_a_fresh_gated_lora():
    t, method, model = codyra(["method.max_stages=2"])
    randomize_b(method, model)
    with torch.no_grad():
        for layer in layers(method, model).values():
            layer.gate[::3] = 0.0  # some components dropped by the threshold
    out0, delta0 = logits(model, t.batch), method.delta_weights(model)
    kept = {n: int(layer.gate.count_nonzero()) for n, layer in layers(method, model).items()}
    factors = {n: layer.pruned_factors() for n, layer in layers(method, model).items()}
    info = method.continue_stage(model)
    assert info["codyra_folded_rank"] == sum(kept.values())
    torch.testing.assert_close(logits(model, t.batch), out0, rtol=1e-5, atol=1e-5)
    for name, d in method.delta_weights(model).items():
        torch.testing.assert_close(d, delta0[name], rtol=1e-5, atol=1e-6)
    for name, layer in layers(method, model).items():
        b, a = factors[name]
        assert layer.used == kept[name]
        torch.testing.assert_close(layer.A_old[: layer.used], a)
        torch.testing.assert_close(layer.B_old[:, : layer.used], b)
        assert torch.all(layer.A_old[layer.used:] == 0)
        assert torch.all(layer.B == 0) and layer.gate.count_nonzero() == layer.r  # fresh: B = 0, g ~ N(0, 1)
        assert not layer.A_old.requires_grad and not layer.B_old.requires_grad
    trainable = method.trainable_parameters(model)
    assert not any(n.endswith(("A_old", "B_old")) for n in trainable)  # the store is frozen
    assert {f"{n}.A_old" for n in layers(method, model)} <= set(method.saved_parameters(model))


def test_the_store_stays_fixed_while_the_next_task_trains():
    t, method, model = codyra()
    randomize_b(method, model)
    method.continue_stage(model)
    store = {n: (layer.A_old.detach().clone(), layer.B_old.detach().clone()) for n, layer in layers(method, model).items()}
    train_steps(model, method, t.loader, steps=3)
    for name, layer in layers(method, model).items():
        assert torch.equal(layer.A_old, store[name][0]) and torch.equal(layer.B_old, store[name][1])
    assert any(layer.B.abs().max() > 0 for layer in layers(method, model).values())  # the new LoRA trained


def test_a_full_store_names_the_key_to_raise():
    t, method, model = codyra(["method.max_stages=1"])
    method.continue_stage(model)  # B = 0: the components are kept (g ≠ 0) but add nothing; the store is now full
    with pytest.raises(ValueError, match="method.max_stages"):
        method.continue_stage(model)


def test_loading_a_saved_adapter_recounts_the_store():
    t, method, model = codyra()
    randomize_b(method, model)
    method.continue_stage(model)
    state = method.adapter_state_dict(model)
    method2, model2 = wrapped(t)
    method2.load_adapter_state_dict(model2, state)
    assert [layer.used for layer in layers(method2, model2).values()] == [
        layer.used for layer in layers(method, model).values()]
    torch.testing.assert_close(logits(model2, t.batch), logits(model, t.batch))


TINY = ["model=tiny_bert", "+experiment=smoke", "progress=false"]


def test_a_continual_stage_adds_a_new_adapter_to_the_previous_stages_delta(tmp_path):
    first = run(compose_cfg(["method=codyra", "task=glue/sst2", *TINY, f"results_dir={tmp_path}"]))
    assert first["status"] == "completed", first["error"]
    second = run(compose_cfg(["method=codyra", "task=glue/mrpc", *TINY, f"results_dir={tmp_path}",
                              f"train.init_from={first['id']}"]))
    assert second["status"] == "completed", second["error"]
    assert second["init_from"]["codyra_folded_rank"] > 0
    assert 0 < second["cost"]["setup_s"] < second["cost"]["train_s"] + 60  # wrap + calibrate, timed apart from training
    assert second["metrics"]["codyra_earlier_rank"] == second["init_from"]["codyra_folded_rank"]
    d1 = load_file(str(tmp_path / "runs" / first["id"] / "delta.safetensors"))
    d2 = load_file(str(tmp_path / "runs" / second["id"] / "delta.safetensors"))
    saved = load_file(str(tmp_path / "runs" / second["id"] / "adapter.safetensors"))
    for name, d in d1.items():
        a_old, b_old = saved[f"{name}.A_old"].double(), saved[f"{name}.B_old"].double()
        torch.testing.assert_close((b_old @ a_old).float(), d, rtol=1e-4, atol=1e-6)  # stage 1's ΔW, kept frozen
        assert not torch.allclose(d2[name], d)  # stage 2 trained on top of it
