"""SoRA's properties (specs/methods.md, group C): the proximal step zeroes the gates with |g| ≤ ξ and shrinks the
others by ξ; the merged ΔW has rank nnz(g); merged == forward; the optimizer's state round-trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from bench.export import low_rank_factors
from methods.sora import SoRA, SoRALinear, SparseGateAdamW, soft_threshold
from tests.helpers import logits, tiny, train_steps, wrapped

XI = 0.5  # a threshold large enough to zero a good share of N(0, 1) gates in one step


def sora(extra: list[str] | None = None):
    t = tiny("sora", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, SoRA)
    return t, method, model


def layers(method: SoRA, model: torch.nn.Module) -> dict[str, SoRALinear]:
    return method.adapted_layers(model)  # type: ignore[return-value]


def randomize_b(model: torch.nn.Module, method: SoRA, seed: int = 1) -> None:
    """B = 0 at init hides the gates; give it random values so every gated component shows in ΔW."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(method, model).values():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.3)


def test_soft_threshold_zeroes_small_entries_and_shrinks_the_others_by_xi():
    x = torch.tensor([-2.0, -0.5, -0.3, -1e-9, 0.0, 0.2, 0.5, 0.50001, 3.0])
    out = soft_threshold(x, 0.5)
    expected = torch.tensor([-1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.00001, 2.5])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    small = x.abs() <= 0.5
    assert torch.all(out[small] == 0)
    torch.testing.assert_close(out[~small].abs(), x[~small].abs() - 0.5)
    assert torch.equal(torch.sign(out[~small]), torch.sign(x[~small]))  # no sign flips


def test_prox_step_of_the_optimizer_on_the_gates():
    """With zero gradients AdamW moves nothing, so one step is exactly the soft threshold on the gates (and only
    there: A and B are untouched)."""
    t, method, model = sora([f"method.threshold={XI}"])
    opt = method.make_optimizer(model)
    before = {n: p.detach().clone() for n, p in method.trainable_parameters(model).items()}
    for p in method.trainable_parameters(model).values():
        p.grad = torch.zeros_like(p)
    opt.step()
    zeroed = 0
    for name, p in method.trainable_parameters(model).items():
        if name.endswith(".gate"):
            g0 = before[name]
            assert torch.all(p[g0.abs() <= XI] == 0)
            torch.testing.assert_close(p[g0.abs() > XI], g0[g0.abs() > XI] - XI * torch.sign(g0[g0.abs() > XI]))
            zeroed += int((g0.abs() <= XI).sum())
        else:
            assert torch.equal(p, before[name]), name
    assert zeroed > 0


def test_prox_step_follows_the_adamw_step():
    """With gradients: gates = soft_threshold(AdamW step, ξ); ξ·lr with threshold_times_lr."""
    torch.manual_seed(0)
    g0, grad = torch.randn(64), torch.randn(64)
    for times_lr, xi_eff in ((False, 0.3), (True, 0.3 * 0.01)):
        gate, ref = torch.nn.Parameter(g0.clone()), torch.nn.Parameter(g0.clone())
        opt = SparseGateAdamW([{"params": [gate], "soft_threshold": 0.3, "threshold_times_lr": times_lr}], lr=0.01)
        adamw = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.0)
        for _ in range(3):
            gate.grad, ref.grad = grad.clone(), grad.clone()
            opt.step()
            adamw.step()
            with torch.no_grad():
                ref.copy_(soft_threshold(ref, xi_eff))
        torch.testing.assert_close(gate, ref, rtol=0, atol=0)


def test_merged_delta_has_rank_equal_to_the_number_of_nonzero_gates():
    t, method, model = sora()
    randomize_b(model, method)
    expected = {}
    with torch.no_grad():
        for i, (name, layer) in enumerate(layers(method, model).items()):
            k = i % (method.r + 1)  # 0..r gates zeroed, different per layer
            layer.gate[:k] = 0.0
            expected[name] = method.r - k
    assert method.ranks(model) == expected
    deltas = method.delta_weights(model)
    for name, d in deltas.items():
        assert int(torch.linalg.matrix_rank(d, rtol=1e-5)) == expected[name], name  # fp32 ΔW: fp32 tolerance
        if expected[name]:  # the PEFT export factors ΔW at its numerical rank: the pruned rank
            assert low_rank_factors(d)[0].shape[1] == expected[name], name
        b, a = layers(method, model)[name].pruned_factors()  # the rank-nnz LoRA the paper keeps
        assert b.shape[1] == a.shape[0] == expected[name]
        torch.testing.assert_close((b @ a).double(), d.double(), rtol=0, atol=1e-6)
    # the exact ΔW without pruning equals the pruned one: zero gates contribute nothing
    for name, layer in layers(method, model).items():
        full = layer.scaling * layer.B.double() @ torch.diag(layer.gate.double()) @ layer.A.double()
        torch.testing.assert_close(full.float(), deltas[name], rtol=0, atol=1e-6)
    # merged == forward, with pruned components
    merged = method.merge(copy.deepcopy(model))
    assert not any(isinstance(m, SoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, t.batch), logits(model, t.batch), rtol=1e-4, atol=1e-5)
    metrics = method.post_train(model, t.ctx)
    assert metrics["sora_nonzero_gates"] == sum(expected.values())
    assert metrics["sora_rank_per_layer_mean"] == pytest.approx(sum(expected.values()) / len(expected))
    assert metrics["sora_rank_per_layer_min"] == min(expected.values())
    assert metrics["sora_rank_per_layer_max"] == max(expected.values())


def test_extra_loss_is_eta_times_the_mean_absolute_gate():
    t, method, model = sora()
    gates = method.gates(model)
    n = sum(g.numel() for g in gates)
    loss = method.extra_loss(model, t.batch, None)
    expected = method.sparsity_weight * sum(g.detach().abs().sum() for g in gates) / n
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    for g in gates:
        torch.testing.assert_close(g.grad, method.sparsity_weight * torch.sign(g.detach()) / n)


def test_training_sparsifies_the_gates_and_a_huge_threshold_prunes_every_component():
    t, method, model = sora([f"method.threshold={XI}"])
    train_steps(model, method, t.loader, steps=2)
    assert 0 < method.post_train(model, t.ctx)["sora_nonzero_gates"] < method.r * len(method.ranks(model))

    t, method, model = sora(["method.threshold=100"])
    train_steps(model, method, t.loader, steps=1)
    assert method.post_train(model, t.ctx)["sora_nonzero_gates"] == 0
    assert all(d.abs().max() == 0 for d in method.delta_weights(model).values())


def _step(model: torch.nn.Module, method: SoRA, opt: torch.optim.Optimizer, batch: dict) -> None:
    loss = model(**batch).loss + method.extra_loss(model, batch, None)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_optimizer_state_round_trips_and_the_next_steps_are_identical():
    t, method, model = sora([f"method.threshold={XI / 50}", "method.threshold_times_lr=true"])
    model.eval()  # no dropout: two runs of the same steps are bit-identical
    batches = [t.batch, *t.calibration]
    opt = method.make_optimizer(model, weight_decay=0.01)
    for batch in batches[:2]:
        _step(model, method, opt, batch)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "adapter": method.adapter_state_dict(model)}, buffer)

    buffer.seek(0)
    saved = torch.load(buffer)
    fresh_method, fresh = wrapped(t)
    fresh.eval()
    fresh_method.load_adapter_state_dict(fresh, saved["adapter"])
    fresh_opt = fresh_method.make_optimizer(fresh, weight_decay=0.01)
    fresh_opt.load_state_dict(saved["opt"])
    assert any(g.get("soft_threshold", 0) > 0 for g in fresh_opt.param_groups)
    for batch in batches[2:]:
        _step(model, method, opt, batch)
        _step(fresh, fresh_method, fresh_opt, batch)
    now, other = method.trainable_parameters(model), fresh_method.trainable_parameters(fresh)
    assert set(now) == set(other)
    for name, p in now.items():
        assert torch.equal(p, other[name]), name
