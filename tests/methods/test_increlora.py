"""IncreLoRA's properties (specs/methods.md, group D): the total rank never exceeds the budget and reaches it; adding
a component does not change the layer's update (only the α/ρ rescale of the reference moves the output); the
importance is |ΔW ⊙ ∂L/∂ΔW|; growth keeps the optimizer state of surviving parameters and starts new ones fresh; a
run resumed after a growth event ends exactly where the uninterrupted run does."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bench.train import Trainer
from methods.base import head_parameter_count
from methods.increlora import IncreLoRA, IncreLoRALinear
from tests.helpers import logits, tiny, wrapped
from tests.methods.resume import resume_matches_uninterrupted


def increlora(extra: list[str] | None = None):
    t = tiny("increlora", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, IncreLoRA)
    return t, method, model


def layers(method: IncreLoRA, model: torch.nn.Module) -> dict[str, IncreLoRALinear]:
    return method.adapted_layers(model)  # type: ignore[return-value]


def trainer(model, method, loader, steps: int) -> Trainer:
    cfg = SimpleNamespace(max_steps=steps, grad_accum=1, warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0)
    return Trainer(model, method, loader, cfg, torch.device("cpu"), None)


def unscaled(layer: IncreLoRALinear) -> torch.Tensor:
    """Σ e_i·b_i·a_iᵀ (float64): the update before the α/ρ scaling."""
    a, b, e = (x.detach().double() for x in layer.stacked())
    return (b * e) @ a


@pytest.mark.parametrize("incre_rank_num, budget", [(1, None), (2, 19)])
def test_total_rank_never_exceeds_the_budget_and_reaches_it(incre_rank_num, budget):
    extra = ["method.init_warmup=1", "method.incre_interval=1", "method.top_h=5", "method.target_rank=3",
             f"method.incre_rank_num={incre_rank_num}"] + ([f"method.target_total_rank={budget}"] if budget else [])
    t, method, model = increlora(extra)
    budget = budget or 3 * len(layers(method, model))
    totals, run = [], trainer(model, method, t.loader, steps=12)
    for _ in range(12):
        run.step()
        totals.append(sum(method.ranks(model).values()))
        assert totals[-1] == method.total_rank <= budget
    assert totals[0] == len(layers(method, model))  # no growth at steps 0, 1 (warmup)
    assert totals[-1] == budget and max(totals) == budget
    for layer in layers(method, model).values():  # budget spent: reserves gone, scores no longer tracked
        assert layer.n_components == layer.n_active and not layer.track
    count = head_parameter_count(t.base, t.ctx) + sum(
        layer.n_active * (layer.in_features + layer.out_features + 1) for layer in layers(method, model).values())
    assert sum(p.numel() for p in method.trainable_parameters(model).values()) == count
    assert method.post_train(model, t.ctx)["increlora_total_rank"] == budget


@pytest.mark.parametrize("advance_learn", [False, True])
def test_adding_a_component_does_not_change_the_update(advance_learn):
    """Without advance learning the new component (e = 0) leaves Σ e_i b_i a_iᵀ and, undoing the α/ρ rescale,
    the output unchanged; with it, the new reserve adds only its e = 1e-5 term."""
    t, method, model = increlora([f"method.advance_learn={str(advance_learn).lower()}", "method.top_h=3"])
    with torch.no_grad():  # a trained-looking update: non-zero e on the active components
        for layer in layers(method, model).values():
            for i in range(layer.n_active):
                layer.E[i].fill_(0.5)
    names = list(layers(method, model))
    method.ema = {n: [1.0, float(i)] for i, n in enumerate(names)}  # scores rise with the layer index
    before = {n: unscaled(layer) for n, layer in layers(method, model).items()}
    rho = {n: layer.n_active for n, layer in layers(method, model).items()}
    out = logits(model, t.batch)
    reserve = {n: layer.A[layer.n_active] for n, layer in layers(method, model).items()}  # the next to join

    grown = method.grow(model)
    assert grown == {n: 1 for n in names[::-1][:3]}  # the top_h layers by Ī·Ū
    for name, layer in layers(method, model).items():
        assert layer.n_active == rho[name] + grown.get(name, 0)
        assert layer.n_components - layer.n_active == method.incre_rank_num  # a fresh reserve
        diff = unscaled(layer) - before[name]
        if advance_learn and name in grown:  # the new reserve's e·b·aᵀ term, e = 1e-5
            a, b = layer.A[-1].detach().double(), layer.B[-1].detach().double()
            torch.testing.assert_close(diff, method.reserve_e * b @ a, rtol=1e-6, atol=1e-12)
        if name in grown:
            assert layer.A[rho[name]] is reserve[name]  # the reserve component joined, not a new one
        else:
            assert diff.abs().max() == 0, name
        layer.alpha = method.alpha * layer.n_active / rho[name]  # undo the α/ρ rescale
    atol = 1e-5 if advance_learn else 1e-6
    torch.testing.assert_close(logits(model, t.batch), out, rtol=0, atol=atol)


def test_importance_is_delta_times_its_gradient():
    t, method, model = increlora()
    with torch.no_grad():
        for layer in layers(method, model).values():
            for e in layer.E:
                e.fill_(0.3)
    name, layer = next(iter(layers(method, model).items()))
    layer.base.weight.requires_grad_(True)  # ∂L/∂W0 = ∂L/∂ΔW: the forward uses W0 + ΔW
    model.train()
    model(**t.batch).loss.backward()
    grad, delta = layer._delta_grad, layer.delta().detach()
    torch.testing.assert_close(grad, layer.base.weight.grad, rtol=1e-5, atol=1e-8)
    expected = float((delta * grad).abs().sum()) / math.sqrt(delta.numel())
    assert expected > 0
    assert layer.take_score() == pytest.approx(expected, rel=1e-6)
    assert layer.take_score() is None  # consumed


def test_growth_keeps_the_state_of_surviving_parameters_and_starts_new_ones_fresh():
    t, method, model = increlora(["method.init_warmup=1", "method.incre_interval=3", "method.top_h=2"])
    run = trainer(model, method, t.loader, steps=6)
    before = None
    for step in range(5):  # growth at step 3, one more step after it
        if step == 3:
            before = {n: (layer.n_active, layer.n_components) for n, layer in layers(method, model).items()}
        run.step()
    grown = [n for n, layer in layers(method, model).items() if layer.n_active > before[n][0]]
    assert len(grown) == 2
    state = run.optimizer.state
    for name in grown:
        layer = layers(method, model)[name]
        i = before[name][0]  # the reserve component that joined
        assert int(state[layer.A[i]]["step"]) == 5  # pre-trained in reserve from step 0: its moments carried over
        assert int(state[layer.E[i]]["step"]) == 1  # e was frozen until the growth: fresh state
        assert int(state[layer.A[-1]]["step"]) == 1  # the new reserve: fresh state
    optimized = {p for g in run.optimizer.param_groups for p in g["params"]}
    assert optimized == set(method.trainable_parameters(model).values())


def test_extra_loss_is_the_orthogonality_of_the_stacked_factors():
    t, method, model = increlora()
    loss = method.extra_loss(model, t.batch, None)
    terms = []
    for layer in layers(method, model).values():
        a = torch.cat([p.detach() for p in layer.A])  # (k, n)
        b = torch.cat([p.detach() for p in layer.B], dim=1)  # (m, k)
        eye = torch.eye(a.shape[0])
        terms += [torch.linalg.norm(a @ a.T - eye), torch.linalg.norm(b.T @ b - eye)]
    torch.testing.assert_close(loss.detach(), method.orth_reg_weight * torch.stack(terms).mean())


@pytest.mark.parametrize("advance_learn", [True, False])
def test_resume_after_a_growth_equals_the_uninterrupted_run(tmp_path, advance_learn):
    extra = ["method.init_warmup=1", "method.incre_interval=2", "method.top_h=2", "method.target_rank=2",
             f"method.advance_learn={str(advance_learn).lower()}"]
    # growths at steps 2, 4, 6, 8; checkpoint after step 4 (one growth done), kill after step 6
    (method, model), (resumed, model2) = resume_matches_uninterrupted("increlora", extra, tmp_path, steps=10, every=4,
                                                                     die_after=6)
    n_layers = len(layers(method, model))
    assert method.total_rank == resumed.total_rank == n_layers + 4 * 2
    assert method.ranks(model) == resumed.ranks(model2)
