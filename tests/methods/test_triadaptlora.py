"""TriAdaptLoRA's properties (specs/methods.md, group D): C is assembled from lower-triangular row blocks and
upper-triangular column blocks with ρ² free entries; merged == forward after growth; the total rank never exceeds the
budget; growth leaves ΔW and the output unchanged (preserve_output_on_growth, the default: C absorbs ρ_new/ρ_old, and
its AdamW moments are re-expressed as its gradient transforms) or, with it off, leaves B·C·A unchanged so that
ΔW_after = ΔW_before·ρ_old/ρ_new; B learns from step 0 and C right after (the all-zero init of a public implementation
never learns); n_t follows the schedule; a run resumed after a growth event ends exactly where the uninterrupted run
does, in both modes."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.train import Trainer
from methods.base import head_parameter_count
from methods.triadaptlora import TriAdaptLoRA, TriAdaptLoRALinear
from tests.helpers import logits, tiny, train_steps, wrapped
from tests.methods.resume import resume_matches_uninterrupted

GROW_FAST = ["method.warmup_ratio=0.2", "method.incre_interval=1", "train.max_steps=6"]  # growth from step 2


def triadapt(extra: list[str] | None = None):
    t = tiny("triadaptlora", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, TriAdaptLoRA)
    return t, method, model


def layers(method: TriAdaptLoRA, model: torch.nn.Module) -> dict[str, TriAdaptLoRALinear]:
    return method.adapted_layers(model)  # type: ignore[return-value]


def test_core_is_lower_row_blocks_plus_strict_upper_column_blocks():
    layer = TriAdaptLoRALinear(nn.Linear(16, 12), alpha=4.0, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    sizes, s = [1, 2, 3], 0
    for k in sizes:
        layer.add_block(torch.randn(k, 16, generator=g), torch.randn(12, k, generator=g),
                        torch.randn(k, s + k, generator=g), torch.randn(s, k, generator=g) if s else None)
        s += k
    c = layer.core().detach()
    expected = torch.zeros(6, 6)
    ends = [0, 1, 3, 6]
    for j in range(3):
        expected[ends[j]:ends[j + 1], :ends[j + 1]] = layer.C_row[j].detach()  # lower triangle incl. diagonal block
        if j:
            expected[:ends[j], ends[j]:ends[j + 1]] = layer.C_col[j - 1].detach()  # strict upper triangle
    torch.testing.assert_close(c, expected, rtol=0, atol=0)
    assert sum(p.numel() for p in [*layer.C_row, *layer.C_col]) == 6 * 6  # every entry of C exactly once
    a, b = layer.stacked()
    torch.testing.assert_close(layer.delta(), (4.0 / 6) * b @ c @ a)


def test_merged_equals_forward_and_the_budget_holds_after_growth():
    t, method, model = triadapt(GROW_FAST)
    run = Trainer(model, method, t.loader, SimpleNamespace(max_steps=6, grad_accum=1, warmup_ratio=0.0, weight_decay=0.0,
                                                          max_grad_norm=1.0), torch.device("cpu"), None)
    totals = []
    for _ in range(6):
        run.step()
        totals.append(sum(method.ranks(model).values()))
        assert totals[-1] == method.total_rank <= method.budget
    assert totals[0] == totals[1] == len(layers(method, model))  # t_w = round(0.2 · 6) = 1: first growth at step 2
    assert totals[-1] == method.budget == 8 * len(layers(method, model))
    assert len(set(method.ranks(model).values())) > 1  # ranks differ across layers
    count = head_parameter_count(t.base, t.ctx) + sum(
        layer.rank * (layer.in_features + layer.out_features) + layer.rank ** 2 for layer in layers(method, model).values())
    assert sum(p.numel() for p in method.trainable_parameters(model).values()) == count
    optimized = {p for g in run.optimizer.param_groups for p in g["params"]}
    assert optimized == set(method.trainable_parameters(model).values())

    merged = method.merge(copy.deepcopy(model))
    assert not any(isinstance(m, TriAdaptLoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, t.batch), logits(model, t.batch), rtol=1e-4, atol=1e-5)
    for name, d in method.delta_weights(model).items():
        layer = layers(method, model)[name]
        a, b = (x.detach().double() for x in layer.stacked())
        torch.testing.assert_close(d.double(), layer.scaling * b @ layer.core().detach().double() @ a, rtol=0, atol=1e-6)


def _bca(layer: TriAdaptLoRALinear) -> torch.Tensor:
    a, b = (x.detach().double() for x in layer.stacked())
    return b @ layer.core().detach().double() @ a  # (m, n)


@pytest.mark.parametrize("preserve", [True, False])
def test_growth_keeps_the_output_or_rescales_the_update_and_follows_the_core_growth_ranking(preserve):
    """preserve_output_on_growth: ΔW and the logits are unchanged by a growth (C ← [[c·C, 0], [0, I]], c = ρ_new/ρ_old).
    Off: B·C·A is unchanged, so ΔW_after = ΔW_before·ρ_old/ρ_new and the logits move (undoing α/ρ restores them)."""
    t, method, model = triadapt([*GROW_FAST, f"method.preserve_output_on_growth={str(preserve).lower()}"])
    assert method.preserve_output_on_growth is preserve
    train_steps(model, method, t.loader, steps=2)  # no growth yet (t_w = 1, and train_steps' cfg has 2 steps)
    names = list(layers(method, model))
    favoured = [names[3], names[7]]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers(method, model).values():  # a B large enough for ΔW to move the logits
            layer.B[0].copy_(0.5 * torch.randn(layer.B[0].shape, generator=g))
        for name in favoured:  # these cores grew most since the last check
            layers(method, model)[name].C_row[0].add_(1.0)
    rank = {n: layer.rank for n, layer in layers(method, model).items()}
    product = {n: _bca(layer) for n, layer in layers(method, model).items()}
    out = logits(model, t.batch)
    method.budget = method.total_rank + 2 * method.incre_rank_num  # room for two layers: n_t is clamped by the budget
    grown = method.grow(model, step=method.T - 1)  # late: n_t = all layers, the budget decides
    assert grown == {n: method.incre_rank_num for n in favoured}
    for name, layer in layers(method, model).items():
        assert layer.rank == rank[name] + grown.get(name, 0)
        c = layer.rank / rank[name]  # ρ_new/ρ_old
        delta_before = (method.alpha / rank[name]) * product[name]
        delta_after = layer.scaling * _bca(layer)
        if preserve:  # ΔW unchanged
            torch.testing.assert_close(delta_after, delta_before, rtol=1e-6, atol=1e-12)
        else:  # B·C·A unchanged: ΔW_after = ΔW_before·ρ_old/ρ_new
            torch.testing.assert_close(_bca(layer), product[name], rtol=0, atol=1e-12)
            torch.testing.assert_close(delta_after, delta_before / c, rtol=1e-12, atol=0)
    assert method.total_rank == method.budget
    after = logits(model, t.batch)
    if preserve:
        torch.testing.assert_close(after, out, rtol=1e-5, atol=1e-5)  # fp32 rounding of the fold-in only
    else:
        assert (after - out).abs().max() > 1e-2  # the output jumps
        for name in favoured:  # undo the α/ρ rescale
            layers(method, model)[name].alpha = method.alpha * layers(method, model)[name].rank / rank[name]
        torch.testing.assert_close(logits(model, t.batch), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preserve", [True, False])
def test_growth_re_expresses_the_adam_moments_of_c_as_its_gradient_transforms(preserve):
    """With the fold-in, C ← c·C (c = ρ_new/ρ_old) with the output unchanged, so ∂L/∂C ← ∂L/∂C / c; the moments follow:
    exp_avg ← exp_avg / c, exp_avg_sq ← exp_avg_sq / c², keeping m/√v. Without it, C and its moments are left alone."""
    t, method, model = triadapt(["train.max_steps=100", "method.warmup_ratio=0.5", "method.incre_interval=1",
                                 "method.orth_reg_weight=0",
                                 f"method.preserve_output_on_growth={str(preserve).lower()}"])
    run = Trainer(model, method, t.loader, SimpleNamespace(max_steps=100, grad_accum=1, warmup_ratio=0.0,
                                                           weight_decay=0.0, max_grad_norm=1.0), torch.device("cpu"), None)
    for _ in range(3):  # no growth: step <= t_w = 50
        run.step()

    def grad_c() -> dict[str, torch.Tensor]:
        model.eval()
        model.zero_grad(set_to_none=True)
        model(**t.batch).loss.backward()
        return {n: layer.C_row[0].grad.detach().clone() for n, layer in layers(method, model).items()}

    state = run.optimizer.state
    c0 = {n: layer.C_row[0].detach().clone() for n, layer in layers(method, model).items()}
    m0 = {n: state[layer.C_row[0]]["exp_avg"].clone() for n, layer in layers(method, model).items()}
    v0 = {n: state[layer.C_row[0]]["exp_avg_sq"].clone() for n, layer in layers(method, model).items()}
    g0 = grad_c()
    assert all(m.abs().max() > 0 for m in m0.values()) and all(g.abs().max() > 0 for g in g0.values())
    assert method.on_step_end(model, 52, run.optimizer)  # a growth (n_t = 3), through the training loop's hook
    grown = [n for n, layer in layers(method, model).items() if layer.rank > method.init_rank]
    assert 0 < len(grown) < len(layers(method, model))
    g1 = grad_c()
    for name, layer in layers(method, model).items():
        c = layer.rank / method.init_rank if preserve else 1.0
        p = layer.C_row[0]
        torch.testing.assert_close(p.detach(), c0[name] * c, rtol=1e-6, atol=0)
        torch.testing.assert_close(state[p]["exp_avg"], m0[name] / c, rtol=1e-6, atol=0)
        torch.testing.assert_close(state[p]["exp_avg_sq"], v0[name] / c**2, rtol=1e-6, atol=0)
        if preserve:  # same output: the gradient is divided by c, as the moments were
            torch.testing.assert_close(g1[name], g0[name] / c, rtol=1e-4, atol=1e-9)


def test_layers_to_grow_follows_the_linear_and_nonlinear_schedules():
    t, method, model = triadapt(["train.max_steps=100", "method.warmup_ratio=0.1"])
    left = method.budget - method.total_rank  # 8·12 − 12 = 84
    n_layers = len(layers(method, model))
    for step in (11, 30, 60, 99):
        frac = (step - 10) / 90
        assert method.layers_to_grow(step, n_layers) == max(1, min(n_layers, int(left * frac)))
    method.growth = "nonlinear"
    for step in (11, 50, 80, 99):
        frac = (step - 10) / 90
        assert method.layers_to_grow(step, n_layers) == max(1, min(n_layers, int(math.exp(frac * math.log(left)))))


def _grads(model, method, batch):
    model.zero_grad(set_to_none=True)
    model.train()
    model(**batch).loss.backward()
    out = {}
    for name, layer in layers(method, model).items():
        out[name] = {kind: max(float(p.grad.abs().max()) if p.grad is not None else 0.0 for p in getattr(layer, kind))
                     for kind in ("A", "B", "C_row")}
    return out


def test_b_learns_from_step_zero_and_c_right_after_unlike_an_all_zero_core():
    t, method, model = triadapt(["method.orth_reg_weight=0"])
    g0 = _grads(model, method, t.batch)
    assert all(g["B"] > 0 for g in g0.values())  # C = I ≠ 0: ∂L/∂B = G·(CA)ᵀ ≠ 0 at step 0
    assert all(g["C_row"] == 0 and g["A"] == 0 for g in g0.values())  # B = 0: init == base
    opt = method.make_optimizer(model)
    opt.step()
    g1 = _grads(model, method, t.batch)
    assert all(g["C_row"] > 0 and g["A"] > 0 and g["B"] > 0 for g in g1.values())

    # the public implementation's init (B = 0 and C = 0): no factor but A ever receives a gradient
    t, method, model = triadapt(["method.orth_reg_weight=0"])
    with torch.no_grad():
        for layer in layers(method, model).values():
            layer.C_row[0].zero_()
    opt = method.make_optimizer(model)
    for _ in range(2):
        g = _grads(model, method, t.batch)
        assert all(v["B"] == 0 and v["C_row"] == 0 and v["A"] == 0 for v in g.values())
        opt.step()


def test_new_parameters_start_fresh_and_old_ones_keep_their_optimizer_state():
    t, method, model = triadapt([*GROW_FAST, "method.incre_interval=2"])
    run = Trainer(model, method, t.loader, SimpleNamespace(max_steps=6, grad_accum=1, warmup_ratio=0.0, weight_decay=0.0,
                                                          max_grad_norm=1.0), torch.device("cpu"), None)
    for _ in range(4):  # the growth at step 2 is followed by one step
        run.step()
    grown = [layer for layer in layers(method, model).values() if len(layer.A) == 2]
    assert grown
    for layer in grown:
        assert int(run.optimizer.state[layer.A[0]]["step"]) == 4  # carried over the rebuild
        assert int(run.optimizer.state[layer.B[1]]["step"]) == 1  # new: fresh state, one step since
        assert int(run.optimizer.state[layer.C_col[0]]["step"]) == 1


@pytest.mark.parametrize("preserve", [True, False])
def test_resume_after_a_growth_equals_the_uninterrupted_run(tmp_path, preserve):
    extra = ["method.warmup_ratio=0.1", "method.incre_interval=2", "method.reference_rank=4",
             f"method.preserve_output_on_growth={str(preserve).lower()}"]
    # T = 10, t_w = 1: growths at steps 2, 4, 6; checkpoint after step 4 (one growth done), kill after step 6
    (method, model), (resumed, model2) = resume_matches_uninterrupted("triadaptlora", extra, tmp_path, steps=10,
                                                                     every=4, die_after=6)
    assert method.ranks(model) == resumed.ranks(model2)
    assert len(set(method.ranks(model).values())) > 1


def test_bad_schedules_are_refused_with_the_key_to_change():
    with pytest.raises(ValueError, match="warmup_ratio"):
        TriAdaptLoRA(lr=1e-3, warmup_ratio=1.0)
    t = tiny("triadaptlora", extra=["method.total_steps=null"])
    with pytest.raises(ValueError, match="total_steps"):
        wrapped(t)
