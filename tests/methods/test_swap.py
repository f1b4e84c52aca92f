"""The SwapMethod base: swapping, freezing, merging, ΔW and counts, on a minimal method defined here."""

from __future__ import annotations

import copy

import torch
from torch import nn

from methods.swap import AdaptedLinear, SwapMethod
from tests.helpers import logits, tiny, train_steps


class BiasOnlyLinear(AdaptedLinear):
    """W' = W0 + diag-free rank-1 update u vᵀ (u = 0 at init): the smallest method that exercises the base."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.u = nn.Parameter(torch.zeros(self.out_features))
        self.v = nn.Parameter(torch.randn(self.in_features) / self.in_features**0.5)

    def delta(self) -> torch.Tensor:
        return torch.outer(self.u, self.v)  # (m, n)


class RankOne(SwapMethod):
    def make_layer(self, name, base, ctx):
        return BiasOnlyLinear(base)

    def layer_trainable(self, base):
        return base.in_features + base.out_features


def test_swap_method_mechanics():
    t = tiny("lora")
    method = RankOne(lr=1e-2)
    model = method.prepare(copy.deepcopy(t.base), t.ctx)
    torch.testing.assert_close(logits(model, t.batch), logits(t.base, t.batch))
    n_trainable = sum(p.numel() for p in method.trainable_parameters(model).values())
    assert n_trainable == method.expected_trainable(copy.deepcopy(t.base), t.ctx)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_steps(model, method, t.loader, steps=3)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    deltas = method.delta_weights(model)
    for name, layer in method.adapted_layers(model).items():
        torch.testing.assert_close(deltas[name], layer.delta().detach(), rtol=0, atol=1e-7)
        assert torch.linalg.matrix_rank(deltas[name].double(), rtol=1e-5) == 1
    merged = method.merge(copy.deepcopy(model))
    assert not method.adapted_layers(merged)
    torch.testing.assert_close(logits(merged, t.batch), logits(model, t.batch), rtol=1e-5, atol=1e-6)
