"""LoRA-GA's property (specs/methods.md, group B): the first step of s·B·A is proportional to the rank-2r
truncation of the full gradient with the authors' scaling, and is not with PEFT's."""

from __future__ import annotations

import copy

import pytest
import torch

from methods.lora_ga import estimate_gradients
from tests.helpers import logits, tiny


def first_step_alignment(implementation: str) -> tuple[list[float], list[float]]:
    """Per layer: cos(first step, G_2r), and the spread max/min of the step's gain along each of G's top-2r
    singular directions (u_iᵀ·step·v_i / σ_i): 1 when the step is proportional to G_2r."""
    t = tiny("lora_ga", extra=[f"method.implementation={implementation}", "method.r=2"])
    method = t.method()
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    model.eval()  # no dropout: the gradient below is the one the init was built from
    layers = method.lora_layers(model)
    loss_fn = lambda m, b: m(**b).loss  # noqa: E731
    grads = estimate_gradients(model, {n: l.get_base_layer().weight for n, l in layers.items()}, [t.batch], loss_fn, 8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        method.init_from_gradients(model, grads)
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch), rtol=1e-4, atol=1e-5)

    model.zero_grad()
    loss_fn(model, t.batch).backward()
    cosines, spreads = [], []
    for name, layer in layers.items():
        s, r = layer.scaling["default"], method.r
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, n), (m, r)
        step = s * (b.grad @ a + b @ a.grad).double()  # first-order change of s·B·A per unit of −lr
        u, sv, vh = torch.linalg.svd(grads[name].double(), full_matrices=False)
        g2r = u[:, :2 * r] @ torch.diag(sv[:2 * r]) @ vh[:2 * r]  # (m, n)
        cosines.append(float(torch.nn.functional.cosine_similarity(step.detach().flatten(), g2r.flatten(), dim=0)))
        gains = torch.einsum("mi,mn,in->i", u[:, :2 * r], step.detach(), vh[:2 * r]) / sv[:2 * r]  # (2r,)
        spreads.append(float(gains.abs().max() / gains.abs().min()))
    return cosines, spreads


def test_reference_first_step_is_the_rank_2r_truncation_of_the_gradient():
    cosines, spreads = first_step_alignment("reference")
    assert min(cosines) > 0.999, cosines
    assert max(spreads) < 1.01, spreads


def test_peft_scaling_is_not_aligned_with_the_truncated_gradient():
    cosines, spreads = first_step_alignment("peft")
    assert min(spreads) > 1.1, spreads  # PEFT weighs the directions r+1..2r by c²σ_i² instead of 1


def test_calibration_is_reproducible_from_the_seed():
    t = tiny("lora_ga")
    deltas = []
    for _ in range(2):
        method = t.method()
        model = method.prepare(copy.deepcopy(t.base), t.ctx)
        model.train()  # dropout on, as in the runner: the seeded RNG must make it repeatable
        method.calibrate(model, iter(t.calibration), lambda m, b: m(**b).loss)
        deltas.append({n: l.lora_A["default"].weight.clone() for n, l in method.lora_layers(model).items()})
    for name in deltas[0]:
        assert torch.equal(deltas[0][name], deltas[1][name])


@pytest.mark.parametrize("samples,expected_batches", [(8, 1), (9, 2), (24, 3)])
def test_gradient_estimate_uses_enough_batches(samples, expected_batches):
    t = tiny("lora")
    seen = []
    def loss_fn(m, b):  # noqa: E306
        seen.append(1)
        return m(**b).loss
    w = {"w": t.base.classifier.weight}
    estimate_gradients(t.base, w, iter(t.calibration), loss_fn, samples)
    assert len(seen) == expected_batches
