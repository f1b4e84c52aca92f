"""FedSVD's properties (specs/methods.md, group D): only B trains; a re-factoring keeps s·B·A (and so the model)
unchanged to fp32 precision, leaves A·Aᵀ = I with A = V_rᵀ of B·A and B = U_r·Σ_r; it happens every
`refactor_every` steps and resets B's Adam state only; a run resumed from a checkpoint across re-factorings ends
exactly where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.train import Trainer
from methods.fedsvd import FedSVD, FedSVDLinear
from tests.helpers import logits, tiny, wrapped
from tests.methods.resume import resume_matches_uninterrupted


def setup(extra: list[str] | None = None):
    t = tiny("fedsvd", extra=extra)
    method, model = wrapped(t)
    assert isinstance(method, FedSVD)
    return t, method, model


def cfg(steps: int, every: int = 0) -> SimpleNamespace:
    return SimpleNamespace(max_steps=steps, grad_accum=2, warmup_ratio=0.2, weight_decay=0.01, max_grad_norm=1.0,
                           log_every=1, eval_every=0, checkpoint_every=every)


@pytest.mark.parametrize("rank_of_b", [8, 3, 0])
def test_refactor_preserves_ba_and_orthonormalises_a(rank_of_b: int):
    g = torch.Generator().manual_seed(rank_of_b)
    layer = FedSVDLinear(nn.Linear(48, 40), r=8, alpha=16, dropout=0.0, generator=g)
    with torch.no_grad():  # a B of the given rank
        layer.B.copy_(torch.randn(40, rank_of_b, generator=g) @ torch.randn(rank_of_b, 8, generator=g))
    before = layer.delta().detach().double()
    layer.refactor_()
    a, b = layer.A.detach().double(), layer.B.detach().double()
    atol = 1e-6 * max(1.0, float(before.abs().max()))  # fp32 rounding of B·A (measured ≈ 1.6e-7 relative)
    torch.testing.assert_close(layer.delta().detach().double(), before, atol=atol, rtol=0)
    torch.testing.assert_close(a @ a.T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
    # B = U_r·Σ_r: orthogonal columns whose norms are the singular values of B·A, in decreasing order
    gram = b.T @ b
    sigma = torch.linalg.svdvals(before / layer.scaling)[:8]
    torch.testing.assert_close(gram.diagonal().sqrt(), sigma, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros(8, 8, dtype=torch.float64),
                               atol=1e-5 * float(sigma[0] ** 2 + 1), rtol=0)
    assert int((b.norm(dim=0) > 1e-6).sum()) == rank_of_b


def test_only_b_trains_and_a_refactoring_leaves_the_model_unchanged():
    t, method, model = setup(["method.refactor_every=1000"])
    trainable = method.trainable_parameters(model)
    layers = method.adapted_layers(model)
    assert all(f"{n}.B" in trainable and f"{n}.A" not in trainable for n in layers)
    Trainer(model, method, t.loader, cfg(4), torch.device("cpu"), None).step()
    before = logits(model, t.batch)
    method.refactor(model)
    torch.testing.assert_close(logits(model, t.batch), before, rtol=1e-5, atol=1e-5)


def test_refactoring_happens_every_k_steps_and_resets_only_b_state():
    t, method, model = setup(["method.refactor_every=3"])
    trainer = Trainer(model, method, t.loader, cfg(7), torch.device("cpu"), None)
    layers = method.adapted_layers(model)
    head = next(iter(model.classifier.parameters()))
    for step in range(7):
        a_before = {n: layer.A.detach().clone() for n, layer in layers.items()}
        trainer.step()
        refactored = (step + 1) % 3 == 0
        for name, layer in layers.items():
            assert torch.equal(layer.A, a_before[name]) != refactored, (step, name)
            state = trainer.optimizer.state.get(layer.B, {})
            assert (not state) == refactored, (step, name)
            if state:  # Adam restarted at the last re-factoring: its step counts the steps since then
                assert int(state["step"]) == (step + 1) % 3
            if refactored:
                a = layer.A.detach().double()
                torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        assert int(trainer.optimizer.state[head]["step"]) == step + 1  # the head's state carries on


def test_adapter_state_holds_a():
    t, method, model = setup(["method.refactor_every=1"])
    Trainer(model, method, t.loader, cfg(2), torch.device("cpu"), None).step()
    state = method.adapter_state_dict(model)
    for name, layer in method.adapted_layers(model).items():
        assert torch.equal(state[f"{name}.A"], layer.A.detach())
    fresh_method, fresh = wrapped(t)
    fresh_method.load_adapter_state_dict(fresh, state)
    torch.testing.assert_close(logits(fresh, t.batch), logits(model, t.batch), rtol=0, atol=0)


def test_resume_across_refactorings_equals_an_uninterrupted_run(tmp_path: Path):
    """refactor_every = 2, checkpoint every 3 steps, killed after step 5: the resumed run restarts from step 3 (A
    re-factored at step 2, B's Adam state one step old) and re-factors again at steps 4, 6, 8."""
    extra = ["method.refactor_every=2", "method.dropout=0.1"]  # dropout: the RNG state is restored too
    (method, model), (method2, model2) = resume_matches_uninterrupted("fedsvd", extra, tmp_path, steps=8, every=3,
                                                                      die_after=5, grad_accum=2)
    batch = tiny("fedsvd", extra=extra).batch
    torch.testing.assert_close(logits(model2, batch), logits(model, batch), rtol=0, atol=0)
    for name, layer in method2.adapted_layers(model2).items():
        assert torch.equal(layer.A, method.adapted_layers(model)[name].A)
