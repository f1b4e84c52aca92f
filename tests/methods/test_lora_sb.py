"""LoRA-SB: the init is the rank-r SVD of the approximated first update, and R's gradient is G projected onto it."""

from __future__ import annotations

import copy
import math

import torch

from methods.lora_sb import LoRASB, LoRASBLinear
from tests.helpers import tiny, wrapped

R = 8  # small enough that the rank-r truncation of a 64×64 update is a real truncation


def _setup(r: int = R):
    t = tiny("lora_sb", extra=[f"method.r={r}"])
    t.base.eval()  # no dropout: the independent gradient estimate below sees the same forward as calibrate()
    method, model = wrapped(t)
    return t, method, model


def _summed_gradients(base: torch.nn.Module, names: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Σ_i ∇_W L_i over every example of `batches`, for each named Linear of the plain base model."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
    total = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in weights.items()}
    for batch in batches:
        loss = model(**batch).loss * len(batch["labels"])  # the batch mean loss × batch size = Σ_i L_i
        for n, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
            total[n] += g.double()
    return total


def test_init_is_the_rank_r_svd_of_the_update():
    t, method, model = _setup()
    layers = method.adapted_layers(model)
    assert not method.init_equals_base
    assert method.eta_eff == method.lr / max(1, math.ceil(method.warmup_ratio * method.total_steps))
    grads = _summed_gradients(t.base, list(layers), t.calibration)  # 24 examples < grad_samples = 50: all of them
    for name, layer in layers.items():
        g_hat = -method.eta_eff * torch.sign(grads[name])  # (m, n) Ĝ = −η_eff·sign(ΣG)
        u, s, vh = torch.linalg.svd(g_hat, full_matrices=False)
        truncated = (u[:, :R] * s[:R]) @ vh[:R]  # (m, n) best rank-r approximation of Ĝ
        init = layer.delta().detach().double()  # s·B·R·A
        torch.testing.assert_close(init, truncated, rtol=0, atol=1e-5 * float(truncated.abs().max()))
        eye = torch.eye(R, dtype=torch.float64)
        torch.testing.assert_close(layer.B.double().mT @ layer.B.double(), eye, rtol=0, atol=1e-5)  # B = U_r
        torch.testing.assert_close(layer.A.double() @ layer.A.double().mT, eye, rtol=0, atol=1e-5)  # A = V_rᵀ
        # W0 is untouched: the whole initial update sits in the adapter
        assert torch.equal(layer.base.weight, t.base.get_submodule(name).weight)


def test_gradient_of_R_and_the_equivalent_update_of_W():
    t, method, model = _setup()
    name, layer = next(iter(method.adapted_layers(model).items()))
    assert isinstance(layer, LoRASBLinear)
    model.eval()
    model(**t.batch).loss.backward()
    g_r = layer.R.grad.double()  # (r, r)

    merged = method.merge(copy.deepcopy(model))  # the same function with W = W0 + s·B·R·A as a plain weight
    merged.requires_grad_(False)
    w = merged.get_submodule(name).weight
    w.requires_grad_(True)
    merged.eval()
    merged(**t.batch).loss.backward()
    g = w.grad.double()  # (m, n) G = ∂L/∂W

    b, a, s = layer.B.double(), layer.A.double(), layer.scaling
    torch.testing.assert_close(g_r, s * b.mT @ g @ a.mT, rtol=1e-4, atol=1e-9)  # ∂L/∂R = s·Bᵀ·G·Aᵀ

    # one SGD step on R moves W by −η·s²·U_rU_rᵀ·G·V_rV_rᵀ
    eta = 0.1
    before = s * b @ layer.R.detach().double() @ a  # (m, n), in float64: the step is tiny next to ΔW itself
    with torch.no_grad():
        layer.R -= eta * layer.R.grad
    moved = s * b @ layer.R.detach().double() @ a - before
    expected = -eta * s**2 * (b @ b.mT) @ g @ (a.mT @ a)  # (m, n)
    torch.testing.assert_close(moved, expected, rtol=0, atol=1e-3 * float(expected.abs().max()))  # fp32 gradients


def test_only_R_trains_r_squared_per_layer():
    t, method, model = _setup()
    trainable = method.trainable_parameters(model)
    for name, layer in method.adapted_layers(model).items():
        assert f"{name}.R" in trainable and trainable[f"{name}.R"].shape == (R, R)
        assert not layer.B.requires_grad and not layer.A.requires_grad
    adapters = [n for n in trainable if not n.startswith("classifier")]
    assert len(adapters) == len(method.adapted_layers(model))


def test_rank_is_capped_and_eta_follows_the_run_schedule():
    t = tiny("lora_sb")  # r = 96 > 64 = hidden size of the tiny BERT
    method = t.method()
    assert method.total_steps == t.cfg.train.max_steps and method.warmup_ratio == t.cfg.train.warmup_ratio
    base = copy.deepcopy(t.base)
    for layer in method.target_layers(base, t.ctx).values():
        assert method.layer_trainable(layer) == min(96, layer.in_features, layer.out_features) ** 2
    schedule = LoRASB(lr=1e-4, warmup_ratio=0.06, total_steps=400)
    assert schedule.warmup_steps == 24 and abs(schedule.eta_eff - 1e-4 / 24) < 1e-18
    assert LoRASB(lr=1e-4, warmup_ratio=0.0, total_steps=400).eta_eff == 1e-4  # no warmup: the full first step


def test_state_dict_restores_the_frozen_bases():
    t, method, model = _setup()
    state = method.state_dict()
    fresh_method = t.method()
    fresh = fresh_method.prepare(copy.deepcopy(t.base), t.ctx)  # not calibrated: B = A = 0
    fresh_method.load_state_dict(state)
    for name, layer in fresh_method.adapted_layers(fresh).items():
        assert torch.equal(layer.B, method.adapted_layers(model)[name].B)
        assert torch.equal(layer.A, method.adapted_layers(model)[name].A)
